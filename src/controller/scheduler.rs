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
    /// What the agent's probe found.
    pub(crate) accelerator: Accelerator,
    pub(crate) vcpus_total: u32,
    pub(crate) memory_total_bytes: u64,
    /// Already reserved on the node (MicroVMs placed there, or what the agent holds if more).
    pub(crate) vcpus_reserved: u32,
    pub(crate) memory_reserved_bytes: u64,
}

/// The filter that left no node standing, in the order filters run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// For a person, kube-scheduler style: how many nodes each filter turned away.
    pub(crate) message: String,
}

/// A filter stage: the constraint it checks and whether a candidate passes.
type Filter<'a> = (Constraint, &'a dyn Fn(&Candidate) -> bool);

/// Pick a node, or say which constraint failed. Ties break on the node name, so the same
/// inputs always give the same answer.
pub(crate) fn place(
    request: &PlacementRequest,
    candidates: &[Candidate],
    strategy: PlacementStrategy,
) -> Result<String, Unschedulable> {
    let total = candidates.len();
    if total == 0 {
        return Err(Unschedulable {
            constraint: Constraint::NoAgents,
            message: "noAgents: no node has a connected ignis agent".to_string(),
        });
    }
    let mut rejected: Vec<(Constraint, usize)> = Vec::new();
    let mut left: Vec<&Candidate> = candidates.iter().collect();
    let filters: [Filter<'_>; 4] = [
        (Constraint::NodeSelector, &|c| {
            selector_matches(&request.node_selector, &c.labels)
        }),
        (Constraint::Hypervisor, &|c| {
            offers_hypervisor(request.hypervisor, c)
        }),
        (Constraint::Accelerator, &|c| {
            offers_accelerator(request.accelerator, request.hypervisor, c)
        }),
        (Constraint::Capacity, &|c| fits(request, c)),
    ];
    for (constraint, keep) in filters {
        let before = left.len();
        left.retain(|c| keep(c));
        if before != left.len() {
            rejected.push((constraint, before - left.len()));
        }
        if left.is_empty() {
            let reasons: Vec<String> = rejected
                .iter()
                .map(|(c, n)| format!("{n} did not match {}", c.as_str()))
                .collect();
            return Err(Unschedulable {
                constraint,
                message: format!(
                    "{constraint}: 0/{total} nodes available: {}",
                    reasons.join(", "),
                    constraint = constraint.as_str()
                ),
            });
        }
    }
    let best = match strategy {
        PlacementStrategy::Spread => left
            .iter()
            .min_by(|a, b| usage(a).total_cmp(&usage(b)).then(a.node.cmp(&b.node))),
        PlacementStrategy::Binpack => left
            .iter()
            .min_by(|a, b| usage(b).total_cmp(&usage(a)).then(a.node.cmp(&b.node))),
    };
    match best {
        Some(c) => Ok(c.node.clone()),
        None => Err(Unschedulable {
            constraint: Constraint::NoAgents,
            message: "noAgents: no node has a connected ignis agent".to_string(),
        }),
    }
}

/// Whether every selector label is present on the node with the same value.
pub(crate) fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn offers_hypervisor(choice: HypervisorChoice, c: &Candidate) -> bool {
    match choice.pinned() {
        None => !c.hypervisors.is_empty(),
        Some(wanted) => c.hypervisors.contains(&wanted),
    }
}

fn offers_accelerator(
    choice: AcceleratorChoice,
    hypervisor: HypervisorChoice,
    c: &Candidate,
) -> bool {
    match choice {
        AcceleratorChoice::Auto => true,
        AcceleratorChoice::Kvm => c.accelerator == Accelerator::Kvm,
        // Only QEMU emulates; a VM pinned to another VMM can never run under TCG.
        AcceleratorChoice::Tcg => {
            matches!(hypervisor, HypervisorChoice::Auto | HypervisorChoice::Qemu)
                && c.hypervisors.contains(&Hypervisor::Qemu)
        }
    }
}

fn fits(request: &PlacementRequest, c: &Candidate) -> bool {
    let vcpus_free = c.vcpus_total.saturating_sub(c.vcpus_reserved);
    let memory_free = c.memory_total_bytes.saturating_sub(c.memory_reserved_bytes);
    request.vcpus <= vcpus_free && request.memory_bytes <= memory_free
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
            accelerator: Accelerator::Tcg,
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
            "capacity: 0/2 nodes available: 1 did not match nodeSelector, 1 did not match capacity"
        );
    }
}
