//! The node's content-addressed image cache on disk, shared by every VM and every agent run:
//!
//! ```text
//! <root>/entries/<kind>/<hex>/   entry.json + the artifact (vmlinuz, initrd.img, disk.raw|qcow2)
//! <root>/staging/<kind>-<hex>.<pid>.<n>/   a pull in progress (never read as an entry)
//! <root>/leases/<holder>/<kind>-<hex>      the holder (a VM uid) uses that entry
//! <root>/locks/<kind>-<hex>.lock, gc.lock  flock(2) locks
//! <root>/trash/                            entries being deleted
//! ```
//!
//! An entry appears by one `rename` of a complete staging directory, so a reader or a crash
//! sees a whole entry or none. One pull per entry runs at a time, across threads and agent
//! processes (an exclusive flock per entry); a second puller waits and then finds the entry.
//! Leasing and publishing hold `gc.lock` shared, garbage collection holds it exclusive, so an
//! entry is never removed between being found and being leased.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::error::ImageError;
use super::{DiskFormat, ImageKind};
use crate::agent::atomic_file::write_atomically;

const ENTRY_FILE: &str = "entry.json";
const LOCK_POLL: Duration = Duration::from_millis(25);

/// Which cache entry: the kind (its layout) and the manifest digest's hex.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryKey {
    pub kind: ImageKind,
    /// Lower-case hex of the sha256 manifest digest.
    pub hex: String,
}

impl EntryKey {
    /// From a `sha256:<hex>` digest.
    pub fn new(kind: ImageKind, digest: &str) -> Option<EntryKey> {
        let hex = digest.strip_prefix("sha256:")?;
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| EntryKey {
            kind,
            hex: hex.to_ascii_lowercase(),
        })
    }

    /// `kernel-<hex>`: lock, lease and staging names.
    pub fn name(&self) -> String {
        format!("{}-{}", self.kind.as_str(), self.hex)
    }

    fn parse_name(name: &str) -> Option<EntryKey> {
        let (kind, hex) = name.split_once('-')?;
        EntryKey::new(kind.parse().ok()?, &format!("sha256:{hex}"))
    }

    pub fn digest(&self) -> String {
        format!("sha256:{}", self.hex)
    }
}

/// What `entry.json` records about an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryRecord {
    pub kind: ImageKind,
    /// The manifest digest (`sha256:...`).
    pub digest: String,
    /// The reference it was first pulled by (informational).
    pub reference: String,
    /// The artifact's file name inside the entry directory.
    pub artifact: String,
    /// Rootfs only: the disk's format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_format: Option<DiskFormat>,
    /// Rootfs only: the disk was made from the image's filesystem (`mkfs.ext4 -d`).
    #[serde(default)]
    pub from_filesystem: bool,
    /// Pulled without credentials: anyone may have it. A private entry (and an entry recorded
    /// before this field existed) is served from the cache only after the registry accepts the
    /// requester's own credentials for it (KEP-2535's rule for the kubelet).
    #[serde(default)]
    pub public: bool,
}

/// One entry as GC and listings see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryInfo {
    pub key: EntryKey,
    /// Bytes allocated on disk (sparse disks count what they use).
    pub bytes: u64,
    pub last_used: SystemTime,
    /// Holders that lease it.
    pub holders: Vec<String>,
}

/// What a garbage collection removed and kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub removed: Vec<EntryKey>,
    pub freed_bytes: u64,
    /// Bytes still used by entries after the collection.
    pub kept_bytes: u64,
}

/// The entries to remove so the cache fits in `limit` bytes: least recently used first,
/// never one with a holder. May leave the cache over the limit when leased entries fill it.
pub fn plan_gc(entries: &[EntryInfo], limit: u64) -> Vec<EntryKey> {
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    let mut candidates: Vec<&EntryInfo> = entries.iter().filter(|e| e.holders.is_empty()).collect();
    candidates.sort_by_key(|e| (e.last_used, e.key.clone()));
    let mut out = Vec::new();
    for e in candidates {
        if total <= limit {
            break;
        }
        total = total.saturating_sub(e.bytes);
        out.push(e.key.clone());
    }
    out
}

