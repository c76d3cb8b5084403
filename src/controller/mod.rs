//! `ignis controller`: the reconcile loop of DESIGN.md section 2. A kube-runtime
//! `Controller<MicroVM>` whose reconcile observes (object, agent view, placement), decides with
//! the pure [`plan::plan`], and acts (metadata patch, agent calls, status apply, Events).
//! Agent `WatchVMs` streams trigger reconciles, so a VM that changes is noticed at once.

pub mod agents;
pub mod discovery;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod scheduler;
pub mod status;
pub mod tls;
pub mod vmspec;

#[cfg(test)]
mod api_tests;
#[cfg(test)]
pub(crate) mod fixtures;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;

use self::agents::{AgentEndpoint, AgentError, AgentPool, PoolSignal};
use self::metrics::ControllerMetrics;
use self::plan::{Action, EventKind, Observed, SpecProblem, placed_node};
use self::scheduler::{Candidate, PlacementRequest, PlacementStrategy};
use crate::api::{FIELD_MANAGER, MicroVM, Phase};
use crate::error::ErrorReason;
use crate::proto;
use crate::telemetry::{MetricsRegistry, Readiness};

/// Flags of `ignis controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Watch MicroVMs in this namespace only (default: all namespaces).
    #[arg(long, env = "IGNIS_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// How new VMs are spread over nodes.
    #[arg(long, env = "IGNIS_PLACEMENT", value_enum, default_value_t = PlacementStrategy::Spread)]
    pub placement: PlacementStrategy,
    /// Port the agents listen on (host network, discovered from the agent pods).
    #[arg(long, env = "IGNIS_AGENT_PORT", default_value_t = 9443)]
    pub agent_port: u16,
    /// Namespace of the agent pods (default: all namespaces).
    #[arg(long, env = "IGNIS_AGENT_NAMESPACE")]
    pub agent_namespace: Option<String>,
    /// A static agent, NODE=unix:///path or NODE=host:port; disables pod discovery. Repeatable.
    #[arg(
        long = "agent-endpoint",
        env = "IGNIS_AGENT_ENDPOINTS",
        value_delimiter = ','
    )]
    pub agent_endpoints: Vec<String>,
    /// Secret holding the CA and certificates for agent mTLS; created when missing.
    #[arg(long, env = "IGNIS_TLS_SECRET", default_value = "ignis-agent-tls")]
    pub tls_secret: String,
    /// Namespace of the TLS Secret and the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ignis-system")]
    pub system_namespace: String,
    /// Talk to TCP agents without TLS (testing only).
    #[arg(long, env = "IGNIS_INSECURE_AGENTS")]
    pub insecure_agents: bool,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "IGNIS_HEALTH_ADDR", default_value = "0.0.0.0:9440")]
    pub health_addr: SocketAddr,
    /// Leader election.
    #[command(flatten)]
    pub leader: Box<LeaderArgs>,
    /// How long an agent may be unreachable before its VMs turn Ready=Unknown (e.g. 10s).
    #[arg(long, env = "IGNIS_AGENT_LOST_GRACE", default_value = "10s", value_parser = crate::time::parse_duration)]
    pub agent_lost_grace: Duration,
}

/// Leader election flags of `ignis controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaderArgs {
    /// Elect a leader through a Lease so only one replica reconciles.
    #[arg(long, env = "IGNIS_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(long, env = "IGNIS_LEASE_NAME", default_value = "ignis-controller")]
    pub lease_name: String,
    /// Namespace of the Lease (default: --system-namespace).
    #[arg(long, env = "IGNIS_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a leader holds the Lease without renewing (e.g. 15s).
    #[arg(long, env = "IGNIS_LEASE_DURATION", default_value = "15s", value_parser = crate::time::parse_duration)]
    pub lease_duration: Duration,
}

