//! A guest from a registry, booted by the agent, with real parts, in a network namespace the
//! test creates: the debootstrap test guest (`scripts/build-test-guest.sh`) pushed with skopeo
//! to Debian's docker-registry on loopback; `ApplyVM` naming its kernel, initrd and rootfs
//! images, a `nat` interface, user data and TCP readiness. The agent pulls the images into
//! the node cache, makes the VM a qcow2 overlay and a NoCloud drive, serves DHCP on the
//! bridge with dnsmasq, and boots QEMU `microvm` under TCG.
//!
//! The guest takes its address by DHCP (its command line says `ip=dhcp`, so the agent adds no
//! `ip=` of its own), answers HTTP from the node on that address, and shows that its user data
//! ran. A second VM of the same images measures a cached pull. Deleting the VMs leaves no
//! disk, drive, tap, DHCP entry or lease; stopping the agent stops dnsmasq. Prints pull times
//! (cold and cached), boot time and disk use. One TCG boot: it is slow.
//!
//! (The kernel's `ip=` parameter, the other way guests configure themselves, is what the demo
//! guest uses in `tests/agent_network.rs` and `tests/net_guest.rs`.)

mod common;
mod image_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{allow_test_guests, apply_request, serve_with_client, wait_vm};
use ignis::agent::{AcceleratorFlag, AgentConfig};
use ignis::proto;
use image_support::Registry;

const TIMEOUT: Duration = Duration::from_secs(900);
const PULL: Duration = Duration::from_secs(300);
const BOOT: Duration = Duration::from_secs(120);
const USER_DATA: &str =
    "#!/bin/sh\necho \"user-data ran on $(hostname)\" > /srv/www/user-data.txt\n";

/// Build (or find in the cache) the test guest's OCI layout.
fn guest_layout() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-test-guest.sh");
    let out = Command::new(&script)
        .arg("build")
        .stderr(Stdio::inherit())
        .output()
        .expect("run build-test-guest.sh");
    assert!(
        out.status.success(),
        "scripts/build-test-guest.sh build failed (run scripts/setup-images.sh first)"
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("layout path")
            .trim(),
    )
}

/// A plain HTTP GET from the node (bounded).
fn http_get(ip: Ipv4Addr, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&(ip, 80).into(), Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(text) if text.starts_with("HTTP/1.") => {
                return text
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_string())
                    .unwrap_or_default();
            }
            other => assert!(
                Instant::now() < deadline,
                "no HTTP answer from {ip}{path}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn spec(uid: &str, registry: &str, mode: proto::InterfaceMode) -> proto::VmSpec {
    let image = |tag: &str| format!("{registry}/ignis-test/{tag}:latest");
    proto::VmSpec {
        uid: uid.into(),
        namespace: "default".into(),
        name: format!("vm-{uid}"),
        hypervisor: proto::Hypervisor::Qemu as i32,
        accelerator: proto::Accelerator::Tcg as i32,
        vcpus: 1,
        memory_bytes: 256 << 20,
        kernel_image: image("kernel"),
        kernel_cmdline: "console=ttyS0 panic=-1 quiet ip=dhcp".into(),
        initrd_image: image("initrd"),
        rootfs_image: image("rootfs"),
        interfaces: vec![proto::NetworkInterface {
            name: "eth0".into(),
            mode: mode as i32,
            ..Default::default()
        }],
        user_data: USER_DATA.into(),
        readiness_tcp_port: if mode == proto::InterfaceMode::Nat {
            80
        } else {
            0
        },
        readiness_console_marker: "ignis: ready".into(),
        termination_grace_period_seconds: 2,
        ..Default::default()
    }
}

/// dnsmasq processes in this test's network namespace.
fn dnsmasq_here() -> Vec<u32> {
    let mine = std::fs::read_link("/proc/self/ns/net").expect("netns");
    std::fs::read_dir("/proc")
        .expect("proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "dnsmasq")
                && std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|n| n == mine)
        })
        .collect()
}

fn kib_allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.blocks() / 2).unwrap_or(0)
}

/// How long from now until the VM's pull is over (it leaves `pulling`).
async fn pulled_within(
    client: &mut proto::agent_client::AgentClient<tonic::transport::Channel>,
    uid: &str,
    started: Instant,
) -> (Duration, proto::Vm) {
    let vm = wait_vm(client, uid, PULL, |vm| {
        vm.pulling.is_none() || vm.state() == proto::VmState::Failed
    })
    .await;
    assert_ne!(vm.state(), proto::VmState::Failed, "{vm:?}");
    (started.elapsed(), vm)
}

