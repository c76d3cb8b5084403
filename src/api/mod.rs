//! The `MicroVM` custom resource: the contract between users and Ignis.
//!
//! Everything here is plain data plus the validation rules a real API server
//! enforces (OpenAPI schema from schemars, CEL `x-kubernetes-validations`).

mod builder;
mod conditions;
mod microvm;
mod pool;
mod quantity;
pub(crate) mod validation;

pub use builder::MicroVmBuilder;
#[cfg(test)]
pub(crate) use conditions::set_condition;
pub(crate) use conditions::{ConditionType, Reason, find_condition, set_condition_status};
pub use microvm::*;
pub use pool::*;
pub(crate) use quantity::{QuantityError, parse_quantity_bytes};

/// The API group of every Ignis resource.
pub const GROUP: &str = "ignis.dev";
/// The served and stored version.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as it appears in manifests.
pub const API_VERSION: &str = "ignis.dev/v1alpha1";
/// The kind of a MicroVM object.
pub const KIND: &str = "MicroVM";
/// The plural, as it appears in paths.
pub const PLURAL: &str = "microvms";
/// The finalizer the controller adds so a VM is stopped before its object goes.
pub const FINALIZER: &str = "ignis.dev/vm-cleanup";
/// Field manager for every write the controller makes.
pub(crate) const FIELD_MANAGER: &str = "ignis-controller";
/// Label recording the node a VM was placed on.
pub const NODE_LABEL: &str = "ignis.dev/node";

/// The CRD as YAML, exactly what `ignis crd` prints and `crds/microvm.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&MicroVM::crd())
}

/// The pool CRD as YAML, what `ignis crd pool` prints and `crds/microvmpool.yaml` holds.
pub fn pool_crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&MicroVMPool::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::CustomResourceExt;
    use std::path::Path;

    /// `crds/microvm.yaml` and the chart's copy are generated; they must match the Rust types.
    /// Regenerate with `cargo run -- crd > crds/microvm.yaml` (and copy into the chart).
    #[test]
    fn checked_in_crds_match_the_rust_types() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let microvm = crd_yaml().expect("CRD serializes");
        let pool = pool_crd_yaml().expect("CRD serializes");
        for (file, generated) in [
            ("crds/microvm.yaml", &microvm),
            ("charts/ignis/crds/microvm.yaml", &microvm),
            ("config/crd/microvm.yaml", &microvm),
            ("crds/microvmpool.yaml", &pool),
            ("charts/ignis/crds/microvmpool.yaml", &pool),
            ("config/crd/microvmpool.yaml", &pool),
        ] {
            let on_disk = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            assert!(
                &on_disk == generated,
                "{file} drifted from the Rust types: run `scripts/crds.sh`"
            );
        }
    }

    #[test]
    fn crd_round_trips_and_carries_the_contract() {
        let yaml = crd_yaml().expect("CRD serializes");
        let parsed: CustomResourceDefinition =
            serde_yaml::from_str(&yaml).expect("CRD parses back");
        assert_eq!(parsed, MicroVM::crd());
        assert_eq!(parsed.spec.group, GROUP);
        assert_eq!(API_VERSION, format!("{GROUP}/{VERSION}"));
        assert_eq!(parsed.spec.names.kind, KIND);
        assert_eq!(parsed.spec.names.plural, PLURAL);
        assert_eq!(parsed.spec.names.short_names, Some(vec!["mvm".to_string()]));
        let version = &parsed.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(columns, ["Phase", "Node", "IP", "Ready", "Age"]);
    }
}
