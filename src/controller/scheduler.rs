//! Placement: which node a new MicroVM goes to. Pure: the caller gathers the candidates (agents
//! with their reported host, Node labels, and what the MicroVM cache already placed there) and
//! this module filters and scores them. A placement is made once and never revisited.

use std::collections::BTreeMap;

use crate::api::{Accelerator, AcceleratorChoice, Hypervisor, HypervisorChoice};

/// How candidates that fit are ranked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PlacementStrategy {
    /// The node with the least reserved wins: spreads load and failure domains.
    #[default]
    Spread,
    /// The fullest node that still fits wins: keeps other nodes free for large VMs.
    Binpack,
}

/// What a VM needs from a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PlacementRequest {
    pub(crate) vcpus: u32,
    pub(crate) memory_bytes: u64,
    pub(crate) node_selector: BTreeMap<String, String>,
    pub(crate) hypervisor: HypervisorChoice,
    pub(crate) accelerator: AcceleratorChoice,
}

/// One node with a connected agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Candidate {
    pub(crate) node: String,
    pub(crate) labels: BTreeMap<String, String>,
    /// VMMs the agent offers.
    pub(crate) hypervisors: Vec<Hypervisor>,
    /// VMMs the agent knows but cannot run, with why (the missing binary).
    pub(crate) unavailable: Vec<(Hypervisor, String)>,
    /// What the agent's probe found.
    pub(crate) accelerator: Accelerator,
    /// The probe's result in words ("KVM present but QEMU failed under it: …").
    pub(crate) accelerator_detail: String,
    pub(crate) vcpus_total: u32,
    pub(crate) memory_total_bytes: u64,
    /// Already reserved on the node (MicroVMs placed there, or what the agent holds if more).
    pub(crate) vcpus_reserved: u32,
    pub(crate) memory_reserved_bytes: u64,
}

/// A filter that turned a node away, in the order filters run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Constraint {
    /// No agent is connected at all.
    NoAgents,
    NodeSelector,
    Hypervisor,
    Accelerator,
    Capacity,
}

impl Constraint {
    /// The spelling used in condition messages and metric labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Constraint::NoAgents => "noAgents",
            Constraint::NodeSelector => "nodeSelector",
            Constraint::Hypervisor => "hypervisor",
            Constraint::Accelerator => "accelerator",
            Constraint::Capacity => "capacity",
        }
    }
}

/// No node fits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Unschedulable {
    /// The filter that eliminated the last candidates.
    pub(crate) constraint: Constraint,
    /// For a person, kube-scheduler style: how many nodes each filter turned away, then what
    /// each node lacks (its KVM probe result, the missing VMM binary, memory asked vs free).
    pub(crate) message: String,
    /// Set when no node can ever take the VM as things stand — every node its selector
    /// allows lacks the VMM, working KVM, or enough memory or vCPUs in total — so only a
    /// person can unblock it: the reason `Stalled` carries (`HypervisorUnavailable`,
    /// `KvmUnavailable`, `AcceleratorUnsupported`, `InsufficientMemory`, `InsufficientVcpus`).
    /// `None` while waiting can help (nodes full, or none matching the selector yet).
    pub(crate) stalled: Option<&'static str>,
}

/// Why one node cannot take the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rejection {
    constraint: Constraint,
    /// For a person, without the node name.
    detail: String,
    /// The reason word when the node will not take it until someone changes the node; `None`
    /// when it may by itself (capacity freed).
    permanent: Option<&'static str>,
}

/// How many nodes' details a message names before it says "and N more".
const DETAILED_NODES: usize = 5;

/// Pick a node, or say why none fits. Ties break on the node name, so the same inputs always
/// give the same answer.
pub(crate) fn place(
    request: &PlacementRequest,
    candidates: &[Candidate],
    strategy: PlacementStrategy,
) -> Result<String, Unschedulable> {
    let mut fit: Vec<&Candidate> = Vec::new();
    let mut rejected: Vec<(&Candidate, Rejection)> = Vec::new();
    for c in candidates {
        match reject(request, c) {
            None => fit.push(c),
            Some(r) => rejected.push((c, r)),
        }
    }
    let best = match strategy {
        PlacementStrategy::Spread => fit
            .iter()
            .min_by(|a, b| usage(a).total_cmp(&usage(b)).then(a.node.cmp(&b.node))),
        PlacementStrategy::Binpack => fit
            .iter()
            .min_by(|a, b| usage(b).total_cmp(&usage(a)).then(a.node.cmp(&b.node))),
    };
    match best {
        Some(c) => Ok(c.node.clone()),
        None => Err(unschedulable(candidates.len(), &rejected)),
    }
}

