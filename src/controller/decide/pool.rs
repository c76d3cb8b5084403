//! A pool's reconcile decision: how many warm VMs to make or remove, and the pool's status.
//! Pure: the warm VMs come in as plain values.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{ConditionType, MicroVMPoolStatus, set_condition_status};

/// Warm VMs one pool boots at once. A boot takes CPU the node's claims need right then (under
/// TCG a boot is all CPU); the pool fills in waves of this many instead, which costs a
/// CPU-bound fill nothing and keeps claims during a refill fast.
pub(crate) const MAX_BOOTING: u32 = 4;

/// The longest a pool holds its refill and status for claims being settled: claims come
/// first (each refill is API writes and a boot the claims would wait behind), but a steady
/// stream of claims must not starve the refill.
pub(crate) const REFILL_HOLD: Duration = Duration::from_secs(1);

/// A warm VM of the pool, as the pool sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WarmState {
    pub(crate) name: String,
    pub(crate) ready: bool,
    /// Stalled (a permanent failure): the template cannot make a working VM.
    pub(crate) stalled: Option<String>,
}

/// Everything a pool's reconcile looked at.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PoolView {
    pub(crate) replicas: u32,
    pub(crate) generation: Option<i64>,
    /// Unclaimed warm VMs not being deleted.
    pub(crate) warm: Vec<WarmState>,
    /// MicroVMs now running a VM taken from this pool.
    pub(crate) claimed: u64,
    pub(crate) old: MicroVMPoolStatus,
    pub(crate) now: Time,
    /// The API server refused a warm VM made from the template (admission: a host path or
    /// bridge the admin does not allow), with its message.
    pub(crate) refused: Option<String>,
    /// Claims naming the pool are being settled, and the pool has held for them less than
    /// [`REFILL_HOLD`].
    pub(crate) claims_settling: bool,
}

/// What the pool's reconcile does.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PoolPlan {
    /// Warm VMs to make.
    pub(crate) create: u32,
    /// Warm VMs to remove (scale-down), the not-Ready ones first.
    pub(crate) delete: Vec<String>,
    /// The status to write, when it changed.
    pub(crate) status: Option<MicroVMPoolStatus>,
    /// Held for claims: nothing done, look again soon.
    pub(crate) held: bool,
}

