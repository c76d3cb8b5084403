//! The guest's serial output for `kubectl logs`: the agent copies the VM's console log into
//! the launcher's emptyDir (`serial.log`), which `ignis vm-pod` prints, and marks the end of the
//! run there (`stopped`).
//!
//! A pump in the agent, not a second sink in the VMM: the VMM may run as an unprivileged uid
//! that cannot reach another container's files (`/proc/<pid>/root` needs ptrace rights over
//! the launcher), every VMM (not only QEMU) writes its console to one file already, and the
//! console log keeps serving readiness and the Console RPC as it is. The pump keeps its
//! position in the VM's state directory, so an agent restart resumes where it stopped instead
//! of printing the log again. `serial.log` is capped by renaming it to `serial.log.1` (the
//! launcher, following by name like `tail -F`, finishes the old file first).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::console::LogCursor;

/// The copy of the serial console in the launcher's emptyDir.
pub const SERIAL_LOG: &str = "serial.log";
/// Where the copy goes once it is over the cap.
pub const SERIAL_LOG_OLD: &str = "serial.log.1";
/// Present once the VM's run has ended.
pub const STOPPED: &str = "stopped";
/// The pump's position in the console log, in the VM's state directory.
pub(crate) const OFFSET_FILE: &str = "serial.offset";
/// How often new console output is copied.
const PUMP_INTERVAL: Duration = Duration::from_millis(100);
/// Most bytes copied in one read.
const CHUNK: u64 = 1 << 20;

/// One VM run's copy of its console into its pod.
#[derive(Clone, Debug)]
pub(crate) struct Pump {
    /// The agent's console log of the VM.
    pub(crate) console_log: PathBuf,
    /// The launcher's `/run/ignis` as the agent sees it.
    pub(crate) console_dir: PathBuf,
    /// Where the position is kept (`<vm dir>/serial.offset`).
    pub(crate) offset_file: PathBuf,
    /// `serial.log` is moved aside past this size.
    pub(crate) max_bytes: u64,
}

impl Pump {
    /// A new run begins: it is not stopped, and its output starts at the console log's start.
    pub(crate) fn begin_run(&self) {
        let _ = std::fs::remove_file(self.console_dir.join(STOPPED));
        let _ = std::fs::remove_file(&self.offset_file);
    }

    /// Copy until the run ends (`ended`: then the rest is copied and `stopped` written) or the
    /// agent stops (`shutdown`: the VM runs on; the next agent resumes).
    pub(crate) async fn run(self, ended: CancellationToken, shutdown: CancellationToken) {
        let saved = std::fs::read_to_string(&self.offset_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut cursor = LogCursor::new(&self.console_log, Some(saved));
        loop {
            self.copy(&mut cursor);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ended.cancelled() => break,
                _ = tokio::time::sleep(PUMP_INTERVAL) => {}
            }
        }
        self.copy(&mut cursor);
        mark_stopped(&self.console_dir);
    }

    /// Copy what is new; failures are logged and retried at the next tick.
    fn copy(&self, cursor: &mut LogCursor) {
        loop {
            let chunk = match cursor.read_new(CHUNK) {
                Ok(chunk) if chunk.is_empty() => return,
                Ok(chunk) => chunk,
                Err(error) => {
                    tracing::debug!(%error, "cannot read the console log for the pod");
                    return;
                }
            };
            if let Err(error) = self.append(&chunk) {
                tracing::warn!(dir = %self.console_dir.display(), %error, "cannot copy the console into the VM pod");
                return;
            }
            let _ = std::fs::write(&self.offset_file, cursor.offset().to_string());
        }
    }

    fn append(&self, chunk: &[u8]) -> std::io::Result<()> {
        let path = self.console_dir.join(SERIAL_LOG);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() >= self.max_bytes) {
            std::fs::rename(&path, self.console_dir.join(SERIAL_LOG_OLD))?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?
            .write_all(chunk)
    }
}

/// Say in the pod that the VM's run has ended (`ignis vm-pod` may exit on SIGTERM then).
pub(crate) fn mark_stopped(console_dir: &Path) {
    if let Err(error) = std::fs::write(console_dir.join(STOPPED), b"") {
        tracing::debug!(dir = %console_dir.display(), %error, "cannot mark the VM pod stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pump(dir: &Path, max_bytes: u64) -> Pump {
        let console_dir = dir.join("run-ignis");
        std::fs::create_dir_all(&console_dir).expect("dir");
        Pump {
            console_log: dir.join("console.log"),
            console_dir,
            offset_file: dir.join(OFFSET_FILE),
            max_bytes,
        }
    }

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn append(path: &Path, text: &str) {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .expect("append");
    }

    #[tokio::test]
    async fn the_console_reaches_the_pod_once_across_an_agent_restart_and_ends_stopped() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pump = pump(tmp.path(), 1 << 20);
        let serial = pump.console_dir.join(SERIAL_LOG);
        std::fs::write(pump.console_dir.join(STOPPED), b"").expect("an earlier run");
        pump.begin_run();
        assert!(!pump.console_dir.join(STOPPED).exists());
        append(&pump.console_log, "booting\n");

        let (ended, shutdown) = (CancellationToken::new(), CancellationToken::new());
        let first = tokio::spawn(pump.clone().run(ended.clone(), shutdown.clone()));
        let read = || std::fs::read_to_string(&serial).unwrap_or_default();
        eventually("first line", || read() == "booting\n").await;
        // The agent stops: the VM runs on and prints while no agent copies.
        shutdown.cancel();
        first.await.expect("pump");
        assert!(!pump.console_dir.join(STOPPED).exists());
        append(&pump.console_log, "while the agent was away\n");

        let shutdown = CancellationToken::new();
        let second = tokio::spawn(pump.clone().run(ended.clone(), shutdown));
        eventually("resumed", || {
            read() == "booting\nwhile the agent was away\n"
        })
        .await;
        append(&pump.console_log, "poweroff\n");
        ended.cancel();
        second.await.expect("pump");
        assert_eq!(read(), "booting\nwhile the agent was away\npoweroff\n");
        assert!(pump.console_dir.join(STOPPED).exists());
    }

    #[tokio::test]
    async fn a_full_serial_log_is_moved_aside_not_cut() {
        let tmp = tempfile::tempdir().expect("tmp");
        let pump = pump(tmp.path(), 8);
        append(&pump.console_log, "0123456789\n");
        let ended = CancellationToken::new();
        let task = tokio::spawn(pump.clone().run(ended.clone(), CancellationToken::new()));
        let serial = pump.console_dir.join(SERIAL_LOG);
        eventually("first", || serial.exists()).await;
        append(&pump.console_log, "next\n");
        eventually("moved", || pump.console_dir.join(SERIAL_LOG_OLD).exists()).await;
        ended.cancel();
        task.await.expect("pump");
        let old = std::fs::read_to_string(pump.console_dir.join(SERIAL_LOG_OLD)).expect("old");
        assert_eq!(old, "0123456789\n");
        assert_eq!(std::fs::read_to_string(serial).expect("new"), "next\n");
    }
}
