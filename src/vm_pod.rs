//! `ignis vm-pod`: the one container of a VM pod. The agent boots the VM into the pod's
//! sandbox and copies the guest's serial console into this container's emptyDir
//! (`serial.log`); this command prints it to stdout, so `kubectl logs` shows the console. It
//! follows the file by name (the agent moves a full one to `serial.log.1` and starts a new
//! one: the old one is finished first) and from its start, so a restarted container prints
//! the console again from what the file holds.
//!
//! On SIGTERM (the pod is being deleted) it keeps printing until the agent says the VM has
//! stopped (`stopped` appears), then exits 0 — or exits 0 after `--stop-wait`, so the kubelet
//! never has to kill it.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::agent::pod::console::{SERIAL_LOG, STOPPED};

/// How often the file is looked at.
const POLL: Duration = Duration::from_millis(100);
/// After `stopped` appears, how long the last output still has to arrive.
const LAST_WORDS: Duration = Duration::from_millis(300);

/// Flags of `ignis vm-pod`.
#[derive(Clone, Debug, clap::Args)]
pub struct VmPodArgs {
    /// The emptyDir the agent writes the guest's console into.
    #[arg(long, default_value = "/run/ignis")]
    pub console_dir: PathBuf,
    /// After SIGTERM, how long to wait for the VM to stop before exiting anyway.
    #[arg(long, default_value = "60s", value_parser = crate::time::parse_duration)]
    pub stop_wait: Duration,
}

/// Run `ignis vm-pod` until SIGTERM (`shutdown`) and the VM's end.
pub async fn run(args: VmPodArgs, shutdown: CancellationToken) -> std::io::Result<()> {
    follow(
        &args.console_dir,
        &mut std::io::stdout(),
        shutdown,
        args.stop_wait,
    )
    .await
}

/// The file being printed: the open file, its inode and how far it was printed.
struct Followed {
    file: std::fs::File,
    inode: u64,
    position: u64,
}

/// Print `dir/serial.log` to `out` as it grows, until `shutdown` and then `stopped` (or
/// `stop_wait` after `shutdown`).
pub(crate) async fn follow(
    dir: &Path,
    out: &mut impl Write,
    shutdown: CancellationToken,
    stop_wait: Duration,
) -> std::io::Result<()> {
    let path = dir.join(SERIAL_LOG);
    let mut followed: Option<Followed> = None;
    let mut give_up_at = None;
    loop {
        print_new(&path, &mut followed, out)?;
        if shutdown.is_cancelled() {
            let now = tokio::time::Instant::now();
            let give_up = *give_up_at.get_or_insert(now + stop_wait);
            if dir.join(STOPPED).exists() {
                tokio::time::sleep(LAST_WORDS).await;
                return print_new(&path, &mut followed, out);
            }
            if now >= give_up {
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.cancelled(), if !shutdown.is_cancelled() => {}
        }
    }
}

/// Print what is new: the rest of the open file, then, if the name now holds another file
/// (rotated), that one from its start.
fn print_new(
    path: &Path,
    followed: &mut Option<Followed>,
    out: &mut impl Write,
) -> std::io::Result<()> {
    loop {
        if let Some(current) = followed.as_mut() {
            let size = current.file.metadata()?.len();
            if size < current.position {
                // Cut short in place: what is there now is new.
                current.position = 0;
            }
            current.file.seek(SeekFrom::Start(current.position))?;
            let mut buf = Vec::new();
            current.file.read_to_end(&mut buf)?;
            current.position += buf.len() as u64;
            if !buf.is_empty() {
                out.write_all(&buf)?;
                out.flush()?;
            }
        }
        let Ok(named) = std::fs::File::open(path) else {
            return Ok(());
        };
        let inode = named.metadata()?.ino();
        if followed.as_ref().is_some_and(|f| f.inode == inode) {
            return Ok(());
        }
        *followed = Some(Followed {
            file: named,
            inode,
            position: 0,
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A writer the test can read while `follow` writes.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
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

    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_console_is_printed_from_its_start_across_a_rotation_until_stopped() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().to_path_buf();
        let out = Shared::default();
        let shutdown = CancellationToken::new();
        let task = {
            let (dir, mut out, shutdown) = (dir.clone(), out.clone(), shutdown.clone());
            tokio::spawn(
                async move { follow(&dir, &mut out, shutdown, Duration::from_secs(30)).await },
            )
        };
        // The file appears only once the agent has the VM booting.
        tokio::time::sleep(Duration::from_millis(250)).await;
        let serial = dir.join(SERIAL_LOG);
        append(&serial, "[    0.000000] Linux version\n");
        eventually("first line", || out.text().contains("Linux version")).await;
        // The agent moves the full file aside and starts a new one.
        append(&serial, "old tail\n");
        std::fs::rename(&serial, dir.join("serial.log.1")).expect("rotate");
        append(&serial, "new head\n");
        eventually("new file", || out.text().ends_with("new head\n")).await;
        assert_eq!(
            out.text(),
            "[    0.000000] Linux version\nold tail\nnew head\n"
        );

        // SIGTERM: still printing until the VM has stopped.
        shutdown.cancel();
        append(&serial, "reboot: Power down\n");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "exited before the VM stopped");
        std::fs::write(dir.join(STOPPED), b"").expect("stopped");
        let done = tokio::time::timeout(Duration::from_secs(5), task).await;
        done.expect("exits once stopped")
            .expect("task")
            .expect("ok");
        assert!(
            out.text().ends_with("reboot: Power down\n"),
            "{}",
            out.text()
        );
    }

    #[tokio::test]
    async fn without_a_stop_it_gives_up_at_the_bound_after_sigterm() {
        let tmp = tempfile::tempdir().expect("tmp");
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        let mut out = Shared::default();
        follow(tmp.path(), &mut out, shutdown, Duration::from_millis(300))
            .await
            .expect("ok");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(out.text(), "");
    }
}
