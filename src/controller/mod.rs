//! `ignis controller`: the reconcile loop of docs/design.md section 2. A kube-runtime
//! `Controller<MicroVM>` whose reconcile observes (object, agent view, placement), decides with
//! the pure [`decide::decide`], and acts (metadata patch, agent calls, status apply, Events).
//! Agent `WatchVMs` streams trigger reconciles, so a VM that changes is noticed at once.

mod act;
pub(crate) mod agents;
mod claim;
mod config;
pub(crate) mod decide;
pub(crate) mod discovery;
mod drift;
pub(crate) mod events;
pub(crate) mod identity;
pub(crate) mod leader;
pub(crate) mod metrics;
mod nodelabels;
mod observe;
mod pools;
mod pull_secrets;
mod reconcile;
pub(crate) mod scheduler;
pub(crate) mod status;
pub(crate) mod tls;
pub mod uninstall;
pub(crate) mod vmpod;
pub(crate) mod vmspec;

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod pod_api_tests;
#[cfg(test)]
pub(crate) use crate::testing as fixtures;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ContainerStatus, Node, Pod, PodSpec, PodStatus};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use self::agents::{AgentEndpoint, AgentPool, PoolSignal};
use self::decide::placed_node;
use self::events::{EventRecorder, Reporter};
use self::metrics::ControllerMetrics;
use crate::api::{FIELD_MANAGER, MicroVM};
use crate::telemetry::{MetricsRegistry, Readiness};

pub use config::{ControllerArgs, ControllerConfig, ControllerError, DiscoveryConfig, LeaderArgs};
use drift::housekeeping;
use observe::NodeLabels;
use reconcile::{Context, RECONCILE_CONCURRENCY, error_policy, reconcile};

/// A running controller.
pub struct ControllerHandle {
    pub pool: AgentPool,
    task: tokio::task::JoinHandle<()>,
}

impl ControllerHandle {
    /// Wait for the controller to stop (after its shutdown token is cancelled).
    pub async fn wait(self) -> Result<(), ControllerError> {
        self.task.await.map_err(ControllerError::Task)
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
    // Our own reflector instead of `Controller::new`'s, to see its first complete list: the
    // store's `wait_until_ready` wakes only one of its waiters (kube-runtime 5's DelayedInit
    // holds a oneshot receiver, which keeps the last waker), and the controller's applier is
    // already waiting on it, so housekeeping waits on `cache_ready` instead.
    let (store, writer) = reflector::store();
    let cache_ready = CancellationToken::new();
    let listed = cache_ready.clone();
    let microvms = reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(trim_microvm),
    )
    .inspect_ok(cancel_when_listed(listed))
    .default_backoff()
    .applied_objects();
    let controller = Controller::for_stream(microvms, store.clone()).with_config(
        kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
    );
    let (pod_events_tx, mut pod_events) = mpsc::unbounded_channel::<ObjectRef<MicroVM>>();
    let pods_listed = CancellationToken::new();
    let vm_pods = config.vm_pods.clone().map(|settings| {
        let (pods, nodes) = watch_vm_pods(
            &client,
            config.namespace.as_deref(),
            pod_events_tx,
            pods_listed.clone(),
            &shutdown,
        );
        (settings, pods, nodes)
    });
    if vm_pods.is_none() {
        pods_listed.cancel();
    }
    let pools = pools::watch(&client, config.namespace.as_deref());
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_string(),
        instance: config.instance.clone(),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        pool: pool.clone(),
        store: store.clone(),
        recorder: EventRecorder::new(client.clone(), reporter),
        metrics: metrics.clone(),
        strategy: config.placement,
        nodes: NodeLabels {
            api: Api::all(client.clone()),
            cache: Mutex::new(HashMap::new()),
        },
        placing: tokio::sync::Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
        vm_pods: vm_pods
            .as_ref()
            .map(|(s, store, _)| (s.clone(), store.clone())),
        node_meta: vm_pods.as_ref().map(|(_, _, nodes)| nodes.clone()),
        pods_listed,
        pools: pools.store.clone(),
        pools_listed: pools.listed.clone(),
        pool_triggers: pools.triggers.clone(),
        claiming: Mutex::new(HashMap::new()),
    });
    pools.start(ctx.clone(), shutdown.clone());

    // Pool signals → object references for the controller.
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<ObjectRef<MicroVM>>();
    {
        let trigger_tx = trigger_tx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = pod_events.recv() => r,
                };
                let Some(object) = next else { return };
                let _ = trigger_tx.send(object);
            }
        });
    }
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
        cache_ready,
        shutdown.clone(),
    ));
    tokio::spawn(drift::node_labels(ctx.clone(), shutdown.clone()));

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
    Ok(ControllerHandle { pool, task })
}

