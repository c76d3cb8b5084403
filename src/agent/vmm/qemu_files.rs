//! How a confined QEMU gets its files: every one is opened by the agent and handed over as an
//! inherited descriptor, so QEMU, running as the VM's own unprivileged uid, needs no path at
//! all (the VM's state directory, the image cache and the admin's guest directories stay
//! root's, 0700) and cannot be pointed at another file.
//!
//! - QMP: a unix socket the agent binds and listens on, given as `-chardev socket,fd=N`.
//! - console: `-add-fd` into an fd set, `-chardev file,path=/dev/fdset/S`.
//! - disks: `-blockdev` nodes on `/dev/fdset/S`; under a qcow2 overlay the cached disk is a
//!   node of its own named as the overlay's `backing`, so QEMU never opens the path the
//!   overlay's header names (nor any backing of the cached disk: `backing: null`).
//! - kernel and initrd: QEMU 7.2 loads them with `fopen`, which knows no fd sets, so they are
//!   `/proc/self/fd/N`: a reopen of the inherited descriptor, which skips the directories (they
//!   may stay 0700) but checks the file's own mode, so these must be readable by others.
//!
//! The seccomp filter: `-sandbox on` with every deny option QEMU 7.2 has.

use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::json;

use super::process::FdMapping;
use super::{DiskConfig, VmConfig, VmmError};
use crate::api::Hypervisor;

/// QEMU's seccomp filter: no obsolete system calls, no setuid/setgid/capability changes, no
/// fork/exec, no scheduler or CPU-affinity changes.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// The first descriptor after stdin, stdout and stderr.
const FIRST_FD: RawFd = 3;

/// Where each file lands in QEMU's descriptor table. A pure layout of a [`VmConfig`]: the same
/// config always gets the same numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Handoff {
    /// The listening QMP socket.
    pub(crate) qmp: RawFd,
    /// A second copy of it, in an fd set whose description names the socket's path, so the
    /// VMM's command line names its API socket as every backend's does (finding a VMM again
    /// when its handle is lost relies on that).
    pub(crate) qmp_name: RawFd,
    pub(crate) console: RawFd,
    pub(crate) kernel: RawFd,
    pub(crate) initrd: Option<RawFd>,
    /// Per disk, in the order QEMU attaches them (root first): the disk, and its backing.
    pub(crate) disks: Vec<(RawFd, Option<RawFd>)>,
    /// Per interface, its tap, opened by the agent; empty when QEMU runs in a network
    /// namespace of its own (a VM pod's), where it opens its taps by name (they are made
    /// there, owned by its uid).
    pub(crate) nets: Vec<RawFd>,
}

/// The disks in the order QEMU attaches them: the root disk first (the guest names it
/// /dev/vda).
pub(crate) fn ordered_disks(config: &VmConfig) -> Vec<&DiskConfig> {
    let mut disks: Vec<_> = config.disks.iter().collect();
    disks.sort_by_key(|d| !d.root);
    disks
}

impl Handoff {
    pub(crate) fn layout(config: &VmConfig) -> Handoff {
        let mut next = FIRST_FD;
        let mut take = || {
            let fd = next;
            next += 1;
            fd
        };
        let qmp = take();
        let qmp_name = take();
        let console = take();
        let kernel = take();
        let initrd = config.initrd.as_ref().map(|_| take());
        let disks = ordered_disks(config)
            .into_iter()
            .map(|d| (take(), d.backing.as_ref().map(|_| take())))
            .collect();
        let own_netns = config
            .confinement
            .as_ref()
            .is_some_and(|c| c.netns.is_some());
        let nets = if own_netns {
            Vec::new()
        } else {
            config.nets.iter().map(|_| take()).collect()
        };
        Handoff {
            qmp,
            qmp_name,
            console,
            kernel,
            initrd,
            disks,
            nets,
        }
    }

