//! The QEMU `microvm` backend, controlled over QMP. Targets QEMU 7.2 (Debian bookworm's
//! `qemu-system-x86`): `-M microvm` with virtio-mmio devices announced through its ACPI tables.
//!
//! The VMM runs in its own process group so it outlives an agent restart; everything the agent
//! needs to find it again is in the [`VmmHandle`]. The console goes to a file QEMU opens in
//! append mode, so the agent can rotate it by copy-truncate.

use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;

use super::qmp::{QmpClient, QmpError};
use super::{API_TIMEOUT, GuestExit, Spawned, VmConfig, VmmBackend, VmmError, VmmHandle, VmmState};
use crate::api::{Accelerator, Hypervisor};

/// The binary name looked up on `PATH` when no path is given.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// The `microvm` machine options. The legacy PIT is on because the guest kernel calibrates
/// its TSC against it; without it the Debian kernel under TCG marks the TSC unstable and
/// can stall in early boot.
const MACHINE: &str = "microvm,pit=on,pic=on,rtc=on";

/// QEMU's stderr and stdout, in the VM's state directory.
pub const VMM_LOG: &str = "vmm.log";

/// How long `create` waits for QEMU to open its QMP socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// How much of the VMM log an error quotes.
const LOG_TAIL_BYTES: u64 = 2048;

/// The QEMU `microvm` backend.
#[derive(Clone, Debug)]
pub struct QemuBackend {
    binary: PathBuf,
    /// The host's TSC rate, handed to TCG guests (see [`guest_cmdline`]).
    host_tsc_khz: Option<u64>,
}

impl QemuBackend {
    /// A backend using `binary` (a path, or a name looked up on `PATH`); fails with
    /// [`VmmError::BinaryNotFound`] when it is not there.
    pub fn new(binary: impl AsRef<Path>) -> Result<Self, VmmError> {
        Ok(QemuBackend {
            binary: probe_binary(binary.as_ref())?,
            host_tsc_khz: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| host_tsc_khz(&c)),
        })
    }

    /// The resolved QEMU binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

/// Resolve a QEMU binary: an explicit path must be an executable file; a bare name is looked
/// up on `PATH`.
pub fn probe_binary(binary: &Path) -> Result<PathBuf, VmmError> {
    let not_found = || VmmError::BinaryNotFound {
        path: binary.to_path_buf(),
    };
    let is_exec = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if binary.components().count() > 1 || binary.is_absolute() {
        return if is_exec(binary) {
            Ok(binary.to_path_buf())
        } else {
            Err(not_found())
        };
    }
    let path = std::env::var_os("PATH").ok_or_else(not_found)?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| is_exec(p))
        .ok_or_else(not_found)
}

/// QEMU's `-opt key=value,...` syntax doubles commas inside values.
fn opt_value(v: &Path) -> String {
    v.to_string_lossy().replace(',', ",,")
}

/// A QEMU object id from a backend-neutral id: letters, digits, `-`, `.`, `_`, starting with a
/// letter.
fn qemu_id(prefix: &str, id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}-{clean}")
}

/// The host TSC rate from `/proc/cpuinfo` (`cpu MHz` of a `constant_tsc` CPU; without that
/// flag the reported frequency is not the TSC's, so none is given).
pub fn host_tsc_khz(cpuinfo: &str) -> Option<u64> {
    let constant = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "constant_tsc"));
    if !constant {
        return None;
    }
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    let khz = (mhz * 1000.0).round();
    (1.0..1e9).contains(&khz).then_some(khz as u64)
}

/// The kernel command line QEMU gets. Under TCG the guest TSC ticks at the host's rate, and
/// the kernel's calibration against the emulated PIT fails on a loaded host, after which the
/// guest hangs in early boot (seen here with load average 6: every boot hung). Telling the
/// kernel the rate (`tsc_early_khz`) and that the TSC is reliable skips both the calibration
/// and the clocksource watchdog. A cmdline that already sets `tsc_early_khz` is left alone.
pub fn guest_cmdline(config: &VmConfig, host_tsc_khz: Option<u64>) -> String {
    match (config.accelerator, host_tsc_khz) {
        (Accelerator::Tcg, Some(khz)) if !config.cmdline.contains("tsc_early_khz=") => {
            format!("{} tsc_early_khz={khz} tsc=reliable", config.cmdline)
        }
        _ => config.cmdline.clone(),
    }
}

