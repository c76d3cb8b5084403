//! Guest images from OCI registries (issue #12): the agent pulls `kernel.image`,
//! `initrd.image` and `rootfs.image` with the `oci-client` crate (the OCI distribution protocol
//! is not ours to write), turns each into the one file a VMM boots, and keeps it in a
//! content-addressed cache shared by every VM of the node ([`cache`]). See docs/images.md.
//!
//! - [`ImageStore::pull`] resolves a reference to a manifest digest and returns the cached
//!   artifact, pulling it first when missing. The caller names a holder (the VM uid): the entry
//!   is leased to it in the same step, so garbage collection never removes what a VM uses.
//!   [`ImageStore::release`] drops the holder's leases when the VM is deleted.
//! - A reference pinned by digest (`repo@sha256:…`) that is cached needs no registry when the
//!   image was pulled without credentials: a VM restarted on its resolved digest never sees a
//!   tag that moved. An image that needed credentials is served from the cache only after the
//!   registry accepts the requester's credentials for it (a manifest HEAD; KEP-2535), unless
//!   the requester already leases it.
//! - Every layer is unpacked safely and within per-image limits ([`extract`]).
//! - Plain HTTP only for registries on loopback (as Docker and containerd do) or listed in
//!   [`ImageStoreConfig::insecure_registries`]; everything else is HTTPS.
//! - Credentials ([`RegistryCredentials`]) live in memory for one pull; each pull gets its own
//!   client so one VM's login is never reused for another VM's pull.
//! - Any failure leaves no entry and no staging files behind.

pub mod cache;
pub mod credentials;
pub mod disk;
pub mod error;
pub mod extract;
pub mod layout;
pub mod tool;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};

use cache::{CacheDir, EntryRecord};
pub use cache::{EntryInfo, EntryKey, GcReport};
pub use credentials::RegistryCredentials;
pub use disk::{DiskBackend, VmDisk};
pub use error::ImageError;

/// Which part of a guest an image holds (the API's own enum).
pub use crate::api::ImageKind;

/// Default size limit of the node's image cache.
pub const DEFAULT_CACHE_MAX_BYTES: u64 = 20 << 30;
/// Default room an ext4 disk made from an image's filesystem gets beyond its content (sparse:
/// it costs nothing until the guest writes).
pub const DEFAULT_ROOTFS_FREE_BYTES: u64 = 1 << 30;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A disk file's format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The word QEMU and `qemu-img` use.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Settings of the node's image store.
#[derive(Clone, Debug)]
pub struct ImageStoreConfig {
    /// The cache directory (`<state dir>/images`).
    pub root: PathBuf,
    /// Registries (`host[:port]`) reached over plain HTTP although not on loopback.
    pub insecure_registries: Vec<String>,
    /// Garbage collection keeps the cache under this many bytes (leased entries excepted).
    pub max_bytes: u64,
    /// Room a filesystem-made ext4 disk gets beyond its content.
    pub rootfs_free_bytes: u64,
    /// What one image may cost: compressed and unpacked bytes, entries.
    pub limits: extract::Limits,
}

impl ImageStoreConfig {
    pub fn new(root: impl Into<PathBuf>) -> ImageStoreConfig {
        ImageStoreConfig {
            root: root.into(),
            insecure_registries: Vec::new(),
            max_bytes: DEFAULT_CACHE_MAX_BYTES,
            rootfs_free_bytes: DEFAULT_ROOTFS_FREE_BYTES,
            limits: extract::Limits::default(),
        }
    }
}

