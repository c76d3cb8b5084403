use super::*;
use crate::api::set_condition;
use crate::controller::fixtures::{agent_vm, at, deleting, exit, microvm, placed};
use crate::controller::scheduler::Constraint;
use pretty_assertions::assert_eq;

const HASH: &str = "abcd";
/// 1_000_000 ms after the epoch plus a bit: the fixtures' VM timestamps are near 1_000_000.
fn now() -> Timestamp {
    Timestamp::from_millisecond(5_000_000).expect("valid")
}

fn obs() -> Observed {
    Observed {
        now: now(),
        spec_hash: Ok(HASH.to_string()),
        agent: AgentLink::Connected,
        vm: None,
        placement: None,
        node_labels: None,
        pods: PodMode::Off,
    }
}

fn status_of(actions: &[Action]) -> Option<MicroVMStatus> {
    actions.iter().find_map(|a| match a {
        Action::UpdateStatus(s) => Some((**s).clone()),
        _ => None,
    })
}

fn cond(s: &MicroVMStatus, t: ConditionType) -> (&str, &str, &str) {
    let c = find_condition(&s.conditions, t).expect("condition present");
    (c.status.as_str(), c.reason.as_str(), c.message.as_str())
}

fn events(actions: &[Action]) -> Vec<&'static str> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event { reason, .. } => Some(*reason),
            _ => None,
        })
        .collect()
}

fn applies(actions: &[Action]) -> Vec<(u32, DesiredState)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ApplyVm { run, desired, .. } => Some((*run, *desired)),
            _ => None,
        })
        .collect()
}

/// Apply a plan's status to the object, as the API server would.
fn written(mut mvm: MicroVM, actions: &[Action]) -> MicroVM {
    if let Some(s) = status_of(actions) {
        mvm.status = Some(s);
    }
    mvm
}

#[test]
fn new_vm_gets_finalizer_node_apply_and_one_status() {
    let mvm = microvm("web");
    let mut o = obs();
    o.placement = Some(Ok("node-a".to_string()));
    let actions = decide(&mvm, &o);
    assert_eq!(actions[0], Action::AddFinalizer);
    assert_eq!(
        actions[1],
        Action::Place {
            node: "node-a".to_string()
        }
    );
    assert_eq!(
        actions[2],
        Action::ApplyVm {
            node: "node-a".to_string(),
            run: 0,
            desired: DesiredState::Running
        }
    );
    let s = status_of(&actions).expect("status written");
    assert_eq!(s.node_name.as_deref(), Some("node-a"));
    assert_eq!(s.phase, Some(Phase::Starting));
    assert_eq!(s.observed_generation, Some(1));
    assert_eq!(
        cond(&s, ConditionType::Scheduled),
        ("True", Reason::PLACED, "placed on node-a")
    );
    assert_eq!(
        cond(&s, ConditionType::Ready),
        ("False", Reason::STARTING, "booting on node-a")
    );
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(1))
    );
    assert_eq!(events(&actions), vec!["Scheduled", "Starting"]);
    assert!(!actions.iter().any(|a| matches!(a, Action::RequeueAfter(_))));
}

#[test]
fn unschedulable_names_each_failed_constraint() {
    for constraint in [
        Constraint::NodeSelector,
        Constraint::Hypervisor,
        Constraint::Accelerator,
        Constraint::Capacity,
    ] {
        let mvm = microvm("web");
        let mut o = obs();
        o.placement = Some(Err(Unschedulable {
            constraint,
            message: format!("{}: 0/2 nodes available", constraint.as_str()),
            stalled: None,
        }));
        let actions = decide(&mvm, &o);
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Pending));
        let (status, reason, message) = cond(&s, ConditionType::Scheduled);
        assert_eq!((status, reason), ("False", Reason::UNSCHEDULABLE));
        assert!(message.starts_with(constraint.as_str()));
        assert!(applies(&actions).is_empty());
        assert_eq!(events(&actions), vec!["FailedScheduling"]);
        // Back when the grace period is over, to say Stalled if it still does not fit.
        assert!(actions.contains(&Action::RequeueAfter(UNSCHEDULABLE_GRACE)));
        // Retrying with the same answer writes nothing and repeats no event.
        let mut again = written(mvm, &actions);
        again.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        let actions = decide(&again, &o);
        assert_eq!(actions, vec![Action::RequeueAfter(UNSCHEDULABLE_GRACE)]);
    }
}

