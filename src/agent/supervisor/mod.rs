//! The per-VM lifecycle: `ApplyVM` converges a VM onto its (uid, spec_hash, run, desired
//! state), `DeleteVM` stops it and removes every trace, VMMs left running by a previous agent
//! are re-adopted at start, and every change goes out on an event hub that `WatchVMs` streams.
//!
//! Shape: the decisions ([`decide_apply`], [`plan_boot`]) are pure functions; the
//! [`Supervisor`] is the I/O shell around them. Each VM has a slot with an async lock that
//! serializes the controller's operations on it, and a plain mutex around its status, which
//! background watchers (exit, readiness, boot deadline) update. Whoever first sets a run's
//! `stopping` flag owns its teardown, so a boot timeout racing a `DeleteVM` kills once.

mod adopt;
mod boot;
mod decide;
mod disks;
mod errors;
mod events;
mod exits;
mod ids;
mod images;
mod network;
mod owner;
mod plan;
mod pod;
mod readiness;
mod slots;
mod stop;
mod suspend;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::agent::console;
use crate::agent::host::HostCapacity;
use crate::agent::image::ImageStoreConfig;
use crate::agent::net::NetworkConfig;
use crate::agent::state::StateStore;
use crate::agent::vmm::{VmmBackend, process};
use crate::error::ErrorReason;
use crate::vm::wire::SpecError;
use crate::vm::{
    Accelerator, ApplyRequest, HostInfo, Hypervisor, RunState, SequencedEvent, VmEvent, VmStatus,
    VmUid,
};

use decide::may_delete;
pub(crate) use decide::{ApplyAction, HeldRun, OwnerDecision, decide_apply, decide_owner};
pub(crate) use errors::{BootError, SupervisorError, VmmCall};
pub(crate) use events::AgentMetrics;
use events::EventHub;
pub(crate) use exits::exit_record;
use images::{Images, PullHandle};
use network::Networking;
use plan::BootPlan;
use plan::needs_tap;
pub(crate) use plan::{check_files, check_pod_interfaces, guest_cmdline, plan_boot};
use readiness::Readiness;
use slots::{RunHandle, VmSlot};
use stop::force_kill;
pub(crate) use suspend::SnapshotRecord;

/// How much console output goes into exit messages and exit classification.
const CONSOLE_TAIL: u64 = 4096;
/// How often console logs are checked against their size cap.
const ROTATE_INTERVAL: Duration = Duration::from_secs(2);

/// A VMM backend and the binary it runs.
#[derive(Clone)]
pub(crate) struct BackendEntry {
    pub(crate) backend: Arc<dyn VmmBackend>,
    /// The VMM binary as configured (a bare name is looked up in `PATH`).
    pub(crate) binary: PathBuf,
}

impl BackendEntry {
    /// The binary's full path when it is present.
    pub(crate) fn resolved_binary(&self) -> Option<PathBuf> {
        process::resolve_binary(&self.binary).ok()
    }
}

/// Fixed settings of the supervisor.
#[derive(Clone, Debug)]
pub(crate) struct SupervisorConfig {
    pub(crate) boot_timeout: Duration,
    /// Console log size cap (0 = no cap).
    pub(crate) console_max_bytes: u64,
    /// Where VM pods' sandboxes are found.
    pub(crate) pods: crate::agent::pod::Host,
    pub(crate) host: HostCapacity,
    /// What the KVM probe found.
    pub(crate) accelerator: Accelerator,
    pub(crate) accelerator_detail: String,
    /// `--simulated`: `auto` means the simulated backend (benchmarks only).
    pub(crate) simulated: bool,
    /// VMMs this agent knows but cannot run here, with why (reported in failures).
    pub(crate) unavailable: Vec<(Hypervisor, String)>,
    /// Guest networking; `None` = turned off.
    pub(crate) network: Option<NetworkConfig>,
    /// The node's image cache; `None`: VMs from images are refused.
    pub(crate) images: Option<ImageStoreConfig>,
    /// VMM ids, allowed host paths, TCG.
    pub(crate) policy: crate::agent::confine::VmmPolicy,
    /// How many suspended VMs the node keeps snapshots of; a suspend beyond it is refused.
    pub(crate) max_snapshots: usize,
}

