//! What an agent reports about a VM (its run state, how the run ended) and about its node.

use serde::{Deserialize, Serialize};

use super::{ExitReason, VmUid};
use crate::api::{Accelerator, Hypervisor, ImageKind};

/// Where a VM's current run is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunState {
    /// Accepted; files, taps and the VMM process are being prepared.
    #[default]
    Creating,
    /// The VMM runs; the guest has not passed readiness yet.
    Starting,
    Running,
    Stopping,
    /// Stopped on request.
    Stopped,
    /// The guest or its VMM ended on its own; see the exit.
    Exited,
    /// Could not be created or booted; see the exit.
    Failed,
    /// The guest's memory and device state are being saved to the node's disk.
    Suspending,
    /// Saved on the node's disk; no VMM runs until the VM is resumed.
    Suspended,
}

impl RunState {
    /// A fixed word for metric labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RunState::Creating => "creating",
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Stopping => "stopping",
            RunState::Stopped => "stopped",
            RunState::Exited => "exited",
            RunState::Failed => "failed",
            RunState::Suspending => "suspending",
            RunState::Suspended => "suspended",
        }
    }

    /// The run is over: nothing of it runs any more.
    pub(crate) fn is_ended(self) -> bool {
        matches!(
            self,
            RunState::Stopped | RunState::Exited | RunState::Failed
        )
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunExit {
    /// The guest shut itself down cleanly.
    pub(crate) success: bool,
    pub(crate) reason: ExitReason,
    /// For a person: what happened and what to do.
    pub(crate) message: String,
    /// The same request will fail the same way again: retrying is pointless.
    pub(crate) permanent: bool,
    pub(crate) exit_code: i32,
    pub(crate) at_unix_ms: i64,
}

/// An image a run boots from, resolved to its manifest digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PulledImage {
    pub(crate) kind: ImageKind,
    /// The reference as the spec gives it.
    pub(crate) reference: String,
    /// `sha256:...`: what every run of this spec boots, whatever the tag says later.
    pub(crate) digest: String,
}

/// A run still fetching its images (state `Creating`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pulling {
    /// The references not pulled yet.
    pub(crate) references: Vec<String>,
    /// Why the last attempt failed, while the pull is retried.
    #[serde(default)]
    pub(crate) failure: Option<PullFailure>,
}

/// A failed pull attempt that will be retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullFailure {
    /// The error's fixed word (`ImageNotFound`, `ImageUnauthorized`, `RegistryUnreachable`...).
    pub(crate) reason: String,
    /// With the registry's own message.
    pub(crate) message: String,
    /// Attempts so far.
    pub(crate) attempts: u32,
    /// When the next attempt starts.
    pub(crate) retry_at_unix_ms: i64,
}

/// A VM as its agent sees it (the agent keeps it as the VM's `status.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub(crate) uid: VmUid,
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) spec_hash: String,
    pub(crate) run: u32,
    #[serde(rename = "phase")]
    pub(crate) state: RunState,
    pub(crate) ready: bool,
    /// The VMM the run uses, once chosen.
    #[serde(default, deserialize_with = "super::spec::absent_if_auto")]
    pub(crate) hypervisor: Option<Hypervisor>,
    /// The accelerator the run uses, once chosen.
    #[serde(default, deserialize_with = "super::spec::absent_if_auto")]
    pub(crate) accelerator: Option<Accelerator>,
    #[serde(default)]
    pub(crate) ip_addresses: Vec<String>,
    /// The images of the spec as resolved; the same for every run of the spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) images: Vec<PulledImage>,
    /// Set while the run pulls its images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pulling: Option<Pulling>,
    #[serde(default)]
    pub(crate) created_at_unix_ms: i64,
    #[serde(default)]
    pub(crate) started_at_unix_ms: i64,
    #[serde(default)]
    pub(crate) ready_at_unix_ms: i64,
    /// When the `ApplyVM` that started this run arrived; the origin of `apply_to_ready_ms`.
    /// Known to the agent only.
    #[serde(default)]
    pub(crate) applied_at_unix_ms: i64,
    #[serde(default)]
    pub(crate) apply_to_ready_ms: u64,
    #[serde(default)]
    pub(crate) exit: Option<RunExit>,
    #[serde(default)]
    pub(crate) pid: u32,
    #[serde(default)]
    pub(crate) vcpus: u32,
    #[serde(default)]
    pub(crate) memory_bytes: u64,
    /// How many runs in a row, up to this one, missed their boot deadline. Known to the agent
    /// only: it makes the miss that reaches its bound permanent.
    #[serde(default)]
    pub(crate) boot_timeouts: u32,
    /// The size of the VM's snapshot on the node while it is suspended.
    #[serde(default)]
    pub(crate) snapshot_bytes: u64,
    /// The last suspend or resume that did not go as asked (kept until the next one that
    /// does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) snapshot_issue: Option<SnapshotIssue>,
    /// This run was restored from a snapshot, not booted.
    #[serde(default)]
    pub(crate) restored: bool,
    /// The MicroVM the VM answers to when it is not `uid` (a claimed warm VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) owner: Option<VmUid>,
}