/// Errors of `ignis controller`.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum ControllerError {
    #[error("cannot create a Kubernetes client")]
    #[strum(serialize = "KubeClient")]
    Client(#[source] kube::Error),
    #[error("cannot start the health server")]
    Telemetry(#[source] crate::telemetry::TelemetryError),
    #[error("bad --agent-endpoint {0:?}: expected NODE=unix:///path or NODE=host:port")]
    BadEndpoint(String),
    #[error("cannot set up agent TLS")]
    Tls(#[source] tls::TlsError),
    #[error("leadership lost; exiting so a fresh replica can stand by")]
    LostLeadership,
    #[error("the controller task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Failures of one reconcile; all retried with back-off, except a [`Conflict`] (see
/// `error_policy`).
///
/// [`Conflict`]: ReconcileError::Conflict
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum ReconcileError {
    #[error("MicroVM has no namespace")]
    NoNamespace,
    /// 409: the object changed since the cache saw it.
    #[error("Kubernetes API call failed")]
    Conflict(#[source] kube::Error),
    /// 422: the API server refused what we wrote.
    #[error("Kubernetes API call failed")]
    Invalid(#[source] kube::Error),
    #[error("Kubernetes API call failed")]
    #[strum(serialize = "KubeApi")]
    Kube(#[source] kube::Error),
    #[error("agent call failed")]
    #[strum(transparent)]
    Agent(#[source] AgentError),
}

impl ReconcileError {
    /// A failed Kubernetes API call, classified by its status code.
    fn kube(error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(s) if s.code == 409 => ReconcileError::Conflict(error),
            kube::Error::Api(s) if s.code == 422 => ReconcileError::Invalid(error),
            _ => ReconcileError::Kube(error),
        }
    }
}

/// Where pod discovery looks for agents.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    pub namespace: Option<String>,
    pub port: u16,
}

/// Everything `start` needs; `ignis dev` and tests build it directly.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    pub placement: PlacementStrategy,
    /// Static agents (node name → endpoint); used when `discovery` is `None`.
    pub static_agents: BTreeMap<String, AgentEndpoint>,
    /// Discover agents from their pods (cluster mode).
    pub discovery: Option<DiscoveryConfig>,
    /// Client TLS for TCP agents.
    pub tls: Option<ClientTlsConfig>,
    pub agent_lost_grace: Duration,
    /// A stream silent this long (no heartbeat) counts as broken.
    pub heartbeat_timeout: Duration,
    /// How long a VM no MicroVM owns may live on an agent.
    pub drift_grace: Duration,
    pub metrics: MetricsRegistry,
    /// Reporting instance for Events (the pod name in a cluster).
    pub instance: Option<String>,
}

impl ControllerConfig {
    /// `ignis dev` / tests: static unix-socket agents, no discovery, no TLS.
    pub fn with_unix_agents(agents: BTreeMap<String, std::path::PathBuf>) -> Self {
        Self {
            namespace: None,
            placement: PlacementStrategy::Spread,
            static_agents: agents
                .into_iter()
                .map(|(n, p)| (n, AgentEndpoint::Unix(p)))
                .collect(),
            discovery: None,
            tls: None,
            agent_lost_grace: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            drift_grace: Duration::from_secs(30),
            metrics: MetricsRegistry::with_prefix("ignis"),
            instance: None,
        }
    }
}

/// A running controller.
pub struct ControllerHandle {
    pub pool: AgentPool,
    pub metrics: ControllerMetrics,
    task: tokio::task::JoinHandle<()>,
}

impl ControllerHandle {
    /// Wait for the controller to stop (after its shutdown token is cancelled).
    pub async fn wait(self) -> Result<(), ControllerError> {
        self.task.await.map_err(ControllerError::Task)
    }
}

struct Reservation {
    node: String,
    vcpus: u32,
    memory: u64,
}

struct Context {
    client: Client,
    pool: AgentPool,
    store: Store<MicroVM>,
    recorder: Recorder,
    metrics: ControllerMetrics,
    strategy: PlacementStrategy,
    nodes: NodeLabels,
    /// Placements made but not yet visible in the cache; serialized so two reconciles cannot
    /// both take the last slot of a node.
    placing: tokio::sync::Mutex<HashMap<String, Reservation>>,
    failures: Mutex<HashMap<String, u32>>,
}

/// Node labels with a short cache: placement asks for every candidate on every placement.
struct NodeLabels {
    api: Api<Node>,
    cache: Mutex<HashMap<String, (Instant, Option<Labels>)>>,
}

type Labels = BTreeMap<String, String>;

const NODE_LABELS_TTL: Duration = Duration::from_secs(30);

impl NodeLabels {
    /// The node's labels; a node the API does not know (the dev server has no Node objects)
    /// gets just its hostname label; `None` when the API could not say.
    async fn get(&self, node: &str) -> Option<BTreeMap<String, String>> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, labels)) = cache.get(node)
            && at.elapsed() < NODE_LABELS_TTL
        {
            return labels.clone();
        }
        let fetched = tokio::time::timeout(Duration::from_secs(5), self.api.get_opt(node)).await;
        let labels = match fetched {
            Ok(Ok(Some(n))) => Some(n.metadata.labels.unwrap_or_default()),
            Ok(Ok(None)) | Ok(Err(kube::Error::Api(_))) => Some(BTreeMap::from([(
                "kubernetes.io/hostname".to_string(),
                node.to_string(),
            )])),
            Ok(Err(error)) => {
                tracing::debug!(%node, %error, "cannot read node labels");
                None
            }
            Err(_) => None,
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(node.to_string(), (Instant::now(), labels.clone()));
        }
        labels
    }
}

/// Start the controller: agent pool, MicroVM watch, reconcile loop, drift repair. Needs only
/// the MicroVM resource (plus Nodes read for labels, Pods only with discovery, Events written).
pub async fn start(
    client: Client,
    config: ControllerConfig,
    shutdown: CancellationToken,
) -> Result<ControllerHandle, ControllerError> {
    let metrics = ControllerMetrics::register(&config.metrics).await;
    let (pool, mut signals) = AgentPool::new(
        config.agent_lost_grace,
        config.heartbeat_timeout,
        config.tls.clone(),
        shutdown.clone(),
    );
    match &config.discovery {
        None => pool.set_agents(&config.static_agents),
        Some(d) => {
            tokio::spawn(discovery::watch_agent_pods(
                client.clone(),
                d.namespace.clone(),
                d.port,
                pool.clone(),
                shutdown.clone(),
            ));
        }
    }
    let api: Api<MicroVM> = match &config.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    // Bounded concurrency: every reconcile in flight holds an API connection and its buffers,
    // so an unbounded burst (1 000 new objects) would cost tens of MiB for no throughput gain
    // on a 2-core controller.
    let controller = Controller::new(api, watcher::Config::default()).with_config(
        kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
    );
    let store = controller.store();
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: config.instance.clone(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        pool: pool.clone(),
        store: store.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics: metrics.clone(),
        strategy: config.placement,
        nodes: NodeLabels {
            api: Api::all(client.clone()),
            cache: Mutex::new(HashMap::new()),
        },
        placing: tokio::sync::Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });

    // Pool signals → object references for the controller.
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<MicroVM>>();
    {
        let store = store.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let signal = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    s = signals.recv() => s,
                };
                let Some(signal) = signal else { return };
                match signal {
                    PoolSignal::Vm { namespace, name } => {
                        let _ = trigger_tx.send(ObjectRef::new(&name).within(&namespace));
                    }
                    PoolSignal::Node(node) => {
                        for obj in store.state() {
                            let on = placed_node(&obj);
                            if on.is_none() || on.as_deref() == Some(node.as_str()) {
                                let _ = trigger_tx.send(ObjectRef::from_obj(&*obj));
                            }
                        }
                    }
                }
            }
        });
    }

    tokio::spawn(housekeeping(
        ctx.clone(),
        config.drift_grace,
        shutdown.clone(),
    ));

    let run_ctx = ctx.clone();
    let task = tokio::spawn(async move {
        controller
            .reconcile_on(UnboundedReceiverStream::new(trigger_rx))
            .graceful_shutdown_on(shutdown.cancelled_owned())
            .run(reconcile, error_policy, run_ctx)
            .for_each(|result| async move {
                if let Err(error) = result {
                    tracing::debug!(%error, "reconcile failed");
                }
            })
            .await;
        tracing::info!("controller stopped");
    });
    Ok(ControllerHandle {
        pool,
        metrics,
        task,
    })
}

