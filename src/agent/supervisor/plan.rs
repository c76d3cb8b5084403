//! Validating a boot before anything is created: the spec against what the node offers
//! (which VMM, which accelerator, enough memory, networking that can carry readiness), and
//! the kernel, initrd and rootfs files. Pure but for the file checks.

use std::path::PathBuf;

use super::*;
use crate::agent::confine::{self, PathError};
use crate::agent::net::{self, AttachedInterface};
use crate::agent::vmm::OpenedFiles;
use crate::vm::{GuestFile, Interface, InterfaceMode, PodRef, VmSpec};

/// What the node offers, for [`plan_boot`].
#[derive(Clone, Debug)]
pub(crate) struct PlanEnv {
    pub(crate) host_memory_bytes: u64,
    pub(crate) accelerator: Accelerator,
    pub(crate) accelerator_detail: String,
    /// Backends whose binary is present: kind, and whether it can use KVM / TCG.
    pub(crate) available: Vec<(Hypervisor, bool, bool)>,
    /// Backends this agent knows but cannot run, with why.
    pub(crate) unavailable: Vec<(Hypervisor, String)>,
    pub(crate) simulated: bool,
    /// Whether the admin lets guests run under TCG (`--allow-tcg`).
    pub(crate) allow_tcg: bool,
}

/// A validated boot: which VMM, which accelerator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct BootPlan {
    pub(crate) hypervisor: Hypervisor,
    pub(crate) accelerator: Accelerator,
    pub(crate) memory_mib: u64,
}

/// Validate a spec against the node (files are checked separately by [`check_files`]) and
/// choose the VMM and accelerator.
pub(crate) fn plan_boot(spec: &VmSpec, env: &PlanEnv) -> Result<BootPlan, BootError> {
    let requested = spec.hypervisor;
    if spec.vcpus == 0 {
        return Err(BootError::Spec(SpecError::InvalidSpec {
            field: "vcpus",
            detail: "must be at least 1".into(),
        }));
    }
    if spec.memory_bytes == 0 {
        return Err(BootError::Spec(SpecError::InvalidSpec {
            field: "memory_bytes",
            detail: "must be more than 0".into(),
        }));
    }
    if spec.memory_bytes > env.host_memory_bytes {
        return Err(BootError::InsufficientMemory {
            requested: spec.memory_bytes,
            host: env.host_memory_bytes,
        });
    }
    let accel_choice = spec.accelerator;
    if accel_choice == Some(Accelerator::Kvm) && env.accelerator != Accelerator::Kvm {
        return Err(BootError::KvmUnavailable {
            detail: env.accelerator_detail.clone(),
        });
    }
    let find = |kind: Hypervisor| env.available.iter().find(|(k, _, _)| *k == kind).copied();
    let (hypervisor, kvm, tcg) = match requested {
        Some(Hypervisor::Simulated) if !env.simulated => {
            return Err(BootError::HypervisorUnavailable {
                hypervisor: Hypervisor::Simulated.to_string(),
                detail:
                    "the simulated VMM exists for benchmarks only; start the agent with --simulated"
                        .into(),
            });
        }
        Some(kind) => find(kind).ok_or_else(|| BootError::HypervisorUnavailable {
            hypervisor: kind.to_string(),
            detail: env
                .unavailable
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, why)| why.clone())
                .unwrap_or_else(|| "no backend for it in this agent".into()),
        })?,
        None if env.simulated => {
            find(Hypervisor::Simulated).ok_or_else(|| BootError::HypervisorUnavailable {
                hypervisor: Hypervisor::Simulated.to_string(),
                detail: "no simulated backend registered".into(),
            })?
        }
        None => {
            // QEMU first: it is the one that also runs without KVM.
            let usable = |(k, kvm, tcg): &(Hypervisor, bool, bool)| {
                *k != Hypervisor::Simulated
                    && match accel_choice {
                        Some(Accelerator::Kvm) => *kvm,
                        Some(Accelerator::Tcg) => *tcg,
                        None => (*kvm && env.accelerator == Accelerator::Kvm) || *tcg,
                    }
            };
            [
                Hypervisor::Qemu,
                Hypervisor::Firecracker,
                Hypervisor::CloudHypervisor,
            ]
            .into_iter()
            .filter_map(find)
            .find(usable)
            .ok_or_else(|| BootError::HypervisorUnavailable {
                hypervisor: "auto".into(),
                detail: "no VMM on this node can run this VM".into(),
            })?
        }
    };
    let accelerator = match accel_choice {
        Some(Accelerator::Kvm) if kvm => Accelerator::Kvm,
        Some(Accelerator::Tcg) if tcg => Accelerator::Tcg,
        Some(accelerator) => {
            return Err(BootError::AcceleratorUnsupported {
                hypervisor,
                accelerator,
            });
        }
        None if env.accelerator == Accelerator::Kvm && kvm => Accelerator::Kvm,
        None if tcg => Accelerator::Tcg,
        None => {
            return Err(BootError::KvmUnavailable {
                detail: format!(
                    "{hypervisor} needs KVM and this node has none ({})",
                    env.accelerator_detail
                ),
            });
        }
    };
    // The simulated VMM runs no guest code, so it emulates nothing either.
    if accelerator == Accelerator::Tcg && !env.allow_tcg && hypervisor != Hypervisor::Simulated {
        return Err(BootError::TcgNotAllowed);
    }
    if let Some(port) = spec.readiness_tcp_port
        && !spec.interfaces.iter().any(gets_an_address)
    {
        return Err(BootError::ReadinessUnreachable { port });
    }
    Ok(BootPlan {
        hypervisor,
        accelerator,
        memory_mib: spec.memory_bytes.div_ceil(1 << 20),
    })
}

