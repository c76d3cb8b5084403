//! The per-VM lifecycle: `ApplyVM` converges a VM onto its (uid, spec_hash, run, desired
//! state), `DeleteVM` stops it and removes every trace, VMMs left running by a previous agent
//! are re-adopted at start, and every change goes out on an event hub that `WatchVMs` streams.
//!
//! Shape: the decisions ([`decide_apply`], [`plan_boot`]) are pure functions; the
//! [`Supervisor`] is the I/O shell around them. Each VM has a slot with an async lock that
//! serializes the controller's operations on it, and a plain mutex around its status, which
//! background watchers (exit, readiness, boot deadline) update. Whoever first sets a run's
//! `stopping` flag owns its teardown, so a boot timeout racing a `DeleteVM` kills once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use thiserror::Error;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::agent::console;
use crate::agent::host::HostCapacity;
use crate::agent::net::{
    self, AttachedInterface, InterfaceMode, InterfaceRequest, NetError, NetworkConfig,
    NetworkManager,
};
use crate::agent::state::{ExitRecord, Phase, SpecRecord, StateError, StateStore, StatusRecord};
use crate::agent::vmm::{
    API_TIMEOUT, GuestExit, VmConfig, VmmBackend, VmmError, VmmHandle, process,
};
use crate::api::{Accelerator, Hypervisor};
use crate::error::ErrorReason;
use crate::proto;
use crate::telemetry::MetricsRegistry;

/// How long a killed VMM gets to disappear before the agent SIGKILLs the pid itself.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often a re-adopted VMM (not our child, so no `wait()`) is checked in `/proc`.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// How much console output goes into exit messages and exit classification.
const CONSOLE_TAIL: u64 = 4096;
/// How often console logs are checked against their size cap.
const ROTATE_INTERVAL: Duration = Duration::from_secs(2);
/// Capacity of the event hub; a watcher that falls further behind gets a fresh snapshot.
const HUB_CAPACITY: usize = 4096;
/// The longest one TCP readiness probe may take: a guest whose network is not up yet does not
/// answer ARP, and a connect would otherwise hang for seconds.
const TCP_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Why a VM could not be created or booted. Each variant names the cause; its reason is the
/// word that lands in `ExitInfo.reason`, conditions and metric labels.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum BootError {
    #[error("invalid VM spec: {field} {detail}")]
    InvalidSpec { field: &'static str, detail: String },
    #[error("unknown hypervisor {name:?}: use auto, qemu, firecracker or cloud-hypervisor")]
    UnknownHypervisor { name: String },
    #[error("kernel {path} not found")]
    KernelNotFound {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} cannot be read")]
    KernelUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} not found")]
    InitrdNotFound {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} cannot be read")]
    InitrdUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rootfs {path} cannot be read")]
    RootfsUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM asks for {requested} bytes of memory but the host has {host} in total")]
    InsufficientMemory { requested: u64, host: u64 },
    #[error("hypervisor {hypervisor} is not available on this node ({detail})")]
    HypervisorUnavailable { hypervisor: String, detail: String },
    #[error("the VM requires KVM but this node runs guests with TCG: {detail}")]
    KvmUnavailable { detail: String },
    #[error("{hypervisor} cannot run with accelerator {accelerator}")]
    AcceleratorUnsupported {
        hypervisor: Hypervisor,
        accelerator: Accelerator,
    },
    #[error(
        "guest networking is not available on this agent: interface {interface} asks for mode {mode} ({detail}); use mode none or fix the node"
    )]
    NetworkingUnavailable {
        interface: String,
        mode: String,
        detail: String,
    },
    #[error(
        "readiness on TCP port {port} needs a guest address: give the VM an interface in mode nat, or in mode bridge with an address"
    )]
    ReadinessUnreachable { port: u32 },
    /// The interfaces could not be attached; the reason is the network's own word.
    #[error(transparent)]
    #[strum(transparent)]
    Network(NetError),
    #[error("cannot prepare the VM's state directory")]
    #[strum(transparent)]
    State(#[source] StateError),
    #[error(transparent)]
    #[strum(transparent)]
    Vmm(VmmCall),
}

impl BootError {
    /// Whether the same request will fail the same way again.
    pub fn is_permanent(&self) -> bool {
        match self {
            BootError::State(_) => false,
            BootError::Network(e) => e.is_permanent(),
            BootError::Vmm(call) => call.source.is_permanent(),
            _ => true,
        }
    }

    /// The message with its causes, for a person.
    pub fn full_message(&self) -> String {
        crate::error::chain(self)
    }
}

/// A VMM call that failed while creating or starting a VM; its reason is the VMM error's.
#[derive(Debug, Error)]
#[error("VMM {operation} failed")]
pub struct VmmCall {
    pub operation: &'static str,
    #[source]
    pub source: VmmError,
}

impl From<&VmmCall> for &'static str {
    fn from(call: &VmmCall) -> Self {
        (&call.source).into()
    }
}

/// Errors of the supervisor's API (as opposed to a VM's failure, which is a VM state).
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum SupervisorError {
    #[error("invalid request: {detail}")]
    InvalidRequest { detail: String },
    #[error("no VM {uid} on this agent")]
    NotFound { uid: String },
    #[error("state directory")]
    #[strum(transparent)]
    State(#[source] StateError),
    #[error("console log")]
    #[strum(transparent)]
    Console(#[source] console::ConsoleError),
}

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

/// What `ApplyVM` must do, given what the agent holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyAction {
    /// Nothing changes (same request again, or a stale run).
    Nothing,
    /// Boot the requested run (stopping and clearing whatever ran before).
    Boot,
    /// Record the VM as stopped without booting it (stopping whatever ran before).
    RecordStopped,
    /// Stop the running VM.
    Stop,
    /// Take the new run number without rebooting: the VM is already running.
    AdoptRun,
}

/// The part of a held VM that decides an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldRun {
    pub spec_hash: String,
    pub run: u32,
    pub phase: Phase,
    /// Whether this run ever started a VMM.
    pub booted: bool,
}

/// The convergence rule: idempotent by (uid, spec_hash, run) and desired state.
pub fn decide_apply(
    held: Option<&HeldRun>,
    spec_hash: &str,
    run: u32,
    want_running: bool,
) -> ApplyAction {
    let Some(held) = held else {
        return if want_running {
            ApplyAction::Boot
        } else {
            ApplyAction::RecordStopped
        };
    };
    if held.spec_hash != spec_hash {
        return if want_running {
            ApplyAction::Boot
        } else {
            ApplyAction::RecordStopped
        };
    }
    if run < held.run {
        return ApplyAction::Nothing;
    }
    let active = !held.phase.is_ended();
    if !want_running {
        return if active {
            ApplyAction::Stop
        } else if run > held.run {
            ApplyAction::AdoptRun
        } else {
            ApplyAction::Nothing
        };
    }
    if run == held.run {
        // A run that ended stays ended; only a run recorded as stopped before it ever
        // booted is still owed its boot.
        return if held.phase == Phase::Stopped && !held.booted {
            ApplyAction::Boot
        } else {
            ApplyAction::Nothing
        };
    }
    if active {
        ApplyAction::AdoptRun
    } else {
        ApplyAction::Boot
    }
}

/// What the node offers, for [`plan_boot`].
#[derive(Clone, Debug)]
pub struct PlanEnv {
    pub host_memory_bytes: u64,
    pub accelerator: Accelerator,
    pub accelerator_detail: String,
    /// Backends whose binary is present: kind, and whether it can use KVM / TCG.
    pub available: Vec<(Hypervisor, bool, bool)>,
    /// Backends this agent knows but cannot run, with why.
    pub unavailable: Vec<(Hypervisor, String)>,
    pub simulated: bool,
}

/// A validated boot: which VMM, which accelerator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan {
    pub hypervisor: Hypervisor,
    pub accelerator: Accelerator,
    pub memory_mib: u64,
}

/// Parse the spec's hypervisor word; `None` = auto.
pub fn parse_hypervisor(name: &str) -> Result<Option<Hypervisor>, BootError> {
    match name {
        "" | "auto" => Ok(None),
        "qemu" => Ok(Some(Hypervisor::Qemu)),
        "firecracker" => Ok(Some(Hypervisor::Firecracker)),
        "cloud-hypervisor" => Ok(Some(Hypervisor::CloudHypervisor)),
        "simulated" => Ok(Some(Hypervisor::Simulated)),
        other => Err(BootError::UnknownHypervisor {
            name: other.to_owned(),
        }),
    }
}