struct Inner {
    config: SupervisorConfig,
    store: StateStore,
    backends: Vec<BackendEntry>,
    slots: Mutex<HashMap<VmUid, Arc<VmSlot>>>,
    hub: EventHub,
    metrics: AgentMetrics,
    /// Ends every watcher when the agent stops (VMMs keep running).
    shutdown: CancellationToken,
    generation: AtomicU64,
    network: Networking,
    images: Images,
    /// Held while a VM is given its VMM ids, so two VMs never get the same.
    ids_lock: Mutex<()>,
    /// What each VM's guest reads over its metadata channel.
    metadata: Arc<crate::agent::metadata::MetadataHub>,
}

/// The VM supervisor; cheap to clone.
#[derive(Clone)]
pub(crate) struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// A supervisor over `store`, with `backends` to boot VMs.
    pub(crate) fn new(
        config: SupervisorConfig,
        store: StateStore,
        backends: Vec<BackendEntry>,
        metrics: AgentMetrics,
    ) -> Self {
        let metadata = Arc::new(crate::agent::metadata::MetadataHub::default());
        Self {
            inner: Arc::new(Inner {
                network: Networking::new(config.network.clone(), metadata.clone()),
                metadata,
                images: Images::new(config.images.clone()),
                config,
                store,
                backends,
                slots: Mutex::new(HashMap::new()),
                hub: EventHub::new(),
                metrics,
                shutdown: CancellationToken::new(),
                generation: AtomicU64::new(1),
                ids_lock: Mutex::new(()),
            }),
        }
    }

    /// Re-adopt every VM of the state directory; returns how many VMs are held.
    pub(crate) async fn adopt(&self) -> Result<usize, SupervisorError> {
        let uids = self.inner.store.list().map_err(SupervisorError::State)?;
        for uid in &uids {
            Inner::adopt_one(&self.inner, uid).await;
        }
        // A snapshot whose VM is gone (a crash between a delete's two removals) is nobody's.
        for uid in self.inner.store.snapshots() {
            if !uids.contains(&uid) {
                tracing::warn!(%uid, "removing the snapshot of a VM this agent does not hold");
                let _ = self.inner.store.remove_snapshot(&uid);
            }
        }
        Ok(self.inner.slots().len())
    }

    /// Set up the node's guest networking now if `eager`, or if earlier attachments exist;
    /// then remove the attachments of VMs this agent no longer holds (call after
    /// [`Supervisor::adopt`]). A node that cannot do networking still serves VMs without it.
    pub(crate) async fn start_network(&self, eager: bool) {
        let network = &self.inner.network;
        if network.config.is_none() || !(eager || network.has_records()) {
            return;
        }
        let Ok(manager) = network.manager(eager).await else {
            return;
        };
        // Failed VMs gave their network back; a failure recorded just before a crash may not have.
        let live: std::collections::BTreeSet<String> = self
            .inner
            .slots()
            .iter()
            .filter(|slot| slot.lock().status.state != RunState::Failed)
            .map(|slot| slot.uid.to_string())
            .collect();
        match manager.garbage_collect(&live).await {
            Ok(report) => tracing::info!(
                taps = ?report.taps,
                addresses = ?report.addresses,
                records = ?report.records,
                "network garbage collected"
            ),
            Err(error) => {
                tracing::warn!(reason = error.reason(), error = %BootError::Network(error).full_message(), "network garbage collection failed")
            }
        }
        self.inner.release_network_if_idle().await;
    }

    /// Open the node's image cache now (clearing what a crashed pull left), rather than at the
    /// first VM that needs it.
    pub(crate) async fn open_images(&self) {
        if let Err(error) = self.inner.images.store().await {
            tracing::warn!(%error, "image cache unavailable; VMs from images will fail");
        }
    }

    /// Start background housekeeping (console log rotation).
    pub(crate) fn spawn_housekeeping(&self) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ROTATE_INTERVAL) => {}
                }
                for slot in inner.slots() {
                    let active = slot.lock().run.is_some();
                    if !active {
                        continue;
                    }
                    let dir = inner.store.vm_dir(&slot.uid);
                    if let Err(error) = console::rotate_if_needed(
                        &dir.join("console.log"),
                        inner.config.console_max_bytes,
                    ) {
                        tracing::warn!(uid = %slot.uid, error = %error, "console rotation failed");
                    }
                }
            }
        });
    }

    /// Converge a VM onto the request. A VM that cannot be created or booted is not an error
    /// here: it comes back in state FAILED with the reason.
    pub(crate) async fn apply(&self, request: ApplyRequest) -> VmStatus {
        let supervisor = self.clone();
        to_completion(async move { supervisor.converge(request, None).await }).await
    }

    /// Converge a VM onto a request whose spec this agent cannot boot as sent (a value it does
    /// not know): like [`Supervisor::apply`], except a boot is recorded as failed with `error`.
    pub(crate) async fn refuse(&self, request: ApplyRequest, error: SpecError) -> VmStatus {
        let supervisor = self.clone();
        to_completion(async move { supervisor.converge(request, Some(error)).await }).await
    }

    async fn converge(&self, request: ApplyRequest, refused: Option<SpecError>) -> VmStatus {
        let applied_at = crate::time::now_unix_ms();
        let inner = &self.inner;
        let uid = request.spec.uid.clone();
        let (slot, _op) = loop {
            let slot = inner.slot_or_insert(&uid);
            let op = slot.op.clone().lock_owned().await;
            if !slot.lock().deleted {
                break (slot, op);
            }
        };
        let held = {
            let rt = slot.lock();
            rt.recorded.then(|| HeldRun {
                spec_hash: rt.status.spec_hash.clone(),
                run: rt.status.run,
                state: rt.status.state,
                booted: rt.status.started_at_unix_ms != 0 || rt.status.pid != 0,
            })
        };
        let held_owner = slot.lock().status.owner.clone();
        match decide_owner(held.is_some(), held_owner.as_ref(), request.owner.as_ref()) {
            OwnerDecision::Proceed => {}
            OwnerDecision::Claim(owner) => {
                tracing::info!(%uid, %owner, name = %request.spec.name, "VM claimed");
            }
            OwnerDecision::Ignore => {
                tracing::info!(%uid, owner = ?held_owner, asked = ?request.owner, "ApplyVM from another than the VM's owner: nothing changes");
                return slot.lock().status.clone();
            }
        }
        let action = decide_apply(
            held.as_ref(),
            &request.spec_hash,
            request.run,
            request.desired,
        );
        tracing::info!(%uid, name = %request.spec.name, namespace = %request.spec.namespace, run = request.run, ?action, "ApplyVM");
        // A run kept (no new record of the request) still takes the request's name, owner and
        // guest metadata: a claim, or new labels, reach the VM with no boot.
        if held.is_some() && !matches!(action, ApplyAction::Boot | ApplyAction::RecordStopped) {
            inner.take_identity(&slot, &request);
        }
        match action {
            ApplyAction::Nothing => inner.refresh_pull_secrets(&slot, &request.pull_secrets),
            ApplyAction::AdoptRun => {
                let (run, desired) = (request.run, request.desired);
                inner.update(&slot, None, |rt| {
                    if let Some(held) = rt.request.as_mut() {
                        held.run = run;
                        held.desired = desired;
                    }
                    rt.status.run = run;
                });
                let rt = slot.lock();
                if let Some(Err(error)) = rt.request.as_ref().map(|r| inner.store.write_spec(r)) {
                    tracing::warn!(%uid, error = %error, "cannot record the new run");
                }
            }
            ApplyAction::Stop => {
                let was_pulling = inner.cancel_pull(&slot);
                Inner::stop_run(inner, &slot, request.spec.grace_period()).await;
                inner.drop_snapshot(&slot);
                let run = request.run.max(held.map(|h| h.run).unwrap_or(0));
                inner.update(&slot, None, |rt| {
                    if let Some(held) = rt.request.as_mut() {
                        held.run = run;
                        held.desired = crate::vm::DesiredState::Stopped;
                    }
                    rt.status.run = run;
                    rt.status.state = RunState::Stopped;
                    rt.status.ready = false;
                    rt.status.snapshot_bytes = 0;
                    if was_pulling {
                        rt.status.pulling = None;
                    }
                });
            }
            ApplyAction::RecordStopped => {
                inner.clear_previous(&slot, &request.spec_hash).await;
                inner.record_stopped(&slot, request, applied_at);
            }
            ApplyAction::Boot => {
                inner.clear_previous(&slot, &request.spec_hash).await;
                Inner::boot(inner, &slot, request, applied_at, refused).await;
            }
            ApplyAction::Suspend => Inner::suspend(inner, &slot, request.run).await,
            ApplyAction::Resume => Inner::resume(inner, &slot, request, applied_at).await,
        }
        inner.publish_metadata(&slot);
        slot.lock().status.clone()
    }

    /// [`Supervisor::delete_for`] asked by the VM's own uid.
    #[cfg(test)]
    pub(crate) async fn delete(
        &self,
        uid: &VmUid,
        grace: Option<Duration>,
    ) -> Result<bool, SupervisorError> {
        self.delete_for(uid, grace, None).await
    }

    /// Stop the VM within `grace` (its own grace period when `None`), kill it after, remove
    /// its files. Returns whether the agent held it. `asker`: who asks (`None`: the VM's own
    /// uid); a VM claimed by another MicroVM is deleted for that one only, and for anyone
    /// else answers `false` and stays.
    pub(crate) async fn delete_for(
        &self,
        uid: &VmUid,
        grace: Option<Duration>,
        asker: Option<VmUid>,
    ) -> Result<bool, SupervisorError> {
        let supervisor = self.clone();
        let uid = uid.clone();
        to_completion(async move { supervisor.delete_now(&uid, grace, asker.as_ref()).await }).await
    }

    async fn delete_now(
        &self,
        uid: &VmUid,
        grace: Option<Duration>,
        asker: Option<&VmUid>,
    ) -> Result<bool, SupervisorError> {
        let inner = &self.inner;
        let slot = inner.slots().into_iter().find(|s| &s.uid == uid);
        let Some(slot) = slot else {
            // A directory the agent does not hold (a crash mid-create): remove it anyway.
            let existed = inner.store.vm_dir(uid).exists();
            stop::kill_strays(&inner.store, uid, None).await;
            inner.store.remove_vm(uid).map_err(SupervisorError::State)?;
            inner.release_images(uid).await;
            return Ok(existed);
        };
        let _op = slot.op.clone().lock_owned().await;
        let grace = {
            let rt = slot.lock();
            if rt.deleted {
                return Ok(false);
            }
            if !may_delete(rt.status.owner.as_ref(), uid, asker) {
                tracing::info!(%uid, owner = ?rt.status.owner, ?asker, "DeleteVM from another than the VM's owner: the VM stays");
                return Ok(false);
            }
            grace.unwrap_or_else(|| rt.grace_period())
        };
        tracing::info!(%uid, grace_ms = grace.as_millis() as u64, "DeleteVM");
        inner.cancel_pull(&slot);
        Inner::stop_run(inner, &slot, grace).await;
        // Whatever the state files said, no VMM of the VM outlives its delete.
        stop::kill_strays(&inner.store, uid, None).await;
        // A failure here is logged, not returned: the slot goes away regardless, and the next
        // agent start collects what is left of a VM it does not hold.
        inner.release_network(uid).await;
        inner.release_images(uid).await;
        inner.metadata.forget(uid);
        {
            let mut rt = slot.lock();
            rt.deleted = true;
            inner
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(uid);
            inner
                .hub
                .publish(VmEvent::Deleted(uid.clone()), uid, None, &inner.metrics);
        }
        inner.store.remove_vm(uid).map_err(SupervisorError::State)?;
        Ok(true)
    }

    /// One VM's status.
    pub(crate) fn get(&self, uid: &VmUid) -> Option<VmStatus> {
        self.inner
            .slots()
            .into_iter()
            .find(|s| &s.uid == uid)
            .and_then(|s| s.lock().recorded_status())
    }

    /// Every VM's status, by uid.
    pub(crate) fn list(&self) -> Vec<VmStatus> {
        let mut vms: Vec<VmStatus> = self
            .inner
            .slots()
            .into_iter()
            .filter_map(|s| s.lock().recorded_status())
            .collect();
        vms.sort_by(|a, b| a.uid.cmp(&b.uid));
        vms
    }

    /// Subscribe to changes; returns the receiver and the sequence number it starts after.
    /// Take the snapshot with [`Supervisor::list`] after subscribing, so nothing is missed.
    pub(crate) fn subscribe(&self) -> (broadcast::Receiver<SequencedEvent>, u64) {
        self.inner.hub.subscribe()
    }

    /// vCPUs and memory reserved by the VMs held (failed ones hold nothing).
    pub(crate) fn usage(&self) -> (u32, u64) {
        self.inner
            .slots()
            .iter()
            .fold((0u32, 0u64), |(cpus, mem), slot| {
                let rt = slot.lock();
                if rt.status.state == RunState::Failed || !rt.recorded {
                    (cpus, mem)
                } else {
                    (
                        cpus.saturating_add(rt.status.vcpus),
                        mem.saturating_add(rt.status.memory_bytes),
                    )
                }
            })
    }

    /// The hypervisors whose binaries are present.
    pub(crate) fn hypervisors(&self) -> Vec<Hypervisor> {
        self.inner
            .backends
            .iter()
            .filter(|b| b.resolved_binary().is_some())
            .map(|b| b.backend.kind())
            .collect()
    }

    /// The VMMs this agent cannot run, with why: those whose backend could not be made at
    /// start, and those whose binary has gone since.
    fn unavailable(&self) -> Vec<(Hypervisor, String)> {
        let mut unavailable = self.inner.config.unavailable.clone();
        for entry in &self.inner.backends {
            if let Err(error) = process::resolve_binary(&entry.binary) {
                unavailable.push((entry.backend.kind(), error.to_string()));
            }
        }
        unavailable
    }

    /// The node as this agent offers it.
    pub(crate) fn host(&self, node_name: &str, instance_id: &str) -> HostInfo {
        let config = &self.inner.config;
        let (vcpus_used, memory_used_bytes) = self.usage();
        HostInfo {
            node_name: node_name.to_owned(),
            vcpus_total: config.host.vcpus,
            memory_total_bytes: config.host.memory_bytes,
            vcpus_used,
            memory_used_bytes,
            hypervisors: self.hypervisors(),
            unavailable_hypervisors: self.unavailable(),
            accelerator: config.accelerator,
            accelerator_detail: config.accelerator_detail.clone(),
            agent_version: crate::VERSION.to_owned(),
            instance_id: instance_id.to_owned(),
        }
    }

    /// The console log of a held VM.
    pub(crate) fn console_path(&self, uid: &VmUid) -> Result<PathBuf, SupervisorError> {
        if self.get(uid).is_none() {
            return Err(SupervisorError::NotFound {
                uid: uid.to_string(),
            });
        }
        Ok(self.inner.store.vm_dir(uid).join("console.log"))
    }

    /// Stop supervising. VMs keep running unless `stop_vms`, in which case each is stopped
    /// within its grace period first.
    pub(crate) async fn shutdown(&self, stop_vms: bool) {
        let inner = &self.inner;
        if stop_vms {
            let stops = inner.slots().into_iter().map(|slot| {
                let inner = inner.clone();
                async move {
                    let _op = slot.op.clone().lock_owned().await;
                    let grace = slot.lock().grace_period();
                    if Inner::stop_run(&inner, &slot, grace).await {
                        inner.update(&slot, None, |rt| {
                            rt.status.state = RunState::Stopped;
                            rt.status.ready = false;
                        });
                    }
                }
            });
            futures::future::join_all(stops).await;
        }
        inner.shutdown.cancel();
        inner.network.shutdown().await;
    }
}

/// Run `work` on a task of its own and wait for it. A gRPC handler's future is dropped when
/// its client gives up (the controller's call deadline is shorter than a boot that waits for
/// its pod), and a boot or delete dropped between two steps would leave the VM recorded as
/// creating with nothing left to finish it; on its own task it finishes whoever waits.
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    match tokio::spawn(work).await {
        Ok(done) => done,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled only by the runtime shutting down, which drops this caller too.
        Err(_) => std::future::pending().await,
    }
}