/// For a watcher's stream: the caches keep no `managedFields`. The controller never reads
/// them (its writes are patches and server-side applies, which the API server checks against
/// its own copy), and they are most of a cached MicroVM's or pod's bytes: every field
/// manager's field set, several per object.
fn drop_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// What the MicroVM cache keeps: everything but `managedFields` and the annotations, which
/// nothing in the controller reads (`kubectl apply` keeps a copy of the whole object in one),
/// except the mark a claim leaves on the warm VM it takes.
fn trim_microvm(mvm: &mut MicroVM) {
    drop_managed_fields(mvm);
    mvm.metadata.annotations = mvm.metadata.annotations.take().and_then(|mut a| {
        let claimed = a.remove(crate::api::CLAIMED_BY_ANNOTATION)?;
        Some(BTreeMap::from([(
            crate::api::CLAIMED_BY_ANNOTATION.to_string(),
            claimed,
        )]))
    });
}

/// What the Node cache keeps (pod mode): the names and labels the node-label sync reads; a
/// Node's annotations (volumes, CNI, kubeadm) are dropped.
fn trim_node(node: &mut PartialObjectMeta<Node>) {
    drop_managed_fields(node);
    node.metadata.annotations = None;
}

/// What the VM pod cache keeps: only what `vmpod::view` and the pod watch read (identity,
/// owner, labels, deletion, the node, phase, conditions, IP, the guest container's state).
/// The rest of a pod — its spec's containers, volumes, affinity and tolerations, the
/// kubelet's image and container ids — is most of its bytes and never read.
fn trim_pod(pod: &mut Pod) {
    drop_managed_fields(pod);
    pod.metadata.annotations = None;
    pod.spec = pod.spec.take().map(|spec| PodSpec {
        node_name: spec.node_name,
        ..Default::default()
    });
    if let Some(status) = pod.status.as_mut() {
        let guest = status
            .container_statuses
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| c.name == vmpod::CONTAINER)
            .map(|c| ContainerStatus {
                name: c.name,
                state: c.state,
                ..Default::default()
            })
            .collect();
        *status = PodStatus {
            conditions: status.conditions.take(),
            container_statuses: Some(guest),
            message: status.message.take(),
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            reason: status.reason.take(),
            ..Default::default()
        };
    }
}

/// For a reflector's stream: cancel `listed` once its first complete list is in the store. Used
/// instead of `Store::wait_until_ready`, which wakes only the last of its waiters.
fn cancel_when_listed<K>(listed: CancellationToken) -> impl FnMut(&watcher::Event<K>) {
    move |event| {
        if matches!(event, watcher::Event::InitDone) {
            listed.cancel();
        }
    }
}