/// Open the kernel, initrd and rootfs given as node paths, before anything is created, for
/// the VMM to get as descriptors: only beneath a directory of `allowed`, never leaving it
/// (see [`confine::open_allowed`]); a path outside is refused without being opened. Images
/// are checked by their pull.
pub(crate) fn check_files(spec: &VmSpec, allowed: &[PathBuf]) -> Result<OpenedFiles, BootError> {
    let mut opened = Vec::new();
    if let Some(kernel) = spec.kernel.path() {
        let fd = open_checked(kernel, allowed, false, "kernel.path", |missing, source| {
            let path = kernel.to_owned();
            if missing {
                BootError::KernelNotFound { path, source }
            } else {
                BootError::KernelUnreadable { path, source }
            }
        })?;
        opened.push((PathBuf::from(kernel), fd));
    }
    if let Some(initrd) = spec.initrd.as_ref().and_then(GuestFile::path) {
        let fd = open_checked(initrd, allowed, false, "initrd.path", |missing, source| {
            let path = initrd.to_owned();
            if missing {
                BootError::InitrdNotFound { path, source }
            } else {
                BootError::InitrdUnreadable { path, source }
            }
        })?;
        opened.push((PathBuf::from(initrd), fd));
    }
    if let Some(rootfs) = spec.rootfs.as_ref().and_then(GuestFile::path) {
        let writable = !spec.rootfs_read_only;
        let fd = open_checked(rootfs, allowed, writable, "rootfs.path", |_, source| {
            BootError::RootfsUnreadable {
                path: rootfs.to_owned(),
                source,
            }
        })?;
        opened.push((PathBuf::from(rootfs), fd));
    }
    Ok(OpenedFiles::new(opened))
}

/// Open one allowed file and read its first byte (permission bits alone lie when the agent
/// runs as root; `pread`, so the descriptor's offset stays at 0). `unreadable` builds the
/// error of a file that is missing (`true`) or cannot be read.
fn open_checked(
    path: &str,
    allowed: &[PathBuf],
    writable: bool,
    field: &'static str,
    unreadable: impl Fn(bool, std::io::Error) -> BootError,
) -> Result<std::os::fd::OwnedFd, BootError> {
    use std::os::unix::fs::FileExt;
    let fd = confine::open_allowed(path, allowed, writable).map_err(|error| match error {
        PathError::Open {
            missing, source, ..
        } => unreadable(missing, source),
        PathError::NotAFile { .. } => unreadable(
            false,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ),
        refused => BootError::PathNotAllowed {
            field,
            source: refused,
        },
    })?;
    let file = std::fs::File::from(fd);
    let mut byte = [0u8; 1];
    match file.read_at(&mut byte, 0) {
        Ok(1) => Ok(file.into()),
        Ok(_) => Err(unreadable(
            false,
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file is empty"),
        )),
        Err(e) => Err(unreadable(false, e)),
    }
}

