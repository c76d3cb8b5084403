//! Re-adoption at agent start: every VM of the state directory is held again. A VMM still
//! running (same pid, same start time) is watched again; one that ended while the agent was
//! down is reported as exited; a run the agent cannot trust is failed as lost.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::agent::console;
use crate::agent::vmm::process;
use crate::vm::{ExitReason, RunExit};

impl Inner {
    pub(super) async fn adopt_one(self: &Arc<Self>, uid: &VmUid) {
        let status = match self.store.read_status(uid) {
            Ok(Some(status)) => status,
            Ok(None) | Err(_) => {
                // A directory without a (valid) status: a crash before the first record.
                if let Ok(Some(handle)) = self.store.read_handle(uid) {
                    force_kill(&handle);
                }
                tracing::warn!(%uid, "removing a VM directory without status");
                let _ = self.store.remove_vm(uid);
                return;
            }
        };
        // Without its spec (a crash before it was written) the VM is still held: it can be
        // stopped (with no grace period) and deleted, and its readiness is its start.
        let request = self.store.read_spec(uid).ok().flatten();
        let slot = self.slot_or_insert(uid);
        let state = status.state;
        {
            let mut rt = slot.lock();
            rt.request = request.clone();
            rt.status = status.clone();
            rt.recorded = true;
        }
        if state.is_ended() {
            self.update(&slot, None, |_| {});
            return;
        }
        if let (RunState::Creating, Some(_), Some(request)) =
            (state, &status.pulling, request.clone())
        {
            return self.resume_pull(&slot, request);
        }
        let handle = self.store.read_handle(uid).ok().flatten();
        let backend = status
            .hypervisor
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
                lost(&match status.hypervisor {
                    Some(kind) => {
                        format!("hypervisor {kind} is not available to this agent any more")
                    }
                    None => "the VM's hypervisor was never recorded".to_owned(),
                }),
            );
        };
        if !process::is_alive(&handle) {
            let tail = console::tail_text(&handle.console_log, CONSOLE_TAIL);
            let exit = backend
                .classify_exit(&handle, None, &tail)
                .seen_dead_at_adoption();
            tracing::info!(
                %uid,
                reason = %exit.reason,
                "VMM ended while the agent was down"
            );
            let _ = std::fs::remove_file(&handle.api_socket);
            let record = exit_record(&exit, crate::time::now_unix_ms());
            self.update(&slot, None, |rt| {
                rt.status.state = RunState::Exited;
                rt.status.ready = false;
                rt.status.pid = 0;
                rt.status.exit = Some(record);
            });
            return;
        }
        if state == RunState::Creating {
            // It never got its start call: it cannot be trusted to be configured.
            force_kill(&handle);
            return self.fail_with(
                &slot,
                None,
                lost("the agent stopped while the VM was being created"),
            );
        }
        let (run, exited_tx) = self.new_run(&backend, &handle);
        let generation = run.generation;
        self.update(&slot, None, |rt| rt.run = Some(run.clone()));
        tracing::info!(
            %uid,
            pid = handle.pid,
            state = state.as_str(),
            "re-adopted VMM"
        );
        Self::spawn_proc_watcher(self, &slot, generation, handle.clone(), exited_tx);
        if state == RunState::Starting {
            let elapsed =
                u64::try_from(crate::time::now_unix_ms() - status.started_at_unix_ms).unwrap_or(0);
            let left = self
                .config
                .boot_timeout
                .saturating_sub(Duration::from_millis(elapsed));
            let kind = status.hypervisor.unwrap_or(Hypervisor::Qemu);
            let readiness = match &request {
                Some(request) => Readiness::of(&request.spec, kind, &status.ip_addresses),
                None => Readiness::Immediate,
            };
            Self::spawn_readiness(
                self,
                &slot,
                &run,
                readiness,
                handle.console_log.clone(),
                Instant::now() + left.max(Duration::from_secs(1)),
            );
        }
    }
}

/// The failure recorded for a VM whose run the agent lost track of.
pub(super) fn lost(message: &str) -> RunExit {
    RunExit {
        success: false,
        reason: ExitReason::VmmLost,
        message: message.to_owned(),
        permanent: false,
        exit_code: -1,
        at_unix_ms: crate::time::now_unix_ms(),
    }
}
