//! Mutual TLS between the controller and the agents, with the CA key only where the controller
//! can read it.
//!
//! Two Secrets in the controller's namespace:
//! - [`CA_SECRET`] (`ignis-ca`): the CA certificate and key. Only the controller reads it (its
//!   Role names it by `resourceNames`); no pod mounts it, so no kubelet can fetch it.
//! - the agents' Secret (`--tls-secret`, `ignis-agent-tls`, type `kubernetes.io/tls`), mounted
//!   by the agent DaemonSet: `ca.crt` plus the agents' server certificate and key
//!   (`tls.crt`/`tls.key`, `serverAuth` only, not a CA). Nothing else. In CSR mode
//!   ([`ServingCert::Csr`], [`csr`]) it is `Opaque` with `ca.crt` and [`SIGNER_CERT`] only:
//!   each agent makes its own key and the leader signs its request ([`signer`]).
//!
//! The controller mints its client certificate (`clientAuth`, DNS name [`CONTROLLER_NAME`]) in
//! memory, valid for [`CONTROLLER_CERT_HOURS`], and mints a new one while it runs once two
//! thirds of that have passed or the CA changed (new connections use it; [`client_tls`]). Agents accept only client certificates issued by the CA, with `clientAuth`
//! and that name (`agent::tls`), so nothing a node holds can sign a certificate another agent
//! accepts. Both Secrets are created when missing; the agents' Secret is rewritten when it no
//! longer matches the CA (after a rotation, or in the old layout that carried the CA key), and
//! the agents restart on their own when its files change. The managed CA is rotated with
//! overlap, at 80% of its life or when an admin asks ([`rotation`]): `ca.crt` in the agents'
//! Secret and the controller's trust are then a bundle of every CA in use.
//!
//! Bring your own PKI (cert-manager, say): create [`CLIENT_SECRET`] (`ignis-controller-tls`:
//! `ca.crt`, `tls.crt`, `tls.key` of a client certificate named `ignis-controller`) and the
//! agents' Secret; the controller then uses them and manages nothing, re-reading its Secret
//! while it runs (a renewed or re-rooted certificate is used without a restart).

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

pub mod csr;
mod rotation;
pub(crate) mod signer;
pub use csr::{SIGNER_CERT, ServingCert, agent_server_name};
pub use rotation::{CaSet, ROTATE_ANNOTATION, SINCE_ANNOTATION};

/// The steps of one whole rotation, in order.
#[cfg(test)]
pub(crate) fn rotation_steps() -> impl Iterator<Item = rotation::Step> {
    [
        rotation::Step::Begin,
        rotation::Step::Reissue,
        rotation::Step::Finish,
    ]
    .into_iter()
}

/// The name agents present and the controller verifies, whatever IP it dials.
pub const AGENT_SERVER_NAME: &str = "ignis-agent";
/// The controller's client identity: the only one agents accept.
pub const CONTROLLER_NAME: &str = "ignis-controller";
/// The controller-only Secret with the CA certificate and key.
pub const CA_SECRET: &str = "ignis-ca";
/// A client certificate of the user's own PKI; when it exists, nothing is generated.
pub const CLIENT_SECRET: &str = "ignis-controller-tls";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
/// The agents' server certificate and key, under the `kubernetes.io/tls` Secret keys.
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ignis-controller");
/// The CA and the controller's in-memory client certificate are valid this long.
const VALID_YEARS: i16 = 10;
/// The agents' server certificate (the one key every node holds) lives a day and is renewed
/// once two thirds of its life have passed, by [`renew_agent_secret_periodically`] while the
/// controller runs; the agents restart with it on their own (VMs keep running).
pub const AGENT_CERT_HOURS: u64 = 24;
/// How often the controller checks the agents' certificate.
pub const RENEW_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);
/// Optimistic-concurrency retries when both controller replicas write at once.
const WRITE_ATTEMPTS: usize = 5;

