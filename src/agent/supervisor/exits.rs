//! Watching a run end: the VMM is reaped when it is the agent's child, polled in `/proc`
//! when it was re-adopted, and its end is classified and recorded.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::*;
use crate::agent::console;
use crate::agent::vmm::{GuestExit, VmmHandle, process};
use crate::vm::RunExit;

/// How often a re-adopted VMM (not our child, so no `wait()`) is checked in `/proc`.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// An exit as recorded in status: the backend's classification for a VM that was up.
pub(crate) fn exit_record(exit: &GuestExit, at_unix_ms: i64) -> RunExit {
    RunExit {
        success: exit.success,
        reason: exit.reason.clone(),
        message: exit.message.clone(),
        permanent: false,
        exit_code: exit.exit_code.unwrap_or(-1),
        at_unix_ms,
    }
}

impl Inner {
    /// Reap a VMM that is our child; on its end, record how it ended.
    pub(super) fn spawn_child_watcher(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        generation: u64,
        mut child: tokio::process::Child,
        exited: watch::Sender<bool>,
    ) {
        let inner = self.clone();
        let slot = slot.clone();
        let watching = self.metrics.watching("wait");
        tokio::spawn(async move {
            let _watching = watching;
            let status = tokio::select! {
                status = child.wait() => status.ok(),
                // The agent stops; the VMM keeps running and is re-adopted by the next one.
                _ = inner.shutdown.cancelled() => return,
            };
            let _ = exited.send(true);
            inner.on_exit(&slot, generation, status);
        });
    }

    /// Watch a VMM that is not our child (re-adopted) through `/proc`.
    pub(super) fn spawn_proc_watcher(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        generation: u64,
        handle: VmmHandle,
        exited: watch::Sender<bool>,
    ) {
        let inner = self.clone();
        let slot = slot.clone();
        let watching = self.metrics.watching("proc");
        tokio::spawn(async move {
            let _watching = watching;
            loop {
                if !process::is_alive(&handle) {
                    break;
                }
                tokio::select! {
                    _ = inner.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ADOPTED_POLL) => {}
                }
            }
            let _ = exited.send(true);
            inner.on_exit(&slot, generation, None);
        });
    }

    /// The VMM ended on its own: EXITED if the guest was up, FAILED if it never got ready.
    pub(super) fn on_exit(
        self: &Arc<Self>,
        slot: &Arc<VmSlot>,
        generation: u64,
        status: Option<std::process::ExitStatus>,
    ) {
        let (run, ready, console_log) = {
            let rt = slot.lock();
            let Some(run) = rt.run.clone() else { return };
            if rt.deleted
                || run.generation != generation
                || run.stopping.swap(true, Ordering::SeqCst)
            {
                // Someone is stopping it on purpose and records the outcome.
                return;
            }
            let console_log = run.handle.console_log.clone();
            (run, rt.status.ready, console_log)
        };
        let tail = console::tail_text(&console_log, CONSOLE_TAIL);
        let exit = run
            .backend
            .classify_exit(&run.handle, status, &tail)
            .seen_ending_unreaped();
        tracing::info!(uid = %slot.uid, reason = %exit.reason, ready, "VMM exited");
        let record = exit_record(&exit, crate::time::now_unix_ms());
        if ready {
            let _ = std::fs::remove_file(&run.handle.api_socket);
            self.update(slot, Some(generation), |rt| {
                if let Some(run) = rt.run.take() {
                    run.cancel.cancel();
                }
                rt.status.state = RunState::Exited;
                rt.status.ready = false;
                rt.status.exit = Some(record);
            });
        } else {
            self.metrics.boot_failed(exit.reason.as_str());
            self.fail_with(slot, Some(generation), record);
            self.spawn_release_if_failed(slot);
        }
    }
}
