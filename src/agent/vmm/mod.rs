//! VMM backends: one trait, one file per VMM, requests built from a backend-neutral
//! [`VmConfig`]. QEMU `microvm` runs for real here; Firecracker and Cloud Hypervisor follow
//! their official API specs (`../shared/specs/`).

pub(crate) mod exit;
pub mod jailer;
pub mod process;
pub mod qemu;
pub(crate) mod qemu_files;
pub(crate) mod qemu_snapshot;
pub(crate) mod qmp;

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::agent::image::DiskFormat;
use crate::api::{Accelerator, Hypervisor};
pub use exit::{ExitQuirks, GuestExit};

pub mod cloud_hypervisor;
pub mod firecracker;
pub mod http;

/// A disk attached to the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Stable id within the VM (`rootfs`, ...).
    pub id: String,
    pub path: PathBuf,
    /// How the file is laid out: QEMU opens a qcow2 overlay as one; Firecracker and Cloud
    /// Hypervisor get raw disks (the per-VM disk is made raw for them).
    #[serde(default)]
    pub format: DiskFormat,
    pub read_only: bool,
    /// Whether the guest boots from it.
    pub root: bool,
    /// The read-only file under a qcow2 overlay (the cached disk of an image), and its format:
    /// given to QEMU explicitly, so it never opens the path the overlay's header names.
    #[serde(default)]
    pub backing: Option<(PathBuf, DiskFormat)>,
}

/// A network interface backed by a tap on the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Guest-side name (`eth0`).
    pub id: String,
    /// Host tap device name.
    pub tap: String,
    pub mac: String,
}

/// One VM's memory snapshot on the node: a directory of its own, which only the agent and
/// the VM's VMM ids may enter. Each backend keeps its own files in it (QEMU one migration
/// stream; Firecracker a state file and a memory file; Cloud Hypervisor its snapshot
/// directory layout).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFiles {
    pub dir: PathBuf,
    /// The uid and gid the VMM runs as, who own the files (mode 0600); `None` when the VMM
    /// runs unconfined as the agent.
    #[serde(default)]
    pub owner: Option<(u32, u32)>,
}

/// Everything a backend needs to create a VM; the same for every VMM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmConfig {
    /// The MicroVM uid; unique on the node.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub kernel: PathBuf,
    pub cmdline: String,
    pub initrd: Option<PathBuf>,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// Handed to the guest through the VMM's metadata service where it has one.
    pub user_data: Option<String>,
    pub accelerator: Accelerator,
    /// The VM's state directory: sockets, logs, pid file live here.
    pub state_dir: PathBuf,
    /// Where the guest's serial console is written.
    pub console_log: PathBuf,
    /// The VMM's control socket (QMP, or the HTTP API).
    pub api_socket: PathBuf,
    /// The VMM binary to run.
    pub binary: PathBuf,
    /// Where the VMM runs: its uid and gid, cgroups and network namespace. `None` only for
    /// the unconfined baseline of `ignis bench boot --confinement off`.
    #[serde(default)]
    pub confinement: Option<process::Confinement>,
    /// Set when the VM resumes: `create` readies the VMM to load this snapshot (with
    /// [`VmmBackend::restore`]) instead of configuring a boot.
    #[serde(default)]
    pub restore: Option<SnapshotFiles>,
    /// The host files of the spec, already opened by the agent beneath an allowed directory;
    /// a backend hands these descriptors to the VMM instead of opening the paths again.
    #[serde(skip)]
    pub opened: OpenedFiles,
}

/// Files the agent opened for a VMM, by the path the [`VmConfig`] names them with.
#[derive(Clone, Debug, Default)]
pub struct OpenedFiles(std::sync::Arc<Vec<(PathBuf, std::os::fd::OwnedFd)>>);

impl OpenedFiles {
    pub fn new(files: Vec<(PathBuf, std::os::fd::OwnedFd)>) -> Self {
        OpenedFiles(std::sync::Arc::new(files))
    }

    /// The descriptor opened for `path`, if any.
    pub fn get(&self, path: &std::path::Path) -> Option<&std::os::fd::OwnedFd> {
        self.0.iter().find(|(p, _)| p == path).map(|(_, fd)| fd)
    }
}

/// Two configs are alike when they name the same opened paths (descriptors are not compared).
impl PartialEq for OpenedFiles {
    fn eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .map(|(p, _)| p)
            .eq(other.0.iter().map(|(p, _)| p))
    }
}

/// A running VMM process: what it takes to find it again after an agent restart.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmHandle {
    pub pid: u32,
    /// The process start time (field 22 of `/proc/<pid>/stat`), so a reused pid is never
    /// mistaken for our VMM after an agent restart.
    pub start_time_ticks: u64,
    pub api_socket: PathBuf,
    pub console_log: PathBuf,
}

/// A VMM process this agent just started: the handle to persist, and the child to reap.
#[derive(Debug)]
pub struct Spawned {
    pub handle: VmmHandle,
    pub child: tokio::process::Child,
}

/// What a backend can tell about a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmState {
    /// Created, guest not started.
    Created,
    Running,
    Paused,
    /// The VMM process is gone (or the guest shut down and the VMM exited).
    Exited,
}