/// TLS set-up failures.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum TlsError {
    #[error("cannot generate certificates")]
    #[strum(serialize = "CertGenerate")]
    Generate(#[source] rcgen::Error),
    #[error("cannot read or write the TLS Secrets")]
    #[strum(serialize = "TlsSecretApi")]
    Kube(#[source] kube::Error),
    #[error("Secret {secret} lacks key {key}")]
    #[strum(serialize = "TlsSecretIncomplete")]
    MissingKey { secret: String, key: &'static str },
    #[error("Secret {secret} holds an unusable CA")]
    #[strum(serialize = "TlsCaInvalid")]
    BadCa {
        secret: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("Secret {0} kept changing under us; giving up")]
    #[strum(serialize = "TlsSecretConflict")]
    Conflict(String),
    #[error("cannot sign the certificate signing request: {0}")]
    #[strum(serialize = "CsrUnusable")]
    BadRequest(String),
    #[error("cannot update the certificate signing request")]
    #[strum(serialize = "CsrApi")]
    CsrApi(#[source] kube::Error),
}

/// The CA: its certificate as PEM and an issuer holding its key.
pub struct Ca {
    pub cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A fresh CA.
    pub fn generate() -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = validity(CertificateParams::new(Vec::<String>::new()))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "ignis CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA stored in `secret`'s data.
    pub fn from_data(secret: &str, data: &BTreeMap<String, ByteString>) -> Result<Ca, TlsError> {
        let cert_pem = text(secret, data, CA_CERT)?;
        let key_pem = text(secret, data, CA_KEY)?;
        let bad = |source| TlsError::BadCa {
            secret: secret.to_string(),
            source,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(bad)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(bad)?;
        Ok(Ca {
            cert_pem,
            key_pem,
            issuer,
        })
    }

    /// The CA Secret's data.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        bytes([(CA_CERT, &self.cert_pem), (CA_KEY, &self.key_pem)])
    }

    /// A leaf certificate for `name` with one extended key usage, as (cert, key) PEM. Never a
    /// CA, so what it signs is trusted by nobody.
    #[cfg(test)]
    pub fn issue(
        &self,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<(String, String), TlsError> {
        self.issue_for(name, usage, None)
    }

    /// [`Ca::issue`] valid for `hours` from now (None: the CA's own span).
    fn issue_for(
        &self,
        name: &str,
        usage: ExtendedKeyUsagePurpose,
        hours: Option<u64>,
    ) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(TlsError::Generate)?;
        let mut params = validity(CertificateParams::new(vec![name.to_string()]))?;
        if let Some(hours) = hours {
            expire_in(&mut params, hours);
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(TlsError::Generate)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The agents' Secret data: the CA certificate and a server certificate; no CA key.
    #[cfg(test)]
    pub fn agent_secret_data(&self) -> Result<BTreeMap<String, ByteString>, TlsError> {
        self.agent_secret_data_trusting(&self.cert_pem)
    }

    /// [`Ca::agent_secret_data`] with `bundle` (every CA trusted now) as `ca.crt`.
    fn agent_secret_data_trusting(
        &self,
        bundle: &str,
    ) -> Result<BTreeMap<String, ByteString>, TlsError> {
        let (cert, key) = self.issue_for(
            AGENT_SERVER_NAME,
            ExtendedKeyUsagePurpose::ServerAuth,
            Some(AGENT_CERT_HOURS),
        )?;
        let bundle = bundle.to_string();
        Ok(bytes([
            (CA_CERT, &bundle),
            (TLS_CERT, &cert),
            (TLS_KEY, &key),
        ]))
    }

    /// The controller's client TLS config, with a client certificate minted now (valid for
    /// [`CONTROLLER_CERT_HOURS`]).
    #[cfg(test)]
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        self.client_config_trusting(&self.cert_pem)
    }

    /// [`Ca::client_config`] trusting every CA in `bundle`.
    fn client_config_trusting(&self, bundle: &str) -> Result<ClientTlsConfig, TlsError> {
        let (cert, key) = self.issue_for(
            CONTROLLER_NAME,
            ExtendedKeyUsagePurpose::ClientAuth,
            Some(CONTROLLER_CERT_HOURS),
        )?;
        Ok(client_tls(bundle, cert, key))
    }

    /// Whether the agents' Secret data fits this CA: exactly the three keys, this CA's
    /// certificate, and a server certificate it issued that is not about to expire.
    #[cfg(test)]
    pub fn agent_data_is_current(&self, data: &BTreeMap<String, ByteString>) -> bool {
        agent_data_fits(data, &self.cert_pem, &self.cert_pem)
    }
}

impl CaSet {
    /// The agents' Secret data: every trusted CA, and a server certificate of the signing one.
    pub fn agent_secret_data(&self) -> Result<BTreeMap<String, ByteString>, TlsError> {
        self.signing.agent_secret_data_trusting(&self.bundle())
    }

    /// The controller's client TLS config: a certificate of the signing CA, trusting all.
    pub fn client_config(&self) -> Result<ClientTlsConfig, TlsError> {
        self.signing.client_config_trusting(&self.bundle())
    }

    /// Whether the agents' Secret data carries this bundle and a fresh leaf of the signing CA.
    pub fn agent_data_is_current(&self, data: &BTreeMap<String, ByteString>) -> bool {
        agent_data_fits(data, &self.bundle(), &self.signing.cert_pem)
    }

    /// The agents' Secret data for `mode`: in CSR mode only the trust bundle and the signing
    /// CA's certificate (each agent has its own key; none is shared).
    pub fn agent_secret_data_for(
        &self,
        mode: ServingCert,
    ) -> Result<BTreeMap<String, ByteString>, TlsError> {
        match mode {
            ServingCert::Files => self.agent_secret_data(),
            ServingCert::Csr => Ok(bytes([
                (CA_CERT, &self.bundle()),
                (SIGNER_CERT, &self.signing.cert_pem),
            ])),
        }
    }

    /// [`CaSet::agent_data_is_current`] for `mode`.
    pub fn agent_data_is_current_for(
        &self,
        mode: ServingCert,
        data: &BTreeMap<String, ByteString>,
    ) -> bool {
        match mode {
            ServingCert::Files => self.agent_data_is_current(data),
            ServingCert::Csr => {
                data.keys().map(String::as_str).eq([CA_CERT, SIGNER_CERT])
                    && data[CA_CERT].0 == self.bundle().as_bytes()
                    && data[SIGNER_CERT].0 == self.signing.cert_pem.as_bytes()
            }
        }
    }
}

/// The type of the agents' Secret: `kubernetes.io/tls` needs `tls.crt` and `tls.key`, which
/// CSR mode does not have.
fn agent_secret_type(mode: ServingCert) -> &'static str {
    match mode {
        ServingCert::Files => "kubernetes.io/tls",
        ServingCert::Csr => "Opaque",
    }
}

/// Exactly the three keys, `bundle` as `ca.crt`, and a server certificate `signer` issued
/// that is not about to expire.
fn agent_data_fits(data: &BTreeMap<String, ByteString>, bundle: &str, signer: &str) -> bool {
    let keys: Vec<&str> = data.keys().map(String::as_str).collect();
    keys == [CA_CERT, TLS_CERT, TLS_KEY]
        && data[CA_CERT].0 == bundle.as_bytes()
        && issued_and_fresh(&data[TLS_CERT].0, signer)
}

/// The controller's client certificate lives as long as the agents' server certificate.
pub const CONTROLLER_CERT_HOURS: u64 = AGENT_CERT_HOURS;

/// What the Secrets hold for the controller's client identity.
enum Seen {
    /// The user's [`CLIENT_SECRET`] data.
    Own(BTreeMap<String, ByteString>),
    /// The managed CAs (the agents' Secret made to fit them).
    Managed(Box<CaSet>),
}

/// What the controller's current client TLS config was made from.
#[derive(Clone, Debug, PartialEq)]
enum ClientSource {
    Own(BTreeMap<String, ByteString>),
    /// Minted by the CA whose certificate is `ca_pem`, trusting `bundle`, valid
    /// `not_before..not_after` (seconds).
    Minted {
        ca_pem: String,
        bundle: String,
        not_before: i64,
        not_after: i64,
    },
}

/// Whether a client config made from `current` must be made again, now that the Secrets hold
/// `seen`: the user's data changed, the CA changed, a mode changed, or the minted certificate
/// is past two thirds of its life.
fn remake(current: &ClientSource, seen: &Seen, now: i64) -> bool {
    match (current, seen) {
        (ClientSource::Own(was), Seen::Own(is)) => was != is,
        (
            ClientSource::Minted {
                ca_pem,
                bundle,
                not_before,
                not_after,
            },
            Seen::Managed(cas),
        ) => {
            *ca_pem != cas.signing.cert_pem
                || *bundle != cas.bundle()
                || due_for_renewal(*not_before, *not_after, now)
        }
        _ => true,
    }
}

/// A client TLS config from what the Secrets hold, and what it was made from.
fn make(seen: &Seen) -> Result<(ClientTlsConfig, ClientSource), TlsError> {
    match seen {
        Seen::Own(data) => Ok((
            client_config_from_data(CLIENT_SECRET, data)?,
            ClientSource::Own(data.clone()),
        )),
        Seen::Managed(cas) => {
            let now = jiff::Timestamp::now().as_second();
            let hours = i64::try_from(CONTROLLER_CERT_HOURS).unwrap_or(i64::MAX / 7200);
            Ok((
                cas.client_config()?,
                ClientSource::Minted {
                    ca_pem: cas.signing.cert_pem.clone(),
                    bundle: cas.bundle(),
                    // As `expire_in` sets them, to the second or so.
                    not_before: now - 3600,
                    not_after: now + hours * 3600,
                },
            ))
        }
    }
}

/// Whether a certificate valid from `not_before` to `not_after` (seconds) is past two thirds
/// of its life at `now`: the point where it is renewed.
pub fn due_for_renewal(not_before: i64, not_after: i64, now: i64) -> bool {
    now >= renewal_at(not_before, not_after)
}

/// When a certificate valid from `not_before` to `not_after` (seconds) is renewed: two thirds
/// into its life.
pub fn renewal_at(not_before: i64, not_after: i64) -> i64 {
    let life = not_after.saturating_sub(not_before).max(0);
    not_before.saturating_add(life / 3 * 2)
}

/// A certificate's validity in seconds since the epoch.
pub(crate) fn validity_of(cert_pem: &str) -> Option<(i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// Let `params` be valid from an hour ago (for clocks a little behind ours) to `hours` from
/// now. Each instant is its own day's midnight UTC plus the seconds since (the calendar API
/// rcgen takes), so an hour back from just after midnight is yesterday's evening.
fn expire_in(params: &mut CertificateParams, hours: u64) {
    let at = |t: jiff::Timestamp| {
        let day = t.to_zoned(jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(
            i32::from(day.year()),
            day.month().unsigned_abs(),
            day.day().unsigned_abs(),
        ) + std::time::Duration::from_secs(t.as_second().rem_euclid(86_400).unsigned_abs())
    };
    let now = jiff::Timestamp::now();
    let ahead = jiff::SignedDuration::from_hours(i64::try_from(hours).unwrap_or(i64::MAX / 3600));
    params.not_after = at(now.checked_add(ahead).unwrap_or(jiff::Timestamp::MAX));
    params.not_before = at(now - jiff::SignedDuration::from_hours(1));
}

/// Whether `cert_pem` is signed by `ca_pem` and not yet due for renewal.
fn issued_and_fresh(cert_pem: &[u8], ca_pem: &str) -> bool {
    use x509_parser::pem::parse_x509_pem;
    let (Ok((_, leaf)), Ok((_, ca))) =
        (parse_x509_pem(cert_pem), parse_x509_pem(ca_pem.as_bytes()))
    else {
        return false;
    };
    let (Ok(leaf), Ok(ca)) = (leaf.parse_x509(), ca.parse_x509()) else {
        return false;
    };
    let now = jiff::Timestamp::now().as_second();
    let v = leaf.validity();
    leaf.verify_signature(Some(ca.public_key())).is_ok()
        && !due_for_renewal(v.not_before.timestamp(), v.not_after.timestamp(), now)
}

fn validity(
    params: Result<CertificateParams, rcgen::Error>,
) -> Result<CertificateParams, TlsError> {
    let mut params = params.map_err(TlsError::Generate)?;
    // An hour back for clocks a little behind ours.
    let from = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let start = from.to_zoned(jiff::tz::TimeZone::UTC).date();
    let day = |d: jiff::civil::Date| {
        rcgen::date_time_ymd(
            i32::from(d.year()),
            d.month().unsigned_abs(),
            d.day().unsigned_abs(),
        )
    };
    params.not_before = day(start);
    let end = start
        .checked_add(jiff::Span::new().years(VALID_YEARS))
        .unwrap_or(start);
    params.not_after = day(end);
    Ok(params)
}

fn bytes<'a>(
    items: impl IntoIterator<Item = (&'static str, &'a String)>,
) -> BTreeMap<String, ByteString> {
    items
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.clone().into_bytes())))
        .collect()
}

fn text(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
    key: &'static str,
) -> Result<String, TlsError> {
    data.get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .ok_or_else(|| TlsError::MissingKey {
            secret: secret.to_string(),
            key,
        })
}

fn client_tls(ca_pem: &str, cert_pem: String, key_pem: String) -> ClientTlsConfig {
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(cert_pem, key_pem))
        .domain_name(AGENT_SERVER_NAME)
}

