//! Test-only builders: MicroVM objects and agent views in the states the tests need.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::api::{
    KernelSource, MicroVM, MicroVMSpec, MicroVMStatus, ReadinessProbe, Resources, RunPolicy,
};
use crate::vm::{Accelerator, ExitReason, Hypervisor, RunExit, RunState, VmStatus, VmUid};

/// A new MicroVM `name` in `default`, uid `uid-<name>`, generation 1, no status.
pub fn microvm(name: &str) -> MicroVM {
    let mut mvm = MicroVM::new(
        name,
        MicroVMSpec {
            run_policy: RunPolicy::Always,
            hypervisor: Default::default(),
            accelerator: Default::default(),
            resources: Resources {
                vcpus: 1,
                memory: "256Mi".to_string(),
            },
            kernel: KernelSource {
                path: Some("/var/lib/ignis/guest/vmlinuz".to_string()),
                image: None,
                cmdline: Some("console=ttyS0 panic=-1".to_string()),
            },
            initrd: None,
            rootfs: None,
            network: None,
            user_data: None,
            node_selector: None,
            readiness: Some(ReadinessProbe {
                console_marker: Some("ignis: ready".to_string()),
                tcp_port: None,
            }),
            termination_grace_period_seconds: 30,
        },
    );
    mvm.metadata = ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some("default".to_string()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        resource_version: Some("1".to_string()),
        ..Default::default()
    };
    mvm
}

/// `microvm` with the finalizer, placed on `node` (label and status), phase `phase`.
pub fn placed(name: &str, node: &str) -> MicroVM {
    let mut mvm = microvm(name);
    mvm.metadata.finalizers = Some(vec![crate::api::FINALIZER.to_string()]);
    mvm.metadata.labels = Some(
        [(crate::api::NODE_LABEL.to_string(), node.to_string())]
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
