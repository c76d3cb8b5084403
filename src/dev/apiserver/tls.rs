//! TLS for the dev API server: a CA and a loopback server certificate generated once per data
//! directory and kept in the store (kubectl only sends bearer tokens over TLS), and a listener
//! that completes handshakes off the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::store::{Store, StoreError};

/// A client that takes longer than this to finish its handshake is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures setting up TLS.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot generate the dev certificates")]
    Generate(#[source] rcgen::Error),
    #[error("stored TLS material is damaged")]
    Stored(#[source] hex::FromHexError),
    #[error("cannot store the TLS material")]
    Store(#[source] StoreError),
    #[error("rustls refused the certificate")]
    Rustls(#[source] rustls::Error),
}

impl TlsError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::Generate(_) => "TlsGenerate",
            TlsError::Stored(_) => "TlsStored",
            TlsError::Store(_) => "TlsStore",
            TlsError::Rustls(_) => "TlsRustls",
        }
    }
}

/// The CA and the server certificate of one data directory (all DER).
#[derive(Clone)]
pub struct TlsMaterial {
    pub ca_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial").finish_non_exhaustive()
    }
}

fn generate() -> Result<TlsMaterial, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ignis-dev-ca");
    ca_params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    params
        .distinguished_name
        .push(DnType::CommonName, "ignis-dev-apiserver");
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(TlsMaterial {
        ca_der: ca_cert.der().to_vec(),
        cert_der: cert.der().to_vec(),
        key_der: key.serialize_der(),
    })
}

/// The data directory's TLS material, generated on first use.
pub fn load_or_create(store: &Store) -> Result<TlsMaterial, TlsError> {
    let get = |k: &str| store.meta_get(k).map_err(TlsError::Store);
    if let (Some(ca), Some(cert), Some(key)) = (get("tls.ca")?, get("tls.cert")?, get("tls.key")?) {
        return Ok(TlsMaterial {
            ca_der: hex::decode(ca).map_err(TlsError::Stored)?,
            cert_der: hex::decode(cert).map_err(TlsError::Stored)?,
            key_der: hex::decode(key).map_err(TlsError::Stored)?,
        });
    }
    let material = generate().map_err(TlsError::Generate)?;
    for (k, v) in [
        ("tls.ca", &material.ca_der),
        ("tls.cert", &material.cert_der),
        ("tls.key", &material.key_der),
    ] {
        store
            .meta_set(k, &hex::encode(v))
            .map_err(TlsError::Store)?;
    }
    Ok(material)
}

/// A rustls acceptor serving the material's server certificate.
pub fn acceptor(material: &TlsMaterial) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(material.cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(material.key_der.clone())),
        )
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Standard base64 (for `certificate-authority-data`).
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A certificate as PEM.
pub fn pem(der: &[u8]) -> String {
    let body = base64(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A listener whose connections are TLS streams; handshakes run in their own tasks so one slow
/// client never blocks the others.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Start accepting on `listener`.
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::debug!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%error, %peer, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task only ends when the server is gone; wait for shutdown.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn material_is_generated_once_and_reloaded() {
        let store = Store::in_memory(10).expect("store");
        let first = load_or_create(&store).expect("create");
        let again = load_or_create(&store).expect("load");
        assert_eq!(first.ca_der, again.ca_der);
        assert_eq!(first.cert_der, again.cert_der);
        acceptor(&again).expect("rustls accepts it");
        assert!(pem(&first.ca_der).starts_with("-----BEGIN CERTIFICATE-----\n"));
    }
}
