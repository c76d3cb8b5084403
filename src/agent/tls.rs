//! The agent's side of mutual TLS: who may call it, and picking up new certificates.
//!
//! The TLS handshake (rustls, with the CA as the only client root) already refuses client
//! certificates the CA did not issue and those without the `clientAuth` usage, so the agents'
//! own server certificate (`serverAuth`, not a CA) can neither be presented as a client nor
//! sign one. [`ControllerOnly`] then admits only the controller's identity
//! ([`CONTROLLER_NAME`](crate::controller::tls::CONTROLLER_NAME)), so a certificate the CA
//! issued to anything else is refused too. [`watch_files`] restarts the agent when the mounted
//! Secret changes (a CA rotation): VMs outlive the agent and are re-adopted.

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::controller::tls::CONTROLLER_NAME;

/// How often the certificate files are compared with what was loaded.
const WATCH_INTERVAL: Duration = Duration::from_secs(10);

/// A gRPC interceptor admitting only callers whose client certificate names the controller.
/// Off (`enforce: false`) on the unix socket of `ignis dev`, where there is no TLS.
#[derive(Clone, Copy, Debug)]
pub struct ControllerOnly {
    pub enforce: bool,
}

impl tonic::service::Interceptor for ControllerOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if !self.enforce {
            return Ok(request);
        }
        let certs = request.peer_certs();
        let leaf = certs.as_ref().and_then(|c| c.first());
        match leaf.map(|der| names_controller(der.as_ref())) {
            Some(true) => Ok(request),
            Some(false) => {
                tracing::warn!("refused a client certificate that does not name {CONTROLLER_NAME}");
                Err(Status::permission_denied(format!(
                    "only {CONTROLLER_NAME} may call the agent"
                )))
            }
            None => Err(Status::unauthenticated("a client certificate is required")),
        }
    }
}

/// Whether a DER certificate carries the controller's name as a DNS subject alternative name.
pub fn names_controller(der: &[u8]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return false;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    san.value
        .general_names
        .iter()
        .any(|name| matches!(name, GeneralName::DNSName(n) if *n == CONTROLLER_NAME))
}

fn fingerprint(paths: &[PathBuf]) -> Option<Vec<u8>> {
    let mut hash = Sha256::new();
    for path in paths {
        hash.update(std::fs::read(path).ok()?);
    }
    Some(hash.finalize().to_vec())
}

