//! Validating a boot before anything is created: the spec against what the node offers
//! (which VMM, which accelerator, enough memory, networking that can carry readiness), and
//! the kernel, initrd and rootfs files. Pure but for the file checks.

use super::*;
use crate::agent::net::{self, AttachedInterface};
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

/// Check that the kernel, initrd and rootfs given as node paths exist and can be read, before
/// anything is created (images are checked by their pull).
pub(crate) fn check_files(spec: &VmSpec) -> Result<(), BootError> {
    if let Some(kernel) = spec.kernel.path() {
        check_readable(kernel).map_err(|(missing, source)| {
            let path = kernel.to_owned();
            if missing {
                BootError::KernelNotFound { path, source }
            } else {
                BootError::KernelUnreadable { path, source }
            }
        })?;
    }
    if let Some(initrd) = spec.initrd.as_ref().and_then(GuestFile::path) {
        check_readable(initrd).map_err(|(missing, source)| {
            let path = initrd.to_owned();
            if missing {
                BootError::InitrdNotFound { path, source }
            } else {
                BootError::InitrdUnreadable { path, source }
            }
        })?;
    }
    if let Some(rootfs) = spec.rootfs.as_ref().and_then(GuestFile::path) {
        check_readable(rootfs).map_err(|(_, source)| BootError::RootfsUnreadable {
            path: rootfs.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// Open and read one byte: permission bits alone lie when the agent runs as root.
/// The error says whether the file is missing.
pub(super) fn check_readable(path: &str) -> Result<(), (bool, std::io::Error)> {
    use std::io::Read;
    if path.is_empty() {
        return Err((
            true,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no path given"),
        ));
    }
    let mut file =
        std::fs::File::open(path).map_err(|e| (e.kind() == std::io::ErrorKind::NotFound, e))?;
    let meta = file.metadata().map_err(|e| (false, e))?;
    if !meta.is_file() {
        return Err((
            false,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    let mut byte = [0u8; 1];
    match file.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => Err((
            false,
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file is empty"),
        )),
        Err(e) => Err((false, e)),
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
        }
    }
}

#[cfg(test)]
mod tests;
