//! Ending a run on purpose: graceful stop, the grace period, kill, SIGKILL. Whoever first
//! sets the run's `stopping` flag owns its teardown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::*;
use crate::agent::vmm::{API_TIMEOUT, VmmHandle, process};

/// How long a killed VMM gets to disappear before the agent SIGKILLs the pid itself.
const KILL_WAIT: Duration = Duration::from_secs(5);

impl Inner {
    /// Stop the slot's run: graceful stop, `grace`, kill, SIGKILL. Returns whether a VMM ran.
    ///
    /// A guest that never became ready is killed at once: it is still booting (or stuck), so
    /// it cannot honour an ACPI power button or Ctrl-Alt-Del, and waiting the grace period
    /// for it only delays the delete (20 create/delete cycles of one name took 528 s).
    pub(super) async fn stop_run(self: &Arc<Self>, slot: &Arc<VmSlot>, grace: Duration) -> bool {
        let (run, ready) = {
            let rt = slot.lock();
            (rt.run.clone(), rt.status.ready)
        };
        let Some(run) = run else {
            return false;
        };
        let first = !run.stopping.swap(true, Ordering::SeqCst);
        if first {
            self.update(slot, Some(run.generation), |rt| {
                if !rt.status.state.is_ended() {
                    rt.status.state = RunState::Stopping;
                }
            });
        }
        run.cancel.cancel();
        let mut exited = run.exited.clone();
        if !Self::has_exited(&run, &mut exited) && !ready {
            tracing::info!(uid = %slot.uid, "the guest never became ready: killing it without a graceful stop");
            Self::kill_and_wait(&run).await;
        } else if !Self::has_exited(&run, &mut exited) {
            match tokio::time::timeout(API_TIMEOUT, run.backend.stop(&run.handle)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::info!(uid = %slot.uid, error = %error, "graceful stop refused; will kill")
                }
                Err(_) => {
                    tracing::info!(uid = %slot.uid, "graceful stop did not answer; will kill")
                }
            }
            if !Self::wait_exited(&run, &mut exited, grace).await {
                Self::kill_and_wait(&run).await;
            }
        }
        let _ = std::fs::remove_file(&run.handle.api_socket);
        let mut rt = slot.lock();
        if rt.run.as_ref().map(|r| r.generation) == Some(run.generation) {
            rt.run = None;
        }
        rt.status.pid = 0;
        true
    }

    pub(super) fn has_exited(run: &RunHandle, exited: &mut watch::Receiver<bool>) -> bool {
        *exited.borrow_and_update() || !process::is_alive(&run.handle)
    }

    pub(super) async fn wait_exited(
        run: &RunHandle,
        exited: &mut watch::Receiver<bool>,
        within: Duration,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if Self::has_exited(run, exited) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Re-check /proc at least every 100 ms: the watcher may be gone (agent stopping).
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(100)), exited.changed()).await;
        }
    }

    /// Kill through the backend, then by pid if the VMM is still there.
    pub(super) async fn kill_and_wait(run: &RunHandle) {
        let mut exited = run.exited.clone();
        let _ = tokio::time::timeout(API_TIMEOUT, run.backend.kill(&run.handle)).await;
        if Self::wait_exited(run, &mut exited, KILL_WAIT).await {
            return;
        }
        force_kill(&run.handle);
        if !Self::wait_exited(run, &mut exited, KILL_WAIT).await {
            tracing::error!(pid = run.handle.pid, "VMM survived SIGKILL");
        }
    }
}

/// SIGKILL the VMM, only if the handle still names it.
pub(super) fn force_kill(handle: &VmmHandle) {
    if let Err(error) = process::signal(handle, nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!(pid = handle.pid, %error, "SIGKILL failed");
    }
}

/// [`kill_strays`] now and every 100 ms until `within` has passed: for a create cut short,
/// whose VMM may still be between fork and exec (not yet naming the VM) when it is abandoned.
pub(super) async fn sweep_strays(store: &StateStore, uid: &VmUid, within: Duration) -> usize {
    let until = tokio::time::Instant::now() + within;
    let mut killed = kill_strays(store, uid, None).await;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        killed += kill_strays(store, uid, None).await;
    }
    killed
}

/// Kill every VMM whose command line names the VM's API socket, but `keep`: VMMs the agent
/// holds no handle of (a missing or corrupt `handle.json`), so none outlives adoption or
/// delete. Returns how many were killed.
pub(super) async fn kill_strays(store: &StateStore, uid: &VmUid, keep: Option<u32>) -> usize {
    let strays: Vec<VmmHandle> =
        process::find_by_api_socket(&store.api_socket(uid), &store.console_log(uid))
            .into_iter()
            .filter(|h| Some(h.pid) != keep)
            .collect();
    for stray in &strays {
        tracing::warn!(%uid, pid = stray.pid, "killing a VMM of this VM that the agent does not hold");
        if let Err(error) = process::kill(stray).await {
            tracing::error!(%uid, pid = stray.pid, %error, "a stray VMM survived SIGKILL");
        }
    }
    strays.len()
}
