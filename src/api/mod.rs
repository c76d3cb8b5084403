//! The `MicroVM` custom resource: the contract between users and Ignis.
//!
//! Everything here is plain data plus the validation rules a real API server
//! enforces (OpenAPI schema from schemars, CEL `x-kubernetes-validations`).

mod conditions;
mod microvm;
mod quantity;
pub mod validation;

pub use conditions::{ConditionType, Reason, find_condition, set_condition, set_condition_status};
pub use microvm::*;
pub use quantity::{QuantityError, parse_quantity_bytes};

/// The API group of every Ignis resource.
pub const GROUP: &str = "ignis.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as it appears in manifests.
pub const API_VERSION: &str = "ignis.dev/v1alpha1";
/// The finalizer the controller adds so a VM is stopped before its object goes.
pub const FINALIZER: &str = "ignis.dev/vm-cleanup";
/// Field manager for every write the controller makes.
pub const FIELD_MANAGER: &str = "ignis-controller";
/// Label recording the node a VM was placed on.
pub const NODE_LABEL: &str = "ignis.dev/node";

/// The CRD as YAML, exactly what `ignis crd` prints and `crds/microvm.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&MicroVM::crd())
}
