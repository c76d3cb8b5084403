//! Guest networking through the agent, end to end: the library agent (`agent::serve`, real
//! QEMU under TCG) run inside a network namespace the test creates, driven over its gRPC
//! socket the way the controller drives it. A demo guest with one `nat` interface and
//! `readiness.tcpPort: 80` becomes Ready, reports an address of the node range, and answers
//! HTTP on it; an agent restart re-adopts it with the same address; a bridge that does not
//! exist fails the VM with `BridgeNotFound` and leaves nothing; DeleteVM removes the tap and
//! frees the address. Witnesses are independent of the code under test: `ip -j link` in the
//! namespace and the IPAM files of the state directory.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use ignis::agent::{AcceleratorFlag, AgentConfig, AgentHandle, NetworkSetup, serve};
use ignis::proto;
use ipnet::Ipv4Net;
use tokio_util::sync::CancellationToken;

const BOOT: Duration = Duration::from_secs(150);

fn config(state_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::local(state_dir);
    config.accelerator = AcceleratorFlag::Tcg;
    config.boot_timeout = BOOT;
    common::allow_test_guests(&mut config);
    config.network_setup = NetworkSetup::AtStart;
    config
}

async fn start(state_dir: &Path) -> (AgentHandle, CancellationToken) {
    let shutdown = CancellationToken::new();
    let agent = serve(config(state_dir), shutdown.clone())
        .await
        .expect("serve");
    (agent, shutdown)
}

async fn stop(agent: AgentHandle, shutdown: CancellationToken) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), agent.wait())
        .await
        .expect("the agent stops in time")
        .expect("the agent stops cleanly");
}

/// The demo guest with one `nat` interface, ready when port 80 accepts connections.
fn nat_spec(uid: &str, guest: &ignis::agent::guest::DemoGuest) -> proto::VmSpec {
    proto::VmSpec {
        interfaces: vec![proto::NetworkInterface {
            name: "eth0".into(),
            mode: proto::InterfaceMode::Nat as i32,
            ..Default::default()
        }],
        readiness_console_marker: String::new(),
        readiness_tcp_port: 80,
        ..common::demo_spec(uid, guest)
    }
}