/// A suspend that was refused or failed (the VM runs on), or a snapshot that could not be
/// restored (the VM booted cold).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotIssue {
    /// A fixed word: `SnapshotLimitReached`, `SnapshotFailed`, `SnapshotUnrestorable`.
    pub(crate) reason: String,
    pub(crate) message: String,
    pub(crate) at_unix_ms: i64,
}

impl VmStatus {
    /// A VM just asked for, before anything of its run exists.
    pub fn new(uid: VmUid, namespace: String, name: String) -> Self {
        VmStatus {
            uid,
            namespace,
            name,
            spec_hash: String::new(),
            run: 0,
            state: RunState::Creating,
            ready: false,
            hypervisor: None,
            accelerator: None,
            ip_addresses: Vec::new(),
            images: Vec::new(),
            pulling: None,
            created_at_unix_ms: 0,
            started_at_unix_ms: 0,
            ready_at_unix_ms: 0,
            applied_at_unix_ms: 0,
            apply_to_ready_ms: 0,
            exit: None,
            pid: 0,
            vcpus: 0,
            memory_bytes: 0,
            boot_timeouts: 0,
            snapshot_bytes: 0,
            snapshot_issue: None,
            restored: false,
            owner: None,
        }
    }
}

/// A node as its agent describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    pub(crate) node_name: String,
    pub(crate) vcpus_total: u32,
    pub(crate) memory_total_bytes: u64,
    /// Reserved by the VMs the agent holds (running or not yet deleted).
    pub(crate) vcpus_used: u32,
    pub(crate) memory_used_bytes: u64,
    /// The VMMs whose binaries are present.
    pub(crate) hypervisors: Vec<Hypervisor>,
    /// The VMMs the agent knows but cannot run, with why (the missing binary).
    pub(crate) unavailable_hypervisors: Vec<(Hypervisor, String)>,
    /// KVM when the bounded probe booted a guest under it, else TCG.
    pub(crate) accelerator: Accelerator,
    /// Why that accelerator, in words.
    pub(crate) accelerator_detail: String,
    pub(crate) agent_version: String,
    /// Changes on every agent start, so a client can tell a restart from a blip.
    pub(crate) instance_id: String,
}

/// A change an agent publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEvent {
    Changed(Box<VmStatus>),
    Deleted(VmUid),
}

/// A [`VmEvent`] with its place in the agent's sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequencedEvent {
    pub(crate) sequence: u64,
    pub(crate) event: VmEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_of_the_untyped_agent_still_read() {
        let old = r#"{"uid":"vm-1","namespace":"default","name":"web","spec_hash":"h","run":1,
            "phase":"Failed","ready":false,"hypervisor":"auto","accelerator":"tcg","ip_addresses":[],
            "created_at_unix_ms":1,"started_at_unix_ms":0,"ready_at_unix_ms":0,
            "applied_at_unix_ms":1,"apply_to_ready_ms":0,"exit":{"success":false,
            "reason":"KernelNotFound","message":"kernel /k not found","permanent":true,
            "exit_code":-1,"at_unix_ms":2},"pid":0,"vcpus":1,"memory_bytes":67108864}"#;
        let status: VmStatus = serde_json::from_str(old).expect("old status");
        assert_eq!(status.state, RunState::Failed);
        assert_eq!(status.hypervisor, None);
        assert_eq!(status.accelerator, Some(Accelerator::Tcg));
        let exit = status.exit.clone().expect("exit");
        assert_eq!(exit.reason, ExitReason::boot_failed("KernelNotFound"));
        let json = serde_json::to_string(&status).expect("json");
        assert_eq!(
            serde_json::from_str::<VmStatus>(&json).expect("back"),
            status
        );
    }
}
