//! The double's suspend and resume, modelling what the real programs do by their API specs
//! (`tests/fixtures/specs/`) and their snapshot documentation (Firecracker's
//! `docs/snapshotting/snapshot-support.md`, Cloud Hypervisor's `docs/snapshot_restore.md`):
//!
//! - **Firecracker**: `PATCH /vm` pauses and resumes a started microVM only (400 before
//!   `InstanceStart`). `PUT /snapshot/create` only while `Paused` (400 otherwise), writing the
//!   state file and the memory file (as large as the guest's memory; here sparse). `PUT
//!   /snapshot/load` only on a fresh process that was configured with nothing (400 "not allowed
//!   after configuring boot-specific resources"); a state file that is missing, is not one this
//!   version wrote, or a memory file that is missing or of another size, is a 400 with its
//!   `fault_message`. After a load the microVM is `Paused` (unless `resume_vm`) until `PATCH
//!   /vm Resumed`, and `InstanceStart` is refused.
//! - **Cloud Hypervisor**: `vm.pause` of a running VM, `vm.resume` of a paused one (404 without
//!   a VM, 405 otherwise). `vm.snapshot` only while paused (405 otherwise), writing
//!   `config.json`, `state.json` and `memory-ranges` into the `file://` directory. `vm.restore`
//!   only while no VM is created (404); a missing or damaged file is a 400 carrying its error
//!   chain. The restored VM is `Paused` until `vm.resume`.
//!
//! The files are the double's own (a JSON marker naming the double and the VMM version): only
//! the double reads them back, as only the same VMM version can restore the real ones.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{CLOUD_HYPERVISOR_VERSION, FIRECRACKER_VERSION, Reply, Vmm, lock};

/// Where a stand-in's VM is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Phase {
    /// A fresh process: nothing configured (Firecracker), no VM created (Cloud Hypervisor).
    #[default]
    Fresh,
    /// Configured for a boot, not started.
    Configured,
    Running,
    Paused,
}

impl Phase {
    /// `InstanceInfo.state`.
    pub(super) fn firecracker_state(self) -> &'static str {
        match self {
            Phase::Fresh | Phase::Configured => "Not started",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
        }
    }

    /// `VmInfo.state`.
    pub(super) fn cloud_hypervisor_state(self) -> &'static str {
        match self {
            Phase::Fresh | Phase::Configured => "Created",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
        }
    }
}

const MIB: u64 = 1024 * 1024;

fn fc_fault(message: impl Into<String>) -> Reply {
    Reply::Json(400, json!({ "fault_message": message.into() }))
}

fn ch_fault(status: u16, chain: &[&str]) -> Reply {
    Reply::Json(status, json!(chain))
}

/// The state file's marker: which double and VMM version wrote it, and the memory size.
fn marker(vmm: &str, version: &str, memory_bytes: u64) -> Value {
    json!({ "double": vmm, "version": version, "memory_bytes": memory_bytes })
}

/// The memory size a state file records, if the double of `vmm` at `version` wrote it.
fn read_marker(path: &Path, vmm: &str, version: &str) -> Result<u64, String> {
    let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let value: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: cannot deserialize the state: {e}", path.display()))?;
    if value["double"] != vmm || value["version"] != version {
        return Err(format!(
            "{}: the snapshot was written by {} {}, not {vmm} {version}",
            path.display(),
            value["double"],
            value["version"]
        ));
    }
    value["memory_bytes"]
        .as_u64()
        .ok_or_else(|| format!("{}: no memory size in the state", path.display()))
}

/// A memory file of `bytes` (sparse: the double's guest has no memory to write).
fn write_memory(path: &Path, bytes: u64) -> Result<(), String> {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn check_memory(path: &Path, bytes: u64) -> Result<(), String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len == bytes {
        Ok(())
    } else {
        Err(format!(
            "{}: {len} bytes of memory, the state needs {bytes}",
            path.display()
        ))
    }
}