/// The full QEMU argv (without the binary) for a VM.
pub fn qemu_args(config: &VmConfig, host_tsc_khz: Option<u64>) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let (accel, cpu) = match config.accelerator {
        Accelerator::Kvm => ("kvm", "host"),
        Accelerator::Tcg => ("tcg", "max"),
    };
    push(&[
        "-name",
        &format!("ignis-{},process=ignis-{}", config.id, config.id),
    ]);
    push(&["-M", MACHINE]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-S",
    ]);
    push(&["-accel", accel, "-cpu", cpu]);
    push(&["-smp", &config.vcpus.max(1).to_string()]);
    push(&["-m", &format!("{}M", config.memory_mib)]);
    push(&["-kernel", &config.kernel.to_string_lossy()]);
    if let Some(initrd) = &config.initrd {
        push(&["-initrd", &initrd.to_string_lossy()]);
    }
    push(&["-append", &guest_cmdline(config, host_tsc_khz)]);
    push(&[
        "-chardev",
        &format!(
            "file,id=console,path={},append=on",
            opt_value(&config.console_log)
        ),
        "-serial",
        "chardev:console",
    ]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt_value(&config.api_socket)),
    ]);
    for disk in &config.disks {
        let id = qemu_id("disk", &disk.id);
        push(&[
            "-drive",
            &format!(
                "id={id},file={},format=raw,if=none,readonly={}",
                opt_value(&disk.path),
                if disk.read_only { "on" } else { "off" }
            ),
            "-device",
            &format!("virtio-blk-device,drive={id}"),
        ]);
    }
    for net in &config.nets {
        let id = qemu_id("net", &net.id);
        push(&[
            "-netdev",
            &format!(
                "tap,id={id},ifname={},script=no,downscript=no",
                net.tap.replace(',', ",,")
            ),
            "-device",
            &format!("virtio-net-device,netdev={id},mac={}", net.mac),
        ]);
    }
    a.into_iter().map(OsString::from).collect()
}

/// How a VMM process ended, as far as the agent knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitSummary {
    Code(i32),
    Signal(i32),
    /// The VMM was not our child (re-adopted after an agent restart).
    Unknown,
}

impl ExitSummary {
    pub fn from_status(status: Option<std::process::ExitStatus>) -> Self {
        match status {
            None => ExitSummary::Unknown,
            Some(s) => match (s.code(), s.signal()) {
                (Some(c), _) => ExitSummary::Code(c),
                (None, Some(sig)) => ExitSummary::Signal(sig),
                (None, None) => ExitSummary::Unknown,
            },
        }
    }
}

/// What the guest's console says about how it ended; the last sign wins, since a console log
/// can hold several runs.
fn console_verdict(console_tail: &str) -> Option<(&'static str, &'static str)> {
    const SIGNS: &[(&str, &str, &str)] = &[
        ("Kernel panic", "GuestPanic", "the guest kernel panicked"),
        (
            "reboot: Power down",
            "GuestShutdown",
            "the guest powered off",
        ),
        ("reboot: System halted", "GuestShutdown", "the guest halted"),
        (
            "reboot: Restarting system",
            "GuestReboot",
            "the guest rebooted (the VMM runs with -no-reboot)",
        ),
    ];
    SIGNS
        .iter()
        .filter_map(|(sign, reason, msg)| console_tail.rfind(sign).map(|i| (i, *reason, *msg)))
        .max_by_key(|(i, ..)| *i)
        .map(|(_, reason, msg)| (reason, msg))
}

