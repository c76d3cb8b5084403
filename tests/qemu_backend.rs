//! The QEMU `microvm` backend against a real QEMU (TCG) booting the demo guest built by
//! `ignis::agent::guest`. Skips, with a printed reason, only when qemu-system-x86_64 or a
//! /boot/vmlinuz-* kernel is absent.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ignis::ErrorReason;
use ignis::agent::guest::{DEFAULT_CMDLINE, DEMO_MARKER, DemoGuest, build_demo_guest};
use ignis::agent::kvm::{self, ProbeOptions};
use ignis::agent::vmm::process;
use ignis::agent::vmm::qemu::{self, QemuBackend};
use ignis::agent::vmm::{GuestExit, NetConfig, Spawned, VmConfig, VmmBackend, VmmState};
use ignis::api::{Accelerator, AcceleratorChoice};
use ignis::vm::ExitReason;

use ignis::testing::prerequisite::missing;

const BOOT_DEADLINE: Duration = Duration::from_secs(60);
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// VM tests take turns: two cores are shared, and boot times are only meaningful one at a time.
static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn prerequisites() -> Option<PathBuf> {
    let qemu = match process::resolve_binary(Path::new(qemu::DEFAULT_BINARY)) {
        Ok(p) => p,
        Err(e) => {
            missing("qemu_backend", &e.to_string());
            return None;
        }
    };
    if let Err(e) = ignis::agent::guest::find_newest_kernel(Path::new("/boot")) {
        missing("qemu_backend", &e.to_string());
        return None;
    }
    Some(qemu)
}

fn guest(dir: &Path) -> DemoGuest {
    build_demo_guest(&dir.join("guest")).expect("build demo guest")
}

fn config(qemu: &Path, g: &DemoGuest, state: &Path, extra: &str) -> VmConfig {
    VmConfig {
        id: "test-vm".into(),
        vcpus: 1,
        memory_mib: 256,
        kernel: g.kernel.clone(),
        cmdline: format!("{DEFAULT_CMDLINE} ignis.name=test-vm {extra}"),
        initrd: Some(g.initrd.clone()),
        disks: vec![],
        nets: vec![],
        user_data: None,
        accelerator: Accelerator::Tcg,
        state_dir: state.to_path_buf(),
        console_log: state.join("console.log"),
        api_socket: state.join("qmp.sock"),
        binary: qemu.to_path_buf(),
        confinement: None,
        restore: None,
        opened: Default::default(),
    }
}

