//! kstatus always reaches a verdict (issue #13, defect 6; issue #21): what no retry can fix is
//! `Stalled` with its reason; a missed boot deadline is `BootTimeout` with a Warning, and
//! `Stalled` once the agent calls the misses permanent; a VM no node takes is `Stalled` after
//! kstatus's 15 s; a VM stopped as its spec asks has no `Ready=False` to wait on.

use super::*;
use pretty_assertions::assert_eq;

fn event_kinds(actions: &[Action]) -> Vec<(EventKind, &'static str)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event { kind, reason, .. } => Some((*kind, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn unschedulable_for_good_is_stalled_with_the_reason_and_still_retried() {
    let mvm = microvm("web");
    let mut o = obs();
    let message = "accelerator: 0/1 nodes available: 1 did not match accelerator \
                   (node-a: no working KVM: KVM present but QEMU failed under it: boom)";
    o.placement = Some(Err(Unschedulable {
        constraint: Constraint::Accelerator,
        message: message.to_string(),
        stalled: Some("KvmUnavailable"),
    }));
    let actions = decide(&mvm, &o);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Pending));
    assert_eq!(
        cond(&s, ConditionType::Stalled),
        ("True", "KvmUnavailable", message)
    );
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(cond(&s, ConditionType::Ready).1, "KvmUnavailable");
    assert_eq!(
        cond(&s, ConditionType::Scheduled),
        ("False", Reason::UNSCHEDULABLE, message)
    );
    assert_eq!(events(&actions), vec!["FailedScheduling"]);
    // A node fixed by a person unblocks it: placement is still retried.
    assert!(actions.contains(&Action::RequeueAfter(UNSCHEDULABLE_RETRY)));
    // Once a node can take it, it is placed and converging again.
    let mut again = written(mvm, &actions);
    again.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    o.placement = Some(Ok("node-a".to_string()));
    let s = status_of(&decide(&again, &o)).expect("status");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
}

/// A run of `mvm` that missed its boot deadline `lasted_ms` after it started, `ago_ms` ago.
fn boot_timed_out(
    policy: RunPolicy,
    permanent: bool,
    lasted_ms: i64,
    ago_ms: i64,
) -> (MicroVM, Observed) {
    let (mvm, mut o) = exited(policy, false, 1);
    let mut vm = o.vm.clone().expect("vm");
    let exit_at = now().as_millisecond() - ago_ms;
    vm.state = RunState::Failed;
    vm.started_at_unix_ms = exit_at - lasted_ms;
    vm.exit = Some(exit(false, "BootTimeout", permanent, exit_at));
    o.vm = Some(vm);
    (mvm, o)
}

#[test]
fn a_missed_boot_deadline_is_a_boot_timeout_with_a_warning() {
    // The usual case: the run lasted the whole deadline (60 s), so no back-off.
    let (mvm, o) = boot_timed_out(RunPolicy::Always, false, 60_000, 0);
    let actions = decide(&mvm, &o);
    assert_eq!(applies(&actions), vec![(2, DesiredState::Running)]);
    assert_eq!(
        event_kinds(&actions),
        vec![
            (EventKind::Warning, "BootTimeout"),
            (EventKind::Normal, "Restarted")
        ]
    );
    // A short deadline: the crash-loop back-off says BootTimeout, not GuestExited, and warns
    // once for the run.
    let (mvm, o) = boot_timed_out(RunPolicy::RerunOnFailure, false, 500, 0);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    let (status, reason, message) = cond(&s, ConditionType::Ready);
    assert_eq!((status, reason), ("False", "BootTimeout"));
    assert!(message.contains("back-off"), "{message}");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert_eq!(
        event_kinds(&actions),
        vec![(EventKind::Warning, "BootTimeout")]
    );
    let mvm = written(mvm, &actions);
    let actions = decide(&mvm, &o);
    assert!(events(&actions).is_empty(), "{actions:?}");
    // A run policy that does not restart: Failed with the reason, not GuestFailed.
    let (mvm, o) = boot_timed_out(RunPolicy::Once, false, 60_000, 0);
    let s = status_of(&decide(&mvm, &o)).expect("status");
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(cond(&s, ConditionType::Ready).1, "BootTimeout");
}

#[test]
fn boot_timeouts_the_agent_calls_permanent_end_stalled() {
    let (mvm, o) = boot_timed_out(RunPolicy::Always, true, 60_000, 0);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty(), "not restarted again");
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(cond(&s, ConditionType::Stalled).0, "True");
    assert_eq!(cond(&s, ConditionType::Stalled).1, "BootTimeout");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(event_kinds(&actions), vec![(EventKind::Warning, "Failed")]);
}

