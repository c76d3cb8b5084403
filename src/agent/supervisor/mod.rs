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
mod errors;
mod events;
mod exits;
mod network;
mod plan;
mod readiness;
mod slots;
mod stop;
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
use crate::agent::net::NetworkConfig;
use crate::agent::state::{Phase, SpecRecord, StateStore};
use crate::agent::vmm::{VmmBackend, process};
use crate::api::{Accelerator, Hypervisor};
use crate::error::ErrorReason;
use crate::proto;

pub use decide::{ApplyAction, HeldRun, decide_apply};
pub use errors::{BootError, SupervisorError, VmmCall};
pub use events::AgentMetrics;
use events::EventHub;
pub use exits::exit_record;
use network::Networking;
pub use plan::{
    BootPlan, PlanEnv, check_files, guest_cmdline, interface_requests, parse_hypervisor, plan_boot,
};
use plan::{mode_word, needs_tap};
use readiness::Readiness;
use slots::{RunHandle, VmSlot};
use stop::force_kill;

/// How much console output goes into exit messages and exit classification.
const CONSOLE_TAIL: u64 = 4096;
/// How often console logs are checked against their size cap.
const ROTATE_INTERVAL: Duration = Duration::from_secs(2);

/// A VMM backend and the binary it runs.
#[derive(Clone)]
pub struct BackendEntry {
    pub backend: Arc<dyn VmmBackend>,
    /// The VMM binary as configured (a bare name is looked up in `PATH`).
    pub binary: PathBuf,
}

impl BackendEntry {
    /// The binary's full path when it is present.
    pub fn resolved_binary(&self) -> Option<PathBuf> {
        process::resolve_binary(&self.binary).ok()
    }
}

/// Fixed settings of the supervisor.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub boot_timeout: Duration,
    /// Console log size cap (0 = no cap).
    pub console_max_bytes: u64,
    pub host: HostCapacity,
    /// What the KVM probe found.
    pub accelerator: Accelerator,
    pub accelerator_detail: String,
    /// `--simulated`: `auto` means the simulated backend (benchmarks only).
    pub simulated: bool,
    /// VMMs this agent knows but cannot run here, with why (reported in failures).
    pub unavailable: Vec<(Hypervisor, String)>,
    /// Guest networking; `None` = turned off.
    pub network: Option<NetworkConfig>,
}

