//! The QEMU `microvm` backend, controlled over QMP. Targets QEMU 7.2 (Debian bookworm's
//! `qemu-system-x86`): `-M microvm` with virtio-mmio devices announced through its ACPI tables.
//!
//! The VMM runs in its own process group so it outlives an agent restart; everything the agent
//! needs to find it again is in the [`VmmHandle`]. The console goes to a file QEMU opens in
//! append mode, so the agent can rotate it by copy-truncate.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;

use super::process::{self, Output};
use super::qemu_files::{Handoff, ordered_disks};
use super::qmp::{QmpClient, QmpError};
use super::{
    API_TIMEOUT, ExitQuirks, SnapshotFiles, Spawned, VmConfig, VmmBackend, VmmError, VmmHandle,
    VmmState,
};
use crate::api::{Accelerator, Hypervisor};

/// The binary name looked up on `PATH` when no path is given.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";

/// The `microvm` machine options. The legacy PIT is on because the guest kernel calibrates
/// its TSC against it; without it the Debian kernel under TCG marks the TSC unstable and
/// can stall in early boot.
const MACHINE: &str = "microvm,pit=on,pic=on,rtc=on";

/// How long `create` waits for QEMU to open its QMP socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

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
            binary: process::resolve_binary(binary.as_ref())?,
            host_tsc_khz: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|c| host_tsc_khz(&c)),
        })
    }

    /// The resolved QEMU binary.
    pub(crate) fn binary(&self) -> &Path {
        &self.binary
    }
}

/// QEMU's `-opt key=value,...` syntax doubles commas inside values.
fn opt_value(v: &Path) -> String {
    v.to_string_lossy().replace(',', ",,")
}