/// Poll a console log for the marker; the time it appeared, or the log on timeout.
async fn wait_for_marker(log: &Path, deadline: Duration) -> Result<Instant, String> {
    let until = Instant::now() + deadline;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(DEMO_MARKER) {
            return Ok(Instant::now());
        }
        if Instant::now() >= until {
            return Err(text);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Kills the VMM when a test ends, even by a failed assertion: VMMs live in their own
/// process group and would otherwise outlive the test.
struct Reaper(u32);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Wait for the VMM child to end, then classify its exit.
async fn wait_exit(backend: &QemuBackend, spawned: &mut Spawned) -> GuestExit {
    let status = match tokio::time::timeout(EXIT_DEADLINE, spawned.child.wait()).await {
        Ok(status) => status.expect("wait"),
        Err(_) => {
            let console = std::fs::read_to_string(&spawned.handle.console_log).unwrap_or_default();
            panic!("VMM did not exit within {EXIT_DEADLINE:?}; console:\n{console}");
        }
    };
    let console = std::fs::read_to_string(&spawned.handle.console_log).unwrap_or_default();
    backend.classify_exit(&spawned.handle, Some(status), &console)
}

fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn demo_guest_build_is_idempotent() {
    if prerequisites().is_none() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let first = guest(dir.path());
    let mtime = std::fs::metadata(&first.initrd)
        .and_then(|m| m.modified())
        .expect("mtime");
    let t = Instant::now();
    let second = guest(dir.path());
    let rebuild = t.elapsed();
    assert_eq!(first, second);
    assert_eq!(
        std::fs::metadata(&second.initrd)
            .and_then(|m| m.modified())
            .expect("mtime"),
        mtime,
        "an unchanged guest must not be rebuilt"
    );
    assert!(rebuild < Duration::from_millis(500), "{rebuild:?}");
    let cpio = std::fs::read(&first.initrd).expect("read initrd");
    assert!(cpio.starts_with(b"070701"));
    println!(
        "demo guest: kernel {} initrd {} bytes, up-to-date check {rebuild:?}",
        first.kernel_version,
        cpio.len()
    );
}

#[tokio::test]
async fn boots_to_marker_then_powers_down_and_leaves_nothing_running() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let state = dir.path().join("vm");
    let cfg = config(&qemu_bin, &g, &state, "");
    let backend = QemuBackend::new(&qemu_bin).expect("backend");

    let t0 = Instant::now();
    let mut spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    let created = t0.elapsed();
    assert!(spawned.handle.start_time_ticks > 0);
    assert_eq!(
        backend.state(&spawned.handle).await.expect("state"),
        VmmState::Created
    );
    backend.start(&spawned.handle).await.expect("start");
    assert_eq!(
        backend.state(&spawned.handle).await.expect("state"),
        VmmState::Running
    );
    let ready = match wait_for_marker(&cfg.console_log, BOOT_DEADLINE).await {
        Ok(at) => at,
        Err(log) => panic!("no marker within {BOOT_DEADLINE:?}; console:\n{log}"),
    };
    println!(
        "backend: create {created:?}, create→marker {:?}",
        ready.duration_since(t0)
    );
    let console = std::fs::read_to_string(&cfg.console_log).expect("console");
    assert!(console.contains(DEMO_MARKER));

    // system_powerdown reaches the guest's ACPI power button; the demo init powers off.
    backend.stop(&spawned.handle).await.expect("stop");
    let exit = wait_exit(&backend, &mut spawned).await;
    assert_eq!(exit.reason, ExitReason::GuestShutdown, "{exit:?}");
    assert!(exit.success);
    assert!(!pid_alive(spawned.handle.pid));
    assert_eq!(
        backend.state(&spawned.handle).await.expect("state"),
        VmmState::Exited
    );
    // Only the console and QEMU's log remain; QEMU removed its socket.
    assert_eq!(listing(&state), vec!["console.log", "vmm.log"]);
}

#[tokio::test]
async fn kill_ends_the_vmm() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let cfg = config(&qemu_bin, &g, &dir.path().join("vm"), "");
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let mut spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    backend.start(&spawned.handle).await.expect("start");
    backend.kill(&spawned.handle).await.expect("kill");
    let exit = wait_exit(&backend, &mut spawned).await;
    assert_eq!(
        (exit.success, exit.reason.clone()),
        (false, ExitReason::VmmKilled),
        "{exit:?}"
    );
    assert!(!pid_alive(spawned.handle.pid));
    // Killing again (already dead) is harmless.
    backend.kill(&spawned.handle).await.expect("kill again");
}

#[tokio::test]
async fn guest_exit_success_is_classified_as_success() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let cfg = config(&qemu_bin, &g, &dir.path().join("vm"), "ignis.exit=success");
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let mut spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    backend.start(&spawned.handle).await.expect("start");
    let exit = wait_exit(&backend, &mut spawned).await;
    let console = std::fs::read_to_string(&cfg.console_log).unwrap_or_default();
    assert!(console.contains(DEMO_MARKER), "{console}");
    assert!(exit.success, "{exit:?}\n{console}");
    assert_eq!(exit.reason, ExitReason::GuestShutdown);
}

