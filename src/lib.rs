//! Ignis: a Kubernetes operator that runs microVM workloads.
//!
//! One binary, several parts (docs/design.md section 2): the [`controller`] reconciles `MicroVM`
//! objects, the [`agent`] boots and supervises VMs on its node, and [`dev`] runs both with an
//! embedded API server on one machine.

pub mod agent;
pub mod api;
pub mod bench;
pub mod controller;
pub mod dev;
pub mod error;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub(crate) mod time;
pub mod vm;
pub mod vm_pod;

pub use error::ErrorReason;

/// The agent's gRPC API, generated from `proto/agent.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("ignis.agent.v1");
}

/// The version every part reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
