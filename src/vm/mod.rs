//! The VM as the controller and the agent share it: one typed domain model. The controller's
//! planner and the agent's supervisor work only with these types; the generated gRPC types
//! are converted to and from them once, at the edges.

mod exit;

pub use exit::ExitReason;
