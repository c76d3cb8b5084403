//! Re-adoption at agent start: every VM of the state directory is held again. A VMM still
//! running (same pid, same start time) is watched again; one that ended while the agent was
//! down is reported as exited; a run the agent cannot trust is failed as lost.
//!
//! A state file can be missing, empty or corrupt (a full disk, a crash between writes, a
//! person). Whatever the files say, adoption ends with at most one VMM per VM: the VMMs are
//! also looked up by the API socket their command line names (every backend passes it, and it
//! lives in the VM's own directory). Without a usable `handle.json` a single one found is
//! adopted; any other is killed; the bad file is logged, and the status says what was found.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stop::kill_strays;
use super::*;
use crate::agent::console;
use crate::agent::vmm::{VmmHandle, process};
use crate::vm::{ExitReason, RunExit};

/// What the state directory and `/proc` tell about a VM's VMM.
enum Found {
    /// `handle.json` names it (alive or not); any other VMM of the VM was killed.
    Handle(VmmHandle),
    /// No usable `handle.json`, and exactly this VMM names the VM's socket.
    Recovered(VmmHandle),
    /// No VMM runs for the VM (any found was killed): what happened, truthfully.
    Nothing(String),
}

impl Inner {
    pub(super) async fn adopt_one(self: &Arc<Self>, uid: &VmUid) {
        let status = match self.store.read_status(uid) {
            Ok(Some(status)) => status,
            read => {
                // A directory without a (valid) status: a crash before the first record, or a
                // damaged file. Nothing of it can be trusted, so nothing of it may run on.
                if let Err(error) = &read {
                    tracing::warn!(%uid, error = %crate::error::chain(error), "unreadable VM status");
                }
                if let Ok(Some(handle)) = self.store.read_handle(uid) {
                    force_kill(&handle);
                }
                kill_strays(&self.store, uid, None).await;
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
        self.publish_metadata(&slot);
        if let Some(request) = request.as_ref()
            && let Some(pod) = request.pod.as_ref()
        {
            let on_pod_network = request
                .spec
                .interfaces
                .iter()
                .any(|i| i.mode == crate::vm::InterfaceMode::Pod);
            self.readopt_pod(&slot, pod, on_pod_network);
        }
        if state == RunState::Suspending {
            // Cut short mid-save: the snapshot may be partial and the guest is paused.
            if let Ok(Some(handle)) = self.store.read_handle(uid) {
                force_kill(&handle);
            }
            kill_strays(&self.store, uid, None).await;
            let _ = self.store.remove_snapshot(uid);
            return self.fail_with(
                &slot,
                None,
                lost("the agent stopped while the VM was being suspended"),
            );
        }
        if state.is_ended() || state == RunState::Suspended {
            // An ended or suspended run has no VMM.
            kill_strays(&self.store, uid, None).await;
            self.update(&slot, None, |_| {});
            return;
        }
        if let (RunState::Creating, Some(_), Some(request)) =
            (state, &status.pulling, request.clone())
        {
            return self.resume_pull(&slot, request);
        }
        let backend = status
            .hypervisor
            .and_then(|kind| self.backend(kind))
            .map(|b| b.backend.clone());
        let handle = match self.find_vmm(uid, status.pid != 0).await {
            Found::Handle(handle) => handle,
            Found::Recovered(handle) => {
                if let Err(error) = self.store.write_handle(uid, &handle) {
                    tracing::warn!(%uid, error = %crate::error::chain(&error), "cannot rewrite handle.json");
                }
                handle
            }
            Found::Nothing(message) => return self.fail_with(&slot, None, lost(&message)),
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
        self.spawn_pod_console(&slot, &run);
        self.spawn_pod_metadata(&slot, &run);
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

impl Inner {
    /// The VM's VMM, from `handle.json` or else from the processes naming its socket; every
    /// other VMM of the VM is killed. `started`: the status recorded a VMM's pid.
    async fn find_vmm(&self, uid: &VmUid, started: bool) -> Found {
        let bad_file = match self.store.read_handle(uid) {
            Ok(Some(handle)) => {
                kill_strays(&self.store, uid, Some(handle.pid)).await;
                return Found::Handle(handle);
            }
            Ok(None) => None,
            Err(error) => {
                let error = crate::error::chain(&error);
                tracing::warn!(%uid, %error, "unreadable VMM handle; looking for the VMM by its API socket");
                Some(error)
            }
        };
        let live =
            process::find_by_api_socket(&self.store.api_socket(uid), &self.store.console_log(uid));
        let what = match &bad_file {
            Some(error) => error.clone(),
            None => "handle.json is missing".to_owned(),
        };
        match live.as_slice() {
            [] if bad_file.is_none() && !started => {
                Found::Nothing("the agent stopped before the VMM was started".to_owned())
            }
            [] => Found::Nothing(format!(
                "{what}, and no VMM of this VM was running: it ended while the agent was down"
            )),
            [handle] => {
                tracing::warn!(%uid, pid = handle.pid, "found the VM's VMM by its API socket; adopting it");
                Found::Recovered(handle.clone())
            }
            many => {
                let killed = kill_strays(&self.store, uid, None).await;
                tracing::warn!(%uid, found = many.len(), killed, "{what}: several VMMs of one VM; killed them all");
                Found::Nothing(format!(
                    "{what}, and {} VMMs of this VM were running: all were killed",
                    many.len()
                ))
            }
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
