//! The agent pool: one gRPC client per node agent, each with a `WatchVMs` stream that keeps an
//! in-memory view (uid → VM) and turns every change into a reconcile trigger. A broken stream
//! reconnects with back-off; the link state (connected, reconnecting, lost after the grace
//! period) is derived from timestamps when asked, so no timer has to fire for it.
//!
//! This is the controller's gRPC edge: what the agents send is converted to the domain model
//! ([`crate::vm::wire`]) as it arrives, and requests are converted as they leave.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};

use super::decide::AgentLink;
use crate::error::ErrorReason;
use crate::proto::{self, agent_client::AgentClient, vm_event};
use crate::vm::{ApplyRequest, HostInfo, VmStatus, VmUid, wire};

/// Bound on connecting and on each unary call that is not a delete.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the host (capacity) is refreshed while the stream is healthy.
const HOST_REFRESH: Duration = Duration::from_secs(30);

/// Where an agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AgentEndpoint {
    /// `ignis dev` and tests: a unix socket.
    Unix(PathBuf),
    /// In a cluster: pod IP (host network) and port, TLS when the pool has a config.
    Tcp { host: String, port: u16 },
}

impl AgentEndpoint {
    /// Parse `unix:///path` or `host:port`.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        if let Some(path) = s.strip_prefix("unix://") {
            return (!path.is_empty()).then(|| AgentEndpoint::Unix(PathBuf::from(path)));
        }
        let (host, port) = s.rsplit_once(':')?;
        Some(AgentEndpoint::Tcp {
            host: host.trim_matches(['[', ']']).to_string(),
            port: port.parse().ok()?,
        })
    }
}