/// The first filter `c` fails, in filter order.
fn reject(request: &PlacementRequest, c: &Candidate) -> Option<Rejection> {
    if !selector_matches(&request.node_selector, &c.labels) {
        return Some(Rejection {
            constraint: Constraint::NodeSelector,
            detail: "labels do not match spec.nodeSelector".to_string(),
            permanent: None,
        });
    }
    if let Some(detail) = lacks_hypervisor(request.hypervisor, c) {
        return Some(Rejection {
            constraint: Constraint::Hypervisor,
            detail,
            permanent: Some("HypervisorUnavailable"),
        });
    }
    if let Some((detail, reason)) = lacks_accelerator(request.accelerator, request.hypervisor, c) {
        return Some(Rejection {
            constraint: Constraint::Accelerator,
            detail,
            permanent: Some(reason),
        });
    }
    lacks_capacity(request, c).map(|(detail, permanent)| Rejection {
        constraint: Constraint::Capacity,
        detail,
        permanent,
    })
}

/// The answer when no node fits: counts per filter, each node's detail, and whether only a
/// person can change it.
fn unschedulable(total: usize, rejected: &[(&Candidate, Rejection)]) -> Unschedulable {
    let Some(constraint) = rejected.iter().map(|(_, r)| r.constraint).max() else {
        return Unschedulable {
            constraint: Constraint::NoAgents,
            message: "noAgents: no node has a connected ignis agent".to_string(),
            stalled: None,
        };
    };
    let mut counts: BTreeMap<Constraint, usize> = BTreeMap::new();
    for (_, r) in rejected {
        *counts.entry(r.constraint).or_default() += 1;
    }
    let reasons: Vec<String> = counts
        .iter()
        .map(|(c, n)| format!("{n} did not match {}", c.as_str()))
        .collect();
    // Nodes the selector rules out say nothing a person needs beyond the count.
    let detailed: Vec<&(&Candidate, Rejection)> = rejected
        .iter()
        .filter(|(_, r)| r.constraint != Constraint::NodeSelector)
        .collect();
    let mut details: Vec<String> = detailed
        .iter()
        .take(DETAILED_NODES)
        .map(|(c, r)| format!("{}: {}", c.node, r.detail))
        .collect();
    if detailed.len() > DETAILED_NODES {
        details.push(format!("and {} more", detailed.len() - DETAILED_NODES));
    }
    let mut message = format!(
        "{}: 0/{total} nodes available: {}",
        constraint.as_str(),
        reasons.join(", ")
    );
    if !details.is_empty() {
        message = format!("{message} ({})", details.join("; "));
    }
    // Stalled only when some node is allowed and every allowed node lacks something for good;
    // the reason is that of the filter that turned the last ones away.
    let stalled = if !detailed.is_empty() && detailed.iter().all(|(_, r)| r.permanent.is_some()) {
        detailed
            .iter()
            .max_by_key(|(_, r)| r.constraint)
            .and_then(|(_, r)| r.permanent)
    } else {
        None
    };
    Unschedulable {
        constraint,
        message,
        stalled,
    }
}

/// Whether every selector label is present on the node with the same value.
pub(crate) fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Why `c` cannot run the VMM asked for; `None` when it can.
fn lacks_hypervisor(choice: HypervisorChoice, c: &Candidate) -> Option<String> {
    let why = |kind: Hypervisor| {
        c.unavailable
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, why)| why.clone())
    };
    match choice.pinned() {
        Some(wanted) if c.hypervisors.contains(&wanted) => None,
        Some(wanted) => {
            Some(why(wanted).unwrap_or_else(|| format!("the agent does not offer {wanted}")))
        }
        None if !c.hypervisors.is_empty() => None,
        None => {
            let whys: Vec<String> = c.unavailable.iter().map(|(_, why)| why.clone()).collect();
            Some(if whys.is_empty() {
                "the agent offers no VMM".to_string()
            } else {
                format!("the agent offers no VMM: {}", whys.join("; "))
            })
        }
    }
}