#[tokio::test]
async fn guest_exit_failure_is_classified_as_failure() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let cfg = config(&qemu_bin, &g, &dir.path().join("vm"), "ignis.exit=failure");
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let mut spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    backend.start(&spawned.handle).await.expect("start");
    let exit = wait_exit(&backend, &mut spawned).await;
    let console = std::fs::read_to_string(&cfg.console_log).unwrap_or_default();
    assert!(console.contains(DEMO_MARKER), "{console}");
    assert!(!exit.success, "{exit:?}");
    assert_eq!(exit.reason, ExitReason::GuestPanic, "{exit:?}\n{console}");
}

#[tokio::test]
async fn missing_kernel_is_a_clear_error_and_leaves_no_process() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let state = dir.path().join("vm");
    let mut cfg = config(&qemu_bin, &g, &state, "");
    cfg.kernel = dir.path().join("no-such-vmlinuz");
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let err = backend.create(&cfg).await.expect_err("must fail");
    let text = err.to_string();
    println!("missing kernel: {text}");
    assert_eq!(err.reason(), "VmmCrashed");
    assert!(text.contains("no-such-vmlinuz"), "{text}");
    assert!(!state.join("qmp.sock").exists());
    assert!(
        common::live_pids_naming(&cfg.kernel).is_empty(),
        "a QEMU for the missing kernel is still running"
    );
}

#[tokio::test]
async fn missing_binary_is_hypervisor_unavailable() {
    let err = QemuBackend::new("/nonexistent/qemu-system-x86_64").expect_err("absent");
    assert_eq!(err.reason(), "HypervisorUnavailable");
    assert!(err.to_string().contains("/nonexistent/qemu-system-x86_64"));
}

/// The floor: the same guest booted by QEMU directly, with its console on a pipe.
async fn bare_boot(qemu_bin: &Path, g: &DemoGuest) -> Duration {
    use tokio::io::AsyncBufReadExt;
    // The same command line the backend gives a TCG guest.
    let mut cfg = config(qemu_bin, g, Path::new("/nonexistent"), "");
    cfg.cmdline = format!("{DEFAULT_CMDLINE} ignis.name=bare");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let bare_cmdline = qemu::guest_cmdline(&cfg, qemu::host_tsc_khz(&cpuinfo));
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(qemu_bin)
        .args([
            "-M",
            "microvm,pit=on,pic=on,rtc=on",
            "-nodefaults",
            "-no-user-config",
        ])
        .args([
            "-display",
            "none",
            "-no-reboot",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args(["-smp", "1", "-m", "256M", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .args(["-append", &bare_cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn qemu");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let found = tokio::time::timeout(BOOT_DEADLINE, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(DEMO_MARKER) {
                return true;
            }
        }
        false
    })
    .await;
    let took = t0.elapsed();
    child.start_kill().expect("kill");
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    assert_eq!(found, Ok(true), "bare QEMU: no marker");
    took
}

async fn backend_boot(qemu_bin: &Path, g: &DemoGuest, state: &Path) -> Duration {
    let backend = QemuBackend::new(qemu_bin).expect("backend");
    let cfg = config(qemu_bin, g, state, "");
    let t0 = Instant::now();
    let mut spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    backend.start(&spawned.handle).await.expect("start");
    let ready = wait_for_marker(&cfg.console_log, BOOT_DEADLINE)
        .await
        .expect("marker");
    let took = ready.duration_since(t0);
    backend.kill(&spawned.handle).await.expect("kill");
    let _ = tokio::time::timeout(Duration::from_secs(5), spawned.child.wait()).await;
    took
}

#[tokio::test]
async fn boot_time_bare_qemu_versus_backend() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let mut bare = Vec::new();
    let mut through = Vec::new();
    for i in 0..3 {
        bare.push(bare_boot(&qemu_bin, &g).await);
        through.push(backend_boot(&qemu_bin, &g, &dir.path().join(format!("vm{i}"))).await);
    }
    bare.sort();
    through.sort();
    println!(
        "boot-to-marker (TCG, 3 runs each, sorted): bare qemu {bare:?}, through QemuBackend {through:?}; medians {:?} vs {:?}",
        bare[1], through[1]
    );
}

#[tokio::test]
async fn kvm_probe_is_bounded() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let opts = ProbeOptions::new(qemu_bin, g.kernel.clone(), Some(dir.path().join("state")));
    let t0 = Instant::now();
    let probe = kvm::probe(AcceleratorChoice::Auto, &opts)
        .await
        .expect("auto never fails");
    let took = t0.elapsed();
    println!(
        "KVM probe: {} ({}) in {took:?}",
        probe.accelerator, probe.detail
    );
    assert!(
        took < kvm::PROBE_TIMEOUT + Duration::from_secs(3),
        "probe took {took:?}"
    );
    // The second call is answered from the cache keyed by boot id.
    let t1 = Instant::now();
    let again = kvm::probe(AcceleratorChoice::Auto, &opts)
        .await
        .expect("cached");
    assert_eq!(again, probe);
    assert!(
        t1.elapsed() < Duration::from_millis(200),
        "{:?}",
        t1.elapsed()
    );
    assert!(dir.path().join("state").join(kvm::CACHE_FILE).exists());
    let forced = kvm::probe(AcceleratorChoice::Tcg, &opts)
        .await
        .expect("tcg");
    assert_eq!(forced.accelerator, Accelerator::Tcg);
    // No probe VM is left behind.
    assert!(
        common::live_pids_naming(&g.kernel).is_empty(),
        "probe VM still running"
    );
}