#[test]
fn placed_vm_the_agent_lacks_is_applied_as_run_zero() {
    let mvm = placed("web", "node-a");
    let actions = decide(&mvm, &obs());
    assert_eq!(applies(&actions), vec![(0, DesiredState::Running)]);
    assert!(!actions.contains(&Action::AddFinalizer));
}

#[test]
fn starting_vm_is_not_ready_and_reconciling() {
    let mvm = placed("web", "node-a");
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Starting));
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Starting));
    assert_eq!(cond(&s, ConditionType::Ready).1, Reason::STARTING);
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
}

#[test]
fn create_to_ready_takes_three_writes() {
    // Write 1: metadata (finalizer + node label) — Write 2: status at start.
    let mvm = microvm("web");
    let mut o = obs();
    o.placement = Some(Ok("node-a".to_string()));
    let first = decide(&mvm, &o);
    let mut mvm = written(mvm, &first);
    mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    mvm.metadata.labels = Some([(NODE_LABEL.to_string(), "node-a".to_string())].into());
    // The agent reports creating/starting: nothing new to write.
    o.placement = None;
    for state in [RunState::Creating, RunState::Starting] {
        o.vm = Some(agent_vm(&mvm, HASH, 0, state));
        let actions = decide(&mvm, &o);
        assert_eq!(status_of(&actions), None, "{state:?}");
        assert!(applies(&actions).is_empty());
    }
    // Write 3: Ready.
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    let ready = decide(&mvm, &o);
    let s = status_of(&ready).expect("ready written");
    assert_eq!(s.phase, Some(Phase::Running));
    assert_eq!(
        cond(&s, ConditionType::Ready),
        ("True", Reason::GUEST_READY, "booted in 412ms")
    );
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(s.ip_addresses, vec!["10.88.0.5".to_string()]);
    assert_eq!(s.hypervisor, Some(crate::api::Hypervisor::Qemu));
    assert_eq!(s.accelerator, Some(crate::api::Accelerator::Tcg));
    assert!(s.start_time.is_some());
    assert_eq!(events(&ready), vec!["Ready"]);
    // Steady state: nothing.
    let mvm = written(mvm, &ready);
    assert_eq!(decide(&mvm, &o), vec![]);
}

#[test]
fn transition_time_survives_a_steady_reconcile() {
    let mut mvm = placed("web", "node-a");
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    mvm = written(mvm.clone(), &decide(&mvm, &o));
    let before = mvm.status.clone();
    o.now = Timestamp::from_millisecond(9_000_000).expect("valid");
    assert_eq!(decide(&mvm, &o), vec![]);
    assert_eq!(mvm.status, before);
}

fn exited(policy: RunPolicy, success: bool, restarts: i32) -> (MicroVM, Observed) {
    let mut mvm = placed("web", "node-a");
    mvm.spec.run_policy = policy;
    if let Some(s) = mvm.status.as_mut() {
        s.restart_count = restarts;
        s.phase = Some(Phase::Running);
    }
    let mut o = obs();
    let mut vm = agent_vm(&mvm, HASH, restarts as u32, RunState::Exited);
    vm.ready = false;
    // Ran for two minutes: no crash-loop back-off.
    vm.exit = Some(exit(
        success,
        if success {
            "GuestShutdown"
        } else {
            "GuestPanic"
        },
        false,
        vm.started_at_unix_ms + 120_000,
    ));
    o.vm = Some(vm);
    (mvm, o)
}

#[test]
fn always_restarts_after_success_and_failure() {
    for success in [true, false] {
        let (mvm, o) = exited(RunPolicy::Always, success, 2);
        let actions = decide(&mvm, &o);
        assert_eq!(applies(&actions), vec![(3, DesiredState::Running)]);
        let s = status_of(&actions).expect("status");
        assert_eq!(s.restart_count, 3);
        assert_eq!(s.phase, Some(Phase::Starting));
        assert_eq!(events(&actions), vec!["Restarted"]);
    }
}

#[test]
fn restart_is_not_repeated_once_the_next_run_exists() {
    let (mvm, mut o) = exited(RunPolicy::Always, true, 0);
    let actions = decide(&mvm, &o);
    let mvm = written(mvm, &actions);
    // The agent now reports run 1 booting.
    o.vm = Some(agent_vm(&mvm, HASH, 1, RunState::Starting));
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    assert_eq!(status_of(&actions), None);
}

