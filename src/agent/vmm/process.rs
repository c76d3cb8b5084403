//! A VMM as a process, the same for every backend: find its binary, start it in a process
//! group of its own (so signals aimed at the agent miss it and it outlives an agent restart),
//! tell whether it still runs (by pid and start time, so a reused pid is never mistaken for
//! it; a zombie has ended), stop or kill it, and read the end of its own log.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use command_fds::CommandFdExt;
pub use command_fds::FdMapping;
use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::jailer;
pub use super::jailer::Confinement;
use super::{API_TIMEOUT, VmmError, VmmHandle};
use crate::agent::{console, host};

/// The VMM's own output (stderr, and stdout unless the guest console goes there; Firecracker's
/// `--log-path`), in the VM's state directory. Never the guest's: that is the console log.
pub(crate) const VMM_LOG: &str = "vmm.log";

/// How much of the VMM's log an error message or an exit classification reads.
const LOG_TAIL_BYTES: u64 = 2048;

/// How often [`kill`] looks whether the VMM is gone.
const KILL_POLL: Duration = Duration::from_millis(10);

/// Find a VMM binary: a path (anything with a `/`) must be an executable file; a bare name is
/// looked up in `PATH`. Permission bits are checked because the agent runs as root, for which
/// a non-executable file would still open.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf, VmmError> {
    let not_found = || VmmError::BinaryNotFound {
        path: binary.to_path_buf(),
    };
    if binary.as_os_str().is_empty() {
        return Err(not_found());
    }
    if binary.components().count() > 1 || binary.is_absolute() {
        return is_executable(binary)
            .then(|| binary.to_path_buf())
            .ok_or_else(not_found);
    }
    let path_var = std::env::var_os("PATH").ok_or_else(not_found)?;
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(not_found)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where one of the VMM's output streams goes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Output<'a> {
    /// Discarded.
    Null,
    /// Appended to this file (created when missing).
    Append(&'a Path),
}

impl Output<'_> {
    fn open(self) -> std::io::Result<Stdio> {
        match self {
            Output::Null => Ok(Stdio::null()),
            Output::Append(path) => std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(Stdio::from),
        }
    }
}

/// Start a VMM in a process group of its own. The child is never killed on drop: a VMM
/// outlives the agent that started it.
///
/// With a [`Confinement`] (every VM's VMM), the VMM is started through `ignis jailer`, which
/// joins its cgroups (the confinement's, else the node-level VMM cgroup of `agent::cgroup`),
/// enters its network namespace and drops to its uid and gid before it execs the VMM, so the
/// VMM is confined from its first instruction. Without one (benchmark baselines, the simulated
/// VMM) it is started as the agent's child and, in a cluster, moved out of the agent's
/// container cgroup (or killed when that fails, since it would die with the agent's container
/// otherwise).
///
/// `fds` are files the agent opened for the VMM: each lands at its `child_fd` in the VMM's
/// descriptor table (mapped in the forked child only, so no other process the agent spawns
/// meanwhile inherits them).
pub(crate) fn spawn(
    binary: &Path,
    args: impl IntoIterator<Item = impl AsRef<OsStr>>,
    stdout: Output<'_>,
    stderr: Output<'_>,
    confinement: Option<&Confinement>,
    fds: Vec<FdMapping>,
) -> Result<tokio::process::Child, VmmError> {
    spawn_jailed(binary, args, stdout, stderr, confinement, None, fds)
}

