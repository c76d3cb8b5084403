//! What the integration tests share: the demo guest, an agent (in-process or the real
//! binary), a gRPC client over its unix socket, waits that always have a deadline, and (in
//! [`net`]) network namespaces of the test's own.

#![allow(dead_code)]

pub mod net;
pub mod simulated;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ignis::agent::guest::{DemoGuest, build_demo_guest};
use ignis::proto;
use ignis::proto::agent_client::AgentClient;
use tonic::transport::Channel;

pub const MARKER: &str = "ignis: ready";
pub const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Whether QEMU is here; tests that boot guests skip (saying why) only when it is not.
pub fn qemu_present() -> bool {
    let found = ignis::agent::vmm::process::resolve_binary(Path::new("qemu-system-x86_64")).is_ok();
    if !found {
        ignis::testing::prerequisite::missing(
            "this test",
            "qemu-system-x86_64 is not installed (scripts/setup.sh)",
        );
    }
    found
}

/// Where [`demo_guest`] builds the demo guest.
pub fn demo_guest_dir() -> PathBuf {
    std::env::temp_dir().join("ignis-test-guest")
}

/// The demo guest, built once per machine into the system temp dir (the builder reuses it).
/// An agent boots it only with [`demo_guest_dir`] among its allowed path directories
/// ([`allow_test_guests`], `--allowed-path-dir`).
pub fn demo_guest() -> DemoGuest {
    build_demo_guest(&demo_guest_dir()).expect("build the demo guest")
}

/// Let an in-process agent boot the test guests: their directory becomes an allowed path
/// directory, and TCG (no KVM on the test machines) is allowed, as `ignis dev` does.
pub fn allow_test_guests(config: &mut ignis::agent::AgentConfig) {
    config.vmm_policy.allowed_path_dirs.push(demo_guest_dir());
    config.vmm_policy.allow_tcg = true;
}

/// An in-process agent serving `config` on its unix socket, and a client connected to it.
/// Cancel the token and wait on the handle to stop it.
pub async fn serve_with_client(
    config: ignis::agent::AgentConfig,
) -> (
    ignis::agent::AgentHandle,
    AgentClient<Channel>,
    tokio_util::sync::CancellationToken,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let agent = ignis::agent::serve(config, shutdown.clone())
        .await
        .expect("serve");
    let client = connect(agent.socket_path().expect("unix"), Duration::from_secs(5)).await;
    (agent, client, shutdown)
}

/// A gRPC client on a unix socket, retried until `deadline`.
pub async fn connect(socket: &Path, within: Duration) -> AgentClient<Channel> {
    let deadline = Instant::now() + within;
    loop {
        let path = socket.to_path_buf();
        let endpoint =
            tonic::transport::Endpoint::try_from("http://agent.local").expect("endpoint");
        let connected = endpoint
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                }
            }))
            .await;
        match connected {
            Ok(channel) => return AgentClient::new(channel),
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("cannot connect to {}: {error}", socket.display()),
        }
    }
}

/// A `VMSpec` for the demo guest.
pub fn demo_spec(uid: &str, guest: &DemoGuest) -> proto::VmSpec {
    proto::VmSpec {
        uid: uid.to_owned(),
        namespace: "default".into(),
        name: format!("vm-{uid}"),
        hypervisor: proto::Hypervisor::Qemu as i32,
        accelerator: proto::Accelerator::Tcg as i32,
        vcpus: 1,
        memory_bytes: 128 << 20,
        kernel_path: guest.kernel.display().to_string(),
        kernel_cmdline: CMDLINE.into(),
        initrd_path: guest.initrd.display().to_string(),
        interfaces: vec![proto::NetworkInterface {
            name: "eth0".into(),
            mode: proto::InterfaceMode::None as i32,
            ..Default::default()
        }],
        readiness_console_marker: MARKER.into(),
        termination_grace_period_seconds: 2,
        ..Default::default()
    }
}

pub fn apply_request(spec: proto::VmSpec) -> proto::ApplyVmRequest {
    proto::ApplyVmRequest {
        spec: Some(spec),
        spec_hash: "h1".into(),
        run: 1,
        desired_state: proto::DesiredState::Running as i32,
        pull_secrets: Vec::new(),
        pod: None,
        ..Default::default()
    }
}

/// Poll `GetVM` until `done` holds, or panic at the deadline.
pub async fn wait_vm(
    client: &mut AgentClient<Channel>,
    uid: &str,
    within: Duration,
    done: impl Fn(&proto::Vm) -> bool,
) -> proto::Vm {
    let deadline = Instant::now() + within;
    loop {
        let vm = client
            .get_vm(proto::GetVmRequest {
                uid: uid.to_owned(),
            })
            .await
            .map(|r| r.into_inner());
        if let Ok(vm) = &vm
            && done(vm)
        {
            return vm.clone();
        }
        assert!(
            Instant::now() < deadline,
            "VM {uid} did not get there in {within:?}: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn state_of(vm: &proto::Vm) -> proto::VmState {
    vm.state()
}

/// Whether a pid is a live (non-zombie) process.
pub fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Wait until `pid` is gone.
pub async fn wait_pid_gone(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    while pid_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} still alive after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The live processes whose command line names `path` (a VMM's API socket, its kernel): what
/// a test checks is gone, read from /proc rather than through the agent's own lookup.
pub fn live_pids_naming(path: &Path) -> Vec<u32> {
    let needle = path.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .filter(|&pid| pid_alive(pid))
        .collect()
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Every file under `dir`, relative.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(base, &path, out);
                } else {
                    out.push(path.strip_prefix(base).unwrap_or(&path).to_path_buf());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The real `ignis agent` binary, killed on drop.
pub struct AgentProcess {
    pub child: Child,
    pub socket: PathBuf,
}

impl AgentProcess {
    pub fn spawn(state_dir: &Path) -> Self {
        let socket = state_dir.join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_ignis"))
            .args(["agent", "--state-dir"])
            .arg(state_dir)
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .args([
                "--health-addr",
                "127.0.0.1:0",
                "--accelerator",
                "tcg",
                "--boot-timeout",
                "90s",
                // Runs in the host's own network namespace: never reconfigure it.
                "--no-network",
                "--allow-tcg",
            ])
            .arg("--allowed-path-dir")
            .arg(demo_guest_dir())
            .env("IGNIS_LOG_LEVEL", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ignis agent");
        Self { child, socket }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// SIGKILL a pid.
pub fn sigkill(pid: u32) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    kill(
        Pid::from_raw(i32::try_from(pid).expect("pid")),
        Signal::SIGKILL,
    )
    .expect("kill");
}

/// SIGKILLs the pids it was given when a test ends early, so a failed test leaks no VMM.
#[derive(Default)]
pub struct Reaper(pub Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            // Never panics: it may run while a failed test unwinds.
            if pid_alive(*pid)
                && let Ok(pid) = i32::try_from(*pid)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}
