//! The VM as the controller and the agent share it: one typed domain model. The controller's
//! planner and the agent's supervisor work only with these types; the generated gRPC types
//! are converted to and from them once each way, in [`wire`].
//!
//! - [`ApplyRequest`] / [`VmSpec`] / [`GuestFile`] / [`PullSecrets`]: what the controller asks
//!   for;
//! - [`VmStatus`] / [`RunState`] / [`RunExit`] / [`ExitReason`] / [`PulledImage`] /
//!   [`Pulling`]: what the agent reports;
//! - [`HostInfo`]: what a node offers;
//! - [`VmUid`]: the uid, validated once where it enters.
//!
//! The hypervisor, accelerator and interface mode are the MicroVM API's own enums.

mod exit;
mod spec;
mod status;
mod uid;
pub(crate) mod wire;

pub use crate::api::{Accelerator, Hypervisor, ImageKind, InterfaceMode};
pub use exit::ExitReason;
pub use spec::{
    ApplyRequest, DesiredState, GuestFile, GuestMetadata, Interface, PodRef, PullSecrets, VmSpec,
};
pub use status::{
    HostInfo, PullFailure, PulledImage, Pulling, RunExit, RunState, SequencedEvent, SnapshotIssue,
    VmEvent, VmStatus,
};
pub use uid::{InvalidUid, VmUid};
