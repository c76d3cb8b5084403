//! The `simulated` VMM: a `sleep` process stands in for the VMM and there is no guest. It
//! exists for control-plane benchmarks only (docs/design.md section 6): it is registered only when
//! the agent runs with `--simulated`, and VMs on it report hypervisor `simulated`.
//!
//! It still is a real process, started, watched and ended through the same
//! [`process`](crate::agent::vmm::process) module as every VMM, so the supervisor's lifecycle
//! (reaping, stop, kill, re-adoption through `/proc`) runs exactly as for a real VMM.

use std::io::Write;
use std::path::PathBuf;

use async_trait::async_trait;

use crate::agent::vmm::process::{self, Output};
use crate::agent::vmm::{ExitQuirks, Spawned, VmConfig, VmmBackend, VmmError, VmmHandle, VmmState};
use crate::api::{Accelerator, Hypervisor};

/// The simulated backend; `binary` is the `sleep` it runs.
#[derive(Clone, Debug)]
pub(crate) struct SimulatedBackend {
    pub(crate) binary: PathBuf,
}

impl Default for SimulatedBackend {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("sleep"),
        }
    }
}

#[async_trait]
impl VmmBackend for SimulatedBackend {
    fn kind(&self) -> Hypervisor {
        Hypervisor::Simulated
    }

    fn supports(&self, _accelerator: Accelerator) -> bool {
        true
    }

    async fn create(&self, config: &VmConfig) -> Result<Spawned, VmmError> {
        let binary = process::resolve_binary(&self.binary)?;
        let io = |source| VmmError::Io {
            operation: "create".into(),
            source,
        };
        let mut console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.console_log)
            .map_err(io)?;
        writeln!(console, "simulated VM {}: no guest runs here", config.id).map_err(io)?;
        let child = process::spawn(
            &binary,
            ["infinity"],
            Output::Null,
            Output::Null,
            config.confinement.as_ref(),
            Vec::new(),
        )?;
        let handle = process::handle_for(&child, &config.api_socket, &config.console_log)?;
        Ok(Spawned { handle, child })
    }

    async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        if process::is_alive(handle) {
            Ok(())
        } else {
            Err(VmmError::Exited {
                operation: "start".into(),
                detail: "the simulated VMM is gone".into(),
            })
        }
    }

    async fn stop(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        process::stop(handle)
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        process::kill(handle).await
    }

    async fn state(&self, handle: &VmmHandle) -> Result<VmmState, VmmError> {
        Ok(if process::is_alive(handle) {
            VmmState::Running
        } else {
            VmmState::Exited
        })
    }

    fn exit_quirks(&self) -> &'static ExitQuirks {
        &crate::agent::vmm::exit::SIMULATED
    }
}
