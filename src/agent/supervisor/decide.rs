//! The convergence rule of `ApplyVM`: idempotent by (uid, spec hash, run) and desired
//! state. Pure.

use crate::vm::{DesiredState, RunState, VmUid};

/// What `ApplyVM` must do, given what the agent holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ApplyAction {
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
    /// Save the running guest to the node's disk and end its VMM.
    Suspend,
    /// Restore the suspended guest from its snapshot (booting cold if it cannot be).
    Resume,
}

/// The part of a held VM that decides an apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HeldRun {
    pub(crate) spec_hash: String,
    pub(crate) run: u32,
    pub(crate) state: RunState,
    /// Whether this run ever started a VMM.
    pub(crate) booted: bool,
}

/// The convergence rule: idempotent by (uid, spec_hash, run) and desired state. Suspended is
/// a kind of running: a VM asked to be suspended that is not running yet boots first (the
/// controller asks again once it is ready), and a suspended VM asked to run is resumed.
pub(crate) fn decide_apply(
    held: Option<&HeldRun>,
    spec_hash: &str,
    run: u32,
    desired: DesiredState,
) -> ApplyAction {
    let want_running = desired != DesiredState::Stopped;
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
    match (held.state, desired) {
        (RunState::Running, DesiredState::Suspended) => return ApplyAction::Suspend,
        (RunState::Suspended, DesiredState::Running) => return ApplyAction::Resume,
        (RunState::Suspended | RunState::Suspending, DesiredState::Suspended) => {
            return ApplyAction::Nothing;
        }
        // Booting: it is suspended once the controller sees it ready.
        (RunState::Creating | RunState::Starting, DesiredState::Suspended) => {
            return ApplyAction::Nothing;
        }
        _ => {}
    }
    let active = !held.state.is_ended();
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
        return if held.state == RunState::Stopped && !held.booted {
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

/// Who an apply or a delete comes from, against whom the VM answers to (issue #20's warm
/// pools): a pool's warm VM W is claimed by the MicroVM C that names the pool, and from then
/// on answers to C alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum OwnerDecision {
    /// The request is the VM's owner's (or nobody owns it): decide as usual.
    Proceed,
    /// A VM nobody owns is taken by the request's owner: record the owner, take the
    /// request's name and metadata, then decide as usual (the same hash: no boot).
    Claim(VmUid),
    /// Someone else's request for a VM already claimed: change nothing.
    Ignore,
}

/// Whether an apply that names `asked` as owner may change a VM held with `held` as owner.
/// `held_at_all`: the agent holds the VM (a claim of a VM it does not hold boots one for its
/// owner, as any first apply does).
pub(crate) fn decide_owner(
    held_at_all: bool,
    held: Option<&VmUid>,
    asked: Option<&VmUid>,
) -> OwnerDecision {
    match (held, asked) {
        (Some(owner), Some(asked)) if owner == asked => OwnerDecision::Proceed,
        (Some(_), _) => OwnerDecision::Ignore,
        (None, Some(asked)) if held_at_all => OwnerDecision::Claim(asked.clone()),
        (None, _) => OwnerDecision::Proceed,
    }
}

/// Whether a delete asked by `asker` (`None`: the VM's own uid) may remove a VM whose owner
/// is `owner`. A VM nobody owns is removed for whoever asks: a claimant whose claim never
/// reached this agent still gets the VM it was given deleted.
pub(crate) fn may_delete(owner: Option<&VmUid>, vm: &VmUid, asker: Option<&VmUid>) -> bool {
    match owner {
        None => true,
        Some(owner) => asker.unwrap_or(vm) == owner,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> VmUid {
        VmUid::new(s).expect("uid")
    }

    #[test]
    fn a_claimed_vm_answers_to_its_claimant_only() {
        let (w, c, d) = (uid("w"), uid("c"), uid("d"));
        assert_eq!(decide_owner(false, None, None), OwnerDecision::Proceed);
        assert_eq!(decide_owner(true, None, None), OwnerDecision::Proceed);
        assert_eq!(
            decide_owner(true, None, Some(&c)),
            OwnerDecision::Claim(c.clone()),
            "a warm VM is claimed"
        );
        assert_eq!(
            decide_owner(false, None, Some(&c)),
            OwnerDecision::Proceed,
            "nothing held: an ordinary first apply, with its owner"
        );
        assert_eq!(
            decide_owner(true, Some(&c), Some(&c)),
            OwnerDecision::Proceed
        );
        assert_eq!(
            decide_owner(true, Some(&c), None),
            OwnerDecision::Ignore,
            "a stale apply of the warm VM"
        );
        assert_eq!(
            decide_owner(true, Some(&c), Some(&d)),
            OwnerDecision::Ignore,
            "a second claim"
        );
        assert!(may_delete(None, &w, None));
        assert!(may_delete(None, &w, Some(&c)));
        assert!(may_delete(Some(&c), &w, Some(&c)));
        assert!(!may_delete(Some(&c), &w, None), "the warm VM's own delete");
        assert!(!may_delete(Some(&c), &w, Some(&w)));
        assert!(!may_delete(Some(&c), &w, Some(&d)));
    }

    fn held(hash: &str, run: u32, state: RunState, booted: bool) -> HeldRun {
        HeldRun {
            spec_hash: hash.into(),
            run,
            state,
            booted,
        }
    }

    #[test]
    fn apply_is_idempotent_by_hash_run_and_desired_state() {
        use ApplyAction::*;
        use DesiredState::{Running, Stopped};
        assert_eq!(decide_apply(None, "h", 1, Running), Boot);
        assert_eq!(decide_apply(None, "h", 1, Stopped), RecordStopped);
        let running = held("h", 1, RunState::Running, true);
        assert_eq!(decide_apply(Some(&running), "h", 1, Running), Nothing);
        assert_eq!(
            decide_apply(Some(&running), "h2", 1, Running),
            Boot,
            "new hash replaces"
        );
        assert_eq!(
            decide_apply(Some(&running), "h2", 1, Stopped),
            RecordStopped
        );
        assert_eq!(decide_apply(Some(&running), "h", 1, Stopped), Stop);
        assert_eq!(
            decide_apply(Some(&running), "h", 2, Running),
            AdoptRun,
            "still running: no reboot"
        );
        assert_eq!(
            decide_apply(Some(&running), "h", 0, Running),
            Nothing,
            "stale run"
        );
        let exited = held("h", 1, RunState::Exited, true);
        assert_eq!(
            decide_apply(Some(&exited), "h", 1, Running),
            Nothing,
            "an ended run stays ended"
        );
        assert_eq!(
            decide_apply(Some(&exited), "h", 2, Running),
            Boot,
            "run N+1 boots again"
        );
        assert_eq!(decide_apply(Some(&exited), "h", 2, Stopped), AdoptRun);
        let failed = held("h", 3, RunState::Failed, false);
        assert_eq!(decide_apply(Some(&failed), "h", 3, Running), Nothing);
        assert_eq!(decide_apply(Some(&failed), "h", 4, Running), Boot);
        let never_booted = held("h", 1, RunState::Stopped, false);
        assert_eq!(decide_apply(Some(&never_booted), "h", 1, Running), Boot);
        let stopped = held("h", 1, RunState::Stopped, true);
        assert_eq!(decide_apply(Some(&stopped), "h", 1, Running), Nothing);
    }

    #[test]
    fn suspend_saves_a_running_vm_and_resume_restores_it() {
        use ApplyAction::*;
        use DesiredState::{Running, Stopped, Suspended};
        let running = held("h", 1, RunState::Running, true);
        assert_eq!(decide_apply(Some(&running), "h", 1, Suspended), Suspend);
        let starting = held("h", 1, RunState::Starting, true);
        assert_eq!(
            decide_apply(Some(&starting), "h", 1, Suspended),
            Nothing,
            "suspended once ready"
        );
        assert_eq!(
            decide_apply(None, "h", 1, Suspended),
            Boot,
            "a VM never booted boots first"
        );
        let suspended = held("h", 1, RunState::Suspended, true);
        assert_eq!(decide_apply(Some(&suspended), "h", 1, Suspended), Nothing);
        assert_eq!(decide_apply(Some(&suspended), "h", 1, Running), Resume);
        assert_eq!(decide_apply(Some(&suspended), "h", 2, Running), Resume);
        assert_eq!(
            decide_apply(Some(&suspended), "h", 1, Stopped),
            Stop,
            "stopping a suspended VM drops its snapshot"
        );
        assert_eq!(
            decide_apply(Some(&suspended), "h2", 1, Running),
            Boot,
            "another spec boots cold"
        );
        assert_eq!(decide_apply(Some(&suspended), "h", 0, Running), Nothing);
    }
}
