//! Pod mode (`--vm-pods`): the VM pod's life drives the MicroVM's, with plain values.

use super::super::pod::PodReason;
use super::*;
use crate::controller::vmpod::Disruption;
use pretty_assertions::assert_eq;

const NODE: &str = "node-b";

fn view() -> PodView {
    PodView {
        uid: "pod-1".to_string(),
        name: "vm-web".to_string(),
        namespace: "default".to_string(),
        owner_uid: Some("uid-web".to_string()),
        node: None,
        unschedulable: None,
        ip: None,
        sandbox_running: false,
        deleting: false,
        disruption: None,
        guest_ready: None,
    }
}

fn bound() -> PodView {
    PodView {
        node: Some(NODE.to_string()),
        ..view()
    }
}

fn running() -> PodView {
    PodView {
        ip: Some("10.244.1.7".parse().expect("ip")),
        sandbox_running: true,
        ..bound()
    }
}

fn disrupted(reason: &'static str, deleting: bool) -> PodView {
    PodView {
        deleting,
        disruption: Some(Disruption {
            reason,
            message: format!("{reason} message"),
        }),
        ..running()
    }
}

fn pod_obs(pod: Option<PodView>) -> Observed {
    Observed {
        pods: PodMode::On {
            pod: pod.map(Box::new),
            buildable: Ok(()),
            elsewhere: Vec::new(),
        },
        ..obs()
    }
}

/// `web` with the finalizer, as after its first reconcile.
fn vm(policy: RunPolicy) -> MicroVM {
    let mut mvm = microvm("web");
    mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    mvm.spec.run_policy = policy;
    mvm
}

fn pod_actions(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::CreatePod
                    | Action::DeletePod
                    | Action::SetPodReady(_)
                    | Action::DeleteVm { .. }
                    | Action::ApplyVm { .. }
                    | Action::Place { .. }
                    | Action::RemoveFinalizer
            )
        })
        .cloned()
        .collect()
}

fn delete_vm() -> Action {
    Action::DeleteVm {
        node: NODE.to_string(),
    }
}

#[test]
fn no_pod_creates_one_and_waits_for_kube_scheduler() {
    let actions = decide(&microvm("web"), &pod_obs(None));
    assert_eq!(actions[0], Action::AddFinalizer);
    assert_eq!(pod_actions(&actions), vec![Action::CreatePod]);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Pending));
    assert_eq!(s.node_name, None);
    assert_eq!(
        cond(&s, ConditionType::Scheduled),
        (
            "False",
            PodReason::POD_PENDING,
            "waiting for kube-scheduler to place the VM pod vm-web"
        )
    );
    assert_eq!(cond(&s, ConditionType::Ready).1, Reason::PENDING);
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert_eq!(events(&actions), vec!["CreatedPod"]);
    // The pod exists, unplaced: nothing more to do.
    let mvm = written(vm(RunPolicy::Always), &actions);
    let actions = decide(&mvm, &pod_obs(Some(view())));
    assert_eq!(pod_actions(&actions), vec![]);
    assert_eq!(status_of(&actions), None, "no news, no write");
}

#[test]
fn unschedulable_pod_says_why_and_stalls_after_15s_then_recovers() {
    let message = "0/2 nodes are available: 2 Insufficient memory.";
    let since = |ago_s: i64| {
        Timestamp::from_millisecond(now().as_millisecond() - ago_s * 1000).expect("time")
    };
    let pod = |ago_s| PodView {
        unschedulable: Some((message.to_string(), since(ago_s))),
        ..view()
    };
    let fresh = decide(&vm(RunPolicy::Always), &pod_obs(Some(pod(5))));
    let s = status_of(&fresh).expect("status");
    assert_eq!(
        cond(&s, ConditionType::Scheduled),
        ("False", Reason::UNSCHEDULABLE, message)
    );
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert_eq!(events(&fresh), vec!["FailedScheduling"]);
    assert!(fresh.contains(&Action::RequeueAfter(Duration::from_secs(10))));
    // kstatus' 15 s are over: Stalled with the scheduler's own message, and no second Event.
    let mvm = written(vm(RunPolicy::Always), &fresh);
    let late = decide(&mvm, &pod_obs(Some(pod(20))));
    let s = status_of(&late).expect("status");
    assert_eq!(
        cond(&s, ConditionType::Stalled),
        ("True", Reason::UNSCHEDULABLE, message)
    );
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "False");
    assert_eq!(cond(&s, ConditionType::Ready).1, Reason::UNSCHEDULABLE);
    assert_eq!(events(&late), Vec::<&str>::new());
    // A node appears and the pod is bound: converging again.
    let mvm = written(mvm, &late);
    let placed = decide(&mvm, &pod_obs(Some(bound())));
    let s = status_of(&placed).expect("status");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert_eq!(cond(&s, ConditionType::Scheduled).0, "True");
}

