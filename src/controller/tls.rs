//! Mutual TLS between the controller and the agents. The material lives in one Secret: a CA,
//! the agents' server certificate and the controller's client certificate. When the Secret does
//! not exist the controller creates it (rcgen), so a fresh install works without cert-manager;
//! an operator who brings their own Secret with the same keys is used as is.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The name agents present and the controller verifies, whatever IP it dials.
pub const AGENT_SERVER_NAME: &str = "ignis-agent";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const AGENT_CERT: &str = "agent.crt";
pub const AGENT_KEY: &str = "agent.key";
pub const CONTROLLER_CERT: &str = "controller.crt";
pub const CONTROLLER_KEY: &str = "controller.key";

/// TLS set-up failures.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot generate certificates")]
    Generate(#[source] rcgen::Error),
    #[error("cannot read or create the TLS Secret")]
    Kube(#[source] kube::Error),
    #[error("TLS Secret lacks key {0}")]
    MissingKey(&'static str),
}

impl TlsError {
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::Generate(_) => "CertGenerate",
            TlsError::Kube(_) => "TlsSecretApi",
            TlsError::MissingKey(_) => "TlsSecretIncomplete",
        }
    }
}

/// A fresh CA with an agent server certificate and a controller client certificate, as PEM.
pub fn generate_bundle() -> Result<BTreeMap<&'static str, String>, TlsError> {
    let ca_key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ignis CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(TlsError::Generate)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params =
            CertificateParams::new(vec![name.to_string()]).map_err(TlsError::Generate)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(TlsError::Generate)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (agent_cert, agent_key) = leaf(AGENT_SERVER_NAME, ExtendedKeyUsagePurpose::ServerAuth)?;
    let (ctl_cert, ctl_key) = leaf("ignis-controller", ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(BTreeMap::from([
        (CA_CERT, ca_cert.pem()),
        (CA_KEY, ca_key.serialize_pem()),
        (AGENT_CERT, agent_cert),
        (AGENT_KEY, agent_key),
        (CONTROLLER_CERT, ctl_cert),
        (CONTROLLER_KEY, ctl_key),
    ]))
}

/// The controller's client TLS config from the Secret's data.
pub fn client_config(data: &BTreeMap<String, ByteString>) -> Result<ClientTlsConfig, TlsError> {
    let get = |k: &'static str| {
        data.get(k)
            .map(|b| b.0.clone())
            .ok_or(TlsError::MissingKey(k))
    };
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(get(CA_CERT)?))
        .identity(Identity::from_pem(
            get(CONTROLLER_CERT)?,
            get(CONTROLLER_KEY)?,
        ))
        .domain_name(AGENT_SERVER_NAME))
}

/// Read the Secret, creating it first when it does not exist; a concurrent creator wins and
/// its Secret is used.
pub async fn ensure_secret(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<ClientTlsConfig, TlsError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if let Some(secret) = api.get_opt(name).await.map_err(TlsError::Kube)? {
        return client_config(&secret.data.unwrap_or_default());
    }
    let bundle = generate_bundle()?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        data: Some(
            bundle
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(%namespace, %name, "created the agent TLS Secret");
            client_config(&created.data.unwrap_or_default())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let existing = api.get(name).await.map_err(TlsError::Kube)?;
            client_config(&existing.data.unwrap_or_default())
        }
        Err(error) => Err(TlsError::Kube(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_has_every_key_and_builds_a_client_config() {
        let bundle = generate_bundle().expect("generates");
        for key in [
            CA_CERT,
            CA_KEY,
            AGENT_CERT,
            AGENT_KEY,
            CONTROLLER_CERT,
            CONTROLLER_KEY,
        ] {
            assert!(bundle[key].starts_with("-----BEGIN"), "{key}");
        }
        let data: BTreeMap<String, ByteString> = bundle
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
            .collect();
        assert!(client_config(&data).is_ok());
        let mut partial = data.clone();
        partial.remove(CONTROLLER_KEY);
        assert!(matches!(
            client_config(&partial),
            Err(TlsError::MissingKey(CONTROLLER_KEY))
        ));
    }
}
