//! A MicroVM's `imagePullSecrets`, read when an apply goes to the agent: each must be a
//! docker-config Secret (`kubernetes.io/dockerconfigjson` or the legacy
//! `kubernetes.io/dockercfg`) in the MicroVM's namespace. The payloads travel with the apply
//! for the pull only; the controller keeps none of them.
//!
//! Like kubelet, a Secret that cannot be used (missing, of another type, not a docker config)
//! does not block the pull: public images still pull, and a private one fails with the
//! registry's own `ImageUnauthorized`. Each such Secret is reported (a Warning Event naming it),
//! and every later apply reads the Secrets again, so a fixed one takes effect on the next retry.

use std::time::Duration;

use k8s_openapi::api::core::v1::{LocalObjectReference, Secret};
use kube::{Api, Client};

use crate::agent::image::RegistryCredentials;
use crate::vm::PullSecrets;

/// `type` and data key of the Secrets that carry registry logins.
const DOCKER_CONFIG_JSON: (&str, &str) = ("kubernetes.io/dockerconfigjson", ".dockerconfigjson");
const DOCKER_CFG: (&str, &str) = ("kubernetes.io/dockercfg", ".dockercfg");
/// A Secret that does not answer in this time is reported, not waited for.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What reading the Secrets gave: the payloads, and why the others were left out.
#[derive(Debug, Default)]
pub(crate) struct ReadSecrets {
    pub(crate) secrets: PullSecrets,
    /// One message per Secret left out, naming it.
    pub(crate) problems: Vec<String>,
}

/// The docker config in `secret`, checked to parse. Pure.
pub(crate) fn docker_config(name: &str, secret: &Secret) -> Result<Vec<u8>, String> {
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    let key = [DOCKER_CONFIG_JSON, DOCKER_CFG]
        .into_iter()
        .find(|(t, _)| *t == kind)
        .map(|(_, key)| key)
        .ok_or_else(|| {
            format!(
                "imagePullSecret {name} has type {kind}; use {} (kubectl create secret docker-registry)",
                DOCKER_CONFIG_JSON.0
            )
        })?;
    let payload = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .ok_or_else(|| format!("imagePullSecret {name} has no {key} key"))?;
    RegistryCredentials::from_docker_config(&payload)
        .map_err(|e| format!("imagePullSecret {name}: {e}"))?;
    Ok(payload)
}

/// Read every Secret of `refs` in `namespace`, in order.
pub(crate) async fn read(
    client: &Client,
    namespace: &str,
    refs: &[LocalObjectReference],
) -> ReadSecrets {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut out = ReadSecrets::default();
    let mut payloads = Vec::new();
    for name in refs.iter().map(|r| r.name.as_str()) {
        let got = tokio::time::timeout(READ_TIMEOUT, api.get_opt(name)).await;
        let payload = match got {
            Ok(Ok(Some(secret))) => docker_config(name, &secret),
            Ok(Ok(None)) => Err(format!(
                "imagePullSecret {name} not found in namespace {namespace}"
            )),
            Ok(Err(error)) => Err(format!("imagePullSecret {name} cannot be read: {error}")),
            Err(_) => Err(format!(
                "imagePullSecret {name} cannot be read: no answer within {READ_TIMEOUT:?}"
            )),
        };
        match payload {
            Ok(payload) => payloads.push(payload),
            Err(problem) => out.problems.push(problem),
        }
    }
    out.secrets = PullSecrets::new(payloads);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn secret(kind: &str, key: &str, payload: &[u8]) -> Secret {
        Secret {
            type_: Some(kind.to_string()),
            data: Some([(key.to_string(), ByteString(payload.to_vec()))].into()),
            ..Default::default()
        }
    }

    #[test]
    fn docker_config_secrets_are_taken_and_others_named() {
        let json = br#"{"auths":{"127.0.0.1:5000":{"auth":"aWduaXM6cw=="}}}"#;
        assert_eq!(
            docker_config(
                "reg",
                &secret(DOCKER_CONFIG_JSON.0, ".dockerconfigjson", json)
            ),
            Ok(json.to_vec())
        );
        let cfg = br#"{"127.0.0.1:5000":{"auth":"aWduaXM6cw=="}}"#;
        assert!(docker_config("old", &secret(DOCKER_CFG.0, ".dockercfg", cfg)).is_ok());
        let opaque = docker_config("x", &secret("Opaque", ".dockerconfigjson", json));
        assert!(
            opaque
                .as_ref()
                .is_err_and(|e| e.contains("x has type Opaque")),
            "{opaque:?}"
        );
        let no_key = docker_config("y", &secret(DOCKER_CONFIG_JSON.0, "config", json));
        assert!(
            no_key
                .as_ref()
                .is_err_and(|e| e.contains("no .dockerconfigjson")),
            "{no_key:?}"
        );
        let garbage = docker_config(
            "z",
            &secret(DOCKER_CONFIG_JSON.0, ".dockerconfigjson", b"{"),
        );
        assert!(
            garbage
                .as_ref()
                .is_err_and(|e| e.starts_with("imagePullSecret z:")),
            "{garbage:?}"
        );
    }
}
