//! The convergence rule of `ApplyVM`: idempotent by (uid, spec hash, run) and desired
//! state. Pure.

use crate::vm::{DesiredState, RunState};

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

#[cfg(test)]
mod tests {
    use super::*;

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
