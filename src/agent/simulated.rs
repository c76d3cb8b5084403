//! The `simulated` VMM: a `sleep` process stands in for the VMM and there is no guest. It
//! exists for control-plane benchmarks only (DESIGN.md section 5): it is registered only when
//! the agent runs with `--simulated`, and VMs on it report hypervisor `simulated`.
//!
//! It still is a real process, so the supervisor's lifecycle (reaping, stop, kill, re-adoption
//! through `/proc`) runs exactly as for a real VMM.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::agent::host;
use crate::agent::vmm::{GuestExit, Spawned, VmConfig, VmmBackend, VmmError, VmmHandle, VmmState};
use crate::api::{Accelerator, Hypervisor};

/// The simulated backend; `binary` is the `sleep` it runs.
#[derive(Clone, Debug)]
pub struct SimulatedBackend {
    pub binary: PathBuf,
}

impl Default for SimulatedBackend {
    fn default() -> Self {
        Self {
            binary: PathBuf::from("sleep"),
        }
    }
}

fn signal(handle: &VmmHandle, sig: Signal, operation: &str) -> Result<(), VmmError> {
    if !host::is_same_live_process(handle.pid, handle.start_time_ticks) {
        return Ok(());
    }
    let pid = i32::try_from(handle.pid).map_err(|_| VmmError::Protocol {
        operation: operation.to_owned(),
        detail: format!("pid {} out of range", handle.pid),
    })?;
    kill(Pid::from_raw(pid), sig).map_err(|errno| VmmError::Io {
        operation: operation.to_owned(),
        source: std::io::Error::from_raw_os_error(errno as i32),
    })
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
        let binary = crate::agent::supervisor::resolve_binary(&self.binary).ok_or_else(|| {
            VmmError::BinaryNotFound {
                path: self.binary.clone(),
            }
        })?;
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
        let child = tokio::process::Command::new(&binary)
            .arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C to the agent's terminal must not end it.
            .process_group(0)
            .spawn()
            .map_err(|source| VmmError::Spawn {
                binary: binary.clone(),
                source,
            })?;
        let pid = child.id().ok_or_else(|| VmmError::Exited {
            operation: "create".into(),
            detail: "the process ended at once".into(),
        })?;
        let start_time_ticks = host::proc_stat(pid)
            .map(|s| s.start_time_ticks)
            .ok_or_else(|| VmmError::Exited {
                operation: "create".into(),
                detail: "the process ended at once".into(),
            })?;
        Ok(Spawned {
            handle: VmmHandle {
                pid,
                start_time_ticks,
                api_socket: config.api_socket.clone(),
                console_log: config.console_log.clone(),
            },
            child,
        })
    }

    async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        if host::is_same_live_process(handle.pid, handle.start_time_ticks) {
            Ok(())
        } else {
            Err(VmmError::Exited {
                operation: "start".into(),
                detail: "the simulated VMM is gone".into(),
            })
        }
    }

    async fn stop(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        signal(handle, Signal::SIGTERM, "stop")
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        signal(handle, Signal::SIGKILL, "kill")
    }

    async fn state(&self, handle: &VmmHandle) -> Result<VmmState, VmmError> {
        Ok(
            if host::is_same_live_process(handle.pid, handle.start_time_ticks) {
                VmmState::Running
            } else {
                VmmState::Exited
            },
        )
    }

    fn classify_exit(
        &self,
        _handle: &VmmHandle,
        status: Option<std::process::ExitStatus>,
        _console_tail: &str,
    ) -> GuestExit {
        match status.and_then(|s| s.signal()) {
            Some(sig) if sig == Signal::SIGTERM as i32 => GuestExit {
                success: true,
                reason: "GuestShutdown",
                message: "the simulated VM was asked to stop".into(),
                exit_code: None,
            },
            Some(sig) => GuestExit {
                success: false,
                reason: "VmmKilled",
                message: format!("the simulated VMM was killed by signal {sig}"),
                exit_code: None,
            },
            None => GuestExit {
                success: false,
                reason: "VmmCrashed",
                message: "the simulated VMM ended".into(),
                exit_code: status.and_then(|s| s.code()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_classify_as_shutdown_or_kill() {
        let backend = SimulatedBackend::default();
        let handle = VmmHandle {
            pid: 1,
            start_time_ticks: 0,
            api_socket: PathBuf::new(),
            console_log: PathBuf::new(),
        };
        let term = std::process::ExitStatus::from_raw(Signal::SIGTERM as i32);
        let killed = std::process::ExitStatus::from_raw(Signal::SIGKILL as i32);
        assert_eq!(
            backend.classify_exit(&handle, Some(term), "").reason,
            "GuestShutdown"
        );
        assert_eq!(
            backend.classify_exit(&handle, Some(killed), "").reason,
            "VmmKilled"
        );
        assert_eq!(
            backend.classify_exit(&handle, None, "").reason,
            "VmmCrashed"
        );
    }
}
