//! From an image's layers to the one artifact a VM boots: layers are applied in order into a
//! scratch tree (OCI whiteouts honoured), then the kind's layout is read from it —
//! `/boot/vmlinuz` (kernel), `/boot/initrd.img` (initrd), one disk file under `/disk/` (rootfs,
//! KubeVirt's containerDisk convention; raw or qcow2) or else the whole tree as an ext4 disk
//! made by `mkfs.ext4 -d`.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use super::extract::Compression;
use super::extract::resolve_in_root;
use super::tool;
use super::{DiskFormat, ImageKind};

/// How long `mkfs.ext4` and `qemu-img info` may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(600);
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";

/// The media types of tar layers we can apply (OCI and Docker); `None` for any other.
pub fn compression_of(media_type: &str) -> Option<Compression> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Some(Compression::Gzip),
        _ => None,
    }
}

/// The artifact made from an image, inside the staging directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Artifact {
    /// File name inside the entry directory.
    pub file: String,
    pub disk_format: Option<DiskFormat>,
    pub from_filesystem: bool,
}

/// A layout problem: the message of `ImageError::BadLayout`.
pub type LayoutProblem = String;

/// A regular, non-empty file at `rel` in the image.
fn regular_file(root: &Path, rel: &str) -> Result<PathBuf, LayoutProblem> {
    let p = resolve_in_root(root, rel).ok_or_else(|| format!("/{rel} is missing"))?;
    let m = fs::metadata(&p).map_err(|_| format!("/{rel} is missing"))?;
    if !m.is_file() {
        return Err(format!("/{rel} is not a regular file"));
    }
    if m.len() == 0 {
        return Err(format!("/{rel} is empty"));
    }
    Ok(p)
}

fn head(p: &Path, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    let got = File::open(p).and_then(|mut f| {
        let mut total = 0;
        while total < n {
            let k = f.read(&mut buf[total..])?;
            if k == 0 {
                break;
            }
            total += k;
        }
        Ok(total)
    });
    buf.truncate(got.unwrap_or(0));
    buf
}

/// An x86 bzImage (`HdrS` at 0x202) or an ELF `vmlinux` (what Firecracker boots).
pub fn looks_like_kernel(bytes: &[u8]) -> bool {
    bytes.starts_with(b"\x7fELF") || bytes.get(0x202..0x206) == Some(b"HdrS")
}

/// Raw unless it carries the qcow2 magic.
pub fn disk_format_of(bytes: &[u8]) -> DiskFormat {
    if bytes.starts_with(QCOW2_MAGIC) {
        DiskFormat::Qcow2
    } else {
        DiskFormat::Raw
    }
}

/// Read the kind's layout out of the applied tree `root` and leave the artifact in `out`.
/// `free_bytes` is the room a filesystem-made ext4 disk gets beyond its content.
pub async fn build_artifact(
    kind: ImageKind,
    root: &Path,
    out: &Path,
    free_bytes: u64,
) -> Result<Result<Artifact, LayoutProblem>, tool::ToolError> {
    let moved = |src: &Path, name: &str| -> Result<Artifact, LayoutProblem> {
        fs::rename(src, out.join(name)).map_err(|e| format!("cannot move {name}: {e}"))?;
        Ok(Artifact {
            file: name.to_string(),
            disk_format: None,
            from_filesystem: false,
        })
    };
    match kind {
        ImageKind::Kernel => {
            let p = match regular_file(root, "boot/vmlinuz") {
                Ok(p) => p,
                Err(e) => return Ok(Err(e)),
            };
            if !looks_like_kernel(&head(&p, 0x206)) {
                return Ok(Err(
                    "/boot/vmlinuz is neither a bzImage nor an ELF vmlinux".into()
                ));
            }
            Ok(moved(&p, "vmlinuz"))
        }
        ImageKind::Initrd => match regular_file(root, "boot/initrd.img") {
            Ok(p) => Ok(moved(&p, "initrd.img")),
            Err(e) => Ok(Err(e)),
        },
        ImageKind::Rootfs => {
            let disk_dir = root.join("disk");
            if fs::symlink_metadata(&disk_dir).is_ok_and(|m| m.is_dir()) {
                container_disk(&disk_dir, out).await
            } else {
                filesystem_disk(root, out, free_bytes).await
            }
        }
    }
}