fn write_json(path: &Path, value: &Value) -> Result<(), String> {
    std::fs::write(path, value.to_string()).map_err(|e| format!("{}: {e}", path.display()))
}

fn text(body: Option<&Value>, field: &str) -> Option<String> {
    body.and_then(|b| b[field].as_str()).map(str::to_owned)
}

/// The directory of a `file://` URL.
fn url_dir(url: Option<String>) -> Result<PathBuf, String> {
    url.as_deref()
        .and_then(|u| u.strip_prefix("file://"))
        .map(PathBuf::from)
        .ok_or_else(|| format!("{url:?} is not a file:// URL"))
}

impl Vmm {
    pub(super) fn phase(&self) -> Phase {
        lock(&self.machine).phase
    }

    /// Firecracker: a pre-boot resource was configured; the process is no longer fresh.
    pub(super) fn configured(&self, path: &str, body: Option<&Value>) {
        // The logger and metrics may precede a load; MMDS data is no VM resource either.
        if matches!(path, "/logger" | "/metrics" | "/mmds") {
            return;
        }
        let mut machine = lock(&self.machine);
        if machine.phase == Phase::Fresh {
            machine.phase = Phase::Configured;
        }
        if path == "/machine-config"
            && let Some(mib) = body.and_then(|b| b["mem_size_mib"].as_u64())
        {
            machine.memory_bytes = mib * MIB;
        }
    }

    /// Cloud Hypervisor: `vm.create`, or a restore, made this VM.
    pub(super) fn created(&self, config: &Value) {
        *lock(&self.serial) = config["serial"]["file"].as_str().map(PathBuf::from);
        let mut machine = lock(&self.machine);
        machine.memory_bytes = config["memory"]["size"].as_u64().unwrap_or(0);
        machine.config = Some(config.clone());
        machine.phase = Phase::Configured;
    }

    /// Firecracker refuses `InstanceStart` once started, or after a load.
    pub(super) fn refuse_start(&self) -> Option<Reply> {
        let machine = lock(&self.machine);
        (machine.restored || matches!(machine.phase, Phase::Running | Phase::Paused)).then(|| {
            fc_fault("The requested operation is not supported after starting the microVM.")
        })
    }

    /// `PATCH /vm`.
    pub(super) fn firecracker_vm_state(&self, body: Option<&Value>) -> Reply {
        let mut machine = lock(&self.machine);
        if !matches!(machine.phase, Phase::Running | Phase::Paused) {
            return fc_fault(
                "The requested operation is not supported before starting the microVM.",
            );
        }
        match text(body, "state").as_deref() {
            Some("Paused") => machine.phase = Phase::Paused,
            Some("Resumed") => machine.phase = Phase::Running,
            other => return fc_fault(format!("unknown state {other:?}")),
        }
        Reply::Empty(204)
    }

    /// `PUT /snapshot/create`.
    pub(super) fn firecracker_snapshot(&self, body: Option<&Value>) -> Reply {
        let machine = lock(&self.machine).clone();
        if machine.phase != Phase::Paused {
            return fc_fault(format!(
                "Create snapshot error: the microVM must be paused, it is {}",
                machine.phase.firecracker_state()
            ));
        }
        let (Some(state), Some(memory)) =
            (text(body, "snapshot_path"), text(body, "mem_file_path"))
        else {
            return fc_fault("Create snapshot error: missing paths");
        };
        let written = write_json(
            Path::new(&state),
            &marker("firecracker", FIRECRACKER_VERSION, machine.memory_bytes),
        )
        .and_then(|()| write_memory(Path::new(&memory), machine.memory_bytes));
        match written {
            Ok(()) => Reply::Empty(204),
            Err(e) => fc_fault(format!("Create snapshot error: {e}")),
        }
    }