pub(crate) fn decide_pool(view: &PoolView) -> PoolPlan {
    if view.claims_settling {
        return PoolPlan {
            create: 0,
            delete: Vec::new(),
            status: None,
            held: true,
        };
    }
    let have = view.warm.len() as u32;
    let ready = view.warm.iter().filter(|w| w.ready).count() as u32;
    let stalled = view
        .refused
        .as_ref()
        .map(|why| {
            (
                "TemplateRefused",
                format!("the API server refused a warm VM: {why}"),
            )
        })
        .or_else(|| {
            view.warm.iter().find_map(|w| {
                w.stalled.as_ref().map(|message| {
                    (
                        "WarmVmFailed",
                        format!("warm VM {} failed: {message}", w.name),
                    )
                })
            })
        });
    // A template that fails makes no more VMs until the pool changes: replacing them would
    // only fail again, as fast as the node boots.
    let booting = view
        .warm
        .iter()
        .filter(|w| !w.ready && w.stalled.is_none())
        .count() as u32;
    let create = if stalled.is_some() {
        0
    } else {
        view.replicas
            .saturating_sub(have)
            .min(MAX_BOOTING.saturating_sub(booting))
    };
    let mut delete = Vec::new();
    if have > view.replicas {
        let mut order: Vec<&WarmState> = view.warm.iter().collect();
        order.sort_by_key(|w| (w.ready, w.name.clone()));
        delete = order
            .into_iter()
            .take((have - view.replicas) as usize)
            .map(|w| w.name.clone())
            .collect();
    }
    let mut status = MicroVMPoolStatus {
        replicas: have,
        ready_replicas: ready,
        claimed: view.claimed,
        observed_generation: view.generation,
        conditions: view.old.conditions.clone(),
    };
    let generation = view.generation;
    let full = ready == view.replicas && have == view.replicas;
    let (reason, message) = if full {
        (
            "Filled",
            format!("{ready} of {} warm VMs Ready", view.replicas),
        )
    } else {
        (
            "Filling",
            format!("{ready} of {} warm VMs Ready ({have} made)", view.replicas),
        )
    };
    let mut set = |type_, on: bool, reason: &str, message: String| {
        set_condition_status(
            &mut status.conditions,
            type_,
            if on { "True" } else { "False" },
            reason,
            message,
            generation,
            view.now.clone(),
        );
    };
    set(ConditionType::Ready, full, reason, message.clone());
    match &stalled {
        Some((why_reason, why)) => {
            set(ConditionType::Stalled, true, why_reason, why.clone());
            set(ConditionType::Reconciling, false, why_reason, why.clone());
        }
        None => {
            set(ConditionType::Stalled, false, reason, message.clone());
            set(ConditionType::Reconciling, !full, reason, message);
        }
    }
    PoolPlan {
        create,
        delete,
        status: (status != view.old).then_some(status),
        held: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::find_condition;

    fn warm(name: &str, ready: bool) -> WarmState {
        WarmState {
            name: name.into(),
            ready,
            stalled: None,
        }
    }

    fn view(replicas: u32, warm: Vec<WarmState>) -> PoolView {
        PoolView {
            replicas,
            generation: Some(2),
            warm,
            claimed: 0,
            old: MicroVMPoolStatus::default(),
            now: Time(jiff::Timestamp::UNIX_EPOCH),
            refused: None,
            claims_settling: false,
        }
    }

    fn condition(plan: &PoolPlan, type_: ConditionType) -> (String, String) {
        let status = plan.status.as_ref().expect("status");
        let c = find_condition(&status.conditions, type_).expect("condition");
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn an_empty_pool_makes_its_warm_vms_and_reconciles() {
        let plan = decide_pool(&view(3, vec![]));
        assert_eq!(plan.create, 3);
        let big = decide_pool(&view(20, vec![warm("a", false)]));
        assert_eq!(big.create, MAX_BOOTING - 1, "a wave at a time");
        assert!(plan.delete.is_empty());
        assert_eq!(
            condition(&plan, ConditionType::Reconciling),
            ("True".into(), "Filling".into())
        );
        assert_eq!(
            condition(&plan, ConditionType::Ready),
            ("False".into(), "Filling".into())
        );
    }

    #[test]
    fn a_full_pool_is_ready_and_current() {
        let plan = decide_pool(&view(2, vec![warm("a", true), warm("b", true)]));
        assert_eq!(plan.create, 0);
        let status = plan.status.clone().expect("status");
        assert_eq!((status.replicas, status.ready_replicas), (2, 2));
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(
            condition(&plan, ConditionType::Ready),
            ("True".into(), "Filled".into())
        );
        assert_eq!(condition(&plan, ConditionType::Reconciling).0, "False");
        assert_eq!(condition(&plan, ConditionType::Stalled).0, "False");
    }

    #[test]
    fn a_claim_is_refilled() {
        let plan = decide_pool(&view(2, vec![warm("a", true)]));
        assert_eq!(plan.create, 1);
    }

    #[test]
    fn claims_being_settled_hold_the_refill_and_the_status_write() {
        let settling = PoolView {
            claims_settling: true,
            ..view(2, vec![warm("a", true)])
        };
        let plan = decide_pool(&settling);
        assert!(plan.held);
        assert_eq!((plan.create, plan.status), (0, None));
        assert!(plan.delete.is_empty());
        let after = decide_pool(&view(2, vec![warm("a", true)]));
        assert!(!after.held);
        assert_eq!(
            after.create, 1,
            "the refill follows once the claims are settled"
        );
    }

    #[test]
    fn scaling_down_removes_unready_vms_first() {
        let plan = decide_pool(&view(
            1,
            vec![warm("a", true), warm("b", false), warm("c", true)],
        ));
        assert_eq!(plan.create, 0);
        assert_eq!(plan.delete, vec!["b".to_string(), "a".to_string()]);
    }

    #[test]
    fn a_failing_template_stalls_the_pool_and_stops_making_vms() {
        let mut failed = warm("a", false);
        failed.stalled = Some("kernel not found".into());
        let plan = decide_pool(&view(3, vec![failed]));
        assert_eq!(plan.create, 0);
        assert_eq!(
            condition(&plan, ConditionType::Stalled),
            ("True".into(), "WarmVmFailed".into())
        );
    }

    #[test]
    fn a_template_the_api_refuses_stalls_the_pool() {
        let refused = PoolView {
            refused: Some("spec.kernel.path: not beneath an allowed directory".into()),
            ..view(2, vec![])
        };
        let plan = decide_pool(&refused);
        assert_eq!(plan.create, 0);
        assert_eq!(
            condition(&plan, ConditionType::Stalled),
            ("True".into(), "TemplateRefused".into())
        );
    }

    #[test]
    fn an_unchanged_status_is_not_written() {
        let first = decide_pool(&view(1, vec![warm("a", true)]));
        let again = PoolView {
            old: first.status.expect("status"),
            ..view(1, vec![warm("a", true)])
        };
        assert_eq!(decide_pool(&again).status, None);
    }
}