#[test]
fn debootstrap_guest_from_a_registry_boots_through_the_agent_by_dhcp() {
    const NAME: &str = "debootstrap_guest_from_a_registry_boots_through_the_agent_by_dhcp";
    // debootstrap needs the Debian mirror: build outside the namespace (cached by content).
    if std::env::var_os("IGNIS_NET_TEST_CHILD").is_none() && nix::unistd::Uid::effective().is_root()
    {
        guest_layout();
    }
    if !common::net::in_fresh_netns(NAME, TIMEOUT) {
        return;
    }
    image_support::require(&[
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("dnsmasq", "dnsmasq-base"),
        ("genisoimage", "genisoimage"),
        ("qemu-img", "qemu-utils"),
    ]);
    let layout = guest_layout();
    assert!(
        Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip")
            .success()
    );
    let reg = Registry::start(false);
    for tag in ["kernel", "initrd", "rootfs"] {
        reg.push(&layout, tag, &format!("ignis-test/{tag}:latest"));
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path();

    common::net::runtime().block_on(async {
        let mut config = AgentConfig::local(state);
        config.accelerator = AcceleratorFlag::Tcg;
        config.boot_timeout = BOOT;
        allow_test_guests(&mut config);
        let (agent, mut client, shutdown) = serve_with_client(config).await;

        let uid = "guest-1";
        let started = Instant::now();
        client
            .apply_vm(apply_request(spec(uid, &reg.addr, proto::InterfaceMode::Nat)))
            .await
            .expect("apply");
        let (cold, pulled) = pulled_within(&mut client, uid, started).await;
        assert_eq!(pulled.images.len(), 3, "{pulled:?}");
        let vm = wait_vm(&mut client, uid, BOOT, |vm| {
            vm.ready || vm.state() == proto::VmState::Failed
        })
        .await;
        let vm_dir = state.join("vms").join(uid);
        let console = std::fs::read_to_string(vm_dir.join("console.log")).unwrap_or_default();
        assert!(vm.ready, "{vm:?}\nconsole:\n{console}");
        let ip: Ipv4Addr = vm.ip_addresses[0].parse().expect("ip");
        assert!(
            console.contains(&format!("network: dhcp {ip}/16")),
            "the guest took its IPAM address by DHCP:\n{console}"
        );
        assert!(console.contains(&format!("nocloud: instance {uid} hostname vm-{uid}")), "{console}");
        assert_eq!(http_get(ip, "/"), format!("hello from vm-{uid}\n"));
        assert_eq!(
            http_get(ip, "/user-data.txt"),
            format!("user-data ran on vm-{uid}\n")
        );
        let boot_ms = vm.ready_at_unix_ms - vm.started_at_unix_ms;

        // The VM's own disk is an overlay over the cached one.
        let overlay = vm_dir.join("rootfs.qcow2");
        let cached = state.join("images/entries/rootfs");
        let cached_disk = std::fs::read_dir(&cached)
            .expect("rootfs entries")
            .flatten()
            .map(|e| e.path().join("disk.raw"))
            .find(|p| p.exists())
            .expect("cached rootfs disk");
        assert!(overlay.exists() && vm_dir.join("cidata.iso").exists());
        let (overlay_kib, cached_kib) = (kib_allocated(&overlay), kib_allocated(&cached_disk));
        assert!(overlay_kib < cached_kib / 10, "{overlay_kib} vs {cached_kib} KiB");

        // The same images for a second VM: from the cache (tags resolved by the registry).
        let started = Instant::now();
        client
            .apply_vm(apply_request(spec("guest-2", &reg.addr, proto::InterfaceMode::None)))
            .await
            .expect("apply 2");
        let (cached_pull, second) = pulled_within(&mut client, "guest-2", started).await;
        let digests = |vm: &proto::Vm| {
            let mut d: Vec<String> = vm.images.iter().map(|i| i.digest.clone()).collect();
            d.sort();
            d
        };
        assert_eq!(digests(&second), digests(&pulled), "one cache entry per image");
        println!(
            "MEASURE pull through the agent (kernel + initrd + rootfs): cold {:.1} s, cached {} ms; \
             boot (VMM start -> ready, DHCP, TCG) {:.1} s; HTTP and user data checked; \
             disk: overlay {} KiB after boot vs a full copy {} MiB allocated ({} MiB apparent)",
            cold.as_secs_f64(),
            cached_pull.as_millis(),
            boot_ms as f64 / 1000.0,
            overlay_kib,
            cached_kib / 1024,
            std::fs::metadata(&cached_disk).map(|m| m.len() >> 20).unwrap_or(0),
        );

        let hosts_of = || -> String {
            std::fs::read_dir("/run/ignis")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| std::fs::read_to_string(e.path().join("hosts")).ok())
                .collect()
        };
        let tap_count = || {
            let out = Command::new("ip").args(["-o", "link", "show", "type", "tun"]).output().expect("ip");
            String::from_utf8_lossy(&out.stdout).lines().count()
        };
        assert!(hosts_of().contains(&ip.to_string()), "{}", hosts_of());
        for uid in ["guest-1", "guest-2"] {
            client
                .delete_vm(proto::DeleteVmRequest {
                    uid: uid.into(),
                    grace_period_seconds: 2,
                    ..Default::default()
                })
                .await
                .expect("delete");
            assert!(!state.join("vms").join(uid).exists(), "{uid} left files");
        }
        common::wait_pid_gone(vm.pid, Duration::from_secs(10)).await;
        assert!(!hosts_of().contains(&ip.to_string()), "DHCP entry left: {}", hosts_of());
        assert_eq!(tap_count(), 0, "taps left");
        let leases = image_support::tree(&state.join("images/leases"));
        assert!(leases.is_empty(), "leases left: {leases:?}");
        // Networking set up on first use goes with the last VM that held a tap (#22).
        assert!(
            dnsmasq_here().is_empty(),
            "dnsmasq outlived the last networked VM"
        );
        shutdown.cancel();
        agent.wait().await.expect("agent stops");
        assert!(dnsmasq_here().is_empty(), "dnsmasq outlived the agent");
    });
}
