//! Registry credentials from Kubernetes docker-config Secrets (`kubernetes.io/dockerconfigjson`
//! and the legacy `kubernetes.io/dockercfg`), held in memory only: they come with the pull
//! request and are dropped with it, never written to the node's disk, never logged.
//!
//! Keys are matched the way kubelet and Docker read them: a scheme and a path are ignored
//! (`https://index.docker.io/v1/` is Docker Hub), the host must match with its port, and a
//! leading `*.` matches one DNS label. Docker Hub answers to `docker.io`, `index.docker.io` and
//! `registry-1.docker.io`.

use std::fmt;

use base64::Engine;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::error::ImageError;

const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// One registry's login.
#[derive(Clone, PartialEq, Eq)]
struct Login {
    /// The key as written, normalized: host[:port], lower case, maybe `*.` in front.
    host: String,
    username: String,
    password: String,
}

/// The credentials of one pull: every login of the VM's pull secrets, in their order.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryCredentials {
    logins: Vec<Login>,
}

impl fmt::Debug for RegistryCredentials {
    /// Hosts and user names only: a password must never reach a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.logins
                    .iter()
                    .map(|l| format!("{}@{} <redacted>", l.username, l.host)),
            )
            .finish()
    }
}

#[derive(Deserialize)]
struct DockerConfig {
    auths: std::collections::BTreeMap<String, DockerAuth>,
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

impl RegistryCredentials {
    /// No credentials: anonymous pulls.
    pub fn anonymous() -> RegistryCredentials {
        RegistryCredentials::default()
    }

    /// One Secret's payload: `.dockerconfigjson` (`{"auths": {...}}`) or `.dockercfg` (the map
    /// alone). Later secrets add to earlier ones; the first match wins, as in kubelet.
    pub fn add_docker_config(&mut self, json: &[u8]) -> Result<(), ImageError> {
        let value: serde_json::Value =
            serde_json::from_slice(json).map_err(|e| ImageError::InvalidCredentials {
                detail: format!("not JSON: {e}"),
            })?;
        let auths: std::collections::BTreeMap<String, DockerAuth> = if value.get("auths").is_some()
        {
            serde_json::from_value::<DockerConfig>(value)
                .map(|c| c.auths)
                .map_err(|e| ImageError::InvalidCredentials {
                    detail: format!("auths: {e}"),
                })?
        } else {
            serde_json::from_value(value).map_err(|e| ImageError::InvalidCredentials {
                detail: format!("expected {{\"auths\": {{...}}}} or a .dockercfg map: {e}"),
            })?
        };
        for (key, entry) in auths {
            let (username, password) = login_of(&key, &entry)?;
            self.logins.push(Login {
                host: normalize_key(&key),
                username,
                password,
            });
        }
        Ok(())
    }

    /// Parse one docker config; see [`RegistryCredentials::add_docker_config`].
    pub fn from_docker_config(json: &[u8]) -> Result<RegistryCredentials, ImageError> {
        let mut c = RegistryCredentials::default();
        c.add_docker_config(json)?;
        Ok(c)
    }

    /// A single login (tests, or a flag).
    pub fn basic(host: &str, username: &str, password: &str) -> RegistryCredentials {
        RegistryCredentials {
            logins: vec![Login {
                host: normalize_key(host),
                username: username.into(),
                password: password.into(),
            }],
        }
    }

    /// What to send to `registry` (host[:port] as in the image reference).
    pub fn auth_for(&self, registry: &str) -> RegistryAuth {
        let registry = registry.to_ascii_lowercase();
        self.logins
            .iter()
            .find(|l| key_matches(&l.host, &registry))
            .map(|l| RegistryAuth::Basic(l.username.clone(), l.password.clone()))
            .unwrap_or(RegistryAuth::Anonymous)
    }

    pub fn is_empty(&self) -> bool {
        self.logins.is_empty()
    }
}

fn login_of(key: &str, entry: &DockerAuth) -> Result<(String, String), ImageError> {
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok((u.clone(), p.clone()));
    }
    let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) else {
        return Err(ImageError::InvalidCredentials {
            detail: format!("auths[{key:?}] has neither auth nor username and password"),
        });
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| ImageError::InvalidCredentials {
            detail: format!("auths[{key:?}].auth is not base64"),
        })?;
    let text = String::from_utf8(decoded).map_err(|_| ImageError::InvalidCredentials {
        detail: format!("auths[{key:?}].auth is not UTF-8"),
    })?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| ImageError::InvalidCredentials {
            detail: format!("auths[{key:?}].auth must encode user:password"),
        })?;
    Ok((u.to_string(), p.to_string()))
}

/// `https://Host:5000/v1/` → `host:5000`.
fn normalize_key(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let k = k.split('/').next().unwrap_or(k);
    k.to_ascii_lowercase()
}

fn key_matches(key: &str, registry: &str) -> bool {
    if key == registry {
        return true;
    }
    if DOCKER_HUB.contains(&key) && DOCKER_HUB.contains(&registry) {
        return true;
    }
    if let Some(suffix) = key.strip_prefix("*.") {
        // One label only, and the port must match too.
        if let Some(first_dot) = registry.find('.') {
            return !registry[..first_dot].is_empty() && &registry[first_dot + 1..] == suffix;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;

    fn basic(a: RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("expected basic auth, got {other:?}"),
        }
    }

    #[test]
    fn reads_dockerconfigjson_with_auth_and_with_username() {
        let json = br#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcmV0"},
            "127.0.0.1:5000":{"username":"bob","password":"pw:with:colons"}}}"#;
        let c = RegistryCredentials::from_docker_config(json).expect("parse");
        assert_eq!(
            basic(c.auth_for("docker.io")),
            ("alice".into(), "s3cret".into())
        );
        assert_eq!(
            basic(c.auth_for("127.0.0.1:5000")),
            ("bob".into(), "pw:with:colons".into())
        );
        assert_eq!(c.auth_for("127.0.0.1:5001"), RegistryAuth::Anonymous);
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
    }

    #[test]
    fn reads_legacy_dockercfg_and_wildcards() {
        let json = br#"{"*.example.com":{"auth":"dTpw","email":"x@y"}}"#;
        let c = RegistryCredentials::from_docker_config(json).expect("parse");
        assert_eq!(
            basic(c.auth_for("reg.example.com")),
            ("u".into(), "p".into())
        );
        assert_eq!(c.auth_for("a.b.example.com"), RegistryAuth::Anonymous);
        assert_eq!(c.auth_for("example.com"), RegistryAuth::Anonymous);
    }

    #[test]
    fn bad_secrets_name_the_problem() {
        for (json, needle) in [
            (&b"nope"[..], "not JSON"),
            (br#"{"auths":{"r":{}}}"#, "neither auth"),
            (br#"{"auths":{"r":{"auth":"!!"}}}"#, "not base64"),
            (
                br#"{"auths":{"r":{"auth":"bm9jb2xvbg=="}}}"#,
                "user:password",
            ),
        ] {
            let e = RegistryCredentials::from_docker_config(json).expect_err("must fail");
            assert_eq!(e.reason(), "InvalidPullSecret");
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