/// [`spawn`], and with a confinement and a [`Jail`](jailer::Jail), the VMM runs jailed: in
/// new mount and pid namespaces, chrooted into the jail (Firecracker's jailer semantics). The
/// child the agent gets is then the jail's stage one, the VMM's parent, which ends as the VMM
/// ends and kills it when killed; the VMM's process group is its.
pub(crate) fn spawn_jailed(
    binary: &Path,
    args: impl IntoIterator<Item = impl AsRef<OsStr>>,
    stdout: Output<'_>,
    stderr: Output<'_>,
    confinement: Option<&Confinement>,
    jail: Option<&jailer::Jail>,
    fds: Vec<FdMapping>,
) -> Result<tokio::process::Child, VmmError> {
    let spawn_error = |source| VmmError::Spawn {
        binary: binary.to_path_buf(),
        source,
    };
    let mut command = match confinement {
        Some(confinement) => {
            let mut confinement = confinement.clone();
            if confinement.cgroups.is_empty() {
                confinement.cgroups = crate::agent::cgroup::vmm_dirs().map_err(spawn_error)?;
            }
            let mut command = tokio::process::Command::new(jailer::binary().map_err(spawn_error)?);
            let groups = jailer::device_groups();
            command.args(jailer::wrapper_args(
                &confinement,
                &groups,
                None,
                jail,
                binary,
                args,
            ));
            command
        }
        None => {
            let mut command = tokio::process::Command::new(binary);
            command.args(args);
            command
        }
    };
    if !fds.is_empty() {
        command.fd_mappings(fds).map_err(|e| {
            spawn_error(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                e.to_string(),
            ))
        })?;
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout.open().map_err(spawn_error)?)
        .stderr(stderr.open().map_err(spawn_error)?)
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(spawn_error)?;
    if confinement.is_none()
        && let Some(pid) = child.id()
        && let Err(source) = crate::agent::cgroup::place(pid)
    {
        let _ = child.start_kill();
        return Err(VmmError::Io {
            operation: "move the VMM out of the agent's cgroup".to_owned(),
            source,
        });
    }
    Ok(child)
}

/// The handle of a VMM just spawned: its pid and start time, and where it keeps its files.
pub(crate) fn handle_for(
    child: &tokio::process::Child,
    api_socket: &Path,
    console_log: &Path,
) -> Result<VmmHandle, VmmError> {
    let ended = || VmmError::Exited {
        operation: "spawn".to_owned(),
        detail: "the process ended at once".to_owned(),
    };
    let pid = child.id().ok_or_else(ended)?;
    let start_time_ticks = start_time(pid).ok_or_else(ended)?;
    Ok(VmmHandle {
        pid,
        start_time_ticks,
        api_socket: api_socket.to_path_buf(),
        console_log: console_log.to_path_buf(),
    })
}

/// The start time of process `pid` (in clock ticks since boot), `None` when there is none.
pub fn start_time(pid: u32) -> Option<u64> {
    host::proc_stat(pid).map(|stat| stat.start_time_ticks)
}

/// Whether some process `pid` runs now (a zombie does not: it has ended).
pub fn is_running(pid: u32) -> bool {
    start_time(pid).is_some_and(|ticks| host::is_same_live_process(pid, ticks))
}

/// Whether the handle still names a running VMM: same pid, same start time, not a zombie.
pub fn is_alive(handle: &VmmHandle) -> bool {
    host::is_same_live_process(handle.pid, handle.start_time_ticks)
}

/// Send `signal` to the VMM's process group and to the VMM itself, only while the handle still
/// names it (never to a pid that now belongs to someone else). A VMM already gone is no error.
pub(crate) fn signal(handle: &VmmHandle, signal: Signal) -> Result<(), VmmError> {
    use nix::errno::Errno;
    use nix::unistd::Pid;
    if !is_alive(handle) {
        return Ok(());
    }
    let pid = i32::try_from(handle.pid).map_err(|_| VmmError::Protocol {
        operation: signal.as_str().to_owned(),
        detail: format!("pid {} out of range", handle.pid),
    })?;
    let pid = Pid::from_raw(pid);
    let group = nix::sys::signal::killpg(pid, signal);
    let own = nix::sys::signal::kill(pid, signal);
    match (group, own) {
        (Ok(()), _) | (_, Ok(())) | (Err(Errno::ESRCH), Err(Errno::ESRCH)) => Ok(()),
        (_, Err(errno)) => Err(VmmError::Io {
            operation: signal.as_str().to_owned(),
            source: std::io::Error::from(errno),
        }),
    }
}

/// Ask the VMM process to end (SIGTERM), for VMMs whose graceful stop is a signal.
pub(crate) fn stop(handle: &VmmHandle) -> Result<(), VmmError> {
    signal(handle, Signal::SIGTERM)
}

