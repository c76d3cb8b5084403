//! The VM as the controller and the agent share it: one typed domain model. The controller's
//! planner and the agent's supervisor work only with these types; the generated gRPC types
//! are converted to and from them once each way, in [`wire`].
//!
//! - [`ApplyRequest`] / [`VmSpec`]: what the controller asks for;
//! - [`VmStatus`] / [`RunState`] / [`RunExit`] / [`ExitReason`]: what the agent reports;
//! - [`HostInfo`]: what a node offers;
//! - [`VmUid`]: the uid, validated once where it enters.
//!
//! The hypervisor, accelerator and interface mode are the MicroVM API's own enums.

mod exit;
mod spec;
mod status;
mod uid;
pub(crate) mod wire;

pub use crate::api::{Accelerator, Hypervisor, InterfaceMode};
pub use exit::ExitReason;
pub use spec::{ApplyRequest, DesiredState, Interface, VmSpec};
pub use status::{HostInfo, RunExit, RunState, SequencedEvent, VmEvent, VmStatus};
pub use uid::{InvalidUid, VmUid};
