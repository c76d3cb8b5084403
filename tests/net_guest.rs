//! Traffic through real guests: two demo guests booted by the real QEMU backend (TCG) on the
//! node bridge, inside a network namespace the test creates. Checks that the node reaches a
//! guest's HTTP server on its allocated IP, that a guest reaches the node (ping of the gateway
//! and a TCP fetch from a server on the node), and that the two guests reach each other, and that a guest reaches an address outside
//! the range masqueraded behind the node (a second namespace plays the outside world).
//!
//! The guest is the stock demo guest (`agent::guest`), whose `/init` configures eth0 from the
//! kernel's standard `ip=` parameter (a guest that configures itself from the command line)
//! and runs busybox `httpd`. To let the node ask a guest to send
//! traffic itself, a second cpio archive with two CGI scripts is appended to its initramfs
//! (the kernel unpacks concatenated archives in order); `/init` itself is unchanged.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::net::*;
use ignis::agent::guest::{DEFAULT_CMDLINE, DEMO_MARKER, NewcWriter, build_demo_guest};
use ignis::agent::net::{
    AttachedInterface, Interface, InterfaceMode, NetworkConfig, NetworkManager, kernel_cmdline,
};
use ignis::agent::vmm::qemu::QemuBackend;
use ignis::agent::vmm::{Spawned, VmConfig, VmmBackend};
use ignis::api::Accelerator;
use ignis::vm::VmUid;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const NODE_PORT: u16 = 8080;
const NODE_GREETING: &str = "hello from the node";

const PING_CGI: &str = r#"#!/bin/sh
echo "Content-Type: text/plain"
echo ""
if ping -c 1 -W 3 "$QUERY_STRING" >/dev/null 2>&1; then
  echo "ping $QUERY_STRING ok"
else
  echo "ping $QUERY_STRING failed"
fi
"#;

