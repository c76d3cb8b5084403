//! The VMs the agent holds, one slot each, and the one place that changes a VM's status:
//! [`Inner::update`] persists it and publishes it, in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::agent::image::VmDisk;
use crate::agent::state::STATUS_FILE;
use crate::agent::vmm::VmmHandle;
use crate::vm::{ExitReason, RunExit};

/// What lives as long as the VM (its spec), not just a run: the status record and the VM's
/// own disk.
const VM_LIFETIME_FILES: [&str; 3] = [STATUS_FILE, VmDisk::FILE_NAMES[0], VmDisk::FILE_NAMES[1]];

/// One VM held by the agent.
pub(super) struct VmSlot {
    pub(super) uid: VmUid,
    /// Serializes the controller's operations (apply, delete) on this VM.
    pub(super) op: Arc<tokio::sync::Mutex<()>>,
    pub(super) rt: Mutex<VmRuntime>,
}

pub(super) struct VmRuntime {
    /// What the controller last asked for (`None` for a VM re-adopted without its spec).
    pub(super) request: Option<ApplyRequest>,
    pub(super) status: VmStatus,
    /// Whether `status` describes a VM yet: a slot exists a moment before its first record.
    pub(super) recorded: bool,
    pub(super) run: Option<RunHandle>,
    /// Set once `DeleteVM` took the VM away: no more writes, no more events.
    pub(super) deleted: bool,
    /// The run's image pull, while it has not booted yet.
    pub(super) pull: Option<PullHandle>,
    /// The launcher's emptyDir of the VM's pod, once found: told when the VM has stopped.
    pub(super) pod_console: Option<std::path::PathBuf>,
    /// The VM pod's network namespace when the guest is on the pod's network: where its
    /// metadata channel listens.
    pub(super) pod_netns: Option<std::path::PathBuf>,
    /// The snapshot the next launch loads instead of booting (set by a resume).
    pub(super) resume: Option<crate::agent::vmm::SnapshotFiles>,
}

/// The VMM process of the current run.
#[derive(Clone)]
pub(super) struct RunHandle {
    pub(super) generation: u64,
    pub(super) backend: Arc<dyn VmmBackend>,
    pub(super) handle: VmmHandle,
    /// Becomes true when the VMM process has ended.
    pub(super) exited: watch::Receiver<bool>,
    /// Set by whoever tears the run down (stop, delete, boot timeout, exit).
    pub(super) stopping: Arc<AtomicBool>,
    /// Ends the run's readiness watcher.
    pub(super) cancel: CancellationToken,
}

impl VmRuntime {
    fn new(uid: &VmUid) -> Self {
        VmRuntime {
            request: None,
            status: VmStatus::new(uid.clone(), String::new(), String::new()),
            recorded: false,
            run: None,
            deleted: false,
            pull: None,
            pod_console: None,
            pod_netns: None,
            resume: None,
        }
    }

    /// The status, once there is one to tell.
    pub(super) fn recorded_status(&self) -> Option<VmStatus> {
        self.recorded.then(|| self.status.clone())
    }

    /// The VM's own grace period between a graceful stop and a kill.
    pub(super) fn grace_period(&self) -> Duration {
        self.request
            .as_ref()
            .map_or(Duration::ZERO, |r| r.spec.grace_period())
    }
}