/// A host tap device, deleted when the test ends.
struct Tap(String);

impl Tap {
    fn create(name: &str, host_cidr: &str) -> Result<Tap, String> {
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("ip: {e}"))
                .and_then(|o| {
                    if o.status.success() {
                        Ok(())
                    } else {
                        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
                    }
                })
        };
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        let tap = Tap(name.to_string());
        ip(&["addr", "add", host_cidr, "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .output();
    }
}

async fn http_get(addr: &str, deadline: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let until = Instant::now() + deadline;
    let mut last = String::new();
    while Instant::now() < until {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")
                .await
                .map_err(|e| e.to_string())?;
            let mut body = String::new();
            s.read_to_string(&mut body)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<String, String>(body)
        };
        match tokio::time::timeout(Duration::from_secs(2), attempt).await {
            Ok(Ok(body)) => return Ok(body),
            Ok(Err(e)) => last = e,
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}

#[tokio::test]
async fn guest_serves_http_on_its_tap_interface() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let n = std::process::id() % 200 + 20;
    let tap_name = format!("igt{}", std::process::id());
    let tap = match Tap::create(&tap_name, &format!("10.213.{n}.1/30")) {
        Ok(t) => t,
        Err(e) => {
            missing(
                "guest_serves_http_on_its_tap_interface",
                &format!("cannot create tap {tap_name} (needs CAP_NET_ADMIN): {e}"),
            );
            return;
        }
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let mut cfg = config(
        &qemu_bin,
        &g,
        &dir.path().join("vm"),
        &format!("ip=10.213.{n}.2::10.213.{n}.1:255.255.255.252::eth0:off"),
    );
    cfg.nets = vec![NetConfig {
        id: "eth0".into(),
        tap: tap.0.clone(),
        mac: "02:00:0a:d5:00:02".into(),
    }];
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    backend.start(&spawned.handle).await.expect("start");
    if let Err(log) = wait_for_marker(&cfg.console_log, BOOT_DEADLINE).await {
        panic!("no marker; console:\n{log}");
    }
    let page = http_get(&format!("10.213.{n}.2:80"), Duration::from_secs(15)).await;
    backend.kill(&spawned.handle).await.expect("kill");
    let page = page.unwrap_or_else(|e| {
        let console = std::fs::read_to_string(&cfg.console_log).unwrap_or_default();
        panic!("guest did not answer HTTP: {e}; console:\n{console}")
    });
    assert!(page.starts_with("HTTP/1."), "{page}");
    // The name `config` gives (`ignis.name=`): this `ip=` names no host.
    assert!(page.contains("hostname: test-vm"), "{page}");
}

/// After an agent restart only the persisted handle is left: the backend must still see,
/// stop and explain the VM through it.
#[tokio::test]
async fn readopted_handle_controls_and_explains_the_vm() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let cfg = config(&qemu_bin, &g, &dir.path().join("vm"), "");
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    backend.start(&spawned.handle).await.expect("start");
    let handle = spawned.handle.clone();
    // The "old agent" goes away: only the serialized handle survives.
    drop(spawned);
    let handle: ignis::agent::vmm::VmmHandle =
        serde_json::from_str(&serde_json::to_string(&handle).expect("ser")).expect("de");
    if let Err(log) = wait_for_marker(&cfg.console_log, BOOT_DEADLINE).await {
        panic!("no marker; console:\n{log}");
    }
    assert_eq!(
        backend.state(&handle).await.expect("state"),
        VmmState::Running
    );
    backend.stop(&handle).await.expect("stop");
    let until = Instant::now() + EXIT_DEADLINE;
    while process::is_alive(&handle) {
        assert!(Instant::now() < until, "VM did not power off");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let console = std::fs::read_to_string(&cfg.console_log).expect("console");
    let exit = backend.classify_exit(&handle, None, &console);
    assert_eq!(
        (exit.success, exit.reason.clone()),
        (true, ExitReason::GuestShutdown),
        "{exit:?}"
    );
    assert_eq!(
        backend.state(&handle).await.expect("state"),
        VmmState::Exited
    );
    // A VMM that died with no trace on the console, status unknown.
    let exit = backend.classify_exit(&handle, None, "ignis: ready\n");
    assert_eq!(exit.reason, ExitReason::VmmExitedWhileAgentDown);
}

#[tokio::test]
async fn guest_exit_after_delay() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let _turn = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let cfg = config(&qemu_bin, &g, &dir.path().join("vm"), "ignis.exit_after=2");
    let backend = QemuBackend::new(&qemu_bin).expect("backend");
    let mut spawned = backend.create(&cfg).await.expect("create");
    let _reaper = Reaper(spawned.handle.pid);
    backend.start(&spawned.handle).await.expect("start");
    let ready = wait_for_marker(&cfg.console_log, BOOT_DEADLINE)
        .await
        .expect("marker");
    let exit = wait_exit(&backend, &mut spawned).await;
    assert!(
        ready.elapsed() >= Duration::from_secs(2),
        "{:?}",
        ready.elapsed()
    );
    assert_eq!(
        (exit.success, exit.reason.clone()),
        (true, ExitReason::GuestShutdown),
        "{exit:?}"
    );
}

/// The probe's deadline path for real: on this host a `qemu64` guest under KVM prints the
/// setup stub's line and then hangs, so the probe must give up at its bound and kill it.
#[tokio::test]
async fn kvm_probe_gives_up_on_a_stuck_guest() {
    let Some(qemu_bin) = prerequisites() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let g = guest(dir.path());
    let mut opts = ProbeOptions::new(qemu_bin, g.kernel.clone(), None);
    opts.cpu = "qemu64".into();
    opts.timeout = Duration::from_secs(2);
    let t0 = Instant::now();
    let probe = kvm::probe(AcceleratorChoice::Auto, &opts)
        .await
        .expect("auto never fails");
    let took = t0.elapsed();
    println!(
        "KVM probe (-cpu qemu64): {} ({}) in {took:?}",
        probe.accelerator, probe.detail
    );
    assert!(took < opts.timeout + Duration::from_secs(3), "{took:?}");
    assert!(
        common::live_pids_naming(&g.kernel).is_empty(),
        "probe VM still running"
    );
}
