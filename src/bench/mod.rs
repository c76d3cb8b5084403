//! `ignis bench`: see DESIGN.md section 2. Being built; tracked by its issue.

use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Flags of `ignis bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}

/// Errors of `ignis bench`.
#[derive(Debug, Error)]
pub enum BenchError {
    #[error("`ignis bench` is not built yet")]
    NotBuilt,
}

/// Run until `shutdown` is cancelled.
pub async fn run(_args: BenchArgs, _shutdown: CancellationToken) -> Result<(), BenchError> {
    Err(BenchError::NotBuilt)
}
