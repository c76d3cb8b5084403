//! What this node offers its VMs: the accelerator (the bounded KVM probe) and the VMM
//! backends whose binaries are present, with why the others are not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::supervisor::BackendEntry;
use super::{AcceleratorFlag, AgentConfig, AgentError, guest, kvm, simulated, vmm};
use crate::api::{AcceleratorChoice, Hypervisor};

/// Decide the accelerator: `tcg` skips the probe; `auto` runs the bounded KVM probe (cached
/// per host boot in the state directory) and falls back to TCG; `kvm` refuses to start
/// without usable KVM.
pub(super) async fn choose_accelerator(config: &AgentConfig) -> Result<kvm::KvmProbe, AgentError> {
    let choice = match config.accelerator {
        AcceleratorFlag::Auto => AcceleratorChoice::Auto,
        AcceleratorFlag::Kvm => AcceleratorChoice::Kvm,
        AcceleratorFlag::Tcg => AcceleratorChoice::Tcg,
    };
    let kernel = guest::find_newest_kernel(Path::new("/boot"))
        .map(|version| PathBuf::from(format!("/boot/vmlinuz-{version}")))
        .unwrap_or_default();
    let options = kvm::ProbeOptions::new(
        vmm::process::resolve_binary(&config.qemu_binary)
            .unwrap_or_else(|_| config.qemu_binary.clone()),
        kernel,
        Some(config.state_dir.clone()),
    );
    kvm::probe(choice, &options).await.map_err(AgentError::Kvm)
}

/// The VMM backends this agent offers, and why the missing ones are missing.
pub(super) fn backends(config: &AgentConfig) -> (Vec<BackendEntry>, Vec<(Hypervisor, String)>) {
    let mut backends = Vec::new();
    let mut unavailable = Vec::new();
    let mut add =
        |kind: Hypervisor,
         binary: &Path,
         made: Result<(Arc<dyn vmm::VmmBackend>, PathBuf), vmm::VmmError>| {
            match made {
                Ok((backend, binary)) => backends.push(BackendEntry { backend, binary }),
                // A node without this VMM still serves the others; VMs asking for it fail
                // with HypervisorUnavailable and this reason.
                Err(error) => {
                    tracing::info!(hypervisor = %kind, binary = %binary.display(), %error, "VMM unavailable");
                    unavailable.push((kind, error.to_string()));
                }
            }
        };
    add(
        Hypervisor::Qemu,
        &config.qemu_binary,
        vmm::qemu::QemuBackend::new(&config.qemu_binary).map(|b| {
            let binary = b.binary().to_path_buf();
            (Arc::new(b) as Arc<dyn vmm::VmmBackend>, binary)
        }),
    );
    add(
        Hypervisor::Firecracker,
        &config.firecracker_binary,
        vmm::firecracker::FirecrackerBackend::new(&config.firecracker_binary).map(|b| {
            (
                Arc::new(b) as Arc<dyn vmm::VmmBackend>,
                config.firecracker_binary.clone(),
            )
        }),
    );
    add(
        Hypervisor::CloudHypervisor,
        &config.cloud_hypervisor_binary,
        vmm::cloud_hypervisor::CloudHypervisorBackend::new(&config.cloud_hypervisor_binary).map(
            |b| {
                (
                    Arc::new(b) as Arc<dyn vmm::VmmBackend>,
                    config.cloud_hypervisor_binary.clone(),
                )
            },
        ),
    );
    if config.simulated {
        let simulated = simulated::SimulatedBackend::default();
        backends.push(BackendEntry {
            binary: simulated.binary.clone(),
            backend: Arc::new(simulated),
        });
    }
    (backends, unavailable)
}