/// Validate a spec against the node (files are checked separately by [`check_files`]) and
/// choose the VMM and accelerator.
pub fn plan_boot(spec: &SpecRecord, env: &PlanEnv) -> Result<BootPlan, BootError> {
    let requested = parse_hypervisor(&spec.hypervisor)?;
    if spec.vcpus == 0 {
        return Err(BootError::InvalidSpec {
            field: "vcpus",
            detail: "must be at least 1".into(),
        });
    }
    if spec.memory_bytes == 0 {
        return Err(BootError::InvalidSpec {
            field: "memory_bytes",
            detail: "must be more than 0".into(),
        });
    }
    if spec.memory_bytes > env.host_memory_bytes {
        return Err(BootError::InsufficientMemory {
            requested: spec.memory_bytes,
            host: env.host_memory_bytes,
        });
    }
    let accel_choice = match spec.accelerator.as_str() {
        "" | "auto" => None,
        "kvm" => Some(Accelerator::Kvm),
        "tcg" => Some(Accelerator::Tcg),
        other => {
            return Err(BootError::InvalidSpec {
                field: "accelerator",
                detail: format!("{other:?} is not one of auto, kvm, tcg"),
            });
        }
    };
    if accel_choice == Some(Accelerator::Kvm) && env.accelerator != Accelerator::Kvm {
        return Err(BootError::KvmUnavailable {
            detail: env.accelerator_detail.clone(),
        });
    }
    let find = |kind: Hypervisor| env.available.iter().find(|(k, _, _)| *k == kind).copied();
    let (hypervisor, kvm, tcg) = match requested {
        Some(Hypervisor::Simulated) if !env.simulated => {
            return Err(BootError::HypervisorUnavailable {
                hypervisor: "simulated".into(),
                detail:
                    "the simulated VMM exists for benchmarks only; start the agent with --simulated"
                        .into(),
            });
        }
        Some(kind) => find(kind).ok_or_else(|| BootError::HypervisorUnavailable {
            hypervisor: kind.to_string(),
            detail: env
                .unavailable
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, why)| why.clone())
                .unwrap_or_else(|| "no backend for it in this agent".into()),
        })?,
        None if env.simulated => {
            find(Hypervisor::Simulated).ok_or_else(|| BootError::HypervisorUnavailable {
                hypervisor: "simulated".into(),
                detail: "no simulated backend registered".into(),
            })?
        }
        None => {
            // QEMU first: it is the one that also runs without KVM.
            let usable = |(k, kvm, tcg): &(Hypervisor, bool, bool)| {
                *k != Hypervisor::Simulated
                    && match accel_choice {
                        Some(Accelerator::Kvm) => *kvm,
                        Some(Accelerator::Tcg) => *tcg,
                        None => (*kvm && env.accelerator == Accelerator::Kvm) || *tcg,
                    }
            };
            [
                Hypervisor::Qemu,
                Hypervisor::Firecracker,
                Hypervisor::CloudHypervisor,
            ]
            .into_iter()
            .filter_map(find)
            .find(usable)
            .ok_or_else(|| BootError::HypervisorUnavailable {
                hypervisor: "auto".into(),
                detail: "no VMM on this node can run this VM".into(),
            })?
        }
    };
    let accelerator = match accel_choice {
        Some(Accelerator::Kvm) if kvm => Accelerator::Kvm,
        Some(Accelerator::Tcg) if tcg => Accelerator::Tcg,
        Some(accelerator) => {
            return Err(BootError::AcceleratorUnsupported {
                hypervisor,
                accelerator,
            });
        }
        None if env.accelerator == Accelerator::Kvm && kvm => Accelerator::Kvm,
        None if tcg => Accelerator::Tcg,
        None => {
            return Err(BootError::KvmUnavailable {
                detail: format!(
                    "{hypervisor} needs KVM and this node has none ({})",
                    env.accelerator_detail
                ),
            });
        }
    };
    let requests = interface_requests(spec)?;
    if spec.readiness_tcp_port > u32::from(u16::MAX) {
        return Err(BootError::InvalidSpec {
            field: "readiness.tcpPort",
            detail: format!("{} is not a TCP port (1-65535)", spec.readiness_tcp_port),
        });
    }
    if spec.readiness_tcp_port != 0 && !requests.iter().any(gets_an_address) {
        return Err(BootError::ReadinessUnreachable {
            port: spec.readiness_tcp_port,
        });
    }
    Ok(BootPlan {
        hypervisor,
        accelerator,
        memory_mib: spec.memory_bytes.div_ceil(1 << 20),
    })
}