/// Why `c` cannot give the accelerator asked for, with the reason word; `None` when it can.
fn lacks_accelerator(
    choice: AcceleratorChoice,
    hypervisor: HypervisorChoice,
    c: &Candidate,
) -> Option<(String, &'static str)> {
    match choice {
        AcceleratorChoice::Auto => None,
        AcceleratorChoice::Kvm if c.accelerator == Accelerator::Kvm => None,
        AcceleratorChoice::Kvm => Some((
            format!("no working KVM: {}", c.accelerator_detail),
            "KvmUnavailable",
        )),
        // Only QEMU emulates; a VM pinned to another VMM can never run under TCG.
        AcceleratorChoice::Tcg => {
            let qemu = matches!(hypervisor, HypervisorChoice::Auto | HypervisorChoice::Qemu)
                && c.hypervisors.contains(&Hypervisor::Qemu);
            (!qemu).then(|| {
                (
                    "TCG needs QEMU, which this VM or node does not use".to_string(),
                    "AcceleratorUnsupported",
                )
            })
        }
    }
}

/// Why the VM does not fit on `c`, and the reason word when it never will (it asks for more
/// than the node has in total); `None` when it fits.
fn lacks_capacity(
    request: &PlacementRequest,
    c: &Candidate,
) -> Option<(String, Option<&'static str>)> {
    let memory_free = c.memory_total_bytes.saturating_sub(c.memory_reserved_bytes);
    let vcpus_free = c.vcpus_total.saturating_sub(c.vcpus_reserved);
    if request.memory_bytes > c.memory_total_bytes {
        return Some((
            format!(
                "{} memory requested, more than its {} in total",
                mebibytes(request.memory_bytes),
                mebibytes(c.memory_total_bytes)
            ),
            Some("InsufficientMemory"),
        ));
    }
    if request.vcpus > c.vcpus_total {
        return Some((
            format!(
                "{} vCPUs requested, more than the {} it offers in total",
                request.vcpus, c.vcpus_total
            ),
            Some("InsufficientVcpus"),
        ));
    }
    if request.memory_bytes > memory_free {
        return Some((
            format!(
                "{} memory requested, {} free of {}",
                mebibytes(request.memory_bytes),
                mebibytes(memory_free),
                mebibytes(c.memory_total_bytes)
            ),
            None,
        ));
    }
    (request.vcpus > vcpus_free).then(|| {
        (
            format!(
                "{} vCPUs requested, {vcpus_free} free of {}",
                request.vcpus, c.vcpus_total
            ),
            None,
        )
    })
}

/// Bytes as whole MiB, rounded up, in Kubernetes quantity spelling.
fn mebibytes(bytes: u64) -> String {
    format!("{}Mi", bytes.div_ceil(1 << 20))
}

