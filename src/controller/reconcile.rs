//! One reconcile: observe (the object, the agent's view of its VM, a placement for a VM
//! without a node), decide with the pure [`plan::plan`], act (metadata patch, agent calls,
//! status apply, Events); and what a failed reconcile does next.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use thiserror::Error;

use super::agents::{AgentError, AgentPool};
use super::events::EventRecorder;
use super::metrics::ControllerMetrics;
use super::plan::{self, Action, EventKind, Observed, PodMode, PodView, SpecProblem, placed_node};
use super::scheduler::{self, Candidate, PlacementRequest, PlacementStrategy};
use super::vmpod::{self, VmPodSettings};
use super::{pull_secrets, status, vmspec};
use crate::api::{FIELD_MANAGER, MicroVM};
use crate::error::ErrorReason;
use crate::vm::{ApplyRequest, PodRef, VmUid};

/// Failures of one reconcile; all retried with back-off, except a [`Conflict`] (see
/// `error_policy`).
///
/// [`Conflict`]: ReconcileError::Conflict
#[derive(Debug, Error, strum::IntoStaticStr)]
pub(crate) enum ReconcileError {
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

pub(super) struct Reservation {
    pub(super) node: String,
    pub(super) vcpus: u32,
    pub(super) memory: u64,
}

pub(super) struct Context {
    pub(super) client: Client,
    pub(super) pool: AgentPool,
    pub(super) store: Store<MicroVM>,
    pub(super) recorder: EventRecorder,
    pub(super) metrics: ControllerMetrics,
    pub(super) strategy: PlacementStrategy,
    pub(super) nodes: NodeLabels,
    /// Placements made but not yet visible in the cache; serialized so two reconciles cannot
    /// both take the last slot of a node.
    pub(super) placing: tokio::sync::Mutex<HashMap<String, Reservation>>,
    pub(super) failures: Mutex<HashMap<String, u32>>,
    /// Pod mode (`--vm-pods`): the settings and the cache of VM pods.
    pub(super) vm_pods: Option<(VmPodSettings, Store<Pod>)>,
    /// Pod mode: the Nodes' metadata, for the node labels the controller keeps.
    pub(super) node_meta: Option<Store<kube::core::PartialObjectMeta<Node>>>,
}

/// Node labels with a short cache: placement asks for every candidate on every placement.
pub(super) struct NodeLabels {
    pub(super) api: Api<Node>,
    pub(super) cache: Mutex<HashMap<String, (Instant, Option<Labels>)>>,
}

pub(super) type Labels = BTreeMap<String, String>;

pub(super) const NODE_LABELS_TTL: Duration = Duration::from_secs(30);

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

/// Retry delay after `attempt` consecutive failures: 500 ms doubling to 60 s, plus up to 50%
/// jitter so objects that failed together do not retry together.
pub(crate) fn retry_delay(attempt: u32) -> Duration {
    let base = Duration::from_millis(500u64 << attempt.min(7)).min(Duration::from_secs(60));
    base.mul_f64(1.0 + rand::random_range(0.0..0.5))
}

pub(super) fn error_policy(
    mvm: Arc<MicroVM>,
    error: &ReconcileError,
    ctx: Arc<Context>,
) -> Requeue {
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
pub(super) const CONFLICT_RETRY: Duration = Duration::from_millis(200);

/// Reconciles in flight at once.
pub(super) const RECONCILE_CONCURRENCY: u16 = 32;

/// The fallback resync when nothing triggers an object.
pub(super) const RESYNC: Duration = Duration::from_secs(600);

pub(super) async fn reconcile(
    mvm: Arc<MicroVM>,
    ctx: Arc<Context>,
) -> Result<Requeue, ReconcileError> {
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

/// Pod mode's part of observing a MicroVM: its VM pod (built and found), the pod's node, and
/// the other nodes holding its VM.
struct PodObservation {
    built: Result<Pod, vmpod::VmPodError>,
    view: Option<PodView>,
    node: Option<String>,
}

fn observe_pod(mvm: &MicroVM, settings: &VmPodSettings, store: &Store<Pod>) -> PodObservation {
    let ns = mvm.namespace().unwrap_or_default();
    let name = vmpod::pod_name(&mvm.name_any());
    let view = store
        .get(&kube::runtime::reflector::ObjectRef::new(&name).within(&ns))
        .map(|p| vmpod::view(&p));
    let uid = mvm.uid();
    let node = view
        .as_ref()
        .filter(|v| v.owner_uid.is_some() && v.owner_uid == uid)
        .and_then(|v| v.node.clone());
    PodObservation {
        built: vmpod::build(mvm, settings),
        view,
        node,
    }
}

pub(super) async fn reconcile_once(
    mvm: &MicroVM,
    ctx: &Context,
) -> Result<Requeue, ReconcileError> {
    let pods = ctx
        .vm_pods
        .as_ref()
        .map(|(settings, store)| observe_pod(mvm, settings, store));
    let built = vmspec::build(mvm, pods.is_some());
    let node = match &pods {
        Some(p) => p.node.clone(),
        None => placed_node(mvm),
    };
    let deleting = mvm.metadata.deletion_timestamp.is_some();
    let uid = mvm.uid().unwrap_or_default();
    let placement = if node.is_none() && !deleting && pods.is_none() {
        Some(place(mvm, ctx).await)
    } else {
        None
    };
    let (agent, vm, node_labels) = match &node {
        Some(node) => (
            ctx.pool.link(node),
            ctx.pool.vm(node, &uid),
            // Labels only matter to a live VM placed by Ignis (the node-mismatch condition).
            if deleting || pods.is_some() {
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
        pods: match &pods {
            None => PodMode::Off,
            Some(p) => PodMode::On {
                pod: p.view.clone().map(Box::new),
                buildable: p.built.as_ref().map(|_| ()).map_err(|e| SpecProblem {
                    reason: e.into(),
                    message: e.to_string(),
                }),
                elsewhere: ctx
                    .pool
                    .nodes_holding(&uid)
                    .into_iter()
                    .filter(|n| Some(n) != node.as_ref())
                    .collect(),
            },
        },
    };
    let actions = plan::plan(mvm, &observed);
    let placed_now = actions.iter().any(|a| matches!(a, Action::Place { .. }));
    let pod = pods.map(|p| (p.built.ok(), p.view));
    let result = act(mvm, actions, built.ok(), pod, ctx).await;
    if placed_now && result.is_err() {
        // The placement was never recorded: give the reserved capacity back.
        ctx.placing.lock().await.remove(&uid);
    }
    result
}

pub(super) async fn place(
    mvm: &MicroVM,
    ctx: &Context,
) -> Result<String, scheduler::Unschedulable> {
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
            unavailable: host.unavailable_hypervisors.clone(),
            accelerator: host.accelerator,
            accelerator_detail: host.accelerator_detail.clone(),
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

/// The VM pod to create (when it could be built) and the one observed.
type PodParts = (Option<Pod>, Option<PodView>);

pub(super) async fn act(
    mvm: &MicroVM,
    actions: Vec<Action>,
    built: Option<vmspec::BuiltSpec>,
    pod: Option<PodParts>,
    ctx: &Context,
) -> Result<Requeue, ReconcileError> {
    let (new_pod, seen_pod) = pod.unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &mvm.namespace().unwrap_or_default());
    let pod_name = vmpod::pod_name(&mvm.name_any());
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
                let mut pull_secrets = Default::default();
                if !built.spec.images().is_empty() && !mvm.spec.image_pull_secrets.is_empty() {
                    let read =
                        pull_secrets::read(&ctx.client, &ns, &mvm.spec.image_pull_secrets).await;
                    for problem in read.problems {
                        publish(
                            ctx,
                            mvm,
                            EventKind::Warning,
                            "FailedToRetrieveImagePullSecret",
                            problem,
                        )
                        .await;
                    }
                    pull_secrets = read.secrets;
                }
                let request = ApplyRequest {
                    spec: built.spec.clone(),
                    spec_hash: built.hash.clone(),
                    run,
                    desired,
                    pull_secrets,
                    // Pod mode applies only to a pod whose sandbox runs: the one observed.
                    pod: seen_pod.as_ref().map(|p| PodRef {
                        uid: p.uid.clone(),
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        ip: p.ip,
                    }),
                };
                ctx.pool
                    .apply_vm(&node, &request)
                    .await
                    .map_err(ReconcileError::Agent)?;
            }
            Action::DeleteVm { node } => {
                let grace =
                    Duration::from_secs(mvm.spec.termination_grace_period_seconds.max(0) as u64);
                // A uid that names no VM was never applied: there is nothing to delete.
                let Ok(uid) = VmUid::new(uid.clone()) else {
                    continue;
                };
                ctx.pool
                    .delete_vm(&node, &uid, grace)
                    .await
                    .map_err(ReconcileError::Agent)?;
            }
            Action::CreatePod => {
                let Some(pod) = new_pod.as_ref() else {
                    continue;
                };
                match pods.create(&PostParams::default(), pod).await {
                    Ok(_) => {}
                    // Made by an earlier reconcile the cache has not shown yet.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(error) => return Err(ReconcileError::kube(error)),
                }
            }
            Action::DeletePod => {
                // Only the pod observed: never a newer one of the same name.
                let params = DeleteParams {
                    preconditions: seen_pod.as_ref().map(|p| Preconditions {
                        uid: Some(p.uid.clone()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match pods.delete(&pod_name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                    Err(error) => return Err(ReconcileError::kube(error)),
                }
            }
            Action::SetPodReady(ready) => {
                let patch = serde_json::json!({"status": {"conditions": [{
                    "type": vmpod::GUEST_READY_GATE,
                    "status": if ready { "True" } else { "False" },
                    "lastTransitionTime": jiff::Timestamp::now().to_string(),
                }]}});
                match pods
                    .patch_status(&pod_name, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                {
                    Ok(_) => {}
                    // Gone meanwhile: its successor gets the gate when it is there.
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(error) => return Err(ReconcileError::kube(error)),
                }
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
            } => publish(ctx, mvm, kind, reason, message).await,
            Action::RequeueAfter(d) => requeue = Some(d),
        }
    }
    Ok(Requeue::requeue(requeue.unwrap_or(RESYNC)))
}

/// Publish an Event about `mvm`. An Event is a courtesy: failing to write one must not fail
/// the reconcile.
/// An Event is a courtesy: failing to write one must not fail the reconcile.
async fn publish(ctx: &Context, mvm: &MicroVM, kind: EventKind, reason: &str, message: String) {
    let regarding = mvm.object_ref(&());
    if let Err(error) = ctx
        .recorder
        .publish(&regarding, kind, reason, &message)
        .await
    {
        tracing::debug!(%error, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_backs_off_with_bounded_jitter() {
        let first = retry_delay(0);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_millis(750));
        let late = retry_delay(40);
        assert!(late >= Duration::from_secs(60) && late <= Duration::from_secs(90));
    }
}