/// Whether an interface needs a tap on the node's networking (a `pod` interface has its tap
/// in the pod's network namespace instead).
pub(super) fn needs_tap(request: &Interface) -> bool {
    matches!(request.mode, InterfaceMode::Nat | InterfaceMode::Bridge)
}

/// Whether an interface will carry an address the agent knows (for TCP readiness).
pub(super) fn gets_an_address(request: &Interface) -> bool {
    match request.mode {
        InterfaceMode::Nat | InterfaceMode::Pod => true,
        InterfaceMode::Bridge => request.address.is_some(),
        InterfaceMode::None => false,
    }
}

/// Interfaces of mode `pod` need the VM's pod (there is none in `ignis dev`), and a pod has
/// one network: at most one such interface, with the address the pod gives it.
pub(crate) fn check_pod_interfaces(spec: &VmSpec, pod: Option<&PodRef>) -> Result<(), BootError> {
    let mut in_pod = spec
        .interfaces
        .iter()
        .filter(|i| i.mode == InterfaceMode::Pod);
    let Some(first) = in_pod.next() else {
        return Ok(());
    };
    if pod.is_none() {
        return Err(BootError::NoVmPod {
            interface: first.name.clone(),
        });
    }
    if let Some(node) = spec
        .interfaces
        .iter()
        .find(|i| matches!(i.mode, InterfaceMode::Nat | InterfaceMode::Bridge))
    {
        return Err(BootError::Spec(SpecError::InvalidSpec {
            field: "interfaces.mode",
            detail: format!(
                "interface {} is in mode {} and {} in mode pod: a VM on its pod's network runs in the pod's network namespace, where the node's bridges are not",
                node.name, node.mode, first.name
            ),
        }));
    }
    if let Some(second) = in_pod.next() {
        return Err(BootError::Spec(SpecError::InvalidSpec {
            field: "interfaces.mode",
            detail: format!(
                "interfaces {} and {} both ask for mode pod; a VM has one pod network",
                first.name, second.name
            ),
        }));
    }
    if first.address.is_some() {
        return Err(BootError::Spec(SpecError::InvalidSpec {
            field: "interfaces.address",
            detail: format!(
                "interface {} is in mode pod: its address is the pod IP, not one to choose",
                first.name
            ),
        }));
    }
    Ok(())
}

/// The guest command line: the spec's, then the network's `ip=` parameter — unless the spec's
/// own command line has one (`ip=dhcp`, a static one): the user's choice wins.
pub(crate) fn guest_cmdline(
    spec_cmdline: &str,
    interfaces: &[AttachedInterface],
    hostname: &str,
) -> String {
    let own_ip = spec_cmdline
        .split_whitespace()
        .any(|p| p.starts_with("ip="));
    let net = if own_ip {
        String::new()
    } else {
        net::kernel_cmdline(interfaces, hostname)
    };
    match (spec_cmdline.trim().is_empty(), net.is_empty()) {
        (_, true) => spec_cmdline.to_owned(),
        (true, false) => net,
        (false, false) => format!("{} {net}", spec_cmdline.trim_end()),
    }
}

impl Inner {
    pub(super) fn plan_env(&self) -> PlanEnv {
        let mut available = Vec::new();
        let mut unavailable = self.config.unavailable.clone();
        for entry in &self.backends {
            let kind = entry.backend.kind();
            if entry.resolved_binary().is_some() {
                available.push((
                    kind,
                    entry.backend.supports(Accelerator::Kvm),
                    entry.backend.supports(Accelerator::Tcg),
                ));
            } else {
                unavailable.push((kind, format!("binary {} not found", entry.binary.display())));
            }
        }
        PlanEnv {
            host_memory_bytes: self.config.host.memory_bytes,
            accelerator: self.config.accelerator,
            accelerator_detail: self.config.accelerator_detail.clone(),
            available,
            unavailable,
            simulated: self.config.simulated,
            allow_tcg: self.config.policy.allow_tcg,
        }
    }
}

#[cfg(test)]
mod tests;
