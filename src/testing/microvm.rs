//! API fixtures: MicroVM objects in the states the tests need, the agent's view of their VMs,
//! and the paths and lists an API server serves.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

use crate::api::{
    API_VERSION, FINALIZER, GROUP, KIND, MicroVM, MicroVMStatus, MicroVmBuilder, NODE_LABEL,
    PLURAL, VERSION,
};
use crate::vm::{Accelerator, ExitReason, Hypervisor, RunExit, RunState, VmStatus, VmUid};

/// A stored MicroVM `name` in `default`, uid `uid-<name>`, generation 1, resourceVersion 1,
/// no status: 1 vCPU, 256Mi, the demo kernel with `console=ttyS0 panic=-1`, ready on
/// `ignis: ready`.
pub fn microvm(name: &str) -> MicroVM {
    MicroVmBuilder::new(name)
        .namespace("default")
        .stored(&format!("uid-{name}"), 1, "1")
        .cmdline("console=ttyS0 panic=-1")
        .console_marker("ignis: ready")
        .build()
}

/// `microvm` with the finalizer, placed on `node` (label and status), phase `phase`.
pub fn placed(name: &str, node: &str) -> MicroVM {
    let mut mvm = microvm(name);
    mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    mvm.metadata.labels = Some(
        [(NODE_LABEL.to_string(), node.to_string())]
            .into_iter()
            .collect(),
    );
    mvm.status = Some(MicroVMStatus {
        node_name: Some(node.to_string()),
        ..Default::default()
    });
    mvm
}

/// Mark the object deleted.
pub fn deleting(mut mvm: MicroVM) -> MicroVM {
    mvm.metadata.deletion_timestamp = Some(at(1));
    mvm
}

/// A fixed time, `secs` after the epoch.
pub fn at(secs: i64) -> Time {
    Time(jiff::Timestamp::from_second(secs).unwrap_or(jiff::Timestamp::UNIX_EPOCH))
}

/// The agent's view of `mvm`'s VM in `state`, run `run`.
pub fn agent_vm(mvm: &MicroVM, hash: &str, run: u32, state: RunState) -> VmStatus {
    let uid = mvm.metadata.uid.clone().unwrap_or_default();
    VmStatus {
        spec_hash: hash.to_string(),
        run,
        state,
        ready: state == RunState::Running,
        hypervisor: Some(Hypervisor::Qemu),
        accelerator: Some(Accelerator::Tcg),
        ip_addresses: vec!["10.88.0.5".to_string()],
        created_at_unix_ms: 1_000_000,
        started_at_unix_ms: 1_000_100,
        ready_at_unix_ms: 1_000_512,
        apply_to_ready_ms: 412,
        pid: 4242,
        vcpus: 1,
        memory_bytes: 256 << 20,
        ..VmStatus::new(
            VmUid::new(uid).unwrap_or_else(|e| panic!("fixture uid: {e}")),
            mvm.metadata.namespace.clone().unwrap_or_default(),
            mvm.metadata.name.clone().unwrap_or_default(),
        )
    }
}

/// An exit record.
pub fn exit(success: bool, reason: &str, permanent: bool, at_unix_ms: i64) -> RunExit {
    RunExit {
        success,
        reason: ExitReason::from_word(reason),
        message: format!("guest ended: {reason}"),
        permanent,
        exit_code: if success { 0 } else { 1 },
        at_unix_ms,
    }
}

/// The path of MicroVM `name` in `namespace` on an API server.
pub fn microvm_path(namespace: &str, name: &str) -> String {
    format!("/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{name}")
}

/// A `MicroVMList` of `items`, as an API server lists them.
pub fn microvm_list(items: Vec<Value>, resource_version: &str) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": format!("{KIND}List"),
        "metadata": {"resourceVersion": resource_version},
        "items": items,
    })
}