/// A held flock; released on drop.
pub(crate) struct FileLock {
    _lock: Flock<File>,
}

/// The lock leases and publishing hold shared and garbage collection exclusive.
const GC_LOCK: &str = "gc";

/// Paths and locked operations on the cache directory.
#[derive(Clone, Debug)]
pub(crate) struct CacheDir {
    root: PathBuf,
}

impl CacheDir {
    /// Create the directory tree and clear staging directories no pull owns any more.
    pub(crate) async fn open(root: &Path) -> Result<CacheDir, ImageError> {
        let dir = CacheDir {
            root: root.to_path_buf(),
        };
        for sub in ["entries", "staging", "leases", "locks", "trash"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(ImageError::io(&p))?;
        }
        for kind in ImageKind::ALL {
            let p = dir.kind_dir(kind);
            fs::create_dir_all(&p).map_err(ImageError::io(&p))?;
        }
        // Every lease and every collection takes it: made with the tree, it is part of the
        // cache from the start instead of appearing at the first release.
        let gc = dir.lock_path(GC_LOCK);
        OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&gc)
            .map_err(ImageError::io(&gc))?;
        dir.clear_abandoned().await?;
        Ok(dir)
    }

    fn kind_dir(&self, kind: ImageKind) -> PathBuf {
        self.root.join("entries").join(kind.as_str())
    }

    pub(crate) fn entry_dir(&self, key: &EntryKey) -> PathBuf {
        self.kind_dir(key.kind).join(&key.hex)
    }

    fn lease_dir(&self, holder: &str) -> PathBuf {
        self.root.join("leases").join(holder)
    }

    /// A new, empty staging directory for `key`.
    pub(crate) fn new_staging(&self, key: &EntryKey) -> Result<PathBuf, ImageError> {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = self.root.join("staging").join(format!(
            "{}.{}.{}",
            key.name(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&p).map_err(ImageError::io(&p))?;
        Ok(p)
    }

    /// Staging and trash left by a crashed pull or collection: staging whose entry lock is
    /// free has no owner (the owner holds the lock for the whole pull).
    async fn clear_abandoned(&self) -> Result<(), ImageError> {
        let staging = self.root.join("staging");
        for name in list_names(&staging)? {
            let Some(key) = name.split('.').next().and_then(EntryKey::parse_name) else {
                remove_tree(&staging.join(&name));
                continue;
            };
            if let Some(_lock) = self.try_lock_entry(&key)? {
                remove_tree(&staging.join(&name));
            }
        }
        let trash = self.root.join("trash");
        for name in list_names(&trash)? {
            remove_tree(&trash.join(name));
        }
        Ok(())
    }

    fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(format!("{name}.lock"))
    }

    fn try_lock(&self, name: &str, arg: FlockArg) -> Result<Option<FileLock>, ImageError> {
        let path = self.lock_path(name);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(ImageError::io(&path))?;
        match Flock::lock(file, arg) {
            Ok(lock) => Ok(Some(FileLock { _lock: lock })),
            Err((_, Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, errno)) => Err(ImageError::Io {
                path,
                source: errno.into(),
            }),
        }
    }

    fn try_lock_entry(&self, key: &EntryKey) -> Result<Option<FileLock>, ImageError> {
        self.try_lock(&key.name(), FlockArg::LockExclusiveNonblock)
    }

    /// Wait for a lock without blocking a thread; dropping the future gives up cleanly.
    async fn lock(&self, name: &str, arg: FlockArg) -> Result<FileLock, ImageError> {
        loop {
            if let Some(l) = self.try_lock(name, arg)? {
                return Ok(l);
            }
            tokio::time::sleep(LOCK_POLL).await;
        }
    }

    /// The exclusive right to pull `key`.
    pub(crate) async fn lock_entry(&self, key: &EntryKey) -> Result<FileLock, ImageError> {
        self.lock(&key.name(), FlockArg::LockExclusiveNonblock)
            .await
    }

    async fn gc_shared(&self) -> Result<FileLock, ImageError> {
        self.lock(GC_LOCK, FlockArg::LockSharedNonblock).await
    }

    async fn gc_exclusive(&self) -> Result<FileLock, ImageError> {
        self.lock(GC_LOCK, FlockArg::LockExclusiveNonblock).await
    }

    /// The entry's record when it is complete; leases nothing.
    pub(crate) fn read_record(&self, key: &EntryKey) -> Option<EntryRecord> {
        let bytes = fs::read(self.entry_dir(key).join(ENTRY_FILE)).ok()?;
        let record: EntryRecord = serde_json::from_slice(&bytes).ok()?;
        let artifact = self.entry_dir(key).join(&record.artifact);
        (record.kind == key.kind && record.digest == key.digest() && artifact.is_file())
            .then_some(record)
    }

    /// If the entry is complete, lease it to `holder`, mark it used, and return its record.
    pub(crate) async fn lease_if_present(
        &self,
        key: &EntryKey,
        holder: &str,
    ) -> Result<Option<EntryRecord>, ImageError> {
        let _gc = self.gc_shared().await?;
        let Some(record) = self.read_record(key) else {
            return Ok(None);
        };
        self.add_lease(key, holder)?;
        touch(&self.entry_dir(key).join(ENTRY_FILE));
        Ok(Some(record))
    }

    /// Move a complete staging directory (holding `entry.json` and the artifact) into place
    /// and lease it. The caller holds the entry's lock.
    pub(crate) async fn publish(
        &self,
        staging: &Path,
        key: &EntryKey,
        record: &EntryRecord,
        holder: &str,
    ) -> Result<(), ImageError> {
        let entry_file = staging.join(ENTRY_FILE);
        let json = serde_json::to_vec_pretty(record).unwrap_or_default();
        write_atomically(&entry_file, &json).map_err(ImageError::io(&entry_file))?;
        sync_dir(staging);
        let _gc = self.gc_shared().await?;
        let target = self.entry_dir(key);
        if target.exists() {
            // A damaged entry (no record, or no artifact) is replaced, never merged into.
            let trash = self.trash_name(key);
            fs::rename(&target, &trash).map_err(ImageError::io(&target))?;
            remove_tree(&trash);
        }
        fs::rename(staging, &target).map_err(ImageError::io(&target))?;
        sync_dir(&self.kind_dir(key.kind));
        self.add_lease(key, holder)
    }

    /// Whether `holder` already leases the entry (it was allowed to have it then).
    pub(crate) fn holds(&self, key: &EntryKey, holder: &str) -> bool {
        self.lease_dir(holder).join(key.name()).exists()
    }

    fn add_lease(&self, key: &EntryKey, holder: &str) -> Result<(), ImageError> {
        let dir = self.lease_dir(holder);
        fs::create_dir_all(&dir).map_err(ImageError::io(&dir))?;
        let p = dir.join(key.name());
        File::create(&p).map_err(ImageError::io(&p))?;
        Ok(())
    }

    /// Drop every lease of `holder`. Idempotent.
    pub(crate) async fn release(&self, holder: &str) -> Result<(), ImageError> {
        let _gc = self.gc_shared().await?;
        let dir = self.lease_dir(holder);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ImageError::Io {
                path: dir,
                source: e,
            }),
        }
    }

    /// Every complete entry with its size, last use and holders.
    pub(crate) fn scan(&self) -> Result<Vec<EntryInfo>, ImageError> {
        let mut holders: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        let leases = self.root.join("leases");
        for holder in list_names(&leases)? {
            for lease in list_names(&leases.join(&holder))? {
                holders.entry(lease).or_default().push(holder.clone());
            }
        }
        let mut out = Vec::new();
        for kind in ImageKind::ALL {
            for hex in list_names(&self.kind_dir(kind))? {
                let Some(key) = EntryKey::new(kind, &format!("sha256:{hex}")) else {
                    continue;
                };
                let dir = self.entry_dir(&key);
                let last_used = fs::metadata(dir.join(ENTRY_FILE))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(EntryInfo {
                    bytes: allocated_bytes(&dir),
                    last_used,
                    holders: holders.remove(&key.name()).unwrap_or_default(),
                    key,
                });
            }
        }
        Ok(out)
    }

    /// Remove least recently used entries without holders until the cache fits in `limit`.
    pub(crate) async fn gc(&self, limit: u64) -> Result<GcReport, ImageError> {
        let _gc = self.gc_exclusive().await?;
        let entries = self.scan()?;
        let victims = plan_gc(&entries, limit);
        let mut report = GcReport::default();
        for key in &victims {
            let bytes = entries
                .iter()
                .find(|e| &e.key == key)
                .map(|e| e.bytes)
                .unwrap_or(0);
            let dir = self.entry_dir(key);
            let trash = self.trash_name(key);
            // Out of `entries/` in one step, so a crash mid-delete never leaves half an entry.
            fs::rename(&dir, &trash).map_err(ImageError::io(&dir))?;
            remove_tree(&trash);
            report.removed.push(key.clone());
            report.freed_bytes += bytes;
        }
        report.kept_bytes = entries
            .iter()
            .filter(|e| !victims.contains(&e.key))
            .map(|e| e.bytes)
            .sum();
        Ok(report)
    }

    fn trash_name(&self, key: &EntryKey) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        self.root.join("trash").join(format!(
            "{}.{}.{}",
            key.name(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

fn list_names(dir: &Path) -> Result<Vec<String>, ImageError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(ImageError::Io {
                path: dir.to_path_buf(),
                source: e,
            });
        }
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// Remove a tree whose files may be read-only (artifacts are 0444).
pub(crate) fn remove_tree(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove from the image cache");
    }
}

fn touch(path: &Path) {
    if let Ok(f) = File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

pub(crate) fn sync_dir(path: &Path) {
    if let Ok(d) = File::open(path) {
        let _ = d.sync_all();
    }
}

/// Bytes allocated to the files under `dir` (st_blocks), so sparse disks count what they use.
pub(crate) fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(kind: ImageKind, c: char) -> EntryKey {
        EntryKey::new(kind, &format!("sha256:{}", c.to_string().repeat(64))).expect("key")
    }

    fn info(k: EntryKey, bytes: u64, age_secs: u64, holders: &[&str]) -> EntryInfo {
        EntryInfo {
            key: k,
            bytes,
            last_used: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_secs),
            holders: holders.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn gc_removes_least_recently_used_unleased_until_under_the_limit() {
        let a = key(ImageKind::Rootfs, 'a');
        let b = key(ImageKind::Rootfs, 'b');
        let c = key(ImageKind::Kernel, 'c');
        let d = key(ImageKind::Initrd, 'd');
        let entries = vec![
            info(a.clone(), 100, 50, &[]),
            info(b.clone(), 100, 500, &["vm-1"]),
            info(c.clone(), 100, 400, &[]),
            info(d.clone(), 100, 10, &[]),
        ];
        assert_eq!(plan_gc(&entries, 400), Vec::<EntryKey>::new());
        assert_eq!(plan_gc(&entries, 250), vec![c.clone(), a.clone()]);
        // Leased entries stay even when the limit cannot be met.
        assert_eq!(plan_gc(&entries, 0), vec![c, a, d]);
    }

    #[test]
    fn keys_round_trip_through_names_and_refuse_bad_digests() {
        let k = key(ImageKind::Initrd, 'f');
        assert_eq!(EntryKey::parse_name(&k.name()), Some(k.clone()));
        assert_eq!(k.digest(), format!("sha256:{}", "f".repeat(64)));
        assert!(EntryKey::new(ImageKind::Kernel, "sha256:abc").is_none());
        assert!(EntryKey::new(ImageKind::Kernel, &format!("md5:{}", "a".repeat(64))).is_none());
        assert!(EntryKey::new(ImageKind::Kernel, &format!("sha256:{}", "g".repeat(64))).is_none());
    }
}
