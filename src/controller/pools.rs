//! `MicroVMPool`s: keep each pool's warm VMs made and count them (`decide/pool.rs` decides).
//! Warm VMs are MicroVMs owned by their pool, named `<pool>-<5 random characters>`, carrying
//! the template's labels and `ignis.dev/pool`; the MicroVM reconcile boots them like any
//! other, and nudges their pool whenever one changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action as Requeue;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use super::decide::pool::{PoolView, REFILL_HOLD, WarmState, decide_pool};
use super::metrics::ControllerMetrics;
use super::reconcile::{Context, ReconcileError, delete_if_present, retry_delay};
use crate::api::{
    API_VERSION, ClaimOutcome, ConditionType, FIELD_MANAGER, MicroVM, MicroVMPool, POOL_LABEL,
    find_condition,
};

/// How often a pool is looked at when nothing triggers it.
const POOL_RESYNC: Duration = Duration::from_secs(60);
/// Pools reconciled at once.
const POOL_CONCURRENCY: u16 = 4;
/// How soon a pool held for its claims looks again.
const HOLD_RETRY: Duration = Duration::from_millis(50);

/// The pool cache and what the pool controller needs to start later.
pub(super) struct PoolWatch {
    pub(super) store: Store<MicroVMPool>,
    /// Cancelled once the pool cache has its first complete list.
    pub(super) listed: CancellationToken,
    pub(super) triggers: mpsc::UnboundedSender<ObjectRef<MicroVMPool>>,
    start: Box<dyn FnOnce(Arc<Context>, CancellationToken) + Send>,
}

impl PoolWatch {
    /// Start the pool controller, now that the MicroVM context exists.
    pub(super) fn start(self, ctx: Arc<Context>, shutdown: CancellationToken) {
        (self.start)(ctx, shutdown)
    }
}

/// Watch the pools of `namespace` (all when `None`).
pub(super) fn watch(client: &Client, namespace: Option<&str>) -> PoolWatch {
    let api: Api<MicroVMPool> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, writer) = reflector::store();
    let listed = CancellationToken::new();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(|p: &mut MicroVMPool| {
            p.meta_mut().managed_fields = None;
            p.meta_mut().annotations = None;
        }),
    )
    .inspect_ok(super::cancel_when_listed(listed.clone()))
    .default_backoff()
    .applied_objects();
    let (triggers, rx) = mpsc::unbounded_channel::<ObjectRef<MicroVMPool>>();
    let controller_store = store.clone();
    let start = Box::new(move |ctx: Arc<Context>, shutdown: CancellationToken| {
        let controller = Controller::for_stream(stream, controller_store).with_config(
            kube::runtime::controller::Config::default().concurrency(POOL_CONCURRENCY),
        );
        let pool_ctx = Arc::new(PoolContext {
            ctx,
            made: Mutex::new(HashMap::new()),
            holding: Mutex::new(HashMap::new()),
        });
        tokio::spawn(async move {
            controller
                .reconcile_on(UnboundedReceiverStream::new(rx))
                .graceful_shutdown_on(shutdown.cancelled_owned())
                .run(reconcile, error_policy, pool_ctx)
                .for_each(|_| async {})
                .await;
        });
    });
    PoolWatch {
        store,
        listed,
        triggers,
        start,
    }
}

struct PoolContext {
    ctx: Arc<Context>,
    /// Warm VMs made and not yet seen Ready, with when: the refill time.
    made: Mutex<HashMap<String, Instant>>,
    /// Pools (by uid) holding for their claims, with since when.
    holding: Mutex<HashMap<String, Instant>>,
}

/// Whether `pool` holds for its claims now: some are being settled, and it has not held for
/// them longer than [`REFILL_HOLD`] (then it refills a wave and may hold again).
fn hold_for_claims(pctx: &PoolContext, pool_uid: &str, settling: bool) -> bool {
    let Ok(mut holding) = pctx.holding.lock() else {
        return false;
    };
    if !settling {
        holding.remove(pool_uid);
        return false;
    }
    let since = *holding
        .entry(pool_uid.to_string())
        .or_insert_with(Instant::now);
    if since.elapsed() < REFILL_HOLD {
        return true;
    }
    holding.remove(pool_uid);
    false
}

