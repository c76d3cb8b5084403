//! One reconcile, the pipeline of three stages, each in its own file: [`observe`] (the
//! object, the agent's view of its VM, its VM pod, a placement for a VM without a node),
//! [`decide`] (pure: the actions that converge it), [`act`] (metadata patch, agent calls, pod
//! calls, status apply, Events); plus the context they share and what a failed reconcile does
//! next.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use thiserror::Error;

use super::act;
use super::agents::{AgentError, AgentPool};
use super::decide::{self, Action};
use super::events::EventRecorder;
use super::metrics::ControllerMetrics;
use super::observe::{self, NodeLabels, Observation, Reservation};
use super::scheduler::PlacementStrategy;
use super::vmpod::VmPodSettings;
use crate::api::{MicroVM, MicroVMPool};
use crate::error::ErrorReason;

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
    /// A claim's spec the agent API cannot express (its own reason word).
    #[error("the MicroVM's spec cannot be sent to an agent")]
    #[strum(transparent)]
    Spec(#[source] super::vmspec::VmSpecError),
}

/// Delete `name`; one already gone is no error.
pub(super) async fn delete_if_present(
    api: &kube::Api<MicroVM>,
    name: &str,
) -> Result<(), ReconcileError> {
    match api.delete(name, &kube::api::DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(error) => Err(ReconcileError::kube(error)),
    }
}

impl ReconcileError {
    /// A failed Kubernetes API call, classified by its status code.
    pub(super) fn kube(error: kube::Error) -> Self {
        match &error {
            kube::Error::Api(s) if s.code == 409 => ReconcileError::Conflict(error),
            kube::Error::Api(s) if s.code == 422 => ReconcileError::Invalid(error),
            _ => ReconcileError::Kube(error),
        }
    }
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
    /// Cancelled once the VM pod cache has listed every pod (at once without pod mode): until
    /// then a VM pod missing from the cache may exist, and deciding on it would stop its VM.
    pub(super) pods_listed: tokio_util::sync::CancellationToken,
    /// Pod mode: the Nodes' metadata, for the node labels the controller keeps.
    pub(super) node_meta: Option<Store<kube::core::PartialObjectMeta<Node>>>,
    /// The pools (`MicroVMPool`), and a way to have one reconciled.
    pub(super) pools: Store<MicroVMPool>,
    pub(super) pools_listed: tokio_util::sync::CancellationToken,
    pub(super) pool_triggers: tokio::sync::mpsc::UnboundedSender<ObjectRef<MicroVMPool>>,
    /// Warm VMs being taken right now, by claimant uid: concurrent claims pick others.
    pub(super) claiming: Mutex<HashMap<String, String>>,
    /// Claims settled (status written) that the cache may not show yet, by claimant uid: a
    /// reconcile in between must wait for the cache, not settle the claim a second time.
    pub(super) settled: Mutex<HashMap<String, Instant>>,
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

/// How soon a reconcile that came before the VM pod cache had listed runs again.
pub(super) const CACHE_WAIT: Duration = Duration::from_millis(250);

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

/// One pass of the pipeline: observe → decide → act.
pub(super) async fn reconcile_once(
    mvm: &MicroVM,
    ctx: &Context,
) -> Result<Requeue, ReconcileError> {
    if !ctx.pods_listed.is_cancelled() {
        return Ok(Requeue::requeue(CACHE_WAIT));
    }
    if let (Some(pool), Some(ns)) = (super::claim::pool_of(mvm), mvm.namespace()) {
        let _ = ctx.pool_triggers.send(ObjectRef::new(pool).within(&ns));
    }
    if super::claim::taken(mvm) {
        return Ok(Requeue::await_change());
    }
    if super::claim::pending(mvm) {
        if super::claim::settled_but_not_seen(mvm, ctx) {
            return Ok(Requeue::requeue(CONFLICT_RETRY));
        }
        return super::claim::settle(mvm, ctx).await;
    }
    let Observation {
        observed,
        built,
        pod,
    } = observe::observe(mvm, ctx).await;
    let actions = decide::decide(mvm, &observed);
    let placed_now = actions.iter().any(|a| matches!(a, Action::Place { .. }));
    let result = act::act(mvm, actions, built, pod, ctx).await;
    if placed_now && result.is_err() {
        // The placement was never recorded: give the reserved capacity back.
        if let Some(uid) = mvm.uid() {
            ctx.placing.lock().await.remove(&uid);
        }
    }
    result
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