/// The client TLS config from a user-provided client Secret (`ca.crt`, `tls.crt`, `tls.key`).
pub fn client_config_from_data(
    secret: &str,
    data: &BTreeMap<String, ByteString>,
) -> Result<ClientTlsConfig, TlsError> {
    Ok(client_tls(
        &text(secret, data, CA_CERT)?,
        text(secret, data, TLS_CERT)?,
        text(secret, data, TLS_KEY)?,
    ))
}

fn secret(name: &str, namespace: &str, type_: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            ..Default::default()
        },
        type_: Some(type_.to_string()),
        data: Some(data),
        ..Default::default()
    }
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

/// Read the CA Secret, creating it when missing (a concurrent creator wins and its CA is used),
/// and take the next rotation step when one is due.
async fn ensure_ca(api: &Api<Secret>, namespace: &str) -> Result<CaSet, TlsError> {
    let Some(existing) = api.get_opt(CA_SECRET).await.map_err(TlsError::Kube)? else {
        let cas = CaSet::new(Ca::generate()?);
        let object = secret(CA_SECRET, namespace, "Opaque", cas.secret_data());
        return match api.create(&PostParams::default(), &object).await {
            Ok(_) => {
                tracing::info!(%namespace, secret = CA_SECRET, "created the agent CA");
                Ok(cas)
            }
            Err(error) if is_conflict(&error) => {
                let existing = api.get(CA_SECRET).await.map_err(TlsError::Kube)?;
                CaSet::from_data(CA_SECRET, &existing.data.unwrap_or_default())
            }
            Err(error) => Err(TlsError::Kube(error)),
        };
    };
    let mut cas = CaSet::from_data(
        CA_SECRET,
        existing.data.as_ref().unwrap_or(&BTreeMap::new()),
    )?;
    let annotations = existing.metadata.annotations.clone().unwrap_or_default();
    let since = annotations
        .get(SINCE_ANNOTATION)
        .and_then(|s| s.parse::<i64>().ok());
    let requested = annotations.contains_key(ROTATE_ANNOTATION);
    let now = jiff::Timestamp::now().as_second();
    let view = cas.view(since, requested);
    let Some(step) = rotation::next_step(&view, now) else {
        if since.is_none() && view.phase != rotation::Phase::Stable {
            // A phase with no recorded start (written by hand): start counting the overlap now.
            write_ca(api, existing, &cas, Some(now)).await?;
        }
        return Ok(cas);
    };
    cas.apply(step)?;
    let since = (cas.phase() != rotation::Phase::Stable).then_some(now);
    match write_ca(api, existing, &cas, since).await {
        Ok(()) => {
            tracing::info!(%namespace, secret = CA_SECRET, ?step, phase = ?cas.phase(), "rotating the agent CA");
            Ok(cas)
        }
        // Another replica wrote first: use what it wrote.
        Err(TlsError::Kube(error)) if is_conflict(&error) => {
            let existing = api.get(CA_SECRET).await.map_err(TlsError::Kube)?;
            CaSet::from_data(CA_SECRET, &existing.data.unwrap_or_default())
        }
        Err(error) => Err(error),
    }
}