/// The last non-empty line of a log, for messages.
fn last_line(log: &str) -> &str {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// Why a VMM ended: a pure function of its exit, the guest console tail and QEMU's own log.
pub fn classify(exit: ExitSummary, console_tail: &str, vmm_log_tail: &str) -> GuestExit {
    let code = match exit {
        ExitSummary::Code(c) => Some(c),
        _ => None,
    };
    let make = |success, reason, message: String| GuestExit {
        success,
        reason,
        message,
        exit_code: code,
    };
    let verdict = console_verdict(console_tail);
    if let Some(("GuestPanic", msg)) = verdict {
        return make(false, "GuestPanic", msg.to_string());
    }
    // QEMU catches SIGTERM/SIGINT/SIGHUP, logs it and exits 0.
    let terminated = vmm_log_tail.contains("terminating on signal");
    match exit {
        ExitSummary::Signal(sig) => make(
            false,
            "VmmKilled",
            format!("the VMM was killed by signal {sig}"),
        ),
        ExitSummary::Code(c) if c != 0 => make(
            false,
            "VmmCrashed",
            format!("the VMM exited with code {c}: {}", last_line(vmm_log_tail)),
        ),
        _ => match verdict {
            Some(("GuestShutdown", msg)) => make(true, "GuestShutdown", msg.to_string()),
            Some((reason, msg)) => make(false, reason, msg.to_string()),
            None if terminated => make(
                false,
                "VmmKilled",
                format!("the VMM was stopped: {}", last_line(vmm_log_tail)),
            ),
            None if exit == ExitSummary::Unknown => make(
                false,
                "VmmExitedWhileAgentDown",
                "the VMM exited while the agent was down; its exit status is unknown".into(),
            ),
            None => make(
                true,
                "GuestShutdown",
                "the VMM exited cleanly (code 0)".into(),
            ),
        },
    }
}

/// The start time of a live (non-zombie) process, if it exists.
fn live_start_time(pid: u32) -> Option<u64> {
    crate::agent::host::proc_stat(pid)
        .filter(|stat| crate::agent::host::is_live(Some(*stat), stat.start_time_ticks))
        .map(|stat| stat.start_time_ticks)
}

/// Whether the handle still names the running VMM (not a gone or reused pid).
pub fn is_alive(handle: &VmmHandle) -> bool {
    crate::agent::host::is_same_live_process(handle.pid, handle.start_time_ticks)
}

/// The last `max` bytes of a file, lossily decoded; empty when unreadable.
pub fn read_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.take(max).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn vmm_log_path(handle_socket: &Path) -> PathBuf {
    handle_socket
        .parent()
        .map(|d| d.join(VMM_LOG))
        .unwrap_or_else(|| PathBuf::from(VMM_LOG))
}

fn qmp_error(e: QmpError) -> VmmError {
    match e {
        QmpError::Timeout { operation, timeout } => VmmError::ApiTimeout { operation, timeout },
        QmpError::Connect { path, source } => VmmError::Io {
            operation: format!("connect {}", path.display()),
            source,
        },
        QmpError::Io { operation, source } => VmmError::Io { operation, source },
        QmpError::Closed { operation } => VmmError::Exited {
            operation,
            detail: "QEMU closed its QMP connection".into(),
        },
        QmpError::Protocol { operation, detail } => VmmError::Protocol { operation, detail },
        QmpError::Command {
            operation,
            class,
            desc,
        } => VmmError::Protocol {
            operation,
            detail: format!("{class}: {desc}"),
        },
    }
}

/// Connect to a VM's QMP socket and run one command, all within [`API_TIMEOUT`].
async fn qmp_call(
    handle: &VmmHandle,
    command: &str,
    args: Option<Value>,
) -> Result<Value, VmmError> {
    let deadline = Instant::now() + API_TIMEOUT;
    if !is_alive(handle) {
        return Err(VmmError::Exited {
            operation: command.into(),
            detail: format!("process {} is gone", handle.pid),
        });
    }
    let mut client = QmpClient::connect(&handle.api_socket, API_TIMEOUT)
        .await
        .map_err(qmp_error)?;
    let left = deadline.saturating_duration_since(Instant::now());
    client.execute(command, args, left).await.map_err(qmp_error)
}

/// Map `query-status`'s `status` to a backend-neutral state.
pub fn state_from_status(status: &str) -> VmmState {
    match status {
        "prelaunch" => VmmState::Created,
        "running" => VmmState::Running,
        "shutdown" | "guest-panicked" | "internal-error" | "io-error" => VmmState::Exited,
        _ => VmmState::Paused,
    }
}

/// Send `signal` to the VMM's process group (it leads its own) and the VMM itself.
fn signal_vmm(pid: u32, signal: nix::sys::signal::Signal) {
    let Ok(raw) = i32::try_from(pid) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(raw);
    let _ = nix::sys::signal::killpg(pid, signal);
    let _ = nix::sys::signal::kill(pid, signal);
}

impl QemuBackend {
    async fn spawn(&self, config: &VmConfig) -> Result<Spawned, VmmError> {
        let binary = if config.binary.as_os_str().is_empty() {
            self.binary.clone()
        } else {
            probe_binary(&config.binary)?
        };
        let io = |operation: &str| {
            let operation = operation.to_string();
            move |source| VmmError::Io { operation, source }
        };
        std::fs::create_dir_all(&config.state_dir).map_err(io("create state dir"))?;
        // A socket left by an earlier VMM would make the wait below succeed too early.
        match std::fs::remove_file(&config.api_socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove stale QMP socket")(e));
            }
            _ => {}
        }
        let log_path = config.state_dir.join(VMM_LOG);
        let log = std::fs::File::create(&log_path).map_err(io("create vmm.log"))?;
        let log2 = log.try_clone().map_err(io("create vmm.log"))?;

        let mut cmd = tokio::process::Command::new(&binary);
        cmd.args(qemu_args(config, self.host_tsc_khz))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C or SIGTERM to the agent's group must not take
            // the VMs down with it, and they are re-adopted after a restart.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|source| VmmError::Spawn {
            binary: binary.clone(),
            source,
        })?;
        let pid = child.id().ok_or_else(|| VmmError::Exited {
            operation: "create".into(),
            detail: "exited immediately".into(),
        })?;

        let handle = VmmHandle {
            pid,
            start_time_ticks: 0,
            api_socket: config.api_socket.clone(),
            console_log: config.console_log.clone(),
        };
        match wait_for_qmp(&mut child, &handle, &log_path).await {
            Ok(start_time_ticks) => Ok(Spawned {
                handle: VmmHandle {
                    start_time_ticks,
                    ..handle
                },
                child,
            }),
            Err(e) => {
                // Leave nothing behind: no process, no socket.
                let _ = child.start_kill();
                let _ = tokio::time::timeout(API_TIMEOUT, child.wait()).await;
                let _ = std::fs::remove_file(&config.api_socket);
                Err(e)
            }
        }
    }
}