/// `ignis controller`: health server, leader election, TLS, then [`start`] until `shutdown`.
pub async fn run(args: ControllerArgs, shutdown: CancellationToken) -> Result<(), ControllerError> {
    let registry = MetricsRegistry::with_prefix("ignis");
    let readiness = Readiness::default();
    crate::telemetry::spawn_health_server(
        args.health_addr,
        registry.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(ControllerError::Telemetry)?;
    let client = Client::try_default()
        .await
        .map_err(ControllerError::Client)?;

    let mut static_agents = BTreeMap::new();
    for spec in &args.agent_endpoints {
        let (node, endpoint) = spec
            .split_once('=')
            .and_then(|(n, e)| Some((n.to_string(), AgentEndpoint::parse(e)?)))
            .ok_or_else(|| ControllerError::BadEndpoint(spec.clone()))?;
        static_agents.insert(node, endpoint);
    }
    let discovery = static_agents.is_empty().then(|| DiscoveryConfig {
        namespace: args.agent_namespace.clone(),
        port: args.agent_port,
    });
    let needs_tls = !args.insecure_agents
        && (discovery.is_some()
            || static_agents
                .values()
                .any(|e| matches!(e, AgentEndpoint::Tcp { .. })));
    let tls = if needs_tls {
        Some(
            tls::ensure_secret(client.clone(), &args.system_namespace, &args.tls_secret)
                .await
                .map_err(ControllerError::Tls)?,
        )
    } else {
        None
    };
    let identity = std::env::var("POD_NAME")
        .unwrap_or_else(|_| format!("ignis-controller-{}", uuid::Uuid::new_v4()));

    let work = CancellationToken::new();
    let leadership = if args.leader.leader_election {
        let ns = args
            .leader
            .lease_namespace
            .clone()
            .unwrap_or_else(|| args.system_namespace.clone());
        let elector = leader::LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), &ns),
            &args.leader.lease_name,
            &identity,
            args.leader.lease_duration,
        );
        // A standby is healthy and ready: it serves its purpose by waiting.
        readiness.set_ready(true);
        if !elector.acquire(&shutdown).await {
            return Ok(());
        }
        Some(elector.hold())
    } else {
        None
    };

    let config = ControllerConfig {
        namespace: args.namespace.clone(),
        placement: args.placement,
        static_agents,
        discovery,
        tls,
        agent_lost_grace: args.agent_lost_grace,
        heartbeat_timeout: Duration::from_secs(30).max(args.agent_lost_grace),
        drift_grace: Duration::from_secs(30),
        metrics: registry,
        instance: Some(identity),
    };
    let handle = start(client, config, work.clone()).await?;
    readiness.set_ready(true);
    let lost_leadership = match &leadership {
        Some(leadership) => tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = leadership.lost() => true,
        },
        None => {
            shutdown.cancelled().await;
            false
        }
    };
    readiness.set_ready(false);
    work.cancel();
    // Bounded: in-flight reconciles finish, but shutdown never hangs.
    let _ = tokio::time::timeout(Duration::from_secs(30), handle.wait()).await;
    // Only now, with nothing reconciling any more, may a standby take over.
    if let Some(leadership) = leadership {
        leadership.step_down().await;
    }
    if lost_leadership {
        return Err(ControllerError::LostLeadership);
    }
    Ok(())
}

