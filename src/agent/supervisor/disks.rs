//! A run's files as the VMM gets them: the kernel and initrd (a node path, or the cached
//! artifact of an image), the root disk (a node path as is, or the VM's own disk over the
//! cached one: a qcow2 overlay for QEMU, a reflink or sparse copy for Firecracker and Cloud
//! Hypervisor, the cached disk itself for `readOnly: true`), and the cloud-init NoCloud drive
//! that carries `userData`, the instance id, the host name and, for static addresses, the
//! network configuration. All of them live in the VM's directory and go with the VM.

use std::path::{Path, PathBuf};

use super::*;
use crate::agent::cloud_init::{self, GuestInterface, NoCloudConfig, NoCloudDrive};
use crate::agent::image::{DiskBackend, DiskFormat, ImageKind, ResolvedImage, VmDisk};
use crate::agent::net::AttachedInterface;
use crate::agent::vmm::DiskConfig;
use crate::vm::{GuestFile, VmSpec};

/// Where the root disk comes from.
pub(super) enum RootDisk {
    /// A raw disk on the node, attached as is.
    Path(PathBuf),
    /// The cached disk of an image; the VM gets its own over it.
    Cached(ResolvedImage),
}

/// The guest's files for one run.
pub(super) struct GuestFiles {
    pub(super) kernel: PathBuf,
    pub(super) initrd: Option<PathBuf>,
    pub(super) rootfs: Option<RootDisk>,
}

impl GuestFiles {
    /// The spec's node paths, and the artifacts `images` resolved for its image references.
    pub(super) fn new(spec: &VmSpec, images: &[ResolvedImage]) -> GuestFiles {
        let cached = |kind: ImageKind| images.iter().find(|i| i.kind == kind);
        let file = |kind: ImageKind, file: &GuestFile| match file {
            GuestFile::Path(path) => PathBuf::from(path),
            GuestFile::Image(_) => cached(kind).map(|i| i.path.clone()).unwrap_or_default(),
        };
        GuestFiles {
            kernel: file(ImageKind::Kernel, &spec.kernel),
            initrd: spec.initrd.as_ref().map(|f| file(ImageKind::Initrd, f)),
            rootfs: spec.rootfs.as_ref().map(|f| match f {
                GuestFile::Path(path) => RootDisk::Path(PathBuf::from(path)),
                GuestFile::Image(_) => cached(ImageKind::Rootfs)
                    .cloned()
                    .map(RootDisk::Cached)
                    .unwrap_or_else(|| RootDisk::Path(PathBuf::new())),
            }),
        }
    }
}

/// The guest's host name: the VM's name when it is one (MicroVM names are DNS names), else
/// its uid.
pub(super) fn hostname(spec: &VmSpec) -> String {
    if cloud_init::is_valid_hostname(&spec.name) {
        spec.name.clone()
    } else {
        spec.uid.to_string()
    }
}

/// What the NoCloud drive tells the guest. Addresses the spec gives are static
/// (`network-config`); allocated ones come by DHCP, which cloud-init uses by default.
pub(super) fn nocloud_config(spec: &VmSpec, interfaces: &[AttachedInterface]) -> NoCloudConfig {
    NoCloudConfig {
        instance_id: spec.uid.to_string(),
        hostname: hostname(spec),
        user_data: spec.user_data.clone().unwrap_or_default(),
        interfaces: interfaces
            .iter()
            .map(|i| {
                // A pod's namespace runs no DHCP server: the guest's pod address is static.
                let fixed = i.mode == crate::api::InterfaceMode::Pod
                    || spec
                        .interfaces
                        .iter()
                        .any(|r| r.name == i.name && r.address.is_some());
                GuestInterface {
                    name: i.name.clone(),
                    mac: i.mac.clone(),
                    address: i.address.filter(|_| fixed),
                    gateway: i.gateway,
                    dns: i.dns.clone(),
                }
            })
            .collect(),
    }
}