#[test]
fn bound_pod_sets_the_node_and_waits_for_its_sandbox() {
    let actions = decide(&vm(RunPolicy::Always), &pod_obs(Some(bound())));
    assert_eq!(
        pod_actions(&actions),
        vec![],
        "no VM before the sandbox runs"
    );
    let s = status_of(&actions).expect("status");
    assert_eq!(s.node_name.as_deref(), Some(NODE));
    assert_eq!(s.phase, Some(Phase::Scheduled));
    assert_eq!(
        cond(&s, ConditionType::Scheduled),
        ("True", Reason::PLACED, "placed on node-b")
    );
    assert_eq!(cond(&s, ConditionType::Ready).1, PodReason::POD_STARTING);
    assert_eq!(events(&actions), vec!["Scheduled"]);
}

#[test]
fn running_sandbox_gets_its_vm_and_ready_guest_opens_the_gate() {
    let actions = decide(&vm(RunPolicy::Always), &pod_obs(Some(running())));
    assert_eq!(
        pod_actions(&actions),
        vec![Action::ApplyVm {
            node: NODE.to_string(),
            run: 0,
            desired: DesiredState::Running
        }]
    );
    assert_eq!(
        status_of(&actions).expect("status").phase,
        Some(Phase::Starting)
    );
    let mvm = written(vm(RunPolicy::Always), &actions);
    let mut o = pod_obs(Some(running()));
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    let actions = decide(&mvm, &o);
    assert_eq!(pod_actions(&actions), vec![Action::SetPodReady(true)]);
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Ready).0, "True");
    // Once the gate says so, it is not written again.
    let mvm = written(mvm, &actions);
    o.pods = pod_obs(Some(PodView {
        guest_ready: Some(true),
        ..running()
    }))
    .pods;
    assert_eq!(pod_actions(&decide(&mvm, &o)), vec![]);
    // The guest stops being ready: the gate closes.
    let mut vm_status = agent_vm(&mvm, HASH, 0, RunState::Running);
    vm_status.ready = false;
    o.vm = Some(vm_status);
    assert_eq!(
        pod_actions(&decide(&mvm, &o)),
        vec![Action::SetPodReady(false)]
    );
}

/// `policy`'s VM, Ready in its pod on NODE, then its pod disrupted for `reason`.
fn ready_then(policy: RunPolicy, pod: PodView) -> (MicroVM, Observed, Vec<Action>) {
    let mut o = pod_obs(Some(running()));
    let mvm = vm(policy);
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Running));
    let mvm = written(mvm, &decide(&vm(policy), &o));
    o.pods = pod_obs(Some(pod)).pods;
    let actions = decide(&mvm, &o);
    (mvm, o, actions)
}

#[test]
fn evicted_pod_stops_its_vm_and_always_gets_a_new_pod_once_it_is_gone() {
    let (mvm, mut o, actions) = ready_then(RunPolicy::Always, disrupted("PodEvicted", true));
    // The eviction already deletes the pod: stop the VM, delete nothing more.
    assert_eq!(pod_actions(&actions), vec![delete_vm()]);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Pending));
    let (status, reason, message) = cond(&s, ConditionType::Ready);
    assert_eq!((status, reason), ("False", "PodEvicted"));
    assert!(message.contains("PodEvicted message"), "{message}");
    assert!(message.contains("once it is gone"), "{message}");
    assert_eq!(events(&actions), vec!["PodEvicted"]);
    // Still terminating: never a second pod.
    let mvm = written(mvm, &actions);
    o.vm = None;
    let waiting = decide(&mvm, &o);
    assert!(!waiting.contains(&Action::CreatePod));
    assert_eq!(events(&waiting), Vec::<&str>::new());
    // Gone: a new pod, counted as a restart.
    o.pods = pod_obs(None).pods;
    let actions = decide(&mvm, &o);
    assert_eq!(pod_actions(&actions), vec![Action::CreatePod]);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.restart_count, 1);
    assert_eq!(s.node_name, None);
    assert_eq!(events(&actions), vec!["CreatedPod"]);
}