#[test]
fn rerun_on_failure_restarts_only_failures() {
    let (mvm, o) = exited(RunPolicy::RerunOnFailure, false, 0);
    assert_eq!(applies(&decide(&mvm, &o)), vec![(1, DesiredState::Running)]);
    let (mvm, o) = exited(RunPolicy::RerunOnFailure, true, 0);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Succeeded));
    assert!(find_condition(&s.conditions, ConditionType::Ready).is_none());
    assert_eq!(events(&actions), vec!["Exited"]);
}

#[test]
fn once_ends_in_succeeded_or_failed() {
    let (mvm, o) = exited(RunPolicy::Once, true, 0);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    assert_eq!(
        status_of(&actions).and_then(|s| s.phase),
        Some(Phase::Succeeded)
    );
    let (mvm, o) = exited(RunPolicy::Once, false, 0);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(cond(&s, ConditionType::Ready).1, "GuestPanic");
    assert_eq!(cond(&s, ConditionType::Stalled).1, "GuestPanic");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "True");
    assert_eq!(events(&actions), vec!["Failed"]);
    // Finished stays finished, even when the agent forgets the VM.
    let mut mvm = written(mvm, &actions);
    let mut o = o;
    o.vm = None;
    mvm.metadata.generation = Some(1);
    assert_eq!(decide(&mvm, &o), vec![]);
}

#[test]
fn halted_vm_that_exited_is_stopped() {
    let (mvm, o) = exited(RunPolicy::Halted, true, 0);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Stopped));
    assert!(find_condition(&s.conditions, ConditionType::Ready).is_none());
}

#[test]
fn crash_loop_backs_off_then_restarts() {
    let (mvm, mut o) = exited(RunPolicy::Always, false, 3);
    let mut vm = o.vm.clone().expect("vm");
    // Crashed 100 ms after start, 2 s ago: back-off for 4 restarts is 8 s, 6 s left.
    let exit_at = now().as_millisecond() - 2_000;
    vm.started_at_unix_ms = exit_at - 100;
    vm.exit = Some(exit(false, "GuestPanic", false, exit_at));
    o.vm = Some(vm.clone());
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    assert!(actions.contains(&Action::RequeueAfter(Duration::from_secs(6))));
    let s = status_of(&actions).expect("status");
    assert!(cond(&s, ConditionType::Ready).2.contains("back-off"));
    // Once the back-off is over, it restarts.
    o.now = Timestamp::from_millisecond(exit_at + 8_000).expect("valid");
    assert_eq!(applies(&decide(&mvm, &o)), vec![(4, DesiredState::Running)]);
}

#[test]
fn restart_delay_is_capped() {
    let mut vm = agent_vm(&microvm("x"), HASH, 0, RunState::Exited);
    vm.exit = Some(exit(false, "GuestPanic", false, vm.started_at_unix_ms + 10));
    let at_exit = Timestamp::from_millisecond(vm.started_at_unix_ms + 10).expect("valid");
    assert_eq!(restart_delay(&vm, 0, at_exit), Duration::from_secs(1));
    assert_eq!(restart_delay(&vm, 30, at_exit), MAX_RESTART_DELAY);
}

#[test]
fn halted_spec_stops_a_running_vm() {
    let mut mvm = placed("web", "node-a");
    mvm.spec.run_policy = RunPolicy::Halted;
    mvm.metadata.generation = Some(2);
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    let actions = decide(&mvm, &o);
    assert_eq!(applies(&actions), vec![(0, DesiredState::Stopped)]);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Stopping));
    assert_eq!(s.observed_generation, Some(2));
    // The agent reports it stopped.
    let mvm = written(mvm, &actions);
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Stopped));
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Stopped));
    assert!(find_condition(&s.conditions, ConditionType::Ready).is_none());
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(events(&actions), vec!["Stopped"]);
}

#[test]
fn unhalting_boots_the_next_run() {
    let mut mvm = placed("web", "node-a");
    if let Some(s) = mvm.status.as_mut() {
        s.phase = Some(Phase::Stopped);
    }
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Stopped));
    let actions = decide(&mvm, &o);
    assert_eq!(applies(&actions), vec![(1, DesiredState::Running)]);
    assert_eq!(status_of(&actions).map(|s| s.restart_count), Some(1));
}