/// Check that the kernel, initrd and rootfs exist and can be read, before anything is created.
pub fn check_files(spec: &SpecRecord) -> Result<(), BootError> {
    check_readable(&spec.kernel_path).map_err(|(missing, source)| {
        let path = spec.kernel_path.clone();
        if missing {
            BootError::KernelNotFound { path, source }
        } else {
            BootError::KernelUnreadable { path, source }
        }
    })?;
    if !spec.initrd_path.is_empty() {
        check_readable(&spec.initrd_path).map_err(|(missing, source)| {
            let path = spec.initrd_path.clone();
            if missing {
                BootError::InitrdNotFound { path, source }
            } else {
                BootError::InitrdUnreadable { path, source }
            }
        })?;
    }
    if !spec.rootfs_path.is_empty() {
        check_readable(&spec.rootfs_path).map_err(|(_, source)| BootError::RootfsUnreadable {
            path: spec.rootfs_path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Open and read one byte: permission bits alone lie when the agent runs as root.
/// The error says whether the file is missing.
fn check_readable(path: &str) -> Result<(), (bool, std::io::Error)> {
    use std::io::Read;
    if path.is_empty() {
        return Err((
            true,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no path given"),
        ));
    }
    let mut file =
        std::fs::File::open(path).map_err(|e| (e.kind() == std::io::ErrorKind::NotFound, e))?;
    let meta = file.metadata().map_err(|e| (false, e))?;
    if !meta.is_file() {
        return Err((
            false,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let mut byte = [0u8; 1];
    match file.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => Err((
            false,
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file is empty"),
        )),
        Err(e) => Err((false, e)),
    }
}

/// The spec's interfaces as the network module takes them (empty words mean "not given").
pub fn interface_requests(spec: &SpecRecord) -> Result<Vec<InterfaceRequest>, BootError> {
    let given = |s: &str| (!s.is_empty()).then(|| s.to_owned());
    spec.interfaces
        .iter()
        .map(|i| {
            let mode = i
                .mode
                .parse::<InterfaceMode>()
                .map_err(|_| BootError::InvalidSpec {
                    field: "interfaces.mode",
                    detail: format!("{:?} is not one of nat, bridge, none", i.mode),
                })?;
            Ok(InterfaceRequest {
                name: i.name.clone(),
                mode,
                bridge: given(&i.bridge),
                address: given(&i.address),
                mac: given(&i.mac),
            })
        })
        .collect()
}

/// Whether an interface needs a tap (and so the node's networking).
fn needs_tap(request: &InterfaceRequest) -> bool {
    request.mode != InterfaceMode::None
}

/// Whether an interface will carry an address the agent knows (for TCP readiness).
fn gets_an_address(request: &InterfaceRequest) -> bool {
    match request.mode {
        InterfaceMode::Nat => true,
        InterfaceMode::Bridge => request.address.is_some(),
        InterfaceMode::None => false,
    }
}

/// The guest command line: the spec's, then the network's parameters.
pub fn guest_cmdline(spec_cmdline: &str, interfaces: &[AttachedInterface]) -> String {
    let net = net::kernel_cmdline(interfaces);
    match (spec_cmdline.trim().is_empty(), net.is_empty()) {
        (_, true) => spec_cmdline.to_owned(),
        (true, false) => net,
        (false, false) => format!("{} {net}", spec_cmdline.trim_end()),
    }
}

/// The node's guest networking as the supervisor holds it: the manager is made once (at start
/// or on first use); when that fails, why is kept and reported by every VM that needs it.
struct Networking {
    config: Option<NetworkConfig>,
    manager: tokio::sync::OnceCell<Result<Arc<NetworkManager>, String>>,
}

impl Networking {
    fn new(config: Option<NetworkConfig>) -> Self {
        Self {
            config,
            manager: tokio::sync::OnceCell::new(),
        }
    }

    /// The manager, setting the node up on the first call.
    async fn manager(&self) -> Result<Arc<NetworkManager>, String> {
        let Some(config) = &self.config else {
            return Err("guest networking is turned off on this agent".into());
        };
        self.manager
            .get_or_init(|| async {
                match NetworkManager::new(config.clone()).await {
                    Ok(manager) => {
                        tracing::info!(bridge = %config.bridge, cidr = %config.cidr, "guest networking ready");
                        Ok(Arc::new(manager))
                    }
                    Err(error) => {
                        let why = format!(
                            "setting up bridge {} for {} failed: {}",
                            config.bridge,
                            config.cidr,
                            BootError::Network(error).full_message()
                        );
                        tracing::warn!(reason = "NetworkingUnavailable", error = %why, "guest networking unavailable; VMs asking for nat or bridge will fail");
                        Err(why)
                    }
                }
            })
            .await
            .clone()
    }

    /// The manager if it was set up; never sets the node up.
    fn existing(&self) -> Option<Arc<NetworkManager>> {
        self.manager.get().and_then(|m| m.as_ref().ok().cloned())
    }

    /// Whether the state directory holds VM attachments (from an earlier agent).
    fn has_records(&self) -> bool {
        self.config.as_ref().is_some_and(|c| {
            std::fs::read_dir(c.state_dir.join("vms")).is_ok_and(|mut entries| {
                entries.any(|e| e.is_ok_and(|e| e.path().extension().is_some_and(|x| x == "json")))
            })
        })
    }
}

/// An exit as recorded in status: the backend's classification for a VM that was up.
pub fn exit_record(exit: &GuestExit, at_unix_ms: i64) -> ExitRecord {
    ExitRecord {
        success: exit.success,
        reason: exit.reason.as_str().to_owned(),
        message: exit.message.clone(),
        permanent: false,
        exit_code: exit.exit_code.unwrap_or(-1),
        at_unix_ms,
    }
}

fn grace_from_seconds(seconds: i64) -> Duration {
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The agent's metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    vms: Family<Vec<(String, String)>, Gauge>,
    boots: Counter,
    boot_failures: Family<Vec<(String, String)>, Counter>,
    apply_to_ready: Histogram,
}

impl AgentMetrics {
    /// Create and register the agent's metrics.
    pub async fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            vms: Family::default(),
            boots: Counter::default(),
            boot_failures: Family::default(),
            apply_to_ready: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
        };
        let m = metrics.clone();
        registry
            .register(move |r| {
                r.register("agent_vms", "VMs held by this agent, by state", m.vms);
                r.register("agent_boots", "VMM processes started", m.boots);
                r.register(
                    "agent_boot_failures",
                    "VMs that failed to be created or booted, by reason",
                    m.boot_failures,
                );
                r.register(
                    "agent_apply_to_ready_seconds",
                    "Time from ApplyVM to a ready guest",
                    m.apply_to_ready,
                );
            })
            .await;
        metrics
    }

    fn boot_failed(&self, reason: &str) {
        self.boot_failures
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    fn phase_gauge(&self, phase: Phase) -> Gauge {
        self.vms
            .get_or_create(&vec![("state".to_owned(), phase.as_str().to_owned())])
            .clone()
    }
}

/// Sequenced VM events for `WatchVMs`, and the per-state gauge kept in step with them.
struct EventHub {
    tx: broadcast::Sender<proto::VmEvent>,
    state: Mutex<HubState>,
}

#[derive(Default)]
struct HubState {
    sequence: u64,
    phases: HashMap<String, Phase>,
}

impl EventHub {
    fn new() -> Self {
        Self {
            tx: broadcast::channel(HUB_CAPACITY).0,
            state: Mutex::new(HubState::default()),
        }
    }

    fn publish(
        &self,
        event: proto::vm_event::Event,
        uid: &str,
        phase: Option<Phase>,
        metrics: &AgentMetrics,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.sequence += 1;
        let old = match phase {
            Some(phase) => state.phases.insert(uid.to_owned(), phase),
            None => state.phases.remove(uid),
        };
        if old != phase {
            if let Some(old) = old {
                metrics.phase_gauge(old).dec();
            }
            if let Some(new) = phase {
                metrics.phase_gauge(new).inc();
            }
        }
        // No receivers is fine: nobody watches yet.
        let _ = self.tx.send(proto::VmEvent {
            sequence: state.sequence,
            event: Some(event),
        });
    }

    fn subscribe(&self) -> (broadcast::Receiver<proto::VmEvent>, u64) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (self.tx.subscribe(), state.sequence)
    }
}

/// One VM held by the agent.
struct VmSlot {
    uid: String,
    /// Serializes the controller's operations (apply, delete) on this VM.
    op: Arc<tokio::sync::Mutex<()>>,
    rt: Mutex<VmRuntime>,
}

#[derive(Default)]
struct VmRuntime {
    spec: SpecRecord,
    status: StatusRecord,
    run: Option<RunHandle>,
    /// Set once `DeleteVM` took the VM away: no more writes, no more events.
    deleted: bool,
}

/// The VMM process of the current run.
#[derive(Clone)]
struct RunHandle {
    generation: u64,
    backend: Arc<dyn VmmBackend>,
    handle: VmmHandle,
    /// Becomes true when the VMM process has ended.
    exited: watch::Receiver<bool>,
    /// Set by whoever tears the run down (stop, delete, boot timeout, exit).
    stopping: Arc<AtomicBool>,
    /// Ends the run's readiness watcher.
    cancel: CancellationToken,
}

impl VmSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, VmRuntime> {
        self.rt.lock().unwrap_or_else(|p| p.into_inner())
    }
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

impl Inner {
    fn slots(&self) -> Vec<Arc<VmSlot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn slot_or_insert(&self, uid: &str) -> Arc<VmSlot> {
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

    fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::Relaxed)
    }

    /// Change a VM's runtime, persist its status and publish it. `generation` guards updates
    /// from a run's watchers: a watcher of a replaced run changes nothing.
    fn update(
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

    fn backend(&self, kind: Hypervisor) -> Option<&BackendEntry> {
        self.backends.iter().find(|b| b.backend.kind() == kind)
    }

    fn plan_env(&self) -> PlanEnv {
        let mut available = Vec::new();
        let mut unavailable = self.config.unavailable.clone();
        for entry in &self.backends {
            let kind = entry.backend.kind();
            if entry.resolved_binary().is_some() {
                available.push((
                    kind,
                    entry.backend.supports(Accelerator::Kvm),
                    entry.backend.supports(Accelerator::Tcg),
                ));
            } else {
                unavailable.push((kind, format!("binary {} not found", entry.binary.display())));
            }
        }
        PlanEnv {
            host_memory_bytes: self.config.host.memory_bytes,
            accelerator: self.config.accelerator,
            accelerator_detail: self.config.accelerator_detail.clone(),
            available,
            unavailable,
            simulated: self.config.simulated,
        }
    }

    /// Stop the previous run of a slot (if any) and clear its files, before a new run.
    async fn clear_previous(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        let grace = grace_from_seconds(slot.lock().spec.termination_grace_period_seconds);
        Self::stop_run(self, slot, grace).await;
        if let Err(error) = self.store.remove_vm(&slot.uid) {
            tracing::warn!(uid = %slot.uid, error = %error, "cannot clear the previous run's files");
        }
    }

    fn fresh_status(slot: &VmSlot, spec: &SpecRecord, applied_at: i64) -> StatusRecord {
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

    fn record_stopped(&self, slot: &VmSlot, spec: SpecRecord, applied_at: i64) {
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
    fn fail(&self, slot: &VmSlot, generation: Option<u64>, error: &BootError) {
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

    fn fail_with(&self, slot: &VmSlot, generation: Option<u64>, exit: ExitRecord) {
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
    async fn fail_boot(&self, slot: &VmSlot, generation: Option<u64>, error: &BootError) {
        self.release_network(&slot.uid).await;
        self.fail(slot, generation, error);
    }

    /// Attach the VM's interfaces; no taps wanted means no node setup, and whatever an earlier
    /// run of the same uid had is released.
    async fn attach_network(
        &self,
        uid: &str,
        requests: &[InterfaceRequest],
    ) -> Result<Vec<AttachedInterface>, BootError> {
        let Some(first) = requests.iter().find(|r| needs_tap(r)) else {
            self.release_network(uid).await;
            return Ok(Vec::new());
        };
        let manager =
            self.network
                .manager()
                .await
                .map_err(|detail| BootError::NetworkingUnavailable {
                    interface: first.name.clone(),
                    mode: mode_word(first.mode).to_owned(),
                    detail,
                })?;
        manager
            .attach(uid, requests)
            .await
            .map_err(BootError::Network)
    }

    /// Remove the VM's taps and free its addresses, if networking was ever set up. Failures
    /// are logged: the next agent start collects what a VM no longer held left behind.
    async fn release_network(&self, uid: &str) {
        let Some(manager) = self.network.existing() else {
            return;
        };
        if let Err(error) = manager.detach(uid).await {
            tracing::warn!(uid, reason = error.reason(), error = %BootError::Network(error).full_message(), "cannot release the VM's network");
        }
    }

    /// After a failure found by a watcher (not under the operation lock): release the VM's
    /// network under the lock, unless a new run has started meanwhile.
    fn spawn_release_if_failed(self: &Arc<Self>, slot: &Arc<VmSlot>) {
        if self.network.existing().is_none() {
            return;
        }
        let inner = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let _op = slot.op.clone().lock_owned().await;
            let still_failed = {
                let rt = slot.lock();
                !rt.deleted && rt.run.is_none() && rt.status.phase == Phase::Failed
            };
            if still_failed {
                inner.release_network(&slot.uid).await;
            }
        });
    }

    async fn boot(self: &Arc<Self>, slot: &Arc<VmSlot>, spec: SpecRecord, applied_at: i64) {
        let deadline = Instant::now() + self.config.boot_timeout;
        let status = Self::fresh_status(slot, &spec, applied_at);
        {
            let mut rt = slot.lock();
            rt.spec = spec.clone();
            rt.status = status;
            rt.run = None;
        }
        let env = self.plan_env();
        let planned = plan_boot(&spec, &env).and_then(|plan| {
            check_files(&spec)?;
            Ok((plan, interface_requests(&spec)?))
        });
        let (plan, requests) = match planned {
            Ok(planned) => planned,
            Err(error) => return self.fail_boot(slot, None, &error).await,
        };
        let Some(entry) = self.backend(plan.hypervisor).cloned() else {
            return self
                .fail_boot(
                    slot,
                    None,
                    &BootError::HypervisorUnavailable {
                        hypervisor: plan.hypervisor.to_string(),
                        detail: "no backend for it in this agent".into(),
                    },
                )
                .await;
        };
        let dir = match self
            .store
            .create_vm_dir(&spec.uid)
            .and_then(|dir| self.store.write_spec(&spec).map(|()| dir))
        {
            Ok(dir) => dir,
            Err(error) => return self.fail_boot(slot, None, &BootError::State(error)).await,
        };
        // Before the VMM exists: it opens the taps by name. Idempotent for the same uid, so a
        // new run of the VM keeps its taps, MACs and addresses.
        let interfaces = match self.attach_network(&spec.uid, &requests).await {
            Ok(interfaces) => interfaces,
            Err(error) => return self.fail_boot(slot, None, &error).await,
        };
        let ip_addresses = net::ip_addresses(&interfaces);
        if spec.readiness_tcp_port != 0 && ip_addresses.is_empty() {
            let error = BootError::ReadinessUnreachable {
                port: spec.readiness_tcp_port,
            };
            return self.fail_boot(slot, None, &error).await;
        }
        self.update(slot, None, |rt| {
            rt.status.hypervisor = plan.hypervisor.as_str().to_owned();
            rt.status.accelerator = plan.accelerator.as_str().to_owned();
            rt.status.ip_addresses = ip_addresses.clone();
        });
        let config = VmConfig {
            id: spec.uid.clone(),
            vcpus: spec.vcpus,
            memory_mib: plan.memory_mib,
            kernel: PathBuf::from(&spec.kernel_path),
            cmdline: guest_cmdline(&spec.kernel_cmdline, &interfaces),
            initrd: (!spec.initrd_path.is_empty()).then(|| PathBuf::from(&spec.initrd_path)),
            disks: (!spec.rootfs_path.is_empty())
                .then(|| crate::agent::vmm::DiskConfig {
                    id: "rootfs".into(),
                    path: PathBuf::from(&spec.rootfs_path),
                    read_only: spec.rootfs_read_only,
                    root: true,
                })
                .into_iter()
                .collect(),
            nets: interfaces
                .iter()
                .map(AttachedInterface::net_config)
                .collect(),
            user_data: (!spec.user_data.is_empty()).then(|| spec.user_data.clone()),
            accelerator: plan.accelerator,
            state_dir: dir.clone(),
            console_log: dir.join("console.log"),
            api_socket: dir.join("api.sock"),
            binary: entry
                .resolved_binary()
                .unwrap_or_else(|| entry.binary.clone()),
        };
        let backend = entry.backend.clone();
        let created =
            match tokio::time::timeout(self.config.boot_timeout, backend.create(&config)).await {
                Ok(Ok(spawned)) => spawned,
                Ok(Err(source)) => {
                    let error = BootError::Vmm(VmmCall {
                        operation: "create",
                        source,
                    });
                    return self.fail_boot(slot, None, &error).await;
                }
                Err(_) => {
                    let source = VmmError::ApiTimeout {
                        operation: "create".into(),
                        timeout: self.config.boot_timeout,
                    };
                    let error = BootError::Vmm(VmmCall {
                        operation: "create",
                        source,
                    });
                    return self.fail_boot(slot, None, &error).await;
                }
            };
        self.metrics.boots.inc();
        let handle = created.handle.clone();
        if let Err(error) = self.store.write_handle(&spec.uid, &handle) {
            tracing::warn!(uid = %spec.uid, error = %error, "cannot persist the VMM handle");
        }
        let generation = self.next_generation();
        let (exited_tx, exited_rx) = watch::channel(false);
        let run = RunHandle {
            generation,
            backend: backend.clone(),
            handle: handle.clone(),
            exited: exited_rx,
            stopping: Arc::new(AtomicBool::new(false)),
            cancel: CancellationToken::new(),
        };
        let pid = handle.pid;
        self.update(slot, None, |rt| {
            rt.run = Some(run.clone());
            rt.status.pid = pid;
        });
        Self::spawn_child_watcher(self, slot, generation, created.child, exited_tx);
        let started = match tokio::time::timeout(
            API_TIMEOUT + Duration::from_secs(1),
            backend.start(&handle),
        )
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(BootError::Vmm(VmmCall {
                operation: "start",
                source,
            })),
            Err(_) => Err(BootError::Vmm(VmmCall {
                operation: "start",
                source: VmmError::ApiTimeout {
                    operation: "start".into(),
                    timeout: API_TIMEOUT,
                },
            })),
        };
        if let Err(error) = started {
            if !run.stopping.swap(true, Ordering::SeqCst) {
                Self::kill_and_wait(&run).await;
            }
            return self.fail_boot(slot, Some(generation), &error).await;
        }
        let started_at = crate::time::now_unix_ms();
        self.update(slot, Some(generation), |rt| {
            if rt.status.phase == Phase::Creating {
                rt.status.phase = Phase::Starting;
            }
            rt.status.started_at_unix_ms = started_at;
        });
        tracing::info!(uid = %spec.uid, name = %spec.name, pid, hypervisor = %plan.hypervisor, accelerator = %plan.accelerator, "VMM started");
        let readiness = Readiness::of(&spec, plan.hypervisor, &ip_addresses);
        Self::spawn_readiness(self, slot, &run, readiness, config.console_log, deadline);
    }

    /// Reap a VMM that is our child; on its end, record how it ended.
    fn spawn_child_watcher(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        generation: u64,
        mut child: tokio::process::Child,
        exited: watch::Sender<bool>,
    ) {
        let inner = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status.ok(),
                // The agent stops; the VMM keeps running and is re-adopted by the next one.
                _ = inner.shutdown.cancelled() => return,
            };
            let _ = exited.send(true);
            inner.on_exit(&slot, generation, status);
        });
    }

    /// Watch a VMM that is not our child (re-adopted) through `/proc`.
    fn spawn_proc_watcher(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        generation: u64,
        handle: VmmHandle,
        exited: watch::Sender<bool>,
    ) {
        let inner = self.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            loop {
                if !process::is_alive(&handle) {
                    break;
                }
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ADOPTED_POLL) => {}
                }
            }
            let _ = exited.send(true);
            inner.on_exit(&slot, generation, None);
        });
    }

    /// The VMM ended on its own: EXITED if the guest was up, FAILED if it never got ready.
    fn on_exit(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        generation: u64,
        status: Option<std::process::ExitStatus>,
    ) {
        let (run, ready, console_log) = {
            let rt = slot.lock();
            let Some(run) = rt.run.clone() else { return };
            if rt.deleted
                || run.generation != generation
                || run.stopping.swap(true, Ordering::SeqCst)
            {
                // Someone is stopping it on purpose and records the outcome.
                return;
            }
            let console_log = run.handle.console_log.clone();
            (run, rt.status.ready, console_log)
        };
        let tail = console::tail_text(&console_log, CONSOLE_TAIL);
        let exit = run
            .backend
            .classify_exit(&run.handle, status, &tail)
            .seen_ending_unreaped();
        tracing::info!(uid = %slot.uid, reason = %exit.reason, ready, "VMM exited");
        let record = exit_record(&exit, crate::time::now_unix_ms());
        if ready {
            let _ = std::fs::remove_file(&run.handle.api_socket);
            self.update(slot, Some(generation), |rt| {
                if let Some(run) = rt.run.take() {
                    run.cancel.cancel();
                }
                rt.status.phase = Phase::Exited;
                rt.status.ready = false;
                rt.status.exit = Some(record);
            });
        } else {
            self.metrics.boot_failed(exit.reason.as_str());
            self.fail_with(slot, Some(generation), record);
            self.spawn_release_if_failed(slot);
        }
    }

    /// Stop the slot's run: graceful stop, `grace`, kill, SIGKILL. Returns whether a VMM ran.
    async fn stop_run(self: &Arc<Self>, slot: &Arc<VmSlot>, grace: Duration) -> bool {
        let Some(run) = slot.lock().run.clone() else {
            return false;
        };
        let first = !run.stopping.swap(true, Ordering::SeqCst);
        if first {
            self.update(slot, Some(run.generation), |rt| {
                if !rt.status.phase.is_ended() {
                    rt.status.phase = Phase::Stopping;
                }
            });
        }
        run.cancel.cancel();
        let mut exited = run.exited.clone();
        if !Self::has_exited(&run, &mut exited) {
            match tokio::time::timeout(API_TIMEOUT, run.backend.stop(&run.handle)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::info!(uid = %slot.uid, error = %error, "graceful stop refused; will kill")
                }
                Err(_) => {
                    tracing::info!(uid = %slot.uid, "graceful stop did not answer; will kill")
                }
            }
            if !Self::wait_exited(&run, &mut exited, grace).await {
                Self::kill_and_wait(&run).await;
            }
        }
        let _ = std::fs::remove_file(&run.handle.api_socket);
        let mut rt = slot.lock();
        if rt.run.as_ref().map(|r| r.generation) == Some(run.generation) {
            rt.run = None;
        }
        rt.status.pid = 0;
        true
    }

    fn has_exited(run: &RunHandle, exited: &mut watch::Receiver<bool>) -> bool {
        *exited.borrow_and_update() || !process::is_alive(&run.handle)
    }

    async fn wait_exited(
        run: &RunHandle,
        exited: &mut watch::Receiver<bool>,
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if Self::has_exited(run, exited) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Re-check /proc at least every 100 ms: the watcher may be gone (agent stopping).
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(100)), exited.changed()).await;
        }
    }

    /// Kill through the backend, then by pid if the VMM is still there.
    async fn kill_and_wait(run: &RunHandle) {
        let mut exited = run.exited.clone();
        let _ = tokio::time::timeout(API_TIMEOUT, run.backend.kill(&run.handle)).await;
        if Self::wait_exited(run, &mut exited, KILL_WAIT).await {
            return;
        }
        force_kill(&run.handle);
        if !Self::wait_exited(run, &mut exited, KILL_WAIT).await {
            tracing::error!(pid = run.handle.pid, "VMM survived SIGKILL");
        }
    }

    fn spawn_readiness(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        run: &RunHandle,
        readiness: Readiness,
        console_log: PathBuf,
        deadline: Instant,
    ) {
        let inner = self.clone();
        let slot = slot.clone();
        let run = run.clone();
        tokio::spawn(async move {
            let mut exited = run.exited.clone();
            let mut cursor = console::LogCursor::new(&console_log, Some(0));
            let mut scanner = match &readiness {
                Readiness::Marker(marker) => Some(console::MarkerScanner::new(marker)),
                Readiness::Tcp(_) | Readiness::Immediate => None,
            };
            loop {
                let ready = match (&readiness, scanner.as_mut()) {
                    (Readiness::Tcp(addr), _) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        tcp_accepts(*addr, left.min(TCP_PROBE_TIMEOUT)).await
                    }
                    (_, None) => true,
                    (_, Some(scanner)) => match cursor.read_new(1 << 20) {
                        Ok(chunk) => scanner.feed(&chunk),
                        Err(error) => {
                            tracing::warn!(uid = %slot.uid, error = %error, "cannot read the console log");
                            false
                        }
                    },
                };
                if ready {
                    inner.mark_ready(&slot, run.generation);
                    return;
                }
                if Instant::now() >= deadline {
                    inner.boot_timed_out(&slot, &run, &readiness).await;
                    return;
                }
                tokio::select! {
                    _ = run.cancel.cancelled() => return,
                    _ = inner.shutdown.cancelled() => return,
                    changed = exited.changed() => {
                        if changed.is_err() || *exited.borrow() {
                            // The exit watcher records how it ended.
                            return;
                        }
                    }
                    _ = tokio::time::sleep(console::POLL_INTERVAL) => {}
                }
            }
        });
    }

    fn mark_ready(&self, slot: &VmSlot, generation: u64) {
        let now = crate::time::now_unix_ms();
        let mut took = None;
        self.update(slot, Some(generation), |rt| {
            if rt.status.phase != Phase::Starting {
                return;
            }
            let ms = u64::try_from(now - rt.status.applied_at_unix_ms).unwrap_or(0);
            rt.status.phase = Phase::Running;
            rt.status.ready = true;
            rt.status.ready_at_unix_ms = now;
            rt.status.apply_to_ready_ms = ms;
            took = Some(ms);
        });
        if let Some(ms) = took {
            self.metrics.apply_to_ready.observe(ms as f64 / 1000.0);
            tracing::info!(uid = %slot.uid, apply_to_ready_ms = ms, "VM ready");
        }
    }

    async fn boot_timed_out(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        run: &RunHandle,
        readiness: &Readiness,
    ) {
        if run.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        Self::kill_and_wait(run).await;
        let tail = console::tail_text(&run.handle.console_log, 512);
        let what = match readiness {
            Readiness::Marker(marker) => format!("console marker {marker:?} not seen"),
            Readiness::Tcp(addr) => format!("nothing accepted a TCP connection on {addr}"),
            Readiness::Immediate => "no readiness".to_owned(),
        };
        let message = format!(
            "the guest did not become ready within {:?} ({what}); the VMM was killed. Last console output: {}",
            self.config.boot_timeout,
            tail.trim()
        );
        self.metrics.boot_failed("BootTimeout");
        tracing::warn!(uid = %slot.uid, "boot timeout");
        self.fail_with(
            slot,
            Some(run.generation),
            ExitRecord {
                success: false,
                reason: "BootTimeout".into(),
                message,
                permanent: false,
                exit_code: -1,
                at_unix_ms: crate::time::now_unix_ms(),
            },
        );
        self.spawn_release_if_failed(slot);
    }

    async fn adopt_one(self: &Arc<Self>, uid: &str) {
        let status = match self.store.read_status(uid) {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => {
                // A directory without a (valid) status: a crash before the first record.
                if let Ok(Some(handle)) = self.store.read_handle(uid) {
                    force_kill(&handle);
                }
                tracing::warn!(uid, "removing a VM directory without status");
                let _ = self.store.remove_vm(uid);
                return;
            }
        };
        let spec = self
            .store
            .read_spec(uid)
            .ok()
            .flatten()
            .unwrap_or_else(|| SpecRecord {
                uid: status.uid.clone(),
                namespace: status.namespace.clone(),
                name: status.name.clone(),
                spec_hash: status.spec_hash.clone(),
                run: status.run,
                vcpus: status.vcpus,
                memory_bytes: status.memory_bytes,
                ..Default::default()
            });
        let slot = self.slot_or_insert(uid);
        let phase = status.phase;
        {
            let mut rt = slot.lock();
            rt.spec = spec.clone();
            rt.status = status.clone();
        }
        if phase.is_ended() {
            self.update(&slot, None, |_| {});
            return;
        }
        let handle = self.store.read_handle(uid).ok().flatten();
        let backend = parse_hypervisor(&status.hypervisor)
            .ok()
            .flatten()
            .and_then(|kind| self.backend(kind))
            .map(|b| b.backend.clone());
        let Some(handle) = handle else {
            return self.fail_with(
                &slot,
                None,
                lost("the agent stopped before the VMM was started"),
            );
        };
        let Some(backend) = backend else {
            force_kill(&handle);
            return self.fail_with(
                &slot,
                None,
                lost(&format!(
                    "hypervisor {:?} is not available to this agent any more",
                    status.hypervisor
                )),
            );
        };
        if !process::is_alive(&handle) {
            let tail = console::tail_text(&handle.console_log, CONSOLE_TAIL);
            let exit = backend
                .classify_exit(&handle, None, &tail)
                .seen_dead_at_adoption();
            tracing::info!(
                uid,
                reason = %exit.reason,
                "VMM ended while the agent was down"
            );
            let _ = std::fs::remove_file(&handle.api_socket);
            let record = exit_record(&exit, crate::time::now_unix_ms());
            self.update(&slot, None, |rt| {
                rt.status.phase = Phase::Exited;
                rt.status.ready = false;
                rt.status.pid = 0;
                rt.status.exit = Some(record);
            });
            return;
        }
        if phase == Phase::Creating {
            // It never got its start call: it cannot be trusted to be configured.
            force_kill(&handle);
            return self.fail_with(
                &slot,
                None,
                lost("the agent stopped while the VM was being created"),
            );
        }
        let generation = self.next_generation();
        let (exited_tx, exited_rx) = watch::channel(false);
        let run = RunHandle {
            generation,
            backend: backend.clone(),
            handle: handle.clone(),
            exited: exited_rx,
            stopping: Arc::new(AtomicBool::new(false)),
            cancel: CancellationToken::new(),
        };
        self.update(&slot, None, |rt| rt.run = Some(run.clone()));
        tracing::info!(
            uid,
            pid = handle.pid,
            phase = phase.as_str(),
            "re-adopted VMM"
        );
        Self::spawn_proc_watcher(self, &slot, generation, handle.clone(), exited_tx);
        if phase == Phase::Starting {
            let elapsed =
                u64::try_from(crate::time::now_unix_ms() - status.started_at_unix_ms).unwrap_or(0);
            let left = self
                .config
                .boot_timeout
                .saturating_sub(Duration::from_millis(elapsed));
            let kind = parse_hypervisor(&status.hypervisor)
                .ok()
                .flatten()
                .unwrap_or(Hypervisor::Qemu);
            Self::spawn_readiness(
                self,
                &slot,
                &run,
                Readiness::of(&spec, kind, &status.ip_addresses),
                handle.console_log.clone(),
                Instant::now() + left.max(Duration::from_secs(1)),
            );
        }
    }
}

