//! Each agent's own serving certificate, through a Kubernetes `CertificateSigningRequest`.
//!
//! An agent in [`ServingCert::Csr`] mode generates its key on its node at every start and asks
//! for a certificate naming [`agent_server_name`] of its node, with signer [`AGENT_SIGNER`].
//! The API server records who asked (`spec.username`) and, for a pod-bound ServiceAccount
//! token (Kubernetes 1.30+), the node of that pod (`spec.extra[`[`NODE_NAME_EXTRA`]`]`): a
//! field the requester cannot write. [`decide`] approves only when the requester is the
//! agents' ServiceAccount and that node is the one the request names; [`sign`] then issues
//! a certificate of the signing CA built from our own parameters (the request contributes
//! its public key and nothing else). The controller dials each agent verifying its node's
//! name, so a certificate of node A presented by node B's agent is refused.

use std::collections::BTreeMap;

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose, SanType,
};

use super::{AGENT_CERT_HOURS, AGENT_SERVER_NAME, Ca, TlsError, expire_in};

/// The signer name of the agents' serving certificates.
pub const AGENT_SIGNER: &str = "ignis.dev/agent-serving";
/// The user-info extra the API server sets from a pod-bound token's node claim.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The key usages an agent asks for, exactly (Kubernetes' spelling).
pub const AGENT_USAGES: [&str; 2] = ["digital signature", "server auth"];
/// How long an agent's certificate lives (`spec.expirationSeconds`).
pub const AGENT_CSR_SECONDS: i32 = 86_400;
/// In the agents' Secret, CSR mode: the signing CA's certificate. It changes when a rotation
/// reissues, so every agent restarts then and asks the new CA for its certificate.
pub const SIGNER_CERT: &str = "signer.crt";

/// Where an agent's serving certificate comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ServingCert {
    /// One certificate and key for every agent, mounted from the agents' Secret (`ignis dev`,
    /// your own PKI).
    #[default]
    Files,
    /// Each agent's own key, generated on its node, and a certificate from a
    /// `CertificateSigningRequest` the controller approves and signs.
    Csr,
}

/// The DNS name an agent on `node` presents and the controller verifies, in CSR mode.
pub fn agent_server_name(node: &str) -> String {
    format!("{AGENT_SERVER_NAME}.{node}")
}

/// What a `CertificateSigningRequest` says, as plain values.
#[derive(Clone, Debug, Default)]
pub struct CsrFacts {
    /// `spec.username`: who created it (set by the API server).
    pub username: String,
    /// `spec.extra[NODE_NAME_EXTRA]` (set by the API server).
    pub node_names: Option<Vec<String>>,
    /// `spec.usages`.
    pub usages: Vec<String>,
    /// `spec.request`: the PEM-encoded PKCS#10 request.
    pub request: Vec<u8>,
}

impl CsrFacts {
    /// The facts of a Kubernetes CSR object.
    pub fn of(csr: &k8s_openapi::api::certificates::v1::CertificateSigningRequest) -> CsrFacts {
        let spec = &csr.spec;
        CsrFacts {
            username: spec.username.clone().unwrap_or_default(),
            node_names: spec
                .extra
                .as_ref()
                .and_then(|extra: &BTreeMap<String, Vec<String>>| extra.get(NODE_NAME_EXTRA))
                .cloned(),
            usages: spec.usages.clone().unwrap_or_default(),
            request: spec.request.0.clone(),
        }
    }
}

/// Approve (for this node) or deny (with a fixed reason word and a message).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Approve {
        node: String,
    },
    Deny {
        reason: &'static str,
        message: String,
    },
}

fn deny(reason: &'static str, message: impl Into<String>) -> Decision {
    Decision::Deny {
        reason,
        message: message.into(),
    }
}

