//! `spec.suspend`: when to ask the agent to save a running VM or to restore a saved one, and
//! how the MicroVM shows it. Suspended is a settled state (kstatus Current, no `Ready`), with
//! its own phase and a `Suspended` condition; a suspend the node refused or could not do, and
//! a snapshot that could not be restored, show as `Suspended=False` with the agent's reason.

use super::*;

/// How long after a refused or failed suspend the controller asks the agent again (the node's
/// limit may have room by then).
const SUSPEND_RETRY: Duration = Duration::from_secs(30);

/// The fixed words of the agent's snapshot issues, as Event reasons.
fn issue_reason(word: &str) -> &'static str {
    match word {
        "SnapshotLimitReached" => "SnapshotLimitReached",
        "SnapshotUnrestorable" => "SnapshotUnrestorable",
        _ => "SnapshotFailed",
    }
}

impl Planner<'_> {
    /// Decide the reconcile of a VM whose state or spec is about suspending; `false` leaves
    /// it to the usual run states.
    pub(super) fn suspension(&mut self, node: &str, vm: &VmStatus) -> bool {
        let wanted = self.mvm.spec.suspend;
        self.snapshot_issue(vm);
        match (vm.state, wanted) {
            (RunState::Suspending, _) => {
                self.suspending(node);
                true
            }
            (RunState::Suspended, true) => {
                self.suspended(node, vm);
                true
            }
            (RunState::Suspended, false) => {
                self.apply_desired(node, vm.run, DesiredState::Running);
                self.event(
                    EventKind::Normal,
                    "Resuming",
                    format!("restoring the VM from its snapshot on {node}"),
                );
                self.set_phase(Phase::Starting);
                self.cond(
                    ConditionType::Ready,
                    "False",
                    Reason::RESUMING,
                    format!("restoring the VM from its snapshot on {node}"),
                );
                self.kstatus(true, None);
                true
            }
            (RunState::Running, true) if vm.ready => self.suspend_running(node, vm),
            _ => false,
        }
    }

    /// Ask for a ready VM to be saved, unless the node refused a moment ago.
    fn suspend_running(&mut self, node: &str, vm: &VmStatus) -> bool {
        let refused = vm
            .snapshot_issue
            .as_ref()
            .filter(|i| i.reason != "SnapshotUnrestorable");
        if let Some(issue) = refused {
            let since = self.obs.now.as_millisecond() - issue.at_unix_ms;
            let wait = SUSPEND_RETRY
                .saturating_sub(Duration::from_millis(u64::try_from(since).unwrap_or(0)));
            if !wait.is_zero() {
                // The guest runs on: Ready stays as the run says, and the MicroVM is Stalled
                // until the node has room (or the user gives up the suspend).
                self.details(vm);
                self.set_phase(Phase::Running);
                self.cond(
                    ConditionType::Ready,
                    "True",
                    Reason::GUEST_READY,
                    format!("the guest runs on {node}; it was not suspended"),
                );
                let reason = issue_reason(&issue.reason);
                self.kstatus(false, Some((reason, &issue.message)));
                self.requeue(wait);
                return true;
            }
        }
        self.apply_desired(node, vm.run, DesiredState::Suspended);
        self.suspending(node);
        true
    }

    /// Ask `node`'s agent for the VM's run `run` in `desired`.
    pub(super) fn apply_desired(&mut self, node: &str, run: u32, desired: DesiredState) {
        self.agent.push(Action::ApplyVm {
            node: node.to_string(),
            run,
            desired,
        });
    }

    fn suspending(&mut self, node: &str) {
        self.set_phase(Phase::Suspending);
        self.cond(
            ConditionType::Ready,
            "False",
            Reason::SUSPENDING,
            format!("saving the guest's memory on {node}"),
        );
        self.kstatus(true, None);
    }

    fn suspended(&mut self, node: &str, vm: &VmStatus) {
        self.details(vm);
        let message = format!(
            "saved on {node} ({:.1} MB of memory and device state); set spec.suspend to false to resume",
            vm.snapshot_bytes as f64 / 1e6
        );
        if self.old.phase != Some(Phase::Suspended) {
            self.event(EventKind::Normal, "Suspended", message.clone());
        }
        self.set_phase(Phase::Suspended);
        self.cond(ConditionType::Suspended, "True", Reason::SUSPENDED, message);
        // Readiness does not apply to a VM saved on purpose: settled, as a stopped one is.
        self.not_meant_to_run();
    }

    /// `Suspended=False` with the agent's reason while its last suspend or resume did not go
    /// as asked; no `Suspended` condition otherwise (and none for a VM never suspended).
    fn snapshot_issue(&mut self, vm: &VmStatus) {
        match &vm.snapshot_issue {
            Some(issue) => {
                let reason = issue_reason(&issue.reason);
                if self.old_cond(ConditionType::Suspended) != Some(("False", reason)) {
                    self.event(EventKind::Warning, reason, issue.message.clone());
                }
                self.cond(
                    ConditionType::Suspended,
                    "False",
                    reason,
                    issue.message.clone(),
                );
            }
            None if vm.state != RunState::Suspended => self.drop_cond(ConditionType::Suspended),
            None => {}
        }
    }
}