/// Wait until QEMU answers on QMP in the `prelaunch` state; a QEMU that exits first is
/// reported with the end of its log. Returns the process start time.
async fn wait_for_qmp(
    child: &mut tokio::process::Child,
    handle: &VmmHandle,
    log_path: &Path,
) -> Result<u64, VmmError> {
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    let exited = |status: std::process::ExitStatus| VmmError::Exited {
        operation: "create".into(),
        detail: format!(
            "{status}: {}",
            read_tail(log_path, LOG_TAIL_BYTES).trim_end()
        ),
    };
    loop {
        if let Some(status) = child.try_wait().map_err(|source| VmmError::Io {
            operation: "create".into(),
            source,
        })? {
            return Err(exited(status));
        }
        if handle.api_socket.exists() {
            let start = live_start_time(handle.pid).unwrap_or(0);
            let h = VmmHandle {
                start_time_ticks: start,
                ..handle.clone()
            };
            match qmp_call(&h, "query-status", None).await {
                Ok(v) => {
                    let status = v.get("status").and_then(Value::as_str).unwrap_or_default();
                    if status == "prelaunch" {
                        return Ok(start);
                    }
                    return Err(VmmError::Protocol {
                        operation: "create".into(),
                        detail: format!("VM is {status:?} before start, expected prelaunch"),
                    });
                }
                Err(e) => {
                    // The process may have died between the socket appearing and the call.
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(exited(status));
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(VmmError::SocketTimeout {
                path: handle.api_socket.clone(),
                timeout: SOCKET_TIMEOUT,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[async_trait]
impl VmmBackend for QemuBackend {
    fn kind(&self) -> Hypervisor {
        Hypervisor::Qemu
    }

    fn supports(&self, _accelerator: Accelerator) -> bool {
        true
    }

    async fn create(&self, config: &VmConfig) -> Result<Spawned, VmmError> {
        self.spawn(config).await
    }

    async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        qmp_call(handle, "cont", None).await.map(drop)
    }

    async fn stop(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        qmp_call(handle, "system_powerdown", None).await.map(drop)
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        // Never signal a pid that now belongs to someone else.
        if !is_alive(handle) {
            return Ok(());
        }
        signal_vmm(handle.pid, nix::sys::signal::Signal::SIGKILL);
        // The caller reaps its child; here we only wait until the process is dead (gone or a
        // zombie), so `kill` returning means no guest runs any more.
        let deadline = Instant::now() + API_TIMEOUT;
        while is_alive(handle) {
            if Instant::now() >= deadline {
                return Err(VmmError::ApiTimeout {
                    operation: "kill".into(),
                    timeout: API_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn state(&self, handle: &VmmHandle) -> Result<VmmState, VmmError> {
        if !is_alive(handle) {
            return Ok(VmmState::Exited);
        }
        match qmp_call(handle, "query-status", None).await {
            Ok(v) => Ok(state_from_status(
                v.get("status").and_then(Value::as_str).unwrap_or_default(),
            )),
            Err(_) if !is_alive(handle) => Ok(VmmState::Exited),
            Err(e) => Err(e),
        }
    }

    fn classify_exit(
        &self,
        handle: &VmmHandle,
        status: Option<std::process::ExitStatus>,
        console_tail: &str,
    ) -> GuestExit {
        let vmm_log = read_tail(&vmm_log_path(&handle.api_socket), LOG_TAIL_BYTES);
        classify(ExitSummary::from_status(status), console_tail, &vmm_log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::vmm::{DiskConfig, NetConfig};
    use crate::error::ErrorReason;

    fn config() -> VmConfig {
        VmConfig {
            id: "uid-1".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/g/vmlinuz".into(),
            cmdline: "console=ttyS0 panic=-1".into(),
            initrd: Some("/g/initrd.cpio".into()),
            disks: vec![DiskConfig {
                id: "rootfs".into(),
                path: "/s/a,b.img".into(),
                read_only: true,
                root: true,
            }],
            nets: vec![NetConfig {
                id: "eth0".into(),
                tap: "ig-tap0".into(),
                mac: "02:00:00:00:00:01".into(),
            }],
            user_data: None,
            accelerator: Accelerator::Tcg,
            state_dir: "/s".into(),
            console_log: "/s/console.log".into(),
            api_socket: "/s/qmp.sock".into(),
            binary: "qemu-system-x86_64".into(),
        }
    }

    fn args(c: &VmConfig) -> Vec<String> {
        qemu_args(c, None)
            .into_iter()
            .map(|s| s.into_string().expect("utf8"))
            .collect()
    }

    /// The value following `flag` (first occurrence).
    fn after<'a>(a: &'a [String], flag: &str) -> &'a str {
        let i = a.iter().position(|x| x == flag).expect(flag);
        &a[i + 1]
    }

    #[test]
    fn argv_for_tcg_with_disk_and_net() {
        let a = args(&config());
        assert_eq!(after(&a, "-M"), MACHINE);
        assert_eq!(after(&a, "-accel"), "tcg");
        assert_eq!(after(&a, "-cpu"), "max");
        assert_eq!(after(&a, "-smp"), "2");
        assert_eq!(after(&a, "-m"), "256M");
        assert_eq!(after(&a, "-kernel"), "/g/vmlinuz");
        assert_eq!(after(&a, "-initrd"), "/g/initrd.cpio");
        assert_eq!(after(&a, "-append"), "console=ttyS0 panic=-1");
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot", "-S"] {
            assert!(a.contains(&flag.to_string()), "{flag}");
        }
        assert_eq!(
            after(&a, "-chardev"),
            "file,id=console,path=/s/console.log,append=on"
        );
        assert_eq!(after(&a, "-serial"), "chardev:console");
        assert_eq!(after(&a, "-qmp"), "unix:/s/qmp.sock,server=on,wait=off");
        assert_eq!(
            after(&a, "-drive"),
            "id=disk-rootfs,file=/s/a,,b.img,format=raw,if=none,readonly=on"
        );
        assert_eq!(
            after(&a, "-netdev"),
            "tap,id=net-eth0,ifname=ig-tap0,script=no,downscript=no"
        );
        let devices: Vec<&String> = a
            .iter()
            .enumerate()
            .filter(|(i, _)| *i > 0 && a[i - 1] == "-device")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            devices,
            vec![
                "virtio-blk-device,drive=disk-rootfs",
                "virtio-net-device,netdev=net-eth0,mac=02:00:00:00:00:01"
            ]
        );
    }

    #[test]
    fn argv_for_kvm_without_initrd_or_devices() {
        let mut c = config();
        c.accelerator = Accelerator::Kvm;
        c.initrd = None;
        c.disks.clear();
        c.nets.clear();
        c.id = "a b".into();
        let a = args(&c);
        assert_eq!(after(&a, "-accel"), "kvm");
        assert_eq!(after(&a, "-cpu"), "host");
        assert!(!a.contains(&"-initrd".to_string()));
        assert!(!a.contains(&"-drive".to_string()));
        assert!(!a.contains(&"-netdev".to_string()));
        assert_eq!(qemu_id("disk", "a b/c"), "disk-a_b_c");
    }

    #[test]
    fn tcg_guests_get_the_host_tsc_rate() {
        let cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2596.124\nflags\t\t: fpu tsc constant_tsc\n";
        assert_eq!(host_tsc_khz(cpuinfo), Some(2_596_124));
        assert_eq!(host_tsc_khz("cpu MHz : 2596.124\nflags : fpu tsc\n"), None);
        let mut c = config();
        assert_eq!(
            guest_cmdline(&c, Some(2_596_124)),
            "console=ttyS0 panic=-1 tsc_early_khz=2596124 tsc=reliable"
        );
        assert_eq!(guest_cmdline(&c, None), c.cmdline);
        let a = qemu_args(&c, Some(1000));
        assert!(a.iter().any(|x| {
            x.to_string_lossy()
                .ends_with("tsc_early_khz=1000 tsc=reliable")
        }));
        c.cmdline = "console=ttyS0 tsc_early_khz=5".into();
        assert_eq!(guest_cmdline(&c, Some(1000)), c.cmdline);
        c.accelerator = Accelerator::Kvm;
        c.cmdline = "console=ttyS0".into();
        assert_eq!(guest_cmdline(&c, Some(1000)), "console=ttyS0");
    }

    #[test]
    fn classify_guest_poweroff_is_success() {
        let e = classify(
            ExitSummary::Code(0),
            "ignis: ready\n[ 3.1] reboot: Power down\n",
            "",
        );
        assert!(e.success);
        assert_eq!(e.reason, "GuestShutdown");
        assert_eq!(e.exit_code, Some(0));
    }

    #[test]
    fn classify_panic_wins_over_clean_exit() {
        let tail = "ignis: ready\n[ 2.0] sysrq: Trigger a crash\n[ 2.0] Kernel panic - not syncing: sysrq triggered crash\n";
        let e = classify(ExitSummary::Code(0), tail, "");
        assert!(!e.success);
        assert_eq!(e.reason, "GuestPanic");
        let e = classify(ExitSummary::Unknown, tail, "");
        assert_eq!(e.reason, "GuestPanic");
    }

    #[test]
    fn classify_last_sign_wins_across_runs() {
        let tail = "Kernel panic - not syncing\n...second run...\nreboot: Power down\n";
        assert_eq!(
            classify(ExitSummary::Code(0), tail, "").reason,
            "GuestShutdown"
        );
        let tail = "reboot: Restarting system\n";
        let e = classify(ExitSummary::Code(0), tail, "");
        assert_eq!((e.success, e.reason), (false, "GuestReboot"));
    }

    #[test]
    fn classify_vmm_failures() {
        let e = classify(ExitSummary::Signal(9), "ignis: ready\n", "");
        assert_eq!((e.success, e.reason), (false, "VmmKilled"));
        assert!(e.message.contains("signal 9"));
        let e = classify(
            ExitSummary::Code(1),
            "",
            "qemu-system-x86_64: could not load kernel '/nope'\n",
        );
        assert_eq!((e.success, e.reason), (false, "VmmCrashed"));
        assert!(e.message.contains("/nope"), "{}", e.message);
        let e = classify(
            ExitSummary::Code(0),
            "ignis: ready\n",
            "qemu-system-x86_64: terminating on signal 15 from pid 1\n",
        );
        assert_eq!(e.reason, "VmmKilled");
    }

    #[test]
    fn classify_unknown_status() {
        let e = classify(ExitSummary::Unknown, "ignis: ready\n", "");
        assert_eq!((e.success, e.reason), (false, "VmmExitedWhileAgentDown"));
        assert_eq!(e.exit_code, None);
        let e = classify(ExitSummary::Unknown, "reboot: Power down\n", "");
        assert_eq!((e.success, e.reason), (true, "GuestShutdown"));
    }

    #[test]
    fn stat_parsing_survives_odd_names() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 10";
        let parsed = crate::agent::host::parse_proc_stat(stat);
        assert_eq!(parsed.map(|s| s.start_time_ticks), Some(987654));
        assert_eq!(parsed.map(|s| s.state), Some('S'));
        assert_eq!(crate::agent::host::parse_proc_stat("garbage"), None);
    }

    #[test]
    fn status_mapping() {
        assert_eq!(state_from_status("prelaunch"), VmmState::Created);
        assert_eq!(state_from_status("running"), VmmState::Running);
        assert_eq!(state_from_status("paused"), VmmState::Paused);
        assert_eq!(state_from_status("shutdown"), VmmState::Exited);
    }

    #[test]
    fn missing_binary_is_binary_not_found() {
        let e = QemuBackend::new("/nonexistent/qemu-system-x86_64").expect_err("absent");
        assert_eq!(e.reason(), "HypervisorUnavailable");
        let e = probe_binary(Path::new("ignis-no-such-qemu")).expect_err("absent");
        assert!(matches!(e, VmmError::BinaryNotFound { .. }));
    }
}
