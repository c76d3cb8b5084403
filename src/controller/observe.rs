//! Observe, the first stage of a reconcile: everything [`decide`](super::decide) needs about
//! one MicroVM, gathered as plain values. The agent's view of its VM comes from the agent pool's
//! cache, the VM pod from the pod cache (pod mode); only a VM without a node (Ignis placement,
//! without VM pods) costs calls, to place it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};

use super::decide::{AgentLink, Observed, PodMode, PodView, SpecProblem, placed_node};
use super::reconcile::Context;
use super::scheduler::{self, Candidate, PlacementRequest};
use super::vmpod::{self, VmPodSettings};
use super::vmspec::{self, BuiltSpec};
use crate::api::MicroVM;
use crate::error::ErrorReason;

/// What a reconcile knows of one MicroVM: the plain values decide reads, and what act needs
/// to carry the decisions out.
pub(super) struct Observation {
    pub(super) observed: Observed,
    /// The VM spec built from the MicroVM, when it could be.
    pub(super) built: Option<BuiltSpec>,
    /// Pod mode: the VM pod to create (when it could be built) and the one observed.
    pub(super) pod: Option<PodParts>,
}

/// The VM pod to create (when it could be built) and the one observed.
pub(super) type PodParts = (Option<Pod>, Option<PodView>);

/// A placement made but not yet visible in the cache.
pub(super) struct Reservation {
    pub(super) node: String,
    pub(super) vcpus: u32,
    pub(super) memory: u64,
}

/// Node labels with a short cache: placement asks for every candidate on every placement.
pub(super) struct NodeLabels {
    pub(super) api: Api<Node>,
    pub(super) cache: Mutex<HashMap<String, (Instant, Option<Labels>)>>,
}

pub(super) type Labels = BTreeMap<String, String>;

pub(super) const NODE_LABELS_TTL: Duration = Duration::from_secs(30);

impl NodeLabels {
    /// The node's labels; a node the API does not know (the dev server has no Node objects)
    /// gets just its hostname label; `None` when the API could not say.
    pub(super) async fn get(&self, node: &str) -> Option<BTreeMap<String, String>> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, labels)) = cache.get(node)
            && at.elapsed() < NODE_LABELS_TTL
        {
            return labels.clone();
        }
        let fetched = tokio::time::timeout(Duration::from_secs(5), self.api.get_opt(node)).await;
        let labels = match fetched {
            Ok(Ok(Some(n))) => Some(n.metadata.labels.unwrap_or_default()),
            Ok(Ok(None)) | Ok(Err(kube::Error::Api(_))) => Some(BTreeMap::from([(
                "kubernetes.io/hostname".to_string(),
                node.to_string(),
            )])),
            Ok(Err(error)) => {
                tracing::debug!(%node, %error, "cannot read node labels");
                None
            }
            Err(_) => None,
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(node.to_string(), (Instant::now(), labels.clone()));
        }
        labels
    }
}

/// Pod mode's part of observing a MicroVM: its VM pod (built and found), the pod's node, and
/// the other nodes holding its VM.
struct PodObservation {
    built: Result<Pod, vmpod::VmPodError>,
    view: Option<PodView>,
    node: Option<String>,
}

fn observe_pod(mvm: &MicroVM, settings: &VmPodSettings, store: &Store<Pod>) -> PodObservation {
    let ns = mvm.namespace().unwrap_or_default();
    let name = super::identity::of(mvm).pod;
    let view = store
        .get(&kube::runtime::reflector::ObjectRef::new(&name).within(&ns))
        .map(|p| vmpod::view(&p));
    let uid = mvm.uid();
    let node = view
        .as_ref()
        .filter(|v| v.owner_uid.is_some() && v.owner_uid == uid)
        .and_then(|v| v.node.clone());
    PodObservation {
        built: vmpod::build(mvm, settings),
        view,
        node,
    }
}

pub(super) async fn observe(mvm: &MicroVM, ctx: &Context) -> Observation {
    let pods = ctx
        .vm_pods
        .as_ref()
        .map(|(settings, store)| observe_pod(mvm, settings, store));
    let built = vmspec::build(mvm, pods.is_some());
    let node = match &pods {
        Some(p) => p.node.clone(),
        None => placed_node(mvm),
    };
    let deleting = mvm.metadata.deletion_timestamp.is_some();
    let uid = super::identity::of(mvm).vm_uid;
    let placement = if node.is_none() && !deleting && pods.is_none() {
        let started = Instant::now();
        let placed = place(mvm, ctx).await;
        ctx.metrics.step("place", started.elapsed());
        Some(placed)
    } else {
        None
    };
    let (agent, vm, node_labels) = match &node {
        Some(node) => (
            ctx.pool.link(node),
            ctx.pool.vm(node, &uid),
            // Labels only matter to a live VM placed by Ignis (the node-mismatch condition).
            if deleting || pods.is_some() {
                None
            } else {
                ctx.nodes.get(node).await
            },
        ),
        None => (AgentLink::Absent, None, None),
    };
    let observed = Observed {
        now: jiff::Timestamp::now(),
        spec_hash: built
            .as_ref()
            .map(|b| b.hash.clone())
            .map_err(|e| SpecProblem {
                reason: e.reason(),
                message: e.to_string(),
            }),
        agent,
        vm,
        placement,
        node_labels,
        pods: match &pods {
            None => PodMode::Off,
            Some(p) => PodMode::On {
                pod: p.view.clone().map(Box::new),
                buildable: p.built.as_ref().map(|_| ()).map_err(|e| SpecProblem {
                    reason: e.into(),
                    message: e.to_string(),
                }),
                elsewhere: ctx
                    .pool
                    .nodes_holding(&uid)
                    .into_iter()
                    .filter(|n| Some(n) != node.as_ref())
                    .collect(),
            },
        },
    };
    Observation {
        observed,
        built: built.ok(),
        pod: pods.map(|p| (p.built.ok(), p.view)),
    }
}