#[test]
fn generation_bump_moves_observed_generation_and_applies_the_new_policy() {
    let mut mvm = placed("web", "node-a");
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    mvm = written(mvm.clone(), &decide(&mvm, &o));
    // runPolicy Always → Once: generation 2; nothing to do on the agent, but the status
    // must say it saw generation 2.
    mvm.spec.run_policy = RunPolicy::Once;
    mvm.metadata.generation = Some(2);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    assert_eq!(s.observed_generation, Some(2));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(2))
    );
    // And the new policy decides the next exit: Once does not restart.
    let mut vm = agent_vm(&mvm, HASH, 0, RunState::Exited);
    vm.exit = Some(exit(
        true,
        "GuestShutdown",
        false,
        vm.started_at_unix_ms + 120_000,
    ));
    o.vm = Some(vm);
    let mvm = written(mvm, &actions);
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    assert_eq!(
        status_of(&actions).and_then(|s| s.phase),
        Some(Phase::Succeeded)
    );
}

#[test]
fn different_spec_hash_reapplies_the_same_run() {
    let mvm = placed("web", "node-a");
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, "old-hash", 0, RunState::Running));
    assert_eq!(applies(&decide(&mvm, &o)), vec![(0, DesiredState::Running)]);
}

#[test]
fn permanent_agent_error_stalls_without_retry() {
    for policy in [
        RunPolicy::Always,
        RunPolicy::RerunOnFailure,
        RunPolicy::Once,
    ] {
        let mut mvm = placed("web", "node-a");
        mvm.spec.run_policy = policy;
        let mut o = obs();
        let mut vm = agent_vm(&mvm, HASH, 0, RunState::Failed);
        vm.ready = false;
        vm.exit = Some(exit(
            false,
            "KernelNotFound",
            true,
            vm.created_at_unix_ms + 5,
        ));
        o.vm = Some(vm);
        let actions = decide(&mvm, &o);
        assert!(applies(&actions).is_empty(), "{policy:?}");
        assert!(!actions.iter().any(|a| matches!(a, Action::RequeueAfter(_))));
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(cond(&s, ConditionType::Stalled).0, "True");
        assert_eq!(cond(&s, ConditionType::Stalled).1, "KernelNotFound");
        assert_eq!(cond(&s, ConditionType::Ready).0, "False");
        assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
        assert_eq!(events(&actions), vec!["Failed"]);
        // Reconciling again neither retries nor writes.
        let mvm = written(mvm, &actions);
        assert_eq!(decide(&mvm, &o), vec![]);
    }
}

#[test]
fn transient_boot_failure_is_retried_by_policy_not_stalled() {
    let (mvm, mut o) = exited(RunPolicy::Always, false, 0);
    let mut vm = o.vm.clone().expect("vm");
    vm.state = RunState::Failed;
    vm.exit = Some(exit(
        false,
        "BootTimeout",
        false,
        vm.started_at_unix_ms + 120_000,
    ));
    o.vm = Some(vm);
    let actions = decide(&mvm, &o);
    assert_eq!(applies(&actions), vec![(1, DesiredState::Running)]);
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    let mut once = mvm.clone();
    once.spec.run_policy = RunPolicy::Once;
    let s = status_of(&decide(&once, &o)).expect("status");
    assert_eq!(s.phase, Some(Phase::Failed));
}

#[test]
fn halted_vm_is_placed_but_never_booted() {
    let mut mvm = microvm("web");
    mvm.spec.run_policy = RunPolicy::Halted;
    let mut o = obs();
    o.placement = Some(Ok("node-a".to_string()));
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    assert!(actions.contains(&Action::Place {
        node: "node-a".to_string()
    }));
    assert_eq!(
        status_of(&actions).and_then(|s| s.phase),
        Some(Phase::Stopped)
    );
}

#[test]
fn spec_the_agent_cannot_express_stalls() {
    let mvm = placed("web", "node-a");
    let mut o = obs();
    o.spec_hash = Err(SpecProblem {
        reason: "InvalidImageReference",
        message: "spec.kernel.image \"A:b\" is not a valid image reference".to_string(),
    });
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Stalled).1, "InvalidImageReference");
}

