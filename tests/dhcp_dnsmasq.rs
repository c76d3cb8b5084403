//! DHCP on the NAT bridge with the real parts: Debian's dnsmasq supervised by
//! `ignis::agent::net::dhcp::DhcpServer` on a bridge in a network namespace the test creates,
//! and busybox `udhcpc` as the guest, in a second namespace joined to the bridge by a veth pair.
//! Covers: the IPAM address, gateway, DNS and host name by MAC; unknown MACs get nothing;
//! dnsmasq restarted when it dies; a dnsmasq left by a killed agent is stopped, never doubled;
//! nothing left after shutdown.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::net::*;
use ignis::ErrorReason;
use ignis::agent::net::dhcp::{DhcpConfig, DhcpHost, DhcpServer};
use ignis::agent::net::mac::Mac;

const TIMEOUT: Duration = Duration::from_secs(180);
const GUEST_MAC: &str = "52:54:00:12:34:56";
const AGENT_ENV: &str = "IGNIS_DHCP_TEST_AGENT";

fn sh(cmd: &str) {
    let st = Command::new("sh").args(["-c", cmd]).status().expect("sh");
    assert!(st.success(), "{cmd}");
}

fn tool_present(name: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

/// A bridge with the gateway address, and a "guest" namespace on it through a veth pair.
struct Lan {
    guest_ns: String,
}

impl Lan {
    fn new() -> Lan {
        let guest_ns = format!("ignis-dhcpc-{}", std::process::id());
        sh("ip link set lo up");
        sh(
            "ip link add ignis0 type bridge && ip addr add 10.88.0.1/16 dev ignis0 && ip link set ignis0 up",
        );
        sh(&format!("ip netns add {guest_ns}"));
        sh("ip link add vh0 type veth peer name vg0 && ip link set vh0 master ignis0 up");
        sh(&format!("ip link set vg0 netns {guest_ns}"));
        sh(&format!(
            "ip -n {guest_ns} link set lo up && ip -n {guest_ns} link set vg0 address {GUEST_MAC} && ip -n {guest_ns} link set vg0 up"
        ));
        Lan { guest_ns }
    }

    fn set_mac(&self, mac: &str) {
        sh(&format!(
            "ip -n {} link set vg0 address {mac}",
            self.guest_ns
        ));
    }

    /// One DHCP exchange with udhcpc; the options it was given, or `None` without a lease.
    fn dhcp(&self, scratch: &Path) -> Option<std::collections::BTreeMap<String, String>> {
        let script = scratch.join("udhcpc.sh");
        let out = scratch.join("lease.env");
        let _ = std::fs::remove_file(&out);
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = bound ] && env > {}\nexit 0\n",
                out.display()
            ),
        )
        .expect("script");
        sh(&format!("chmod +x {}", script.display()));
        let status = Command::new("timeout")
            .args([
                "30",
                "ip",
                "netns",
                "exec",
                &self.guest_ns,
                "busybox",
                "udhcpc",
            ])
            .args(["-i", "vg0", "-f", "-q", "-n", "-t", "4", "-T", "1", "-s"])
            .arg(&script)
            .output()
            .expect("udhcpc");
        if !status.status.success() {
            return None;
        }
        let text = std::fs::read_to_string(&out).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.guest_ns])
            .status();
    }
}

/// dnsmasq processes whose command line names `dir`.
fn dnsmasq_pids(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains("dnsmasq") && cmdline.contains(&needle)
        })
        .filter(|pid| ignis::agent::vmm::process::is_running(*pid))
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config(dir: &Path) -> DhcpConfig {
    DhcpConfig::new(
        "ignis0",
        "10.88.0.0/16".parse().expect("cidr"),
        Ipv4Addr::new(10, 88, 0, 1),
        dir.to_path_buf(),
    )
}

/// A 0755 scratch directory: dnsmasq drops root and must be able to re-read its hosts file.
fn scratch() -> (tempfile::TempDir, PathBuf) {
    let t = tempfile::tempdir().expect("tempdir");
    sh(&format!("chmod 755 {}", t.path().display()));
    let dir = t.path().join("dhcp");
    (t, dir)
}

fn prerequisites(test: &str) -> bool {
    for (tool, package) in [("dnsmasq", "dnsmasq-base"), ("busybox", "busybox-static")] {
        if !tool_present(tool) {
            panic!("{test}: `{tool}` is missing: run scripts/setup-images.sh (package {package})");
        }
    }
    true
}

