//! What reconcile observed, the planner's input: plain values, so every decision is a unit
//! test.

use std::collections::BTreeMap;
use std::time::Duration;

use jiff::Timestamp;

use super::PodView;
use crate::controller::scheduler::Unschedulable;
use crate::vm::VmStatus;

/// The connection to the agent of the VM's node, as the agent pool sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum AgentLink {
    /// Connected and synced: `Observed::vm` is the agent's current view.
    Connected,
    /// The stream broke; the agent counts as lost after `lost_after` more.
    Reconnecting { lost_after: Duration },
    /// Unreachable beyond the grace period.
    Lost,
    /// No agent has been known for the node for the grace period (counted from the
    /// controller's start or from its agent's departure); before that it is `Reconnecting`.
    Absent,
}

/// A MicroVM the agent API cannot express (see `vmspec::VmSpecError`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SpecProblem {
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

/// Everything reconcile looked at, besides the object itself.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Observed {
    pub(crate) now: Timestamp,
    /// The hash of the spec the agent should run, or why there is none.
    pub(crate) spec_hash: Result<String, SpecProblem>,
    /// The link to the agent of the placed node (or of the node being chosen now).
    pub(crate) agent: AgentLink,
    /// The agent's view of this VM (meaningful when `agent` is `Connected`).
    pub(crate) vm: Option<VmStatus>,
    /// The scheduler's answer; only computed for a VM without a node.
    pub(crate) placement: Option<Result<String, Unschedulable>>,
    /// Labels of the placed node, when known.
    pub(crate) node_labels: Option<BTreeMap<String, String>>,
    /// Whether the VM runs in a VM pod, and that pod.
    pub(crate) pods: PodMode,
}

/// Where a VM lives: on a node Ignis chose (`ignis dev`), or in its VM pod (`--vm-pods`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum PodMode {
    /// Ignis's own scheduler places the VM; there is no pod.
    Off,
    /// kube-scheduler places the VM pod and the VM runs inside it (see `pod.rs`).
    On {
        /// The pod named for the MicroVM, if any exists.
        pod: Option<Box<PodView>>,
        /// Whether a pod can be built for the MicroVM at all.
        buildable: Result<(), SpecProblem>,
        /// Nodes other than the pod's whose agents still hold this VM (a pod lost with its
        /// node, the agent back later): their VM is stopped, so one VM never runs twice.
        elsewhere: Vec<String>,
    },
}
