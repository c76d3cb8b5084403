//! A MicroVM naming a pool: take one of its warm VMs, or boot cold and say why. Pure: the
//! pool, the warm VMs and the claimant's template hash come in as plain values.

use std::time::Duration;

use crate::api::ClaimOutcome;

/// How long a claim waits for its pool to appear (a pool and its first claims applied
/// together, the claims seen first) before it boots cold with `PoolNotFound`.
pub(crate) const POOL_GRACE: Duration = Duration::from_secs(10);
/// How often a claim waiting for its pool looks again.
pub(crate) const POOL_WAIT_RETRY: Duration = Duration::from_secs(1);

/// A warm VM of the pool as a claim sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct WarmVm {
    /// The warm MicroVM's name and uid (the agent's key for the VM).
    pub(crate) name: String,
    pub(crate) uid: String,
    pub(crate) resource_version: String,
    pub(crate) node: String,
    /// The hash the agent holds for the VM's boot.
    pub(crate) boot_hash: String,
    /// The run the agent holds.
    pub(crate) run: u32,
    /// The hash of the warm VM's spec without identity and userData.
    pub(crate) template_hash: String,
    /// Already claimed by this claimant (a claim cut short, now resumed).
    pub(crate) mine: bool,
}

/// What a claim knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClaimView {
    /// The pool's template hash, `None` when the pool does not exist (or is being deleted).
    pub(crate) pool_template: Option<String>,
    /// The claimant's own template hash.
    pub(crate) template_hash: String,
    /// Warm VMs that are Ready, not claimed by anyone else, and not being taken by another
    /// claim right now; in the order to take them.
    pub(crate) warm: Vec<WarmVm>,
    /// Since the claimant was created.
    pub(crate) age: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum ClaimDecision {
    Take(WarmVm),
    /// Boot cold; the outcome says why.
    Cold(ClaimOutcome),
    /// The pool is not there yet: look again after this.
    Wait(Duration),
}

pub(crate) fn decide_claim(view: &ClaimView) -> ClaimDecision {
    if let Some(mine) = view.warm.iter().find(|w| w.mine) {
        return ClaimDecision::Take(mine.clone());
    }
    let Some(pool_template) = &view.pool_template else {
        return if view.age < POOL_GRACE {
            ClaimDecision::Wait(POOL_WAIT_RETRY)
        } else {
            ClaimDecision::Cold(ClaimOutcome::PoolNotFound)
        };
    };
    if *pool_template != view.template_hash {
        return ClaimDecision::Cold(ClaimOutcome::TemplateMismatch);
    }
    match view
        .warm
        .iter()
        .find(|w| w.template_hash == view.template_hash)
    {
        Some(warm) => ClaimDecision::Take(warm.clone()),
        None => ClaimDecision::Cold(ClaimOutcome::PoolEmpty),
    }
}

/// The Event a claim's outcome gets: reason, whether it is a warning, message.
pub(crate) fn outcome_event(
    outcome: ClaimOutcome,
    pool: &str,
    warm: Option<&str>,
) -> (&'static str, bool, String) {
    match outcome {
        ClaimOutcome::Claimed => (
            "Claimed",
            false,
            format!(
                "took warm VM {} from pool {pool}",
                warm.unwrap_or("(unknown)")
            ),
        ),
        ClaimOutcome::PoolEmpty => (
            "PoolEmpty",
            false,
            format!("pool {pool} had no Ready warm VM: booting cold"),
        ),
        ClaimOutcome::PoolNotFound => (
            "PoolNotFound",
            true,
            format!("no MicroVMPool {pool} in this namespace: booting cold"),
        ),
        ClaimOutcome::TemplateMismatch => (
            "TemplateMismatch",
            true,
            format!(
                "the spec differs from pool {pool}'s template in a field that needs a boot \
                 (only userData, runPolicy, suspend and the grace period may differ): booting cold"
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm(name: &str, template: &str, mine: bool) -> WarmVm {
        WarmVm {
            name: name.into(),
            uid: format!("{name}-uid"),
            resource_version: "1".into(),
            node: "node-a".into(),
            boot_hash: "b".into(),
            run: 1,
            template_hash: template.into(),
            mine,
        }
    }

    fn view(pool: Option<&str>, warm: Vec<WarmVm>) -> ClaimView {
        ClaimView {
            pool_template: pool.map(str::to_string),
            template_hash: "t".into(),
            warm,
            age: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_ready_warm_vm_of_the_same_template_is_taken() {
        let v = view(
            Some("t"),
            vec![warm("p-1", "old", false), warm("p-2", "t", false)],
        );
        assert_eq!(
            decide_claim(&v),
            ClaimDecision::Take(warm("p-2", "t", false))
        );
    }

    #[test]
    fn a_claim_cut_short_takes_the_vm_it_marked() {
        let v = view(None, vec![warm("p-1", "t", false), warm("p-2", "t", true)]);
        assert_eq!(
            decide_claim(&v),
            ClaimDecision::Take(warm("p-2", "t", true))
        );
    }

    #[test]
    fn no_ready_vm_boots_cold_as_pool_empty() {
        assert_eq!(
            decide_claim(&view(Some("t"), vec![warm("p-1", "old", false)])),
            ClaimDecision::Cold(ClaimOutcome::PoolEmpty)
        );
        assert_eq!(
            decide_claim(&view(Some("t"), vec![])),
            ClaimDecision::Cold(ClaimOutcome::PoolEmpty)
        );
    }

    #[test]
    fn a_spec_unlike_the_template_boots_cold() {
        assert_eq!(
            decide_claim(&view(Some("other"), vec![warm("p-1", "t", false)])),
            ClaimDecision::Cold(ClaimOutcome::TemplateMismatch)
        );
    }

    #[test]
    fn a_missing_pool_is_waited_for_then_booted_cold() {
        assert_eq!(
            decide_claim(&view(None, vec![])),
            ClaimDecision::Wait(POOL_WAIT_RETRY)
        );
        let late = ClaimView {
            age: POOL_GRACE,
            ..view(None, vec![])
        };
        assert_eq!(
            decide_claim(&late),
            ClaimDecision::Cold(ClaimOutcome::PoolNotFound)
        );
    }

    #[test]
    fn misses_name_their_cause() {
        let (reason, warning, message) = outcome_event(ClaimOutcome::TemplateMismatch, "p", None);
        assert_eq!(reason, "TemplateMismatch");
        assert!(warning);
        assert!(message.contains("booting cold"), "{message}");
    }
}