/// Failures talking to an agent.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum AgentError {
    #[error("no connected agent for node {0}")]
    #[strum(serialize = "AgentNotConnected")]
    NotConnected(String),
    #[error("cannot connect to the agent")]
    #[strum(serialize = "AgentConnect")]
    Connect(#[source] tonic::transport::Error),
    #[error("agent call failed")]
    #[strum(serialize = "AgentRpc")]
    Rpc(#[source] tonic::Status),
    #[error("the agent answered with a VM whose uid is unusable")]
    #[strum(serialize = "AgentAnswer")]
    Answer(#[source] crate::vm::InvalidUid),
    #[error("agent call timed out after {0:?}")]
    #[strum(serialize = "AgentTimeout")]
    Timeout(Duration),
}

/// What the pool asks the controller to reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolSignal {
    /// The VM of this object changed.
    Vm { namespace: String, name: String },
    /// The node's link or capacity changed: its VMs and every unplaced VM.
    Node(String),
}

struct Slot {
    endpoint: AgentEndpoint,
    client: Option<AgentClient<Channel>>,
    /// Set while not connected and synced; the agent counts as lost `grace` after it.
    down_since: Option<Instant>,
    host: Option<HostInfo>,
    vms: HashMap<VmUid, VmStatus>,
    cancel: CancellationToken,
}

struct Inner {
    slots: RwLock<HashMap<String, Slot>>,
    /// When the pool started, and when each node's agent last left it: a node with no agent
    /// counts as absent only `grace` after either. A controller that has just started (its
    /// agent discovery not yet listed) or an agent pod being replaced is not a dead node, and
    /// a MicroVM deleted in that window must still have its VM stopped, not released.
    started: Instant,
    departed: RwLock<HashMap<String, Instant>>,
    signals: mpsc::UnboundedSender<PoolSignal>,
    grace: Duration,
    heartbeat_timeout: Duration,
    /// The latest client TLS config; each new connection takes it.
    tls: Option<AgentTls>,
    shutdown: CancellationToken,
}

/// How the pool dials agents over TCP: the latest client config (renewed while the
/// controller runs) and which name each agent must present.
#[derive(Clone)]
pub struct AgentTls {
    pub(crate) latest: tokio::sync::watch::Receiver<ClientTlsConfig>,
    /// Each agent has its own certificate (CSR mode): verify the name of the node it is
    /// dialed as, so a certificate of another node is refused. Otherwise the shared name.
    pub(crate) per_node: bool,
}

impl AgentTls {
    /// The client config for dialing the agent of `node`.
    pub(crate) fn config_for(&self, node: &str) -> ClientTlsConfig {
        let config = self.latest.borrow().clone();
        if self.per_node {
            config.domain_name(crate::controller::tls::agent_server_name(node))
        } else {
            config
        }
    }
}

/// Clients and live views of every agent.
#[derive(Clone)]
pub struct AgentPool {
    inner: Arc<Inner>,
}

impl AgentPool {
    /// A pool with no agents yet; signals come out of the returned receiver.
    pub fn new(
        grace: Duration,
        heartbeat_timeout: Duration,
        tls: Option<AgentTls>,
        shutdown: CancellationToken,
    ) -> (Self, mpsc::UnboundedReceiver<PoolSignal>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Inner {
            slots: RwLock::new(HashMap::new()),
            started: Instant::now(),
            departed: RwLock::new(HashMap::new()),
            signals: tx,
            grace,
            heartbeat_timeout,
            tls,
            shutdown,
        };
        (
            Self {
                inner: Arc::new(inner),
            },
            rx,
        )
    }

    /// Make the pool talk to exactly these agents: new ones are connected, gone ones dropped,
    /// moved ones reconnected.
    pub(crate) fn set_agents(&self, agents: &BTreeMap<String, AgentEndpoint>) {
        let mut start = Vec::new();
        let mut left = Vec::new();
        {
            let Ok(mut slots) = self.inner.slots.write() else {
                return;
            };
            slots.retain(|node, slot| {
                let keep = agents.get(node) == Some(&slot.endpoint);
                if !keep {
                    left.push(node.clone());
                    slot.cancel.cancel();
                    let _ = self.inner.signals.send(PoolSignal::Node(node.clone()));
                }
                keep
            });
            for (node, endpoint) in agents {
                if slots.contains_key(node) {
                    continue;
                }
                let cancel = self.inner.shutdown.child_token();
                slots.insert(
                    node.clone(),
                    Slot {
                        endpoint: endpoint.clone(),
                        client: None,
                        down_since: Some(Instant::now()),
                        host: None,
                        vms: HashMap::new(),
                        cancel: cancel.clone(),
                    },
                );
                start.push((node.clone(), endpoint.clone(), cancel));
            }
        }
        if let Ok(mut departed) = self.inner.departed.write() {
            let now = Instant::now();
            let grace = self.inner.grace;
            departed
                .retain(|node, at| now.duration_since(*at) < grace && !agents.contains_key(node));
            for node in left {
                if !agents.contains_key(&node) {
                    departed.insert(node, now);
                }
            }
        }
        for (node, endpoint, cancel) in start {
            let inner = self.inner.clone();
            tokio::spawn(async move { agent_loop(inner, node, endpoint, cancel).await });
        }
    }

    /// The link to `node`'s agent now.
    pub(crate) fn link(&self, node: &str) -> AgentLink {
        // A controller that is stopping has dropped its agent streams on purpose: it judges no
        // agent lost (a MicroVM it is deleting keeps its finalizer for the next leader, who
        // stops the VM), as a controller that has just started does not.
        if self.inner.shutdown.is_cancelled() {
            return AgentLink::Reconnecting {
                lost_after: self.inner.grace,
            };
        }
        let Ok(slots) = self.inner.slots.read() else {
            return AgentLink::Absent;
        };
        match slots.get(node) {
            None => {
                let since = self
                    .inner
                    .departed
                    .read()
                    .ok()
                    .and_then(|d| d.get(node).copied())
                    .unwrap_or(self.inner.started);
                self.reconnecting_or(since, AgentLink::Absent)
            }
            Some(slot) => match slot.down_since {
                None => AgentLink::Connected,
                Some(since) => self.reconnecting_or(since, AgentLink::Lost),
            },
        }
    }

    /// `Reconnecting` while the grace counted from `since` lasts, `after` once it is over.
    fn reconnecting_or(&self, since: Instant, after: AgentLink) -> AgentLink {
        match self.inner.grace.checked_sub(since.elapsed()) {
            Some(left) if !left.is_zero() => AgentLink::Reconnecting { lost_after: left },
            _ => after,
        }
    }

    /// The agent's view of one VM.
    pub fn vm(&self, node: &str, uid: &str) -> Option<VmStatus> {
        let slots = self.inner.slots.read().ok()?;
        slots.get(node)?.vms.get(uid).cloned()
    }

    /// Hosts of every connected agent, for the scheduler.
    pub(crate) fn hosts(&self) -> Vec<(String, HostInfo)> {
        let Ok(slots) = self.inner.slots.read() else {
            return Vec::new();
        };
        let mut out: Vec<_> = slots
            .iter()
            .filter(|(_, s)| s.down_since.is_none())
            .filter_map(|(n, s)| s.host.clone().map(|h| (n.clone(), h)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Number of connected agents.
    pub(crate) fn connected(&self) -> usize {
        self.inner
            .slots
            .read()
            .map(|s| s.values().filter(|s| s.down_since.is_none()).count())
            .unwrap_or(0)
    }

    /// `(node, uid)` of every VM the connected agents hold.
    pub(crate) fn held_vms(&self) -> Vec<(String, VmUid)> {
        let Ok(slots) = self.inner.slots.read() else {
            return Vec::new();
        };
        slots
            .iter()
            .filter(|(_, s)| s.down_since.is_none())
            .flat_map(|(n, s)| s.vms.keys().map(move |uid| (n.clone(), uid.clone())))
            .collect()
    }

    /// Connected nodes whose agent holds the VM `uid`.
    pub(crate) fn nodes_holding(&self, uid: &str) -> Vec<String> {
        let Ok(slots) = self.inner.slots.read() else {
            return Vec::new();
        };
        let mut out: Vec<String> = slots
            .iter()
            .filter(|(_, s)| s.down_since.is_none() && s.vms.contains_key(uid))
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    fn client(&self, node: &str) -> Result<AgentClient<Channel>, AgentError> {
        let slots = self
            .inner
            .slots
            .read()
            .map_err(|_| AgentError::NotConnected(node.to_string()))?;
        slots
            .get(node)
            .filter(|s| s.down_since.is_none())
            .and_then(|s| s.client.clone())
            .ok_or_else(|| AgentError::NotConnected(node.to_string()))
    }

    /// `ApplyVM`; an answer about a run the view has not seen yet goes into the view at once,
    /// so the next reconcile does not act on a view older than what it just did.
    pub(crate) async fn apply_vm(
        &self,
        node: &str,
        request: &ApplyRequest,
    ) -> Result<VmStatus, AgentError> {
        let mut client = self.client(node)?;
        let answer = tokio::time::timeout(
            CALL_TIMEOUT,
            client.apply_vm(proto::ApplyVmRequest::from(request)),
        )
        .await
        .map_err(|_| AgentError::Timeout(CALL_TIMEOUT))?
        .map_err(AgentError::Rpc)?
        .into_inner();
        let vm = wire::vm_status(answer).map_err(AgentError::Answer)?;
        self.record(node, vm.clone());
        Ok(vm)
    }

    /// `DeleteVM`, bounded by the VM's grace period plus a margin; forgets the VM after.
    pub(crate) async fn delete_vm(
        &self,
        node: &str,
        uid: &VmUid,
        owner: Option<&VmUid>,
        grace: Duration,
    ) -> Result<bool, AgentError> {
        let mut client = self.client(node)?;
        let limit = grace + CALL_TIMEOUT;
        let existed = tokio::time::timeout(
            limit,
            client.delete_vm(proto::DeleteVmRequest {
                uid: uid.to_string(),
                grace_period_seconds: -1,
                owner_uid: owner.map(ToString::to_string).unwrap_or_default(),
            }),
        )
        .await
        .map_err(|_| AgentError::Timeout(limit))?
        .map_err(AgentError::Rpc)?
        .into_inner()
        .existed;
        if let Ok(mut slots) = self.inner.slots.write()
            && let Some(slot) = slots.get_mut(node)
        {
            slot.vms.remove(uid);
        }
        Ok(existed)
    }

    fn record(&self, node: &str, vm: VmStatus) {
        if let Ok(mut slots) = self.inner.slots.write()
            && let Some(slot) = slots.get_mut(node)
        {
            merge_answer(&mut slot.vms, vm);
        }
    }
}

/// A `WatchVMs` event into the view. The stream is ordered, so within a run its latest event
/// is the truth; only an event about an older run than one we already hold (an ApplyVM answer
/// for the next run raced ahead of it) is stale.
fn merge_event(vms: &mut HashMap<VmUid, VmStatus>, vm: VmStatus) -> bool {
    match vms.get(&vm.uid) {
        Some(old) if old.run > vm.run => false,
        _ => {
            vms.insert(vm.uid.clone(), vm);
            true
        }
    }
}

/// An RPC answer (ApplyVM) into the view. The answer is a snapshot taken somewhere during the
/// call and travels apart from the stream, so it can arrive after events newer than it: a
/// simulated VM is ready milliseconds after ApplyVM, and an answer saying `Starting` that
/// overwrote the stream's `Running` left the MicroVM `Starting` with no event left to correct
/// it. So an answer only fills a gap: a VM the view does not hold yet, or a newer run than the
/// one it holds. Whatever it says about a run the stream already reported, the stream says
/// again, in order.
fn merge_answer(vms: &mut HashMap<VmUid, VmStatus>, vm: VmStatus) -> bool {
    match vms.get(&vm.uid) {
        Some(old) if old.run >= vm.run => false,
        _ => {
            vms.insert(vm.uid.clone(), vm);
            true
        }
    }
}

async fn connect(
    endpoint: &AgentEndpoint,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, AgentError> {
    let keepalive = |e: Endpoint| {
        e.connect_timeout(CALL_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
    };
    match endpoint {
        AgentEndpoint::Unix(path) => {
            let path = path.clone();
            // The URI is only a placeholder: the connector ignores it and dials the socket.
            let e = keepalive(Endpoint::from_static("http://ignis-agent.local"));
            e.connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(AgentError::Connect)
        }
        AgentEndpoint::Tcp { host, port } => {
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            let scheme = if tls.is_some() { "https" } else { "http" };
            let mut e = Endpoint::from_shared(format!("{scheme}://{host}:{port}"))
                .map_err(AgentError::Connect)?;
            if let Some(tls) = tls {
                e = e.tls_config(tls.clone()).map_err(AgentError::Connect)?;
            }
            keepalive(e).connect().await.map_err(AgentError::Connect)
        }
    }
}

async fn agent_loop(
    inner: Arc<Inner>,
    node: String,
    endpoint: AgentEndpoint,
    cancel: CancellationToken,
) {
    let mut failures: u32 = 0;
    loop {
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = session(&inner, &node, &endpoint, &mut failures) => r,
        };
        if let Err(error) = result {
            tracing::warn!(%node, reason = error.reason(), error = %error, "agent stream down");
        }
        mark_down(&inner, &node);
        failures = failures.saturating_add(1);
        let delay = reconnect_delay(failures);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Back-off between reconnects: 200 ms doubling to 5 s, with up to 25% jitter so a restarted
/// controller does not hit every agent in lockstep.
pub(crate) fn reconnect_delay(failures: u32) -> Duration {
    let base = Duration::from_millis(200u64 << failures.min(5)).min(Duration::from_secs(5));
    let jitter = rand::random_range(0.0..0.25);
    base.mul_f64(1.0 + jitter)
}

fn mark_down(inner: &Inner, node: &str) {
    let mut uids = Vec::new();
    if let Ok(mut slots) = inner.slots.write()
        && let Some(slot) = slots.get_mut(node)
    {
        if slot.down_since.is_none() {
            slot.down_since = Some(Instant::now());
            uids = slot
                .vms
                .values()
                .map(|v| (v.namespace.clone(), v.name.clone()))
                .collect();
        }
        slot.client = None;
    }
    for (namespace, name) in uids {
        let _ = inner.signals.send(PoolSignal::Vm { namespace, name });
    }
}

async fn session(
    inner: &Inner,
    node: &str,
    endpoint: &AgentEndpoint,
    failures: &mut u32,
) -> Result<(), AgentError> {
    let tls = inner.tls.as_ref().map(|tls| tls.config_for(node));
    let channel = connect(endpoint, tls.as_ref()).await?;
    let mut client = AgentClient::new(channel);
    let host = wire::host_info(unary(client.get_host(proto::GetHostRequest {})).await?);
    let mut stream = unary(client.watch_v_ms(proto::WatchVMsRequest {})).await?;
    let mut snapshot: HashSet<VmUid> = HashSet::new();
    let mut synced = false;
    let mut host = Some(host);
    let mut refresh = tokio::time::interval(HOST_REFRESH);
    refresh.tick().await;
    loop {
        let next = tokio::select! {
            n = tokio::time::timeout(inner.heartbeat_timeout, stream.message()) => n,
            _ = refresh.tick(), if synced => {
                let fresh = wire::host_info(unary(client.get_host(proto::GetHostRequest {})).await?);
                update_host(inner, node, fresh);
                continue;
            }
        };
        let event = match next {
            Err(_) => return Err(AgentError::Timeout(inner.heartbeat_timeout)),
            Ok(Err(status)) => return Err(AgentError::Rpc(status)),
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(event))) => event,
        };
        match event.event {
            Some(vm_event::Event::Vm(vm)) => {
                let vm = match wire::vm_status(vm) {
                    Ok(vm) => vm,
                    Err(error) => {
                        tracing::warn!(%node, %error, "agent reported a VM with an unusable uid");
                        continue;
                    }
                };
                if !synced {
                    snapshot.insert(vm.uid.clone());
                }
                let who = (vm.namespace.clone(), vm.name.clone());
                let changed = inner
                    .slots
                    .write()
                    .ok()
                    .and_then(|mut slots| slots.get_mut(node).map(|s| merge_event(&mut s.vms, vm)))
                    .unwrap_or(false);
                if changed && synced {
                    let _ = inner.signals.send(PoolSignal::Vm {
                        namespace: who.0,
                        name: who.1,
                    });
                }
            }
            Some(vm_event::Event::Deleted(deleted)) => {
                let gone =
                    inner.slots.write().ok().and_then(|mut slots| {
                        slots.get_mut(node)?.vms.remove(deleted.uid.as_str())
                    });
                if let Some(vm) = gone {
                    let _ = inner.signals.send(PoolSignal::Vm {
                        namespace: vm.namespace,
                        name: vm.name,
                    });
                    // Capacity freed: unplaced VMs may fit now.
                    let _ = inner.signals.send(PoolSignal::Node(node.to_string()));
                }
            }
            Some(vm_event::Event::Heartbeat(_)) | None => {}
            Some(vm_event::Event::Synced(_)) => {
                if synced {
                    continue;
                }
                synced = true;
                *failures = 0;
                let mut stale = Vec::new();
                if let Ok(mut slots) = inner.slots.write()
                    && let Some(slot) = slots.get_mut(node)
                {
                    // VMs we remembered that the agent no longer has are gone.
                    slot.vms.retain(|uid, vm| {
                        let keep = snapshot.contains(uid);
                        if !keep {
                            stale.push((vm.namespace.clone(), vm.name.clone()));
                        }
                        keep
                    });
                    slot.client = Some(client.clone());
                    slot.host = host.take();
                    slot.down_since = None;
                }
                tracing::info!(%node, vms = snapshot.len(), "agent connected and synced");
                for (namespace, name) in stale {
                    let _ = inner.signals.send(PoolSignal::Vm { namespace, name });
                }
                let _ = inner.signals.send(PoolSignal::Node(node.to_string()));
            }
        }
    }
}

fn update_host(inner: &Inner, node: &str, host: HostInfo) {
    if let Ok(mut slots) = inner.slots.write()
        && let Some(slot) = slots.get_mut(node)
    {
        let changed = slot.host.as_ref() != Some(&host);
        slot.host = Some(host);
        if changed {
            let _ = inner.signals.send(PoolSignal::Node(node.to_string()));
        }
    }
}

async fn unary<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, AgentError> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| AgentError::Timeout(CALL_TIMEOUT))?
        .map(tonic::Response::into_inner)
        .map_err(AgentError::Rpc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::RunState;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            AgentEndpoint::parse("unix:///run/ignis/agent.sock"),
            Some(AgentEndpoint::Unix(PathBuf::from("/run/ignis/agent.sock")))
        );
        assert_eq!(
            AgentEndpoint::parse("10.0.0.7:9443"),
            Some(AgentEndpoint::Tcp {
                host: "10.0.0.7".to_string(),
                port: 9443
            })
        );
        assert_eq!(
            AgentEndpoint::parse("[fd00::1]:9443"),
            Some(AgentEndpoint::Tcp {
                host: "fd00::1".to_string(),
                port: 9443
            })
        );
        assert_eq!(AgentEndpoint::parse("unix://"), None);
        assert_eq!(AgentEndpoint::parse("nohost"), None);
    }

    fn vm(run: u32, state: RunState, ready: bool) -> VmStatus {
        VmStatus {
            run,
            state,
            ready,
            ..VmStatus::new(VmUid::new("u").expect("uid"), String::new(), String::new())
        }
    }

    #[test]
    fn stale_runs_do_not_overwrite_newer_ones() {
        use RunState::Running;
        let mut vms = HashMap::new();
        assert!(merge_event(&mut vms, vm(2, Running, true)));
        assert!(!merge_event(&mut vms, vm(1, Running, true)));
        assert!(merge_event(&mut vms, vm(2, Running, true)));
        assert_eq!(vms["u"].run, 2);
    }

    #[test]
    fn a_late_apply_answer_does_not_hide_the_streams_newer_state() {
        use RunState::{Exited, Running, Starting};
        let mut vms = HashMap::new();
        // The stream reported the VM ready before the ApplyVM answer (taken while it was
        // still starting) came back: the answer must not turn it back to Starting.
        assert!(merge_event(&mut vms, vm(0, Running, true)));
        assert!(!merge_answer(&mut vms, vm(0, Starting, false)));
        assert_eq!(vms["u"], vm(0, Running, true));
        // An answer about a VM or a run the stream has not shown yet fills the gap ...
        let mut fresh = HashMap::new();
        assert!(merge_answer(&mut fresh, vm(0, Starting, false)));
        assert!(merge_event(&mut vms, vm(0, Exited, false)));
        assert!(merge_answer(&mut vms, vm(1, Starting, false)));
        assert_eq!(vms["u"], vm(1, Starting, false));
        // ... until the stream catches up, in order.
        assert!(merge_event(&mut vms, vm(1, Running, true)));
        assert!(!merge_answer(&mut vms, vm(1, Starting, false)));
        assert_eq!(vms["u"], vm(1, Running, true));
    }

    #[test]
    fn reconnect_delay_grows_and_is_capped() {
        assert!(reconnect_delay(0) < Duration::from_millis(260));
        assert!(reconnect_delay(2) >= Duration::from_millis(800));
        assert!(reconnect_delay(50) <= Duration::from_millis(6250));
    }

    #[tokio::test]
    async fn unknown_and_new_agents_are_not_connected() {
        let shutdown = CancellationToken::new();
        let (pool, _rx) = AgentPool::new(
            Duration::from_secs(10),
            Duration::from_secs(30),
            None,
            shutdown.clone(),
        );
        // Just started: discovery may not have listed the node's agent yet.
        assert!(matches!(
            pool.link("nowhere"),
            AgentLink::Reconnecting { .. }
        ));
        pool.set_agents(&BTreeMap::from([(
            "node-a".to_string(),
            AgentEndpoint::Unix(PathBuf::from("/nonexistent/agent.sock")),
        )]));
        assert!(matches!(
            pool.link("node-a"),
            AgentLink::Reconnecting { .. }
        ));
        assert!(pool.hosts().is_empty());
        assert!(matches!(
            pool.apply_vm("node-a", &crate::testing::apply_request("u"))
                .await,
            Err(AgentError::NotConnected(_))
        ));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_node_without_an_agent_is_absent_only_after_the_grace() {
        let shutdown = CancellationToken::new();
        let grace = Duration::from_millis(50);
        let (pool, _rx) = AgentPool::new(grace, Duration::from_secs(30), None, shutdown.clone());
        let node_a = BTreeMap::from([(
            "node-a".to_string(),
            AgentEndpoint::Unix(PathBuf::from("/nonexistent/agent.sock")),
        )]);
        pool.set_agents(&node_a);
        tokio::time::sleep(grace * 2).await;
        assert_eq!(pool.link("nowhere"), AgentLink::Absent);
        assert_eq!(pool.link("node-a"), AgentLink::Lost);
        // The agent pod is being replaced: its node is not dead yet ...
        pool.set_agents(&BTreeMap::new());
        assert!(matches!(
            pool.link("node-a"),
            AgentLink::Reconnecting { .. }
        ));
        // ... and is, once the grace has passed with no agent back.
        tokio::time::sleep(grace * 2).await;
        assert_eq!(pool.link("node-a"), AgentLink::Absent);
        // Back again: dialed afresh.
        pool.set_agents(&node_a);
        assert!(matches!(
            pool.link("node-a"),
            AgentLink::Reconnecting { .. }
        ));
        // A stopping controller judges no agent lost, whatever it saw before.
        shutdown.cancel();
        for node in ["node-a", "nowhere"] {
            assert!(matches!(pool.link(node), AgentLink::Reconnecting { .. }));
        }
    }
}