/// The agent's image flags; flatten into `AgentArgs` with `#[command(flatten)]`.
#[derive(Clone, Debug, clap::Args)]
pub struct ImageArgs {
    /// Size limit of the node's image cache (a quantity: `20Gi`); least recently used images
    /// no VM uses are removed beyond it.
    #[arg(long = "image-cache-size", env = "IGNIS_IMAGE_CACHE_SIZE", default_value = "20Gi",
          value_parser = parse_size)]
    pub cache_max_bytes: u64,
    /// A registry (`host[:port]`) to reach over plain HTTP; repeat for more. Loopback
    /// registries always may.
    #[arg(
        long = "insecure-registry",
        env = "IGNIS_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Per image: the most bytes its layers may take as downloaded (a quantity).
    #[arg(long = "image-max-compressed", env = "IGNIS_IMAGE_MAX_COMPRESSED",
          default_value = "4Gi", value_parser = parse_size)]
    pub max_compressed: u64,
    /// Per image: the most bytes its layers may unpack to; a decompression bomb stops here.
    #[arg(long = "image-max-unpacked", env = "IGNIS_IMAGE_MAX_UNPACKED",
          default_value = "16Gi", value_parser = parse_size)]
    pub max_unpacked: u64,
    /// Per image: the most tar entries over all its layers.
    #[arg(long = "image-max-entries", env = "IGNIS_IMAGE_MAX_ENTRIES",
          default_value_t = extract::DEFAULT_MAX_ENTRIES)]
    pub max_entries: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::api::parse_quantity_bytes(s).map_err(|e| e.to_string())
}

impl ImageArgs {
    /// The configuration, with the cache under `<agent state dir>/images`.
    pub fn config(&self, agent_state_dir: &Path) -> ImageStoreConfig {
        ImageStoreConfig {
            insecure_registries: self.insecure_registries.clone(),
            max_bytes: self.cache_max_bytes,
            limits: extract::Limits {
                compressed_bytes: self.max_compressed,
                unpacked_bytes: self.max_unpacked,
                entries: self.max_entries,
            },
            ..ImageStoreConfig::new(agent_state_dir.join("images"))
        }
    }
}

/// One pull.
#[derive(Clone, Copy, Debug)]
pub struct PullRequest<'a> {
    /// Who will use the image (the VM uid); the entry is leased to it.
    pub holder: &'a str,
    pub kind: ImageKind,
    /// `registry/repo:tag` or `registry/repo@sha256:…`.
    pub reference: &'a str,
    pub credentials: &'a RegistryCredentials,
}

/// A cached image ready for a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedImage {
    pub kind: ImageKind,
    /// The reference as asked.
    pub reference: String,
    /// The manifest digest it resolved to (`sha256:…`), for status.
    pub digest: String,
    /// The artifact in the cache: read-only, shared; never write to it.
    pub path: PathBuf,
    /// Rootfs only.
    pub disk_format: Option<DiskFormat>,
    /// Rootfs only: made from the image's filesystem.
    pub from_filesystem: bool,
}

impl ResolvedImage {
    /// `repository@digest`: what to pull on a restart so a moved tag changes nothing.
    pub fn pinned_reference(&self) -> String {
        pinned_reference(&self.reference, &self.digest)
    }
}

/// `reference` with its tag or digest replaced by `digest`: `repository@digest`.
pub fn pinned_reference(reference: &str, digest: &str) -> String {
    let base = match reference.split_once('@') {
        Some((base, _)) => base,
        None => strip_tag(reference),
    };
    format!("{base}@{digest}")
}

/// `host:5000/repo:tag` → `host:5000/repo` (a colon after the last `/` is a tag).
fn strip_tag(reference: &str) -> &str {
    let last_slash = reference.rfind('/').map(|i| i + 1).unwrap_or(0);
    match reference[last_slash..].rfind(':') {
        Some(i) => &reference[..last_slash + i],
        None => reference,
    }
}

/// Whether `registry` (`host[:port]`) may be reached over plain HTTP: loopback, or listed.
pub fn plain_http_allowed(registry: &str, insecure: &[String]) -> bool {
    if insecure.iter().any(|r| r.eq_ignore_ascii_case(registry)) {
        return true;
    }
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(registry)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// A staging directory removed on drop, whether the pull failed, panicked or was cancelled —
/// unless it was published.
struct Staging(PathBuf, bool);

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.1 {
            cache::remove_tree(&self.0);
        }
    }
}

/// The node's image store.
#[derive(Clone, Debug)]
pub struct ImageStore {
    config: ImageStoreConfig,
    cache: CacheDir,
}