/// SIGKILL the VMM and wait until it is dead (gone, or a zombie its parent reaps), within
/// [`API_TIMEOUT`]: when this returns `Ok`, no guest of it runs any more.
pub(crate) async fn kill(handle: &VmmHandle) -> Result<(), VmmError> {
    signal(handle, Signal::SIGKILL)?;
    let deadline = Instant::now() + API_TIMEOUT;
    while is_alive(handle) {
        if Instant::now() >= deadline {
            return Err(VmmError::ApiTimeout {
                operation: "kill".into(),
                timeout: API_TIMEOUT,
            });
        }
        tokio::time::sleep(KILL_POLL).await;
    }
    Ok(())
}

/// Every running process whose command line names `api_socket`, as handles (with
/// `console_log`): how the VMMs of a VM are found again when its `handle.json` is missing,
/// empty or corrupt. Every backend passes the socket on the command line (QEMU `-qmp`,
/// Firecracker `--api-sock`, Cloud Hypervisor `--api-socket`), and the socket lives in the
/// VM's own state directory, so it names exactly one VM.
pub(crate) fn find_by_api_socket(api_socket: &Path, console_log: &Path) -> Vec<VmmHandle> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let socket = api_socket.display().to_string();
    let own = std::process::id();
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline_names(&cmdline, &socket))
        })
        .filter_map(|pid| {
            let start_time_ticks = start_time(pid)?;
            host::is_same_live_process(pid, start_time_ticks).then(|| VmmHandle {
                pid,
                start_time_ticks,
                api_socket: api_socket.to_path_buf(),
                console_log: console_log.to_path_buf(),
            })
        })
        .collect()
}

/// Whether a NUL-separated command line names `path` as a whole value: an argument that is
/// the path, or holds it after `=`, `:` or `,` and before `,` or its end (QEMU's
/// `unix:<path>,server=on`), or before `=` (a jailed Firecracker's stage one:
/// `--link <path>=api.sock`). A longer path that merely ends with it does not count.
fn cmdline_names(cmdline: &[u8], path: &str) -> bool {
    if path.is_empty() {
        return false;
    }
    cmdline
        .split(|&b| b == 0)
        .map(String::from_utf8_lossy)
        .any(|arg| {
            arg.match_indices(path).any(|(at, _)| {
                let before = arg[..at].chars().next_back();
                let after = arg[at + path.len()..].chars().next();
                matches!(before, None | Some('=' | ':' | ','))
                    && matches!(after, None | Some(',' | '='))
            })
        })
}

/// The VMM log of a VM whose state directory is `state_dir`.
pub(crate) fn log_path(state_dir: &Path) -> PathBuf {
    state_dir.join(VMM_LOG)
}

/// The VMM log of the VM behind `handle` (next to its API socket, in the state directory).
pub(crate) fn log_path_of(handle: &VmmHandle) -> PathBuf {
    log_path(handle.api_socket.parent().unwrap_or(Path::new("")))
}

