//! The VM pod of a MicroVM on a cluster (`--vm-pods`; docs/architecture.md, "VM pods"): the
//! pod built from the MicroVM and the controller's settings, and the plain-value view of a
//! pod the planner decides on. Pure both ways: no client, no clock.

use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, EmptyDirVolumeSource, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, Pod, PodReadinessGate, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use thiserror::Error;

use crate::api::{
    API_VERSION, AcceleratorChoice, HypervisorChoice, KIND, MicroVM, QuantityError,
    parse_quantity_bytes,
};

/// Label on every VM pod: the name of its MicroVM (and the selector of the pod watch).
pub(crate) const MICROVM_LABEL: &str = "ignis.dev/microvm";
/// Annotation on every VM pod: the uid of its MicroVM.
pub(crate) const MICROVM_UID_ANNOTATION: &str = "ignis.dev/microvm-uid";
/// The readiness gate the controller sets: True while the guest is Ready.
pub(crate) const GUEST_READY_GATE: &str = "ignis.dev/guest-ready";
/// Node labels the controller keeps from each agent's HostInfo (see `nodelabels`).
pub(crate) const AGENT_LABEL: &str = "ignis.dev/agent";
pub(crate) const KVM_LABEL: &str = "ignis.dev/kvm";
pub(crate) const HYPERVISOR_LABEL_PREFIX: &str = "hypervisor.ignis.dev/";
/// The one container: `ignis vm-pod`, which shows the guest's console as its log.
pub(crate) const CONTAINER: &str = "guest";
const CONSOLE_VOLUME: &str = "console";
const CONSOLE_DIR: &str = "/run/ignis";
/// `nobody`: the launcher needs no identity of its own.
const LAUNCHER_ID: i64 = 65534;
/// Seconds the pod's grace exceeds the VM's, so the launcher outlives the guest's shutdown.
const EXTRA_GRACE: i64 = 5;
/// KubeVirt's default CPU allocation ratio (10): a vCPU requests a tenth of a core.
const CPU_REQUEST_MILLIS_PER_VCPU: u32 = 100;
/// The longest label value, and so the longest MicroVM name that can have a VM pod.
const MAX_LABEL_VALUE: usize = 63;

const MI: u64 = 1 << 20;

/// The name of a MicroVM's VM pod. Fixed, so a replacement can only be created once the old
/// pod is gone: two pods (and two VMMs) never exist for one VM.
pub(crate) fn pod_name(microvm: &str) -> String {
    format!("vm-{microvm}")
}

/// Memory each VMM needs beyond the guest's (its own process, page tables, device emulation),
/// added to the VM pod's memory request and limit so the kubelet never OOM-kills the VMM for
/// memory the guest was promised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VmmOverhead {
    pub(crate) qemu: u64,
    pub(crate) firecracker: u64,
    pub(crate) cloud_hypervisor: u64,
}

impl Default for VmmOverhead {
    /// Declared, not yet measured on a cluster (docs/architecture.md says so).
    fn default() -> Self {
        Self {
            qemu: 128 * MI,
            firecracker: 32 * MI,
            cloud_hypervisor: 48 * MI,
        }
    }
}

/// A `--vmm-overhead` entry that cannot be used.
#[derive(Debug, Error, PartialEq, Eq, strum::IntoStaticStr)]
pub enum OverheadError {
    #[error("--vmm-overhead {0:?}: expected HYPERVISOR=QUANTITY, e.g. qemu=128Mi")]
    Malformed(String),
    #[error("--vmm-overhead {0:?}: the hypervisor is one of qemu, firecracker, cloud-hypervisor")]
    UnknownHypervisor(String),
    #[error("--vmm-overhead {entry:?}: {detail}")]
    Quantity { entry: String, detail: String },
}

impl VmmOverhead {
    /// The defaults with `entries` (`qemu=128Mi`, …) applied in order.
    pub(crate) fn parse(entries: &[String]) -> Result<Self, OverheadError> {
        let mut out = Self::default();
        for entry in entries {
            let (name, quantity) = entry
                .split_once('=')
                .ok_or_else(|| OverheadError::Malformed(entry.clone()))?;
            let bytes = parse_quantity_bytes(quantity).map_err(|e| OverheadError::Quantity {
                entry: entry.clone(),
                detail: e.to_string(),
            })?;
            match name.trim() {
                "qemu" => out.qemu = bytes,
                "firecracker" => out.firecracker = bytes,
                "cloud-hypervisor" => out.cloud_hypervisor = bytes,
                _ => return Err(OverheadError::UnknownHypervisor(entry.clone())),
            }
        }
        Ok(out)
    }

    /// The overhead for a choice; `auto` may end up on any VMM, so it takes the largest.
    pub(crate) fn of(&self, choice: HypervisorChoice) -> u64 {
        match choice {
            HypervisorChoice::Qemu => self.qemu,
            HypervisorChoice::Firecracker => self.firecracker,
            HypervisorChoice::CloudHypervisor => self.cloud_hypervisor,
            HypervisorChoice::Auto => self.qemu.max(self.firecracker).max(self.cloud_hypervisor),
        }
    }
}