/// Pod mode: cache the VM pods (reconciling the owning MicroVM on each change) and the
/// Nodes' metadata (for the node labels the controller keeps).
fn watch_vm_pods(
    client: &Client,
    namespace: Option<&str>,
    triggers: mpsc::UnboundedSender<ObjectRef<MicroVM>>,
    listed: CancellationToken,
    shutdown: &CancellationToken,
) -> (
    reflector::Store<Pod>,
    reflector::Store<PartialObjectMeta<Node>>,
) {
    let pods: Api<Pod> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (pod_store, pod_writer) = reflector::store();
    let pod_stream = reflector(
        pod_writer,
        watcher(
            pods,
            watcher::Config::default().labels(vmpod::MICROVM_LABEL),
        )
        .modify(trim_pod),
    )
    .inspect_ok(cancel_when_listed(listed))
    .default_backoff()
    .touched_objects();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut pod_stream = std::pin::pin!(pod_stream);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = pod_stream.next() => n,
            };
            match next {
                None => return,
                Some(Ok(pod)) => {
                    let (Some(ns), Some(name)) = (
                        pod.namespace(),
                        pod.labels().get(vmpod::MICROVM_LABEL).cloned(),
                    ) else {
                        continue;
                    };
                    let _ = triggers.send(ObjectRef::new(&name).within(&ns));
                }
                Some(Err(error)) => tracing::warn!(%error, "VM pod watch"),
            }
        }
    });
    let (node_store, node_writer) = reflector::store();
    let node_stream = reflector(
        node_writer,
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        )
        .modify(trim_node),
    )
    .default_backoff()
    .touched_objects();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let mut node_stream = std::pin::pin!(node_stream);
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                n = node_stream.next() => n,
            };
            match next {
                None => return,
                Some(Ok(_)) => {}
                Some(Err(error)) => tracing::warn!(%error, "node watch"),
            }
        }
    });
    (pod_store, node_store)
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
    let csr_mode = args.agent_serving_cert == tls::ServingCert::Csr;
    let tls = if needs_tls {
        Some(agents::AgentTls {
            latest: tls::latest_client_tls(
                client.clone(),
                args.system_namespace.clone(),
                args.tls_secret.clone(),
                args.agent_serving_cert,
                shutdown.clone(),
            )
            .await
            .map_err(ControllerError::Tls)?,
            per_node: csr_mode,
        })
    } else {
        None
    };
    let vm_pods = args.vm_pod_settings()?;
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
        vm_pods,
    };
    if csr_mode {
        // Leader-only, like reconciling: it stops with the leader's work.
        let agent_namespace = args
            .agent_namespace
            .clone()
            .unwrap_or_else(|| args.system_namespace.clone());
        tokio::spawn(tls::signer::run(
            client.clone(),
            tls::signer::SignerConfig {
                namespace: args.system_namespace.clone(),
                agent_user: format!(
                    "system:serviceaccount:{agent_namespace}:{}",
                    args.agent_service_account
                ),
            },
            work.clone(),
        ));
    }
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

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    use super::*;

    #[test]
    fn cached_objects_keep_everything_but_their_managed_fields() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("vm-a".into());
        pod.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        pod.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("ignis-controller".into()),
            ..Default::default()
        }]);
        drop_managed_fields(&mut pod);
        assert_eq!(pod.metadata.managed_fields, None);
        assert_eq!(pod.name_any(), "vm-a");
        assert_eq!(pod.labels().get("app").map(String::as_str), Some("web"));
    }

    #[test]
    fn a_trimmed_vm_pod_looks_the_same_to_the_controller() {
        use k8s_openapi::api::core::v1::{
            Container, ContainerState, ContainerStateRunning, PodCondition,
        };
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let condition = |t: &str, status: &str, reason: &str| PodCondition {
            type_: t.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(format!("{t} says {reason}")),
            ..Default::default()
        };
        let running = |name: &str| ContainerStatus {
            name: name.into(),
            image: "registry.example/ignis-agent:1".into(),
            image_id: "sha256:0123".into(),
            container_id: Some("containerd://abc".into()),
            ready: true,
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut pod = Pod::default();
        pod.metadata.name = Some("vm-web".into());
        pod.metadata.namespace = Some("default".into());
        pod.metadata.uid = Some("pod-uid".into());
        pod.metadata.labels = Some([(vmpod::MICROVM_LABEL.to_string(), "web".to_string())].into());
        pod.metadata.annotations = Some([("cni".to_string(), "x".repeat(500))].into());
        pod.metadata.owner_references = Some(vec![OwnerReference {
            api_version: crate::api::API_VERSION.into(),
            kind: "MicroVM".into(),
            name: "web".into(),
            uid: "uid-web".into(),
            controller: Some(true),
            ..Default::default()
        }]);
        pod.spec = Some(PodSpec {
            node_name: Some("node-a".into()),
            containers: vec![Container {
                name: vmpod::CONTAINER.into(),
                args: Some(vec!["a".repeat(300)]),
                ..Default::default()
            }],
            ..Default::default()
        });
        let mut status = PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.244.1.7".into()),
            host_ip: Some("192.168.0.2".into()),
            qos_class: Some("Guaranteed".into()),
            conditions: Some(vec![
                condition("PodScheduled", "False", "Unschedulable"),
                condition("DisruptionTarget", "True", "PreemptionByScheduler"),
                condition(vmpod::GUEST_READY_GATE, "True", ""),
            ]),
            container_statuses: Some(vec![running(vmpod::CONTAINER), running("sidecar")]),
            ..Default::default()
        };
        let check = |pod: &Pod| {
            let mut trimmed = pod.clone();
            trim_pod(&mut trimmed);
            assert_eq!(vmpod::view(&trimmed), vmpod::view(pod));
            assert_eq!(trimmed.labels(), pod.labels());
            assert_eq!(trimmed.metadata.annotations, None);
            let spec = trimmed.spec.as_ref().expect("spec");
            assert!(spec.containers.is_empty());
            let bytes = |p: &Pod| serde_json::to_vec(p).expect("json").len();
            assert!(bytes(&trimmed) < bytes(pod) / 2, "{trimmed:?}");
        };
        pod.status = Some(status.clone());
        check(&pod);
        status.container_statuses = None;
        status.reason = Some("Evicted".into());
        status.message = Some("low on memory".into());
        pod.status = Some(status);
        check(&pod);
        pod.status = None;
        check(&pod);
    }

    #[test]
    fn a_cached_microvm_keeps_no_annotations() {
        let mut mvm = crate::testing::microvm("web");
        mvm.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "{}".to_string(),
            )]
            .into(),
        );
        let before = mvm.clone();
        trim_microvm(&mut mvm);
        assert_eq!(mvm.metadata.annotations, None);
        assert_eq!(mvm.spec, before.spec);
        assert_eq!(mvm.status, before.status);
        assert_eq!(mvm.metadata.labels, before.metadata.labels);
        assert_eq!(mvm.metadata.finalizers, before.metadata.finalizers);
        assert_eq!(
            mvm.metadata.resource_version,
            before.metadata.resource_version
        );
    }
}
