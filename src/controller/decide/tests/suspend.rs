//! `spec.suspend`: asked of a Ready VM only, Suspended is settled (kstatus Current, no Ready),
//! resuming is a restore of the same run, and the agent's snapshot issues show as
//! `Suspended=False` with their reason (a refused suspend also `Stalled`, retried later).

use super::*;
use crate::vm::SnapshotIssue;
use pretty_assertions::assert_eq;

fn suspended_spec() -> MicroVM {
    let mut mvm = placed("web", "node-a");
    mvm.spec.suspend = true;
    mvm.metadata.generation = Some(2);
    mvm
}

fn issue(reason: &str, at_unix_ms: i64) -> SnapshotIssue {
    SnapshotIssue {
        reason: reason.into(),
        message: format!("{reason}: details"),
        at_unix_ms,
    }
}

#[test]
fn a_ready_vm_is_suspended_and_then_settled() {
    let mvm = suspended_spec();
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    let actions = decide(&mvm, &o);
    assert_eq!(applies(&actions), vec![(0, DesiredState::Suspended)]);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Suspending));
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");

    let mvm = written(mvm, &actions);
    let mut vm = agent_vm(&mvm, HASH, 0, RunState::Suspended);
    vm.snapshot_bytes = 95_700_000;
    o.vm = Some(vm);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty(), "nothing more to ask");
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Suspended));
    let (status, reason, message) = cond(&s, ConditionType::Suspended);
    assert_eq!((status, reason), ("True", Reason::SUSPENDED));
    assert!(message.contains("95.7 MB"), "{message}");
    assert!(find_condition(&s.conditions, ConditionType::Ready).is_none());
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert_eq!(events(&actions), vec!["Suspended"]);
}

#[test]
fn a_vm_still_booting_is_suspended_only_once_ready() {
    let mvm = suspended_spec();
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Starting));
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    assert_eq!(
        status_of(&actions).and_then(|s| s.phase),
        Some(Phase::Starting)
    );
}

#[test]
fn resuming_restores_the_same_run() {
    let mut mvm = placed("web", "node-a");
    if let Some(s) = mvm.status.as_mut() {
        s.phase = Some(Phase::Suspended);
    }
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Suspended));
    let actions = decide(&mvm, &o);
    assert_eq!(applies(&actions), vec![(0, DesiredState::Running)]);
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Ready).1, Reason::RESUMING);
    assert_eq!(events(&actions), vec!["Resuming"]);

    // Restored: Ready says so.
    let mvm = written(mvm, &actions);
    let mut vm = agent_vm(&mvm, HASH, 0, RunState::Running);
    vm.restored = true;
    o.vm = Some(vm);
    let s = status_of(&decide(&mvm, &o)).expect("status");
    assert_eq!(
        cond(&s, ConditionType::Ready),
        (
            "True",
            Reason::GUEST_READY,
            "resumed from its snapshot in 412ms"
        )
    );
    assert!(find_condition(&s.conditions, ConditionType::Suspended).is_none());
}

#[test]
fn a_refused_suspend_is_stalled_and_asked_again_later() {
    let mvm = suspended_spec();
    let mut o = obs();
    let mut vm = agent_vm(&mvm, HASH, 0, RunState::Running);
    // Refused 10 s before now.
    vm.snapshot_issue = Some(issue("SnapshotLimitReached", 4_990_000));
    o.vm = Some(vm.clone());
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty(), "not asked again yet");
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Running));
    assert_eq!(cond(&s, ConditionType::Stalled).1, "SnapshotLimitReached");
    assert_eq!(cond(&s, ConditionType::Suspended).1, "SnapshotLimitReached");
    assert_eq!(events(&actions), vec!["SnapshotLimitReached"]);
    assert!(actions.contains(&Action::RequeueAfter(Duration::from_secs(20))));

    // 30 s after the refusal: asked again.
    vm.snapshot_issue = Some(issue("SnapshotLimitReached", 4_960_000));
    o.vm = Some(vm);
    let actions = decide(&written(mvm, &actions), &o);
    assert_eq!(applies(&actions), vec![(0, DesiredState::Suspended)]);
}

#[test]
fn a_snapshot_that_could_not_be_restored_says_why_while_the_vm_boots_cold() {
    let mvm = placed("web", "node-a");
    let mut o = obs();
    let mut vm = agent_vm(&mvm, HASH, 0, RunState::Starting);
    vm.snapshot_issue = Some(issue("SnapshotUnrestorable", 4_999_000));
    o.vm = Some(vm);
    let actions = decide(&mvm, &o);
    let s = status_of(&actions).expect("status");
    assert_eq!(
        cond(&s, ConditionType::Suspended),
        (
            "False",
            "SnapshotUnrestorable",
            "SnapshotUnrestorable: details"
        )
    );
    assert_eq!(s.phase, Some(Phase::Starting));
    assert_eq!(events(&actions), vec!["SnapshotUnrestorable"]);
}