/// Cancel `shutdown` once the files at `paths` differ from what they hold now, so the agent
/// exits and its DaemonSet starts it again with the new certificates (a TLS server cannot
/// swap them in place). A file briefly missing while the kubelet swaps the Secret's files is
/// not a change.
pub fn watch_files(paths: Vec<PathBuf>, shutdown: CancellationToken) {
    let Some(loaded) = fingerprint(&paths) else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(now) = fingerprint(&paths)
                && now != loaded
            {
                tracing::warn!(
                    "the TLS certificates changed on disk; exiting so the agent restarts with them (VMs keep running)"
                );
                shutdown.cancel();
                return;
            }
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    //! The issue's "CN=evil" case: whatever a node holds (the agents' Secret: the CA
    //! certificate, the agents' server certificate and key) mints no client an agent accepts.

    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    use super::*;
    use crate::agent::{AgentConfig, ListenAddr, ServerTls, TlsFiles, serve};
    use crate::controller::tls::{AGENT_SERVER_NAME, CA_CERT, Ca, TLS_CERT, TLS_KEY};
    use crate::proto::GetHostRequest;
    use crate::proto::agent_client::AgentClient;

    pub(super) fn pem(data: &BTreeMap<String, ByteString>, key: &str) -> String {
        String::from_utf8(data[key].0.clone()).expect("utf-8")
    }

    /// An agent (simulated VMM) serving mutual TLS on a loopback port with this material,
    /// written as files in `dir`: its handle, its port, and the token that stops it.
    pub(super) async fn serve_tls(
        dir: &std::path::Path,
        cert: &str,
        key: &str,
        client_ca: &str,
    ) -> (crate::agent::AgentHandle, u16, CancellationToken) {
        let files = TlsFiles {
            cert: dir.join(TLS_CERT),
            key: dir.join(TLS_KEY),
            client_ca: dir.join(CA_CERT),
        };
        std::fs::write(&files.cert, cert).expect("write");
        std::fs::write(&files.key, key).expect("write");
        std::fs::write(&files.client_ca, client_ca).expect("write");
        let mut config = AgentConfig::local(&dir.join("state"));
        config.listen = ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr"));
        config.tls = Some(ServerTls::Files(files));
        config.network = None;
        config.simulated = true;
        config.accelerator = crate::agent::AcceleratorFlag::Tcg;
        let shutdown = CancellationToken::new();
        let agent = serve(config, shutdown.clone()).await.expect("agent serves");
        let ListenAddr::Tcp(addr) = agent.listen else {
            panic!("tcp")
        };
        let port = addr.port();
        (agent, port, shutdown)
    }

    /// A client certificate for `name`, signed with `issuer_key` as if by `issuer_cert_pem`.
    fn mint(name: &str, issuer_cert_pem: &str, issuer_key_pem: &str) -> (String, String) {
        let signer = KeyPair::from_pem(issuer_key_pem).expect("signer key");
        let issuer = Issuer::from_ca_cert_pem(issuer_cert_pem, signer).expect("issuer");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &issuer).expect("signed");
        (cert.pem(), key.serialize_pem())
    }

    /// Call GetHost on the agent at `port` with this client identity; Ok when it answered.
    pub(super) async fn call(
        port: u16,
        ca_pem: &str,
        identity: Option<(String, String)>,
    ) -> Result<(), String> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca_pem))
            .domain_name(AGENT_SERVER_NAME);
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        get_host_over(tls, port).await
    }

    /// GetHost on the agent at `port` over `tls`; Ok when it answered.
    pub(crate) async fn get_host_over(tls: ClientTlsConfig, port: u16) -> Result<(), String> {
        let endpoint = Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
            .expect("endpoint")
            .tls_config(tls)
            .expect("tls")
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        AgentClient::new(channel)
            .get_host(GetHostRequest::default())
            .await
            .map(|_| ())
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    }

    #[tokio::test]
    async fn only_the_controller_is_accepted_and_nothing_a_node_holds_mints_it() {
        let ca = Ca::generate().expect("CA");
        let node = ca.agent_secret_data().expect("agents' Secret");
        let tmp = tempfile::tempdir().expect("tmp");
        let (agent, port, shutdown) = serve_tls(
            tmp.path(),
            &pem(&node, TLS_CERT),
            &pem(&node, TLS_KEY),
            &pem(&node, CA_CERT),
        )
        .await;
        let ca_pem = pem(&node, CA_CERT);

        // The controller's own certificate works.
        let (cert, key) = ca
            .issue(CONTROLLER_NAME, ExtendedKeyUsagePurpose::ClientAuth)
            .expect("controller cert");
        call(port, &ca_pem, Some((cert, key)))
            .await
            .expect("the controller is accepted");
        // So is one minted by a controller that loaded the CA from its Secret.
        let reloaded = Ca::from_data("ignis-ca", &ca.secret_data()).expect("reload");
        let (cert, key) = reloaded
            .issue(CONTROLLER_NAME, ExtendedKeyUsagePurpose::ClientAuth)
            .expect("controller cert");
        call(port, &ca_pem, Some((cert, key)))
            .await
            .expect("the controller of a reloaded CA is accepted");

        // CN=evil signed with the agents' key, posing as their certificate's issuer.
        let evil = mint("evil", &pem(&node, TLS_CERT), &pem(&node, TLS_KEY));
        let refused = call(port, &ca_pem, Some(evil)).await;
        assert!(
            refused.is_err(),
            "CN=evil signed by the agent key was accepted"
        );
        // The controller's name signed with the agents' key: still no.
        let posing = mint(CONTROLLER_NAME, &pem(&node, TLS_CERT), &pem(&node, TLS_KEY));
        assert!(call(port, &ca_pem, Some(posing)).await.is_err());
        // The agents' own pair presented as a client (serverAuth only).
        let own = (pem(&node, TLS_CERT), pem(&node, TLS_KEY));
        assert!(call(port, &ca_pem, Some(own)).await.is_err());
        // No client certificate at all.
        assert!(call(port, &ca_pem, None).await.is_err());
        // Issued by the CA with clientAuth but for another name: the CA key would be needed,
        // which no node has; refused anyway.
        let (cert, key) = ca
            .issue("evil", ExtendedKeyUsagePurpose::ClientAuth)
            .expect("cert");
        let error = call(port, &ca_pem, Some((cert, key)))
            .await
            .expect_err("another name is refused");
        assert!(error.contains("PermissionDenied"), "{error}");

        shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), agent.wait()).await;
    }

    #[test]
    fn the_controller_name_is_read_from_the_san() {
        let ca = Ca::generate().expect("CA");
        let der = |name: &str| {
            let (cert, _) = ca
                .issue(name, ExtendedKeyUsagePurpose::ClientAuth)
                .expect("cert");
            let (_, pem) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).expect("pem");
            pem.contents
        };
        assert!(names_controller(&der(CONTROLLER_NAME)));
        assert!(!names_controller(&der("evil")));
        assert!(!names_controller(b"not a certificate"));
    }

    #[tokio::test]
    async fn a_changed_certificate_file_stops_the_agent() {
        tokio::time::pause();
        let tmp = tempfile::tempdir().expect("tmp");
        let file = tmp.path().join("tls.crt");
        std::fs::write(&file, "one").expect("write");
        let shutdown = CancellationToken::new();
        watch_files(vec![file.clone()], shutdown.clone());
        tokio::time::sleep(WATCH_INTERVAL * 2).await;
        assert!(!shutdown.is_cancelled(), "nothing changed");
        std::fs::write(&file, "two").expect("write");
        tokio::time::sleep(WATCH_INTERVAL * 2).await;
        assert!(shutdown.is_cancelled(), "the change was noticed");
    }
}

#[cfg(test)]
#[path = "tls_rotation_tests.rs"]
mod rotation_tests;