    /// `PUT /snapshot/load`.
    pub(super) fn firecracker_load(&self, body: Option<&Value>) -> Reply {
        let mut machine = lock(&self.machine);
        if machine.phase != Phase::Fresh || machine.restored {
            return fc_fault(
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            );
        }
        let state = text(body, "snapshot_path").unwrap_or_default();
        let memory = body
            .and_then(|b| b["mem_backend"]["backend_path"].as_str())
            .unwrap_or_default()
            .to_owned();
        let loaded = read_marker(Path::new(&state), "firecracker", FIRECRACKER_VERSION)
            .and_then(|bytes| check_memory(Path::new(&memory), bytes).map(|()| bytes));
        match loaded {
            Ok(bytes) => {
                machine.memory_bytes = bytes;
                machine.restored = true;
                machine.phase = if body.is_some_and(|b| b["resume_vm"] == true) {
                    Phase::Running
                } else {
                    Phase::Paused
                };
                Reply::Empty(204)
            }
            Err(e) => fc_fault(format!("Load snapshot error: {e}")),
        }
    }

    /// `vm.pause`.
    pub(super) fn ch_pause(&self) -> Reply {
        self.ch_transition(Phase::Running, Phase::Paused)
    }

    /// `vm.resume`.
    pub(super) fn ch_resume(&self) -> Reply {
        self.ch_transition(Phase::Paused, Phase::Running)
    }

    fn ch_transition(&self, from: Phase, to: Phase) -> Reply {
        let mut machine = lock(&self.machine);
        if machine.config.is_none() {
            return Reply::Empty(404);
        }
        if machine.phase != from {
            return Reply::Empty(405);
        }
        machine.phase = to;
        Reply::Empty(204)
    }

    /// `vm.snapshot`.
    pub(super) fn ch_snapshot(&self, body: Option<&Value>) -> Reply {
        let machine = lock(&self.machine).clone();
        let Some(config) = machine.config else {
            return Reply::Empty(404);
        };
        if machine.phase != Phase::Paused {
            return Reply::Empty(405);
        }
        let written = url_dir(text(body, "destination_url")).and_then(|dir| {
            write_json(&dir.join("config.json"), &config)?;
            write_json(
                &dir.join("state.json"),
                &marker(
                    "cloud-hypervisor",
                    CLOUD_HYPERVISOR_VERSION,
                    machine.memory_bytes,
                ),
            )?;
            write_memory(&dir.join("memory-ranges"), machine.memory_bytes)
        });
        match written {
            Ok(()) => Reply::Empty(204),
            // Not a status the spec lists for vm.snapshot: Cloud Hypervisor's API answers
            // its internal errors with 500.
            Err(e) => ch_fault(
                500,
                &["Error from API", "The VM could not be snapshotted", &e],
            ),
        }
    }

    /// `vm.restore`.
    pub(super) fn ch_restore(&self, body: Option<&Value>) -> Reply {
        if lock(&self.machine).config.is_some() {
            return Reply::Empty(404);
        }
        let loaded = url_dir(text(body, "source_url")).and_then(|dir| {
            let config_path = dir.join("config.json");
            let config: Value = std::fs::read(&config_path)
                .map_err(|e| format!("{}: {e}", config_path.display()))
                .and_then(|t| {
                    serde_json::from_slice(&t)
                        .map_err(|e| format!("{}: {e}", config_path.display()))
                })?;
            let bytes = read_marker(
                &dir.join("state.json"),
                "cloud-hypervisor",
                CLOUD_HYPERVISOR_VERSION,
            )?;
            check_memory(&dir.join("memory-ranges"), bytes)?;
            Ok(config)
        });
        match loaded {
            Ok(config) => {
                self.created(&config);
                let mut machine = lock(&self.machine);
                machine.restored = true;
                machine.phase = if body.is_some_and(|b| b["resume"] == true) {
                    Phase::Running
                } else {
                    Phase::Paused
                };
                Reply::Empty(204)
            }
            Err(e) => ch_fault(400, &["Error from API", "The VM could not be restored", &e]),
        }
    }
}
