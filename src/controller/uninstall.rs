//! `ignis uninstall`: the Helm chart's pre-delete hook. Helm keeps the CRD (and so every
//! MicroVM) on uninstall, while the controller and agents go away; a MicroVM left then would
//! keep its VM running on a node with nobody to stop it, and its finalizer would never be
//! served. So before anything is deleted this either deletes every MicroVM and waits until
//! the controller has stopped their VMs and released them, or, when the user asked for it,
//! refuses the uninstall while MicroVMs exist. Then it scales the controller to zero and waits
//! for its pods to end, so no controller still runs when Helm deletes its RBAC (a controller
//! outliving its Role would be refused by the apiserver while it shuts down).

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
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
    #[arg(long, env = "IGNIS_UNINSTALL_TIMEOUT", default_value = "5m", value_parser = crate::time::parse_duration)]
    pub timeout: Duration,
    /// The controller Deployment to scale to zero once the MicroVMs are gone.
    #[arg(long, env = "IGNIS_CONTROLLER_DEPLOYMENT")]
    pub controller_deployment: Option<String>,
    /// Namespace of that Deployment.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ignis-system")]
    pub namespace: String,
}

/// Why the uninstall cannot go on.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum UninstallError {
    #[error("cannot create a Kubernetes client")]
    #[strum(serialize = "KubeClient")]
    Client(#[source] kube::Error),
    #[error("cannot list or delete MicroVMs")]
    #[strum(serialize = "KubeApi")]
    Api(#[source] kube::Error),
    #[error("cannot scale the controller Deployment {0} to zero")]
    #[strum(serialize = "ScaleFailed")]
    Scale(String, #[source] kube::Error),
    #[error("controller pods still run after {timeout:?}: {names}")]
    #[strum(serialize = "ControllerRemains")]
    ControllerRemains { timeout: Duration, names: String },
    #[error("MicroVMs still exist and uninstall.microVMs is Refuse: {0}")]
    #[strum(serialize = "MicroVmsExist")]
    Refused(String),
    #[error("MicroVMs still exist after {timeout:?} (is the controller running?): {names}")]
    #[strum(serialize = "MicroVmsRemain")]
    Timeout { timeout: Duration, names: String },
    #[error("interrupted")]
    #[strum(serialize = "Interrupted")]
    Interrupted,
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
    let deadline = Instant::now() + args.timeout;
    remove_microvms(&client, &args, deadline, &shutdown).await?;
    if let Some(deployment) = &args.controller_deployment {
        stop_controller(&client, &args, deployment, deadline, &shutdown).await?;
    }
    Ok(())
}

/// Sleep between polls, or give up when `shutdown` fires.
async fn pause(shutdown: &CancellationToken) -> Result<(), UninstallError> {
    tokio::select! {
        _ = shutdown.cancelled() => Err(UninstallError::Interrupted),
        _ = tokio::time::sleep(Duration::from_secs(2)) => Ok(()),
    }
}

/// Scale the controller to zero and wait until none of its pods is left.
async fn stop_controller(
    client: &Client,
    args: &UninstallArgs,
    deployment: &str,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Result<(), UninstallError> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &args.namespace);
    let scaled = deployments
        .patch_scale(
            deployment,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": 0 } })),
        )
        .await;
    match scaled {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => return Ok(()),
        Err(error) => return Err(UninstallError::Scale(deployment.to_string(), error)),
    }
    tracing::info!(%deployment, "scaled the controller to zero; waiting for its pods to end");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &args.namespace);
    let selector = ListParams::default().labels(super::discovery::CONTROLLER_SELECTOR);
    loop {
        let left = pods
            .list(&selector)
            .await
            .map_err(UninstallError::Api)?
            .items;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let mut names: Vec<String> = left.iter().map(ResourceExt::name_any).collect();
            names.sort();
            return Err(UninstallError::ControllerRemains {
                timeout: args.timeout,
                names: names.join(", "),
            });
        }
        pause(shutdown).await?;
    }
}

/// Delete every MicroVM (or refuse) and wait until they are gone.
async fn remove_microvms(
    client: &Client,
    args: &UninstallArgs,
    deadline: Instant,
    shutdown: &CancellationToken,
) -> Result<(), UninstallError> {
    let api: Api<MicroVM> = Api::all(client.clone());
    let existing = api
        .list(&ListParams::default())
        .await
        .map_err(UninstallError::Api)?
        .items;
    if existing.is_empty() {
        tracing::info!("no MicroVMs");
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
        pause(shutdown).await?;
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