/// A QEMU object id from a backend-neutral id: letters, digits, `-`, `.`, `_`, starting with a
/// letter.
pub(crate) fn qemu_id(prefix: &str, id: &str) -> String {
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

/// The kernel command line QEMU gets. A root disk is named (`root=/dev/vda rw|ro`) unless the
/// command line names one, as Firecracker does on its own and the Cloud Hypervisor backend
/// does too, so one command line boots under every VMM (the root disk is attached first).
/// Under TCG the guest TSC ticks at the host's rate, and
/// the kernel's calibration against the emulated PIT fails on a loaded host, after which the
/// guest hangs in early boot (seen here with load average 6: every boot hung). Telling the
/// kernel the rate (`tsc_early_khz`) and that the TSC is reliable skips both the calibration
/// and the clocksource watchdog. A cmdline that already sets `tsc_early_khz` is left alone.
pub fn guest_cmdline(config: &VmConfig, host_tsc_khz: Option<u64>) -> String {
    let mut cmdline = config.cmdline.clone();
    if let Some(root) = config.disks.iter().find(|d| d.root)
        && !cmdline.split_whitespace().any(|p| p.starts_with("root="))
    {
        let mode = if root.read_only { "ro" } else { "rw" };
        cmdline = format!("{cmdline} root=/dev/vda {mode}").trim().to_owned();
    }
    match (config.accelerator, host_tsc_khz) {
        (Accelerator::Tcg, Some(khz)) if !cmdline.contains("tsc_early_khz=") => {
            format!("{cmdline} tsc_early_khz={khz} tsc=reliable")
        }
        _ => cmdline,
    }
}

/// The full QEMU argv (without the binary) for a VM: confined, its files as the descriptors of
/// `handoff` under its seccomp filter (`qemu_files`); without one (the unconfined baseline of
/// the benchmark), by path.
pub(crate) fn qemu_args(
    config: &VmConfig,
    host_tsc_khz: Option<u64>,
    handoff: Option<&Handoff>,
) -> Vec<OsString> {
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
    if config.restore.is_some() {
        // The state comes later, through a descriptor handed over QMP (`qemu_snapshot`).
        push(&["-incoming", "defer"]);
    }
    push(&["-accel", accel, "-cpu", cpu]);
    push(&["-smp", &config.vcpus.max(1).to_string()]);
    push(&["-m", &format!("{}M", config.memory_mib)]);
    push(&["-append", &guest_cmdline(config, host_tsc_khz)]);
    let files = match handoff {
        Some(handoff) => handoff.args(config),
        None => path_args(config),
    };
    push(&files.iter().map(String::as_str).collect::<Vec<_>>());
    a.into_iter().map(OsString::from).collect()
}

/// The files of an unconfined QEMU, by path (it opens them itself).
fn path_args(config: &VmConfig) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-kernel", &config.kernel.to_string_lossy()]);
    if let Some(initrd) = &config.initrd {
        push(&["-initrd", &initrd.to_string_lossy()]);
    }
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
    // The root disk first: the guest names it /dev/vda.
    for disk in ordered_disks(config) {
        let id = qemu_id("disk", &disk.id);
        push(&[
            "-drive",
            &format!(
                "id={id},file={},format={},if=none,readonly={}",
                opt_value(&disk.path),
                disk.format.as_str(),
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
    a
}

pub(crate) fn qmp_error(e: QmpError) -> VmmError {
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
    if !process::is_alive(handle) {
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
pub(crate) fn state_from_status(status: &str) -> VmmState {
    match status {
        "prelaunch" => VmmState::Created,
        "running" => VmmState::Running,
        "shutdown" | "guest-panicked" | "internal-error" | "io-error" => VmmState::Exited,
        _ => VmmState::Paused,
    }
}

impl QemuBackend {
    async fn spawn(&self, config: &VmConfig) -> Result<Spawned, VmmError> {
        let binary = if config.binary.as_os_str().is_empty() {
            self.binary.clone()
        } else {
            process::resolve_binary(&config.binary)?
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
        let log_path = process::log_path(&config.state_dir);
        let (handoff, fds) = match &config.confinement {
            Some(confinement) => {
                let handoff = Handoff::layout(config);
                let fds = super::qemu_files::open(config, &handoff, confinement.uid);
                let fds = fds.inspect_err(|_| {
                    let _ = std::fs::remove_file(&config.api_socket);
                })?;
                (Some(handoff), fds)
            }
            None => (None, Vec::new()),
        };
        let spawned = process::spawn(
            &binary,
            qemu_args(config, self.host_tsc_khz, handoff.as_ref()),
            Output::Append(&log_path),
            Output::Append(&log_path),
            config.confinement.as_ref(),
            fds,
        );
        // The agent's copy of the QMP socket is gone with `fds`: QEMU holds the only one, so
        // a QEMU that dies resets the connection rather than leaving it pending.
        let mut child = spawned.inspect_err(|_| {
            let _ = std::fs::remove_file(&config.api_socket);
        })?;
        let waited = match process::handle_for(&child, &config.api_socket, &config.console_log) {
            Ok(handle) => wait_for_qmp(&mut child, &handle, &log_path, config.restore.is_some())
                .await
                .map(|()| handle),
            Err(e) => Err(e),
        };
        match waited {
            Ok(handle) => Ok(Spawned { handle, child }),
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
/// reported with the end of its log.
async fn wait_for_qmp(
    child: &mut tokio::process::Child,
    handle: &VmmHandle,
    log_path: &Path,
    restoring: bool,
) -> Result<(), VmmError> {
    // A QEMU waiting for its migration stream says `inmigrate`, not `prelaunch`.
    let expected = if restoring { "inmigrate" } else { "prelaunch" };
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    let exited = |status: std::process::ExitStatus| VmmError::Exited {
        operation: "create".into(),
        detail: format!("{status}: {}", process::log_tail(log_path)),
    };
    loop {
        if let Some(status) = child.try_wait().map_err(|source| VmmError::Io {
            operation: "create".into(),
            source,
        })? {
            return Err(exited(status));
        }
        if handle.api_socket.exists() {
            match qmp_call(handle, "query-status", None).await {
                Ok(v) => {
                    let status = v.get("status").and_then(Value::as_str).unwrap_or_default();
                    if status == expected {
                        return Ok(());
                    }
                    return Err(VmmError::Protocol {
                        operation: "create".into(),
                        detail: format!("VM is {status:?} before start, expected {expected}"),
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
        process::kill(handle).await
    }

    async fn state(&self, handle: &VmmHandle) -> Result<VmmState, VmmError> {
        if !process::is_alive(handle) {
            return Ok(VmmState::Exited);
        }
        match qmp_call(handle, "query-status", None).await {
            Ok(v) => Ok(state_from_status(
                v.get("status").and_then(Value::as_str).unwrap_or_default(),
            )),
            Err(_) if !process::is_alive(handle) => Ok(VmmState::Exited),
            Err(e) => Err(e),
        }
    }

    async fn snapshot(&self, handle: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        super::qemu_snapshot::save(handle, snapshot).await
    }

    async fn restore(&self, handle: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
        super::qemu_snapshot::load(handle, snapshot).await
    }

    fn exit_quirks(&self) -> &'static ExitQuirks {
        &super::exit::QEMU
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::image::DiskFormat;
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
                format: DiskFormat::Raw,
                read_only: true,
                root: true,
                backing: None,
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
            confinement: None,
            restore: None,
            opened: Default::default(),
        }
    }

    fn args(c: &VmConfig) -> Vec<String> {
        qemu_args(c, None, None)
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
        assert_eq!(
            after(&a, "-append"),
            "console=ttyS0 panic=-1 root=/dev/vda ro"
        );
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
        c.disks.clear();
        assert_eq!(
            guest_cmdline(&c, Some(2_596_124)),
            "console=ttyS0 panic=-1 tsc_early_khz=2596124 tsc=reliable"
        );
        assert_eq!(guest_cmdline(&c, None), c.cmdline);
        let a = qemu_args(&c, Some(1000), None);
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
    fn the_root_disk_goes_first_in_its_format_and_is_named_unless_the_cmdline_does() {
        let mut c = config();
        c.disks = vec![
            DiskConfig {
                id: "cidata".into(),
                path: "/s/cidata.iso".into(),
                format: DiskFormat::Raw,
                read_only: true,
                root: false,
                backing: None,
            },
            DiskConfig {
                id: "rootfs".into(),
                path: "/s/rootfs.qcow2".into(),
                format: DiskFormat::Qcow2,
                read_only: false,
                root: true,
                backing: None,
            },
        ];
        let a = args(&c);
        let drives: Vec<&String> = a
            .iter()
            .enumerate()
            .filter(|(i, _)| *i > 0 && a[i - 1] == "-drive")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            drives,
            [
                "id=disk-rootfs,file=/s/rootfs.qcow2,format=qcow2,if=none,readonly=off",
                "id=disk-cidata,file=/s/cidata.iso,format=raw,if=none,readonly=on"
            ]
        );
        assert_eq!(
            after(&a, "-append"),
            "console=ttyS0 panic=-1 root=/dev/vda rw"
        );
        c.cmdline = "console=ttyS0 root=LABEL=rootfs".into();
        assert_eq!(guest_cmdline(&c, None), c.cmdline);
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
        let e = process::resolve_binary(Path::new("ignis-no-such-qemu")).expect_err("absent");
        assert!(matches!(e, VmmError::BinaryNotFound { .. }));
    }
}
