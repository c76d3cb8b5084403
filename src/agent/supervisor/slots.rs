//! The VMs the agent holds, one slot each, and the one place that changes a VM's status:
//! [`Inner::update`] persists it and publishes it, in order.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::agent::state::{ExitRecord, Phase, SpecRecord, StatusRecord};
use crate::agent::vmm::VmmHandle;
use crate::api::Hypervisor;
use crate::error::ErrorReason;
use crate::proto;

/// One VM held by the agent.
pub(super) struct VmSlot {
    pub(super) uid: String,
    /// Serializes the controller's operations (apply, delete) on this VM.
    pub(super) op: Arc<tokio::sync::Mutex<()>>,
    pub(super) rt: Mutex<VmRuntime>,
}

#[derive(Default)]
pub(super) struct VmRuntime {
    pub(super) spec: SpecRecord,
    pub(super) status: StatusRecord,
    pub(super) run: Option<RunHandle>,
    /// Set once `DeleteVM` took the VM away: no more writes, no more events.
    pub(super) deleted: bool,
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

    pub(super) fn slot_or_insert(&self, uid: &str) -> Arc<VmSlot> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(uid.to_owned())
            .or_insert_with(|| {
                Arc::new(VmSlot {
                    uid: uid.to_owned(),
                    op: Arc::new(tokio::sync::Mutex::new(())),
                    rt: Mutex::new(VmRuntime::default()),
                })
            })
            .clone()
    }

    pub(super) fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Change a VM's runtime, persist its status and publish it. `generation` guards updates
    /// from a run's watchers: a watcher of a replaced run changes nothing.
    pub(super) fn update(
        &self,
        slot: &VmSlot,
        generation: Option<u64>,
        f: impl FnOnce(&mut VmRuntime),
    ) -> bool {
        let mut rt = slot.lock();
        if rt.deleted {
            return false;
        }
        if let Some(generation) = generation
            && rt.run.as_ref().map(|r| r.generation) != Some(generation)
        {
            return false;
        }
        f(&mut rt);
        if let Err(error) = self.store.write_status(&rt.status) {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot persist VM status");
        }
        self.hub.publish(
            proto::vm_event::Event::Vm(rt.status.to_proto()),
            &slot.uid,
            Some(rt.status.phase),
            &self.metrics,
        );
        true
    }

    pub(super) fn backend(&self, kind: Hypervisor) -> Option<&BackendEntry> {
        self.backends.iter().find(|b| b.backend.kind() == kind)
    }

    /// Stop the previous run of a slot (if any) and clear its files, before a new run.
    pub(super) async fn clear_previous(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        let grace = grace_from_seconds(slot.lock().spec.termination_grace_period_seconds);
        Self::stop_run(self, slot, grace).await;
        if let Err(error) = self.store.remove_vm(&slot.uid) {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot clear the previous run's files");
        }
    }

    pub(super) fn fresh_status(slot: &VmSlot, spec: &SpecRecord, applied_at: i64) -> StatusRecord {
        let created_at = {
            let rt = slot.lock();
            if rt.status.created_at_unix_ms != 0 {
                rt.status.created_at_unix_ms
            } else {
                applied_at
            }
        };
        StatusRecord {
            uid: spec.uid.clone(),
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            spec_hash: spec.spec_hash.clone(),
            run: spec.run,
            phase: Phase::Creating,
            hypervisor: spec.hypervisor.clone(),
            accelerator: spec.accelerator.clone(),
            created_at_unix_ms: created_at,
            applied_at_unix_ms: applied_at,
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            ..Default::default()
        }
    }

    pub(super) fn record_stopped(&self, slot: &VmSlot, spec: SpecRecord, applied_at: i64) {
        let mut status = Self::fresh_status(slot, &spec, applied_at);
        status.phase = Phase::Stopped;
        if let Err(error) = self
            .store
            .create_vm_dir(&spec.uid)
            .and_then(|_| self.store.write_spec(&spec))
        {
            tracing::warn!(uid = %spec.uid, error = %error, "cannot record the stopped VM");
        }
        self.update(slot, None, |rt| {
            rt.spec = spec;
            rt.status = status;
            rt.run = None;
        });
    }

    /// Record a failed create or boot: state FAILED, nothing left but `status.json`.
    pub(super) fn fail(&self, slot: &VmSlot, generation: Option<u64>, error: &BootError) {
        tracing::warn!(uid = %slot.uid, reason = error.reason(), error = %error.full_message(), "VM failed to boot");
        self.metrics.boot_failed(error.reason());
        let exit = ExitRecord {
            success: false,
            reason: error.reason().to_owned(),
            message: error.full_message(),
            permanent: error.is_permanent(),
            exit_code: -1,
            at_unix_ms: crate::time::now_unix_ms(),
        };
        self.fail_with(slot, generation, exit);
    }

    pub(super) fn fail_with(&self, slot: &VmSlot, generation: Option<u64>, exit: ExitRecord) {
        if let Err(error) = self.store.remove_all_but_status(&slot.uid) {
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
            rt.status.phase = Phase::Failed;
            rt.status.ready = false;
            rt.status.pid = 0;
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
