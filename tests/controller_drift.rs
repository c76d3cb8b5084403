//! Drift repair runs: a VM on an agent that no MicroVM owns is removed after the grace period.
//! Housekeeping (drift repair and the gauges) starts only once the MicroVM cache has listed
//! everything; it once waited on the store's `wait_until_ready`, which wakes only the last of
//! its waiters (the controller's own runner waits on it too), so it could wait for ever.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::simulated::{self, SimulatedNode};
use ignis::controller::{self, ControllerConfig};
use ignis::proto;
use tokio_util::sync::CancellationToken;

const NODE: &str = "drift-node";
/// The controller's drift grace (30 s) plus housekeeping's 5 s tick, with room for a slow CI.
const REPAIRED_WITHIN: Duration = Duration::from_secs(90);

#[tokio::test]
async fn a_vm_no_microvm_owns_is_removed() {
    ignis::telemetry::init_tracing(ignis::telemetry::LogFormat::Pretty, "warn");
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();
    let node = SimulatedNode::start(dir.path(), NODE, &shutdown, |_| {}).await;
    let (api, agent, stop_agent, socket) = (node.api, node.agent, node.stop_agent, node.socket);

    // An orphan: applied straight to the agent, as a VM whose MicroVM was deleted while the
    // controller was away would be. The simulated VMM only checks the files are readable.
    let guest = ignis::agent::guest::DemoGuest {
        kernel: dir.path().join("vmlinuz"),
        initrd: dir.path().join("initrd.cpio"),
        kernel_version: String::new(),
    };
    for file in [&guest.kernel, &guest.initrd] {
        std::fs::write(file, b"a stand-in: the simulated VMM never reads it").expect("write");
    }
    let uid = "0b7e7f6e-0000-4000-8000-00000000d71f";
    let mut client = common::connect(&socket, Duration::from_secs(10)).await;
    let mut spec = common::demo_spec(uid, &guest);
    spec.hypervisor = proto::Hypervisor::Simulated as i32;
    client
        .apply_vm(common::apply_request(spec))
        .await
        .expect("ApplyVM");
    common::wait_vm(&mut client, uid, Duration::from_secs(30), |vm| {
        common::state_of(vm) == proto::VmState::Running
    })
    .await;

    let kube = kube::Client::try_from(api.client_config()).expect("kube client");
    let stop_controller = CancellationToken::new();
    let handle = controller::start(
        kube,
        ControllerConfig::with_unix_agents(BTreeMap::from([(NODE.to_string(), socket.clone())])),
        stop_controller.clone(),
    )
    .await
    .expect("start the controller");

    let started = Instant::now();
    loop {
        let listed = client
            .list_v_ms(proto::ListVMsRequest::default())
            .await
            .expect("ListVMs")
            .into_inner()
            .vms;
        if !listed.iter().any(|vm| vm.uid == uid) {
            break;
        }
        assert!(
            started.elapsed() < REPAIRED_WITHIN,
            "the orphan VM is still on the agent after {REPAIRED_WITHIN:?}: drift repair did not run"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "orphan removed {:?} after the controller started",
        started.elapsed()
    );

    simulated::stop_controller(handle, &stop_controller).await;
    simulated::stop_agent(agent, &stop_agent).await;
    shutdown.cancel();
}