/// Replace the CA Secret `existing` (at its resourceVersion) with `cas`, the phase's start
/// `since`, and no rotation request.
async fn write_ca(
    api: &Api<Secret>,
    existing: Secret,
    cas: &CaSet,
    since: Option<i64>,
) -> Result<(), TlsError> {
    let mut object = existing;
    let annotations = object
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new);
    annotations.remove(ROTATE_ANNOTATION);
    match since {
        Some(since) => annotations.insert(SINCE_ANNOTATION.into(), since.to_string()),
        None => annotations.remove(SINCE_ANNOTATION),
    };
    object.data = Some(cas.secret_data());
    object.string_data = None;
    api.replace(CA_SECRET, &PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(TlsError::Kube)
}

/// Create or repair the agents' Secret so it fits `ca`.
async fn ensure_agent_secret(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    ca: &CaSet,
    mode: ServingCert,
) -> Result<(), TlsError> {
    for _ in 0..WRITE_ATTEMPTS {
        let existing = api.get_opt(name).await.map_err(TlsError::Kube)?;
        let mut object = secret(
            name,
            namespace,
            agent_secret_type(mode),
            ca.agent_secret_data_for(mode)?,
        );
        let written = match existing {
            Some(current) => {
                let data = current.data.clone().unwrap_or_default();
                if ca.agent_data_is_current_for(mode, &data) {
                    return Ok(());
                }
                if data.contains_key(CA_KEY) {
                    tracing::warn!(%namespace, secret = name,
                        "the agents' Secret held the CA key (old layout); it was readable on every node, so agents get certificates of a new CA");
                } else {
                    tracing::info!(%namespace, secret = name, "renewing the agents' certificate for the current CA");
                }
                object.metadata.resource_version = current.metadata.resource_version.clone();
                if current.type_ != object.type_ {
                    // The type of a Secret is immutable: replace it.
                    api.delete(name, &Default::default())
                        .await
                        .map_err(TlsError::Kube)?;
                    object.metadata.resource_version = None;
                    api.create(&PostParams::default(), &object).await
                } else {
                    api.replace(name, &PostParams::default(), &object).await
                }
            }
            None => api.create(&PostParams::default(), &object).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(%namespace, secret = name, "wrote the agents' TLS Secret");
                return Ok(());
            }
            Err(error) if is_conflict(&error) => continue,
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(error) => return Err(TlsError::Kube(error)),
        }
    }
    Err(TlsError::Conflict(name.to_string()))
}