#[test]
fn a_failed_pod_is_deleted_so_its_replacement_can_come() {
    let (_, _, actions) = ready_then(RunPolicy::RerunOnFailure, disrupted("PodEvicted", false));
    assert_eq!(pod_actions(&actions), vec![delete_vm(), Action::DeletePod]);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Pending));
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
}

#[test]
fn once_ends_failed_when_its_pod_is_deleted_and_gets_no_new_pod() {
    let (mvm, mut o, actions) = ready_then(RunPolicy::Once, disrupted("PodDeleted", true));
    assert_eq!(pod_actions(&actions), vec![delete_vm()]);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(cond(&s, ConditionType::Ready).1, "PodDeleted");
    assert_eq!(cond(&s, ConditionType::Stalled).0, "True");
    let mvm = written(mvm, &actions);
    o.vm = None;
    o.pods = pod_obs(None).pods;
    let actions = decide(&mvm, &o);
    assert_eq!(pod_actions(&actions), vec![]);
}

#[test]
fn a_lost_node_turns_unknown_then_its_pod_gone_brings_the_vm_back() {
    let (mvm, mut o, _) = ready_then(RunPolicy::Always, running());
    let mut mvm = mvm;
    mvm.status = status_of(&decide(&mvm, &o)).or(mvm.status);
    o.agent = AgentLink::Lost;
    let actions = decide(&mvm, &o);
    let s = status_of(&actions).expect("status");
    assert_eq!(s.phase, Some(Phase::Unknown));
    assert_eq!(cond(&s, ConditionType::Ready).1, Reason::AGENT_UNREACHABLE);
    // The taint manager deletes the pod; the agent cannot be told, the VM is gone with the node.
    let mvm = written(mvm, &actions);
    o.pods = pod_obs(Some(disrupted("NodeLost", true))).pods;
    let actions = decide(&mvm, &o);
    assert_eq!(pod_actions(&actions), vec![]);
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Ready).1, "NodeLost");
    assert_eq!(events(&actions), vec!["NodeLost"]);
    // Once it is gone (the node marked out-of-service, or deleted) a new pod is made.
    let mvm = written(mvm, &actions);
    o.pods = pod_obs(None).pods;
    o.agent = AgentLink::Absent;
    o.vm = None;
    assert_eq!(pod_actions(&decide(&mvm, &o)), vec![Action::CreatePod]);
}

#[test]
fn a_vm_left_on_another_node_is_stopped() {
    let mut o = pod_obs(Some(running()));
    o.pods = PodMode::On {
        pod: Some(Box::new(running())),
        buildable: Ok(()),
        elsewhere: vec!["node-a".to_string()],
    };
    let actions = decide(&vm(RunPolicy::Always), &o);
    assert_eq!(
        pod_actions(&actions)[0],
        Action::DeleteVm {
            node: "node-a".to_string()
        }
    );
}

#[test]
fn halted_deletes_vm_and_pod_and_makes_none() {
    let (mvm, mut o, _) = ready_then(RunPolicy::Always, running());
    let mut halted = mvm.clone();
    halted.spec.run_policy = RunPolicy::Halted;
    let actions = decide(&halted, &o);
    assert_eq!(pod_actions(&actions), vec![delete_vm(), Action::DeletePod]);
    assert_eq!(
        status_of(&actions).expect("status").phase,
        Some(Phase::Stopping)
    );
    let halted = written(halted, &actions);
    o.pods = pod_obs(None).pods;
    o.vm = None;
    let actions = decide(&halted, &o);
    assert_eq!(pod_actions(&actions), vec![]);
    assert_eq!(
        status_of(&actions).expect("status").phase,
        Some(Phase::Stopped)
    );
}

