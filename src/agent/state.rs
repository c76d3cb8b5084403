//! The agent's state directory: one directory per VM (`<root>/vms/<uid>/`) holding what it
//! takes to find the VM again after an agent restart — the spec it was asked for
//! (`spec.json`), its VMM process (`handle.json`), its last known status (`status.json`) —
//! next to the files the VMM itself uses (console log, VMM log, API socket).
//!
//! Every JSON file is written to a temporary name and renamed, so a crash never leaves a
//! half-written record behind.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::agent::vmm::VmmHandle;
use crate::proto;

/// Errors of the state store.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum StateError {
    #[error("VM uid {uid:?} cannot name a directory: use letters, digits, `-`, `_` or `.`")]
    InvalidUid { uid: String },
    #[error("state directory I/O on {path}")]
    #[strum(serialize = "StateIoError")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid")]
    #[strum(serialize = "StateCorrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// One network interface as asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceRecord {
    pub name: String,
    pub mode: String,
    pub bridge: String,
    pub address: String,
    pub mac: String,
}

/// The VM as the controller asked for it (`spec.json`): the `VMSpec` plus the apply's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub hypervisor: String,
    pub accelerator: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub kernel_path: String,
    pub kernel_cmdline: String,
    pub initrd_path: String,
    pub rootfs_path: String,
    pub rootfs_read_only: bool,
    pub interfaces: Vec<InterfaceRecord>,
    pub user_data: String,
    pub readiness_console_marker: String,
    pub readiness_tcp_port: u32,
    pub termination_grace_period_seconds: i64,
    pub spec_hash: String,
    pub run: u32,
    /// Whether the controller wants the VM running (`false` = stopped).
    pub want_running: bool,
}

impl SpecRecord {
    /// From an `ApplyVM` request whose spec is present.
    pub fn from_apply(spec: &proto::VmSpec, spec_hash: &str, run: u32, want_running: bool) -> Self {
        Self {
            uid: spec.uid.clone(),
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            hypervisor: spec.hypervisor.clone(),
            accelerator: spec.accelerator.clone(),
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            kernel_path: spec.kernel_path.clone(),
            kernel_cmdline: spec.kernel_cmdline.clone(),
            initrd_path: spec.initrd_path.clone(),
            rootfs_path: spec.rootfs_path.clone(),
            rootfs_read_only: spec.rootfs_read_only,
            interfaces: spec
                .interfaces
                .iter()
                .map(|i| InterfaceRecord {
                    name: i.name.clone(),
                    mode: i.mode.clone(),
                    bridge: i.bridge.clone(),
                    address: i.address.clone(),
                    mac: i.mac.clone(),
                })
                .collect(),
            user_data: spec.user_data.clone(),
            readiness_console_marker: spec.readiness_console_marker.clone(),
            readiness_tcp_port: spec.readiness_tcp_port,
            termination_grace_period_seconds: spec.termination_grace_period_seconds,
            spec_hash: spec_hash.to_owned(),
            run,
            want_running,
        }
    }
}

/// Where a VM is in its life (mirrors `VMState` of the API).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    #[default]
    Creating,
    Starting,
    Running,
    Stopping,
    Stopped,
    Exited,
    Failed,
}

impl Phase {
    /// The API's enum value.
    pub fn to_proto(self) -> proto::VmState {
        match self {
            Phase::Creating => proto::VmState::Creating,
            Phase::Starting => proto::VmState::Starting,
            Phase::Running => proto::VmState::Running,
            Phase::Stopping => proto::VmState::Stopping,
            Phase::Stopped => proto::VmState::Stopped,
            Phase::Exited => proto::VmState::Exited,
            Phase::Failed => proto::VmState::Failed,
        }
    }

    /// A fixed word for metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Creating => "creating",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Exited => "exited",
            Phase::Failed => "failed",
        }
    }

    /// The run is over: nothing of it runs any more.
    pub fn is_ended(self) -> bool {
        matches!(self, Phase::Stopped | Phase::Exited | Phase::Failed)
    }

    pub const ALL: [Phase; 7] = [
        Phase::Creating,
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Exited,
        Phase::Failed,
    ];
}