/// `host[:port]` fetched with `nc` (busybox-static's `wget` crashes in glibc's static NSS
/// lookup of the `http` service, on the host as in the guest).
const FETCH_CGI: &str = r#"#!/bin/sh
echo "Content-Type: text/plain"
echo ""
host=${QUERY_STRING%%:*}
port=80
case "$QUERY_STRING" in *:*) port=${QUERY_STRING##*:};; esac
printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 "$host" "$port" 2>&1 || echo "fetch $QUERY_STRING failed"
"#;

/// The demo initramfs plus an archive carrying `/www/cgi-bin/{ping,fetch}`.
fn probe_initrd(stock: &Path, out: &Path) -> PathBuf {
    let mut bytes = std::fs::read(stock).expect("read the demo initrd");
    let mut extra = NewcWriter::default();
    extra.file("www/cgi-bin/ping", 0o755, PING_CGI.as_bytes());
    extra.file("www/cgi-bin/fetch", 0o755, FETCH_CGI.as_bytes());
    assert_eq!(
        bytes.len() % 4,
        0,
        "cpio archives concatenate on 4-byte bounds"
    );
    bytes.extend_from_slice(&extra.finish());
    let path = out.join("initrd-probe.cpio");
    std::fs::write(&path, bytes).expect("write the probe initrd");
    path
}

/// GET until the answer contains `want`, or panic at the deadline.
async fn get_until(ip: std::net::Ipv4Addr, path: &str, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        last = common::net::http_get(ip, 80, path).await;
        if let Some(body) = &last
            && body.contains(want)
        {
            return body.clone();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("GET http://{ip}{path} never contained {want:?}; last answer: {last:?}");
}

async fn wait_marker(console: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if std::fs::read_to_string(console).is_ok_and(|t| t.contains(DEMO_MARKER)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tail = std::fs::read_to_string(console).unwrap_or_default();
    panic!("guest never printed {DEMO_MARKER:?}; console: {tail}");
}

struct Guest {
    ifaces: Vec<AttachedInterface>,
    spawned: Spawned,
    console: PathBuf,
}

impl Guest {
    fn ip(&self) -> std::net::Ipv4Addr {
        self.ifaces[0].address.expect("an address").0
    }
}

async fn boot(
    backend: &QemuBackend,
    mgr: &NetworkManager,
    uid: &str,
    kernel: &Path,
    initrd: &Path,
    dir: &Path,
) -> Guest {
    let ifaces = mgr
        .attach(
            &VmUid::new(uid).expect("uid"),
            &[Interface {
                name: "eth0".into(),
                mode: InterfaceMode::Nat,
                ..Default::default()
            }],
            None,
        )
        .await
        .expect("attach");
    let state_dir = dir.join(uid);
    let config = VmConfig {
        id: uid.into(),
        vcpus: 1,
        memory_mib: 128,
        kernel: kernel.to_path_buf(),
        cmdline: format!("{DEFAULT_CMDLINE} {}", kernel_cmdline(&ifaces, uid)),
        initrd: Some(initrd.to_path_buf()),
        disks: vec![],
        nets: ifaces.iter().map(AttachedInterface::net_config).collect(),
        user_data: None,
        accelerator: Accelerator::Tcg,
        console_log: state_dir.join("console.log"),
        api_socket: state_dir.join("qmp.sock"),
        state_dir,
        binary: PathBuf::new(),
        confinement: None,
        restore: None,
        opened: Default::default(),
    };
    let spawned = backend.create(&config).await.expect("create the VM");
    backend.start(&spawned.handle).await.expect("start the VM");
    Guest {
        ifaces,
        spawned,
        console: config.console_log,
    }
}

/// A namespace standing for "the outside world", wired to the node by a veth pair
/// (node 192.0.2.2 <-> outside 192.0.2.1, TEST-NET-1), with a TCP server there that answers
/// with the source address it sees. Deleted on drop.
struct Outside {
    ns: String,
}

const OUTSIDE_IP: &str = "192.0.2.1";
const UPLINK_IP: &str = "192.0.2.2";
const OUTSIDE_PORT: u16 = 8081;

fn ip_cmd(args: &[&str]) {
    let status = std::process::Command::new("ip")
        .args(args)
        .status()
        .expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

impl Outside {
    fn new() -> Outside {
        let ns = format!("ignis-ext-{}", std::process::id());
        ip_cmd(&["netns", "add", &ns]);
        let outside = Outside { ns };
        let ns = outside.ns.as_str();
        ip_cmd(&[
            "link", "add", "name", "igx-up", "type", "veth", "peer", "name", "igx-ext", "netns", ns,
        ]);
        ip_cmd(&["addr", "add", &format!("{UPLINK_IP}/24"), "dev", "igx-up"]);
        ip_cmd(&["link", "set", "igx-up", "up"]);
        ip_cmd(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{OUTSIDE_IP}/24"),
            "dev",
            "igx-ext",
        ]);
        ip_cmd(&["-n", ns, "link", "set", "igx-ext", "up"]);
        let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the netns");
        let (tx, rx) = std::sync::mpsc::channel();
        // setns moves only this thread; its listening socket stays in the outside namespace.
        std::thread::spawn(move || {
            nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let listener =
                std::net::TcpListener::bind((OUTSIDE_IP, OUTSIDE_PORT)).expect("bind outside");
            let _ = tx.send(());
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let peer = stream
                    .peer_addr()
                    .map(|p| p.ip().to_string())
                    .unwrap_or_default();
                let mut buf = [0u8; 512];
                let _ = std::io::Read::read(&mut stream, &mut buf);
                let _ = std::io::Write::write_all(
                    &mut stream,
                    format!("HTTP/1.0 200 OK\r\n\r\nseen from {peer}\n").as_bytes(),
                );
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("outside server listening");
        outside
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.ns])
            .status();
    }
}

#[test]
fn guests_on_the_nat_bridge_reach_the_node_and_each_other() {
    if !Path::new(QEMU).exists() {
        ignis::testing::prerequisite::missing(
            "guests_on_the_nat_bridge_reach_the_node_and_each_other",
            &format!("{QEMU} is not installed"),
        );
        return;
    }
    if !in_fresh_netns(
        "guests_on_the_nat_bridge_reach_the_node_and_each_other",
        Duration::from_secs(420),
    ) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let guest = build_demo_guest(&std::env::temp_dir().join("ignis-test-guest"))
        .expect("build the demo guest");
    let initrd = probe_initrd(&guest.initrd, dir.path());
    runtime().block_on(async {
        // Guests reach the node's services only where an admin allows it (closed by default:
        // tests/net_guard.rs); this node allows it, so the guest can fetch from it.
        let mut config = NetworkConfig::new(dir.path().join("net"));
        config.guest_access.node = true;
        let mgr = NetworkManager::new(config).await.expect("network manager");
        let gateway = mgr.config().gateway();
        let listener = tokio::net::TcpListener::bind((gateway, NODE_PORT))
            .await
            .expect("node listener on the gateway");
        let server = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let reply = format!("HTTP/1.0 200 OK\r\n\r\n{NODE_GREETING}\n");
                let _ = s.write_all(reply.as_bytes()).await;
            }
        });

        let backend = QemuBackend::new(QEMU).expect("qemu backend");
        let t0 = Instant::now();
        let a = boot(&backend, &mgr, "vm-a", &guest.kernel, &initrd, dir.path()).await;
        let b = boot(&backend, &mgr, "vm-b", &guest.kernel, &initrd, dir.path()).await;
        assert_ne!(a.ip(), b.ip());
        assert_ne!(a.ifaces[0].mac, b.ifaces[0].mac);

        let boot_deadline = Duration::from_secs(180);
        wait_marker(&a.console, boot_deadline).await;
        // Node -> guest: the demo page over the guest's allocated address.
        let page = get_until(a.ip(), "/", "hostname: vm-a", Duration::from_secs(60)).await;
        println!(
            "node reached vm-a at {} {:?} after start: {}",
            a.ip(),
            t0.elapsed(),
            page.lines().last().unwrap_or_default()
        );
        wait_marker(&b.console, boot_deadline).await;
        get_until(b.ip(), "/", "hostname: vm-b", Duration::from_secs(60)).await;

        // Guest -> node: ICMP to the gateway and TCP to a server on the node.
        let ping = get_until(
            a.ip(),
            &format!("/cgi-bin/ping?{gateway}"),
            &format!("ping {gateway}"),
            Duration::from_secs(60),
        )
        .await;
        assert!(ping.contains(&format!("ping {gateway} ok")), "{ping}");
        let fetched = get_until(
            a.ip(),
            &format!("/cgi-bin/fetch?{gateway}:{NODE_PORT}"),
            NODE_GREETING,
            Duration::from_secs(60),
        )
        .await;
        assert!(fetched.contains(NODE_GREETING), "{fetched}");

        // Guest <-> guest, both ways, across the bridge.
        let ab = get_until(
            a.ip(),
            &format!("/cgi-bin/fetch?{}", b.ip()),
            "hostname: vm-b",
            Duration::from_secs(60),
        )
        .await;
        assert!(ab.contains("ignis demo guest"), "{ab}");
        get_until(
            b.ip(),
            &format!("/cgi-bin/fetch?{}", a.ip()),
            "hostname: vm-a",
            Duration::from_secs(60),
        )
        .await;
        // Outbound NAT: a guest reaches a host outside the range, which sees the node's
        // uplink address, not the guest's.
        let outside = Outside::new();
        let seen = get_until(
            a.ip(),
            &format!("/cgi-bin/fetch?{OUTSIDE_IP}:{OUTSIDE_PORT}"),
            "seen from",
            Duration::from_secs(60),
        )
        .await;
        assert!(seen.contains(&format!("seen from {UPLINK_IP}")), "{seen}");
        drop(outside);

        println!(
            "vm-a <-> vm-b, guests -> node and outbound NAT verified {:?} after start",
            t0.elapsed()
        );

        for (uid, mut g) in [("vm-a", a), ("vm-b", b)] {
            backend.kill(&g.spawned.handle).await.expect("kill");
            let _ = tokio::time::timeout(Duration::from_secs(10), g.spawned.child.wait()).await;
            mgr.detach(&VmUid::new(uid).expect("uid"))
                .await
                .expect("detach");
        }
        server.abort();
        assert!(taps().is_empty(), "taps left: {:?}", taps());
    });
}
