//! `ignis uninstall`: the Helm chart's pre-delete hook. Helm keeps the CRD (and so every
//! MicroVM) on uninstall, while the controller and agents go away; a MicroVM left then would
//! keep its VM running on a node with nobody to stop it, and its finalizer would never be
//! served. So before anything is deleted this either deletes every MicroVM and waits until
//! the controller has stopped their VMs and released them, or, when the user asked for it,
//! refuses the uninstall while MicroVMs exist.

use std::time::{Duration, Instant};

use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client, ResourceExt};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::api::MicroVM;

/// What to do with the MicroVMs that exist at uninstall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExistingMicroVms {
    /// Delete them and wait until their VMs are stopped.
    Delete,
    /// Fail the uninstall, naming them.
    Refuse,
}

/// Flags of `ignis uninstall`.
#[derive(Debug, Clone, clap::Args)]
pub struct UninstallArgs {
    /// What to do with MicroVMs that still exist.
    #[arg(long, env = "IGNIS_UNINSTALL_MICROVMS", value_enum, default_value_t = ExistingMicroVms::Delete)]
    pub microvms: ExistingMicroVms,
    /// How long to wait for the MicroVMs to be gone (e.g. 5m).
    #[arg(long, env = "IGNIS_UNINSTALL_TIMEOUT", default_value = "5m", value_parser = super::parse_duration)]
    pub timeout: Duration,
}

/// Why the uninstall cannot go on.
#[derive(Debug, Error)]
pub enum UninstallError {
    #[error("cannot create a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot list or delete MicroVMs")]
    Api(#[source] kube::Error),
    #[error("MicroVMs still exist and uninstall.microVMs is Refuse: {0}")]
    Refused(String),
    #[error("MicroVMs still exist after {timeout:?} (is the controller running?): {names}")]
    Timeout { timeout: Duration, names: String },
    #[error("interrupted")]
    Interrupted,
}

impl UninstallError {
    pub fn reason(&self) -> &'static str {
        match self {
            UninstallError::Client(_) => "KubeClient",
            UninstallError::Api(_) => "KubeApi",
            UninstallError::Refused(_) => "MicroVmsExist",
            UninstallError::Timeout { .. } => "MicroVmsRemain",
            UninstallError::Interrupted => "Interrupted",
        }
    }
}

/// `namespace/name` of each object, for messages.
fn names(vms: &[MicroVM]) -> String {
    let mut names: Vec<String> = vms
        .iter()
        .map(|vm| format!("{}/{}", vm.namespace().unwrap_or_default(), vm.name_any()))
        .collect();
    names.sort();
    names.join(", ")
}

/// Run the hook until the MicroVMs are gone, the timeout passes, or `shutdown`.
pub async fn run(args: UninstallArgs, shutdown: CancellationToken) -> Result<(), UninstallError> {
    let client = Client::try_default()
        .await
        .map_err(UninstallError::Client)?;
    let api: Api<MicroVM> = Api::all(client.clone());
    let existing = api
        .list(&ListParams::default())
        .await
        .map_err(UninstallError::Api)?
        .items;
    if existing.is_empty() {
        tracing::info!("no MicroVMs; nothing to do before uninstall");
        return Ok(());
    }
    if args.microvms == ExistingMicroVms::Refuse {
        return Err(UninstallError::Refused(names(&existing)));
    }
    tracing::info!(count = existing.len(), microvms = %names(&existing), "deleting every MicroVM before uninstall");
    for vm in &existing {
        let namespaced: Api<MicroVM> =
            Api::namespaced(client.clone(), &vm.namespace().unwrap_or_default());
        match namespaced
            .delete(&vm.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(error) => return Err(UninstallError::Api(error)),
        }
    }
    let deadline = Instant::now() + args.timeout;
    loop {
        let left = api
            .list(&ListParams::default())
            .await
            .map_err(UninstallError::Api)?
            .items;
        if left.is_empty() {
            tracing::info!("every MicroVM is gone");
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(UninstallError::Timeout {
                timeout: args.timeout,
                names: names(&left),
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(UninstallError::Interrupted),
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sorted_namespace_slash_name() {
        let vm = |ns: &str, name: &str| {
            let mut vm = crate::controller::fixtures::microvm(name);
            vm.metadata.namespace = Some(ns.to_string());
            vm
        };
        assert_eq!(names(&[vm("b", "x"), vm("a", "y")]), "a/y, b/x");
    }
}
