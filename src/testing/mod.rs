//! Test support shared by the unit tests, the integration tests in `tests/`, the e2e crate
//! and the benchmarks: the MicroVM builder, API fixtures, domain fixtures, a fake agent, and
//! the constants of the API group. Compiled for unit tests and with the `testing` cargo
//! feature (the e2e crate and `tests/` turn it on).

pub mod fake_agent;
mod microvm;
pub mod prerequisite;
mod vm;
pub mod vmm;

pub use crate::api::{API_VERSION, GROUP, KIND, MicroVmBuilder, PLURAL, VERSION};
pub use microvm::{agent_vm, at, deleting, exit, microvm, microvm_list, microvm_path, placed};
pub use vm::{apply_request, vm_spec};