#[test]
fn a_finished_vm_gives_its_pod_back_and_gets_no_new_one() {
    let mut mvm = vm(RunPolicy::Once);
    mvm.status = Some(MicroVMStatus {
        phase: Some(Phase::Succeeded),
        node_name: Some(NODE.to_string()),
        ..Default::default()
    });
    let mut o = pod_obs(Some(running()));
    o.vm = Some(agent_vm(&mvm, HASH, 0, RunState::Exited));
    let actions = decide(&mvm, &o);
    assert_eq!(pod_actions(&actions), vec![delete_vm(), Action::DeletePod]);
    assert_eq!(status_of(&actions), None);
    o.pods = pod_obs(Some(disrupted("PodDeleted", true))).pods;
    o.vm = None;
    let actions = decide(&mvm, &o);
    assert_eq!(pod_actions(&actions), vec![]);
    assert_eq!(status_of(&actions), None, "Succeeded stays Succeeded");
    o.pods = pod_obs(None).pods;
    assert_eq!(pod_actions(&decide(&mvm, &o)), vec![]);
}

#[test]
fn deleted_microvm_stops_the_vm_deletes_the_pod_then_releases() {
    let (mvm, mut o, _) = ready_then(RunPolicy::Always, running());
    let gone = deleting(mvm);
    assert_eq!(
        pod_actions(&decide(&gone, &o)),
        vec![delete_vm(), Action::DeletePod, Action::RemoveFinalizer]
    );
    // A reconnecting agent gets its chance to stop the guest first.
    o.agent = AgentLink::Reconnecting {
        lost_after: Duration::from_secs(3),
    };
    let actions = decide(&gone, &o);
    assert_eq!(pod_actions(&actions), vec![]);
    assert!(actions.contains(&Action::RequeueAfter(Duration::from_secs(8))));
    // No pod, no node: just released.
    let o = pod_obs(None);
    assert_eq!(
        pod_actions(&decide(&deleting(vm(RunPolicy::Always)), &o)),
        vec![Action::RemoveFinalizer]
    );
}

#[test]
fn a_pod_of_the_name_that_is_not_ours_is_never_touched() {
    let theirs = PodView {
        owner_uid: None,
        ..running()
    };
    let actions = decide(&vm(RunPolicy::Always), &pod_obs(Some(theirs)));
    assert_eq!(pod_actions(&actions), vec![]);
    let s = status_of(&actions).expect("status");
    assert_eq!(
        cond(&s, ConditionType::Stalled).1,
        PodReason::POD_NAME_TAKEN
    );
    assert_eq!(events(&actions), vec!["Failed"]);
    let earlier = PodView {
        owner_uid: Some("uid-of-an-earlier-web".to_string()),
        ..running()
    };
    let actions = decide(&vm(RunPolicy::Always), &pod_obs(Some(earlier)));
    assert_eq!(pod_actions(&actions), vec![]);
    let s = status_of(&actions).expect("status");
    assert_eq!(cond(&s, ConditionType::Reconciling).0, "True");
    assert!(actions.contains(&Action::RequeueAfter(Duration::from_secs(5))));
}

#[test]
fn a_microvm_that_cannot_have_a_pod_stalls_without_one() {
    let mut o = pod_obs(None);
    o.pods = PodMode::On {
        pod: None,
        buildable: Err(SpecProblem {
            reason: "NameTooLong",
            message: "metadata.name is too long".to_string(),
        }),
        elsewhere: Vec::new(),
    };
    let actions = decide(&vm(RunPolicy::Always), &o);
    assert_eq!(pod_actions(&actions), vec![]);
    let s = status_of(&actions).expect("status");
    assert_eq!(
        cond(&s, ConditionType::Stalled),
        ("True", "NameTooLong", "metadata.name is too long")
    );
}

#[test]
fn pod_mode_never_uses_ignis_placement() {
    let mut o = pod_obs(None);
    o.placement = Some(Ok("node-a".to_string()));
    let actions = decide(&microvm("web"), &o);
    assert!(!actions.iter().any(|a| matches!(a, Action::Place { .. })));
}
