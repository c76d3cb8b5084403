//! What goes wrong: why a VM could not be created or booted (a VM state, not an API
//! error), and the errors of the supervisor's API.

use thiserror::Error;

use crate::agent::cloud_init::CloudInitError;
use crate::agent::confine::PathError;
use crate::agent::console;
use crate::agent::image::ImageError;
use crate::agent::net::NetError;
use crate::agent::pod::SandboxError;
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
    /// A host path the spec names lies outside every directory the node's admin allows, or
    /// escapes it: it is never opened.
    #[error("{field} refused")]
    #[strum(serialize = "PathNotAllowed")]
    PathNotAllowed {
        field: &'static str,
        #[source]
        source: PathError,
    },
    #[error(
        "the VM would run under TCG (emulation), which this node's admin does not allow: QEMU's security policy says \"TCG is not a security boundary\"; ask for accelerator kvm on a node with KVM, or have the admin start the agent with --allow-tcg"
    )]
    #[strum(serialize = "TcgNotAllowed")]
    TcgNotAllowed,
    #[error("no unprivileged id is left for the VMM: all {count} ids from {first} are in use")]
    #[strum(serialize = "VmmIdsExhausted")]
    VmmIdsExhausted { first: u32, count: u32 },
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
    /// The VM's pod could not be found or used on this node (`PodSandboxNotFound`, ...).
    #[error(transparent)]
    #[strum(transparent)]
    PodSandbox(SandboxError),
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
            BootError::State(_)
            | BootError::ImagesUnavailable { .. }
            | BootError::VmmIdsExhausted { .. } => false,
            BootError::Network(e) => e.is_permanent(),
            BootError::PodSandbox(e) => !e.is_retryable(),
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
