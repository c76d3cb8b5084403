//! `ignis agent`: the node's VM supervisor (DESIGN.md section 2). Being built; see issue 3.

pub mod guest;
pub mod kvm;
pub mod net;
pub mod vmm;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Flags of `ignis agent`.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {}

/// Errors of `ignis agent`.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("`ignis agent` is not built yet")]
    NotBuilt,
}

/// Run until `shutdown` is cancelled.
pub async fn run(_args: AgentArgs, _shutdown: CancellationToken) -> Result<(), AgentError> {
    Err(AgentError::NotBuilt)
}