#[test]
fn deleted_vm_is_deleted_on_the_agent_then_released() {
    let mvm = deleting(placed("web", "node-a"));
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    assert_eq!(
        decide(&mvm, &o),
        vec![
            Action::DeleteVm {
                node: "node-a".to_string()
            },
            Action::RemoveFinalizer,
        ]
    );
}

#[test]
fn deletion_copes_with_apply_never_having_run() {
    // The agent never had the VM: DeleteVM is idempotent, so it is still sent.
    let mvm = deleting(placed("web", "node-a"));
    assert_eq!(
        decide(&mvm, &obs()),
        vec![
            Action::DeleteVm {
                node: "node-a".to_string()
            },
            Action::RemoveFinalizer,
        ]
    );
    // Never placed: nothing to delete anywhere.
    let mut never = deleting(microvm("web"));
    never.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    assert_eq!(decide(&never, &obs()), vec![Action::RemoveFinalizer]);
    // Finalizer already gone: nothing at all.
    assert_eq!(decide(&deleting(microvm("web")), &obs()), vec![]);
}

#[test]
fn deletion_waits_for_a_reconnecting_agent_and_gives_up_on_a_lost_one() {
    let mvm = deleting(placed("web", "node-a"));
    let mut o = obs();
    o.agent = AgentLink::Reconnecting {
        lost_after: Duration::from_secs(4),
    };
    assert_eq!(
        decide(&mvm, &o),
        vec![Action::RequeueAfter(Duration::from_secs(9))]
    );
    o.agent = AgentLink::Lost;
    let actions = decide(&mvm, &o);
    assert!(actions.contains(&Action::RemoveFinalizer));
    assert_eq!(events(&actions), vec!["AgentUnreachable"]);
}

#[test]
fn lost_agent_turns_ready_unknown_and_heals() {
    let mut mvm = placed("web", "node-a");
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    mvm = written(mvm.clone(), &decide(&mvm, &o));
    // Within the grace period: nothing written, come back when it expires.
    o.agent = AgentLink::Reconnecting {
        lost_after: Duration::from_secs(7),
    };
    assert_eq!(
        decide(&mvm, &o),
        vec![Action::RequeueAfter(Duration::from_secs(7))]
    );
    o.agent = AgentLink::Lost;
    let actions = decide(&mvm, &o);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Unknown));
    assert_eq!(cond(&s, ConditionType::Ready).0, "Unknown");
    assert_eq!(cond(&s, ConditionType::Ready).1, Reason::AGENT_UNREACHABLE);
    assert_eq!(events(&actions), vec!["AgentUnreachable"]);
    assert!(applies(&actions).is_empty());
    let lost = written(mvm, &actions);
    assert_eq!(decide(&lost, &o), vec![]);
    // The agent is back with the VM still running.
    o.agent = AgentLink::Connected;
    let actions = decide(&lost, &o);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Running));
    assert_eq!(cond(&s, ConditionType::Ready).0, "True");
}

#[test]
fn absent_agent_is_reported_like_a_lost_one() {
    let mvm = placed("web", "node-a");
    let mut o = obs();
    o.agent = AgentLink::Absent;
    let s = status_of(&decide(&mvm, &o)).expect("status");
    assert_eq!(cond(&s, ConditionType::Ready).1, Reason::AGENT_UNREACHABLE);
    assert!(cond(&s, ConditionType::Ready).2.contains("no ignis agent"));
}

#[test]
fn node_no_longer_matching_keeps_the_vm_and_says_so() {
    let mut mvm = placed("web", "node-a");
    mvm.spec.node_selector = Some([("zone".to_string(), "a".to_string())].into());
    let mut o = obs();
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    o.node_labels = Some([("zone".to_string(), "a".to_string())].into());
    mvm = written(mvm.clone(), &decide(&mvm, &o));
    o.node_labels = Some([("zone".to_string(), "b".to_string())].into());
    let actions = decide(&mvm, &o);
    assert!(applies(&actions).is_empty());
    assert!(!actions.iter().any(|a| matches!(a, Action::DeleteVm { .. })));
    let s = status_of(&actions).expect("status");
    assert_eq!(s.node_name.as_deref(), Some("node-a"));
    assert_eq!(s.phase, Some(Phase::Running));
    assert_eq!(cond(&s, ConditionType::Scheduled).1, Reason::NODE_MISMATCH);
    assert_eq!(cond(&s, ConditionType::Ready).0, "True");
    assert_eq!(events(&actions), vec!["NodeNoLongerMatches"]);
    let mvm = written(mvm, &actions);
    assert_eq!(decide(&mvm, &o), vec![]);
}