/// `/disk/` must hold exactly one regular file; a qcow2 may not name a backing or data file
/// (it would read the node's files).
async fn container_disk(
    disk_dir: &Path,
    out: &Path,
) -> Result<Result<Artifact, LayoutProblem>, tool::ToolError> {
    let files: Vec<PathBuf> = fs::read_dir(disk_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    let [disk] = files.as_slice() else {
        return Ok(Err(format!(
            "/disk/ must hold exactly one disk file, it holds {}",
            files.len()
        )));
    };
    let m = fs::symlink_metadata(disk).map_err(|_| ()).ok();
    if !m.as_ref().is_some_and(|m| m.is_file() && m.len() > 0) {
        return Ok(Err(format!(
            "{} is not a non-empty regular file",
            Path::new("/disk")
                .join(disk.file_name().unwrap_or_default())
                .display()
        )));
    }
    let format = disk_format_of(&head(disk, 4));
    if format == DiskFormat::Qcow2 {
        let info = tool::run(
            "qemu-img",
            [
                "info".as_ref(),
                "--output=json".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                disk.as_os_str(),
            ],
            TOOL_TIMEOUT,
        )
        .await?;
        if let Some(problem) = qcow2_problem(&info) {
            return Ok(Err(problem));
        }
    }
    let name = format!("disk.{}", format.as_str());
    fs::rename(disk, out.join(&name)).map_err(|e| tool::ToolError::Missing {
        tool: "rename",
        source: e,
    })?;
    Ok(Ok(Artifact {
        file: name,
        disk_format: Some(format),
        from_filesystem: false,
    }))
}

/// What makes a qcow2 from an image unsafe or unusable, from `qemu-img info --output=json`.
pub fn qcow2_problem(info_json: &str) -> Option<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(info_json) else {
        return Some("qemu-img cannot read the qcow2 header".into());
    };
    if v.get("backing-filename").is_some() || v.get("full-backing-filename").is_some() {
        return Some("the qcow2 disk names a backing file; flatten it first".into());
    }
    if v["format-specific"]["data"]["data-file"].is_string() {
        return Some("the qcow2 disk uses an external data file".into());
    }
    None
}

/// Bytes and inodes the tree needs (4 KiB blocks).
fn tree_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            inodes += 1;
            bytes += m.len().div_ceil(4096) * 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

/// The image's whole filesystem as a sparse ext4 disk.
async fn filesystem_disk(
    root: &Path,
    out: &Path,
    free_bytes: u64,
) -> Result<Result<Artifact, LayoutProblem>, tool::ToolError> {
    let (used, inodes) = tree_usage(root);
    if inodes == 0 {
        return Ok(Err("the image's filesystem is empty".into()));
    }
    // Content, 10% for metadata, a journal, and the room asked for; whole MiB.
    let size = (used + used / 10 + inodes * 512 + (64 << 20) + free_bytes).div_ceil(1 << 20);
    let disk = out.join("disk.raw");
    let root_meta = fs::metadata(root).map_err(|e| tool::ToolError::Missing {
        tool: "stat",
        source: e,
    })?;
    tool::run(
        "mkfs.ext4",
        [
            "-q".into(),
            "-F".into(),
            "-L".into(),
            "rootfs".into(),
            "-N".into(),
            (inodes + 16384).to_string().into(),
            "-E".into(),
            format!("root_owner={}:{}", root_meta.uid(), root_meta.gid()).into(),
            "-d".into(),
            root.as_os_str().to_owned(),
            disk.as_os_str().to_owned(),
            format!("{size}M").into(),
        ] as [std::ffi::OsString; 12],
        TOOL_TIMEOUT,
    )
    .await?;
    Ok(Ok(Artifact {
        file: "disk.raw".into(),
        disk_format: Some(DiskFormat::Raw),
        from_filesystem: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let canonical = fs::canonicalize(dir.path()).expect("canonical");
        let root = canonical.as_path();
        fs::create_dir_all(root.join("boot")).expect("boot");
        fs::write(root.join("boot/vmlinuz-6.1"), b"k").expect("kernel");
        std::os::unix::fs::symlink("vmlinuz-6.1", root.join("boot/vmlinuz")).expect("rel");
        std::os::unix::fs::symlink("/boot/vmlinuz", root.join("vmlinuz")).expect("abs");
        std::os::unix::fs::symlink("../../../../x", root.join("up")).expect("up");
        assert_eq!(
            resolve_in_root(root, "vmlinuz"),
            Some(root.join("boot/vmlinuz-6.1"))
        );
        assert_eq!(resolve_in_root(root, "up"), None);
        // A symlink at a middle component, absolute or climbing, stays in the image.
        fs::create_dir_all(root.join("etc")).expect("etc");
        fs::write(root.join("etc/passwd"), b"image's own").expect("passwd");
        std::os::unix::fs::symlink("/", root.join("abs")).expect("abs dir");
        std::os::unix::fs::symlink("../../..", root.join("boot/climb")).expect("climb");
        let own = Some(root.join("etc/passwd"));
        assert_eq!(resolve_in_root(root, "abs/etc/passwd"), own);
        assert_eq!(resolve_in_root(root, "boot/climb/etc/passwd"), own);
        assert_eq!(resolve_in_root(root, "abs/proc/self/root/etc/shadow"), None);
    }

    #[test]
    fn recognizes_kernels_disks_and_media_types() {
        let mut bz = vec![0u8; 0x210];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert!(looks_like_kernel(&bz));
        assert!(looks_like_kernel(b"\x7fELF\x02\x01"));
        assert!(!looks_like_kernel(b"#!/bin/sh\n"));
        assert_eq!(disk_format_of(b"QFI\xfb\0\0\0\x03"), DiskFormat::Qcow2);
        assert_eq!(disk_format_of(b"\0\0\0\0"), DiskFormat::Raw);
        assert_eq!(
            compression_of("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            compression_of("application/vnd.oci.image.layer.v1.tar+zstd"),
            None
        );
        assert!(qcow2_problem(r#"{"format":"qcow2","backing-filename":"/etc/shadow"}"#).is_some());
        assert!(qcow2_problem(r#"{"format":"qcow2","virtual-size":1}"#).is_none());
    }
}