/// Retry delay after `attempt` consecutive failures: 500 ms doubling to 60 s, plus up to 50%
/// jitter so objects that failed together do not retry together.
pub fn retry_delay(attempt: u32) -> Duration {
    let base = Duration::from_millis(500u64 << attempt.min(7)).min(Duration::from_secs(60));
    base.mul_f64(1.0 + rand::random_range(0.0..0.5))
}

fn error_policy(mvm: Arc<MicroVM>, error: &ReconcileError, ctx: Arc<Context>) -> Requeue {
    // A 409 means the cache lagged behind a write (often our own): a newer version exists and
    // its watch event brings a fresh reconcile, so this is neither a failure to back off from
    // nor worth a warning.
    if matches!(error, ReconcileError::Conflict(_)) {
        tracing::debug!(name = %mvm.name_any(), "stale object; reconciling the newer version");
        return Requeue::requeue(CONFLICT_RETRY);
    }
    let uid = mvm.uid().unwrap_or_default();
    let attempt = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(uid).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = retry_delay(attempt - 1);
    tracing::warn!(
        name = %mvm.name_any(),
        reason = error.reason(),
        error = %error,
        retry_in_ms = delay.as_millis() as u64,
        "reconcile failed"
    );
    Requeue::requeue(delay)
}

/// Retry after a 409, in case the newer version's watch event was already consumed.
const CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// Reconciles in flight at once.
const RECONCILE_CONCURRENCY: u16 = 32;

