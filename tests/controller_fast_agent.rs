//! The controller against an agent that answers faster than the API server: the simulated VMM
//! is ready a few milliseconds after ApplyVM, so the agent's `Running` event races the
//! controller's own ApplyVM answer and its first status write. Every MicroVM must still end
//! `Running` with `Ready=True`, in several rounds of quickly created objects.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::simulated::{self, SimulatedNode};
use ignis::api::{InterfaceMode, MicroVM};
use ignis::controller::{self, ControllerConfig};
use ignis::testing::MicroVmBuilder;
use kube::Api;
use kube::api::{ListParams, PostParams};
use tokio_util::sync::CancellationToken;

const NODE: &str = "fast-node";
const ROUNDS: usize = 4;
const PER_ROUND: usize = 30;
/// Far more than a simulated VM needs (milliseconds); only a lost update takes longer.
const CONVERGE_WITHIN: Duration = Duration::from_secs(20);

fn microvm(name: &str, kernel: &Path) -> MicroVM {
    MicroVmBuilder::new(name)
        .namespace("default")
        .memory("64Mi")
        .kernel(kernel)
        .interface("eth0", InterfaceMode::None)
        .build()
}

/// Running with Ready=True on our node.
fn converged(vm: &MicroVM) -> bool {
    let Some(status) = &vm.status else {
        return false;
    };
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    status.phase == Some(ignis::api::Phase::Running)
        && ready
        && status.node_name.as_deref() == Some(NODE)
}

#[tokio::test]
async fn every_microvm_reaches_running_although_the_agent_is_faster_than_the_api() {
    ignis::telemetry::init_tracing(ignis::telemetry::LogFormat::Pretty, "warn");
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();

    // Room for every round's VMs on this small host: the simulated VMM runs no guest.
    let node = SimulatedNode::start(dir.path(), NODE, &shutdown, |c| c.vcpu_overcommit = 64).await;
    let (api, agent, stop_agent, socket, kernel) = (
        node.api,
        node.agent,
        node.stop_agent,
        node.socket,
        node.kernel,
    );

    let client = kube::Client::try_from(api.client_config()).expect("kube client");
    let stop_controller = CancellationToken::new();
    let handle = controller::start(
        client.clone(),
        ControllerConfig::with_unix_agents(BTreeMap::from([(NODE.to_string(), socket.clone())])),
        stop_controller.clone(),
    )
    .await
    .expect("start the controller");
    let vms: Api<MicroVM> = Api::namespaced(client.clone(), "default");

    for round in 0..ROUNDS {
        let created = Instant::now();
        let names: Vec<String> = (0..PER_ROUND).map(|i| format!("r{round}-vm-{i}")).collect();
        for name in &names {
            vms.create(&PostParams::default(), &microvm(name, &kernel))
                .await
                .expect("create a MicroVM");
        }
        println!(
            "round {round}: created in {} ms",
            created.elapsed().as_millis()
        );
        let deadline = created + CONVERGE_WITHIN;
        loop {
            let list =
                tokio::time::timeout(Duration::from_secs(5), vms.list(&ListParams::default()))
                    .await
                    .expect("list in time")
                    .expect("list MicroVMs");
            let behind: Vec<&MicroVM> = list
                .items
                .iter()
                .filter(|vm| names.contains(&vm.metadata.name.clone().unwrap_or_default()))
                .filter(|vm| !converged(vm))
                .collect();
            if behind.is_empty() {
                println!(
                    "round {round}: {PER_ROUND} MicroVMs Running and Ready {} ms after the first create",
                    created.elapsed().as_millis()
                );
                break;
            }
            if Instant::now() >= deadline {
                let mut agent_client = common::connect(&socket, Duration::from_secs(5)).await;
                let on_agent = agent_client
                    .list_v_ms(ignis::proto::ListVMsRequest::default())
                    .await
                    .expect("ListVMs")
                    .into_inner()
                    .vms;
                let first = behind[0];
                let uid = first.metadata.uid.clone().unwrap_or_default();
                panic!(
                    "round {round}: {} of {PER_ROUND} MicroVMs not Running+Ready within {CONVERGE_WITHIN:?}; first: {}\nthe agent has it as: {:#?}\nthe controller's view: {:#?}",
                    behind.len(),
                    serde_json::to_string_pretty(first).unwrap_or_default(),
                    on_agent.iter().find(|v| v.uid == uid),
                    handle.pool.vm(NODE, &uid),
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    simulated::stop_controller(handle, &stop_controller).await;
    simulated::stop_agent(agent, &stop_agent).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), api.stopped()).await;
}