fn error_policy(pool: Arc<MicroVMPool>, error: &ReconcileError, _: Arc<PoolContext>) -> Requeue {
    tracing::warn!(pool = %pool.name_any(), %error, "pool reconcile failed");
    Requeue::requeue(retry_delay(1))
}

/// A warm VM's state as its pool counts it.
fn warm_state(vm: &MicroVM) -> WarmState {
    let conditions = vm.status.as_ref().map(|s| s.conditions.as_slice());
    let find = |t| conditions.and_then(|c| find_condition(c, t));
    WarmState {
        name: vm.name_any(),
        ready: find(ConditionType::Ready).is_some_and(|c| c.status == "True"),
        stalled: find(ConditionType::Stalled)
            .filter(|c| c.status == "True")
            .map(|c| c.message.clone()),
    }
}

async fn reconcile(
    pool: Arc<MicroVMPool>,
    pctx: Arc<PoolContext>,
) -> Result<Requeue, ReconcileError> {
    let ctx = &pctx.ctx;
    if pool.metadata.deletion_timestamp.is_some() {
        // Garbage collection takes the warm VMs (they are owned by the pool); claimed ones
        // are the claimants' and stay.
        return Ok(Requeue::await_change());
    }
    let ns = pool.namespace().ok_or(ReconcileError::NoNamespace)?;
    let name = pool.name_any();
    let pool_uid = pool.uid().unwrap_or_default();
    let mut warm = Vec::new();
    let mut claimed = 0;
    let mut settling = false;
    for vm in ctx.store.state() {
        if vm.namespace().as_deref() != Some(ns.as_str()) {
            continue;
        }
        if vm.spec.pool.as_deref() == Some(name.as_str())
            && super::claim::pending(&vm)
            && !super::claim::settled_but_not_seen(&vm, ctx)
        {
            settling = true;
        }
        if vm
            .status
            .as_ref()
            .and_then(|s| s.claim.as_ref())
            .is_some_and(|c| c.pool == name && c.outcome == ClaimOutcome::Claimed)
        {
            claimed += 1;
        }
        let member = super::claim::pool_of(&vm) == Some(name.as_str())
            && vm.owner_references().iter().any(|o| o.uid == pool_uid);
        if member && !super::claim::taken(&vm) && vm.metadata.deletion_timestamp.is_none() {
            warm.push(warm_state(&vm));
        }
    }
    record_refills(&pctx, &ctx.metrics, &warm);
    let mut view = PoolView {
        replicas: pool.spec.replicas,
        generation: pool.metadata.generation,
        warm,
        claimed,
        old: pool.status.clone().unwrap_or_default(),
        now: Time(jiff::Timestamp::now()),
        refused: None,
        claims_settling: hold_for_claims(&pctx, &pool_uid, settling),
    };
    let mut plan = decide_pool(&view);
    if plan.held {
        return Ok(Requeue::requeue(HOLD_RETRY));
    }
    let microvms: Api<MicroVM> = Api::namespaced(ctx.client.clone(), &ns);
    for _ in 0..plan.create {
        let vm = warm_vm(&pool);
        match microvms.create(&PostParams::default(), &vm).await {
            Ok(made) => {
                if let Ok(mut m) = pctx.made.lock() {
                    m.insert(made.name_any(), Instant::now());
                }
            }
            // Admission refused the template: no retry helps until the pool changes.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 403 => {
                view.refused = Some(s.message.clone());
                plan = decide_pool(&view);
                break;
            }
            Err(error) => return Err(ReconcileError::kube(error)),
        }
    }
    for victim in &plan.delete {
        delete_if_present(&microvms, victim).await?;
    }
    if let Some(status) = plan.status {
        let pools: Api<MicroVMPool> = Api::namespaced(ctx.client.clone(), &ns);
        let body = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "MicroVMPool",
            "status": status,
        });
        pools
            .patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(body),
            )
            .await
            .map_err(ReconcileError::kube)?;
    }
    Ok(Requeue::requeue(POOL_RESYNC))
}

