//! `ignis controller`: see DESIGN.md section 2. Being built; tracked by its issue.

pub mod plan;
pub mod scheduler;
pub mod status;
pub mod vmspec;

#[cfg(test)]
pub(crate) mod fixtures;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Flags of `ignis controller`.
#[derive(Debug, clap::Args)]
pub struct ControllerArgs {}

/// Errors of `ignis controller`.
#[derive(Debug, Error)]
pub enum ControllerError {
    #[error("`ignis controller` is not built yet")]
    NotBuilt,
}

/// Run until `shutdown` is cancelled.
pub async fn run(
    _args: ControllerArgs,
    _shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    Err(ControllerError::NotBuilt)
}