/// The fallback resync when nothing triggers an object.
const RESYNC: Duration = Duration::from_secs(600);

async fn reconcile(mvm: Arc<MicroVM>, ctx: Arc<Context>) -> Result<Requeue, ReconcileError> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_once(&mvm, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            if let (Ok(mut f), Some(uid)) = (ctx.failures.lock(), mvm.uid()) {
                f.remove(&uid);
            }
        }
        Err(error) => ctx.metrics.error(error.reason()),
    }
    result
}

async fn reconcile_once(mvm: &MicroVM, ctx: &Context) -> Result<Requeue, ReconcileError> {
    let built = vmspec::build(mvm);
    let node = placed_node(mvm);
    let deleting = mvm.metadata.deletion_timestamp.is_some();
    let uid = mvm.uid().unwrap_or_default();
    let placement = if node.is_none() && !deleting {
        Some(place(mvm, ctx).await)
    } else {
        None
    };
    let (agent, vm, node_labels) = match &node {
        Some(node) => (
            ctx.pool.link(node),
            ctx.pool.vm(node, &uid),
            // Labels only matter to a live VM (the node-mismatch condition).
            if deleting {
                None
            } else {
                ctx.nodes.get(node).await
            },
        ),
        None => (plan::AgentLink::Absent, None, None),
    };
    let observed = Observed {
        now: jiff::Timestamp::now(),
        spec_hash: built
            .as_ref()
            .map(|b| b.hash.clone())
            .map_err(|e| SpecProblem {
                reason: e.reason(),
                message: e.to_string(),
            }),
        agent,
        vm,
        placement,
        node_labels,
    };
    let actions = plan::plan(mvm, &observed);
    let placed_now = actions.iter().any(|a| matches!(a, Action::Place { .. }));
    let result = act(mvm, actions, built.ok(), ctx).await;
    if placed_now && result.is_err() {
        // The placement was never recorded: give the reserved capacity back.
        ctx.placing.lock().await.remove(&uid);
    }
    result
}

async fn place(mvm: &MicroVM, ctx: &Context) -> Result<String, scheduler::Unschedulable> {
    let uid = mvm.uid().unwrap_or_default();
    let (vcpus, memory) = vmspec::reserved(mvm).unwrap_or((mvm.spec.resources.vcpus, 0));
    let request = PlacementRequest {
        vcpus,
        memory_bytes: memory,
        node_selector: mvm.spec.node_selector.clone().unwrap_or_default(),
        hypervisor: mvm.spec.hypervisor,
        accelerator: mvm.spec.accelerator,
    };
    let mut placing = ctx.placing.lock().await;
    // What the cache says is placed where, and which reservations it has caught up with.
    let mut reserved: HashMap<String, (u32, u64)> = HashMap::new();
    let mut known: HashMap<String, bool> = HashMap::new();
    for obj in ctx.store.state() {
        let node = placed_node(&obj);
        if let Some(id) = obj.uid() {
            known.insert(id, node.is_some());
        }
        if let (Some(node), Some((c, m))) = (node, vmspec::reserved(&obj)) {
            let e = reserved.entry(node).or_default();
            e.0 += c;
            e.1 += m;
        }
    }
    placing.retain(|id, _| id != &uid && known.get(id) == Some(&false));
    for r in placing.values() {
        let e = reserved.entry(r.node.clone()).or_default();
        e.0 += r.vcpus;
        e.1 += r.memory;
    }
    let mut candidates = Vec::new();
    for (node, host) in ctx.pool.hosts() {
        let (c, m) = reserved.get(&node).copied().unwrap_or_default();
        candidates.push(Candidate {
            labels: ctx.nodes.get(&node).await.unwrap_or_default(),
            hypervisors: host.hypervisors.clone(),
            accelerator: host.accelerator.clone(),
            vcpus_total: host.vcpus_total,
            memory_total_bytes: host.memory_total_bytes,
            vcpus_reserved: c.max(host.vcpus_used),
            memory_reserved_bytes: m.max(host.memory_used_bytes),
            node,
        });
    }
    let decision = scheduler::place(&request, &candidates, ctx.strategy);
    match &decision {
        Ok(node) => {
            placing.insert(
                uid,
                Reservation {
                    node: node.clone(),
                    vcpus,
                    memory,
                },
            );
        }
        Err(u) => ctx.metrics.placement_failure(u.constraint.as_str()),
    }
    decision
}

