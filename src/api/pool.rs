//! `MicroVMPool`: warm VMs kept Ready from one template, handed to the MicroVMs that name the
//! pool (docs/fast-start.md). The pool's warm VMs are MicroVMs the controller makes and owns,
//! as a ReplicaSet owns its pods; a claim moves one of them onto the claiming MicroVM.

// kube-derive takes repeated `printcolumn(type_ = ...)` entries, which clippy mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::MicroVMSpec;

/// Label on every warm VM of a pool: the pool's name.
pub const POOL_LABEL: &str = "ignis.dev/pool";
/// Annotation a claim writes on the warm VM it takes: the claiming MicroVM's uid. Written with
/// the warm VM's resourceVersion, so two claims can never take one VM.
pub const CLAIMED_BY_ANNOTATION: &str = "ignis.dev/claimed-by";
/// The most warm VMs one pool keeps.
pub const MAX_POOL_REPLICAS: u32 = 1000;

/// Warm VMs kept Ready from one template.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ignis.dev",
    version = "v1alpha1",
    kind = "MicroVMPool",
    plural = "microvmpools",
    singular = "microvmpool",
    shortname = "mvmpool",
    category = "ignis",
    namespaced,
    status = "MicroVMPoolStatus",
    derive = "PartialEq",
    doc = "Warm MicroVMs kept Ready from one template; a MicroVM naming the pool takes one with no boot.",
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Warm", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Claimed", type_ = "integer", json_path = ".status.claimed"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MicroVMPoolSpec {
    /// How many warm VMs to keep; a claim takes one and the pool makes another.
    #[schemars(range(max = 1000))]
    pub replicas: u32,
    /// What every warm VM is: the spec a claiming MicroVM must match (apart from `userData`,
    /// its run policy, `suspend` and grace period) to take one.
    pub template: MicroVMTemplate,
}

/// A warm VM's labels and spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicroVMTemplate {
    #[serde(default, skip_serializing_if = "TemplateMetadata::is_empty")]
    pub metadata: TemplateMetadata,
    pub spec: MicroVMSpec,
}

/// The labels every warm VM (and its VM pod) carries until it is claimed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl TemplateMetadata {
    fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What the pool holds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MicroVMPoolStatus {
    /// Warm VMs that exist and are not claimed (Ready or still booting).
    #[serde(default)]
    pub replicas: u32,
    /// Warm VMs whose guest is Ready: what a claim can take now.
    #[serde(default)]
    pub ready_replicas: u32,
    /// MicroVMs now running a VM taken from this pool.
    #[serde(default)]
    pub claimed: u64,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus-compatible conditions: Ready (every warm VM is Ready), Reconciling (filling),
    /// Stalled (the pool cannot make its warm VMs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MicroVM;

    const SAMPLE: &str = include_str!("../../config/samples/microvmpool.yaml");

    #[test]
    fn the_pool_sample_parses_and_its_claim_matches_the_template() {
        let mut docs = serde_yaml::Deserializer::from_str(SAMPLE);
        let pool = MicroVMPool::deserialize(docs.next().expect("the pool")).expect("a pool");
        let claim = MicroVM::deserialize(docs.next().expect("the claim")).expect("a MicroVM");
        assert_eq!(claim.spec.pool.as_deref(), Some("demo"));
        assert_eq!(pool.spec.replicas, 2);
        assert_eq!(
            MicroVMSpec {
                pool: None,
                user_data: None,
                ..claim.spec
            },
            pool.spec.template.spec
        );
    }
}
