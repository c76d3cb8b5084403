//! The convergence rule of `ApplyVM`: idempotent by (uid, spec hash, run) and desired
//! state. Pure.

use crate::vm::RunState;

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

/// The convergence rule: idempotent by (uid, spec_hash, run) and desired state.
pub(crate) fn decide_apply(
    held: Option<&HeldRun>,
    spec_hash: &str,
    run: u32,
    want_running: bool,
) -> ApplyAction {
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
        assert_eq!(decide_apply(None, "h", 1, true), Boot);
        assert_eq!(decide_apply(None, "h", 1, false), RecordStopped);
        let running = held("h", 1, RunState::Running, true);
        assert_eq!(decide_apply(Some(&running), "h", 1, true), Nothing);
        assert_eq!(
            decide_apply(Some(&running), "h2", 1, true),
            Boot,
            "new hash replaces"
        );
        assert_eq!(decide_apply(Some(&running), "h2", 1, false), RecordStopped);
        assert_eq!(decide_apply(Some(&running), "h", 1, false), Stop);
        assert_eq!(
            decide_apply(Some(&running), "h", 2, true),
            AdoptRun,
            "still running: no reboot"
        );
        assert_eq!(
            decide_apply(Some(&running), "h", 0, true),
            Nothing,
            "stale run"
        );
        let exited = held("h", 1, RunState::Exited, true);
        assert_eq!(
            decide_apply(Some(&exited), "h", 1, true),
            Nothing,
            "an ended run stays ended"
        );
        assert_eq!(
            decide_apply(Some(&exited), "h", 2, true),
            Boot,
            "run N+1 boots again"
        );
        assert_eq!(decide_apply(Some(&exited), "h", 2, false), AdoptRun);
        let failed = held("h", 3, RunState::Failed, false);
        assert_eq!(decide_apply(Some(&failed), "h", 3, true), Nothing);
        assert_eq!(decide_apply(Some(&failed), "h", 4, true), Boot);
        let never_booted = held("h", 1, RunState::Stopped, false);
        assert_eq!(decide_apply(Some(&never_booted), "h", 1, true), Boot);
        let stopped = held("h", 1, RunState::Stopped, true);
        assert_eq!(decide_apply(Some(&stopped), "h", 1, true), Nothing);
    }
}