#[test]
fn guests_get_their_ipam_address_gateway_and_dns_by_mac() {
    if !in_fresh_netns(
        "guests_get_their_ipam_address_gateway_and_dns_by_mac",
        TIMEOUT,
    ) {
        return;
    }
    prerequisites("dhcp");
    let lan = Lan::new();
    let (_t, dir) = scratch();
    let rt = runtime();
    let mac: Mac = GUEST_MAC.parse().expect("mac");
    rt.block_on(async {
        let server = DhcpServer::start(config(&dir))
            .await
            .expect("start dnsmasq");
        server
            .set_host(DhcpHost {
                mac,
                ip: Ipv4Addr::new(10, 88, 0, 5),
                hostname: Some("web-0".into()),
            })
            .expect("set host");
        let lease = lan.dhcp(&dir).expect("a lease for a known MAC");
        assert_eq!(lease["ip"], "10.88.0.5", "{lease:?}");
        assert_eq!(lease["subnet"], "255.255.0.0");
        assert_eq!(lease["router"], "10.88.0.1");
        assert_eq!(lease["dns"].trim(), "10.88.0.1");
        assert_eq!(lease["hostname"], "web-0");

        // Out-of-range addresses are refused before dnsmasq sees them.
        let e = server
            .set_host(DhcpHost {
                mac,
                ip: Ipv4Addr::new(10, 99, 0, 5),
                hostname: None,
            })
            .expect_err("out of range");
        assert_eq!(e.reason(), "DhcpAddressOutOfRange");

        // A MAC nobody registered gets nothing: the range is static.
        lan.set_mac("52:54:00:99:99:99");
        assert!(lan.dhcp(&dir).is_none(), "unknown MAC must get no lease");
        lan.set_mac(GUEST_MAC);

        // dnsmasq dies: the supervisor starts it again and it serves the same entries.
        let first = server.pid().expect("pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(first as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill dnsmasq");
        wait_for("dnsmasq to be restarted", Duration::from_secs(20), || {
            server.pid().is_some_and(|p| p != first)
        });
        assert_eq!(server.restarts(), 1);
        assert_eq!(dnsmasq_pids(&dir).len(), 1, "exactly one dnsmasq");
        let lease = lan.dhcp(&dir).expect("a lease after the restart");
        assert_eq!(lease["ip"], "10.88.0.5");

        // Removed: no more lease.
        server.remove_host(mac).expect("remove");
        assert!(server.hosts().is_empty());
        assert!(lan.dhcp(&dir).is_none(), "a removed MAC must get no lease");

        server.shutdown().await;
        assert_eq!(
            dnsmasq_pids(&dir),
            Vec::<u32>::new(),
            "dnsmasq left running"
        );
        assert!(!dir.exists(), "the state directory goes with dnsmasq");
    });
}

#[test]
fn a_dnsmasq_left_by_a_killed_agent_is_replaced_not_doubled() {
    const NAME: &str = "a_dnsmasq_left_by_a_killed_agent_is_replaced_not_doubled";
    if !in_fresh_netns(NAME, TIMEOUT) {
        return;
    }
    if let Ok(dir) = std::env::var(AGENT_ENV) {
        // The "agent": start the server and wait to be killed.
        runtime().block_on(async {
            let server = DhcpServer::start(config(Path::new(&dir)))
                .await
                .expect("agent: start");
            server
                .set_host(DhcpHost {
                    mac: GUEST_MAC.parse().expect("mac"),
                    ip: Ipv4Addr::new(10, 88, 0, 7),
                    hostname: None,
                })
                .expect("agent: set host");
            tokio::time::sleep(Duration::from_secs(120)).await;
        });
        return;
    }
    prerequisites("dhcp");
    let lan = Lan::new();
    let (_t, dir) = scratch();
    let mut agent = Command::new(std::env::current_exe().expect("exe"))
        .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env("IGNIS_NET_TEST_CHILD", NAME)
        .env(AGENT_ENV, &dir)
        .spawn()
        .expect("spawn agent");
    wait_for("the agent's dnsmasq", Duration::from_secs(30), || {
        dir.join("dnsmasq.owner").exists()
    });
    let leftover = dnsmasq_pids(&dir);
    assert_eq!(leftover.len(), 1);
    agent.kill().expect("SIGKILL the agent");
    let _ = agent.wait();
    assert_eq!(
        dnsmasq_pids(&dir),
        leftover,
        "dnsmasq outlives a killed agent"
    );

    runtime().block_on(async {
        let server = DhcpServer::start(config(&dir)).await.expect("restart");
        let now = dnsmasq_pids(&dir);
        assert_eq!(now.len(), 1, "one dnsmasq per bridge: {now:?}");
        assert_ne!(now, leftover, "the leftover was replaced");
        // The entries the killed agent wrote were kept.
        let lease = lan.dhcp(&dir).expect("lease from the kept entry");
        assert_eq!(lease["ip"], "10.88.0.7");
        server.shutdown().await;
    });
    assert_eq!(dnsmasq_pids(&dir), Vec::<u32>::new());
}