/// The end of a VMM log, trimmed; empty when it cannot be read.
pub(crate) fn log_tail(path: &Path) -> String {
    console::tail_text(path, LOG_TAIL_BYTES).trim().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_binary_requires_an_executable() {
        assert!(matches!(
            resolve_binary(Path::new("/nonexistent/firecracker")),
            Err(VmmError::BinaryNotFound { .. })
        ));
        assert!(matches!(
            resolve_binary(Path::new("ignis-no-such-vmm-binary")),
            Err(VmmError::BinaryNotFound { .. })
        ));
        assert!(matches!(
            resolve_binary(Path::new("")),
            Err(VmmError::BinaryNotFound { .. })
        ));
        // `sh` is on PATH on every machine this runs on.
        assert!(resolve_binary(Path::new("sh")).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "").expect("write");
        assert!(resolve_binary(&plain).is_err());
    }

    #[test]
    fn a_command_line_names_a_socket_only_as_a_whole_value() {
        let sock = "/var/lib/ignis/vms/a/api.sock";
        let qemu =
            b"qemu-system-x86_64\0-qmp\0unix:/var/lib/ignis/vms/a/api.sock,server=on,wait=off\0";
        assert!(cmdline_names(qemu, sock));
        assert!(cmdline_names(
            b"firecracker\0--api-sock\0/var/lib/ignis/vms/a/api.sock\0",
            sock
        ));
        assert!(cmdline_names(
            b"cloud-hypervisor\0--api-socket\0path=/var/lib/ignis/vms/a/api.sock\0",
            sock
        ));
        // Another VM, another root that ends the same, or nothing at all.
        assert!(!cmdline_names(
            b"firecracker\0--api-sock\0/var/lib/ignis/vms/ab/api.sock\0",
            sock
        ));
        assert!(!cmdline_names(
            b"x\0/tmp/var/lib/ignis/vms/a/api.sock\0",
            sock
        ));
        assert!(!cmdline_names(
            b"x\0/var/lib/ignis/vms/a/api.sock.old\0",
            sock
        ));
        assert!(cmdline_names(
            b"ignis\0jailer\0--link\0/var/lib/ignis/vms/a/api.sock=api.sock\0",
            sock
        ));
        assert!(!cmdline_names(b"", sock));
        assert!(!cmdline_names(qemu, ""));
    }

    #[tokio::test]
    async fn a_vmm_is_found_by_the_socket_its_command_line_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let console = dir.path().join("console.log");
        assert!(find_by_api_socket(&sock, &console).is_empty());
        let sh = resolve_binary(Path::new("sh")).expect("sh");
        // Two commands, so `sh` stays (it would exec a lone one) with the socket as `$0`.
        let script = "sleep 30; exit 0";
        let mut child = spawn(
            &sh,
            ["-c", script, &sock.display().to_string()],
            Output::Null,
            Output::Null,
            None,
            Vec::new(),
        )
        .expect("spawn");
        let pid = child.id().expect("pid");
        // Until `sh` has forked and exec'd `sleep`, the fork still carries its command line.
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            let found = find_by_api_socket(&sock, &console);
            if found.len() == 1 || Instant::now() >= deadline {
                break found;
            }
            tokio::time::sleep(KILL_POLL).await;
        };
        assert_eq!(found.iter().map(|h| h.pid).collect::<Vec<_>>(), [pid]);
        assert_eq!(
            (&found[0].api_socket, &found[0].console_log),
            (&sock, &console)
        );
        assert!(is_alive(&found[0]));
        kill(&found[0]).await.expect("kill");
        child.wait().await.expect("reap");
        assert!(find_by_api_socket(&sock, &console).is_empty());
    }

    #[test]
    fn own_process_has_a_start_time() {
        let ours = start_time(std::process::id());
        assert!(ours.is_some_and(|t| t > 0));
    }

    #[tokio::test]
    async fn a_spawned_vmm_is_alive_until_killed_and_a_zombie_counts_as_dead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_path(dir.path());
        let sleep = resolve_binary(Path::new("sleep")).expect("sleep");
        let mut child = spawn(
            &sleep,
            ["30"],
            Output::Null,
            Output::Append(&log),
            None,
            Vec::new(),
        )
        .expect("spawn");
        let handle =
            handle_for(&child, &dir.path().join("api.sock"), &dir.path().join("c")).expect("h");
        assert!(is_alive(&handle));
        assert_eq!(log_path_of(&handle), log);
        // Its own process group: the agent's group is not its.
        assert_eq!(
            nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(handle.pid as i32)))
                .expect("pgid")
                .as_raw(),
            handle.pid as i32
        );
        // Not reaped yet: a zombie, which is dead.
        kill(&handle).await.expect("kill");
        assert!(!is_alive(&handle));
        assert!(host::proc_stat(handle.pid).is_some_and(|s| s.state == 'Z'));
        child.wait().await.expect("reap");
        // Gone: killing again is no error.
        kill(&handle).await.expect("kill again");
        stop(&handle).expect("stop a gone VMM");
    }

    #[test]
    fn the_log_tail_is_trimmed_and_empty_when_missing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_path(dir.path());
        assert_eq!(log_tail(&log), "");
        std::fs::write(&log, format!("{}\nlast words\n", "x".repeat(4096))).expect("write");
        let tail = log_tail(&log);
        assert!(tail.ends_with("last words") && tail.len() <= 2048);
    }
}
