//! The agent's state directory: one directory per VM (`<root>/vms/<uid>/`) holding what it
//! takes to find the VM again after an agent restart — the spec it was asked for
//! (`spec.json`, an [`ApplyRequest`]), its VMM process (`handle.json`), its last known status
//! (`status.json`, a [`VmStatus`]) —
//! next to the files the VMM itself uses (console log, VMM log, API socket).
//!
//! Every JSON file is written to a temporary name and renamed, so a crash never leaves a
//! half-written record behind.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::agent::confine::VmmIds;
use crate::agent::vmm::VmmHandle;
use crate::vm::{ApplyRequest, VmStatus, VmUid};

/// Errors of the state store.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum StateError {
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

const SPEC: &str = "spec.json";
const HANDLE: &str = "handle.json";
const STATUS: &str = "status.json";
const IDS: &str = "ids.json";
/// What the agent knows of a snapshot, in its directory.
const SNAPSHOT_RECORD: &str = "snapshot.json";
/// The status record's file name in a VM's directory.
pub(crate) const STATUS_FILE: &str = STATUS;

/// The state directory root (`<root>/vms/<uid>/...`).
#[derive(Clone, Debug)]
pub(crate) struct StateStore {
    root: PathBuf,
}

impl StateStore {
    /// Open (creating if needed) the store under `root`.
    pub(crate) fn open(root: &Path) -> Result<Self, StateError> {
        let vms = root.join("vms");
        std::fs::create_dir_all(&vms).map_err(|source| StateError::Io {
            path: vms.clone(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The VM's directory (a [`VmUid`] never escapes the root).
    pub(crate) fn vm_dir(&self, uid: &VmUid) -> PathBuf {
        self.root.join("vms").join(uid.as_str())
    }

    /// The VMM's API socket (every backend's), in the VM's directory.
    pub(crate) fn api_socket(&self, uid: &VmUid) -> PathBuf {
        self.vm_dir(uid).join("api.sock")
    }

    /// The guest console log, in the VM's directory.
    pub(crate) fn console_log(&self, uid: &VmUid) -> PathBuf {
        self.vm_dir(uid).join("console.log")
    }

    /// Create the VM's directory.
    pub(crate) fn create_vm_dir(&self, uid: &VmUid) -> Result<PathBuf, StateError> {
        let dir = self.vm_dir(uid);
        std::fs::create_dir_all(&dir).map_err(|source| StateError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(dir)
    }

    /// Every VM directory's uid (directories whose name is no uid are not ours).
    pub(crate) fn list(&self) -> Result<Vec<VmUid>, StateError> {
        let vms = self.root.join("vms");
        let entries = std::fs::read_dir(&vms).map_err(|source| StateError::Io {
            path: vms.clone(),
            source,
        })?;
        let mut uids: Vec<VmUid> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| VmUid::new(name).ok())
            .collect();
        uids.sort();
        Ok(uids)
    }

    pub(crate) fn write_spec(&self, request: &ApplyRequest) -> Result<(), StateError> {
        self.write_json(&request.spec.uid, SPEC, request)
    }

    pub(crate) fn read_spec(&self, uid: &VmUid) -> Result<Option<ApplyRequest>, StateError> {
        self.read_json(uid, SPEC)
    }

    pub(crate) fn write_handle(&self, uid: &VmUid, handle: &VmmHandle) -> Result<(), StateError> {
        self.write_json(uid, HANDLE, handle)
    }

    pub(crate) fn read_handle(&self, uid: &VmUid) -> Result<Option<VmmHandle>, StateError> {
        self.read_json(uid, HANDLE)
    }

    /// The uid and gid the VM's VMM runs as (see `agent::confine`).
    pub(crate) fn write_ids(&self, uid: &VmUid, ids: &VmmIds) -> Result<(), StateError> {
        self.write_json(uid, IDS, ids)
    }

    pub(crate) fn read_ids(&self, uid: &VmUid) -> Result<Option<VmmIds>, StateError> {
        self.read_json(uid, IDS)
    }

    pub(crate) fn write_status(&self, status: &VmStatus) -> Result<(), StateError> {
        self.write_json(&status.uid, STATUS, status)
    }

    pub(crate) fn read_status(&self, uid: &VmUid) -> Result<Option<VmStatus>, StateError> {
        self.read_json(uid, STATUS)
    }

    /// Remove everything in the VM's directory but the files named in `keep` (a failed run
    /// keeps `status.json`, so the failure stays reportable, and the VM's own disk).
    pub(crate) fn remove_all_except(&self, uid: &VmUid, keep: &[&str]) -> Result<(), StateError> {
        let dir = self.vm_dir(uid);
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateError::Io { path: dir, source }),
        };
        for entry in entries.filter_map(Result::ok) {
            if keep.iter().any(|k| entry.file_name() == *k) {
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

    /// Remove the VM's directory and its snapshot; removing what is not there is fine.
    pub(crate) fn remove_vm(&self, uid: &VmUid) -> Result<(), StateError> {
        self.remove_snapshot(uid)?;
        remove_tree(&self.vm_dir(uid))
    }

    /// Where the node's snapshots live: one directory per suspended VM, beside `vms/`, so
    /// they are counted (the node's limit) and seen gone (after a delete) in one place.
    pub(crate) fn snapshots_root(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// The VM's snapshot directory.
    pub(crate) fn snapshot_dir(&self, uid: &VmUid) -> PathBuf {
        self.snapshots_root().join(uid.as_str())
    }

    /// Make the VM's snapshot directory anew and empty, mode 0700, owned by `owner` (the
    /// VMM's ids): no other VM's VMM may enter it.
    pub(crate) fn create_snapshot_dir(
        &self,
        uid: &VmUid,
        owner: Option<(u32, u32)>,
    ) -> Result<PathBuf, StateError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let root = self.snapshots_root();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        // Every VMM must pass through the root to reach its own directory, and list none.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711))
            .map_err(io(&root))?;
        let dir = self.snapshot_dir(uid);
        remove_tree(&dir)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(io(&dir))?;
        }
        Ok(dir)
    }

    /// Remove the VM's snapshot, if it has one.
    pub(crate) fn remove_snapshot(&self, uid: &VmUid) -> Result<(), StateError> {
        remove_tree(&self.snapshot_dir(uid))
    }

    /// The uids with a snapshot directory on the node.
    pub(crate) fn snapshots(&self) -> Vec<VmUid> {
        std::fs::read_dir(self.snapshots_root())
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| VmUid::new(name).ok())
            .collect()
    }

    /// The bytes of the VM's snapshot files.
    pub(crate) fn snapshot_bytes(&self, uid: &VmUid) -> u64 {
        std::fs::read_dir(self.snapshot_dir(uid))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }

    pub(crate) fn write_snapshot_record(
        &self,
        uid: &VmUid,
        record: &crate::agent::supervisor::SnapshotRecord,
    ) -> Result<(), StateError> {
        let path = self.snapshot_dir(uid).join(SNAPSHOT_RECORD);
        let bytes = serde_json::to_vec_pretty(record).unwrap_or_default();
        super::atomic_file::write_atomically(&path, &bytes)
            .map_err(|source| StateError::Io { path, source })
    }

    /// The record of the VM's snapshot; `None` when there is none or it cannot be read (a
    /// snapshot without a trustworthy record is not restored).
    pub(crate) fn read_snapshot_record(
        &self,
        uid: &VmUid,
    ) -> Option<crate::agent::supervisor::SnapshotRecord> {
        let bytes = std::fs::read(self.snapshot_dir(uid).join(SNAPSHOT_RECORD)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write_json<T: Serialize>(
        &self,
        uid: &VmUid,
        file: &str,
        value: &T,
    ) -> Result<(), StateError> {
        // Never creates the directory: a late write after `DeleteVM` must not resurrect it.
        let dir = self.vm_dir(uid);
        let path = dir.join(file);
        // Serializing plain records into memory cannot fail.
        let bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
        super::atomic_file::write_atomically(&path, &bytes)
            .map_err(|source| StateError::Io { path, source })
    }

    fn read_json<T: DeserializeOwned>(
        &self,
        uid: &VmUid,
        file: &str,
    ) -> Result<Option<T>, StateError> {
        let path = self.vm_dir(uid).join(file);
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

/// Remove a directory tree; removing what is not there is fine.
fn remove_tree(dir: &Path) -> Result<(), StateError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;
    use crate::vm::{DesiredState, RunState, VmSpec};

    fn uid(s: &str) -> VmUid {
        VmUid::new(s).expect("uid")
    }

    #[test]
    fn directories_whose_names_are_no_uids_are_not_listed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(tmp.path()).expect("open");
        store.create_vm_dir(&uid("vm-1")).expect("dir");
        std::fs::create_dir(tmp.path().join("vms").join("not a uid")).expect("stray");
        assert_eq!(store.list().expect("list"), vec![uid("vm-1")]);
    }

    #[test]
    fn records_round_trip_and_failed_runs_keep_only_status() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(tmp.path()).expect("open");
        let vm = uid("vm-1");
        store.create_vm_dir(&vm).expect("dir");
        let spec = ApplyRequest {
            spec: VmSpec {
                memory_bytes: 64 << 20,
                ..crate::testing::vm_spec("vm-1")
            },
            spec_hash: String::new(),
            run: 2,
            desired: DesiredState::Running,
            pull_secrets: Default::default(),
            pod: None,
            metadata: Default::default(),
            owner: None,
        };
        store.write_spec(&spec).expect("spec");
        let status = VmStatus {
            state: RunState::Failed,
            ..VmStatus::new(vm.clone(), String::new(), String::new())
        };
        store.write_status(&status).expect("status");
        std::fs::write(store.vm_dir(&vm).join("console.log"), b"x").expect("log");
        assert_eq!(store.read_spec(&vm).expect("read"), Some(spec));
        assert_eq!(store.list().expect("list"), vec![vm.clone()]);

        store.remove_all_except(&vm, &[STATUS_FILE]).expect("trim");
        let left: Vec<_> = std::fs::read_dir(store.vm_dir(&vm))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("status.json")]);
        assert_eq!(store.read_status(&vm).expect("read"), Some(status.clone()));

        store.remove_vm(&vm).expect("rm");
        store.remove_vm(&vm).expect("rm twice");
        assert!(
            store.write_status(&status).is_err(),
            "a deleted VM stays deleted"
        );
        assert!(store.list().expect("list").is_empty());
        assert_eq!(store.read_handle(&vm).expect("none"), None);
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = StateStore::open(tmp.path()).expect("open");
        let dir = store.create_vm_dir(&uid("vm-2")).expect("dir");
        std::fs::write(dir.join("status.json"), b"{not json").expect("write");
        assert_eq!(
            store
                .read_status(&uid("vm-2"))
                .expect_err("corrupt")
                .reason(),
            "StateCorrupt"
        );
    }
}
