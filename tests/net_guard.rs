//! What a guest on the node bridge may send and reach (issue #19), against the real kernel:
//! two "guests" (a network namespace each, on a veth standing in for the VM's tap, under the
//! tap's name so the agent's per-tap rules apply to it) on the bridge of a NetworkManager, all
//! inside a network namespace this test creates. A guest reaches another with its own MAC and
//! address, not with a forged one, and does not reach the node unless an admin allows it.

mod common;

use std::net::TcpListener;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::net::*;
use ignis::agent::net::{
    AttachedInterface, Interface, InterfaceMode, NetworkConfig, NetworkManager,
};
use ignis::vm::VmUid;

const TIMEOUT: Duration = Duration::from_secs(120);
const PORT: u16 = 7000;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Guest namespaces (named, so global): deleted however the test ends.
struct Guests(Vec<String>);

impl Drop for Guests {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Put a "guest" in namespace `ns` on `iface`'s tap: the tap is replaced by a veth of the same
/// name on the same bridge, its peer `eth0` in `ns` with the interface's MAC and address.
fn plug(ns: &str, iface: &AttachedInterface) {
    let (addr, prefix) = iface.address.expect("nat address");
    ip(&["netns", "add", ns]);
    ip(&["link", "del", &iface.tap]);
    ip(&[
        "link", "add", &iface.tap, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ]);
    ip(&["link", "set", &iface.tap, "master", &iface.bridge, "up"]);
    ip(&["-n", ns, "link", "set", "eth0", "address", &iface.mac]);
    set_address(ns, &format!("{addr}/{prefix}"));
    ip(&["-n", ns, "link", "set", "eth0", "up"]);
    ip(&["-n", ns, "link", "set", "lo", "up"]);
}

fn set_address(ns: &str, cidr: &str) {
    ip(&["-n", ns, "addr", "flush", "dev", "eth0"]);
    ip(&["-n", ns, "addr", "add", cidr, "dev", "eth0"]);
    ip(&["-n", ns, "neigh", "flush", "all"]);
}

/// Whether a TCP connection from namespace `ns` to `addr:port` opens within 3 s.
fn connects(ns: &str, addr: &str, port: u16) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "timeout", "3", "bash", "-c"])
        .arg(format!("exec 3<>/dev/tcp/{addr}/{port}"))
        .status()
        .expect("bash")
        .success()
}

/// A TCP listener inside namespace `ns` (a thread that entered it) until the sender drops.
fn listen_in(ns: &str) -> mpsc::Sender<()> {
    let (stop, stopped) = mpsc::channel::<()>();
    let (ready, is_ready) = mpsc::channel::<()>();
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(path).expect("netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let _l = TcpListener::bind(("0.0.0.0", PORT)).expect("bind in guest");
        ready.send(()).expect("ready");
        let _ = stopped.recv();
    });
    is_ready
        .recv_timeout(Duration::from_secs(10))
        .expect("listener ready");
    stop
}

#[test]
fn guests_cannot_spoof_nor_reach_the_node_unless_allowed() {
    if !in_fresh_netns(
        "guests_cannot_spoof_nor_reach_the_node_unless_allowed",
        TIMEOUT,
    ) {
        return;
    }
    let state = tempfile::tempdir().expect("tempdir");
    let pid = std::process::id();
    let (ga, gb) = (format!("igg-a-{pid}"), format!("igg-b-{pid}"));
    let _guests = Guests(vec![ga.clone(), gb.clone()]);
    // The node's own service, on every address of the node.
    let _node = TcpListener::bind(("0.0.0.0", PORT)).expect("node listener");
    runtime().block_on(async {
        let mut config = NetworkConfig::new(state.path());
        config.dhcp = false;
        let mgr = NetworkManager::new(config.clone()).await.expect("manager");
        let nat = Interface {
            name: "eth0".into(),
            mode: InterfaceMode::Nat,
            ..Default::default()
        };
        let a = mgr
            .attach(
                &VmUid::new("vm-a").expect("uid"),
                std::slice::from_ref(&nat),
                None,
            )
            .await
            .expect("a")
            .remove(0);
        let b = mgr
            .attach(
                &VmUid::new("vm-b").expect("uid"),
                std::slice::from_ref(&nat),
                None,
            )
            .await
            .expect("b")
            .remove(0);
        plug(&ga, &a);
        plug(&gb, &b);
        let _b_listens = listen_in(&gb);
        let b_ip = b.address.expect("b ip").0.to_string();
        let gateway = config.gateway().to_string();

        assert!(connects(&ga, &b_ip, PORT), "a reaches b as itself");
        assert!(
            !connects(&ga, &gateway, PORT),
            "a must not reach the node's own services"
        );

        // Another address of the range (another VM's, or a free one): dropped at the bridge.
        set_address(&ga, "10.88.0.200/16");
        assert!(!connects(&ga, &b_ip, PORT), "a forged source address");
        let (a_ip, prefix) = a.address.expect("a ip");
        set_address(&ga, &format!("{a_ip}/{prefix}"));
        assert!(connects(&ga, &b_ip, PORT), "a as itself again");

        // A forged MAC: dropped too.
        ip(&[
            "-n",
            &ga,
            "link",
            "set",
            "eth0",
            "address",
            "02:00:00:00:00:99",
        ]);
        ip(&["-n", &gb, "neigh", "flush", "all"]);
        assert!(!connects(&ga, &b_ip, PORT), "a forged MAC");
        ip(&["-n", &ga, "link", "set", "eth0", "address", &a.mac]);
        ip(&["-n", &gb, "neigh", "flush", "all"]);

        // Detaching a VM drops its rules with it.
        mgr.detach(&VmUid::new("vm-b").expect("uid"))
            .await
            .expect("detach b");
        let rules = nft_rules();
        assert!(
            !rules.iter().any(|r| r.to_string().contains(&b.tap)),
            "b's rules are gone"
        );
        assert!(rules.iter().any(|r| r.to_string().contains(&a.tap)));

        // An admin allows node access: the same guest now reaches it.
        let mut open = config.clone();
        open.guest_access.node = true;
        let _mgr2 = NetworkManager::new(open).await.expect("manager, node open");
        assert!(
            connects(&ga, &gateway, PORT),
            "--allow-guest-node-access opens the node"
        );
    });
}