fn grace_from_seconds(seconds: i64) -> Duration {
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

struct Inner {
    config: SupervisorConfig,
    store: StateStore,
    backends: Vec<BackendEntry>,
    slots: Mutex<HashMap<String, Arc<VmSlot>>>,
    hub: EventHub,
    metrics: AgentMetrics,
    /// Ends every watcher when the agent stops (VMMs keep running).
    shutdown: CancellationToken,
    generation: AtomicU64,
    network: Networking,
}

/// The VM supervisor; cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    /// A supervisor over `store`, with `backends` to boot VMs.
    pub fn new(
        config: SupervisorConfig,
        store: StateStore,
        backends: Vec<BackendEntry>,
        metrics: AgentMetrics,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                network: Networking::new(config.network.clone()),
                config,
                store,
                backends,
                slots: Mutex::new(HashMap::new()),
                hub: EventHub::new(),
                metrics,
                shutdown: CancellationToken::new(),
                generation: AtomicU64::new(1),
            }),
        }
    }

    /// Re-adopt every VM of the state directory; returns how many VMs are held.
    pub async fn adopt(&self) -> Result<usize, SupervisorError> {
        let uids = self.inner.store.list().map_err(SupervisorError::State)?;
        for uid in &uids {
            Inner::adopt_one(&self.inner, uid).await;
        }
        Ok(self.inner.slots().len())
    }

    /// Set up the node's guest networking now if `eager`, or if earlier attachments exist;
    /// then remove the attachments of VMs this agent no longer holds (call after
    /// [`Supervisor::adopt`]). A node that cannot do networking still serves VMs without it.
    pub async fn start_network(&self, eager: bool) {
        let network = &self.inner.network;
        if network.config.is_none() || !(eager || network.has_records()) {
            return;
        }
        let Ok(manager) = network.manager().await else {
            return;
        };
        // Failed VMs gave their network back; a failure recorded just before a crash may not have.
        let live: std::collections::BTreeSet<String> = self
            .inner
            .slots()
            .iter()
            .filter(|slot| slot.lock().status.phase != Phase::Failed)
            .map(|slot| slot.uid.clone())
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
    }

    /// Start background housekeeping (console log rotation).
    pub fn spawn_housekeeping(&self) {
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
                    let Ok(dir) = inner.store.vm_dir(&slot.uid) else {
                        continue;
                    };
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
    pub async fn apply(
        &self,
        request: proto::ApplyVmRequest,
    ) -> Result<proto::Vm, SupervisorError> {
        let applied_at = crate::time::now_unix_ms();
        let spec = request
            .spec
            .as_ref()
            .ok_or_else(|| SupervisorError::InvalidRequest {
                detail: "spec is required".into(),
            })?;
        if !crate::agent::state::valid_uid(&spec.uid) {
            return Err(SupervisorError::InvalidRequest {
                detail: format!(
                    "uid {:?} must be 1-64 letters, digits, '-', '_' or '.'",
                    spec.uid
                ),
            });
        }
        let want_running = request.desired_state != proto::DesiredState::Stopped as i32;
        let spec = SpecRecord::from_apply(spec, &request.spec_hash, request.run, want_running);
        let inner = &self.inner;
        let (slot, _op) = loop {
            let slot = inner.slot_or_insert(&spec.uid);
            let op = slot.op.clone().lock_owned().await;
            if !slot.lock().deleted {
                break (slot, op);
            }
        };
        let held = {
            let rt = slot.lock();
            (!rt.status.uid.is_empty()).then(|| HeldRun {
                spec_hash: rt.status.spec_hash.clone(),
                run: rt.status.run,
                phase: rt.status.phase,
                booted: rt.status.started_at_unix_ms != 0 || rt.status.pid != 0,
            })
        };
        let action = decide_apply(held.as_ref(), &spec.spec_hash, spec.run, want_running);
        tracing::info!(uid = %spec.uid, name = %spec.name, namespace = %spec.namespace, run = spec.run, ?action, "ApplyVM");
        match action {
            ApplyAction::Nothing => {}
            ApplyAction::AdoptRun => {
                let run = spec.run;
                inner.update(&slot, None, |rt| {
                    rt.spec.run = run;
                    rt.spec.want_running = want_running;
                    rt.status.run = run;
                });
                let rt = slot.lock();
                if let Err(error) = inner.store.write_spec(&rt.spec) {
                    tracing::warn!(uid = %spec.uid, error = %error, "cannot record the new run");
                }
            }
            ApplyAction::Stop => {
                let grace = grace_from_seconds(spec.termination_grace_period_seconds);
                Inner::stop_run(inner, &slot, grace).await;
                let run = spec.run.max(held.map(|h| h.run).unwrap_or(0));
                inner.update(&slot, None, |rt| {
                    rt.spec.want_running = false;
                    rt.spec.run = run;
                    rt.status.run = run;
                    rt.status.phase = Phase::Stopped;
                    rt.status.ready = false;
                });
            }
            ApplyAction::RecordStopped => {
                inner.clear_previous(&slot).await;
                inner.record_stopped(&slot, spec, applied_at);
            }
            ApplyAction::Boot => {
                inner.clear_previous(&slot).await;
                Inner::boot(inner, &slot, spec, applied_at).await;
            }
        }
        let vm = slot.lock().status.to_proto();
        Ok(vm)
    }

    /// Stop the VM within `grace` (its own grace period when `None`), kill it after, remove
    /// its files. Returns whether the agent held it.
    pub async fn delete(
        &self,
        uid: &str,
        grace: Option<Duration>,
    ) -> Result<bool, SupervisorError> {
        let inner = &self.inner;
        let dir = inner
            .store
            .vm_dir(uid)
            .map_err(|_| SupervisorError::InvalidRequest {
                detail: format!("uid {uid:?} is not a valid VM uid"),
            })?;
        let slot = inner.slots().into_iter().find(|s| s.uid == uid);
        let Some(slot) = slot else {
            // A directory the agent does not hold (a crash mid-create): remove it anyway.
            let existed = dir.exists();
            inner.store.remove_vm(uid).map_err(SupervisorError::State)?;
            return Ok(existed);
        };
        let _op = slot.op.clone().lock_owned().await;
        let grace = {
            let rt = slot.lock();
            if rt.deleted {
                return Ok(false);
            }
            grace.unwrap_or_else(|| grace_from_seconds(rt.spec.termination_grace_period_seconds))
        };
        tracing::info!(uid, grace_ms = grace.as_millis() as u64, "DeleteVM");
        Inner::stop_run(inner, &slot, grace).await;
        // A failure here is logged, not returned: the slot goes away regardless, and the next
        // agent start collects what is left of a VM it does not hold.
        inner.release_network(uid).await;
        {
            let mut rt = slot.lock();
            rt.deleted = true;
            inner
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(uid);
            inner.hub.publish(
                proto::vm_event::Event::Deleted(proto::VmDeleted {
                    uid: uid.to_owned(),
                }),
                uid,
                None,
                &inner.metrics,
            );
        }
        inner.store.remove_vm(uid).map_err(SupervisorError::State)?;
        Ok(true)
    }

    /// One VM's status.
    pub fn get(&self, uid: &str) -> Option<proto::Vm> {
        self.inner
            .slots()
            .into_iter()
            .find(|s| s.uid == uid)
            .map(|s| s.lock().status.to_proto())
            .filter(|vm| !vm.uid.is_empty())
    }

    /// Every VM's status, by uid.
    pub fn list(&self) -> Vec<proto::Vm> {
        let mut vms: Vec<proto::Vm> = self
            .inner
            .slots()
            .into_iter()
            .map(|s| s.lock().status.to_proto())
            .filter(|vm| !vm.uid.is_empty())
            .collect();
        vms.sort_by(|a, b| a.uid.cmp(&b.uid));
        vms
    }

    /// Subscribe to changes; returns the receiver and the sequence number it starts after.
    /// Take the snapshot with [`Supervisor::list`] after subscribing, so nothing is missed.
    pub fn subscribe(&self) -> (broadcast::Receiver<proto::VmEvent>, u64) {
        self.inner.hub.subscribe()
    }

    /// vCPUs and memory reserved by the VMs held (failed ones hold nothing).
    pub fn usage(&self) -> (u32, u64) {
        self.inner
            .slots()
            .iter()
            .fold((0u32, 0u64), |(cpus, mem), slot| {
                let rt = slot.lock();
                if rt.status.phase == Phase::Failed || rt.status.uid.is_empty() {
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
    pub fn hypervisors(&self) -> Vec<String> {
        self.inner
            .backends
            .iter()
            .filter(|b| b.resolved_binary().is_some())
            .map(|b| b.backend.kind().as_str().to_owned())
            .collect()
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.inner.config
    }

    /// The console log of a held VM.
    pub fn console_path(&self, uid: &str) -> Result<PathBuf, SupervisorError> {
        if self.get(uid).is_none() {
            return Err(SupervisorError::NotFound {
                uid: uid.to_owned(),
            });
        }
        let dir = self
            .inner
            .store
            .vm_dir(uid)
            .map_err(SupervisorError::State)?;
        Ok(dir.join("console.log"))
    }

    /// Stop supervising. VMs keep running unless `stop_vms`, in which case each is stopped
    /// within its grace period first.
    pub async fn shutdown(&self, stop_vms: bool) {
        let inner = &self.inner;
        if stop_vms {
            let stops = inner.slots().into_iter().map(|slot| {
                let inner = inner.clone();
                async move {
                    let _op = slot.op.clone().lock_owned().await;
                    let grace =
                        grace_from_seconds(slot.lock().spec.termination_grace_period_seconds);
                    if Inner::stop_run(&inner, &slot, grace).await {
                        inner.update(&slot, None, |rt| {
                            rt.status.phase = Phase::Stopped;
                            rt.status.ready = false;
                        });
                    }
                }
            });
            futures::future::join_all(stops).await;
        }
        inner.shutdown.cancel();
    }
}