/// What the Secrets hold for the controller: the user's [`CLIENT_SECRET`] when it exists, else
/// the managed CA (created when missing), after making sure the agents' Secret `agent_secret`
/// fits it.
async fn current(
    api: &Api<Secret>,
    namespace: &str,
    agent_secret: &str,
    mode: ServingCert,
) -> Result<Seen, TlsError> {
    if let Some(own) = api.get_opt(CLIENT_SECRET).await.map_err(TlsError::Kube)? {
        return Ok(Seen::Own(own.data.unwrap_or_default()));
    }
    let ca = ensure_ca(api, namespace).await?;
    ensure_agent_secret(api, namespace, agent_secret, &ca, mode).await?;
    Ok(Seen::Managed(Box::new(ca)))
}

/// The controller's client TLS config as [`latest_client_tls`] first makes it.
#[cfg(test)]
pub(crate) async fn ensure_secret(
    client: Client,
    namespace: &str,
    agent_secret: &str,
) -> Result<ClientTlsConfig, TlsError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    Ok(make(&current(&api, namespace, agent_secret, ServingCert::Files).await?)?.0)
}

/// The controller's client TLS config, kept current while the controller runs: every
/// [`RENEW_CHECK_INTERVAL`] the agents' Secret is renewed as needed (once two thirds of its day
/// have passed, or when it no longer fits the CA) and the controller's own client certificate
/// is minted again when due or when the CA changed; with the user's [`CLIENT_SECRET`], it is
/// re-read and used as soon as it changes. New connections to agents take the latest.
pub(crate) async fn latest_client_tls(
    client: Client,
    namespace: String,
    agent_secret: String,
    mode: ServingCert,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<tokio::sync::watch::Receiver<ClientTlsConfig>, TlsError> {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let seen = current(&api, &namespace, &agent_secret, mode).await?;
    if matches!(seen, Seen::Own(_)) {
        tracing::info!(%namespace, secret = CLIENT_SECRET, "using the provided client certificate; managing no TLS Secrets");
    }
    let (config, mut source) = make(&seen)?;
    let (tx, rx) = tokio::sync::watch::channel(config);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(RENEW_CHECK_INTERVAL);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let renewed = match current(&api, &namespace, &agent_secret, mode).await {
                Ok(seen) if remake(&source, &seen, jiff::Timestamp::now().as_second()) => {
                    make(&seen).map(|(config, made_from)| {
                        tx.send_replace(config);
                        source = made_from;
                        tracing::info!(%namespace, "renewed the controller's client certificate");
                    })
                }
                Ok(_) => Ok(()),
                Err(error) => Err(error),
            };
            if let Err(error) = renewed {
                tracing::warn!(reason = <&str>::from(&error), error = %crate::error::chain(&error), "renewing the TLS certificates failed; retrying");
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests;
