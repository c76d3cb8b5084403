//! Pod mode (`--vm-pods`, the chart's default on a cluster): the VM runs inside its VM pod.
//! kube-scheduler places the pod, the kubelet starts its sandbox, and only then is the VM
//! applied to that node's agent. A pod deleted, evicted or lost stops its VM; `runPolicy`
//! decides whether a new pod is made, and only once the old one is gone (the pod name is
//! fixed), so two pods, and two VMMs, never exist for one VM.

use super::*;
use crate::controller::vmpod::Disruption;

/// How often a wait on a pod the watch may not report (someone else's) is looked at again.
const POD_RETRY: Duration = Duration::from_secs(5);

/// Condition reasons of pod mode.
pub(crate) struct PodReason;

impl PodReason {
    /// The VM pod exists but kube-scheduler has not placed it yet.
    pub(crate) const POD_PENDING: &'static str = "PodPending";
    /// The VM pod is placed; its sandbox (network, cgroup, launcher) is not running yet.
    pub(crate) const POD_STARTING: &'static str = "PodStarting";
    /// A pod of the VM pod's name exists that no MicroVM controls.
    pub(crate) const POD_NAME_TAKEN: &'static str = "PodNameTaken";
    /// Reasons a VM stopped because of its pod (see `vmpod::view`).
    pub(crate) const DISRUPTIONS: [&'static str; 5] = [
        "PodEvicted",
        "PodPreempted",
        "PodDeleted",
        "NodeLost",
        "PodFailed",
    ];
}

fn terminal(phase: Option<Phase>) -> bool {
    matches!(phase, Some(Phase::Succeeded | Phase::Failed))
}

