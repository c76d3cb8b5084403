//! A VM's own root disk over the shared cached one: a qcow2 overlay made by `qemu-img` for
//! QEMU (the cached disk is its read-only backing file), a reflink or sparse copy for Firecracker
//! and Cloud Hypervisor (Firecracker reads raw disks only, so a qcow2 is converted), or the
//! cached disk itself, shared read-only, for `readOnly: true`.
//!
//! The disk lives in the VM's directory as `rootfs.qcow2` or `rootfs.raw` and is made under a
//! temporary name then renamed, so it exists whole or not at all. It survives restarts of the
//! VM (the guest keeps what it wrote) and goes with the VM ([`VmDisk::remove`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::ImageError;
use super::tool;
use super::{DiskFormat, ResolvedImage};
use crate::api::Hypervisor;

/// Copies of large disks may take a while; they are still bounded.
const COPY_TIMEOUT: Duration = Duration::from_secs(1800);
impl VmDisk {
    /// The names a VM's own disk has in its directory.
    pub const FILE_NAMES: [&'static str; 2] = ["rootfs.qcow2", "rootfs.raw"];
}

/// How a backend takes its disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskBackend {
    /// QEMU: any format; writable disks are qcow2 overlays.
    Qemu,
    /// Firecracker: raw only.
    Firecracker,
    /// Cloud Hypervisor: raw or qcow2 read-only; writable disks are raw copies.
    CloudHypervisor,
}

impl DiskBackend {
    /// `None` for the simulated backend, which boots nothing.
    pub fn of(h: Hypervisor) -> Option<DiskBackend> {
        match h {
            Hypervisor::Qemu => Some(DiskBackend::Qemu),
            Hypervisor::Firecracker => Some(DiskBackend::Firecracker),
            Hypervisor::CloudHypervisor => Some(DiskBackend::CloudHypervisor),
            Hypervisor::Simulated => None,
        }
    }
}

/// What the VM's disk is made as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskPlan {
    /// The cached disk itself, read-only.
    Share,
    /// `qemu-img create -f qcow2 -b <cached>`.
    Overlay,
    /// `cp --reflink=auto --sparse=always`.
    Copy,
    /// `qemu-img convert -O raw`.
    ConvertToRaw,
}

/// The pure decision: how `backend` gets a disk of `format`.
pub fn plan(backend: DiskBackend, format: DiskFormat, read_only: bool) -> DiskPlan {
    match (backend, format, read_only) {
        (DiskBackend::Firecracker, DiskFormat::Qcow2, _) => DiskPlan::ConvertToRaw,
        (_, _, true) => DiskPlan::Share,
        (DiskBackend::Qemu, _, false) => DiskPlan::Overlay,
        (_, DiskFormat::Raw, false) => DiskPlan::Copy,
        (_, DiskFormat::Qcow2, false) => DiskPlan::ConvertToRaw,
    }
}

/// A VM's root disk, ready to hand to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmDisk {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// Attach read-only (QEMU `readonly=on`, Firecracker `is_read_only`, CH `readonly=on`).
    pub read_only: bool,
    /// The file belongs to the VM (removed with it); `false` for the shared cached disk.
    pub owned: bool,
    /// Under an overlay: the cached disk and its format.
    pub backing: Option<(PathBuf, DiskFormat)>,
}

impl VmDisk {
    /// Make (or find, after a restart) the VM's disk over `cached` in `vm_dir`.
    pub async fn prepare(
        cached: &ResolvedImage,
        vm_dir: &Path,
        backend: DiskBackend,
        read_only: bool,
    ) -> Result<VmDisk, ImageError> {
        let format = cached.disk_format.unwrap_or(DiskFormat::Raw);
        let how = plan(backend, format, read_only);
        if how == DiskPlan::Share {
            return Ok(VmDisk {
                path: cached.path.clone(),
                format,
                read_only: true,
                owned: false,
                backing: None,
            });
        }
        let out_format = if how == DiskPlan::Overlay {
            DiskFormat::Qcow2
        } else {
            DiskFormat::Raw
        };
        let path = vm_dir.join(format!("rootfs.{}", out_format.as_str()));
        let disk = VmDisk {
            path: path.clone(),
            format: out_format,
            read_only,
            owned: true,
            backing: (how == DiskPlan::Overlay).then(|| (cached.path.clone(), format)),
        };
        if path.is_file() {
            return Ok(disk);
        }
        let tmp = vm_dir.join(format!(".rootfs.{}.tmp", out_format.as_str()));
        let _ = std::fs::remove_file(&tmp);
        let result = make(how, cached, format, &tmp).await;
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            ImageError::Io {
                path: path.clone(),
                source: e,
            }
        })?;
        Ok(disk)
    }

    /// Remove the VM's own disk from `vm_dir` (never the shared cached one). Idempotent.
    pub fn remove(vm_dir: &Path) -> Result<(), ImageError> {
        for name in Self::FILE_NAMES {
            for p in [vm_dir.join(name), vm_dir.join(format!(".{name}.tmp"))] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ImageError::Io { path: p, source: e }),
                }
            }
        }
        Ok(())
    }
}

async fn make(
    how: DiskPlan,
    cached: &ResolvedImage,
    format: DiskFormat,
    tmp: &Path,
) -> Result<(), ImageError> {
    let src = cached.path.as_os_str();
    match how {
        DiskPlan::Share => Ok(()),
        DiskPlan::Overlay => {
            tool::run(
                "qemu-img",
                [
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    "-F".as_ref(),
                    format.as_str().as_ref(),
                    "-b".as_ref(),
                    src,
                    tmp.as_os_str(),
                ],
                COPY_TIMEOUT,
            )
            .await?;
            Ok(())
        }
        DiskPlan::Copy => {
            tool::run(
                "cp",
                [
                    "--reflink=auto".as_ref(),
                    "--sparse=always".as_ref(),
                    src,
                    tmp.as_os_str(),
                ],
                COPY_TIMEOUT,
            )
            .await?;
            writable(tmp)
        }
        DiskPlan::ConvertToRaw => {
            tool::run(
                "qemu-img",
                [
                    "convert".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    format.as_str().as_ref(),
                    "-O".as_ref(),
                    "raw".as_ref(),
                    src,
                    tmp.as_os_str(),
                ],
                COPY_TIMEOUT,
            )
            .await?;
            writable(tmp)
        }
    }
}

/// The copy inherits the cache's 0444.
fn writable(p: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(ImageError::io(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_backend_gets_a_disk_it_can_open() {
        use DiskBackend::*;
        use DiskFormat::*;
        assert_eq!(plan(Qemu, Raw, false), DiskPlan::Overlay);
        assert_eq!(plan(Qemu, Qcow2, false), DiskPlan::Overlay);
        assert_eq!(plan(Qemu, Qcow2, true), DiskPlan::Share);
        assert_eq!(plan(Firecracker, Raw, false), DiskPlan::Copy);
        assert_eq!(plan(Firecracker, Raw, true), DiskPlan::Share);
        assert_eq!(plan(Firecracker, Qcow2, true), DiskPlan::ConvertToRaw);
        assert_eq!(plan(CloudHypervisor, Raw, false), DiskPlan::Copy);
        assert_eq!(plan(CloudHypervisor, Qcow2, false), DiskPlan::ConvertToRaw);
        assert_eq!(plan(CloudHypervisor, Qcow2, true), DiskPlan::Share);
        assert_eq!(DiskBackend::of(Hypervisor::Simulated), None);
    }
}
