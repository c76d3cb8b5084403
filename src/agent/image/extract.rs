//! Applying an image's tar layers to a scratch tree without trusting them (issue #19).
//!
//! A layer is attacker-chosen content unpacked by a root process, so:
//! - every directory an entry lands in is opened with `openat2(RESOLVE_IN_ROOT)` from a
//!   descriptor of the tree's root: a symlink at ANY component (absolute or with `..`) is
//!   resolved as if the tree were `/`, the way the image's own kernel would see it, and can never
//!   lead out; the entry itself is then created by name in that directory (`O_NOFOLLOW`,
//!   `O_EXCL`), so a symlink planted at the last component is replaced, never written through;
//! - entry paths with `..` or a leading `/` are refused outright;
//! - a hard link's target is resolved the same way, so it can only name a file of the tree;
//! - device nodes are dropped (a guest disk needs none; `devtmpfs` makes them at boot), and so
//!   are the setuid and setgid bits;
//! - the entries and unpacked bytes of all an image's layers count against per-image limits
//!   ([`Limits`], agent flags), checked while unpacking so a decompression bomb stops at the
//!   limit instead of filling the node's disk.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use flate2::read::GzDecoder;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, openat, openat2};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat, futimens, mkdirat, mknodat};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use thiserror::Error;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
/// Directories deeper than this are refused (removal and resolution recurse over them).
const MAX_DEPTH: usize = 256;

/// Default per-image limit of the compressed layers' bytes.
pub const DEFAULT_MAX_COMPRESSED: u64 = 4 << 30;
/// Default per-image limit of the bytes the layers unpack to.
pub const DEFAULT_MAX_UNPACKED: u64 = 16 << 30;
/// Default per-image limit of tar entries over all layers.
pub const DEFAULT_MAX_ENTRIES: u64 = 500_000;

/// A layer's compression, from its media type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// What one image may cost the node, over all its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of the layer blobs as downloaded.
    pub compressed_bytes: u64,
    /// Bytes of the files the layers unpack to.
    pub unpacked_bytes: u64,
    /// Tar entries.
    pub entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            compressed_bytes: DEFAULT_MAX_COMPRESSED,
            unpacked_bytes: DEFAULT_MAX_UNPACKED,
            entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// What an image has used of its [`Limits`] so far (carried from layer to layer).
#[derive(Clone, Debug)]
pub struct Budget {
    limits: Limits,
    unpacked: u64,
    entries: u64,
}

impl Budget {
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            unpacked: 0,
            entries: 0,
        }
    }

    fn entry(&mut self) -> Result<(), LayerError> {
        self.entries += 1;
        if self.entries > self.limits.entries {
            return Err(LayerError::TooManyEntries {
                limit: self.limits.entries,
            });
        }
        Ok(())
    }

    fn bytes(&mut self, n: u64) -> Result<(), LayerError> {
        self.unpacked = self.unpacked.saturating_add(n);
        if self.unpacked > self.limits.unpacked_bytes {
            return Err(LayerError::TooLarge {
                limit: self.limits.unpacked_bytes,
            });
        }
        Ok(())
    }
}