#[test]
fn placement_never_changes_even_when_the_scheduler_would_choose_elsewhere() {
    let mvm = placed("web", "node-a");
    let mut o = obs();
    o.placement = Some(Ok("node-b".to_string()));
    let actions = decide(&mvm, &o);
    assert!(!actions.iter().any(|a| matches!(a, Action::Place { .. })));
    assert!(actions.iter().all(|a| match a {
        Action::ApplyVm { node, .. } => node == "node-a",
        _ => true,
    }));
}

#[test]
fn label_alone_is_enough_to_know_the_node() {
    let mut mvm = placed("web", "node-a");
    mvm.status = None;
    let actions = decide(&mvm, &obs());
    assert_eq!(
        status_of(&actions).and_then(|s| s.node_name),
        Some("node-a".to_string())
    );
    assert!(!actions.iter().any(|a| matches!(a, Action::Place { .. })));
}

#[test]
fn existing_conditions_keep_their_transition_time() {
    let mut mvm = placed("web", "node-a");
    let mut conditions = Vec::new();
    set_condition(
        &mut conditions,
        ConditionType::Scheduled,
        true,
        Reason::PLACED,
        "placed on node-a",
        Some(1),
        at(7),
    );
    if let Some(s) = mvm.status.as_mut() {
        s.conditions = conditions;
    }
    let s = status_of(&decide(&mvm, &obs())).expect("status");
    let c = find_condition(&s.conditions, ConditionType::Scheduled).expect("scheduled");
    assert_eq!(c.last_transition_time, at(7));
}

#[test]
fn pulling_shows_as_the_ready_reason_and_a_failed_attempt_as_its_own_reason() {
    let mvm = placed("web", "node-a");
    let mut o = obs();
    let mut vm = agent_vm(&mvm, HASH, 0, RunState::Creating);
    vm.pulling = Some(Pulling {
        references: vec!["reg/k:1".into(), "reg/r:1".into()],
        failure: None,
    });
    o.vm = Some(vm.clone());
    let actions = decide(&mvm, &o);
    let s = status_of(&actions).expect("status");
    assert_eq!(
        cond(&s, ConditionType::Ready),
        (
            "False",
            Reason::PULLING_IMAGE,
            "pulling reg/k:1, reg/r:1 on node-a"
        )
    );
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert_eq!(events(&actions), ["Pulling"]);
    assert!(applies(&actions).is_empty());
    let pulling = written(mvm, &actions);
    assert!(
        events(&decide(&pulling, &o)).is_empty(),
        "one Pulling event per pull"
    );

    vm.pulling = Some(Pulling {
        references: vec!["reg/r:1".into()],
        failure: Some(crate::vm::PullFailure {
            reason: "ImageUnauthorized".into(),
            message: "reg/r:1: the registry refused the credentials: UNAUTHORIZED".into(),
            attempts: 3,
            retry_at_unix_ms: now().as_millisecond() + 7_500,
        }),
    });
    vm.images = vec![crate::vm::PulledImage {
        kind: crate::api::ImageKind::Kernel,
        reference: "reg/k:1".into(),
        digest: "sha256:aa".into(),
    }];
    o.vm = Some(vm);
    let actions = decide(&pulling, &o);
    let s = status_of(&actions).expect("status");
    let (status, reason, message) = cond(&s, ConditionType::Ready);
    assert_eq!((status, reason), ("False", "ImageUnauthorized"));
    assert!(
        message.ends_with("UNAUTHORIZED; retrying in 8s (attempt 3)"),
        "{message}"
    );
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False", "retried");
    assert_eq!(events(&actions), ["Failed"]);
    assert_eq!(
        applies(&actions),
        [(0, DesiredState::Running)],
        "re-applied with the Secrets as they are now"
    );
    assert_eq!(s.images.len(), 1);
    assert_eq!(s.images[0].digest, "sha256:aa");
}

mod claim;
mod pod;
mod suspend;
mod verdicts;