/// What the controller is told about VM pods (`--vm-pods` and its companions).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VmPodSettings {
    /// The image of the pod's container: the controller's own (it holds `ignis vm-pod`).
    pub(crate) image: String,
    pub(crate) overhead: VmmOverhead,
}

/// A MicroVM that cannot have a VM pod. Permanent: the object must change first.
#[derive(Debug, Error, PartialEq, Eq, strum::IntoStaticStr)]
pub(crate) enum VmPodError {
    #[error("the MicroVM has no uid yet")]
    MissingUid,
    #[error(
        "metadata.name {0:?} is longer than 63 characters, so it cannot label its VM pod; use a shorter name"
    )]
    #[strum(serialize = "NameTooLong")]
    Name(String),
    #[error("spec.resources.memory {memory:?} is not a valid quantity")]
    #[strum(serialize = "InvalidMemory")]
    Memory {
        memory: String,
        #[source]
        source: QuantityError,
    },
}

/// Build the VM pod of `mvm` (Interface 3 of the VM-pod contract).
pub(crate) fn build(mvm: &MicroVM, settings: &VmPodSettings) -> Result<Pod, VmPodError> {
    let meta = &mvm.metadata;
    let uid = meta.uid.clone().ok_or(VmPodError::MissingUid)?;
    let name = meta.name.clone().unwrap_or_default();
    if name.len() > MAX_LABEL_VALUE {
        return Err(VmPodError::Name(name));
    }
    let s = &mvm.spec;
    let guest = parse_quantity_bytes(&s.resources.memory).map_err(|source| VmPodError::Memory {
        memory: s.resources.memory.clone(),
        source,
    })?;
    let memory = bytes_quantity(guest.saturating_add(settings.overhead.of(s.hypervisor)));
    let vcpus = s.resources.vcpus.max(1);
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            (
                "cpu".to_string(),
                Quantity(format!("{}m", vcpus * CPU_REQUEST_MILLIS_PER_VCPU)),
            ),
            ("memory".to_string(), memory.clone()),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(vcpus.to_string())),
            ("memory".to_string(), memory),
        ])),
        ..Default::default()
    };
    let mut labels = meta.labels.clone().unwrap_or_default();
    // The node label is Ignis's own placement record in `ignis dev`; it means nothing here.
    labels.remove(crate::api::NODE_LABEL);
    labels.insert(MICROVM_LABEL.to_string(), name.clone());
    let container = Container {
        name: CONTAINER.to_string(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        args: Some(vec![
            "vm-pod".to_string(),
            "--console-dir".to_string(),
            CONSOLE_DIR.to_string(),
        ]),
        resources: Some(resources),
        volume_mounts: Some(vec![VolumeMount {
            name: CONSOLE_VOLUME.to_string(),
            mount_path: CONSOLE_DIR.to_string(),
            ..Default::default()
        }]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_string()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let spec = PodSpec {
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: CONSOLE_VOLUME.to_string(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }]),
        restart_policy: Some("Always".to_string()),
        termination_grace_period_seconds: Some(
            s.termination_grace_period_seconds.max(0) + EXTRA_GRACE,
        ),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(LAUNCHER_ID),
            run_as_group: Some(LAUNCHER_ID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        node_selector: s.node_selector.clone().filter(|n| !n.is_empty()),
        affinity: Some(affinity(mvm)),
        tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
        priority_class_name: s.priority_class_name.clone(),
        readiness_gates: Some(vec![PodReadinessGate {
            condition_type: GUEST_READY_GATE.to_string(),
        }]),
        ..Default::default()
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&name)),
            namespace: meta.namespace.clone(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([(
                MICROVM_UID_ANNOTATION.to_string(),
                uid.clone(),
            )])),
            owner_references: Some(vec![OwnerReference {
                api_version: API_VERSION.to_string(),
                kind: KIND.to_string(),
                name,
                uid,
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// What a node must offer the MicroVM, as node-label requirements: an agent, the pinned VMM,
/// and working KVM when the MicroVM insists on it.
fn node_requirements(mvm: &MicroVM) -> Vec<NodeSelectorRequirement> {
    let is_true = |key: String| NodeSelectorRequirement {
        key,
        operator: "In".to_string(),
        values: Some(vec!["true".to_string()]),
    };
    let mut out = vec![is_true(AGENT_LABEL.to_string())];
    if let Some(h) = mvm.spec.hypervisor.pinned() {
        out.push(is_true(format!("{HYPERVISOR_LABEL_PREFIX}{h}")));
    }
    if mvm.spec.accelerator == AcceleratorChoice::Kvm {
        out.push(is_true(KVM_LABEL.to_string()));
    }
    out
}

/// The MicroVM's affinity, with the node requirements added to every required term (terms
/// are ORed, so each one must carry them).
fn affinity(mvm: &MicroVM) -> Affinity {
    let mut affinity = mvm.spec.affinity.clone().unwrap_or_default();
    let required = affinity
        .node_affinity
        .get_or_insert_with(Default::default)
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector {
            node_selector_terms: Vec::new(),
        });
    if required.node_selector_terms.is_empty() {
        required
            .node_selector_terms
            .push(NodeSelectorTerm::default());
    }
    let ours = node_requirements(mvm);
    for term in &mut required.node_selector_terms {
        term.match_expressions
            .get_or_insert_with(Vec::new)
            .extend(ours.iter().cloned());
    }
    affinity
}

/// Bytes as a quantity, in Mi when whole.
fn bytes_quantity(bytes: u64) -> Quantity {
    if bytes.is_multiple_of(MI) {
        Quantity(format!("{}Mi", bytes / MI))
    } else {
        Quantity(bytes.to_string())
    }
}

/// Why a VM pod's VM stopped, or is about to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Disruption {
    /// The MicroVM condition reason: `PodEvicted`, `PodPreempted`, `PodDeleted`, `NodeLost`,
    /// `PodFailed`.
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

/// A VM pod as the planner sees it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PodView {
    pub(crate) uid: String,
    pub(crate) name: String,
    pub(crate) namespace: String,
    /// The uid of the MicroVM its controller ownerReference names; `None` when no MicroVM
    /// controls it (a pod of someone else's with the name).
    pub(crate) owner_uid: Option<String>,
    /// The node it is bound to.
    pub(crate) node: Option<String>,
    /// kube-scheduler's message and since when, while it cannot place the pod.
    pub(crate) unschedulable: Option<(String, Timestamp)>,
    /// The pod IP, once the sandbox has one.
    pub(crate) ip: Option<IpAddr>,
    /// The sandbox runs: the pod has its IP and the `guest` container runs.
    pub(crate) sandbox_running: bool,
    /// Being deleted (it has a deletionTimestamp).
    pub(crate) deleting: bool,
    /// Deleted (terminating), evicted or failed: its VM must stop.
    pub(crate) disruption: Option<Disruption>,
    /// The readiness gate as the pod shows it now; `None` before the controller first set it.
    pub(crate) guest_ready: Option<bool>,
}

/// Reasons of the `DisruptionTarget` pod condition (Kubernetes' pod disruption conditions).
fn disruption_reason(target_reason: &str) -> &'static str {
    match target_reason {
        "PreemptionByScheduler" | "PreemptionByKubeScheduler" => "PodPreempted",
        "DeletionByTaintManager" | "DeletionByPodGC" => "NodeLost",
        // EvictionByEvictionAPI (drain), TerminationByKubelet (node pressure or shutdown).
        _ => "PodEvicted",
    }
}

/// The plain-value view of a VM pod.
pub(crate) fn view(pod: &Pod) -> PodView {
    let meta = &pod.metadata;
    let status = pod.status.clone().unwrap_or_default();
    let conditions = status.conditions.clone().unwrap_or_default();
    let condition = |t: &str| conditions.iter().find(|c| c.type_ == t);
    let unschedulable = condition("PodScheduled")
        .filter(|c| c.status == "False" && c.reason.as_deref() == Some("Unschedulable"))
        .map(|c| {
            (
                c.message.clone().unwrap_or_default(),
                c.last_transition_time
                    .as_ref()
                    .map_or(Timestamp::UNIX_EPOCH, |t| t.0),
            )
        });
    let ip = status
        .pod_ip
        .as_deref()
        .and_then(|ip| ip.parse::<IpAddr>().ok());
    let guest_running = status
        .container_statuses
        .iter()
        .flatten()
        .any(|c| c.name == CONTAINER && c.state.as_ref().is_some_and(|s| s.running.is_some()));
    let phase = status.phase.as_deref().unwrap_or("Pending");
    let target = condition("DisruptionTarget").filter(|c| c.status == "True");
    let disruption = if status.reason.as_deref() == Some("Evicted") {
        Some(Disruption {
            reason: "PodEvicted",
            message: status.message.clone().unwrap_or_default(),
        })
    } else if let Some(c) = target {
        Some(Disruption {
            reason: disruption_reason(c.reason.as_deref().unwrap_or_default()),
            message: c.message.clone().unwrap_or_default(),
        })
    } else if meta.deletion_timestamp.is_some() {
        Some(Disruption {
            reason: "PodDeleted",
            message: "the VM pod was deleted".to_string(),
        })
    } else if phase == "Failed" || phase == "Succeeded" {
        Some(Disruption {
            reason: "PodFailed",
            message: status
                .message
                .clone()
                .unwrap_or_else(|| format!("the VM pod is {phase}")),
        })
    } else {
        None
    };
    PodView {
        uid: meta.uid.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        owner_uid: meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true) && o.kind == KIND && o.api_version == API_VERSION)
            .map(|o| o.uid.clone()),
        node: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        unschedulable,
        sandbox_running: ip.is_some() && guest_running,
        ip,
        deleting: meta.deletion_timestamp.is_some(),
        disruption,
        guest_ready: condition(GUEST_READY_GATE).map(|c| c.status == "True"),
    }
}

#[cfg(test)]
#[path = "vmpod_tests.rs"]
mod tests;