impl ImageStore {
    /// Open (or create) the cache; clears what a crashed pull left.
    pub async fn open(config: ImageStoreConfig) -> Result<ImageStore, ImageError> {
        let cache = CacheDir::open(&config.root).await?;
        Ok(ImageStore { config, cache })
    }

    pub fn config(&self) -> &ImageStoreConfig {
        &self.config
    }

    /// Resolve `reference`, pull it unless cached, lease it to `holder`, and return it.
    pub async fn pull(&self, req: PullRequest<'_>) -> Result<ResolvedImage, ImageError> {
        check_holder(req.holder)?;
        let reference =
            Reference::from_str(req.reference).map_err(|e| ImageError::InvalidReference {
                reference: req.reference.to_string(),
                detail: e.to_string(),
            })?;
        let client = self.client(&reference)?;
        let auth = req.credentials.auth_for(reference.registry());
        if let Some(key) = reference.digest().and_then(|d| EntryKey::new(req.kind, d))
            && let Some(found) = self.cache.read_record(&key)
        {
            if !found.public && !self.cache.holds(&key, req.holder) {
                // A private image in the cache: only for a requester the registry lets see
                // it. One HEAD with the requester's own credentials, as the kubelet does.
                client
                    .fetch_manifest_digest(&reference, &auth)
                    .await
                    .map_err(|e| ImageError::from_oci(req.reference, e))?;
            }
            if let Some(record) = self.cache.lease_if_present(&key, req.holder).await? {
                return Ok(self.resolved(req, &key, record));
            }
        }
        let (manifest, digest) = client
            .pull_image_manifest(&reference, &auth)
            .await
            .map_err(|e| ImageError::from_oci(req.reference, e))?;
        let key = EntryKey::new(req.kind, &digest).ok_or_else(|| ImageError::Registry {
            reference: req.reference.to_string(),
            message: format!("unsupported manifest digest {digest:?} (sha256 only)"),
        })?;
        if let Some(record) = self.cache.lease_if_present(&key, req.holder).await? {
            return Ok(self.resolved(req, &key, record));
        }
        let _lock = self.cache.lock_entry(&key).await?;
        // Another pull may have finished while we waited for the lock.
        if let Some(record) = self.cache.lease_if_present(&key, req.holder).await? {
            return Ok(self.resolved(req, &key, record));
        }
        let bad_layout = |detail: String| ImageError::BadLayout {
            reference: req.reference.to_string(),
            kind: req.kind.as_str(),
            detail,
        };
        if manifest.layers.is_empty() {
            return Err(bad_layout("the image has no layers".into()));
        }
        let mut compressions = Vec::new();
        for l in &manifest.layers {
            compressions.push(layout::compression_of(&l.media_type).ok_or_else(|| {
                bad_layout(format!(
                    "layer {} has media type {} (tar or tar+gzip only)",
                    l.digest, l.media_type
                ))
            })?);
        }
        let limits = self.config.limits;
        let declared: u64 = manifest
            .layers
            .iter()
            .map(|l| u64::try_from(l.size).unwrap_or(u64::MAX))
            .fold(0, u64::saturating_add);
        if declared > limits.compressed_bytes {
            return Err(ImageError::TooLarge {
                reference: req.reference.to_string(),
                detail: format!(
                    "its layers take {declared} bytes, more than the {} the agent's \
                     --image-max-compressed allows",
                    limits.compressed_bytes
                ),
            });
        }
        let mut staging = Staging(self.cache.new_staging(&key)?, false);
        let work = staging.0.join("work");
        let tree = work.join("tree");
        std::fs::create_dir_all(&tree).map_err(ImageError::io(&tree))?;
        let mut budget = extract::Budget::new(limits);
        let mut compressed_left = limits.compressed_bytes;
        for (i, layer) in manifest.layers.iter().enumerate() {
            let blob = work.join(format!("layer-{i}"));
            let file = tokio::fs::File::create(&blob)
                .await
                .map_err(ImageError::io(&blob))?;
            let passed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let capped = extract::CappedWriter::new(file, compressed_left, passed.clone());
            let pulled = client.pull_blob(&reference, layer, capped).await;
            if passed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(ImageError::TooLarge {
                    reference: req.reference.to_string(),
                    detail: format!(
                        "layer {} sends more than the agent's --image-max-compressed ({} bytes \
                         for the whole image)",
                        layer.digest, limits.compressed_bytes
                    ),
                });
            }
            pulled.map_err(|e| ImageError::from_oci(req.reference, e))?;
            let got = std::fs::metadata(&blob)
                .map_err(ImageError::io(&blob))?
                .len();
            compressed_left = compressed_left.saturating_sub(got);
            let (tree2, blob2, c) = (tree.clone(), blob.clone(), compressions[i]);
            let (b, r) = tokio::task::spawn_blocking(move || {
                let r = extract::apply_layer(&tree2, &blob2, c, &mut budget);
                let _ = std::fs::remove_file(&blob2);
                (budget, r)
            })
            .await
            .map_err(|e| bad_layout(format!("layer {i}: {e}")))?;
            budget = b;
            r.map_err(|e| {
                if e.is_limit() {
                    ImageError::TooLarge {
                        reference: req.reference.to_string(),
                        detail: e.to_string(),
                    }
                } else {
                    bad_layout(format!("layer {} cannot be applied: {e}", layer.digest))
                }
            })?;
        }
        let artifact =
            layout::build_artifact(req.kind, &tree, &staging.0, self.config.rootfs_free_bytes)
                .await
                .map_err(|e| match req.kind {
                    ImageKind::Rootfs => ImageError::Conversion {
                        reference: req.reference.to_string(),
                        detail: e.to_string(),
                    },
                    _ => ImageError::from(e),
                })?
                .map_err(bad_layout)?;
        let staged = staging.0.clone();
        tokio::task::spawn_blocking(move || cache::remove_tree(&staged.join("work")))
            .await
            .ok();
        let artifact_path = staging.0.join(&artifact.file);
        seal(&artifact_path)?;
        let record = EntryRecord {
            kind: req.kind,
            digest: key.digest(),
            reference: req.reference.to_string(),
            artifact: artifact.file,
            disk_format: artifact.disk_format,
            from_filesystem: artifact.from_filesystem,
            public: matches!(auth, oci_client::secrets::RegistryAuth::Anonymous),
        };
        self.cache
            .publish(&staging.0, &key, &record, req.holder)
            .await?;
        // Published: the directory now lives under entries/.
        staging.1 = true;
        drop(_lock);
        if let Err(e) = self.gc().await {
            tracing::warn!(error = %e, "image cache garbage collection failed");
        }
        Ok(self.resolved(req, &key, record))
    }

    fn resolved(&self, req: PullRequest<'_>, key: &EntryKey, record: EntryRecord) -> ResolvedImage {
        ResolvedImage {
            kind: req.kind,
            reference: req.reference.to_string(),
            digest: key.digest(),
            path: self.cache.entry_dir(key).join(&record.artifact),
            disk_format: record.disk_format,
            from_filesystem: record.from_filesystem,
        }
    }

    fn client(&self, reference: &Reference) -> Result<Client, ImageError> {
        ensure_crypto_provider();
        let registry = reference.resolve_registry().to_string();
        let protocol = if plain_http_allowed(reference.registry(), &self.config.insecure_registries)
        {
            ClientProtocol::HttpsExcept(vec![registry])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            platform_resolver: Some(Box::new(oci_client::client::current_platform_resolver)),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..ClientConfig::default()
        };
        Client::try_from(config).map_err(|e| ImageError::from_oci(&reference.whole(), e))
    }

    /// Drop every lease `holder` has (the VM is gone). Idempotent.
    pub async fn release(&self, holder: &str) -> Result<(), ImageError> {
        check_holder(holder)?;
        self.cache.release(holder).await
    }

    /// Remove least recently used entries no VM leases until the cache fits its size limit.
    pub async fn gc(&self) -> Result<GcReport, ImageError> {
        self.cache.gc(self.config.max_bytes).await
    }

    /// Every cached entry with its size, last use and holders.
    pub fn entries(&self) -> Result<Vec<EntryInfo>, ImageError> {
        self.cache.scan()
    }
}