impl Planner<'_> {
    fn pod_mode(&self) -> (Option<&'_ PodView>, Result<(), SpecProblem>, Vec<String>) {
        match &self.obs.pods {
            PodMode::On {
                pod,
                buildable,
                elsewhere,
            } => (pod.as_deref(), buildable.clone(), elsewhere.clone()),
            PodMode::Off => (None, Ok(()), Vec::new()),
        }
    }

    fn owns(&self, pod: &PodView) -> bool {
        pod.owner_uid.is_some() && pod.owner_uid == self.mvm.metadata.uid
    }

    /// Stop copies of this VM on nodes its pod is not on.
    fn stop_elsewhere(&mut self, elsewhere: Vec<String>) {
        for node in elsewhere {
            self.agent.push(Action::DeleteVm { node });
        }
    }

    /// The MicroVM is deleted: stop the VM, delete its pod, then release the object.
    pub(super) fn finalize_pod(&mut self) {
        if !has_finalizer(self.mvm) {
            return;
        }
        let (pod, _, elsewhere) = self.pod_mode();
        let pod = pod.filter(|p| self.owns(p)).cloned();
        self.stop_elsewhere(elsewhere);
        let node = pod
            .as_ref()
            .and_then(|p| p.node.clone())
            .or_else(|| self.old.node_name.clone());
        if let Some(node) = node {
            match &self.obs.agent {
                AgentLink::Connected => self.agent.push(Action::DeleteVm { node }),
                AgentLink::Reconnecting { lost_after } => {
                    // The agent may still be stopping the guest: give it the chance, as in
                    // dev mode, before the kubelet kills the pod's processes outright.
                    self.requeue(*lost_after + DELETE_RETRY);
                    return;
                }
                AgentLink::Lost | AgentLink::Absent => self.event(
                    EventKind::Warning,
                    "AgentUnreachable",
                    format!(
                        "the agent on {node} is unreachable; deleting the VM pod stops the VM with it"
                    ),
                ),
            }
        }
        if pod.as_ref().is_some_and(|p| !p.deleting) {
            self.agent.push(Action::DeletePod);
        }
        self.release = true;
    }

    pub(super) fn converge_pod(&mut self) {
        if !has_finalizer(self.mvm) {
            self.metadata.push(Action::AddFinalizer);
        }
        let (pod, buildable, elsewhere) = self.pod_mode();
        let pod = pod.cloned();
        let problem = match (&self.obs.spec_hash, &buildable) {
            (Err(p), _) | (_, Err(p)) => Some(p.clone()),
            _ => None,
        };
        if let Some(problem) = problem {
            self.stalled_without_vm(problem.reason, &problem.message);
            return;
        }
        let hash = self.obs.spec_hash.clone().unwrap_or_default();
        self.stop_elsewhere(elsewhere);
        let Some(pod) = pod else {
            self.no_pod();
            return;
        };
        if !self.owns(&pod) {
            self.foreign_pod(&pod);
            return;
        }
        if let Some(disruption) = &pod.disruption {
            self.disrupted(&pod, disruption);
            return;
        }
        if self.mvm.spec.run_policy == RunPolicy::Halted || terminal(self.old.phase) {
            // Halted, or a run that ended for good (recorded by an earlier reconcile, so a
            // failed status write cannot make a new pod): the pod only holds resources.
            self.remove_pod(&pod);
            if self.mvm.spec.run_policy == RunPolicy::Halted {
                self.stopping("runPolicy is Halted: stopping the VM and deleting its pod");
            }
            return;
        }
        let Some(node) = pod.node.clone() else {
            self.pod_unplaced(&pod);
            return;
        };
        if self.old.node_name.as_deref() != Some(node.as_str()) {
            self.event(
                EventKind::Normal,
                "Scheduled",
                format!("the VM pod is on {node}"),
            );
        }
        self.new.node_name = Some(node.clone());
        self.cond(
            ConditionType::Scheduled,
            "True",
            Reason::PLACED,
            format!("placed on {node}"),
        );
        match self.obs.agent.clone() {
            AgentLink::Connected => {}
            AgentLink::Reconnecting { lost_after } => {
                self.requeue(lost_after);
                return;
            }
            link @ (AgentLink::Lost | AgentLink::Absent) => {
                self.agent_lost(&node, link == AgentLink::Absent);
                self.gate(&pod);
                return;
            }
        }
        if !pod.sandbox_running {
            self.set_phase(Phase::Scheduled);
            self.cond(
                ConditionType::Ready,
                "False",
                PodReason::POD_STARTING,
                format!("waiting for the VM pod's sandbox on {node}"),
            );
            self.kstatus(true, None);
            return;
        }
        match self.obs.vm.clone() {
            None => self.no_vm(&node),
            Some(vm) => self.with_vm(&node, &hash, &vm),
        }
        self.gate(&pod);
    }

    /// The readiness gate follows the MicroVM's Ready condition.
    fn gate(&mut self, pod: &PodView) {
        let ready = find_condition(&self.new.conditions, ConditionType::Ready)
            .is_some_and(|c| c.status == "True");
        // A gate never set reads as not ready: writing False there would be a write for nothing.
        if pod.guest_ready.unwrap_or(false) != ready {
            self.agent.push(Action::SetPodReady(ready));
        }
    }

    /// Stop the VM of `pod` on its node (when the agent holds it) and delete the pod.
    fn remove_pod(&mut self, pod: &PodView) {
        if let Some(node) = &pod.node
            && self.obs.agent == AgentLink::Connected
            && self.obs.vm.is_some()
        {
            self.agent.push(Action::DeleteVm { node: node.clone() });
        }
        if !pod.deleting {
            self.agent.push(Action::DeletePod);
        }
    }

    /// No VM pod: make one, unless the VM is not meant to run.
    fn no_pod(&mut self) {
        self.new.node_name = None;
        if self.mvm.spec.run_policy == RunPolicy::Halted {
            self.halted();
            return;
        }
        if terminal(self.old.phase) {
            return;
        }
        let replacing = self
            .old_cond(ConditionType::Ready)
            .is_some_and(|(_, reason)| PodReason::DISRUPTIONS.contains(&reason));
        if replacing {
            let next = self.restarts(None).saturating_add(1);
            self.set_restarts(next);
        }
        self.agent.push(Action::CreatePod);
        let name = crate::controller::vmpod::pod_name(
            self.mvm.metadata.name.as_deref().unwrap_or_default(),
        );
        self.event(
            EventKind::Normal,
            "CreatedPod",
            if replacing {
                format!("created VM pod {name} to replace the one that stopped")
            } else {
                format!("created VM pod {name}")
            },
        );
        self.set_phase(Phase::Pending);
        self.cond(
            ConditionType::Scheduled,
            "False",
            PodReason::POD_PENDING,
            format!("waiting for kube-scheduler to place the VM pod {name}"),
        );
        self.waiting_for_node();
    }

    /// A pod of the VM pod's name that is not this MicroVM's.
    fn foreign_pod(&mut self, pod: &PodView) {
        self.set_phase(Phase::Pending);
        self.new.node_name = None;
        match pod.owner_uid {
            // An earlier MicroVM of the same name: the garbage collector removes its pod.
            Some(_) => {
                self.cond(
                    ConditionType::Ready,
                    "False",
                    Reason::PENDING,
                    format!(
                        "waiting for the VM pod {} of an earlier MicroVM of this name to go",
                        pod.name
                    ),
                );
                self.kstatus(true, None);
            }
            None => {
                let message = format!(
                    "pod {}/{} exists and is not this MicroVM's VM pod: delete or rename it",
                    pod.namespace, pod.name
                );
                if self.old_cond(ConditionType::Stalled)
                    != Some(("True", PodReason::POD_NAME_TAKEN))
                {
                    self.event(EventKind::Warning, "Failed", message.clone());
                }
                self.cond(
                    ConditionType::Ready,
                    "False",
                    PodReason::POD_NAME_TAKEN,
                    message.clone(),
                );
                self.kstatus(false, Some((PodReason::POD_NAME_TAKEN, &message)));
            }
        }
        self.requeue(POD_RETRY);
    }

    /// The pod is not bound to a node yet: waiting on kube-scheduler, `Stalled` once it has
    /// said for 15 s that no node fits.
    fn pod_unplaced(&mut self, pod: &PodView) {
        self.set_phase(Phase::Pending);
        self.new.node_name = None;
        let Some((message, since)) = pod.unschedulable.clone() else {
            self.cond(
                ConditionType::Scheduled,
                "False",
                PodReason::POD_PENDING,
                format!(
                    "waiting for kube-scheduler to place the VM pod {}",
                    pod.name
                ),
            );
            self.waiting_for_node();
            self.gate(pod);
            return;
        };
        let waited = Duration::try_from(self.obs.now.duration_since(since)).unwrap_or_default();
        self.unplaced(&message, None, waited);
        self.gate(pod);
    }

    /// The pod was deleted, evicted or failed, or its node was lost: its VM stops, and
    /// `runPolicy` decides whether a new pod is made once this one is gone.
    fn disrupted(&mut self, pod: &PodView, d: &Disruption) {
        self.remove_pod(pod);
        if terminal(self.old.phase) {
            // A VM that had ended for good: this is its pod being cleaned up.
            return;
        }
        if self.mvm.spec.run_policy == RunPolicy::Halted {
            self.stopping("runPolicy is Halted: stopping the VM and deleting its pod");
            return;
        }
        let why = if d.message.is_empty() {
            d.reason.to_string()
        } else {
            d.message.clone()
        };
        let on = pod
            .node
            .as_deref()
            .map(|n| format!(" on {n}"))
            .unwrap_or_default();
        if self.old_cond(ConditionType::Ready).map(|c| c.1) != Some(d.reason) {
            self.event(
                EventKind::Warning,
                d.reason,
                format!("the VM stopped with its pod {}{on}: {why}", pod.name),
            );
        }
        let restart = matches!(
            self.mvm.spec.run_policy,
            RunPolicy::Always | RunPolicy::RerunOnFailure
        );
        if restart {
            let message = format!(
                "the VM stopped with its pod{on}: {why}; runPolicy makes a new pod once it is gone"
            );
            self.set_phase(Phase::Pending);
            self.cond(ConditionType::Ready, "False", d.reason, message);
            self.kstatus(true, None);
        } else {
            let message = format!("the VM stopped with its pod{on}: {why}");
            self.set_phase(Phase::Failed);
            self.cond(ConditionType::Ready, "False", d.reason, message.clone());
            self.kstatus(false, Some((d.reason, &message)));
        }
    }
}
