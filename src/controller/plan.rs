//! The decision half of reconcile: given a MicroVM and everything observed about it, the list of
//! actions that converges it. Pure: no clocks, no clients; `now` and the agent's view come in
//! through [`Observed`], so every transition is a plain-value unit test.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::scheduler::{Unschedulable, selector_matches};
use crate::api::{
    ConditionType, FINALIZER, MicroVM, MicroVMStatus, NODE_LABEL, Phase, Reason, RunPolicy,
    find_condition, set_condition_status,
};
use crate::proto::{self, DesiredState, VmState};

/// A run shorter than this that ends in a restart counts as a crash loop and backs off.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// Ceiling of the crash-loop restart delay.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(300);
/// How often an unschedulable VM is retried when nothing else triggers it.
pub const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(30);
/// How often a deletion blocked on an unreachable agent is retried.
const DELETE_RETRY: Duration = Duration::from_secs(5);

/// The connection to the agent of the VM's node, as the agent pool sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentLink {
    /// Connected and synced: `Observed::vm` is the agent's current view.
    Connected,
    /// The stream broke; the agent counts as lost after `lost_after` more.
    Reconnecting { lost_after: Duration },
    /// Unreachable beyond the grace period.
    Lost,
    /// No agent is known for the node at all.
    Absent,
}

/// A MicroVM the agent API cannot express (see `vmspec::VmSpecError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecProblem {
    pub reason: &'static str,
    pub message: String,
}

/// Everything reconcile looked at, besides the object itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub now: Timestamp,
    /// The hash of the spec the agent should run, or why there is none.
    pub spec_hash: Result<String, SpecProblem>,
    /// The link to the agent of the placed node (or of the node being chosen now).
    pub agent: AgentLink,
    /// The agent's view of this VM (meaningful when `agent` is `Connected`).
    pub vm: Option<proto::Vm>,
    /// The scheduler's answer; only computed for a VM without a node.
    pub placement: Option<Result<String, Unschedulable>>,
    /// Labels of the placed node, when known.
    pub node_labels: Option<BTreeMap<String, String>>,
}

/// Event severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Normal,
    Warning,
}

/// One step of converging a MicroVM; `act` runs them in this order of kinds: metadata,
/// agent calls, status, events, requeue.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    AddFinalizer,
    /// Record the node in the `ignis.dev/node` label (status carries it too).
    Place {
        node: String,
    },
    ApplyVm {
        node: String,
        run: u32,
        desired: DesiredState,
    },
    DeleteVm {
        node: String,
    },
    RemoveFinalizer,
    UpdateStatus(Box<MicroVMStatus>),
    Event {
        kind: EventKind,
        reason: &'static str,
        message: String,
    },
    RequeueAfter(Duration),
}

/// Decide what converges `mvm`.
pub fn plan(mvm: &MicroVM, obs: &Observed) -> Vec<Action> {
    let mut p = Planner::new(mvm, obs);
    if mvm.metadata.deletion_timestamp.is_some() {
        p.finalize();
    } else {
        p.converge();
    }
    p.finish()
}

/// Where the VM is placed: status first, the label as a fallback (status write may have lagged).
pub fn placed_node(mvm: &MicroVM) -> Option<String> {
    mvm.status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .or_else(|| {
            mvm.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(NODE_LABEL).cloned())
        })
}

fn has_finalizer(mvm: &MicroVM) -> bool {
    mvm.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

struct Planner<'a> {
    mvm: &'a MicroVM,
    obs: &'a Observed,
    old: MicroVMStatus,
    new: MicroVMStatus,
    generation: Option<i64>,
    now: Time,
    metadata: Vec<Action>,
    agent: Vec<Action>,
    events: Vec<Action>,
    requeue: Option<Duration>,
    /// Remove the finalizer, strictly after the agent calls.
    release: bool,
}

impl<'a> Planner<'a> {
    fn new(mvm: &'a MicroVM, obs: &'a Observed) -> Self {
        let old = mvm.status.clone().unwrap_or_default();
        Self {
            mvm,
            obs,
            new: old.clone(),
            old,
            generation: mvm.metadata.generation,
            now: Time(obs.now),
            metadata: Vec::new(),
            agent: Vec::new(),
            events: Vec::new(),
            requeue: None,
            release: false,
        }
    }