    /// QEMU's arguments for its files (and its seccomp filter), in place of paths.
    pub(crate) fn args(&self, config: &VmConfig) -> Vec<String> {
        let mut a: Vec<String> = vec!["-sandbox".into(), SANDBOX.into()];
        let mut add_fd = |fd: RawFd, opaque: &str| {
            a.push("-add-fd".into());
            // The fd set's id is the descriptor's number: unique, and easy to follow.
            a.push(format!(
                "fd={fd},set={fd},opaque={}",
                opaque.replace(',', ",,")
            ));
        };
        add_fd(self.qmp_name, &config.api_socket.display().to_string());
        add_fd(self.console, "console");
        for (disk, (file, backing)) in ordered_disks(config).into_iter().zip(&self.disks) {
            add_fd(*file, &format!("disk-{}", disk.id));
            if let Some(backing) = backing {
                add_fd(*backing, &format!("disk-{}-backing", disk.id));
            }
        }
        a.extend(["-kernel".into(), format!("/proc/self/fd/{}", self.kernel)]);
        if let Some(initrd) = self.initrd {
            a.extend(["-initrd".into(), format!("/proc/self/fd/{initrd}")]);
        }
        a.extend([
            "-chardev".into(),
            format!("file,id=console,path=/dev/fdset/{},append=on", self.console),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!("socket,id=qmp,fd={},server=on,wait=off", self.qmp),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        for (disk, (file, backing)) in ordered_disks(config).into_iter().zip(&self.disks) {
            let id = super::qemu::qemu_id("disk", &disk.id);
            let mut top = json!({
                "driver": disk.format.as_str(),
                "node-name": id,
                "file": format!("{id}-file"),
                "read-only": disk.read_only,
            });
            let mut blockdev = |node: serde_json::Value| {
                a.extend(["-blockdev".into(), node.to_string()]);
            };
            if let (Some(fd), Some((_, format))) = (backing, &disk.backing) {
                blockdev(json!({
                    "driver": "file",
                    "node-name": format!("{id}-base-file"),
                    "filename": format!("/dev/fdset/{fd}"),
                    "read-only": true,
                }));
                let mut base = json!({
                    "driver": format.as_str(),
                    "node-name": format!("{id}-base"),
                    "file": format!("{id}-base-file"),
                    "read-only": true,
                });
                if format.as_str() == "qcow2" {
                    base["backing"] = serde_json::Value::Null;
                }
                blockdev(base);
                top["backing"] = json!(format!("{id}-base"));
            } else if disk.format.as_str() == "qcow2" {
                top["backing"] = serde_json::Value::Null;
            }
            blockdev(json!({
                "driver": "file",
                "node-name": format!("{id}-file"),
                "filename": format!("/dev/fdset/{file}"),
                "read-only": disk.read_only,
            }));
            blockdev(top);
            a.extend(["-device".into(), format!("virtio-blk-device,drive={id}")]);
        }
        for (i, net) in config.nets.iter().enumerate() {
            let id = super::qemu::qemu_id("net", &net.id);
            let tap = match self.nets.get(i) {
                Some(fd) => format!("fd={fd}"),
                None => format!(
                    "ifname={},script=no,downscript=no",
                    net.tap.replace(',', ",,")
                ),
            };
            a.extend([
                "-netdev".into(),
                format!("tap,id={id},{tap}"),
                "-device".into(),
                format!("virtio-net-device,netdev={id},mac={}", net.mac),
            ]);
        }
        a
    }
}

/// The agent's side of a [`Handoff`]: every file opened (the spec's host files come already
/// opened in `config.opened`; the rest are the agent's own: the image cache, the VM's
/// directory), the QMP socket bound, as descriptor mappings for the spawn. `vmm_uid` is who
/// will reopen the kernel and initrd.
pub(crate) fn open(
    config: &VmConfig,
    handoff: &Handoff,
    vmm_uid: u32,
) -> Result<Vec<FdMapping>, VmmError> {
    let io = |what: String| {
        move |source| VmmError::Io {
            operation: what,
            source,
        }
    };
    let mut mappings = Vec::new();
    let listener = std::os::unix::net::UnixListener::bind(&config.api_socket)
        .map_err(io(format!("listen on {}", config.api_socket.display())))?;
    let qmp = OwnedFd::from(listener);
    let qmp_name = qmp
        .try_clone()
        .map_err(io("duplicate the QMP socket".into()))?;
    mappings.push(map(qmp, handoff.qmp));
    mappings.push(map(qmp_name, handoff.qmp_name));
    let console = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&config.console_log)
        .map_err(io(format!("open {}", config.console_log.display())))?;
    mappings.push(map(console.into(), handoff.console));
    mappings.push(map(
        reopenable(config, &config.kernel, vmm_uid, "kernel")?,
        handoff.kernel,
    ));
    if let (Some(path), Some(fd)) = (&config.initrd, handoff.initrd) {
        mappings.push(map(reopenable(config, path, vmm_uid, "initrd")?, fd));
    }
    for (disk, (file, backing)) in ordered_disks(config).into_iter().zip(&handoff.disks) {
        mappings.push(map(file_for(config, &disk.path, !disk.read_only)?, *file));
        if let (Some(fd), Some((path, _))) = (backing, &disk.backing) {
            mappings.push(map(file_for(config, path, false)?, *fd));
        }
    }
    for (net, fd) in config.nets.iter().zip(&handoff.nets) {
        let tap = crate::agent::net::tap::open_queue(&net.tap)
            .map_err(io(format!("open tap {}", net.tap)))?;
        mappings.push(map(tap, *fd));
    }
    Ok(mappings)
}

fn map(parent_fd: OwnedFd, child_fd: RawFd) -> FdMapping {
    FdMapping {
        parent_fd,
        child_fd,
    }
}

/// The descriptor of `path`: the one the agent opened beneath an allowed directory, or (for
/// the agent's own files) a fresh open.
fn file_for(config: &VmConfig, path: &Path, writable: bool) -> Result<OwnedFd, VmmError> {
    if let Some(fd) = config.opened.get(path) {
        return fd.try_clone().map_err(|source| VmmError::Io {
            operation: format!("duplicate the descriptor of {}", path.display()),
            source,
        });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|source| VmmError::Io {
            operation: format!("open {}", path.display()),
            source,
        })
}

/// A file QEMU reopens through `/proc/self/fd/N` as `vmm_uid`: refused up front, with what
/// to do, when that reopen would be denied.
fn reopenable(
    config: &VmConfig,
    path: &Path,
    vmm_uid: u32,
    what: &str,
) -> Result<OwnedFd, VmmError> {
    let fd = file_for(config, path, false)?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().map_err(|source| VmmError::Io {
        operation: format!("stat {}", path.display()),
        source,
    })?;
    let mode = meta.permissions().mode();
    use std::os::unix::fs::MetadataExt;
    if mode & 0o004 == 0 && meta.uid() != vmm_uid {
        return Err(VmmError::InvalidConfig {
            hypervisor: Hypervisor::Qemu,
            detail: format!(
                "the {what} {} is not readable by others (mode {:o}): QEMU loads it by reopening the descriptor the agent gives it, as the VM's uid {vmm_uid}; make the file 0644 (its directories may stay 0700)",
                path.display(),
                mode & 0o7777
            ),
        });
    }
    Ok(file.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::image::DiskFormat;

    fn config() -> VmConfig {
        let disk = |id: &str, root: bool, backing: bool| DiskConfig {
            id: id.into(),
            path: format!("/s/{id}").into(),
            format: if backing {
                DiskFormat::Qcow2
            } else {
                DiskFormat::Raw
            },
            read_only: !root,
            root,
            backing: backing.then(|| ("/cache/disk.qcow2".into(), DiskFormat::Qcow2)),
        };
        VmConfig {
            id: "u".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: "/g/vmlinuz".into(),
            cmdline: String::new(),
            initrd: Some("/g/initrd".into()),
            disks: vec![disk("cidata", false, false), disk("rootfs", true, true)],
            nets: vec![super::super::NetConfig {
                id: "eth0".into(),
                tap: "ig-tap0".into(),
                mac: "02:00:00:00:00:01".into(),
            }],
            user_data: None,
            accelerator: crate::api::Accelerator::Tcg,
            state_dir: "/s".into(),
            console_log: "/s/console.log".into(),
            api_socket: "/s/api.sock".into(),
            binary: "qemu-system-x86_64".into(),
            confinement: None,
            restore: None,
            opened: Default::default(),
        }
    }

    #[test]
    fn every_file_gets_its_own_descriptor_root_disk_first() {
        let h = Handoff::layout(&config());
        assert_eq!(
            h,
            Handoff {
                qmp: 3,
                qmp_name: 4,
                console: 5,
                kernel: 6,
                initrd: Some(7),
                disks: vec![(8, Some(9)), (10, None)],
                nets: vec![11],
            }
        );
    }

    #[test]
    fn qemu_gets_descriptors_never_paths_and_the_sandbox() {
        let c = config();
        let a = Handoff::layout(&c).args(&c);
        let after = |flag: &str| {
            a.iter()
                .enumerate()
                .filter(|(i, _)| *i > 0 && a[i - 1] == flag)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(after("-sandbox"), [SANDBOX]);
        assert_eq!(after("-kernel"), ["/proc/self/fd/6"]);
        assert_eq!(after("-initrd"), ["/proc/self/fd/7"]);
        assert_eq!(
            after("-chardev"),
            [
                "file,id=console,path=/dev/fdset/5,append=on",
                "socket,id=qmp,fd=3,server=on,wait=off"
            ]
        );
        assert_eq!(
            after("-add-fd"),
            [
                "fd=4,set=4,opaque=/s/api.sock",
                "fd=5,set=5,opaque=console",
                "fd=8,set=8,opaque=disk-rootfs",
                "fd=9,set=9,opaque=disk-rootfs-backing",
                "fd=10,set=10,opaque=disk-cidata"
            ]
        );
        let nodes: Vec<serde_json::Value> = after("-blockdev")
            .iter()
            .map(|j| serde_json::from_str(j).expect("json"))
            .collect();
        assert_eq!(nodes.len(), 6);
        assert_eq!(nodes[0]["filename"], "/dev/fdset/9");
        assert_eq!(nodes[1]["node-name"], "disk-rootfs-base");
        assert_eq!(nodes[1]["backing"], serde_json::Value::Null);
        assert_eq!(nodes[3]["backing"], "disk-rootfs-base");
        assert_eq!(nodes[3]["read-only"], false);
        assert_eq!(nodes[4]["filename"], "/dev/fdset/10");
        assert_eq!(nodes[5]["read-only"], true);
        assert_eq!(
            after("-device"),
            [
                "virtio-blk-device,drive=disk-rootfs",
                "virtio-blk-device,drive=disk-cidata",
                "virtio-net-device,netdev=net-eth0,mac=02:00:00:00:00:01"
            ]
        );
        assert_eq!(after("-netdev"), ["tap,id=net-eth0,fd=11"]);
        // No path of the host appears, but the API socket's, as a description.
        let joined = a.join(" ");
        for path in ["/g/", "/cache/", "/s/console", "/s/rootfs", "/s/cidata"] {
            assert!(!joined.contains(path), "{path} in {joined}");
        }
    }

    #[test]
    fn in_a_pods_netns_qemu_opens_its_taps_by_name() {
        let mut c = config();
        c.confinement = Some(crate::agent::vmm::process::Confinement {
            uid: 100_000,
            gid: 100_000,
            netns: Some("/proc/1/ns/net".into()),
            cgroups: Vec::new(),
        });
        let h = Handoff::layout(&c);
        assert!(h.nets.is_empty());
        let a = h.args(&c);
        assert!(a.contains(&"tap,id=net-eth0,ifname=ig-tap0,script=no,downscript=no".to_owned()));
    }

    #[test]
    fn a_kernel_its_uid_could_not_reopen_is_refused_up_front() {
        let dir = tempfile::tempdir().expect("tmp");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, "k").expect("write");
        let mut c = config();
        c.kernel = kernel.clone();
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = reopenable(&c, &kernel, 100_000, "kernel").expect_err("0600");
        assert_eq!(<&str>::from(&e), "InvalidVmConfig");
        assert!(e.is_permanent());
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        reopenable(&c, &kernel, 100_000, "kernel").expect("0644");
    }
}
