//! Re-adoption at agent start: every VM of the state directory is held again. A VMM still
//! running (same pid, same start time) is watched again; one that ended while the agent was
//! down is reported as exited; a run the agent cannot trust is failed as lost.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::agent::console;
use crate::agent::state::{ExitRecord, Phase, SpecRecord};
use crate::agent::vmm::process;
use crate::api::Hypervisor;

impl Inner {
    pub(super) async fn adopt_one(self: &Arc<Self>, uid: &str) {
        let status = match self.store.read_status(uid) {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => {
                // A directory without a (valid) status: a crash before the first record.
                if let Ok(Some(handle)) = self.store.read_handle(uid) {
                    force_kill(&handle);
                }
                tracing::warn!(uid, "removing a VM directory without status");
                let _ = self.store.remove_vm(uid);
                return;
            }
        };
        let spec = self
            .store
            .read_spec(uid)
            .ok()
            .flatten()
            .unwrap_or_else(|| SpecRecord {
                uid: status.uid.clone(),
                namespace: status.namespace.clone(),
                name: status.name.clone(),
                spec_hash: status.spec_hash.clone(),
                run: status.run,
                vcpus: status.vcpus,
                memory_bytes: status.memory_bytes,
                ..Default::default()
            });
        let slot = self.slot_or_insert(uid);
        let phase = status.phase;
        {
            let mut rt = slot.lock();
            rt.spec = spec.clone();
            rt.status = status.clone();
        }
        if phase.is_ended() {
            self.update(&slot, None, |_| {});
            return;
        }
        let handle = self.store.read_handle(uid).ok().flatten();
        let backend = parse_hypervisor(&status.hypervisor)
            .ok()
            .flatten()
            .and_then(|kind| self.backend(kind))
            .map(|b| b.backend.clone());
        let Some(handle) = handle else {
            return self.fail_with(
                &slot,
                None,
                lost("the agent stopped before the VMM was started"),
            );
        };
        let Some(backend) = backend else {
            force_kill(&handle);
            return self.fail_with(
                &slot,
                None,
                lost(&format!(
                    "hypervisor {:?} is not available to this agent any more",
                    status.hypervisor
                )),
            );
        };
        if !process::is_alive(&handle) {
            let tail = console::tail_text(&handle.console_log, CONSOLE_TAIL);
            let exit = backend
                .classify_exit(&handle, None, &tail)
                .seen_dead_at_adoption();
            tracing::info!(
                uid,
                reason = %exit.reason,
                "VMM ended while the agent was down"
            );
            let _ = std::fs::remove_file(&handle.api_socket);
            let record = exit_record(&exit, crate::time::now_unix_ms());
            self.update(&slot, None, |rt| {
                rt.status.phase = Phase::Exited;
                rt.status.ready = false;
                rt.status.pid = 0;
                rt.status.exit = Some(record);
            });
            return;
        }
        if phase == Phase::Creating {
            // It never got its start call: it cannot be trusted to be configured.
            force_kill(&handle);
            return self.fail_with(
                &slot,
                None,
                lost("the agent stopped while the VM was being created"),
            );
        }
        let generation = self.next_generation();
        let (exited_tx, exited_rx) = watch::channel(false);
        let run = RunHandle {
            generation,
            backend: backend.clone(),
            handle: handle.clone(),
            exited: exited_rx,
            stopping: Arc::new(AtomicBool::new(false)),
            cancel: CancellationToken::new(),
        };
        self.update(&slot, None, |rt| rt.run = Some(run.clone()));
        tracing::info!(
            uid,
            pid = handle.pid,
            phase = phase.as_str(),
            "re-adopted VMM"
        );
        Self::spawn_proc_watcher(self, &slot, generation, handle.clone(), exited_tx);
        if phase == Phase::Starting {
            let elapsed =
                u64::try_from(crate::time::now_unix_ms() - status.started_at_unix_ms).unwrap_or(0);
            let left = self
                .config
                .boot_timeout
                .saturating_sub(Duration::from_millis(elapsed));
            let kind = parse_hypervisor(&status.hypervisor)
                .ok()
                .flatten()
                .unwrap_or(Hypervisor::Qemu);
            Self::spawn_readiness(
                self,
                &slot,
                &run,
                Readiness::of(&spec, kind, &status.ip_addresses),
                handle.console_log.clone(),
                Instant::now() + left.max(Duration::from_secs(1)),
            );
        }
    }
}

/// The failure recorded for a VM whose run the agent lost track of.
pub(super) fn lost(message: &str) -> ExitRecord {
    ExitRecord {
        success: false,
        reason: "VmmLost".into(),
        message: message.to_owned(),
        permanent: false,
        exit_code: -1,
        at_unix_ms: crate::time::now_unix_ms(),
    }
}