    fn finish(self) -> Vec<Action> {
        let mut out = self.metadata;
        out.extend(self.agent);
        if self.new != self.old {
            out.push(Action::UpdateStatus(Box::new(self.new)));
        }
        out.extend(self.events);
        if self.release {
            out.push(Action::RemoveFinalizer);
        }
        if let Some(d) = self.requeue {
            out.push(Action::RequeueAfter(d));
        }
        out
    }

    fn cond(&mut self, t: ConditionType, status: &str, reason: &str, message: impl Into<String>) {
        set_condition_status(
            &mut self.new.conditions,
            t,
            status,
            reason,
            message,
            self.generation,
            self.now.clone(),
        );
    }

    fn event(&mut self, kind: EventKind, reason: &'static str, message: impl Into<String>) {
        self.events.push(Action::Event {
            kind,
            reason,
            message: message.into(),
        });
    }

    fn requeue(&mut self, d: Duration) {
        self.requeue = Some(self.requeue.map_or(d, |r| r.min(d)));
    }

    fn old_cond(&self, t: ConditionType) -> Option<(&str, &str)> {
        find_condition(&self.old.conditions, t).map(|c| (c.status.as_str(), c.reason.as_str()))
    }

    /// kstatus: Reconciling while converging, Stalled when only the user can unblock it.
    fn kstatus(&mut self, reconciling: bool, stalled: Option<(&str, &str)>) {
        if reconciling {
            self.cond(
                ConditionType::Reconciling,
                "True",
                Reason::PROGRESSING,
                "converging on the latest generation",
            );
        } else {
            self.cond(
                ConditionType::Reconciling,
                "False",
                Reason::RECONCILED,
                "the latest generation is applied",
            );
        }
        match stalled {
            Some((reason, message)) => self.cond(ConditionType::Stalled, "True", reason, message),
            None => self.cond(ConditionType::Stalled, "False", Reason::RECONCILED, ""),
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.new.phase = Some(phase);
        self.new.observed_generation = self.generation;
    }

    fn finalize(&mut self) {
        if !has_finalizer(self.mvm) {
            return;
        }
        let Some(node) = placed_node(self.mvm) else {
            self.release = true;
            return;
        };
        match &self.obs.agent {
            AgentLink::Connected => {
                // DeleteVM is idempotent, so cleanup does not care whether apply ever ran.
                self.agent.push(Action::DeleteVm { node });
                self.release = true;
            }
            AgentLink::Reconnecting { lost_after } => {
                self.requeue(*lost_after + DELETE_RETRY);
            }
            AgentLink::Lost | AgentLink::Absent => {
                // Holding the object hostage to a dead node helps nobody; drift repair removes
                // the VM when the agent comes back and reports a uid no MicroVM owns.
                self.event(
                    EventKind::Warning,
                    "AgentUnreachable",
                    format!(
                        "released without stopping the VM: the agent on {node} is unreachable; it removes the VM when it returns"
                    ),
                );
                self.release = true;
            }
        }
    }

    fn converge(&mut self) {
        if !has_finalizer(self.mvm) {
            self.metadata.push(Action::AddFinalizer);
        }
        let node = match placed_node(self.mvm) {
            Some(node) => {
                if self.new.node_name.is_none() {
                    self.new.node_name = Some(node.clone());
                }
                node
            }
            None => match &self.obs.placement {
                Some(Ok(node)) => {
                    self.metadata.push(Action::Place { node: node.clone() });
                    self.new.node_name = Some(node.clone());
                    self.event(EventKind::Normal, "Scheduled", format!("placed on {node}"));
                    node.clone()
                }
                Some(Err(unschedulable)) => {
                    self.unschedulable(unschedulable);
                    return;
                }
                None => {
                    // Nothing to place with yet (no placement computed): try again soon.
                    self.requeue(UNSCHEDULABLE_RETRY);
                    return;
                }
            },
        };
        self.scheduled_condition(&node);

        let hash = match &self.obs.spec_hash {
            Ok(hash) => hash.clone(),
            Err(problem) => {
                let problem = problem.clone();
                self.stalled_without_vm(problem.reason, &problem.message);
                return;
            }
        };

        // Only a VM that just got its node has a link we have not observed: it is new, so the
        // agent has nothing for it.
        let just_placed = placed_node(self.mvm).is_none();
        let link = if just_placed {
            AgentLink::Connected
        } else {
            self.obs.agent.clone()
        };
        match link {
            AgentLink::Connected => {}
            AgentLink::Reconnecting { lost_after } => {
                self.requeue(lost_after);
                return;
            }
            AgentLink::Lost | AgentLink::Absent => {
                self.agent_lost(&node, link == AgentLink::Absent);
                return;
            }
        }
        let vm = if just_placed {
            None
        } else {
            self.obs.vm.clone()
        };
        match vm {
            None => self.no_vm(&node),
            Some(vm) => self.with_vm(&node, &hash, &vm),
        }
    }

    fn unschedulable(&mut self, u: &Unschedulable) {
        let fresh = self.old_cond(ConditionType::Scheduled)
            != Some(("False", Reason::UNSCHEDULABLE))
            || find_condition(&self.old.conditions, ConditionType::Scheduled)
                .is_some_and(|c| c.message != u.message);
        self.set_phase(Phase::Pending);
        self.cond(
            ConditionType::Scheduled,
            "False",
            Reason::UNSCHEDULABLE,
            u.message.clone(),
        );
        self.cond(
            ConditionType::Ready,
            "False",
            Reason::PENDING,
            "waiting for a node",
        );
        self.kstatus(true, None);
        if fresh {
            self.event(EventKind::Warning, "FailedScheduling", u.message.clone());
        }
        self.requeue(UNSCHEDULABLE_RETRY);
    }

    fn scheduled_condition(&mut self, node: &str) {
        let selector = self.mvm.spec.node_selector.clone().unwrap_or_default();
        let mismatch = self
            .obs
            .node_labels
            .as_ref()
            .is_some_and(|labels| !selector_matches(&selector, labels));
        if mismatch {
            let message = format!(
                "node {node} no longer matches spec.nodeSelector; the VM stays there (a placed VM never moves)"
            );
            if self.old_cond(ConditionType::Scheduled).map(|c| c.1) != Some(Reason::NODE_MISMATCH) {
                self.event(EventKind::Warning, "NodeNoLongerMatches", message.clone());
            }
            self.cond(
                ConditionType::Scheduled,
                "True",
                Reason::NODE_MISMATCH,
                message,
            );
        } else {
            self.cond(
                ConditionType::Scheduled,
                "True",
                Reason::PLACED,
                format!("placed on {node}"),
            );
        }
    }

    fn stalled_without_vm(&mut self, reason: &str, message: &str) {
        if self.old_cond(ConditionType::Stalled) != Some(("True", reason)) {
            self.events.push(Action::Event {
                kind: EventKind::Warning,
                reason: "Failed",
                message: message.to_string(),
            });
        }
        self.set_phase(Phase::Failed);
        self.cond(ConditionType::Ready, "False", reason, message);
        self.kstatus(false, Some((reason, message)));
    }

    fn agent_lost(&mut self, node: &str, absent: bool) {
        let message = if absent {
            format!("no ignis agent is known for node {node}")
        } else {
            format!("the ignis agent on node {node} is unreachable")
        };
        if self.old_cond(ConditionType::Ready).map(|c| c.1) != Some(Reason::AGENT_UNREACHABLE) {
            self.event(EventKind::Warning, "AgentUnreachable", message.clone());
        }
        self.set_phase(Phase::Unknown);
        self.cond(
            ConditionType::Ready,
            "Unknown",
            Reason::AGENT_UNREACHABLE,
            message,
        );
        // The VM's fate is unknown, not stuck on the user: neither converging nor stalled.
        self.kstatus(false, None);
    }

    fn restarts(&self, vm: Option<&proto::Vm>) -> u32 {
        let counted = u32::try_from(self.old.restart_count).unwrap_or(0);
        counted.max(vm.map_or(0, |v| v.run))
    }

    fn set_restarts(&mut self, n: u32) {
        self.new.restart_count = i32::try_from(n).unwrap_or(i32::MAX);
    }

    fn starting(&mut self, node: &str) {
        self.set_phase(Phase::Starting);
        self.cond(
            ConditionType::Ready,
            "False",
            Reason::STARTING,
            format!("booting on {node}"),
        );
        self.kstatus(true, None);
    }

    fn halted(&mut self) {
        if self.old.phase != Some(Phase::Stopped) {
            self.event(
                EventKind::Normal,
                "Stopped",
                "runPolicy is Halted: the VM is stopped",
            );
        }
        self.set_phase(Phase::Stopped);
        self.cond(
            ConditionType::Ready,
            "False",
            Reason::HALTED,
            "runPolicy is Halted",
        );
        self.kstatus(false, None);
    }

    fn no_vm(&mut self, node: &str) {
        let run = self.restarts(None);
        self.set_restarts(run);
        if self.mvm.spec.run_policy == RunPolicy::Halted {
            self.halted();
            return;
        }
        if matches!(self.old.phase, Some(Phase::Succeeded | Phase::Failed)) {
            // The run ended and its record is gone from the agent (e.g. the node was wiped);
            // a finished VM is not started again.
            return;
        }
        self.agent.push(Action::ApplyVm {
            node: node.to_string(),
            run,
            desired: DesiredState::Running,
        });
        if self.old.phase != Some(Phase::Starting) {
            self.event(EventKind::Normal, "Starting", format!("booting on {node}"));
        }
        self.starting(node);
    }

    fn details(&mut self, vm: &proto::Vm) {
        self.new.hypervisor = match vm.hypervisor.as_str() {
            "qemu" => Some(crate::api::Hypervisor::Qemu),
            "firecracker" => Some(crate::api::Hypervisor::Firecracker),
            "cloud-hypervisor" => Some(crate::api::Hypervisor::CloudHypervisor),
            "simulated" => Some(crate::api::Hypervisor::Simulated),
            _ => self.new.hypervisor,
        };
        self.new.accelerator = match vm.accelerator.as_str() {
            "kvm" => Some(crate::api::Accelerator::Kvm),
            "tcg" => Some(crate::api::Accelerator::Tcg),
            _ => self.new.accelerator,
        };
        self.new.ip_addresses = vm.ip_addresses.clone();
        if vm.started_at_unix_ms > 0 {
            self.new.start_time = Timestamp::from_millisecond(vm.started_at_unix_ms)
                .ok()
                .map(Time);
        }
    }

    fn with_vm(&mut self, node: &str, hash: &str, vm: &proto::Vm) {
        let state = VmState::try_from(vm.state).unwrap_or(VmState::Unspecified);
        let mut run = self.restarts(Some(vm));
        self.set_restarts(run);
        let halted = self.mvm.spec.run_policy == RunPolicy::Halted;
        let apply = |p: &mut Self, run: u32, desired: DesiredState| {
            p.agent.push(Action::ApplyVm {
                node: node.to_string(),
                run,
                desired,
            });
        };
        // A boot-relevant field differs from what runs (only possible across controller
        // versions, since those fields are immutable): converge the same run onto the new spec.
        let hash_differs = vm.spec_hash != hash;

        if halted {
            match state {
                VmState::Stopped | VmState::Exited | VmState::Failed => {
                    if vm.exit.is_some() || state == VmState::Stopped {
                        self.details(vm);
                    }
                    self.halted();
                }
                VmState::Stopping => {
                    self.set_phase(Phase::Stopping);
                    self.cond(
                        ConditionType::Ready,
                        "False",
                        Reason::STOPPING,
                        "runPolicy is Halted: stopping the guest",
                    );
                    self.kstatus(true, None);
                }
                _ => {
                    apply(self, vm.run, DesiredState::Stopped);
                    self.set_phase(Phase::Stopping);
                    self.cond(
                        ConditionType::Ready,
                        "False",
                        Reason::STOPPING,
                        "runPolicy is Halted: stopping the guest",
                    );
                    self.kstatus(true, None);
                }
            }
            return;
        }

        if vm.run < run || hash_differs {
            apply(self, run, DesiredState::Running);
            self.starting(node);
            return;
        }

        match state {
            VmState::Unspecified | VmState::Creating | VmState::Starting => self.starting(node),
            VmState::Running if !vm.ready => self.starting(node),
            VmState::Running => {
                self.details(vm);
                let message = format!("booted in {}ms", vm.apply_to_ready_ms);
                if self.old_cond(ConditionType::Ready).map(|c| c.0) != Some("True") {
                    self.event(EventKind::Normal, "Ready", message.clone());
                }
                self.set_phase(Phase::Running);
                // Keep the first message of this run: rewriting it on every reconcile would be a
                // write without news.
                let keep = find_condition(&self.old.conditions, ConditionType::Ready)
                    .filter(|c| c.status == "True" && c.reason == Reason::GUEST_READY)
                    .map(|c| c.message.clone());
                self.cond(
                    ConditionType::Ready,
                    "True",
                    Reason::GUEST_READY,
                    keep.unwrap_or(message),
                );
                self.kstatus(false, None);
            }
            VmState::Stopping => {
                self.set_phase(Phase::Stopping);
                self.cond(
                    ConditionType::Ready,
                    "False",
                    Reason::STOPPING,
                    "the guest is stopping",
                );
                self.kstatus(true, None);
            }
            VmState::Stopped => {
                // Stopped on request earlier (runPolicy was Halted) and now wanted running again:
                // the stopped run is over, so boot the next one.
                run += 1;
                self.set_restarts(run);
                apply(self, run, DesiredState::Running);
                self.event(EventKind::Normal, "Starting", format!("booting on {node}"));
                self.starting(node);
            }
            VmState::Exited | VmState::Failed => self.ended(node, vm, run),
        }
    }

    fn ended(&mut self, node: &str, vm: &proto::Vm, run: u32) {
        self.details(vm);
        let exit = vm.exit.clone().unwrap_or_default();
        let failed = VmState::try_from(vm.state) == Ok(VmState::Failed) || !exit.success;
        let reason = if exit.reason.is_empty() {
            if failed {
                Reason::GUEST_FAILED.to_string()
            } else {
                Reason::GUEST_EXITED.to_string()
            }
        } else {
            exit.reason.clone()
        };
        let message = if exit.message.is_empty() {
            format!("run {run} ended: {reason}")
        } else {
            exit.message.clone()
        };
        if failed && exit.permanent {
            if self.old_cond(ConditionType::Stalled).map(|c| c.0) != Some("True") {
                self.event(EventKind::Warning, "Failed", message.clone());
            }
            self.set_phase(Phase::Failed);
            self.cond(ConditionType::Ready, "False", &reason, message.clone());
            self.kstatus(false, Some((&reason, &message)));
            return;
        }
        let restart = match self.mvm.spec.run_policy {
            RunPolicy::Always => true,
            RunPolicy::RerunOnFailure => failed,
            RunPolicy::Once | RunPolicy::Halted => false,
        };
        if !restart {
            let (phase, cond_reason) = if failed {
                (Phase::Failed, Reason::GUEST_FAILED)
            } else {
                (Phase::Succeeded, Reason::GUEST_EXITED)
            };
            if self.old.phase != Some(phase) {
                let kind = if failed {
                    EventKind::Warning
                } else {
                    EventKind::Normal
                };
                self.event(
                    kind,
                    if failed { "Failed" } else { "Exited" },
                    message.clone(),
                );
            }
            self.set_phase(phase);
            self.cond(ConditionType::Ready, "False", cond_reason, message);
            self.kstatus(false, None);
            return;
        }
        let delay = restart_delay(vm, run, self.obs.now);
        if !delay.is_zero() {
            // Crash loop: say so and come back when the back-off is over.
            self.cond(
                ConditionType::Ready,
                "False",
                Reason::GUEST_EXITED,
                format!("{message}; restarting (crash loop back-off)"),
            );
            self.set_phase(Phase::Starting);
            self.kstatus(true, None);
            self.requeue(delay);
            return;
        }
        let next = run + 1;
        self.set_restarts(next);
        self.agent.push(Action::ApplyVm {
            node: node.to_string(),
            run: next,
            desired: DesiredState::Running,
        });
        self.event(
            EventKind::Normal,
            "Restarted",
            format!("run {run} ended ({reason}); runPolicy restarts it as run {next}"),
        );
        self.starting(node);
    }
}

/// Crash-loop back-off before restarting: none after a run that lasted, else doubling from 1s
/// with the restart count, capped.
pub fn restart_delay(vm: &proto::Vm, restarts: u32, now: Timestamp) -> Duration {
    let exit_ms = vm.exit.as_ref().map_or(0, |e| e.at_unix_ms);
    let lasted_ms = exit_ms.saturating_sub(vm.started_at_unix_ms.max(vm.created_at_unix_ms));
    if vm.started_at_unix_ms > 0 && lasted_ms >= STABLE_RUN.as_millis() as i64 {
        return Duration::ZERO;
    }
    let backoff = Duration::from_secs(1u64 << restarts.min(9)).min(MAX_RESTART_DELAY);
    let since_exit_ms = now.as_millisecond().saturating_sub(exit_ms).max(0);
    backoff.saturating_sub(Duration::from_millis(since_exit_ms as u64))
}

#[cfg(test)]
mod tests {
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
        let actions = plan(&mvm, &o);
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
            }));
            let actions = plan(&mvm, &o);
            let s = status_of(&actions).expect("status");
            assert_eq!(s.phase, Some(Phase::Pending));
            let (status, reason, message) = cond(&s, ConditionType::Scheduled);
            assert_eq!((status, reason), ("False", Reason::UNSCHEDULABLE));
            assert!(message.starts_with(constraint.as_str()));
            assert!(applies(&actions).is_empty());
            assert_eq!(events(&actions), vec!["FailedScheduling"]);
            assert!(actions.contains(&Action::RequeueAfter(UNSCHEDULABLE_RETRY)));
            // Retrying with the same answer writes nothing and repeats no event.
            let mut again = written(mvm, &actions);
            again.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
            let actions = plan(&again, &o);
            assert_eq!(actions, vec![Action::RequeueAfter(UNSCHEDULABLE_RETRY)]);
        }
    }

    #[test]
    fn placed_vm_the_agent_lacks_is_applied_as_run_zero() {
        let mvm = placed("web", "node-a");
        let actions = plan(&mvm, &obs());
        assert_eq!(applies(&actions), vec![(0, DesiredState::Running)]);
        assert!(!actions.contains(&Action::AddFinalizer));
    }

    #[test]
    fn starting_vm_is_not_ready_and_reconciling() {
        let mvm = placed("web", "node-a");
        let mut o = obs();
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Starting));
        let actions = plan(&mvm, &o);
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
        let first = plan(&mvm, &o);
        let mut mvm = written(mvm, &first);
        mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        mvm.metadata.labels = Some([(NODE_LABEL.to_string(), "node-a".to_string())].into());
        // The agent reports creating/starting: nothing new to write.
        o.placement = None;
        for state in [VmState::Creating, VmState::Starting] {
            o.vm = Some(agent_vm(&mvm, HASH, 0, state));
            let actions = plan(&mvm, &o);
            assert_eq!(status_of(&actions), None, "{state:?}");
            assert!(applies(&actions).is_empty());
        }
        // Write 3: Ready.
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Running));
        let ready = plan(&mvm, &o);
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
        assert_eq!(plan(&mvm, &o), vec![]);
    }

    #[test]
    fn transition_time_survives_a_steady_reconcile() {
        let mut mvm = placed("web", "node-a");
        let mut o = obs();
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Running));
        mvm = written(mvm.clone(), &plan(&mvm, &o));
        let before = mvm.status.clone();
        o.now = Timestamp::from_millisecond(9_000_000).expect("valid");
        assert_eq!(plan(&mvm, &o), vec![]);
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
        let mut vm = agent_vm(&mvm, HASH, restarts as u32, VmState::Exited);
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
            let actions = plan(&mvm, &o);
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
        let actions = plan(&mvm, &o);
        let mvm = written(mvm, &actions);
        // The agent now reports run 1 booting.
        o.vm = Some(agent_vm(&mvm, HASH, 1, VmState::Starting));
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        assert_eq!(status_of(&actions), None);
    }

    #[test]
    fn rerun_on_failure_restarts_only_failures() {
        let (mvm, o) = exited(RunPolicy::RerunOnFailure, false, 0);
        assert_eq!(applies(&plan(&mvm, &o)), vec![(1, DesiredState::Running)]);
        let (mvm, o) = exited(RunPolicy::RerunOnFailure, true, 0);
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Succeeded));
        assert_eq!(cond(&s, ConditionType::Ready).1, Reason::GUEST_EXITED);
        assert_eq!(events(&actions), vec!["Exited"]);
    }

    #[test]
    fn once_ends_in_succeeded_or_failed() {
        let (mvm, o) = exited(RunPolicy::Once, true, 0);
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        assert_eq!(
            status_of(&actions).and_then(|s| s.phase),
            Some(Phase::Succeeded)
        );
        let (mvm, o) = exited(RunPolicy::Once, false, 0);
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(cond(&s, ConditionType::Ready).1, Reason::GUEST_FAILED);
        assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
        assert_eq!(events(&actions), vec!["Failed"]);
        // Finished stays finished, even when the agent forgets the VM.
        let mut mvm = written(mvm, &actions);
        let mut o = o;
        o.vm = None;
        mvm.metadata.generation = Some(1);
        assert_eq!(plan(&mvm, &o), vec![]);
    }

    #[test]
    fn halted_vm_that_exited_is_stopped() {
        let (mvm, o) = exited(RunPolicy::Halted, true, 0);
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Stopped));
        assert_eq!(cond(&s, ConditionType::Ready).1, Reason::HALTED);
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
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        assert!(actions.contains(&Action::RequeueAfter(Duration::from_secs(6))));
        let s = status_of(&actions).expect("status");
        assert!(cond(&s, ConditionType::Ready).2.contains("back-off"));
        // Once the back-off is over, it restarts.
        o.now = Timestamp::from_millisecond(exit_at + 8_000).expect("valid");
        assert_eq!(applies(&plan(&mvm, &o)), vec![(4, DesiredState::Running)]);
    }

    #[test]
    fn restart_delay_is_capped() {
        let mut vm = agent_vm(&microvm("x"), HASH, 0, VmState::Exited);
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
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Running));
        let actions = plan(&mvm, &o);
        assert_eq!(applies(&actions), vec![(0, DesiredState::Stopped)]);
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Stopping));
        assert_eq!(s.observed_generation, Some(2));
        // The agent reports it stopped.
        let mvm = written(mvm, &actions);
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Stopped));
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Stopped));
        assert_eq!(
            cond(&s, ConditionType::Ready),
            ("False", Reason::HALTED, "runPolicy is Halted")
        );
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
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Stopped));
        let actions = plan(&mvm, &o);
        assert_eq!(applies(&actions), vec![(1, DesiredState::Running)]);
        assert_eq!(status_of(&actions).map(|s| s.restart_count), Some(1));
    }

    #[test]
    fn generation_bump_moves_observed_generation_and_applies_the_new_policy() {
        let mut mvm = placed("web", "node-a");
        let mut o = obs();
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Running));
        mvm = written(mvm.clone(), &plan(&mvm, &o));
        // runPolicy Always → Once: generation 2; nothing to do on the agent, but the status
        // must say it saw generation 2.
        mvm.spec.run_policy = RunPolicy::Once;
        mvm.metadata.generation = Some(2);
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        let s = status_of(&actions).expect("status");
        assert_eq!(s.observed_generation, Some(2));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
        // And the new policy decides the next exit: Once does not restart.
        let mut vm = agent_vm(&mvm, HASH, 0, VmState::Exited);
        vm.exit = Some(exit(
            true,
            "GuestShutdown",
            false,
            vm.started_at_unix_ms + 120_000,
        ));
        o.vm = Some(vm);
        let mvm = written(mvm, &actions);
        let actions = plan(&mvm, &o);
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
        o.vm = Some(agent_vm(&mvm, "old-hash", 0, VmState::Running));
        assert_eq!(applies(&plan(&mvm, &o)), vec![(0, DesiredState::Running)]);
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
            let mut vm = agent_vm(&mvm, HASH, 0, VmState::Failed);
            vm.ready = false;
            vm.exit = Some(exit(
                false,
                "KernelNotFound",
                true,
                vm.created_at_unix_ms + 5,
            ));
            o.vm = Some(vm);
            let actions = plan(&mvm, &o);
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
            assert_eq!(plan(&mvm, &o), vec![]);
        }
    }

    #[test]
    fn transient_boot_failure_is_retried_by_policy_not_stalled() {
        let (mvm, mut o) = exited(RunPolicy::Always, false, 0);
        let mut vm = o.vm.clone().expect("vm");
        vm.state = VmState::Failed as i32;
        vm.exit = Some(exit(
            false,
            "BootTimeout",
            false,
            vm.started_at_unix_ms + 120_000,
        ));
        o.vm = Some(vm);
        let actions = plan(&mvm, &o);
        assert_eq!(applies(&actions), vec![(1, DesiredState::Running)]);
        let s = status_of(&actions).expect("status");
        assert_eq!(cond(&s, ConditionType::Stalled).0, "False");
        let mut once = mvm.clone();
        once.spec.run_policy = RunPolicy::Once;
        let s = status_of(&plan(&once, &o)).expect("status");
        assert_eq!(s.phase, Some(Phase::Failed));
    }

    #[test]
    fn halted_vm_is_placed_but_never_booted() {
        let mut mvm = microvm("web");
        mvm.spec.run_policy = RunPolicy::Halted;
        let mut o = obs();
        o.placement = Some(Ok("node-a".to_string()));
        let actions = plan(&mvm, &o);
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
            reason: "ImageUnsupported",
            message: "spec.kernel.image is not supported".to_string(),
        });
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        let s = status_of(&actions).expect("status");
        assert_eq!(cond(&s, ConditionType::Stalled).1, "ImageUnsupported");
    }

    #[test]
    fn deleted_vm_is_deleted_on_the_agent_then_released() {
        let mvm = deleting(placed("web", "node-a"));
        let mut o = obs();
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Running));
        assert_eq!(
            plan(&mvm, &o),
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
            plan(&mvm, &obs()),
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
        assert_eq!(plan(&never, &obs()), vec![Action::RemoveFinalizer]);
        // Finalizer already gone: nothing at all.
        assert_eq!(plan(&deleting(microvm("web")), &obs()), vec![]);
    }

    #[test]
    fn deletion_waits_for_a_reconnecting_agent_and_gives_up_on_a_lost_one() {
        let mvm = deleting(placed("web", "node-a"));
        let mut o = obs();
        o.agent = AgentLink::Reconnecting {
            lost_after: Duration::from_secs(4),
        };
        assert_eq!(
            plan(&mvm, &o),
            vec![Action::RequeueAfter(Duration::from_secs(9))]
        );
        o.agent = AgentLink::Lost;
        let actions = plan(&mvm, &o);
        assert!(actions.contains(&Action::RemoveFinalizer));
        assert_eq!(events(&actions), vec!["AgentUnreachable"]);
    }

    #[test]
    fn lost_agent_turns_ready_unknown_and_heals() {
        let mut mvm = placed("web", "node-a");
        let mut o = obs();
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Running));
        mvm = written(mvm.clone(), &plan(&mvm, &o));
        // Within the grace period: nothing written, come back when it expires.
        o.agent = AgentLink::Reconnecting {
            lost_after: Duration::from_secs(7),
        };
        assert_eq!(
            plan(&mvm, &o),
            vec![Action::RequeueAfter(Duration::from_secs(7))]
        );
        o.agent = AgentLink::Lost;
        let actions = plan(&mvm, &o);
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Unknown));
        assert_eq!(cond(&s, ConditionType::Ready).0, "Unknown");
        assert_eq!(cond(&s, ConditionType::Ready).1, Reason::AGENT_UNREACHABLE);
        assert_eq!(events(&actions), vec!["AgentUnreachable"]);
        assert!(applies(&actions).is_empty());
        let lost = written(mvm, &actions);
        assert_eq!(plan(&lost, &o), vec![]);
        // The agent is back with the VM still running.
        o.agent = AgentLink::Connected;
        let actions = plan(&lost, &o);
        let s = status_of(&actions).expect("status");
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(cond(&s, ConditionType::Ready).0, "True");
    }

    #[test]
    fn absent_agent_is_reported_like_a_lost_one() {
        let mvm = placed("web", "node-a");
        let mut o = obs();
        o.agent = AgentLink::Absent;
        let s = status_of(&plan(&mvm, &o)).expect("status");
        assert_eq!(cond(&s, ConditionType::Ready).1, Reason::AGENT_UNREACHABLE);
        assert!(cond(&s, ConditionType::Ready).2.contains("no ignis agent"));
    }

    #[test]
    fn node_no_longer_matching_keeps_the_vm_and_says_so() {
        let mut mvm = placed("web", "node-a");
        mvm.spec.node_selector = Some([("zone".to_string(), "a".to_string())].into());
        let mut o = obs();
        o.vm = Some(agent_vm(&mvm, HASH, 0, VmState::Running));
        o.node_labels = Some([("zone".to_string(), "a".to_string())].into());
        mvm = written(mvm.clone(), &plan(&mvm, &o));
        o.node_labels = Some([("zone".to_string(), "b".to_string())].into());
        let actions = plan(&mvm, &o);
        assert!(applies(&actions).is_empty());
        assert!(!actions.iter().any(|a| matches!(a, Action::DeleteVm { .. })));
        let s = status_of(&actions).expect("status");
        assert_eq!(s.node_name.as_deref(), Some("node-a"));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(cond(&s, ConditionType::Scheduled).1, Reason::NODE_MISMATCH);
        assert_eq!(cond(&s, ConditionType::Ready).0, "True");
        assert_eq!(events(&actions), vec!["NodeNoLongerMatches"]);
        let mvm = written(mvm, &actions);
        assert_eq!(plan(&mvm, &o), vec![]);
    }

    #[test]
    fn placement_never_changes_even_when_the_scheduler_would_choose_elsewhere() {
        let mvm = placed("web", "node-a");
        let mut o = obs();
        o.placement = Some(Ok("node-b".to_string()));
        let actions = plan(&mvm, &o);
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
        let actions = plan(&mvm, &obs());
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
        let s = status_of(&plan(&mvm, &obs())).expect("status");
        let c = find_condition(&s.conditions, ConditionType::Scheduled).expect("scheduled");
        assert_eq!(c.last_transition_time, at(7));
    }
}
