//! Suspend and resume. A suspend saves the running guest's memory and device state into the
//! VM's snapshot directory (`<state>/snapshots/<uid>`, the VMM's ids' alone) and ends the VMM;
//! the VM's disk, taps and addresses stay. A resume creates the VMM again from the same config
//! and loads the snapshot instead of booting (see `boot.rs`). A snapshot that does not match
//! this node and this VMM build, or that the VMM refuses, is discarded and the VM boots cold:
//! the guest's disk is as the suspended guest left it, as after a power loss.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::*;
use crate::agent::vmm::{API_TIMEOUT, SNAPSHOT_TIMEOUT, SnapshotFiles, VmmError, VmmState};
use crate::vm::SnapshotIssue;

/// What a snapshot was saved by and for: a resume loads it only where all of it still holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotOrigin {
    pub(crate) spec_hash: String,
    pub(crate) hypervisor: Hypervisor,
    pub(crate) accelerator: Accelerator,
    /// The VMM binary's path, size and modification time: a VMM loads only its own build's
    /// device state reliably.
    pub(crate) vmm_build: String,
    /// The host CPU's model name: a guest saved on one CPU may use features another lacks.
    pub(crate) cpu: String,
}

/// The record kept beside a snapshot's files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub(crate) origin: SnapshotOrigin,
    pub(crate) bytes: u64,
    pub(crate) saved_at_unix_ms: i64,
    pub(crate) save_ms: u64,
}

/// Why a snapshot saved as `saved` cannot be loaded `here`; `None` when it can. Pure.
pub(crate) fn mismatch(saved: &SnapshotOrigin, here: &SnapshotOrigin) -> Option<String> {
    if saved.spec_hash != here.spec_hash {
        return Some("it was saved for another spec of the VM".into());
    }
    if saved.hypervisor != here.hypervisor || saved.accelerator != here.accelerator {
        return Some(format!(
            "it was saved by {} with {}, and this run uses {} with {}",
            saved.hypervisor, saved.accelerator, here.hypervisor, here.accelerator
        ));
    }
    if saved.vmm_build != here.vmm_build {
        return Some(format!(
            "it was saved by another VMM build ({}; this node has {})",
            saved.vmm_build, here.vmm_build
        ));
    }
    if saved.cpu != here.cpu {
        return Some(format!(
            "it was saved on another CPU ({}; this node has {})",
            saved.cpu, here.cpu
        ));
    }
    None
}

/// The host CPU's model name, from `/proc/cpuinfo`.
fn host_cpu() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// A binary's identity: path, size and modification time.
fn build_of(binary: &std::path::Path) -> String {
    let meta = std::fs::metadata(binary).ok();
    let mtime = meta
        .as_ref()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    format!(
        "{} ({} bytes, mtime {mtime})",
        binary.display(),
        meta.map_or(0, |m| m.len())
    )
}

impl Inner {
    /// Where the snapshot stands now for a run of the slot's VM.
    fn origin_here(&self, slot: &VmSlot) -> Option<SnapshotOrigin> {
        let rt = slot.lock();
        let hypervisor = rt.status.hypervisor?;
        let entry = self.backend(hypervisor)?;
        Some(SnapshotOrigin {
            spec_hash: rt.status.spec_hash.clone(),
            hypervisor,
            accelerator: rt.status.accelerator?,
            vmm_build: build_of(&entry.resolved_binary().unwrap_or(entry.binary.clone())),
            cpu: host_cpu(),
        })
    }

    /// Whose the VM's snapshot files are: its VMM's uid and gid (none when VMMs run
    /// unconfined).
    fn snapshot_owner(&self, uid: &VmUid) -> Option<(u32, u32)> {
        self.confinement(uid).ok().flatten().map(|c| (c.uid, c.gid))
    }