/// How a run ended (mirrors `ExitInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub success: bool,
    pub reason: String,
    pub message: String,
    pub permanent: bool,
    pub exit_code: i32,
    pub at_unix_ms: i64,
}

/// The VM's last known status (`status.json`; mirrors `VM` of the API).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub spec_hash: String,
    pub run: u32,
    pub phase: Phase,
    pub ready: bool,
    pub hypervisor: String,
    pub accelerator: String,
    pub ip_addresses: Vec<String>,
    pub created_at_unix_ms: i64,
    pub started_at_unix_ms: i64,
    pub ready_at_unix_ms: i64,
    /// When the `ApplyVM` that started this run arrived; the origin of `apply_to_ready_ms`.
    pub applied_at_unix_ms: i64,
    pub apply_to_ready_ms: u64,
    pub exit: Option<ExitRecord>,
    pub pid: u32,
    pub vcpus: u32,
    pub memory_bytes: u64,
}

impl StatusRecord {
    /// The API's view of this status.
    pub fn to_proto(&self) -> proto::Vm {
        proto::Vm {
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            spec_hash: self.spec_hash.clone(),
            run: self.run,
            state: self.phase.to_proto() as i32,
            ready: self.ready,
            hypervisor: self.hypervisor.clone(),
            accelerator: self.accelerator.clone(),
            ip_addresses: self.ip_addresses.clone(),
            created_at_unix_ms: self.created_at_unix_ms,
            started_at_unix_ms: self.started_at_unix_ms,
            ready_at_unix_ms: self.ready_at_unix_ms,
            apply_to_ready_ms: self.apply_to_ready_ms,
            exit: self.exit.as_ref().map(|e| proto::ExitInfo {
                success: e.success,
                reason: e.reason.clone(),
                message: e.message.clone(),
                permanent: e.permanent,
                exit_code: e.exit_code,
                at_unix_ms: e.at_unix_ms,
            }),
            pid: self.pid,
            vcpus: self.vcpus,
            memory_bytes: self.memory_bytes,
        }
    }
}

/// Whether `uid` can be used as a directory name as is (Kubernetes uids always can).
pub fn valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid != "."
        && uid != ".."
        && uid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

const SPEC: &str = "spec.json";
const HANDLE: &str = "handle.json";
const STATUS: &str = "status.json";

/// The state directory root (`<root>/vms/<uid>/...`).
#[derive(Clone, Debug)]
pub struct StateStore {
    root: PathBuf,
}

impl StateStore {
    /// Open (creating if needed) the store under `root`.
    pub fn open(root: &Path) -> Result<Self, StateError> {
        let vms = root.join("vms");
        std::fs::create_dir_all(&vms).map_err(|source| StateError::Io {
            path: vms.clone(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The VM's directory; the uid is checked so it can never escape the root.
    pub fn vm_dir(&self, uid: &str) -> Result<PathBuf, StateError> {
        if !valid_uid(uid) {
            return Err(StateError::InvalidUid {
                uid: uid.to_owned(),
            });
        }
        Ok(self.root.join("vms").join(uid))
    }

    /// Create the VM's directory.
    pub fn create_vm_dir(&self, uid: &str) -> Result<PathBuf, StateError> {
        let dir = self.vm_dir(uid)?;
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Every VM directory's uid.
    pub fn list(&self) -> Result<Vec<String>, StateError> {
        let vms = self.root.join("vms");
        let entries = std::fs::read_dir(&vms).map_err(|source| StateError::Io {
            path: vms.clone(),
            source,
        })?;
        let mut uids: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|uid| valid_uid(uid))
            .collect();
        uids.sort();
        Ok(uids)
    }

    pub fn write_spec(&self, spec: &SpecRecord) -> Result<(), StateError> {
        self.write_json(&spec.uid, SPEC, spec)
    }

    pub fn read_spec(&self, uid: &str) -> Result<Option<SpecRecord>, StateError> {
        self.read_json(uid, SPEC)
    }

    pub fn write_handle(&self, uid: &str, handle: &VmmHandle) -> Result<(), StateError> {
        self.write_json(uid, HANDLE, handle)
    }

    pub fn read_handle(&self, uid: &str) -> Result<Option<VmmHandle>, StateError> {
        self.read_json(uid, HANDLE)
    }

    pub fn write_status(&self, status: &StatusRecord) -> Result<(), StateError> {
        self.write_json(&status.uid, STATUS, status)
    }

    pub fn read_status(&self, uid: &str) -> Result<Option<StatusRecord>, StateError> {
        self.read_json(uid, STATUS)
    }

    /// Remove everything of the VM except `status.json`, so a failure stays reportable
    /// without leaving the run's files behind.
    pub fn remove_all_but_status(&self, uid: &str) -> Result<(), StateError> {
        let dir = self.vm_dir(uid)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Io { path: dir, source }),
        };
        for entry in entries.filter_map(Result::ok) {
            if entry.file_name() == STATUS {
                continue;
            }
            let path = entry.path();
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Io { path, source }),
            }
        }
        Ok(())
    }

