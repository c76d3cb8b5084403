//! `ignis dev`: see DESIGN.md section 2. Being built; tracked by its issue.

pub mod apiserver;

use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Flags of `ignis dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {}

/// Errors of `ignis dev`.
#[derive(Debug, Error)]
pub enum DevError {
    #[error("`ignis dev` is not built yet")]
    NotBuilt,
}

/// Run until `shutdown` is cancelled.
pub async fn run(_args: DevArgs, _shutdown: CancellationToken) -> Result<(), DevError> {
    Err(DevError::NotBuilt)
}
