//! Test support shared by the unit tests, the integration tests in `tests/`, the e2e crate
//! and the benchmarks: MicroVM builders, API fixtures, domain fixtures and the constants of
//! the API group. Compiled for unit tests and with the `testing` cargo feature.

pub mod fake_agent;
mod vm;

pub use vm::{apply_request, vm_spec};