    /// Save the running guest and end its VMM; the VM is then Suspended. A suspend that is
    /// refused (the node's limit) or fails leaves the guest running, with the reason in the
    /// status.
    pub(super) async fn suspend(self: &Arc<Self>, slot: &Arc<VmSlot>, run_number: u32) {
        let Some(run) = slot.lock().run.clone() else {
            return;
        };
        let others = self
            .store
            .snapshots()
            .into_iter()
            .filter(|uid| uid != &slot.uid)
            .count();
        if others >= self.config.max_snapshots {
            let message = format!(
                "the node keeps at most {} snapshots and holds {others}: the VM runs on; resume or delete another suspended VM, or raise the agent's --max-snapshots",
                self.config.max_snapshots
            );
            return self.suspend_not_done(slot, &run, "SnapshotLimitReached", message, false);
        }
        let Some(origin) = self.origin_here(slot) else {
            let message = "the VM's VMM is not known to this agent".to_string();
            return self.suspend_not_done(slot, &run, "SnapshotFailed", message, false);
        };
        let owner = self.snapshot_owner(&slot.uid);
        let dir = match self.store.create_snapshot_dir(&slot.uid, owner) {
            Ok(dir) => dir,
            Err(error) => {
                let message = format!("cannot make the snapshot directory: {error}");
                return self.suspend_not_done(slot, &run, "SnapshotFailed", message, false);
            }
        };
        let files = SnapshotFiles { dir, owner };
        self.update(slot, Some(run.generation), |rt| {
            rt.status.state = RunState::Suspending;
            rt.status.run = rt.status.run.max(run_number);
        });
        let began = Instant::now();
        let saved = match tokio::time::timeout(
            SNAPSHOT_TIMEOUT + Duration::from_secs(1),
            run.backend.snapshot(&run.handle, &files),
        )
        .await
        {
            Ok(saved) => saved,
            Err(_) => Err(VmmError::ApiTimeout {
                operation: "snapshot".into(),
                timeout: SNAPSHOT_TIMEOUT,
            }),
        };
        if let Err(error) = saved {
            let _ = self.store.remove_snapshot(&slot.uid);
            let message = format!("the VMM could not save the guest: {error}; the VM runs on");
            return self.suspend_not_done(slot, &run, "SnapshotFailed", message, true);
        }
        let save_ms = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The saved VMM has nothing left to do: it ends as a stop would end it, but the run
        // is recorded as suspended, not stopped.
        if !run.stopping.swap(true, Ordering::SeqCst) {
            run.cancel.cancel();
            Self::kill_and_wait(&run).await;
        }
        let _ = std::fs::remove_file(&run.handle.api_socket);
        let bytes = self.store.snapshot_bytes(&slot.uid);
        let record = SnapshotRecord {
            origin,
            bytes,
            saved_at_unix_ms: crate::time::now_unix_ms(),
            save_ms,
        };
        if let Err(error) = self.store.write_snapshot_record(&slot.uid, &record) {
            // Without its record the snapshot is never trusted: the resume boots cold.
            tracing::warn!(uid = %slot.uid, %error, "cannot record the snapshot");
        }
        self.metrics.snapshot("saved");
        tracing::info!(uid = %slot.uid, bytes, save_ms, "VM suspended");
        self.update(slot, None, |rt| {
            if rt.run.as_ref().map(|r| r.generation) == Some(run.generation) {
                rt.run = None;
            }
            rt.status.state = RunState::Suspended;
            rt.status.ready = false;
            rt.status.pid = 0;
            rt.status.snapshot_bytes = bytes;
            rt.status.snapshot_issue = None;
        });
    }

    /// A suspend that did not happen: the guest runs on (continued, if the save had paused
    /// it), and the status says why. A VMM that cannot continue ends the run.
    fn suspend_not_done(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        run: &RunHandle,
        reason: &str,
        message: String,
        paused: bool,
    ) {
        tracing::warn!(uid = %slot.uid, reason, %message, "suspend not done");
        self.metrics
            .snapshot(if paused { "failed" } else { "refused" });
        let issue = SnapshotIssue {
            reason: reason.to_string(),
            message,
            at_unix_ms: crate::time::now_unix_ms(),
        };
        self.update(slot, Some(run.generation), |rt| {
            if rt.status.state == RunState::Suspending {
                rt.status.state = RunState::Running;
            }
            rt.status.snapshot_issue = Some(issue);
        });
        if paused {
            let inner = self.clone();
            let run = run.clone();
            let uid = slot.uid.clone();
            tokio::spawn(async move { inner.continue_guest(&uid, &run).await });
        }
    }