/// The page of the guest's HTTP server, tried a few times (busybox httpd forks per request).
async fn page_of(ip: Ipv4Addr) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(body) = common::net::http_get(ip, 80, "/").await
            && body.contains("ignis demo guest")
        {
            return body;
        }
        assert!(Instant::now() < deadline, "http://{ip}/ never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The addresses allocated in the IPAM directory of the default range.
fn allocated(state_dir: &Path) -> Vec<String> {
    let dir = state_dir.join("net/ipam/10.88.0.0_16");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn the_ip(vm: &proto::Vm) -> Ipv4Addr {
    assert_eq!(vm.ip_addresses.len(), 1, "{vm:?}");
    vm.ip_addresses[0].parse().expect("an IPv4 address")
}

#[test]
fn nat_guest_gets_an_address_answers_survives_a_restart_and_leaves_nothing() {
    if !common::qemu_present() {
        return;
    }
    if !common::net::in_fresh_netns(
        "nat_guest_gets_an_address_answers_survives_a_restart_and_leaves_nothing",
        Duration::from_secs(900),
    ) {
        return;
    }
    let guest = common::demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let state = tmp.path();
    common::net::runtime().block_on(async {
        let range: Ipv4Net = "10.88.0.0/16".parse().expect("range");
        let (agent, shutdown) = start(state).await;
        let socket = agent.socket_path().expect("unix").to_path_buf();
        let mut client = common::connect(&socket, Duration::from_secs(5)).await;
        assert!(
            common::net::link("ignis0").is_some(),
            "the node bridge is set up at start"
        );

        // Baseline in the same run: the same guest without a network, ready by console marker.
        let plain = client
            .apply_vm(common::apply_request(common::demo_spec("plain", &guest)))
            .await
            .expect("apply plain")
            .into_inner();
        assert!(plain.ip_addresses.is_empty());
        let plain = common::wait_vm(&mut client, "plain", BOOT, |vm| vm.ready).await;
        client
            .delete_vm(proto::DeleteVmRequest {
                uid: "plain".into(),
                grace_period_seconds: 0,
                ..Default::default()
            })
            .await
            .expect("delete plain");

        let uid = "net-1";
        let applied = client
            .apply_vm(common::apply_request(nat_spec(uid, &guest)))
            .await
            .expect("apply")
            .into_inner();
        assert_eq!(
            applied.state(),
            proto::VmState::Starting,
            "{:?}",
            applied.exit
        );
        let ip = the_ip(&applied);
        assert!(range.contains(&ip) && ip != Ipv4Addr::new(10, 88, 0, 1), "{ip}");
        let vm = common::wait_vm(&mut client, uid, BOOT, |vm| {
            vm.ready || vm.state() == proto::VmState::Failed
        })
        .await;
        assert!(vm.ready, "{vm:?}");
        assert_eq!(the_ip(&vm), ip);
        println!(
            "MEASURE ApplyVM->Ready: nat + tcpPort readiness {} ms; no network + console marker {} ms",
            vm.apply_to_ready_ms, plain.apply_to_ready_ms
        );
        let page = page_of(ip).await;
        assert!(page.contains("kernel:"), "{page}");
        let taps = common::net::taps();
        assert_eq!(taps.len(), 1, "one tap for the VM: {taps:?}");
        let tap = common::net::link(&taps[0]).expect("tap");
        assert_eq!(tap["master"], "ignis0", "{tap}");
        assert_eq!(allocated(state), vec![ip.to_string()]);

        // Idempotent: the same apply changes nothing, the address stays.
        let again = client
            .apply_vm(common::apply_request(nat_spec(uid, &guest)))
            .await
            .expect("apply again")
            .into_inner();
        assert_eq!((again.pid, the_ip(&again)), (vm.pid, ip));

        // A bridge the admin did not allow (none are by default): FAILED, named, nothing left.
        let mut bad = nat_spec("net-bad", &guest);
        bad.readiness_tcp_port = 0;
        bad.readiness_console_marker = common::MARKER.into();
        bad.interfaces = vec![proto::NetworkInterface {
            name: "eth0".into(),
            mode: proto::InterfaceMode::Bridge as i32,
            bridge: "br-nope".into(),
            ..Default::default()
        }];
        let failed = client
            .apply_vm(common::apply_request(bad))
            .await
            .expect("apply bad")
            .into_inner();
        assert_eq!(failed.state(), proto::VmState::Failed);
        let exit = failed.exit.expect("exit");
        assert_eq!(exit.reason, "BridgeNotAllowed", "{exit:?}");
        assert!(exit.message.contains("br-nope"), "{}", exit.message);
        assert_eq!(failed.pid, 0);
        assert!(failed.ip_addresses.is_empty());
        assert_eq!(common::net::taps(), taps, "no tap for the failed VM");
        assert!(!state.join("net/vms/net-bad.json").exists());
        assert_eq!(allocated(state), vec![ip.to_string()]);
        client
            .delete_vm(proto::DeleteVmRequest {
                uid: "net-bad".into(),
                grace_period_seconds: 0,
                ..Default::default()
            })
            .await
            .expect("delete bad");

        // Agent restart: the VM is re-adopted, with its tap and its address.
        stop(agent, shutdown).await;
        let (agent, shutdown) = start(state).await;
        let mut client = common::connect(&socket, Duration::from_secs(5)).await;
        let adopted = client
            .get_vm(proto::GetVmRequest { uid: uid.into() })
            .await
            .expect("re-adopted")
            .into_inner();
        assert!(adopted.ready, "{adopted:?}");
        assert_eq!((adopted.pid, the_ip(&adopted)), (vm.pid, ip));
        assert_eq!(common::net::taps(), taps, "the tap survives the restart");
        assert_eq!(allocated(state), vec![ip.to_string()]);
        page_of(ip).await;

        // DeleteVM: the tap goes and the address is free.
        let deleted = client
            .delete_vm(proto::DeleteVmRequest {
                uid: uid.into(),
                grace_period_seconds: 1,
                ..Default::default()
            })
            .await
            .expect("delete")
            .into_inner();
        assert!(deleted.existed);
        assert!(
            common::net::taps().is_empty(),
            "{:?}",
            common::net::taps()
        );
        assert!(allocated(state).is_empty(), "{:?}", allocated(state));
        assert!(!state.join(format!("net/vms/{uid}.json")).exists());
        assert!(
            common::net::http_get(ip, 80, "/").await.is_none(),
            "nothing answers on the freed address"
        );
        stop(agent, shutdown).await;
    });
}
