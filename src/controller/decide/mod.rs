//! The decision half of reconcile: given a MicroVM and everything observed about it, the list of
//! actions that converges it. Pure: no clocks, no clients; `now` and the agent's view come in
//! through [`Observed`], so every transition is a plain-value unit test.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::scheduler::{Unschedulable, selector_matches};
pub(crate) use super::vmpod::PodView;
use crate::api::{
    ConditionType, FINALIZER, ImageStatus, MicroVM, MicroVMStatus, NODE_LABEL, Phase, Reason,
    RunPolicy, find_condition, set_condition_status,
};
use crate::vm::{DesiredState, ExitReason, Pulling, RunState, VmStatus};

/// A run shorter than this that ends in a restart counts as a crash loop and backs off.
const STABLE_RUN: Duration = Duration::from_secs(60);
/// Ceiling of the crash-loop restart delay.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(300);
/// How often an unschedulable VM is retried when nothing else triggers it.
pub(crate) const UNSCHEDULABLE_RETRY: Duration = Duration::from_secs(30);
/// How long a VM may wait for a node before it is `Stalled` with reason `Unschedulable`:
/// kstatus gives an unschedulable pod the same 15 s before it calls it Failed.
pub(crate) const UNSCHEDULABLE_GRACE: Duration = Duration::from_secs(15);
/// How often a deletion blocked on an unreachable agent is retried.
const DELETE_RETRY: Duration = Duration::from_secs(5);

/// Event severity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EventKind {
    Normal,
    Warning,
}

/// One step of converging a MicroVM; `act` runs them in this order of kinds: metadata,
/// agent calls, status, events, requeue.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Action {
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
    /// Create the VM pod (pod mode).
    CreatePod,
    /// Delete the VM pod (pod mode).
    DeletePod,
    /// Set the VM pod's `ignis.dev/guest-ready` condition (pod mode).
    SetPodReady(bool),
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
pub(crate) fn decide(mvm: &MicroVM, obs: &Observed) -> Vec<Action> {
    let mut p = Planner::new(mvm, obs);
    let deleting = mvm.metadata.deletion_timestamp.is_some();
    match &obs.pods {
        PodMode::Off if deleting => p.finalize(),
        PodMode::Off => p.converge(),
        PodMode::On { .. } if deleting => p.finalize_pod(),
        PodMode::On { .. } => p.converge_pod(),
    }
    p.finish()
}