    /// Let a guest paused for a failed save run again; kill a VMM that cannot.
    async fn continue_guest(&self, uid: &VmUid, run: &RunHandle) {
        let _ = tokio::time::timeout(API_TIMEOUT, run.backend.start(&run.handle)).await;
        let state = tokio::time::timeout(API_TIMEOUT, run.backend.state(&run.handle)).await;
        if !matches!(state, Ok(Ok(VmmState::Running))) {
            tracing::warn!(%uid, "the guest cannot continue after a failed save; ending its VMM");
            stop::force_kill(&run.handle);
        }
    }

    /// Resume a suspended VM: a new run of the same spec that loads the snapshot when it can
    /// be trusted here, and boots cold when it cannot.
    pub(super) async fn resume(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        request: ApplyRequest,
        applied_at: i64,
    ) {
        let saved = self.store.read_snapshot_record(&slot.uid);
        let here = self.origin_here(slot);
        let why_not = match (&saved, &here) {
            (None, _) => Some("the snapshot or its record is missing or unreadable".to_string()),
            (Some(_), None) => Some("the VM's VMM is not known to this agent".to_string()),
            (Some(saved), Some(here)) => mismatch(&saved.origin, here),
        };
        match why_not {
            None => {
                slot.lock().resume = Some(SnapshotFiles {
                    dir: self.store.snapshot_dir(&slot.uid),
                    owner: self.snapshot_owner(&slot.uid),
                });
            }
            Some(why) => self.snapshot_unrestorable(slot, &why),
        }
        Inner::boot(self, slot, request, applied_at, None).await;
    }

    /// Drop the VM's snapshot: the VM boots cold, and its status says why.
    pub(super) fn snapshot_unrestorable(&self, slot: &VmSlot, why: &str) {
        tracing::warn!(uid = %slot.uid, why, "snapshot cannot be restored; booting cold");
        self.metrics.snapshot("unrestorable");
        self.drop_snapshot(slot);
        let issue = SnapshotIssue {
            reason: "SnapshotUnrestorable".into(),
            message: format!(
                "the snapshot cannot be restored: {why}; the VM booted cold from its disk"
            ),
            at_unix_ms: crate::time::now_unix_ms(),
        };
        self.update(slot, None, |rt| {
            rt.status.snapshot_issue = Some(issue);
            rt.status.snapshot_bytes = 0;
        });
    }

    /// The guest was loaded from its snapshot: the snapshot is spent (the guest moves on
    /// from it) and is removed.
    pub(super) fn snapshot_restored(&self, slot: &VmSlot) {
        self.metrics.snapshot("restored");
        self.drop_snapshot(slot);
        self.update(slot, None, |rt| {
            rt.status.snapshot_issue = None;
            rt.status.snapshot_bytes = 0;
            rt.status.restored = true;
        });
    }

    /// Remove the VM's snapshot files.
    pub(super) fn drop_snapshot(&self, slot: &VmSlot) {
        slot.lock().resume = None;
        if let Err(error) = self.store.remove_snapshot(&slot.uid) {
            tracing::warn!(uid = %slot.uid, %error, "cannot remove the VM's snapshot");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> SnapshotOrigin {
        SnapshotOrigin {
            spec_hash: "h".into(),
            hypervisor: Hypervisor::Qemu,
            accelerator: Accelerator::Tcg,
            vmm_build: "/usr/bin/qemu (1 bytes, mtime 2)".into(),
            cpu: "AMD EPYC".into(),
        }
    }

    #[test]
    fn a_snapshot_loads_only_where_it_was_saved() {
        assert_eq!(mismatch(&origin(), &origin()), None);
        type Change = fn(&mut SnapshotOrigin);
        let cases: [(&str, Change); 4] = [
            ("another spec", |o| o.spec_hash = "h2".into()),
            ("saved by qemu with tcg", |o| {
                o.accelerator = Accelerator::Kvm
            }),
            ("another VMM build", |o| {
                o.vmm_build = "/usr/bin/qemu (9 bytes, mtime 2)".into()
            }),
            ("another CPU", |o| o.cpu = "Intel Xeon".into()),
        ];
        for (words, change) in cases {
            let mut here = origin();
            change(&mut here);
            let why = mismatch(&origin(), &here).expect(words);
            assert!(why.contains(words), "{why:?} should say {words:?}");
        }
    }
}
