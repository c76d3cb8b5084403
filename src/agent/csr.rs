//! The agent's own serving certificate (`--serving-cert=csr`): a key generated on the node at
//! every start, held in memory only, and a certificate the controller issues through a
//! Kubernetes `CertificateSigningRequest` (signer [`AGENT_SIGNER`], usages
//! [`AGENT_USAGES`], [`AGENT_CSR_SECONDS`], DNS name `ignis-agent.<node>`).
//!
//! The API server records the agent pod's node in the request (`spec.extra`, from its
//! pod-bound token); the controller approves only a request naming that node
//! (`controller::tls::csr::decide`). The agent needs `create` and `get` on CSRs, nothing
//! else: it polls its own request by name (no list or watch). A request not issued within
//! [`ISSUE_WAIT`] is logged with what to check and a new one is made after [`RETRY_AFTER`].
//! Renewal: at two thirds of the certificate's life the agent exits and its DaemonSet starts
//! it again with a fresh key and certificate (a TLS server cannot swap its identity in
//! place; VMs outlive the agent and are re-adopted, as on a CA rotation).

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::controller::tls::csr::{
    AGENT_CSR_SECONDS, AGENT_SIGNER, AGENT_USAGES, agent_server_name, request_for,
};
use crate::controller::tls::{TlsError, renewal_at, validity_of};

/// How long one request may wait for its certificate.
pub const ISSUE_WAIT: Duration = Duration::from_secs(60);
/// How long after a failed request the next one is made.
pub const RETRY_AFTER: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_secs(1);

/// Failures of getting a certificate through a CSR.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum CsrError {
    #[error(
        "cannot create a Kubernetes client: in CSR mode the agent needs its ServiceAccount token"
    )]
    #[strum(serialize = "KubeClient")]
    Client(#[source] kube::Error),
    #[error("cannot make a key and a certificate request")]
    #[strum(serialize = "CsrGenerate")]
    Generate(#[source] TlsError),
    #[error("cannot create or read the CertificateSigningRequest")]
    #[strum(serialize = "CsrApi")]
    Api(#[source] kube::Error),
    #[error("CertificateSigningRequest {name} was denied ({reason}): {message}")]
    #[strum(serialize = "CsrDenied")]
    Denied {
        name: String,
        reason: String,
        message: String,
    },
    #[error("CertificateSigningRequest {name} failed ({reason}): {message}")]
    #[strum(serialize = "CsrFailed")]
    Failed {
        name: String,
        reason: String,
        message: String,
    },
    #[error(
        "CertificateSigningRequest {name} was not issued within {waited:?}: is the Ignis controller running with --agent-serving-cert=csr and RBAC to approve and sign {AGENT_SIGNER}?"
    )]
    #[strum(serialize = "CsrNotIssued")]
    NotIssued { name: String, waited: Duration },
    #[error("the certificate issued for CertificateSigningRequest {name} is unusable")]
    #[strum(serialize = "CsrBadCertificate")]
    BadCertificate { name: String },
}

/// A certificate and the key it was issued for (PEM), and its validity (Unix seconds).
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Ask until a certificate for `node` is issued (None: `shutdown` came first). A missing
/// client (no token) is returned at once: retrying cannot fix it.
pub async fn obtain(node: &str, shutdown: &CancellationToken) -> Result<Option<Issued>, CsrError> {
    let client = Client::try_default().await.map_err(CsrError::Client)?;
    let api: Api<CertificateSigningRequest> = Api::all(client);
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            attempt = request_once(&api, node) => attempt,
        };
        match attempt {
            Ok(issued) => return Ok(Some(issued)),
            Err(error) => {
                tracing::error!(reason = <&str>::from(&error), error = %crate::error::chain(&error), retry_in = ?RETRY_AFTER, "no serving certificate yet");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(RETRY_AFTER) => {}
        }
    }
}

/// One request: a new key, a new CSR, waiting at most [`ISSUE_WAIT`] for its certificate.
async fn request_once(
    api: &Api<CertificateSigningRequest>,
    node: &str,
) -> Result<Issued, CsrError> {
    let (request, key_pem) = request_for(node).map_err(CsrError::Generate)?;
    let object = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("ignis-agent-{node}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: AGENT_SIGNER.to_string(),
            usages: Some(AGENT_USAGES.iter().map(|u| u.to_string()).collect()),
            expiration_seconds: Some(AGENT_CSR_SECONDS),
            ..Default::default()
        },
        status: None,
    };
    let created = api
        .create(&PostParams::default(), &object)
        .await
        .map_err(CsrError::Api)?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, signer = AGENT_SIGNER, dns = %agent_server_name(node), "requested a serving certificate");
    let deadline = tokio::time::Instant::now() + ISSUE_WAIT;
    loop {
        let csr = api.get(&name).await.map_err(CsrError::Api)?;
        let status = csr.status.unwrap_or_default();
        if let Some(cert) = status.certificate.filter(|c| !c.0.is_empty()) {
            let bad = || CsrError::BadCertificate { name: name.clone() };
            let cert_pem = String::from_utf8(cert.0).map_err(|_| bad())?;
            let (not_before, not_after) = validity_of(&cert_pem).ok_or_else(bad)?;
            tracing::info!(csr = %name, not_after, "serving certificate issued");
            return Ok(Issued {
                cert_pem,
                key_pem,
                not_before,
                not_after,
            });
        }
        for condition in status.conditions.unwrap_or_default() {
            let (reason, message) = (
                condition.reason.unwrap_or_default(),
                condition.message.unwrap_or_default(),
            );
            match condition.type_.as_str() {
                "Denied" => {
                    return Err(CsrError::Denied {
                        name,
                        reason,
                        message,
                    });
                }
                "Failed" => {
                    return Err(CsrError::Failed {
                        name,
                        reason,
                        message,
                    });
                }
                _ => {}
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CsrError::NotIssued {
                name,
                waited: ISSUE_WAIT,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How long from `now` until `issued` is due for renewal (two thirds of its life).
pub fn renew_in(issued: &Issued, now: i64) -> Duration {
    let at = renewal_at(issued.not_before, issued.not_after);
    Duration::from_secs(u64::try_from(at.saturating_sub(now)).unwrap_or(0))
}

/// Cancel `shutdown` when `issued` is due for renewal, so the agent exits and starts again
/// with a new key and certificate (VMs keep running and are re-adopted).
pub fn renew_before_expiry(issued: &Issued, shutdown: CancellationToken) {
    let wait = renew_in(issued, jiff::Timestamp::now().as_second());
    tracing::info!(renew_in = ?wait, "the serving certificate is renewed by a restart");
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(wait) => {
                tracing::warn!("the serving certificate is two thirds through its life; exiting so the agent restarts with a new one (VMs keep running)");
                shutdown.cancel();
            }
        }
    });
}

#[cfg(test)]
#[path = "csr_tests.rs"]
mod tests;