async fn act(
    mvm: &MicroVM,
    actions: Vec<Action>,
    built: Option<vmspec::BuiltSpec>,
    ctx: &Context,
) -> Result<Requeue, ReconcileError> {
    let ns = mvm.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = mvm.name_any();
    let api: Api<MicroVM> = Api::namespaced(ctx.client.clone(), &ns);
    let uid = mvm.uid().unwrap_or_default();

    let add_finalizer = actions.contains(&Action::AddFinalizer);
    let place = actions.iter().find_map(|a| match a {
        Action::Place { node } => Some(node.clone()),
        _ => None,
    });
    if add_finalizer || place.is_some() {
        let patch = status::metadata_patch(mvm, add_finalizer, place.as_deref());
        api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(ReconcileError::kube)?;
    }
    let mut requeue = None;
    for action in actions {
        match action {
            Action::AddFinalizer | Action::Place { .. } => {}
            Action::ApplyVm { node, run, desired } => {
                let Some(built) = built.as_ref() else {
                    continue;
                };
                let request = proto::ApplyVmRequest {
                    spec: Some(built.spec.clone()),
                    spec_hash: built.hash.clone(),
                    run,
                    desired_state: desired as i32,
                };
                ctx.pool
                    .apply_vm(&node, request)
                    .await
                    .map_err(ReconcileError::Agent)?;
            }
            Action::DeleteVm { node } => {
                let grace =
                    Duration::from_secs(mvm.spec.termination_grace_period_seconds.max(0) as u64);
                ctx.pool
                    .delete_vm(&node, &uid, grace)
                    .await
                    .map_err(ReconcileError::Agent)?;
            }
            Action::RemoveFinalizer => {
                if let Some(patch) = status::remove_finalizer_patch(mvm) {
                    match api
                        .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                        .await
                    {
                        Ok(_) => {}
                        // Already gone: the release is done.
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(error) => return Err(ReconcileError::kube(error)),
                    }
                }
            }
            Action::UpdateStatus(new) => {
                let body = status::status_apply_body(&new);
                api.patch_status(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(body),
                )
                .await
                .map_err(ReconcileError::kube)?;
            }
            Action::Event {
                kind,
                reason,
                message,
            } => {
                let event = Event {
                    type_: match kind {
                        EventKind::Normal => EventType::Normal,
                        EventKind::Warning => EventType::Warning,
                    },
                    reason: reason.to_string(),
                    note: Some(message),
                    action: "Reconcile".to_string(),
                    secondary: None,
                };
                // An Event is a courtesy: failing to write one must not fail the reconcile.
                if let Err(error) = ctx.recorder.publish(&event, &mvm.object_ref(&())).await {
                    tracing::debug!(%error, "cannot publish event");
                }
            }
            Action::RequeueAfter(d) => requeue = Some(d),
        }
    }
    Ok(Requeue::requeue(requeue.unwrap_or(RESYNC)))
}

