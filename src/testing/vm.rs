//! Domain fixtures: the agent's view of a VM as the tests need it.

use crate::vm::{ApplyRequest, DesiredState, GuestFile, PullSecrets, VmSpec, VmUid};

/// A spec for VM `uid`: one vCPU, 256 MiB, auto hypervisor and accelerator, kernel at `/k`,
/// no readiness, no network.
pub fn vm_spec(uid: &str) -> VmSpec {
    VmSpec {
        uid: VmUid::new(uid).unwrap_or_else(|e| panic!("fixture uid: {e}")),
        namespace: "default".into(),
        name: format!("vm-{uid}"),
        hypervisor: None,
        accelerator: None,
        vcpus: 1,
        memory_bytes: 256 << 20,
        kernel: GuestFile::Path("/k".into()),
        kernel_cmdline: String::new(),
        initrd: None,
        rootfs: None,
        rootfs_read_only: false,
        interfaces: Vec::new(),
        user_data: None,
        readiness_console_marker: None,
        readiness_tcp_port: None,
        termination_grace_period_seconds: 0,
    }
}

/// Run 1 of [`vm_spec`]`(uid)`, wanted running.
pub fn apply_request(uid: &str) -> ApplyRequest {
    let spec = vm_spec(uid);
    ApplyRequest {
        spec_hash: spec.boot_hash(),
        spec,
        run: 1,
        desired: DesiredState::Running,
        pull_secrets: PullSecrets::default(),
        pod: None,
        metadata: Default::default(),
        owner: None,
    }
}
