//! A MicroVM naming a pool (`spec.pool`), settled once before its first ordinary reconcile:
//! observe the pool and its warm VMs, decide (`decide/claim.rs`), and take one or boot cold.
//!
//! Taking warm VM W for claimant C, each step idempotent, so a claim cut short anywhere is
//! finished by C's next reconcile (which finds W marked as its own):
//! 1. W is marked `claimed-by: C` and loses its finalizer, guarded by W's resourceVersion, so
//!    no two claims take one VM, and W's own reconcile stops touching the VM;
//! 2. the agent hands the VM to C: C's name, metadata and uid as its owner, with no boot;
//! 3. pod mode: W's VM pod takes C's labels and C as its owner;
//! 4. C's status records the claim (the VM's id and pod) and Ready;
//! 5. W's object is deleted; with no finalizer left it simply goes.
//!
//! C's finalizer comes with its first ordinary reconcile, after the claim: one write fewer
//! before Ready. Should C go in between, its VM is still cleaned up: the pod's owner is C (so
//! garbage collection takes it) and drift repair removes a VM whose owner is gone.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::decide::claim::{
    ClaimDecision, ClaimView, POOL_GRACE, POOL_WAIT_RETRY, WarmVm, decide_claim, outcome_event,
};
use super::decide::{EventKind, placed_node};
use super::reconcile::{CONFLICT_RETRY, Context, ReconcileError, delete_if_present};
use super::{act, vmpod, vmspec};
use crate::api::{
    CLAIMED_BY_ANNOTATION, ClaimOutcome, ClaimStatus, ConditionType, FINALIZER, MicroVM,
    MicroVMPool, MicroVMStatus, POOL_LABEL, Phase, Reason, set_condition_status,
};
use crate::vm::{ApplyRequest, DesiredState, PodRef, RunState, VmUid};

/// A claim still to settle: `spec.pool` with no outcome yet, not being deleted.
pub(super) fn pending(mvm: &MicroVM) -> bool {
    mvm.spec.pool.is_some()
        && mvm.metadata.deletion_timestamp.is_none()
        && mvm.status.as_ref().and_then(|s| s.claim.as_ref()).is_none()
}

/// How long a settled claim is remembered: far longer than the cache lags behind a write.
const SETTLED_MEMORY: Duration = Duration::from_secs(60);

/// Whether `mvm`'s claim was settled by this controller and the cache just does not show it
/// yet (its status write's watch event is still on the way).
pub(super) fn settled_but_not_seen(mvm: &MicroVM, ctx: &Context) -> bool {
    let Some(uid) = mvm.uid() else {
        return false;
    };
    ctx.settled
        .lock()
        .is_ok_and(|s| s.get(&uid).is_some_and(|at| at.elapsed() < SETTLED_MEMORY))
}

/// Remember that `mvm`'s claim is settled.
fn remember_settled(mvm: &MicroVM, ctx: &Context) {
    if let (Some(uid), Ok(mut settled)) = (mvm.uid(), ctx.settled.lock()) {
        settled.retain(|_, at| at.elapsed() < SETTLED_MEMORY);
        settled.insert(uid, Instant::now());
    }
}

/// A warm VM a claim has taken: the VM is its claimant's now, so its own reconcile does
/// nothing (the claimant deletes it once the VM is moved).
pub(super) fn taken(mvm: &MicroVM) -> bool {
    claimed_by(mvm).is_some()
}

pub(super) fn claimed_by(mvm: &MicroVM) -> Option<&str> {
    mvm.metadata
        .annotations
        .as_ref()?
        .get(CLAIMED_BY_ANNOTATION)
        .map(String::as_str)
}

/// The MicroVMs of `mvm`'s namespace.
fn microvms(mvm: &MicroVM, ctx: &Context) -> Result<Api<MicroVM>, ReconcileError> {
    let ns = mvm.namespace().ok_or(ReconcileError::NoNamespace)?;
    Ok(Api::namespaced(ctx.client.clone(), &ns))
}

/// The pool a MicroVM is a warm VM of.
pub(super) fn pool_of(mvm: &MicroVM) -> Option<&str> {
    mvm.metadata
        .labels
        .as_ref()?
        .get(POOL_LABEL)
        .map(String::as_str)
}

/// The template hash of a MicroVM's spec, as its VM would be built.
fn template_hash(mvm: &MicroVM, in_pod: bool) -> Option<String> {
    vmspec::build(mvm, in_pod)
        .ok()
        .map(|b| b.spec.template_hash())
}