/// Where the VM is placed: status first, the label as a fallback (status write may have lagged).
pub(crate) fn placed_node(mvm: &MicroVM) -> Option<String> {
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

    /// Drop a condition that does not apply in the current state.
    fn drop_cond(&mut self, t: ConditionType) {
        self.new.conditions.retain(|c| c.type_ != t.as_str());
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

    /// No node takes the VM. When no node ever will as things stand (no node has the VMM,
    /// working KVM or enough memory) it is `Stalled` with that reason at once; otherwise it is
    /// converging for [`UNSCHEDULABLE_GRACE`] (nodes full, none matching yet), then `Stalled`
    /// with reason `Unschedulable`, as kstatus judges a pod, so a GitOps tool fails instead of
    /// waiting for its timeout. Either way placement is retried: a node fixed by a person
    /// unblocks it.
    fn unschedulable(&mut self, u: &Unschedulable) {
        let old_scheduled = find_condition(&self.old.conditions, ConditionType::Scheduled)
            .filter(|c| c.status == "False" && c.reason == Reason::UNSCHEDULABLE);
        // Counted from when it became unschedulable: a changed message is no new wait.
        let waited = old_scheduled.map_or(Duration::ZERO, |c| {
            let since = self.obs.now.duration_since(c.last_transition_time.0);
            Duration::try_from(since).unwrap_or(Duration::ZERO)
        });
        self.set_phase(Phase::Pending);
        self.unplaced(&u.message, u.stalled, waited);
        self.requeue(UNSCHEDULABLE_RETRY);
    }

    /// No node takes the VM (by Ignis's placement or kube-scheduler's), for `waited` so far:
    /// `Scheduled=False` with `message` (a Warning when the message is new), and the verdict:
    /// `Stalled` with `stalled` at once, or with `Unschedulable` after [`UNSCHEDULABLE_GRACE`];
    /// converging until then.
    fn unplaced(&mut self, message: &str, stalled: Option<&'static str>, waited: Duration) {
        let fresh = find_condition(&self.old.conditions, ConditionType::Scheduled)
            .filter(|c| c.status == "False" && c.reason == Reason::UNSCHEDULABLE)
            .is_none_or(|c| c.message != message);
        self.cond(
            ConditionType::Scheduled,
            "False",
            Reason::UNSCHEDULABLE,
            message,
        );
        let stalled = stalled.or((waited >= UNSCHEDULABLE_GRACE).then_some(Reason::UNSCHEDULABLE));
        match stalled {
            Some(reason) => {
                self.cond(ConditionType::Ready, "False", reason, message);
                self.kstatus(false, Some((reason, message)));
            }
            None => {
                self.waiting_for_node();
                self.requeue(UNSCHEDULABLE_GRACE - waited);
            }
        }
        if fresh {
            self.event(EventKind::Warning, "FailedScheduling", message);
        }
    }

    /// `Ready=False` while the VM waits for a node: still converging.
    fn waiting_for_node(&mut self) {
        self.cond(
            ConditionType::Ready,
            "False",
            Reason::PENDING,
            "waiting for a node",
        );
        self.kstatus(true, None);
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

    fn restarts(&self, vm: Option<&VmStatus>) -> u32 {
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

    /// The run fetches its images: visible as Ready's reason, a failed attempt as its own
    /// reason with the registry's message while the agent retries. Each apply carries the
    /// pull secrets as they are now, so re-applying lets a fixed Secret take effect.
    fn pulling(&mut self, node: &str, vm: &VmStatus, pulling: &Pulling) {
        self.set_phase(Phase::Starting);
        let old_reason = self.old_cond(ConditionType::Ready).map(|c| c.1.to_string());
        match &pulling.failure {
            None => {
                let message = format!("pulling {} on {node}", pulling.references.join(", "));
                if old_reason.as_deref() != Some(Reason::PULLING_IMAGE) {
                    self.event(EventKind::Normal, "Pulling", message.clone());
                }
                self.cond(
                    ConditionType::Ready,
                    "False",
                    Reason::PULLING_IMAGE,
                    message,
                );
            }
            Some(failure) => {
                let retry_ms = failure.retry_at_unix_ms - self.obs.now.as_millisecond();
                let message = format!(
                    "{}; retrying in {}s (attempt {})",
                    failure.message,
                    (retry_ms.max(0) + 999) / 1000,
                    failure.attempts
                );
                if old_reason.as_deref() != Some(failure.reason.as_str()) {
                    self.event(EventKind::Warning, "Failed", failure.message.clone());
                }
                self.cond(ConditionType::Ready, "False", &failure.reason, message);
                self.agent.push(Action::ApplyVm {
                    node: node.to_string(),
                    run: vm.run,
                    desired: DesiredState::Running,
                });
            }
        }
        self.kstatus(true, None);
    }

    fn stopping(&mut self, message: &str) {
        self.set_phase(Phase::Stopping);
        self.cond(ConditionType::Ready, "False", Reason::STOPPING, message);
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
        self.not_meant_to_run();
    }

    /// The VM is stopped as its spec asks (Halted, or a run that succeeded and is not
    /// restarted): readiness does not apply, so there is no `Ready` condition (phase says what
    /// it is), and kstatus reads it as Current instead of waiting forever on `Ready=False`.
    fn not_meant_to_run(&mut self) {
        self.drop_cond(ConditionType::Ready);
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

    fn details(&mut self, vm: &VmStatus) {
        self.new.hypervisor = vm.hypervisor.or(self.new.hypervisor);
        self.new.accelerator = vm.accelerator.or(self.new.accelerator);
        self.new.ip_addresses = vm.ip_addresses.clone();
        if vm.started_at_unix_ms > 0 {
            self.new.start_time = Timestamp::from_millisecond(vm.started_at_unix_ms)
                .ok()
                .map(Time);
        }
    }

    fn with_vm(&mut self, node: &str, hash: &str, vm: &VmStatus) {
        let state = vm.state;
        let mut run = self.restarts(Some(vm));
        self.set_restarts(run);
        let halted = self.mvm.spec.run_policy == RunPolicy::Halted;
        // A boot-relevant field differs from what runs (only possible across controller
        // versions, since those fields are immutable): converge the same run onto the new spec.
        let hash_differs = vm.spec_hash != hash;
        if !vm.images.is_empty() {
            self.new.images = vm
                .images
                .iter()
                .map(|i| ImageStatus {
                    kind: i.kind,
                    image: i.reference.clone(),
                    digest: i.digest.clone(),
                })
                .collect();
        }

        if halted {
            match state {
                RunState::Stopped | RunState::Exited | RunState::Failed => {
                    if vm.exit.is_some() || state == RunState::Stopped {
                        self.details(vm);
                    }
                    self.halted();
                }
                RunState::Stopping => self.stopping("runPolicy is Halted: stopping the guest"),
                _ => {
                    self.apply_desired(node, vm.run, DesiredState::Stopped);
                    self.stopping("runPolicy is Halted: stopping the guest");
                }
            }
            return;
        }

        if vm.run < run || hash_differs {
            self.apply_desired(node, run, DesiredState::Running);
            self.starting(node);
            return;
        }
        if self.suspension(node, vm) {
            return;
        }

        match state {
            RunState::Creating if vm.pulling.is_some() => {
                let pulling = vm.pulling.clone().unwrap_or_default();
                self.pulling(node, vm, &pulling);
            }
            RunState::Creating | RunState::Starting => self.starting(node),
            RunState::Running if !vm.ready => self.starting(node),
            RunState::Running => {
                self.details(vm);
                let message = if vm.restored {
                    format!("resumed from its snapshot in {}ms", vm.apply_to_ready_ms)
                } else {
                    format!("booted in {}ms", vm.apply_to_ready_ms)
                };
                if self.old_cond(ConditionType::Ready).map(|c| c.0) != Some("True") {
                    self.event(EventKind::Normal, "Ready", message.clone());
                }
                self.set_phase(Phase::Running);
                // Keep the first message of this run: rewriting it on every reconcile would be a
                // write without news. A claimed warm VM's run stays Ready by its claim.
                let keep = find_condition(&self.old.conditions, ConditionType::Ready)
                    .filter(|c| {
                        c.status == "True"
                            && (c.reason == Reason::GUEST_READY || c.reason == Reason::CLAIMED)
                    })
                    .map(|c| (c.reason.clone(), c.message.clone()));
                let (reason, message) = match &keep {
                    Some((reason, message)) => (reason.as_str(), message.clone()),
                    None => (Reason::GUEST_READY, message),
                };
                self.cond(ConditionType::Ready, "True", reason, message);
                self.kstatus(false, None);
            }
            RunState::Stopping => self.stopping("the guest is stopping"),
            RunState::Stopped => {
                // Stopped on request earlier (runPolicy was Halted) and now wanted running again:
                // the stopped run is over, so boot the next one.
                run += 1;
                self.set_restarts(run);
                self.apply_desired(node, run, DesiredState::Running);
                self.event(EventKind::Normal, "Starting", format!("booting on {node}"));
                self.starting(node);
            }
            RunState::Exited | RunState::Failed => self.ended(node, vm, run),
            // Decided by `suspension` above.
            RunState::Suspending | RunState::Suspended => {}
        }
    }

    fn ended(&mut self, node: &str, vm: &VmStatus, run: u32) {
        self.details(vm);
        let exit = vm.exit.as_ref();
        let failed = vm.state == RunState::Failed || !exit.is_some_and(|e| e.success);
        let reason = match exit.map(|e| e.reason.as_str()).filter(|r| !r.is_empty()) {
            Some(reason) => reason.to_string(),
            None if failed => Reason::GUEST_FAILED.to_string(),
            None => Reason::GUEST_EXITED.to_string(),
        };
        let message = match exit.map(|e| e.message.as_str()).filter(|m| !m.is_empty()) {
            Some(message) => message.to_string(),
            None => format!("run {run} ended: {reason}"),
        };
        if failed && exit.is_some_and(|e| e.permanent) {
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
            // A failure's own reason (BootTimeout, GuestPanic, …) says more than "failed".
            let (phase, cond_reason) = if failed {
                (Phase::Failed, reason.as_str())
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
            if failed {
                // Nothing retries a finished run: only a person can, so it is Stalled.
                self.cond(ConditionType::Ready, "False", cond_reason, message.clone());
                self.kstatus(false, Some((cond_reason, &message)));
            } else {
                self.not_meant_to_run();
            }
            return;
        }
        // A missed boot deadline is a Warning of its own, once per run: the guest did not come
        // up, which a person may need to look at even though the run is retried.
        let boot_timeout = reason == ExitReason::BootTimeout.as_str();
        let warned = self.old_cond(ConditionType::Ready) == Some(("False", reason.as_str()));
        if boot_timeout && !warned {
            self.event(
                EventKind::Warning,
                "BootTimeout",
                format!("run {run} missed its boot deadline: {message}"),
            );
        }
        let delay = restart_delay(vm, run, self.obs.now);
        if !delay.is_zero() {
            // Crash loop: say why and come back when the back-off is over.
            self.cond(
                ConditionType::Ready,
                "False",
                &reason,
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
pub(crate) fn restart_delay(vm: &VmStatus, restarts: u32, now: Timestamp) -> Duration {
    let exit_ms = vm.exit.as_ref().map_or(0, |e| e.at_unix_ms);
    let lasted_ms = exit_ms.saturating_sub(vm.started_at_unix_ms.max(vm.created_at_unix_ms));
    if vm.started_at_unix_ms > 0 && lasted_ms >= STABLE_RUN.as_millis() as i64 {
        return Duration::ZERO;
    }
    let backoff = Duration::from_secs(1u64 << restarts.min(9)).min(MAX_RESTART_DELAY);
    let since_exit_ms = now.as_millisecond().saturating_sub(exit_ms).max(0);
    backoff.saturating_sub(Duration::from_millis(since_exit_ms as u64))
}

pub(crate) mod claim;
mod observed;
mod pod;
pub(crate) mod pool;
mod suspend;

pub(crate) use observed::{AgentLink, Observed, PodMode, SpecProblem};

#[cfg(test)]
mod tests;
