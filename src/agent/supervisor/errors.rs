//! What goes wrong: why a VM could not be created or booted (a VM state, not an API
//! error), and the errors of the supervisor's API.

use thiserror::Error;

use crate::agent::cloud_init::CloudInitError;
use crate::agent::console;
use crate::agent::image::ImageError;
use crate::agent::net::NetError;
use crate::agent::state::StateError;
use crate::agent::vmm::VmmError;
use crate::api::{Accelerator, Hypervisor, InterfaceMode};
use crate::vm::wire::SpecError;

/// Why a VM could not be created or booted. Each variant names the cause; its reason is the
/// word that lands in `ExitInfo.reason`, conditions and metric labels.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum BootError {
    /// The spec itself is wrong (`InvalidSpec`, `UnknownHypervisor`).
    #[error(transparent)]
    #[strum(transparent)]
    Spec(SpecError),
    #[error("kernel {path} not found")]
    KernelNotFound {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} cannot be read")]
    KernelUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} not found")]
    InitrdNotFound {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} cannot be read")]
    InitrdUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("rootfs {path} cannot be read")]
    RootfsUnreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM asks for {requested} bytes of memory but the host has {host} in total")]
    InsufficientMemory { requested: u64, host: u64 },
    #[error("hypervisor {hypervisor} is not available on this node ({detail})")]
    HypervisorUnavailable { hypervisor: String, detail: String },
    #[error("the VM requires KVM but this node runs guests with TCG: {detail}")]
    KvmUnavailable { detail: String },
    #[error("{hypervisor} cannot run with accelerator {accelerator}")]
    AcceleratorUnsupported {
        hypervisor: Hypervisor,
        accelerator: Accelerator,
    },
    #[error(
        "guest networking is not available on this agent: interface {interface} asks for mode {mode} ({detail}); use mode none or fix the node"
    )]
    NetworkingUnavailable {
        interface: String,
        mode: InterfaceMode,
        detail: String,
    },
    #[error(
        "interface {interface} asks for mode pod, but this VM has no pod: mode pod is the VM pod's network on a cluster; in ignis dev use nat, bridge or none"
    )]
    NoVmPod { interface: String },
    #[error(
        "readiness on TCP port {port} needs a guest address: give the VM an interface in mode nat, or in mode bridge with an address"
    )]
    ReadinessUnreachable { port: u16 },
    /// The interfaces could not be attached; the reason is the network's own word.
    #[error(transparent)]
    #[strum(transparent)]
    Network(NetError),
    /// An image could not be pulled for good, or the VM's disk could not be made over it; the
    /// reason is the image error's own word (`ImageBadLayout`, `InvalidImageReference`, ...).
    #[error(transparent)]
    #[strum(transparent)]
    Image(ImageError),
    #[error("the VM boots from images but {detail}")]
    ImagesUnavailable { detail: String },
    /// The NoCloud drive could not be built.
    #[error(transparent)]
    #[strum(transparent)]
    CloudInit(CloudInitError),
    #[error("cannot prepare the VM's state directory")]
    #[strum(transparent)]
    State(#[source] StateError),
    #[error(transparent)]
    #[strum(transparent)]
    Vmm(VmmCall),
}

impl BootError {
    /// Whether the same request will fail the same way again.
    pub fn is_permanent(&self) -> bool {
        match self {
            BootError::State(_) | BootError::ImagesUnavailable { .. } => false,
            BootError::Network(e) => e.is_permanent(),
            BootError::Image(e) => e.is_permanent(),
            BootError::CloudInit(e) => matches!(
                e,
                CloudInitError::InvalidHostname { .. } | CloudInitError::EmptyInstanceId
            ),
            BootError::Vmm(call) => call.source.is_permanent(),
            _ => true,
        }
    }

    /// The message with its causes, for a person.
    pub(crate) fn full_message(&self) -> String {
        crate::error::chain(self)
    }
}

/// A VMM call that failed while creating or starting a VM; its reason is the VMM error's.
#[derive(Debug, Error)]
#[error("VMM {operation} failed")]
pub struct VmmCall {
    pub(crate) operation: &'static str,
    #[source]
    pub(crate) source: VmmError,
}

impl From<&VmmCall> for &'static str {
    fn from(call: &VmmCall) -> Self {
        (&call.source).into()
    }
}

/// Errors of the supervisor's API (as opposed to a VM's failure, which is a VM state).
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum SupervisorError {
    #[error("invalid request: {detail}")]
    InvalidRequest { detail: String },
    #[error("no VM {uid} on this agent")]
    NotFound { uid: String },
    #[error("state directory")]
    #[strum(transparent)]
    State(#[source] StateError),
    #[error("console log")]
    #[strum(transparent)]
    Console(#[source] console::ConsoleError),
}