/// The template hash of a pool: its template built as a MicroVM would be.
fn pool_template_hash(pool: &MicroVMPool, in_pod: bool) -> Option<String> {
    let mut vm = MicroVM::new(&pool.name_any(), pool.spec.template.spec.clone());
    vm.metadata.namespace = pool.namespace();
    vm.metadata.uid = Some("template".to_string());
    template_hash(&vm, in_pod)
}

/// One warm VM in the order claims take them, if it can be taken by `claimant` now.
fn candidate(w: &MicroVM, claimant: &str, ctx: &Context, in_pod: bool) -> Option<WarmVm> {
    let uid = w.uid()?;
    let mine = match claimed_by(w) {
        Some(by) if by == claimant => true,
        Some(_) => return None,
        None => false,
    };
    if !mine && w.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ready = w
        .status
        .as_ref()
        .and_then(|s| crate::api::find_condition(&s.conditions, ConditionType::Ready))
        .is_some_and(|c| c.status == "True");
    let node = placed_node(w)?;
    let vm = ctx.pool.vm(&node, &uid)?;
    let takeable = ready && vm.ready && vm.state == RunState::Running;
    if !mine && !takeable {
        return None;
    }
    if !mine
        && ctx
            .claiming
            .lock()
            .is_ok_and(|c| c.get(&uid).is_some_and(|by| by != claimant))
    {
        return None;
    }
    Some(WarmVm {
        name: w.name_any(),
        resource_version: w.resource_version().unwrap_or_default(),
        node,
        boot_hash: vm.spec_hash.clone(),
        run: vm.run,
        template_hash: template_hash(w, in_pod)?,
        mine,
        uid,
    })
}

fn observe(
    mvm: &MicroVM,
    pool_name: &str,
    ctx: &Context,
) -> (ClaimView, BTreeMap<String, MicroVM>) {
    let ns = mvm.namespace().unwrap_or_default();
    let claimant = mvm.uid().unwrap_or_default();
    let in_pod = ctx.vm_pods.is_some();
    let pool = ctx
        .pools
        .get(&ObjectRef::new(pool_name).within(&ns))
        .filter(|p| p.metadata.deletion_timestamp.is_none());
    let own_hash = template_hash(mvm, in_pod).unwrap_or_default();
    let mut members: Vec<std::sync::Arc<MicroVM>> = ctx
        .store
        .state()
        .into_iter()
        .filter(|w| w.namespace().as_deref() == Some(ns.as_str()))
        .filter(|w| pool_of(w) == Some(pool_name) || claimed_by(w) == Some(claimant.as_str()))
        .collect();
    members.sort_by_key(|w| (claimed_by(w) != Some(claimant.as_str()), w.name_any()));
    let mut warm = Vec::new();
    let mut objects = BTreeMap::new();
    // Hashes cost a spec build each: stop at the first VM this claim can take.
    for w in members {
        if let Some(c) = candidate(&w, &claimant, ctx, in_pod) {
            let found = c.mine || c.template_hash == own_hash;
            objects.insert(c.name.clone(), (*w).clone());
            warm.push(c);
            if found {
                break;
            }
        }
    }
    let age = mvm
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| jiff::Timestamp::now().duration_since(t.0).try_into().ok())
        .unwrap_or_default();
    let view = ClaimView {
        pool_template: pool.map(|p| pool_template_hash(&p, in_pod).unwrap_or_default()),
        template_hash: own_hash,
        warm,
        age,
    };
    (view, objects)
}

/// Settle the claim of `mvm`: take a warm VM, boot cold, or wait for the pool.
pub(super) async fn settle(mvm: &MicroVM, ctx: &Context) -> Result<Requeue, ReconcileError> {
    let started = Instant::now();
    let Some(pool) = mvm.spec.pool.clone() else {
        return Ok(Requeue::await_change());
    };
    let (view, objects) = observe(mvm, &pool, ctx);
    // Before the pool cache has listed, a missing pool means nothing yet. A cache that never
    // lists (the MicroVMPool CRD not installed: `helm upgrade` adds no new CRD) holds claims
    // only for the grace a missing pool gets anyway, and never the other MicroVMs.
    if !ctx.pools_listed.is_cancelled() && view.age < POOL_GRACE {
        return Ok(Requeue::requeue(POOL_WAIT_RETRY));
    }
    match decide_claim(&view) {
        ClaimDecision::Wait(after) => Ok(Requeue::requeue(after)),
        ClaimDecision::Cold(outcome) => cold(mvm, &pool, outcome, ctx).await,
        ClaimDecision::Take(warm) => {
            let Some(object) = objects.get(&warm.name) else {
                return Ok(Requeue::requeue(CONFLICT_RETRY));
            };
            let claimant = mvm.uid().unwrap_or_default();
            let Some(_reservation) = Reservation::take(ctx, &warm.uid, &claimant) else {
                return Ok(Requeue::requeue(CONFLICT_RETRY));
            };
            take(mvm, &pool, &warm, object, ctx, started).await
        }
    }
}

