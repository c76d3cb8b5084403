//! The MicroVM resource of `ignis dev`'s API server: its CRD and the admission hook that runs
//! the CRD's structural schema and CEL rules (`api::validation`), as a real server does for an
//! installed CRD. The generic server (`apiserver/`) knows nothing of MicroVMs; this is how they
//! come in.

use std::path::PathBuf;
use std::sync::Arc;

use kube::CustomResourceExt;
use serde_json::Value;
use thiserror::Error;

use super::apiserver::{Admission, ApiServerConfig, Cause, CustomResource};
use crate::api::MicroVM;
use crate::api::validation::{MicroVmValidator, SchemaError};

/// Why the MicroVM resource could not be built (a bug in the Rust types, never user input).
#[derive(Debug, Error)]
pub enum MicroVmResourceError {
    #[error("the MicroVM CRD cannot be encoded")]
    Encode(#[source] serde_json::Error),
    #[error("cannot build the MicroVM validator")]
    Validator(#[source] SchemaError),
}

impl MicroVmResourceError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            MicroVmResourceError::Encode(_) => "CrdEncode",
            MicroVmResourceError::Validator(_) => "Validator",
        }
    }
}

/// Schema and CEL validation of MicroVMs, with the real server's causes.
struct MicroVmAdmission(MicroVmValidator);

impl Admission for MicroVmAdmission {
    fn validate(&self, object: &Value, old: Option<&Value>) -> Vec<Cause> {
        self.0
            .validate(object, old)
            .iter()
            .map(|e| {
                let line = e.to_string();
                let prefix = format!("{}: ", e.field);
                Cause {
                    reason: e.kind.cause_type().into(),
                    message: line.strip_prefix(&prefix).unwrap_or(&line).to_string(),
                    field: e.field.clone(),
                }
            })
            .collect()
    }
}

/// The MicroVM custom resource with its admission hook.
pub fn microvm_resource() -> Result<CustomResource, MicroVmResourceError> {
    let crd = serde_json::to_value(MicroVM::crd()).map_err(MicroVmResourceError::Encode)?;
    let validator = MicroVmValidator::new().map_err(MicroVmResourceError::Validator)?;
    Ok(CustomResource {
        crd,
        admission: Some(Arc::new(MicroVmAdmission(validator))),
    })
}

/// The MicroVMPool custom resource. Its template is checked where it matters: each warm VM
/// made from it goes through the MicroVM hook.
pub fn pool_resource() -> Result<CustomResource, MicroVmResourceError> {
    let crd = serde_json::to_value(crate::api::MicroVMPool::crd())
        .map_err(MicroVmResourceError::Encode)?;
    Ok(CustomResource {
        crd,
        admission: None,
    })
}

/// An API server configuration that serves MicroVMs: what `ignis dev`, the benches and the
/// tests start.
pub fn api_server_config(
    data_dir: impl Into<PathBuf>,
) -> Result<ApiServerConfig, MicroVmResourceError> {
    let mut config = ApiServerConfig::new(data_dir);
    config.custom_resources.push(microvm_resource()?);
    config.custom_resources.push(pool_resource()?);
    Ok(config)
}