/// The failure recorded for a VM whose run the agent lost track of.
fn lost(message: &str) -> ExitRecord {
    ExitRecord {
        success: false,
        reason: "VmmLost".into(),
        message: message.to_owned(),
        permanent: false,
        exit_code: -1,
        at_unix_ms: crate::time::now_unix_ms(),
    }
}

/// SIGKILL the VMM, only if the handle still names it.
fn force_kill(handle: &VmmHandle) {
    if let Err(error) = process::signal(handle, nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!(pid = handle.pid, %error, "SIGKILL failed");
    }
}

/// The spec's word for a mode, for messages.
fn mode_word(mode: InterfaceMode) -> &'static str {
    match mode {
        InterfaceMode::Nat => "nat",
        InterfaceMode::Bridge => "bridge",
        InterfaceMode::None => "none",
    }
}

/// One bounded TCP readiness probe: does something accept a connection on `addr`?
async fn tcp_accepts(addr: std::net::SocketAddr, within: Duration) -> bool {
    matches!(
        tokio::time::timeout(within, tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

/// When a run counts as ready.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Readiness {
    /// The marker appears on the console.
    Marker(String),
    /// A TCP connection to the guest's first address on the port succeeds.
    Tcp(std::net::SocketAddr),
    /// As soon as the VMM started the guest (no readiness configured, or no guest at all).
    Immediate,
}

impl Readiness {
    /// A TCP port wins over a console marker; without a known guest address (a VM re-adopted
    /// from an agent that did not record one) the marker, or nothing, is used.
    fn of(spec: &SpecRecord, hypervisor: Hypervisor, ip_addresses: &[String]) -> Self {
        if hypervisor == Hypervisor::Simulated {
            return Readiness::Immediate;
        }
        let first_ip = ip_addresses
            .first()
            .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
        if let (Ok(port), Some(ip)) = (u16::try_from(spec.readiness_tcp_port), first_ip)
            && port != 0
        {
            return Readiness::Tcp(std::net::SocketAddr::new(ip, port));
        }
        if spec.readiness_console_marker.is_empty() {
            Readiness::Immediate
        } else {
            Readiness::Marker(spec.readiness_console_marker.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use crate::agent::host;
    use crate::agent::simulated::SimulatedBackend;

    fn held(hash: &str, run: u32, phase: Phase, booted: bool) -> HeldRun {
        HeldRun {
            spec_hash: hash.into(),
            run,
            phase,
            booted,
        }
    }

    #[test]
    fn apply_is_idempotent_by_hash_run_and_desired_state() {
        use ApplyAction::*;
        assert_eq!(decide_apply(None, "h", 1, true), Boot);
        assert_eq!(decide_apply(None, "h", 1, false), RecordStopped);
        let running = held("h", 1, Phase::Running, true);
        assert_eq!(decide_apply(Some(&running), "h", 1, true), Nothing);
        assert_eq!(
            decide_apply(Some(&running), "h2", 1, true),
            Boot,
            "new hash replaces"
        );
        assert_eq!(decide_apply(Some(&running), "h2", 1, false), RecordStopped);
        assert_eq!(decide_apply(Some(&running), "h", 1, false), Stop);
        assert_eq!(
            decide_apply(Some(&running), "h", 2, true),
            AdoptRun,
            "still running: no reboot"
        );
        assert_eq!(
            decide_apply(Some(&running), "h", 0, true),
            Nothing,
            "stale run"
        );
        let exited = held("h", 1, Phase::Exited, true);
        assert_eq!(
            decide_apply(Some(&exited), "h", 1, true),
            Nothing,
            "an ended run stays ended"
        );
        assert_eq!(
            decide_apply(Some(&exited), "h", 2, true),
            Boot,
            "run N+1 boots again"
        );
        assert_eq!(decide_apply(Some(&exited), "h", 2, false), AdoptRun);
        let failed = held("h", 3, Phase::Failed, false);
        assert_eq!(decide_apply(Some(&failed), "h", 3, true), Nothing);
        assert_eq!(decide_apply(Some(&failed), "h", 4, true), Boot);
        let never_booted = held("h", 1, Phase::Stopped, false);
        assert_eq!(decide_apply(Some(&never_booted), "h", 1, true), Boot);
        let stopped = held("h", 1, Phase::Stopped, true);
        assert_eq!(decide_apply(Some(&stopped), "h", 1, true), Nothing);
    }

    fn env(accelerator: Accelerator) -> PlanEnv {
        PlanEnv {
            host_memory_bytes: 8 << 30,
            accelerator,
            accelerator_detail: "probe said so".into(),
            available: vec![
                (Hypervisor::Qemu, true, true),
                (Hypervisor::Firecracker, true, false),
            ],
            unavailable: vec![(
                Hypervisor::CloudHypervisor,
                "binary cloud-hypervisor not found".into(),
            )],
            simulated: false,
        }
    }

    fn spec() -> SpecRecord {
        SpecRecord {
            uid: "u".into(),
            hypervisor: "auto".into(),
            accelerator: "auto".into(),
            vcpus: 1,
            memory_bytes: 256 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn planning_picks_the_vmm_and_accelerator() {
        let plan = plan_boot(&spec(), &env(Accelerator::Tcg)).expect("plan");
        assert_eq!(
            (plan.hypervisor, plan.accelerator, plan.memory_mib),
            (Hypervisor::Qemu, Accelerator::Tcg, 256)
        );
        let plan = plan_boot(&spec(), &env(Accelerator::Kvm)).expect("plan");
        assert_eq!(
            (plan.hypervisor, plan.accelerator),
            (Hypervisor::Qemu, Accelerator::Kvm)
        );
        let fc = SpecRecord {
            hypervisor: "firecracker".into(),
            ..spec()
        };
        assert_eq!(
            plan_boot(&fc, &env(Accelerator::Kvm))
                .expect("fc")
                .accelerator,
            Accelerator::Kvm
        );
        assert_eq!(
            plan_boot(&fc, &env(Accelerator::Tcg))
                .expect_err("no kvm")
                .reason(),
            "KvmUnavailable"
        );
        let fc_tcg = SpecRecord {
            accelerator: "tcg".into(),
            ..fc
        };
        assert_eq!(
            plan_boot(&fc_tcg, &env(Accelerator::Kvm))
                .expect_err("fc tcg")
                .reason(),
            "AcceleratorUnsupported"
        );
    }

    #[test]
    fn planning_refuses_bad_input_with_a_named_cause() {
        let cases = [
            (
                SpecRecord {
                    hypervisor: "xen".into(),
                    ..spec()
                },
                "UnknownHypervisor",
            ),
            (
                SpecRecord {
                    memory_bytes: 9 << 30,
                    ..spec()
                },
                "InsufficientMemory",
            ),
            (
                SpecRecord {
                    memory_bytes: 0,
                    ..spec()
                },
                "InvalidSpec",
            ),
            (
                SpecRecord {
                    accelerator: "kvm".into(),
                    ..spec()
                },
                "KvmUnavailable",
            ),
            (
                SpecRecord {
                    hypervisor: "cloud-hypervisor".into(),
                    ..spec()
                },
                "HypervisorUnavailable",
            ),
            (
                SpecRecord {
                    hypervisor: "simulated".into(),
                    ..spec()
                },
                "HypervisorUnavailable",
            ),
            (
                SpecRecord {
                    readiness_tcp_port: 80,
                    ..spec()
                },
                "ReadinessUnreachable",
            ),
            (
                SpecRecord {
                    readiness_tcp_port: 80,
                    interfaces: vec![iface("eth0", "none", ""), iface("eth1", "bridge", "")],
                    ..spec()
                },
                "ReadinessUnreachable",
            ),
            (
                SpecRecord {
                    readiness_tcp_port: 70000,
                    interfaces: vec![iface("eth0", "nat", "")],
                    ..spec()
                },
                "InvalidSpec",
            ),
            (
                SpecRecord {
                    interfaces: vec![iface("eth0", "macvtap", "")],
                    ..spec()
                },
                "InvalidSpec",
            ),
        ];
        for (spec, reason) in cases {
            let error = plan_boot(&spec, &env(Accelerator::Tcg)).expect_err(reason);
            assert_eq!(error.reason(), reason, "{error}");
            assert!(error.is_permanent());
        }
        let unavailable = plan_boot(
            &SpecRecord {
                hypervisor: "cloud-hypervisor".into(),
                ..spec()
            },
            &env(Accelerator::Tcg),
        )
        .expect_err("ch");
        assert!(
            unavailable
                .to_string()
                .contains("binary cloud-hypervisor not found")
        );
    }

    fn iface(name: &str, mode: &str, address: &str) -> crate::agent::state::InterfaceRecord {
        crate::agent::state::InterfaceRecord {
            name: name.into(),
            mode: mode.into(),
            address: address.into(),
            ..Default::default()
        }
    }

    #[test]
    fn networked_specs_plan_and_convert() {
        let nat = SpecRecord {
            readiness_tcp_port: 80,
            interfaces: vec![iface("eth0", "nat", "")],
            ..spec()
        };
        assert!(plan_boot(&nat, &env(Accelerator::Tcg)).is_ok());
        let bridged = SpecRecord {
            readiness_tcp_port: 8080,
            interfaces: vec![
                iface("eth0", "none", ""),
                crate::agent::state::InterfaceRecord {
                    bridge: "br-lan".into(),
                    ..iface("eth1", "bridge", "192.168.1.20/24")
                },
            ],
            ..spec()
        };
        assert!(plan_boot(&bridged, &env(Accelerator::Tcg)).is_ok());
        let requests = interface_requests(&bridged).expect("requests");
        assert_eq!(
            requests,
            vec![
                InterfaceRequest {
                    name: "eth0".into(),
                    mode: InterfaceMode::None,
                    ..Default::default()
                },
                InterfaceRequest {
                    name: "eth1".into(),
                    mode: InterfaceMode::Bridge,
                    bridge: Some("br-lan".into()),
                    address: Some("192.168.1.20/24".into()),
                    mac: None,
                },
            ]
        );
        assert!(!needs_tap(&requests[0]) && needs_tap(&requests[1]));
        assert_eq!(
            interface_requests(&SpecRecord {
                interfaces: vec![iface("eth0", "", "")],
                ..spec()
            })
            .expect("default")[0]
                .mode,
            InterfaceMode::Nat,
            "an empty mode is nat"
        );
    }

    #[test]
    fn the_guest_cmdline_gets_the_network_parameters() {
        let eth0 = AttachedInterface {
            name: "eth0".into(),
            mode: InterfaceMode::Nat,
            tap: "igabc".into(),
            mac: "02:00:00:00:00:01".into(),
            bridge: "ignis0".into(),
            address: Some(("10.88.0.5".parse().expect("ip"), 16)),
            gateway: Some("10.88.0.1".parse().expect("gw")),
        };
        assert_eq!(
            guest_cmdline("console=ttyS0 quiet ", std::slice::from_ref(&eth0)),
            "console=ttyS0 quiet ignis.ip=10.88.0.5/16 ignis.gw=10.88.0.1"
        );
        assert_eq!(
            guest_cmdline("", std::slice::from_ref(&eth0)),
            "ignis.ip=10.88.0.5/16 ignis.gw=10.88.0.1"
        );
        assert_eq!(guest_cmdline("console=ttyS0", &[]), "console=ttyS0");
    }

    #[test]
    fn readiness_prefers_the_tcp_port_on_the_first_address() {
        let marker = SpecRecord {
            readiness_console_marker: "ready".into(),
            ..spec()
        };
        let ips = vec!["10.88.0.7".to_string(), "192.168.1.4".to_string()];
        assert_eq!(
            Readiness::of(&marker, Hypervisor::Qemu, &ips),
            Readiness::Marker("ready".into())
        );
        let tcp = SpecRecord {
            readiness_tcp_port: 80,
            ..marker.clone()
        };
        assert_eq!(
            Readiness::of(&tcp, Hypervisor::Qemu, &ips),
            Readiness::Tcp("10.88.0.7:80".parse().expect("addr"))
        );
        assert_eq!(
            Readiness::of(&tcp, Hypervisor::Qemu, &[]),
            Readiness::Marker("ready".into()),
            "no recorded address: the marker"
        );
        assert_eq!(
            Readiness::of(&tcp, Hypervisor::Simulated, &ips),
            Readiness::Immediate
        );
        assert_eq!(
            Readiness::of(&spec(), Hypervisor::Qemu, &[]),
            Readiness::Immediate
        );
    }

    #[tokio::test]
    async fn tcp_probes_are_bounded() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr");
        assert!(tcp_accepts(open, Duration::from_secs(2)).await);
        drop(listener);
        assert!(!tcp_accepts(open, Duration::from_secs(2)).await, "closed");
        // TEST-NET-1 is never routed: the probe gives up at its bound instead of hanging.
        let started = Instant::now();
        assert!(
            !tcp_accepts(
                "192.0.2.1:80".parse().expect("addr"),
                Duration::from_millis(300)
            )
            .await
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn networking_turned_off_fails_nat_but_not_none() {
        let tmp = tempfile::tempdir().expect("tmp");
        let kernel = tmp.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("kernel");
        let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
        let mut nat = request("n", &kernel, "h", 1, proto::DesiredState::Running);
        if let Some(spec) = nat.spec.as_mut() {
            spec.interfaces = vec![proto::NetworkInterface {
                name: "eth0".into(),
                mode: "nat".into(),
                ..Default::default()
            }];
        }
        let vm = sup.apply(nat).await.expect("apply");
        let exit = vm.exit.expect("failed");
        assert_eq!(exit.reason, "NetworkingUnavailable");
        assert!(exit.permanent);
        assert!(exit.message.contains("turned off"), "{}", exit.message);
        let mut none = request("o", &kernel, "h", 1, proto::DesiredState::Running);
        if let Some(spec) = none.spec.as_mut() {
            spec.interfaces = vec![proto::NetworkInterface {
                name: "eth0".into(),
                mode: "none".into(),
                ..Default::default()
            }];
        }
        sup.apply(none).await.expect("apply");
        assert!(
            wait_state(&sup, "o", proto::VmState::Running)
                .await
                .ip_addresses
                .is_empty()
        );
        sup.shutdown(false).await;
    }

    #[test]
    fn file_checks_tell_missing_from_unreadable() {
        let tmp = tempfile::tempdir().expect("tmp");
        let kernel = tmp.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("kernel");
        let ok = SpecRecord {
            kernel_path: kernel.display().to_string(),
            ..spec()
        };
        assert!(check_files(&ok).is_ok());
        let missing = SpecRecord {
            kernel_path: "/nope".into(),
            ..spec()
        };
        assert_eq!(
            check_files(&missing).expect_err("missing").reason(),
            "KernelNotFound"
        );
        let dir_initrd = SpecRecord {
            initrd_path: tmp.path().display().to_string(),
            ..ok.clone()
        };
        assert_eq!(
            check_files(&dir_initrd).expect_err("dir").reason(),
            "InitrdUnreadable"
        );
        let empty = tmp.path().join("empty");
        std::fs::write(&empty, b"").expect("empty");
        let empty_initrd = SpecRecord {
            initrd_path: empty.display().to_string(),
            ..ok
        };
        assert_eq!(
            check_files(&empty_initrd).expect_err("empty").reason(),
            "InitrdUnreadable"
        );
    }

    /// A unit-test double: a `sleep` process that claims to be QEMU and never prints a
    /// console marker, to drive the boot deadline.
    struct SilentQemu(SimulatedBackend);

    #[async_trait::async_trait]
    impl VmmBackend for SilentQemu {
        fn kind(&self) -> Hypervisor {
            Hypervisor::Qemu
        }
        fn supports(&self, _: Accelerator) -> bool {
            true
        }
        async fn create(&self, config: &VmConfig) -> Result<crate::agent::vmm::Spawned, VmmError> {
            self.0.create(config).await
        }
        async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError> {
            self.0.start(handle).await
        }
        async fn stop(&self, _: &VmmHandle) -> Result<(), VmmError> {
            // A guest that ignores the power button: only kill ends it.
            Ok(())
        }
        async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
            self.0.kill(handle).await
        }
        async fn state(&self, handle: &VmmHandle) -> Result<crate::agent::vmm::VmmState, VmmError> {
            self.0.state(handle).await
        }
        fn exit_quirks(&self) -> &'static crate::agent::vmm::ExitQuirks {
            self.0.exit_quirks()
        }
    }

    async fn supervisor(dir: &Path, backend: Arc<dyn VmmBackend>, simulated: bool) -> Supervisor {
        Supervisor::new(
            SupervisorConfig {
                boot_timeout: Duration::from_millis(400),
                console_max_bytes: 1 << 20,
                host: HostCapacity {
                    vcpus: 4,
                    memory_bytes: 8 << 30,
                },
                accelerator: Accelerator::Tcg,
                accelerator_detail: "test".into(),
                simulated,
                unavailable: Vec::new(),
                network: None,
            },
            StateStore::open(dir).expect("store"),
            vec![BackendEntry {
                backend,
                binary: PathBuf::from("sleep"),
            }],
            AgentMetrics::register(&MetricsRegistry::with_prefix("test")).await,
        )
    }

    fn request(
        uid: &str,
        kernel: &Path,
        hash: &str,
        run: u32,
        state: proto::DesiredState,
    ) -> proto::ApplyVmRequest {
        proto::ApplyVmRequest {
            spec: Some(proto::VmSpec {
                uid: uid.into(),
                hypervisor: "auto".into(),
                accelerator: "auto".into(),
                vcpus: 1,
                memory_bytes: 64 << 20,
                kernel_path: kernel.display().to_string(),
                readiness_console_marker: "ignis: ready".into(),
                termination_grace_period_seconds: 0,
                ..Default::default()
            }),
            spec_hash: hash.into(),
            run,
            desired_state: state as i32,
        }
    }

    async fn wait_state(sup: &Supervisor, uid: &str, state: proto::VmState) -> proto::Vm {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(vm) = sup.get(uid)
                && vm.state() == state
            {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "{uid} never reached {state:?}: {:?}",
                sup.get(uid)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn simulated_vms_converge_replace_stop_and_delete() {
        let tmp = tempfile::tempdir().expect("tmp");
        let kernel = tmp.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("kernel");
        let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
        let (mut events, _) = sup.subscribe();
        let vm = sup
            .apply(request("a", &kernel, "h1", 1, proto::DesiredState::Running))
            .await
            .expect("apply");
        assert_eq!(vm.hypervisor, "simulated");
        let first = wait_state(&sup, "a", proto::VmState::Running).await;
        assert!(first.ready && first.pid > 0);
        assert!(events.try_recv().is_ok(), "changes are published");

        let same = sup
            .apply(request("a", &kernel, "h1", 1, proto::DesiredState::Running))
            .await
            .expect("again");
        assert_eq!(same.pid, first.pid, "same request, same VM");

        sup.apply(request("a", &kernel, "h2", 1, proto::DesiredState::Running))
            .await
            .expect("replace");
        let second = wait_state(&sup, "a", proto::VmState::Running).await;
        assert_ne!(second.pid, first.pid, "a new hash replaces the VMM");
        assert!(
            !host::is_same_live_process(first.pid, 0)
                || host::proc_stat(first.pid).is_none_or(|s| s.state == 'Z')
        );

        let stopped = sup
            .apply(request("a", &kernel, "h2", 1, proto::DesiredState::Stopped))
            .await
            .expect("stop");
        assert_eq!(stopped.state(), proto::VmState::Stopped);
        assert_eq!(
            sup.usage(),
            (1, 64 << 20),
            "a stopped VM still holds its reservation"
        );

        assert!(sup.delete("a", Some(Duration::ZERO)).await.expect("delete"));
        assert!(!sup.delete("a", None).await.expect("delete twice"));
        assert!(!tmp.path().join("vms/a").exists());
        assert_eq!(sup.usage(), (0, 0));
        sup.shutdown(false).await;
    }

    #[tokio::test]
    async fn a_guest_that_never_gets_ready_fails_with_boot_timeout_and_is_killed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let kernel = tmp.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").expect("kernel");
        let sup = supervisor(
            tmp.path(),
            Arc::new(SilentQemu(SimulatedBackend::default())),
            false,
        )
        .await;
        let vm = sup
            .apply(request(
                "slow",
                &kernel,
                "h",
                1,
                proto::DesiredState::Running,
            ))
            .await
            .expect("apply");
        assert_eq!(vm.state(), proto::VmState::Starting);
        let pid = vm.pid;
        let failed = wait_state(&sup, "slow", proto::VmState::Failed).await;
        let exit = failed.exit.expect("exit");
        assert_eq!(exit.reason, "BootTimeout");
        assert!(!exit.permanent);
        let deadline = Instant::now() + Duration::from_secs(5);
        while host::proc_stat(pid).is_some_and(|s| s.state != 'Z') {
            assert!(Instant::now() < deadline, "the VMM was not killed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left: Vec<_> = std::fs::read_dir(tmp.path().join("vms/slow"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("status.json")]);

        // Run 2 boots again (the controller's restart), and a re-adopting supervisor on the
        // same directory finds the failure recorded.
        let again = sup
            .apply(request(
                "slow",
                &kernel,
                "h",
                2,
                proto::DesiredState::Running,
            ))
            .await
            .expect("run 2");
        assert_eq!(again.state(), proto::VmState::Starting);
        assert_ne!(again.pid, pid);
        wait_state(&sup, "slow", proto::VmState::Failed).await;
        sup.shutdown(false).await;
        let next = supervisor(
            tmp.path(),
            Arc::new(SilentQemu(SimulatedBackend::default())),
            false,
        )
        .await;
        assert_eq!(next.adopt().await.expect("adopt"), 1);
        assert_eq!(
            next.get("slow").expect("held").state(),
            proto::VmState::Failed
        );
        next.shutdown(false).await;
    }
}