/// A warm VM held by one claim while it is being taken, so concurrent claims pick others.
struct Reservation<'a> {
    ctx: &'a Context,
    warm: String,
}

impl<'a> Reservation<'a> {
    fn take(ctx: &'a Context, warm: &str, claimant: &str) -> Option<Self> {
        let mut claiming = ctx.claiming.lock().ok()?;
        match claiming.get(warm) {
            Some(by) if by != claimant => None,
            _ => {
                claiming.insert(warm.to_string(), claimant.to_string());
                Some(Self {
                    ctx,
                    warm: warm.to_string(),
                })
            }
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Ok(mut claiming) = self.ctx.claiming.lock() {
            claiming.remove(&self.warm);
        }
    }
}

async fn cold(
    mvm: &MicroVM,
    pool: &str,
    outcome: ClaimOutcome,
    ctx: &Context,
) -> Result<Requeue, ReconcileError> {
    let mut new = mvm.status.clone().unwrap_or_default();
    new.claim = Some(ClaimStatus {
        pool: pool.to_string(),
        outcome,
        ..Default::default()
    });
    act::write_status(&microvms(mvm, ctx)?, mvm, &new).await?;
    remember_settled(mvm, ctx);
    ctx.metrics.pool_miss(outcome.as_str());
    let (reason, warning, message) = outcome_event(outcome, pool, None);
    let kind = if warning {
        EventKind::Warning
    } else {
        EventKind::Normal
    };
    act::publish(ctx, mvm, kind, reason, message).await;
    // The status write brings the ordinary reconcile that boots it.
    Ok(Requeue::requeue(CONFLICT_RETRY))
}

async fn take(
    mvm: &MicroVM,
    pool: &str,
    warm: &WarmVm,
    object: &MicroVM,
    ctx: &Context,
    started: Instant,
) -> Result<Requeue, ReconcileError> {
    let ns = mvm.namespace().ok_or(ReconcileError::NoNamespace)?;
    let microvms: Api<MicroVM> = Api::namespaced(ctx.client.clone(), &ns);
    let in_pod = ctx.vm_pods.is_some();
    let pod = in_pod.then(|| vmpod::pod_name(&warm.name));
    let claim = ClaimStatus {
        pool: pool.to_string(),
        outcome: ClaimOutcome::Claimed,
        warm_name: Some(warm.name.clone()),
        vm_uid: Some(warm.uid.clone()),
        pod: pod.clone(),
        boot_hash: Some(warm.boot_hash.clone()),
        template_hash: Some(warm.template_hash.clone()),
        latency_ms: None,
    };
    if !warm.mine {
        mark_taken(&microvms, warm, object, mvm).await?;
    }
    hand_over(mvm, &claim, warm, pod.as_deref(), ctx).await?;
    if let Some(pod) = &pod {
        relabel_pod(mvm, pod, &ns, ctx).await?;
    }
    let took = started.elapsed();
    let status = claimed_status(mvm, object, claim, took);
    act::write_status(&microvms, mvm, &status).await?;
    remember_settled(mvm, ctx);
    delete_if_present(&microvms, &warm.name).await?;
    ctx.metrics.pool_hits.inc();
    ctx.metrics.pool_claim_duration.observe(took.as_secs_f64());
    let (reason, _, message) = outcome_event(ClaimOutcome::Claimed, pool, Some(&warm.name));
    act::publish(ctx, mvm, EventKind::Normal, reason, message).await;
    let _ = ctx.pool_triggers.send(ObjectRef::new(pool).within(&ns));
    Ok(Requeue::await_change())
}

/// Step 1: mark the warm VM as the claimant's and drop its finalizer, or fail with a conflict
/// when another claim (or anything else) changed it since the cache saw it.
async fn mark_taken(
    microvms: &Api<MicroVM>,
    warm: &WarmVm,
    object: &MicroVM,
    claimant: &MicroVM,
) -> Result<(), ReconcileError> {
    let finalizers: Vec<&String> = object
        .metadata
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = json!({"metadata": {
        "resourceVersion": warm.resource_version,
        "annotations": {CLAIMED_BY_ANNOTATION: claimant.uid()},
        "finalizers": finalizers,
    }});
    microvms
        .patch(&warm.name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(ReconcileError::kube)?;
    Ok(())
}

/// Step 2: the agent gives the VM the claimant's name, metadata and ownership; the hash it
/// already holds, so nothing boots.
async fn hand_over(
    mvm: &MicroVM,
    claim: &ClaimStatus,
    warm: &WarmVm,
    pod: Option<&str>,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let mut claimed = mvm.clone();
    claimed.status.get_or_insert_with(Default::default).claim = Some(claim.clone());
    let built = vmspec::build(&claimed, ctx.vm_pods.is_some()).map_err(ReconcileError::Spec)?;
    let pod = pod.and_then(|name| {
        let (_, store) = ctx.vm_pods.as_ref()?;
        let seen = store.get(&ObjectRef::new(name).within(&mvm.namespace()?))?;
        let view = vmpod::view(&seen);
        Some(PodRef {
            uid: view.uid,
            namespace: view.namespace,
            name: view.name,
            ip: view.ip,
        })
    });
    let request = ApplyRequest {
        spec: built.spec,
        spec_hash: built.hash,
        run: warm.run,
        desired: DesiredState::Running,
        pull_secrets: Default::default(),
        pod,
        metadata: built.metadata,
        owner: VmUid::new(mvm.uid().unwrap_or_default()).ok(),
    };
    ctx.pool
        .apply_vm(&warm.node, &request)
        .await
        .map_err(ReconcileError::Agent)?;
    Ok(())
}

/// Step 3 (pod mode): the VM pod carries the claimant's labels, not the pool's, and the
/// claimant owns it, so Services select it and garbage collection follows the claimant.
async fn relabel_pod(
    mvm: &MicroVM,
    pod: &str,
    ns: &str,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let Some((settings, store)) = ctx.vm_pods.as_ref() else {
        return Ok(());
    };
    let Ok(built) = vmpod::build(mvm, settings) else {
        return Ok(());
    };
    let seen = store.get(&ObjectRef::new(pod).within(ns));
    let patch = pod_patch(&built, seen.as_deref());
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(ReconcileError::kube)?;
    Ok(())
}

/// The merge patch giving a warm VM's pod the claimant's labels (the pool's removed), uid
/// annotation and ownerReference.
fn pod_patch(built: &Pod, seen: Option<&Pod>) -> Value {
    let mut labels = serde_json::Map::new();
    for key in seen.iter().flat_map(|p| p.labels().keys()) {
        labels.insert(key.clone(), Value::Null);
    }
    for (k, v) in built.labels() {
        labels.insert(k.clone(), json!(v));
    }
    json!({"metadata": {
        "labels": labels,
        "annotations": built.metadata.annotations,
        "ownerReferences": built.metadata.owner_references,
    }})
}

/// Step 4: the warm VM's status, as the claimant's, with the claim and Ready by claim.
fn claimed_status(
    mvm: &MicroVM,
    warm: &MicroVM,
    mut claim: ClaimStatus,
    took: Duration,
) -> MicroVMStatus {
    let generation = mvm.metadata.generation;
    let mut status = warm.status.clone().unwrap_or_default();
    status.restart_count = 0;
    status.observed_generation = generation;
    for c in &mut status.conditions {
        c.observed_generation = generation;
    }
    let message = format!(
        "took warm VM {} from pool {} in {}ms",
        claim.warm_name.as_deref().unwrap_or_default(),
        claim.pool,
        took.as_millis()
    );
    claim.latency_ms = Some(took.as_millis() as u64);
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
    set_condition_status(
        &mut status.conditions,
        ConditionType::Ready,
        "True",
        Reason::CLAIMED,
        message,
        generation,
        now,
    );
    status.phase = Some(Phase::Running);
    status.claim = Some(claim);
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_patch_swaps_the_pools_labels_for_the_claimants() {
        let mut seen = Pod::default();
        seen.metadata.labels = Some(BTreeMap::from([
            ("ignis.dev/pool".to_string(), "p".to_string()),
            ("tier".to_string(), "warm".to_string()),
            ("ignis.dev/microvm".to_string(), "p-abcde".to_string()),
        ]));
        let mut built = Pod::default();
        built.metadata.labels = Some(BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            ("ignis.dev/microvm".to_string(), "web".to_string()),
        ]));
        let patch = pod_patch(&built, Some(&seen));
        assert_eq!(
            patch["metadata"]["labels"],
            json!({"ignis.dev/pool": null, "tier": null, "app": "web", "ignis.dev/microvm": "web"})
        );
    }
}