impl VmSlot {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VmRuntime> {
        self.rt.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    pub(super) fn slots(&self) -> Vec<Arc<VmSlot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    pub(super) fn slot_or_insert(&self, uid: &VmUid) -> Arc<VmSlot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid.clone())
            .or_insert_with(|| {
                Arc::new(VmSlot {
                    uid: uid.clone(),
                    op: Arc::new(tokio::sync::Mutex::new(())),
                    rt: Mutex::new(VmRuntime::new(uid)),
                })
            })
            .clone()
    }

    /// A run of `backend`'s VMM behind `handle`, with the sender its exit watcher signals
    /// the VMM's end on.
    pub(super) fn new_run(
        &self,
        backend: &Arc<dyn VmmBackend>,
        handle: &VmmHandle,
    ) -> (RunHandle, watch::Sender<bool>) {
        let (exited_tx, exited_rx) = watch::channel(false);
        let run = RunHandle {
            generation: self.generation.fetch_add(1, Ordering::Relaxed),
            backend: backend.clone(),
            handle: handle.clone(),
            exited: exited_rx,
            stopping: Arc::new(AtomicBool::new(false)),
            cancel: CancellationToken::new(),
        };
        (run, exited_tx)
    }

    /// Change a VM's runtime, persist its status and publish it. `generation` guards updates
    /// from a run's watchers: a watcher of a replaced run changes nothing.
    pub(super) fn update(
        &self,
        slot: &VmSlot,
        generation: Option<u64>,
        f: impl FnOnce(&mut VmRuntime),
    ) -> bool {
        self.update_if(
            slot,
            |rt| {
                generation.is_none_or(|generation| {
                    rt.run.as_ref().map(|r| r.generation) == Some(generation)
                })
            },
            f,
        )
    }

    /// [`Inner::update`] unless `current` says the change is stale (a replaced run's watcher,
    /// a cancelled pull).
    pub(super) fn update_if(
        &self,
        slot: &VmSlot,
        current: impl FnOnce(&VmRuntime) -> bool,
        f: impl FnOnce(&mut VmRuntime),
    ) -> bool {
        let mut rt = slot.lock();
        if rt.deleted || !current(&rt) {
            return false;
        }
        f(&mut rt);
        if let Some(dir) = rt
            .pod_console
            .as_ref()
            .filter(|_| rt.status.state.is_ended())
        {
            crate::agent::pod::console::mark_stopped(dir);
        }
        if let Err(error) = self.store.write_status(&rt.status) {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot persist VM status");
        }
        self.hub.publish(
            VmEvent::Changed(Box::new(rt.status.clone())),
            &slot.uid,
            Some(rt.status.state),
            &self.metrics,
        );
        true
    }

    pub(super) fn backend(&self, kind: Hypervisor) -> Option<&BackendEntry> {
        self.backends.iter().find(|b| b.backend.kind() == kind)
    }

    /// Stop the previous run of a slot (if any) and clear its files, before a new run of the
    /// spec `next_hash`. The same spec keeps the VM's disk (the guest keeps what it wrote) and
    /// its pinned images; another spec starts from nothing.
    pub(super) async fn clear_previous(self: &Arc<Self>, slot: &Arc<VmSlot>, next_hash: &str) {
        self.cancel_pull(slot);
        let (grace, same_spec) = {
            let rt = slot.lock();
            (
                rt.grace_period(),
                rt.recorded && rt.status.spec_hash == next_hash,
            )
        };
        Self::stop_run(self, slot, grace).await;
        // A new boot makes any snapshot of the VM stale.
        self.drop_snapshot(slot);
        let cleared = if same_spec {
            self.store.remove_all_except(&slot.uid, &VM_LIFETIME_FILES)
        } else {
            self.release_images(&slot.uid).await;
            self.store.remove_vm(&slot.uid)
        };
        if let Err(error) = cleared {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot clear the previous run's files");
        }
    }

    /// The status a new run starts from: the VM's creation time carries over, so do the
    /// images the same spec resolved (every run boots the same digests), and so does the count
    /// of missed boot deadlines when the previous run missed its own.
    pub(super) fn fresh_status(slot: &VmSlot, request: &ApplyRequest, applied_at: i64) -> VmStatus {
        let (created_at, images, boot_timeouts, snapshot_issue) = {
            let rt = slot.lock();
            let created_at = if rt.status.created_at_unix_ms != 0 {
                rt.status.created_at_unix_ms
            } else {
                applied_at
            };
            let missed = rt
                .status
                .exit
                .as_ref()
                .is_some_and(|e| e.reason == ExitReason::BootTimeout);
            let images = if rt.recorded && rt.status.spec_hash == request.spec_hash {
                rt.status.images.clone()
            } else {
                Vec::new()
            };
            (
                created_at,
                images,
                if missed { rt.status.boot_timeouts } else { 0 },
                rt.status.snapshot_issue.clone(),
            )
        };
        let spec = &request.spec;
        VmStatus {
            spec_hash: request.spec_hash.clone(),
            run: request.run,
            state: RunState::Creating,
            hypervisor: spec.hypervisor,
            accelerator: spec.accelerator,
            created_at_unix_ms: created_at,
            applied_at_unix_ms: applied_at,
            images,
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            boot_timeouts,
            snapshot_issue,
            owner: request.owner.clone(),
            ..VmStatus::new(spec.uid.clone(), spec.namespace.clone(), spec.name.clone())
        }
    }

    /// Hold a new run as the VM's, before anything of it exists.
    pub(super) fn begin_run(slot: &VmSlot, request: ApplyRequest, status: VmStatus) {
        let mut rt = slot.lock();
        rt.request = Some(request);
        rt.status = status;
        rt.recorded = true;
        rt.run = None;
    }

    pub(super) fn record_stopped(&self, slot: &VmSlot, request: ApplyRequest, applied_at: i64) {
        let mut status = Self::fresh_status(slot, &request, applied_at);
        status.state = RunState::Stopped;
        if let Err(error) = self
            .store
            .create_vm_dir(&slot.uid)
            .and_then(|_| self.store.write_spec(&request))
        {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot record the stopped VM");
        }
        Self::begin_run(slot, request, status);
        self.update(slot, None, |_| {});
    }

    /// Record a failed create or boot: state FAILED, nothing left but `status.json`.
    pub(super) fn fail(&self, slot: &VmSlot, generation: Option<u64>, error: &BootError) {
        tracing::warn!(uid = %slot.uid, reason = error.reason(), error = %error.full_message(), "VM failed to boot");
        self.metrics.boot_failed(error.reason());
        let exit = RunExit {
            success: false,
            reason: ExitReason::boot_failed(error.reason()),
            message: error.full_message(),
            permanent: error.is_permanent(),
            exit_code: -1,
            at_unix_ms: crate::time::now_unix_ms(),
        };
        self.fail_with(slot, generation, exit);
    }

    pub(super) fn fail_with(&self, slot: &VmSlot, generation: Option<u64>, exit: RunExit) {
        // The VM's disk stays with it: a next run of the same spec boots it again.
        if let Err(error) = self.store.remove_all_except(&slot.uid, &VM_LIFETIME_FILES) {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot clean up the failed VM");
        }
        // The status record alone stays, so the failure can be reported (and survives a restart).
        if let Err(error) = self.store.create_vm_dir(&slot.uid) {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot record the failure");
        }
        self.update(slot, generation, |rt| {
            if let Some(run) = rt.run.take() {
                run.cancel.cancel();
            }
            rt.pull = None;
            rt.status.state = RunState::Failed;
            rt.status.ready = false;
            rt.status.pid = 0;
            rt.status.pulling = None;
            rt.status.exit = Some(exit);
        });
    }

    /// A boot that failed under the VM's operation lock: its network goes too (a new run
    /// attaches again), then the failure is recorded.
    pub(super) async fn fail_boot(
        &self,
        slot: &VmSlot,
        generation: Option<u64>,
        error: &BootError,
    ) {
        self.release_network(&slot.uid).await;
        self.fail(slot, generation, error);
    }
}
