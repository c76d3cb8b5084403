//! The metadata channel and a claim, end to end: the library agent (real QEMU under TCG) in a
//! network namespace the test creates, driven over gRPC the way the controller drives it. A
//! demo guest with a `nat` interface reads its hostname from `169.254.169.254`; then a claim
//! (the same uid and spec hash, another MicroVM as owner, new hostname and labels) renames the
//! VM, and the running guest shows the new hostname and labels on `/cgi-bin/state` within
//! seconds, with the same VMM process (no boot). Applies and deletes from the warm VM are
//! ignored after the claim; the claimant's delete removes it. Witnesses: the guest's own page.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use ignis::agent::{AcceleratorFlag, AgentConfig, NetworkSetup, serve};
use ignis::proto;
use tokio_util::sync::CancellationToken;

const BOOT: Duration = Duration::from_secs(150);
const TEST: &str = "a_claim_reaches_the_running_guest_over_the_metadata_channel_with_no_boot";

fn config(state_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::local(state_dir);
    config.accelerator = AcceleratorFlag::Tcg;
    config.boot_timeout = BOOT;
    common::allow_test_guests(&mut config);
    config.network_setup = NetworkSetup::AtStart;
    config
}

/// The guest's `/cgi-bin/state` once it shows every line of `want`, or a panic after `within`.
async fn state_showing(ip: Ipv4Addr, want: &[&str], within: Duration) -> (String, Duration) {
    let began = Instant::now();
    let mut last = String::new();
    while began.elapsed() < within {
        if let Some(page) = common::net::http_get(ip, 80, "/cgi-bin/state").await {
            if want.iter().all(|w| page.lines().any(|l| l.trim() == *w)) {
                return (page, began.elapsed());
            }
            last = page;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the guest never showed {want:?} within {within:?}; last page:\n{last}");
}

fn metadata(hostname: &str, labels: &[(&str, &str)]) -> proto::GuestMetadata {
    proto::GuestMetadata {
        hostname: hostname.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        user_data: String::new(),
        has_user_data: false,
    }
}

#[test]
fn a_claim_reaches_the_running_guest_over_the_metadata_channel_with_no_boot() {
    if !common::qemu_present() {
        return;
    }
    if !common::net::in_fresh_netns(TEST, Duration::from_secs(600)) {
        return;
    }
    let guest = common::demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    common::net::runtime().block_on(async {
        let shutdown = CancellationToken::new();
        let agent = serve(config(tmp.path()), shutdown.clone())
            .await
            .expect("serve");
        let socket = agent.socket_path().expect("unix").to_path_buf();
        let mut client = common::connect(&socket, Duration::from_secs(5)).await;

        // The pool's warm VM: its own name and metadata.
        let spec = proto::VmSpec {
            interfaces: vec![proto::NetworkInterface {
                name: "eth0".into(),
                mode: proto::InterfaceMode::Nat as i32,
                ..Default::default()
            }],
            readiness_console_marker: String::new(),
            readiness_tcp_port: 80,
            ..common::demo_spec("warm", &guest)
        };
        let warm = proto::ApplyVmRequest {
            metadata: Some(metadata("warm-0", &[("ignis-pool", "p")])),
            ..common::apply_request(spec.clone())
        };
        client.apply_vm(warm.clone()).await.expect("apply warm");
        let vm = common::wait_vm(&mut client, "warm", BOOT, |vm| {
            vm.ready || vm.state() == proto::VmState::Failed
        })
        .await;
        assert!(vm.ready, "{vm:?}");
        let ip: Ipv4Addr = vm.ip_addresses[0].parse().expect("ip");
        state_showing(ip, &["hostname=warm-0", "label.ignis-pool=p"], BOOT).await;

        // The node itself is no guest: the channel tells it nothing (the namespace's `lo`
        // carries the node's own connections to its addresses).
        let lo = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .expect("ip");
        assert!(lo.success());
        let node = common::net::http_get(Ipv4Addr::new(10, 88, 0, 1), 8775, "/ignis/v1/hostname")
            .await
            .expect("the node listener answers");
        assert!(node.starts_with("HTTP/1.0 403"), "{node}");

        // The claim: W's uid and hash, C's name, owner and metadata.
        let claim = proto::ApplyVmRequest {
            spec: Some(proto::VmSpec {
                name: "claimant".into(),
                ..spec.clone()
            }),
            metadata: Some(metadata("web-7", &[("app", "web"), ("tier", "front")])),
            owner_uid: "claimant-uid".into(),
            ..common::apply_request(spec.clone())
        };
        let claimed = client.apply_vm(claim).await.expect("claim").into_inner();
        assert_eq!(
            (
                claimed.name.as_str(),
                claimed.owner_uid.as_str(),
                claimed.pid
            ),
            ("claimant", "claimant-uid", vm.pid),
            "renamed, owned, not booted"
        );
        let (page, took) = state_showing(
            ip,
            &["hostname=web-7", "label.app=web", "label.tier=front"],
            Duration::from_secs(20),
        )
        .await;
        assert!(!page.contains("label.ignis-pool"), "{page}");
        println!("MEASURE claim apply -> guest shows the new hostname and labels: {took:?}");

        // The warm VM's own stale apply and delete change nothing.
        let stale = client.apply_vm(warm).await.expect("stale").into_inner();
        assert_eq!((stale.name.as_str(), stale.pid), ("claimant", vm.pid));
        let gone = client
            .delete_vm(proto::DeleteVmRequest {
                uid: "warm".into(),
                grace_period_seconds: 0,
                owner_uid: String::new(),
            })
            .await
            .expect("delete from W")
            .into_inner();
        assert!(!gone.existed);
        state_showing(ip, &["hostname=web-7"], Duration::from_secs(10)).await;
        let held = common::wait_vm(&mut client, "warm", BOOT, |vm| vm.ready).await;
        assert_eq!(held.pid, vm.pid, "the same VMM throughout");

        let gone = client
            .delete_vm(proto::DeleteVmRequest {
                uid: "warm".into(),
                grace_period_seconds: 0,
                owner_uid: "claimant-uid".into(),
            })
            .await
            .expect("delete from C")
            .into_inner();
        assert!(gone.existed);
        assert!(common::net::taps().is_empty(), "{:?}", common::net::taps());

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), agent.wait())
            .await
            .expect("the agent stops in time")
            .expect("the agent stops cleanly");
    });
}