/// Observe the refill time of each warm VM made here that is Ready now.
fn record_refills(pctx: &PoolContext, metrics: &ControllerMetrics, warm: &[WarmState]) {
    let Ok(mut made) = pctx.made.lock() else {
        return;
    };
    for w in warm.iter().filter(|w| w.ready) {
        if let Some(at) = made.remove(&w.name) {
            metrics
                .pool_refill_duration
                .observe(at.elapsed().as_secs_f64());
        }
    }
    // Bounded: entries of VMs that never became Ready go after an hour.
    made.retain(|_, at| at.elapsed() < Duration::from_secs(3600));
}

/// A new warm VM of `pool`.
fn warm_vm(pool: &MicroVMPool) -> MicroVM {
    let name = format!("{}-{}", pool.name_any(), suffix());
    let mut vm = MicroVM::new(&name, pool.spec.template.spec.clone());
    vm.spec.pool = None;
    vm.metadata.namespace = pool.namespace();
    let mut labels = pool.spec.template.metadata.labels.clone();
    labels.insert(POOL_LABEL.to_string(), pool.name_any());
    vm.metadata.labels = Some(labels);
    vm.metadata.owner_references = Some(vec![OwnerReference {
        api_version: API_VERSION.to_string(),
        kind: "MicroVMPool".to_string(),
        name: pool.name_any(),
        uid: pool.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    vm
}

/// Five characters as `generateName` makes them (no vowels, so no words).
fn suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Delete the warm VMs of pools that are gone (`ignis dev` has no garbage collector; on a
/// cluster this finds nothing the collector has not taken) and the marked warm VMs of
/// claims whose claimant is gone.
pub(super) async fn sweep(ctx: &Context) {
    if !ctx.pools_listed.is_cancelled() {
        return;
    }
    let state = ctx.store.state();
    let claimants: std::collections::HashSet<String> =
        state.iter().filter_map(|o| o.uid()).collect();
    // Warm VMs whose claim is complete: the claim deletes them itself; this finds those whose
    // delete failed.
    let moved: std::collections::HashSet<String> = state
        .iter()
        .filter_map(|o| o.status.as_ref()?.claim.as_ref()?.vm_uid.clone())
        .collect();
    for vm in &state {
        let Some(pool) = super::claim::pool_of(vm) else {
            continue;
        };
        if vm.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = vm.namespace().unwrap_or_default();
        let pool_alive = ctx
            .pools
            .get(&ObjectRef::new(pool).within(&ns))
            .is_some_and(|p| {
                vm.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == p.uid().as_ref())
            });
        let orphan_mark = super::claim::claimed_by(vm).is_some_and(|by| !claimants.contains(by))
            || vm.uid().is_some_and(|uid| moved.contains(&uid));
        // Only what a pool made: a MicroVM someone labelled by hand is not a warm VM.
        let made_by_pool = vm
            .owner_references()
            .iter()
            .any(|o| o.kind == "MicroVMPool");
        let unclaimed_orphan = made_by_pool && !super::claim::taken(vm) && !pool_alive;
        if unclaimed_orphan || orphan_mark {
            let api: Api<MicroVM> = Api::namespaced(ctx.client.clone(), &ns);
            if let Err(error) = api.delete(&vm.name_any(), &DeleteParams::default()).await {
                tracing::debug!(name = %vm.name_any(), %error, "sweeping a warm VM");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MicroVmBuilder;

    #[test]
    fn a_warm_vm_carries_the_pools_labels_and_owner_only() {
        let mut pool = MicroVmBuilder::new("x")
            .namespace("team")
            .label("app", "web")
            .pool_of("web", 3);
        pool.metadata.uid = Some("pool-uid".into());
        let vm = warm_vm(&pool);
        assert!(vm.name_any().starts_with("web-") && vm.name_any().len() == 9);
        assert_eq!(vm.namespace().as_deref(), Some("team"));
        assert_eq!(
            vm.labels().clone(),
            [
                ("app".to_string(), "web".to_string()),
                (POOL_LABEL.to_string(), "web".to_string())
            ]
            .into()
        );
        assert_eq!(vm.owner_references()[0].uid, "pool-uid");
        assert_eq!(vm.spec.pool, None);
    }
}