/// Whether to issue `facts`, a request to [`AGENT_SIGNER`], when the agents run as
/// `agent_user` (`system:serviceaccount:<namespace>:<name>`).
pub fn decide(facts: &CsrFacts, agent_user: &str) -> Decision {
    if facts.username != agent_user {
        return deny(
            "NotAgent",
            format!(
                "requested by {:?}; only {agent_user} may ask for an agent certificate",
                facts.username
            ),
        );
    }
    let node = match facts.node_names.as_deref() {
        Some([node]) if !node.is_empty() => node.clone(),
        _ => {
            return deny(
                "NoNodeBinding",
                format!(
                    "the request carries no single {NODE_NAME_EXTRA}: create it with the agent pod's own token (Kubernetes 1.30+)"
                ),
            );
        }
    };
    let mut usages: Vec<&str> = facts.usages.iter().map(String::as_str).collect();
    usages.sort_unstable();
    if usages != AGENT_USAGES {
        return deny(
            "WrongUsages",
            format!("usages must be exactly {AGENT_USAGES:?}, not {usages:?}"),
        );
    }
    let parsed = match parse(&facts.request) {
        Ok(parsed) => parsed,
        Err(message) => return deny("BadRequest", message),
    };
    let algorithm = parsed.public_key.algorithm();
    if ![
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ]
    .contains(&algorithm)
    {
        return deny(
            "KeyTypeRefused",
            format!("key type {algorithm:?} is refused: use ECDSA P-256 or P-384, or Ed25519"),
        );
    }
    let expected = agent_server_name(&node);
    let names: Vec<String> = parsed
        .params
        .subject_alt_names
        .iter()
        .map(|san| match san {
            SanType::DnsName(name) => name.as_str().to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    match names.as_slice() {
        [name] if *name == expected => Decision::Approve { node },
        [name] if name.starts_with(&format!("{AGENT_SERVER_NAME}.")) => deny(
            "NodeMismatch",
            format!("the request names {name:?} but comes from node {node:?}"),
        ),
        _ => deny(
            "WrongName",
            format!("the request must name exactly DNS:{expected}, not {names:?}"),
        ),
    }
}

/// The request, its self-signature checked.
fn parse(request: &[u8]) -> Result<CertificateSigningRequestParams, String> {
    let pem = std::str::from_utf8(request).map_err(|_| "the request is not PEM text")?;
    CertificateSigningRequestParams::from_pem(pem)
        .map_err(|error| format!("the request is not a usable PKCS#10 request: {error}"))
}

/// The certificate (PEM) `ca` issues for the request `request` of the agent on `node`, once
/// [`decide`] approved it: our name, usages and lifetime (at most [`AGENT_CERT_HOURS`], or
/// the `expirationSeconds` asked for), the request's public key.
pub fn sign(
    ca: &Ca,
    request: &[u8],
    node: &str,
    expiration_seconds: Option<i32>,
) -> Result<String, TlsError> {
    let parsed = parse(request).map_err(TlsError::BadRequest)?;
    let name = agent_server_name(node);
    let mut params = CertificateParams::new(vec![name.clone()]).map_err(TlsError::Generate)?;
    let asked_hours = expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(AGENT_CERT_HOURS, |s| s.div_ceil(3600));
    expire_in(&mut params, asked_hours.clamp(1, AGENT_CERT_HOURS));
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let issue = CertificateSigningRequestParams {
        params,
        public_key: parsed.public_key,
    };
    let cert = issue.signed_by(&ca.issuer).map_err(TlsError::Generate)?;
    Ok(cert.pem())
}

/// A key and a request for the agent on `node`, as the agent makes them: (request PEM, key
/// PEM). The key is ECDSA P-256.
pub fn request_for(node: &str) -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(TlsError::Generate)?;
    let name = agent_server_name(node);
    let mut params = CertificateParams::new(vec![name.clone()]).map_err(TlsError::Generate)?;
    params.distinguished_name.push(DnType::CommonName, name);
    let request = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(TlsError::Generate)?;
    Ok((request, key.serialize_pem()))
}

#[cfg(test)]
#[path = "csr_tests.rs"]
mod tests;