/// Why a layer could not be applied.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum LayerError {
    #[error("entry {path:?} {problem}")]
    #[strum(serialize = "ImageUnsafeEntry")]
    Unsafe { path: String, problem: &'static str },
    #[error("the image unpacks to more than {limit} bytes (the agent's --image-max-unpacked)")]
    #[strum(serialize = "ImageTooLarge")]
    TooLarge { limit: u64 },
    #[error("the image has more than {limit} entries (the agent's --image-max-entries)")]
    #[strum(serialize = "ImageTooLarge")]
    TooManyEntries { limit: u64 },
    #[error("{0}")]
    #[strum(serialize = "ImageLayerIoError")]
    Io(#[from] io::Error),
}

impl From<Errno> for LayerError {
    fn from(e: Errno) -> Self {
        LayerError::Io(e.into())
    }
}

impl LayerError {
    /// A limit was hit (not a malformed layer).
    pub fn is_limit(&self) -> bool {
        matches!(
            self,
            LayerError::TooLarge { .. } | LayerError::TooManyEntries { .. }
        )
    }
}

fn unsafe_entry(path: &Path, problem: &'static str) -> LayerError {
    LayerError::Unsafe {
        path: path.display().to_string(),
        problem,
    }
}

/// Apply one layer (a tar, maybe gzipped) over `root`, counting against `budget`. Blocking.
pub fn apply_layer(
    root: &Path,
    blob: &Path,
    compression: Compression,
    budget: &mut Budget,
) -> Result<(), LayerError> {
    let file = File::open(blob)?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(io::BufReader::new(file)),
        Compression::Gzip => Box::new(GzDecoder::new(io::BufReader::new(file))),
    };
    let root = open_dir_plain(root)?;
    let mut archive = tar::Archive::new(reader);
    // Paths of this layer's own entries: an opaque whiteout hides only lower layers.
    let mut created: HashSet<PathBuf> = HashSet::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        budget.entry()?;
        let raw = entry.path()?.into_owned();
        let rel = clean_relative(&raw).ok_or_else(|| unsafe_entry(&raw, "leaves the image"))?;
        if rel.components().count() > MAX_DEPTH {
            return Err(unsafe_entry(&raw, "is nested too deep"));
        }
        let (Some(name), parent) = (rel.file_name(), rel.parent().unwrap_or(Path::new(""))) else {
            continue;
        };
        let name = name.to_os_string();
        let kind = entry.header().entry_type();
        if kind.is_character_special() || kind.is_block_special() {
            tracing::debug!(path = %rel.display(), "device node in an image layer dropped");
            continue;
        }
        let dir = ensure_dir(&root, parent)?;
        if name == OPAQUE {
            clear_lower(&dir, parent, &created)?;
            continue;
        }
        if let Some(hidden) = name.to_str().and_then(|n| n.strip_prefix(WHITEOUT)) {
            remove_at(&dir, OsStr::new(hidden), 0)?;
            continue;
        }
        let header = entry.header();
        let mode = Mode::from_bits_truncate(header.mode()? & 0o1777);
        let owner = (
            Uid::from_raw(header.uid()? as u32),
            Gid::from_raw(header.gid()? as u32),
        );
        let mtime = header.mtime()?;
        if kind.is_dir() {
            make_dir(&dir, &name, mode, owner)?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name()?
                .ok_or_else(|| unsafe_entry(&rel, "is a symlink without a target"))?
                .into_owned();
            remove_at(&dir, &name, 0)?;
            symlinkat(target.as_os_str(), &dir, name.as_os_str())?;
            fchownat(
                &dir,
                name.as_os_str(),
                Some(owner.0),
                Some(owner.1),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        } else if kind.is_hard_link() {
            let raw_target = entry
                .link_name()?
                .ok_or_else(|| unsafe_entry(&rel, "is a hard link without a target"))?
                .into_owned();
            let target = clean_relative(&raw_target).ok_or_else(|| {
                unsafe_entry(&raw_target, "is a hard link target out of the image")
            })?;
            let (Some(tname), tparent) =
                (target.file_name(), target.parent().unwrap_or(Path::new("")))
            else {
                return Err(unsafe_entry(&rel, "links to the image's root"));
            };
            let tdir = open_in_root(&root, tparent, OFlag::O_DIRECTORY)?;
            remove_at(&dir, &name, 0)?;
            // No AT_SYMLINK_FOLLOW: a symlink is linked as itself, never its target.
            linkat(&tdir, tname, &dir, name.as_os_str(), AtFlags::empty())?;
        } else if kind.is_fifo() {
            remove_at(&dir, &name, 0)?;
            mknodat(
                &dir,
                name.as_os_str(),
                SFlag::S_IFIFO,
                mode & Mode::from_bits_truncate(0o777),
                0,
            )?;
            fchownat(
                &dir,
                name.as_os_str(),
                Some(owner.0),
                Some(owner.1),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        } else if kind.is_file()
            || kind == tar::EntryType::Continuous
            || kind == tar::EntryType::GNUSparse
        {
            remove_at(&dir, &name, 0)?;
            let fd = openat(
                &dir,
                name.as_os_str(),
                OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_WRONLY
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            let mut out = File::from(fd);
            copy_counted(&mut entry, &mut out, budget)?;
            fchown(&out, Some(owner.0), Some(owner.1))?;
            // After chown, which clears set-id bits anyway; the mask drops them regardless.
            fchmod(&out, mode & Mode::from_bits_truncate(0o777))?;
            let t = TimeSpec::new(mtime as i64, 0);
            futimens(&out, &t, &t)?;
        } else {
            // pax/GNU metadata the tar crate did not fold into an entry: nothing to create.
            continue;
        }
        created.insert(rel);
    }
    Ok(())
}

/// Copy a file's bytes, stopping as soon as the image's unpacked limit is passed.
fn copy_counted(
    src: &mut impl Read,
    dst: &mut File,
    budget: &mut Budget,
) -> Result<(), LayerError> {
    let mut buf = vec![0u8; 128 << 10];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        budget.bytes(n as u64)?;
        dst.write_all(&buf[..n])?;
    }
}

/// A tar path as plain components (`./a/b` → `a/b`); `None` when it leaves the root.
pub(crate) fn clean_relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

fn open_dir_plain(p: &Path) -> io::Result<OwnedFd> {
    Ok(openat(
        nix::fcntl::AT_FDCWD,
        p,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Open `rel` in the tree of `root` as if `root` were `/`: symlinks at every component,
/// absolute or with `..`, stay inside; `/proc` magic links and other mounts are refused.
pub(crate) fn open_in_root(root: &OwnedFd, rel: &Path, flags: OFlag) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(
            ResolveFlag::RESOLVE_IN_ROOT
                | ResolveFlag::RESOLVE_NO_MAGICLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        );
    openat2(root, rel, how)
}

/// The real path of `rel` in the tree at `root` (its final component followed too), resolved
/// as [`open_in_root`] does; `None` when it does not exist.
pub(crate) fn resolve_in_root(root: &Path, rel: &str) -> Option<PathBuf> {
    let root_fd = open_dir_plain(root).ok()?;
    let rel = clean_relative(Path::new(rel.trim_start_matches('/')))?;
    let fd = open_in_root(&root_fd, &rel, OFlag::O_PATH).ok()?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let real_root = std::fs::canonicalize(root).ok()?;
    real.starts_with(&real_root).then_some(real)
}

/// The directory `rel` of the tree, made (0755, root-owned) where missing, every component
/// resolved in the root.
fn ensure_dir(root: &OwnedFd, rel: &Path) -> Result<OwnedFd, LayerError> {
    let mut dir = open_in_root(root, Path::new(""), OFlag::O_DIRECTORY)?;
    let mut prefix = PathBuf::new();
    for c in rel.components() {
        prefix.push(c);
        let next = match open_in_root(root, &prefix, OFlag::O_DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                match mkdirat(&dir, c.as_os_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                open_in_root(root, &prefix, OFlag::O_DIRECTORY).map_err(|e| match e {
                    Errno::ENOENT => {
                        unsafe_entry(&prefix, "is a dangling symlink used as a directory")
                    }
                    e => e.into(),
                })?
            }
            Err(Errno::ENOTDIR) => return Err(unsafe_entry(&prefix, "is not a directory")),
            Err(Errno::EXDEV | Errno::ELOOP) => {
                return Err(unsafe_entry(
                    &prefix,
                    "resolves through a loop or another mount",
                ));
            }
            Err(e) => return Err(e.into()),
        };
        dir = next;
    }
    Ok(dir)
}

fn make_dir(
    dir: &OwnedFd,
    name: &OsString,
    mode: Mode,
    owner: (Uid, Gid),
) -> Result<(), LayerError> {
    match fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {}
        Ok(_) => {
            remove_at(dir, name, 0)?;
            mkdirat(dir, name.as_os_str(), Mode::from_bits_truncate(0o700))?;
        }
        Err(Errno::ENOENT) => mkdirat(dir, name.as_os_str(), Mode::from_bits_truncate(0o700))?,
        Err(e) => return Err(e.into()),
    }
    let fd = openat(
        dir,
        name.as_os_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    fchown(&fd, Some(owner.0), Some(owner.1))?;
    fchmod(&fd, mode)?;
    Ok(())
}

/// An opaque whiteout: remove what lower layers put in `dir`, keeping this layer's entries.
fn clear_lower(dir: &OwnedFd, rel: &Path, created: &HashSet<PathBuf>) -> Result<(), LayerError> {
    for name in list(dir)? {
        if !created.contains(&rel.join(&name)) {
            remove_at(dir, &name, 0)?;
        }
    }
    Ok(())
}

fn list(dir: &OwnedFd) -> Result<Vec<OsString>, LayerError> {
    // The descriptor's own directory (its /proc link names it, whatever path led there).
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        out.push(e?.file_name());
    }
    Ok(out)
}

/// Remove `name` in `dir` whatever it is (a directory with its content), never following a
/// symlink; nothing there is fine.
fn remove_at(dir: &OwnedFd, name: &OsStr, depth: usize) -> Result<(), LayerError> {
    if depth > MAX_DEPTH {
        return Err(unsafe_entry(Path::new(name), "is nested too deep"));
    }
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR {
        let child = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        for n in list(&child)? {
            remove_at(&child, &n, depth + 1)?;
        }
        unlinkat(dir.as_fd(), name, UnlinkatFlags::RemoveDir)?;
    } else {
        unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir)?;
    }
    Ok(())
}

/// A blob download that fails once more than `limit` bytes arrive, whatever the manifest
/// declared; `passed` then says why the download failed.
pub(crate) struct CappedWriter<W> {
    inner: W,
    left: u64,
    passed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<W> CappedWriter<W> {
    pub(crate) fn new(
        inner: W,
        limit: u64,
        passed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        CappedWriter {
            inner,
            left: limit,
            passed,
        }
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for CappedWriter<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if buf.len() as u64 > self.left {
            self.passed.store(true, std::sync::atomic::Ordering::SeqCst);
            return std::task::Poll::Ready(Err(io::Error::other(
                "the image's compressed size limit was passed",
            )));
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.left -= *n as u64;
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "extract_tests.rs"]
mod tests;