/// Reserved share of the node: the larger of the vCPU and the memory fraction.
fn usage(c: &Candidate) -> f64 {
    let frac = |used: f64, total: f64| if total > 0.0 { used / total } else { 1.0 };
    let cpu = frac(f64::from(c.vcpus_reserved), f64::from(c.vcpus_total));
    let mem = frac(c.memory_reserved_bytes as f64, c.memory_total_bytes as f64);
    cpu.max(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GI: u64 = 1 << 30;

    fn node(name: &str, vcpus_reserved: u32, mem_reserved: u64) -> Candidate {
        Candidate {
            node: name.to_string(),
            labels: BTreeMap::from([("kubernetes.io/hostname".to_string(), name.to_string())]),
            hypervisors: vec![Hypervisor::Qemu],
            unavailable: vec![(
                Hypervisor::Firecracker,
                "VMM binary firecracker not found: install it or choose another hypervisor"
                    .to_string(),
            )],
            accelerator: Accelerator::Tcg,
            accelerator_detail: "KVM present but QEMU failed under it: exit status 1".to_string(),
            vcpus_total: 8,
            memory_total_bytes: 16 * GI,
            vcpus_reserved,
            memory_reserved_bytes: mem_reserved,
        }
    }

    fn request() -> PlacementRequest {
        PlacementRequest {
            vcpus: 1,
            memory_bytes: GI,
            node_selector: BTreeMap::new(),
            hypervisor: HypervisorChoice::Auto,
            accelerator: AcceleratorChoice::Auto,
        }
    }

    #[test]
    fn spread_picks_the_emptiest_node() {
        let nodes = [node("a", 4, 8 * GI), node("b", 1, GI), node("c", 2, 2 * GI)];
        assert_eq!(
            place(&request(), &nodes, PlacementStrategy::Spread),
            Ok("b".to_string())
        );
    }

    #[test]
    fn binpack_picks_the_fullest_node_that_fits() {
        let nodes = [node("a", 4, 8 * GI), node("b", 1, GI), node("c", 8, GI)];
        assert_eq!(
            place(&request(), &nodes, PlacementStrategy::Binpack),
            Ok("a".to_string())
        );
    }

    #[test]
    fn ties_break_on_node_name_for_both_strategies() {
        let nodes = [node("z", 0, 0), node("m", 0, 0), node("b", 0, 0)];
        for strategy in [PlacementStrategy::Spread, PlacementStrategy::Binpack] {
            assert_eq!(place(&request(), &nodes, strategy), Ok("b".to_string()));
        }
    }

    #[test]
    fn no_agents_is_its_own_constraint() {
        let err = place(&request(), &[], PlacementStrategy::Spread).expect_err("must fail");
        assert_eq!(err.constraint, Constraint::NoAgents);
    }

    #[test]
    fn node_selector_filters_on_labels() {
        let mut req = request();
        req.node_selector = BTreeMap::from([("disk".to_string(), "ssd".to_string())]);
        let mut ssd = node("b", 6, 0);
        ssd.labels.insert("disk".to_string(), "ssd".to_string());
        let nodes = [node("a", 0, 0), ssd];
        assert_eq!(
            place(&req, &nodes, PlacementStrategy::Spread),
            Ok("b".to_string())
        );
        let err = place(&req, &nodes[..1], PlacementStrategy::Spread).expect_err("must fail");
        assert_eq!(err.constraint, Constraint::NodeSelector);
        assert!(err.message.starts_with("nodeSelector: 0/1 nodes available"));
    }

    #[test]
    fn hypervisor_must_be_offered() {
        let mut req = request();
        req.hypervisor = HypervisorChoice::Firecracker;
        let mut fc = node("b", 0, 0);
        fc.hypervisors = vec![Hypervisor::Firecracker];
        assert_eq!(
            place(&req, &[node("a", 0, 0), fc], PlacementStrategy::Spread),
            Ok("b".to_string())
        );
        let err =
            place(&req, &[node("a", 0, 0)], PlacementStrategy::Spread).expect_err("must fail");
        assert_eq!(err.constraint, Constraint::Hypervisor);
    }

    #[test]
    fn kvm_requires_a_node_whose_probe_said_kvm() {
        let mut req = request();
        req.accelerator = AcceleratorChoice::Kvm;
        let err =
            place(&req, &[node("a", 0, 0)], PlacementStrategy::Spread).expect_err("must fail");
        assert_eq!(err.constraint, Constraint::Accelerator);
        let mut kvm = node("b", 0, 0);
        kvm.accelerator = Accelerator::Kvm;
        assert_eq!(
            place(&req, &[node("a", 0, 0), kvm], PlacementStrategy::Spread),
            Ok("b".to_string())
        );
    }

    #[test]
    fn tcg_requires_qemu() {
        let mut req = request();
        req.accelerator = AcceleratorChoice::Tcg;
        let mut fc = node("a", 0, 0);
        fc.hypervisors = vec![Hypervisor::Firecracker];
        let err = place(&req, &[fc.clone()], PlacementStrategy::Spread).expect_err("must fail");
        assert_eq!(err.constraint, Constraint::Accelerator);
        assert_eq!(
            place(&req, &[fc, node("b", 0, 0)], PlacementStrategy::Spread),
            Ok("b".to_string())
        );
        // A VM pinned to Firecracker cannot be emulated anywhere.
        req.hypervisor = HypervisorChoice::Firecracker;
        let mut both = node("c", 0, 0);
        both.hypervisors.push(Hypervisor::Firecracker);
        let err = place(&req, &[both], PlacementStrategy::Spread).expect_err("must fail");
        assert_eq!(err.constraint, Constraint::Accelerator);
    }

    #[test]
    fn capacity_counts_what_is_reserved() {
        let mut req = request();
        req.vcpus = 2;
        let full_cpu = node("a", 7, 0);
        let full_mem = node("b", 0, 15 * GI + 1);
        let err = place(
            &req,
            &[full_cpu.clone(), full_mem.clone()],
            PlacementStrategy::Spread,
        )
        .expect_err("must fail");
        assert_eq!(err.constraint, Constraint::Capacity);
        assert!(
            err.message.contains("2 did not match capacity"),
            "{}",
            err.message
        );
        // Exactly full still fits.
        req.vcpus = 1;
        assert_eq!(
            place(&req, &[full_cpu], PlacementStrategy::Spread),
            Ok("a".to_string())
        );
    }

    #[test]
    fn message_names_every_filter_that_turned_nodes_away() {
        let mut req = request();
        req.node_selector = BTreeMap::from([("zone".to_string(), "x".to_string())]);
        let mut in_zone = node("b", 8, 0);
        in_zone.labels.insert("zone".to_string(), "x".to_string());
        let err = place(&req, &[node("a", 0, 0), in_zone], PlacementStrategy::Spread)
            .expect_err("must fail");
        assert_eq!(err.constraint, Constraint::Capacity);
        assert_eq!(
            err.message,
            "capacity: 0/2 nodes available: 1 did not match nodeSelector, 1 did not match capacity \
             (b: 1 vCPUs requested, 0 free of 8)"
        );
        assert_eq!(err.stalled, None, "capacity may free up");
    }

    #[test]
    fn what_no_node_will_ever_offer_stalls_with_the_reason_and_each_nodes_detail() {
        // accelerator: kvm and no node with working KVM: the probe's result is quoted.
        let mut req = request();
        req.accelerator = AcceleratorChoice::Kvm;
        let err = place(&req, &[node("a", 0, 0)], PlacementStrategy::Spread).expect_err("no KVM");
        assert_eq!(err.stalled, Some("KvmUnavailable"));
        assert!(
            err.message.ends_with(
                "(a: no working KVM: KVM present but QEMU failed under it: exit status 1)"
            ),
            "{}",
            err.message
        );
        // A VMM no node has: the missing binary is named.
        let mut req = request();
        req.hypervisor = HypervisorChoice::Firecracker;
        let err = place(&req, &[node("a", 0, 0)], PlacementStrategy::Spread).expect_err("no FC");
        assert_eq!(err.stalled, Some("HypervisorUnavailable"));
        assert!(
            err.message.contains("a: VMM binary firecracker not found"),
            "{}",
            err.message
        );
        // More memory than any node has: requested vs the node's total.
        let mut req = request();
        req.memory_bytes = 32 * GI;
        let err = place(
            &req,
            &[node("a", 0, 0), node("b", 0, 0)],
            PlacementStrategy::Spread,
        )
        .expect_err("too big");
        assert_eq!(err.stalled, Some("InsufficientMemory"));
        assert!(
            err.message.contains(
                "a: 32768Mi memory requested, more than its 16384Mi in total; b: 32768Mi"
            ),
            "{}",
            err.message
        );
        // More vCPUs than any node offers.
        let mut req = request();
        req.vcpus = 9;
        let err = place(&req, &[node("a", 0, 0)], PlacementStrategy::Spread).expect_err("cpus");
        assert_eq!(err.stalled, Some("InsufficientVcpus"));
    }

    #[test]
    fn a_node_that_could_free_up_or_no_node_allowed_keeps_waiting() {
        // One node lacks KVM for good, the other has KVM but is full for now: not stalled.
        let mut req = request();
        req.accelerator = AcceleratorChoice::Kvm;
        let mut full_kvm = node("b", 0, 16 * GI);
        full_kvm.accelerator = Accelerator::Kvm;
        let err = place(
            &req,
            &[node("a", 0, 0), full_kvm],
            PlacementStrategy::Spread,
        )
        .expect_err("none fits now");
        assert_eq!(err.constraint, Constraint::Capacity);
        assert_eq!(err.stalled, None);
        assert!(
            err.message
                .contains("a: no working KVM: KVM present but QEMU failed under it"),
            "{}",
            err.message
        );
        assert!(
            err.message
                .contains("b: 1024Mi memory requested, 0Mi free of 16384Mi"),
            "{}",
            err.message
        );
        // No node matches the selector: nodes may join or be labelled.
        req.node_selector = BTreeMap::from([("zone".to_string(), "x".to_string())]);
        let err = place(&req, &[node("a", 0, 0)], PlacementStrategy::Spread).expect_err("none");
        assert_eq!(
            (err.constraint, err.stalled),
            (Constraint::NodeSelector, None)
        );
        // No agents at all: they may connect.
        let err = place(&req, &[], PlacementStrategy::Spread).expect_err("none");
        assert_eq!(err.stalled, None);
    }

    #[test]
    fn messages_name_a_bounded_number_of_nodes() {
        let mut req = request();
        req.memory_bytes = 32 * GI;
        let nodes: Vec<Candidate> = (0..8).map(|i| node(&format!("n{i}"), 0, 0)).collect();
        let err = place(&req, &nodes, PlacementStrategy::Spread).expect_err("too big");
        assert!(err.message.contains("n4: "), "{}", err.message);
        assert!(!err.message.contains("n5: "), "{}", err.message);
        assert!(err.message.ends_with("; and 3 more)"), "{}", err.message);
    }
}