impl Inner {
    /// The run's disks, made in `dir`: the root disk first, then the NoCloud drive when the
    /// guest has user data or boots a root disk (a disk-booted guest is where cloud-init
    /// lives). Nothing is made for the simulated VMM, which boots nothing.
    pub(super) async fn guest_disks(
        &self,
        spec: &VmSpec,
        hypervisor: Hypervisor,
        files: &GuestFiles,
        dir: &Path,
        interfaces: &[AttachedInterface],
    ) -> Result<Vec<DiskConfig>, BootError> {
        let backend = DiskBackend::of(hypervisor);
        let mut disks = Vec::new();
        match (&files.rootfs, backend) {
            (None, _) => {}
            (Some(RootDisk::Path(path)), _) => disks.push(DiskConfig {
                id: "rootfs".into(),
                path: path.clone(),
                format: DiskFormat::Raw,
                read_only: spec.rootfs_read_only,
                root: true,
                backing: None,
            }),
            (Some(RootDisk::Cached(cached)), Some(backend)) => {
                let disk = VmDisk::prepare(cached, dir, backend, spec.rootfs_read_only)
                    .await
                    .map_err(BootError::Image)?;
                disks.push(DiskConfig {
                    id: "rootfs".into(),
                    path: disk.path,
                    format: disk.format,
                    read_only: disk.read_only,
                    root: true,
                    backing: disk.backing,
                });
            }
            (Some(RootDisk::Cached(_)), None) => {}
        }
        let wants_drive = spec.user_data.is_some() || spec.rootfs.is_some();
        if wants_drive && backend.is_some() {
            let path = dir.join(cloud_init::DRIVE_FILE);
            let drive = NoCloudDrive::build(&nocloud_config(spec, interfaces), &path)
                .await
                .map_err(BootError::CloudInit)?;
            disks.push(DiskConfig {
                id: "cidata".into(),
                path: drive.path,
                format: DiskFormat::Raw,
                read_only: true,
                root: false,
                backing: None,
            });
        }
        Ok(disks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::InterfaceMode;
    use crate::vm::Interface;

    fn attached(name: &str, ip: &str) -> AttachedInterface {
        AttachedInterface {
            name: name.into(),
            mode: InterfaceMode::Nat,
            tap: "igx".into(),
            mac: "02:00:00:00:00:01".into(),
            bridge: "ignis0".into(),
            address: Some((ip.parse().expect("ip"), 16)),
            gateway: Some("10.88.0.1".parse().expect("gw")),
            dns: vec!["10.88.0.1".parse().expect("dns")],
            reachable_at: None,
        }
    }

    #[test]
    fn only_addresses_the_spec_gives_are_static_for_cloud_init() {
        let spec = VmSpec {
            name: "web-0".into(),
            user_data: Some("#cloud-config\n".into()),
            interfaces: vec![
                Interface {
                    name: "eth0".into(),
                    ..Default::default()
                },
                Interface {
                    name: "eth1".into(),
                    address: Some("10.88.0.9/16".into()),
                    ..Default::default()
                },
            ],
            ..crate::testing::vm_spec("uid-1")
        };
        let config = nocloud_config(
            &spec,
            &[attached("eth0", "10.88.0.5"), attached("eth1", "10.88.0.9")],
        );
        assert_eq!(config.instance_id, "uid-1");
        assert_eq!(config.hostname, "web-0");
        assert_eq!(config.user_data, "#cloud-config\n");
        assert_eq!(config.interfaces[0].address, None, "allocated: DHCP");
        assert_eq!(
            config.interfaces[1].address,
            Some(("10.88.0.9".parse().expect("ip"), 16))
        );
        let unnamed = VmSpec {
            name: "not_a_host".into(),
            ..spec
        };
        assert_eq!(hostname(&unnamed), "uid-1");
    }

    #[test]
    fn files_come_from_paths_or_the_resolved_images() {
        let spec = VmSpec {
            kernel: GuestFile::Image("reg/k:1".into()),
            initrd: Some(GuestFile::Path("/i".into())),
            rootfs: Some(GuestFile::Image("reg/r:1".into())),
            ..crate::testing::vm_spec("u")
        };
        let image = |kind, path: &str| ResolvedImage {
            kind,
            reference: String::new(),
            digest: String::new(),
            path: path.into(),
            disk_format: Some(DiskFormat::Qcow2),
            from_filesystem: false,
        };
        let files = GuestFiles::new(
            &spec,
            &[
                image(ImageKind::Kernel, "/cache/vmlinuz"),
                image(ImageKind::Rootfs, "/cache/disk.qcow2"),
            ],
        );
        assert_eq!(files.kernel, Path::new("/cache/vmlinuz"));
        assert_eq!(files.initrd.as_deref(), Some(Path::new("/i")));
        assert!(matches!(
            files.rootfs,
            Some(RootDisk::Cached(ref r)) if r.path == Path::new("/cache/disk.qcow2")
        ));
    }
}
