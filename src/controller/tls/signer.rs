//! The leader's signer of [`AGENT_SIGNER`] requests: watch them, approve or deny each by
//! [`decide`], and issue approved ones with the signing CA of `ignis-ca`.
//!
//! Only the leader runs it (it starts after the Lease is won and stops with the leader's
//! work). A request someone else approved is signed only when [`decide`] approves it too.

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::runtime::{WatchStreamExt, watcher::Event};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::csr::{AGENT_SIGNER, CsrFacts, Decision, decide, sign};
use super::{CA_SECRET, CaSet, TlsError};

/// Where the signer finds its CA and whom it serves.
#[derive(Clone, Debug)]
pub struct SignerConfig {
    /// Namespace of `ignis-ca`.
    pub namespace: String,
    /// The agents' ServiceAccount user name.
    pub agent_user: String,
}

/// Watch and settle agent CSRs until `shutdown`.
pub async fn run(client: Client, config: SignerConfig, shutdown: CancellationToken) {
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client, &config.namespace);
    let selector = format!("spec.signerName={AGENT_SIGNER}");
    let stream = watcher(csrs.clone(), watcher::Config::default().fields(&selector))
        .default_backoff()
        .boxed();
    let mut stream = std::pin::pin!(stream);
    tracing::info!(signer = AGENT_SIGNER, user = %config.agent_user, "signing agent certificates");
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = stream.next() => event,
        };
        match event {
            None => return,
            Some(Ok(Event::Apply(csr) | Event::InitApply(csr))) => {
                let name = csr.metadata.name.clone().unwrap_or_default();
                match settle(&csrs, &secrets, &config, csr).await {
                    Ok(()) => {}
                    // A stale copy (our own write is on its way as the next event).
                    Err(TlsError::CsrApi(error)) if super::is_conflict(&error) => {
                        tracing::debug!(csr = %name, "agent CSR changed meanwhile");
                    }
                    Err(error) => {
                        tracing::warn!(csr = %name, reason = <&str>::from(&error), error = %crate::error::chain(&error), "settling an agent CSR failed; retried on its next change or relist")
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(error)) => tracing::warn!(%error, "agent CSR watch"),
        }
    }
}

fn has_condition(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn condition(kind: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    let now = Time(jiff::Timestamp::now());
    CertificateSigningRequestCondition {
        type_: kind.to_string(),
        status: "True".to_string(),
        reason: Some(reason.to_string()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// Approve or deny one request, and issue it when approved and not issued yet.
async fn settle(
    csrs: &Api<CertificateSigningRequest>,
    secrets: &Api<Secret>,
    config: &SignerConfig,
    mut csr: CertificateSigningRequest,
) -> Result<(), TlsError> {
    let issued = csr
        .status
        .as_ref()
        .is_some_and(|s| s.certificate.as_ref().is_some_and(|c| !c.0.is_empty()));
    if issued || has_condition(&csr, "Denied") || has_condition(&csr, "Failed") {
        return Ok(());
    }
    let name = csr.metadata.name.clone().unwrap_or_default();
    let decision = decide(&CsrFacts::of(&csr), &config.agent_user);
    let approved = has_condition(&csr, "Approved");
    let node = match decision {
        Decision::Deny { reason, message } => {
            if approved {
                // Approved by someone else: not ours to sign.
                tracing::warn!(csr = %name, reason, %message, "not signing an approved agent CSR that fails the checks");
                return Ok(());
            }
            tracing::warn!(csr = %name, reason, %message, "denied an agent CSR");
            let status = csr.status.get_or_insert_with(Default::default);
            status
                .conditions
                .get_or_insert_with(Vec::new)
                .push(condition("Denied", reason, message));
            replace(csrs, "approval", &name, &csr).await?;
            return Ok(());
        }
        Decision::Approve { node } => node,
    };
    if !approved {
        let status = csr.status.get_or_insert_with(Default::default);
        status
            .conditions
            .get_or_insert_with(Vec::new)
            .push(condition(
                "Approved",
                "AgentOfItsNode",
                format!("requested by the agent of node {node} for its own name"),
            ));
        csr = replace(csrs, "approval", &name, &csr).await?;
    }
    let ca = secrets.get(CA_SECRET).await.map_err(TlsError::Kube)?;
    let cas = CaSet::from_data(CA_SECRET, &ca.data.unwrap_or_default())?;
    let pem = sign(
        &cas.signing,
        &csr.spec.request.0,
        &node,
        csr.spec.expiration_seconds,
    )?;
    csr.status.get_or_insert_with(Default::default).certificate =
        Some(ByteString(pem.into_bytes()));
    replace(csrs, "status", &name, &csr).await?;
    tracing::info!(csr = %name, %node, "issued an agent's serving certificate");
    Ok(())
}

async fn replace(
    csrs: &Api<CertificateSigningRequest>,
    subresource: &str,
    name: &str,
    csr: &CertificateSigningRequest,
) -> Result<CertificateSigningRequest, TlsError> {
    csrs.replace_subresource(subresource, name, &PostParams::default(), csr)
        .await
        .map_err(TlsError::CsrApi)
}