/// Every few seconds: remove VMs no MicroVM owns (after a grace period), and refresh the
/// gauges. Waits for the cache first, or everything would look orphaned.
async fn housekeeping(ctx: Arc<Context>, drift_grace: Duration, shutdown: CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        r = ctx.store.wait_until_ready() => if r.is_err() { return },
    }
    let mut orphans: HashMap<String, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let state = ctx.store.state();
        let owned: HashSet<String> = state.iter().filter_map(|o| o.uid()).collect();
        let mut census: HashMap<Phase, i64> = HashMap::new();
        for obj in &state {
            let phase = obj
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(Phase::Pending);
            *census.entry(phase).or_default() += 1;
        }
        ctx.metrics
            .set_phases(&census.into_iter().collect::<Vec<_>>());
        ctx.metrics
            .agents_connected
            .set(ctx.pool.connected() as i64);

        for (node, uid) in drift_due(&ctx.pool.held_vms(), &owned, &mut orphans, drift_grace) {
            tracing::warn!(%node, %uid, "removing a VM no MicroVM owns (drift repair)");
            ctx.metrics.drift_removed.inc();
            let pool = ctx.pool.clone();
            tokio::spawn(async move {
                if let Err(error) = pool.delete_vm(&node, &uid, Duration::from_secs(30)).await {
                    tracing::warn!(%node, %uid, reason = error.reason(), %error, "drift repair failed");
                }
            });
        }
    }
}

/// Drift repair's decision: which held VMs (`(node, uid)`) no MicroVM owns and have been
/// orphaned for `grace`. `orphans` remembers when each was first seen unowned; entries that
/// became owned or are no longer held are forgotten, and returned VMs are dropped from it.
fn drift_due(
    held: &[(String, String)],
    owned: &HashSet<String>,
    orphans: &mut HashMap<String, Instant>,
    grace: Duration,
) -> Vec<(String, String)> {
    let held_uids: HashSet<&String> = held.iter().map(|(_, u)| u).collect();
    orphans.retain(|uid, _| held_uids.contains(uid) && !owned.contains(uid));
    let mut due = Vec::new();
    for (node, uid) in held {
        if owned.contains(uid) {
            continue;
        }
        let since = *orphans.entry(uid.clone()).or_insert_with(Instant::now);
        if since.elapsed() >= grace {
            orphans.remove(uid);
            due.push((node.clone(), uid.clone()));
        }
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_removes_only_unowned_vms_after_the_grace_period() {
        let held = vec![
            ("node-a".to_string(), "owned".to_string()),
            ("node-a".to_string(), "orphan".to_string()),
        ];
        let owned = HashSet::from(["owned".to_string()]);
        let mut orphans = HashMap::new();
        // First sighting: remembered, not removed yet.
        assert!(drift_due(&held, &owned, &mut orphans, Duration::from_secs(30)).is_empty());
        assert!(orphans.contains_key("orphan"));
        // Seen long enough ago: removed, and forgotten.
        orphans.insert(
            "orphan".to_string(),
            Instant::now() - Duration::from_secs(31),
        );
        assert_eq!(
            drift_due(&held, &owned, &mut orphans, Duration::from_secs(30)),
            vec![("node-a".to_string(), "orphan".to_string())]
        );
        assert!(orphans.is_empty());
        // An orphan whose MicroVM shows up (cache lag) is forgiven.
        drift_due(&held, &owned, &mut orphans, Duration::from_secs(30));
        let owned_now = HashSet::from(["owned".to_string(), "orphan".to_string()]);
        assert!(drift_due(&held, &owned_now, &mut orphans, Duration::ZERO).is_empty());
        assert!(orphans.is_empty());
    }

    #[test]
    fn retry_delay_backs_off_with_bounded_jitter() {
        let first = retry_delay(0);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_millis(750));
        let late = retry_delay(40);
        assert!(late >= Duration::from_secs(60) && late <= Duration::from_secs(90));
    }

    #[test]
    fn args_have_the_documented_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ControllerArgs,
        }
        let cli = Cli::parse_from([
            "ignis",
            "--agent-endpoint",
            "local=unix:///run/ignis/agent.sock",
            "--leader-election",
            "false",
        ]);
        assert_eq!(cli.args.health_addr.to_string(), "0.0.0.0:9440");
        assert_eq!(cli.args.agent_lost_grace, Duration::from_secs(10));
        assert_eq!(cli.args.placement, PlacementStrategy::Spread);
        assert!(!cli.args.leader.leader_election);
        assert_eq!(cli.args.agent_endpoints.len(), 1);
    }
}