/// A VMM backend. Every method has a deadline: a VMM that does not answer in time is an
/// error, never a hang.
#[async_trait]
pub trait VmmBackend: Send + Sync {
    /// Which VMM this is.
    fn kind(&self) -> Hypervisor;
    /// The accelerators this backend can use (`Tcg` only for QEMU).
    fn supports(&self, accelerator: Accelerator) -> bool;
    /// Start the VMM process and configure the VM, without booting the guest.
    async fn create(&self, config: &VmConfig) -> Result<Spawned, VmmError>;
    /// Boot the guest.
    async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError>;
    /// Ask the guest to shut down (ACPI power button / Ctrl-Alt-Del).
    async fn stop(&self, handle: &VmmHandle) -> Result<(), VmmError>;
    /// End the VMM process now.
    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError>;
    /// Ask the VMM what state its VM is in.
    async fn state(&self, handle: &VmmHandle) -> Result<VmmState, VmmError>;
    /// Pause the guest and save its memory and device state into `snapshot`. The VMM stays,
    /// paused, until it is killed.
    async fn snapshot(&self, handle: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        let _ = (handle, snapshot);
        Err(VmmError::SnapshotUnsupported {
            hypervisor: self.kind(),
        })
    }
    /// Load `snapshot` into a VMM created with [`VmConfig::restore`] naming it. The guest
    /// stays paused until [`VmmBackend::start`]. A snapshot the VMM cannot load is
    /// [`VmmError::SnapshotUnrestorable`].
    async fn restore(&self, handle: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        let _ = (handle, snapshot);
        Err(VmmError::SnapshotUnsupported {
            hypervisor: self.kind(),
        })
    }
    /// What sets this VMM apart when its process ends.
    fn exit_quirks(&self) -> &'static ExitQuirks;
    /// Explain why the VMM process ended. `status` is known only for a child of this agent
    /// (not for a VMM re-adopted after an agent restart); `console_tail` is the end of the
    /// guest's console log.
    fn classify_exit(
        &self,
        handle: &VmmHandle,
        status: Option<std::process::ExitStatus>,
        console_tail: &str,
    ) -> GuestExit {
        exit::classify(
            self.exit_quirks(),
            exit::ProcessEnd::from_status(status),
            console_tail,
            &process::log_tail(&process::log_path_of(handle)),
        )
    }
}

/// Default deadline for one VMM API call.
pub(crate) const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Deadline for saving or loading a snapshot: it moves the guest's whole memory through the
/// disk (about 1 s for 256 MiB under TCG here).
pub(crate) const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of every backend. `reason()` is the machine-matchable word used in status and metrics.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum VmmError {
    #[error("VMM binary {path} not found: install it or choose another hypervisor")]
    #[strum(serialize = "HypervisorUnavailable")]
    BinaryNotFound { path: PathBuf },
    #[error("cannot start the VMM process {binary}")]
    #[strum(serialize = "VmmSpawnFailed")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VMM API socket {path} did not appear within {timeout:?}")]
    #[strum(serialize = "VmmTimeout")]
    SocketTimeout { path: PathBuf, timeout: Duration },
    #[error("VMM API call {operation} did not answer within {timeout:?}")]
    #[strum(serialize = "VmmTimeout")]
    ApiTimeout {
        operation: String,
        timeout: Duration,
    },
    #[error("VMM API call {operation} failed with HTTP {status}: {fault}")]
    #[strum(serialize = "VmmApiError")]
    ApiFault {
        operation: String,
        status: u16,
        fault: String,
    },
    #[error("VMM API call {operation} failed: {detail}")]
    #[strum(serialize = "VmmApiError")]
    Protocol { operation: String, detail: String },
    #[error("VMM API I/O during {operation}")]
    #[strum(serialize = "VmmIoError")]
    Io {
        operation: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{hypervisor} cannot run with accelerator {accelerator}")]
    #[strum(serialize = "AcceleratorUnsupported")]
    UnsupportedAccelerator {
        hypervisor: Hypervisor,
        accelerator: Accelerator,
    },
    #[error("VMM process exited during {operation}: {detail}")]
    #[strum(serialize = "VmmCrashed")]
    Exited { operation: String, detail: String },
    #[error("{hypervisor} cannot run this VM: {detail}")]
    #[strum(serialize = "InvalidVmConfig")]
    InvalidConfig {
        hypervisor: Hypervisor,
        detail: String,
    },
    #[error("this agent cannot snapshot {hypervisor} VMs")]
    #[strum(serialize = "SnapshotUnsupported")]
    SnapshotUnsupported { hypervisor: Hypervisor },
    #[error("the snapshot cannot be restored: {detail}")]
    #[strum(serialize = "SnapshotUnrestorable")]
    SnapshotUnrestorable { detail: String },
}

impl VmmError {
    /// Whether retrying the same request can succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            VmmError::BinaryNotFound { .. }
                | VmmError::UnsupportedAccelerator { .. }
                | VmmError::ApiFault { .. }
                | VmmError::InvalidConfig { .. }
                | VmmError::SnapshotUnsupported { .. }
                | VmmError::SnapshotUnrestorable { .. }
        )
    }
}