fn unschedulable_by_selector() -> Unschedulable {
    Unschedulable {
        constraint: Constraint::NodeSelector,
        message: "nodeSelector: 0/1 nodes available: 1 did not match nodeSelector".to_string(),
        stalled: None,
    }
}

#[test]
fn unschedulable_for_now_is_stalled_after_the_kstatus_grace_and_still_retried() {
    let mvm = microvm("web");
    let mut o = obs();
    o.placement = Some(Err(unschedulable_by_selector()));
    let actions = decide(&mvm, &o);
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert!(actions.contains(&Action::RequeueAfter(UNSCHEDULABLE_GRACE)));
    let mut mvm = written(mvm, &actions);
    mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);

    // 10 s on, the scheduler says it in other words: the wait is not restarted.
    o.now = Timestamp::from_millisecond(now().as_millisecond() + 10_000).expect("valid");
    let mut other = unschedulable_by_selector();
    other.message = "nodeSelector: 0/2 nodes available: 2 did not match nodeSelector".to_string();
    o.placement = Some(Err(other));
    let actions = decide(&mvm, &o);
    assert!(actions.contains(&Action::RequeueAfter(Duration::from_secs(5))));
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    let mvm = written(mvm, &actions);

    // At 15 s: Stalled with the reason, Ready says it too, no second Warning, still retried.
    o.now = Timestamp::from_millisecond(now().as_millisecond() + 15_000).expect("valid");
    let actions = decide(&mvm, &o);
    let s = status_of(&actions).expect("status");
    let message = "nodeSelector: 0/2 nodes available: 2 did not match nodeSelector";
    assert_eq!(
        cond(&s, ConditionType::Stalled),
        ("True", Reason::UNSCHEDULABLE, message)
    );
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(
        cond(&s, ConditionType::Ready),
        ("False", Reason::UNSCHEDULABLE, message)
    );
    assert_eq!(s.phase, Some(Phase::Pending));
    assert!(events(&actions).is_empty(), "{actions:?}");
    assert!(actions.contains(&Action::RequeueAfter(UNSCHEDULABLE_RETRY)));
    let mvm = written(mvm, &actions);
    // Steady: nothing new to write.
    assert_eq!(
        decide(&mvm, &o),
        vec![Action::RequeueAfter(UNSCHEDULABLE_RETRY)]
    );

    // A node labelled by a person takes it: placed and converging again.
    o.placement = Some(Ok("node-a".to_string()));
    let s = status_of(&decide(&mvm, &o)).expect("status");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert_eq!(cond(&s, ConditionType::Scheduled).0, "True");
}

/// What kstatus (sigs.k8s.io/cli-utils) falls back on for a custom resource when neither
/// `Reconciling` nor `Stalled` is True: `Ready=False` means InProgress, no `Ready` Current.
fn waits_on_ready_false(s: &MicroVMStatus) -> bool {
    find_condition(&s.conditions, ConditionType::Ready).is_some_and(|c| c.status != "True")
}

#[test]
fn halted_on_purpose_is_reconciled_with_nothing_to_wait_on() {
    let mut mvm = placed("web", "node-a");
    mvm.spec.run_policy = RunPolicy::Halted;
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Stopped));
    let s = status_of(&decide(&mvm, &o)).expect("status");
    assert_eq!(s.phase, Some(Phase::Stopped));
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert!(!waits_on_ready_false(&s), "{:?}", s.conditions);
    // Never booted (halted from the start): the same.
    let mvm = placed("cold", "node-a");
    let mut mvm = mvm;
    mvm.spec.run_policy = RunPolicy::Halted;
    let s = status_of(&decide(&mvm, &obs())).expect("status");
    assert_eq!(s.phase, Some(Phase::Stopped));
    assert!(!waits_on_ready_false(&s), "{:?}", s.conditions);
}

#[test]
fn a_finished_run_is_current_when_it_succeeded_and_stalled_when_it_failed() {
    let (mvm, o) = exited(RunPolicy::Once, true, 0);
    let s = status_of(&decide(&mvm, &o)).expect("status");
    assert_eq!(s.phase, Some(Phase::Succeeded));
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert!(!waits_on_ready_false(&s), "{:?}", s.conditions);
    let (mvm, o) = boot_timed_out(RunPolicy::Once, false, 60_000, 0);
    let s = status_of(&decide(&mvm, &o)).expect("status");
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(cond(&s, ConditionType::Stalled).0, "True");
    assert_eq!(cond(&s, ConditionType::Stalled).1, "BootTimeout");
}