    /// Remove the VM's directory; removing what is not there is fine.
    pub fn remove_vm(&self, uid: &str) -> Result<(), StateError> {
        let dir = self.vm_dir(uid)?;
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path: dir, source }),
        }
    }

    fn write_json<T: Serialize>(&self, uid: &str, file: &str, value: &T) -> Result<(), StateError> {
        // Never creates the directory: a late write after `DeleteVM` must not resurrect it.
        let dir = self.vm_dir(uid)?;
        let path = dir.join(file);
        // Serializing plain records into memory cannot fail.
        let bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
        super::atomic_file::write_atomically(&path, &bytes)
            .map_err(|source| StateError::Io { path, source })
    }

    fn read_json<T: DeserializeOwned>(
        &self,
        uid: &str,
        file: &str,
    ) -> Result<Option<T>, StateError> {
        let path = self.vm_dir(uid)?.join(file);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;

    #[test]
    fn uids_that_could_escape_the_root_are_refused() {
        assert!(valid_uid("4f1c2a3e-0000-4000-8000-000000000001"));
        for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_uid(bad), "{bad:?}");
        }
    }

    #[test]
    fn records_round_trip_and_failed_runs_keep_only_status() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(tmp.path()).expect("open");
        store.create_vm_dir("vm-1").expect("dir");
        let spec = SpecRecord {
            uid: "vm-1".into(),
            memory_bytes: 64 << 20,
            run: 2,
            ..Default::default()
        };
        store.write_spec(&spec).expect("spec");
        let status = StatusRecord {
            uid: "vm-1".into(),
            phase: Phase::Failed,
            ..Default::default()
        };
        store.write_status(&status).expect("status");
        std::fs::write(store.vm_dir("vm-1").expect("dir").join("console.log"), b"x").expect("log");
        assert_eq!(store.read_spec("vm-1").expect("read"), Some(spec));
        assert_eq!(store.list().expect("list"), vec!["vm-1".to_owned()]);

        store.remove_all_but_status("vm-1").expect("trim");
        let left: Vec<_> = std::fs::read_dir(store.vm_dir("vm-1").expect("dir"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("status.json")]);
        assert_eq!(
            store.read_status("vm-1").expect("read"),
            Some(status.clone())
        );

        store.remove_vm("vm-1").expect("rm");
        store.remove_vm("vm-1").expect("rm twice");
        assert!(
            store.write_status(&status).is_err(),
            "a deleted VM stays deleted"
        );
        assert!(store.list().expect("list").is_empty());
        assert_eq!(store.read_handle("vm-1").expect("none"), None);
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(tmp.path()).expect("open");
        let dir = store.create_vm_dir("vm-2").expect("dir");
        std::fs::write(dir.join("status.json"), b"{not json").expect("write");
        assert_eq!(
            store.read_status("vm-2").expect_err("corrupt").reason(),
            "StateCorrupt"
        );
    }
}