/// [`placed_node`] without copying the name: status first, the label as a fallback.
fn placed_on(mvm: &MicroVM) -> Option<&str> {
    mvm.status
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .or_else(|| {
            mvm.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(crate::api::NODE_LABEL))
                .map(String::as_str)
        })
}

/// Ignis's own placement (no VM pods): a node with room for the VM, reserved until the cache
/// shows the placement written.
async fn place(mvm: &MicroVM, ctx: &Context) -> Result<String, scheduler::Unschedulable> {
    let uid = mvm.uid().unwrap_or_default();
    let (vcpus, memory) = vmspec::reserved(mvm).unwrap_or((mvm.spec.resources.vcpus, 0));
    let request = PlacementRequest {
        vcpus,
        memory_bytes: memory,
        node_selector: mvm.spec.node_selector.clone().unwrap_or_default(),
        hypervisor: mvm.spec.hypervisor,
        accelerator: mvm.spec.accelerator,
    };
    let mut placing = ctx.placing.lock().await;
    // What the cache says is placed where, and which reservations it has caught up with.
    // One pass over the whole cache per placement, under the lock, so it allocates nothing per
    // object (only per node, and per reservation still pending): this pass is the part of a
    // placement that grows with the cache, and placements wait for each other.
    let mut reserved: HashMap<String, (u32, u64)> = HashMap::new();
    let mut known: HashMap<String, bool> = HashMap::new();
    for obj in ctx.store.state() {
        let node = placed_on(&obj);
        if let Some(id) = obj.metadata.uid.as_deref()
            && placing.contains_key(id)
        {
            known.insert(id.to_string(), node.is_some());
        }
        if let (Some(node), Some((c, m))) = (node, vmspec::reserved(&obj)) {
            let e = match reserved.get_mut(node) {
                Some(e) => e,
                None => reserved.entry(node.to_string()).or_default(),
            };
            e.0 += c;
            e.1 += m;
        }
    }
    // A reservation ends once the cache shows its placement (or its object is gone): from then
    // on the cache counts it.
    placing.retain(|id, _| id != &uid && known.get(id) == Some(&false));
    for r in placing.values() {
        let e = reserved.entry(r.node.clone()).or_default();
        e.0 += r.vcpus;
        e.1 += r.memory;
    }
    let mut candidates = Vec::new();
    for (node, host) in ctx.pool.hosts() {
        let (c, m) = reserved.get(&node).copied().unwrap_or_default();
        candidates.push(Candidate {
            labels: ctx.nodes.get(&node).await.unwrap_or_default(),
            hypervisors: host.hypervisors.clone(),
            unavailable: host.unavailable_hypervisors.clone(),
            accelerator: host.accelerator,
            accelerator_detail: host.accelerator_detail.clone(),
            vcpus_total: host.vcpus_total,
            memory_total_bytes: host.memory_total_bytes,
            vcpus_reserved: c.max(host.vcpus_used),
            memory_reserved_bytes: m.max(host.memory_used_bytes),
            node,
        });
    }
    let decision = scheduler::place(&request, &candidates, ctx.strategy);
    match &decision {
        Ok(node) => {
            placing.insert(
                uid,
                Reservation {
                    node: node.clone(),
                    vcpus,
                    memory,
                },
            );
        }
        Err(u) => ctx.metrics.placement_failure(u.constraint.as_str()),
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NODE_LABEL;
    use crate::testing::microvm;

    #[test]
    fn placed_on_reads_what_placed_node_reads() {
        let mut mvm = microvm("web");
        mvm.status = None;
        mvm.metadata.labels = None;
        assert_eq!(placed_on(&mvm), None);
        assert_eq!(placed_node(&mvm), None);
        mvm.metadata.labels = Some([(NODE_LABEL.to_string(), "node-b".to_string())].into());
        assert_eq!(placed_on(&mvm), Some("node-b"));
        assert_eq!(placed_node(&mvm).as_deref(), Some("node-b"));
        mvm.status = Some(crate::api::MicroVMStatus {
            node_name: Some("node-a".into()),
            ..Default::default()
        });
        assert_eq!(placed_on(&mvm), Some("node-a"));
        assert_eq!(placed_node(&mvm).as_deref(), Some("node-a"));
    }
}