/// Artifacts are shared by every VM and are the backing files of their overlays: read-only,
/// and on disk before they are published.
fn seal(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::File::open(path).map_err(ImageError::io(path))?;
    f.sync_all().map_err(ImageError::io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(ImageError::io(path))
}

fn check_holder(holder: &str) -> Result<(), ImageError> {
    let ok = !holder.is_empty()
        && holder.len() <= 128
        && holder
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !holder.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidHolder {
            holder: holder.to_string(),
        })
    }
}

/// reqwest is built without a crypto provider of its own; the agent uses ring everywhere.
fn ensure_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;

    #[test]
    fn plain_http_only_for_loopback_or_listed_registries() {
        let none: Vec<String> = vec![];
        for r in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.8.9.1",
        ] {
            assert!(plain_http_allowed(r, &none), "{r}");
        }
        for r in [
            "10.0.0.1:5000",
            "registry.local",
            "docker.io",
            "[fe80::1]:5000",
        ] {
            assert!(!plain_http_allowed(r, &none), "{r}");
        }
        assert!(plain_http_allowed(
            "registry.local:5000",
            &["Registry.local:5000".to_string()]
        ));
        assert!(!plain_http_allowed(
            "registry.local",
            &["registry.local:5000".to_string()]
        ));
    }

    #[test]
    fn pinned_reference_replaces_tag_or_digest() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = |reference: &str| ResolvedImage {
            kind: ImageKind::Kernel,
            reference: reference.into(),
            digest: digest.clone(),
            path: PathBuf::new(),
            disk_format: None,
            from_filesystem: false,
        };
        assert_eq!(
            r("127.0.0.1:5000/k/vmlinuz:v1").pinned_reference(),
            format!("127.0.0.1:5000/k/vmlinuz@{digest}")
        );
        assert_eq!(
            r("127.0.0.1:5000/k").pinned_reference(),
            format!("127.0.0.1:5000/k@{digest}")
        );
        assert_eq!(
            r(&format!("reg/k@sha256:{}", "b".repeat(64))).pinned_reference(),
            format!("reg/k@{digest}")
        );
    }

    #[test]
    fn agent_flags_set_the_cache_limit_and_insecure_registries() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            images: ImageArgs,
        }
        let cli = Cli::try_parse_from([
            "agent",
            "--image-cache-size",
            "5Gi",
            "--insecure-registry",
            "reg.lan:5000,mirror.lan",
            "--image-max-compressed",
            "1Gi",
            "--image-max-unpacked",
            "2Gi",
            "--image-max-entries",
            "1000",
        ])
        .expect("parse");
        let config = cli.images.config(Path::new("/var/lib/ignis"));
        assert_eq!(config.max_bytes, 5 << 30);
        assert_eq!(config.insecure_registries, ["reg.lan:5000", "mirror.lan"]);
        assert_eq!(config.root, Path::new("/var/lib/ignis/images"));
        assert_eq!(
            config.limits,
            extract::Limits {
                compressed_bytes: 1 << 30,
                unpacked_bytes: 2 << 30,
                entries: 1000
            }
        );
        let defaults = Cli::try_parse_from(["agent"]).expect("defaults");
        assert_eq!(defaults.images.cache_max_bytes, DEFAULT_CACHE_MAX_BYTES);
        assert_eq!(
            defaults.images.config(Path::new("/")).limits,
            extract::Limits::default()
        );
        assert!(Cli::try_parse_from(["agent", "--image-cache-size", "lots"]).is_err());
    }

    #[test]
    fn holders_are_safe_file_names() {
        assert!(check_holder("0b3c-uid_1.x").is_ok());
        for bad in ["", "..", ".hidden", "a/b", &"x".repeat(129)] {
            assert_eq!(
                check_holder(bad).expect_err(bad).reason(),
                "InvalidImageHolder"
            );
        }
    }
}
