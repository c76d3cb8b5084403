//! A Firecracker or Cloud Hypervisor test double: a stand-in process the backend spawns (a
//! shell script), and its HTTP API served in the test process on the socket it names. Both
//! VMMs cannot be installed on these machines; the double models what the real programs were
//! seen doing (issue #13: Firecracker v1.17-dev and Cloud Hypervisor v54, built from source)
//! and what their API specs (`tests/fixtures/specs/`) and documentation say:
//!
//! - **Firecracker** writes its log to stdout unless started with `--log-path`, whose file must
//!   already exist (`docs/logger.md`: "create the resource that will be used for logging");
//!   it logs `Running Firecracker v…` at start and every API request it receives, prefixed by
//!   its `--id` (`anonymous-instance` without one). The guest serial console goes to stdout.
//!   It installs its own seccomp filters unless started with `--no-seccomp` (its
//!   `docs/seccomp.md`); the backend never passes that, and the double takes any flags.
//! - **Cloud Hypervisor** takes `--seccomp true|false|log` (filters on by default: its
//!   `docs/seccomp.md`); the backend passes `true`. It logs to stderr. It writes the guest
//!   serial console to the file of `serial: File`. It warns about every disk without `image_type` (the type is auto-detected,
//!   which is deprecated, and writes to sector 0 are disabled). After a vCPU error it logs
//!   `VCPU generated error` and exits with status 0. A guest reset reboots the guest in place:
//!   the process does not end. A guest power-off ends it with status 0.
//!
//! Suspend and resume (`vmm/snapshot.rs`) follow the specs' rules and the VMMs' snapshot
//! documentation: a snapshot only of a paused VM, a load only into a fresh VMM that was
//! configured with nothing, the guest paused after the load until resumed, and a missing or
//! damaged file refused with a 400 and the VMM's fault text.
//!
//! The API answers what the spec documents (instance info, `vm.info`, 204 otherwise); a test
//! can script other answers ([`FakeVmm::answering`]) and check every request
//! ([`FakeVmm::checking`], e.g. against the spec). What the guest prints once booted and what
//! it does next is a [`Guest`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::agent::vmm::http::ApiRequest;

mod snapshot;
use snapshot::Phase;

/// Which VMM the double plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Firecracker,
    CloudHypervisor,
}

/// The version the double reports.
pub const FIRECRACKER_VERSION: &str = "1.17.0-dev";
pub const CLOUD_HYPERVISOR_VERSION: &str = "v54.0";

/// What the guest does once the VMM boots it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Guest {
    /// Printed on the serial console right after boot (nothing by default).
    pub console: String,
    /// What happens `after` that.
    pub fate: Fate,
    pub after: Duration,
}

/// How a booted guest's run goes on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fate {
    /// It keeps running.
    #[default]
    Runs,
    /// A vCPU error: Cloud Hypervisor logs `VCPU generated error` and exits 0 (not modelled
    /// for Firecracker: the guest keeps running).
    VcpuError,
    /// The guest resets: Cloud Hypervisor reboots it in place (the console shows the guest
    /// booting again); Firecracker exits 0.
    Reboot,
    /// The guest powers off: the VMM exits 0.
    PowerOff,
}

/// A scripted answer.
#[derive(Clone, Debug)]
pub enum Reply {
    Json(u16, Value),
    Text(u16, String),
    Empty(u16),
    /// Never answer.
    Hang,
}

type Responder = Arc<dyn Fn(&Method, &str, Option<&Value>) -> Option<Reply> + Send + Sync>;
type Check = Arc<dyn Fn(&ApiRequest) -> Result<(), String> + Send + Sync>;
type ReplyCheck =
    Arc<dyn Fn(&Method, &str, u16, Option<&Value>) -> Result<(), String> + Send + Sync>;

/// One process the backend spawned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spawn {
    pub pid: u32,
    /// Its command line after the binary.
    pub args: Vec<String>,
    pub api_socket: PathBuf,
    /// Where it writes its own log: a file, or `/proc/<pid>/fd/1|2`.
    pub log: PathBuf,
}

#[derive(Default)]
struct Recorded {
    requests: Vec<ApiRequest>,
    violations: Vec<String>,
    spawns: Vec<Spawn>,
}

struct Shared {
    flavor: Flavor,
    registry: PathBuf,
    guest: Mutex<Guest>,
    recorded: Mutex<Recorded>,
    responder: Mutex<Responder>,
    check: Mutex<Option<Check>>,
    check_reply: Mutex<Option<ReplyCheck>>,
}

/// The double: its binary for the backend to spawn, and what it saw.
pub struct FakeVmm {
    shared: Arc<Shared>,
    binary: PathBuf,
    watcher: tokio::task::JoinHandle<()>,
}

impl Drop for FakeVmm {
    /// A test that fails half-way leaves no stand-in behind.
    fn drop(&mut self) {
        self.watcher.abort();
        let registry = self.shared.registry.display().to_string();
        for spawn in self.spawns() {
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", spawn.pid)).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&registry)
                && let Ok(pid) = i32::try_from(spawn.pid)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl FakeVmm {
    /// A double keeping its script and bookkeeping under `dir`; serves every process spawned
    /// from [`FakeVmm::binary`] until dropped. Needs a tokio runtime.
    pub fn start(flavor: Flavor, dir: &Path) -> FakeVmm {
        let registry = dir.join(match flavor {
            Flavor::Firecracker => "fake-firecracker.d",
            Flavor::CloudHypervisor => "fake-cloud-hypervisor.d",
        });
        std::fs::create_dir_all(&registry).expect("registry dir");
        let binary = registry.join("vmm");
        std::fs::write(&binary, script(flavor, &registry)).expect("write the fake VMM");
        set_executable(&binary);
        let shared = Arc::new(Shared {
            flavor,
            registry,
            guest: Mutex::new(Guest::default()),
            recorded: Mutex::new(Recorded::default()),
            responder: Mutex::new(Arc::new(|_, _, _| None)),
            check: Mutex::new(None),
            check_reply: Mutex::new(None),
        });
        let watcher = tokio::spawn(watch_spawns(shared.clone()));
        FakeVmm {
            shared,
            binary,
            watcher,
        }
    }

    pub fn flavor(&self) -> Flavor {
        self.shared.flavor
    }

    /// The executable to give the backend.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// What the guest of every later boot does.
    pub fn guest(&self, guest: Guest) {
        *lock(&self.shared.guest) = guest;
    }

    /// Answer with `responder` where it returns `Some`, as the VMM would otherwise.
    pub fn answering(
        self,
        responder: impl Fn(&Method, &str, Option<&Value>) -> Option<Reply> + Send + Sync + 'static,
    ) -> Self {
        *lock(&self.shared.responder) = Arc::new(responder);
        self
    }

    /// Check every request (a failed one is answered 400 and recorded as a violation) and
    /// every answer the double gives.
    pub fn checking(
        self,
        request: impl Fn(&ApiRequest) -> Result<(), String> + Send + Sync + 'static,
        reply: impl Fn(&Method, &str, u16, Option<&Value>) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        *lock(&self.shared.check) = Some(Arc::new(request));
        *lock(&self.shared.check_reply) = Some(Arc::new(reply));
        self
    }

    pub fn requests(&self) -> Vec<ApiRequest> {
        lock(&self.shared.recorded).requests.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        lock(&self.shared.recorded).violations.clone()
    }

    /// Serve the API on `socket` with no process behind it (a test talks to it with a handle
    /// of its own process): for answers only, the guest never shows.
    pub fn serve_at(&self, socket: &Path) {
        let vmm = Arc::new(Vmm {
            shared: self.shared.clone(),
            pid: 0,
            id: "anonymous-instance".to_owned(),
            log: PathBuf::from("/dev/null"),
            serial: Mutex::new(None),
            machine: Mutex::new(Machine::default()),
        });
        serve(vmm, socket).expect("bind the fake VMM socket");
    }

    /// The processes spawned so far, first first.
    pub fn spawns(&self) -> Vec<Spawn> {
        lock(&self.shared.recorded).spawns.clone()
    }

    /// Wait (bounded) until `n` processes were spawned and are served.
    pub async fn wait_spawns(&self, n: usize, within: Duration) -> Vec<Spawn> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let spawns = self.spawns();
            if spawns.len() >= n {
                return spawns;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fake VMM was spawned {} times, not {n}, within {within:?}",
                spawns.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The stand-in process. It records how it was started, writes its start-up log where the
/// real VMM does, registers with the double (which then serves its API socket), and waits
/// until the double ends it (a status on its FIFO) or a signal does.
fn script(flavor: Flavor, registry: &Path) -> String {
    let reg = registry.display();
    let start = match flavor {
        Flavor::Firecracker => format!(
            r#"if [ -n "$log" ]; then
  # Firecracker opens --log-path without creating it.
  if [ ! -e "$log" ]; then
    echo "Error: Logger(LoggerUpdateError(Os {{ code: 2, kind: NotFound, message: \"No such file or directory\" }}))" >&2
    exit 1
  fi
  dest="$log"
else
  dest="/proc/$$/fd/1"
fi
echo "$(date -u +%Y-%m-%dT%H:%M:%S.%NZ) [$id:main] Running Firecracker v{FIRECRACKER_VERSION}" >> "$dest""#
        ),
        Flavor::CloudHypervisor => r#"dest="/proc/$$/fd/2""#.to_owned(),
    };
    format!(
        r#"#!/bin/sh
# A {flavor:?} test double (ignis::testing::vmm).
reg='{reg}'
printf '%s\n' "$@" > "$reg/$$.args"
sock=''; log=''; id='anonymous-instance'
while [ $# -gt 0 ]; do
  case "$1" in
    --api-sock) sock="$2"; shift ;;
    --api-socket) sock="${{2#path=}}"; shift ;;
    --log-path) log="$2"; shift ;;
    --id) id="$2"; shift ;;
  esac
  shift
done
{start}
mkfifo "$reg/$$.end"
echo "$$ $id $sock $dest" >> "$reg/spawns"
read status < "$reg/$$.end"
exit "$status"
"#
    )
}

/// Serve each process the script registers.
async fn watch_spawns(shared: Arc<Shared>) {
    let list = shared.registry.join("spawns");
    let mut seen = 0;
    loop {
        let text = std::fs::read_to_string(&list).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        for line in lines.iter().skip(seen) {
            let fields: Vec<&str> = line.splitn(4, ' ').collect();
            let [pid, id, socket, log] = fields[..] else {
                continue;
            };
            let pid: u32 = pid.parse().expect("pid");
            let args = std::fs::read_to_string(shared.registry.join(format!("{pid}.args")))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            let vmm = Arc::new(Vmm {
                shared: shared.clone(),
                pid,
                id: id.to_owned(),
                log: PathBuf::from(log),
                serial: Mutex::new(None),
                machine: Mutex::new(Machine::default()),
            });
            let socket = PathBuf::from(socket);
            if let Err(error) = serve(vmm, &socket) {
                lock(&shared.recorded)
                    .violations
                    .push(format!("cannot serve {}: {error}", socket.display()));
            }
            lock(&shared.recorded).spawns.push(Spawn {
                pid,
                args,
                api_socket: socket,
                log: PathBuf::from(log),
            });
        }
        seen = lines.len();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serve `vmm`'s API on `socket` until the test ends.
fn serve(vmm: Arc<Vmm>, socket: &Path) -> std::io::Result<()> {
    let listener = tokio::net::UnixListener::bind(socket)?;
    let router = axum::Router::new().fallback(move |method: Method, uri: Uri, body: Bytes| {
        let vmm = vmm.clone();
        async move { vmm.handle(method, uri, body).await }
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok(())
}

/// One spawned stand-in, as its API server sees it.
struct Vmm {
    shared: Arc<Shared>,
    pid: u32,
    id: String,
    /// Where it logs (see [`Spawn::log`]).
    log: PathBuf,
    /// Cloud Hypervisor: the serial console file `vm.create` named.
    serial: Mutex<Option<PathBuf>>,
    machine: Mutex<Machine>,
}

/// What a stand-in's VM is: where it is in its life, and what a snapshot of it holds.
#[derive(Clone, Debug, Default)]
struct Machine {
    phase: Phase,
    /// Guest memory: Firecracker's `machine-config`, Cloud Hypervisor's `memory.size`.
    memory_bytes: u64,
    /// Cloud Hypervisor: the `VmConfig` of `vm.create`, or of the restored snapshot.
    config: Option<Value>,
    /// Loaded from a snapshot: Firecracker then refuses `InstanceStart`.
    restored: bool,
}

impl Vmm {
    async fn handle(self: Arc<Self>, method: Method, uri: Uri, body: Bytes) -> Response {
        let path = uri.path().to_owned();
        let body = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice::<Value>(&body) {
                Ok(v) => Some(v),
                Err(e) => {
                    self.violation(format!("{method} {path}: body is not JSON: {e}"));
                    None
                }
            }
        };
        let request = ApiRequest {
            method: method.clone(),
            path: path.clone(),
            body: body.clone(),
        };
        lock(&self.shared.recorded).requests.push(request.clone());
        if self.shared.flavor == Flavor::Firecracker {
            self.log_line(&format!(
                "[{}:fc_api] The API server received a {} request on \"{path}\".",
                self.id,
                capitalized(method.as_str())
            ));
        }
        let check = lock(&self.shared.check).clone();
        if let Some(Err(e)) = check.map(|check| check(&request)) {
            self.violation(e.clone());
            return reply(Reply::Json(400, json!({ "fault_message": e })));
        }
        let responder = lock(&self.shared.responder).clone();
        let answer = match responder(&method, &path, body.as_ref()) {
            Some(answer) => answer,
            None => self.clone().default_answer(&method, &path, body.as_ref()),
        };
        let (status, answer_body) = match &answer {
            Reply::Json(s, v) => (*s, Some(v)),
            Reply::Text(s, _) | Reply::Empty(s) => (*s, None),
            Reply::Hang => std::future::pending().await,
        };
        let check_reply = lock(&self.shared.check_reply).clone();
        if let Some(Err(e)) = check_reply.map(|check| check(&method, &path, status, answer_body)) {
            self.violation(format!("the fake itself answered off-spec: {e}"));
        }
        reply(answer)
    }

    fn violation(&self, v: String) {
        lock(&self.shared.recorded).violations.push(v);
    }

    /// What the VMM answers and does when the test scripted nothing.
    fn default_answer(self: Arc<Self>, method: &Method, path: &str, body: Option<&Value>) -> Reply {
        match (self.shared.flavor, method.as_str(), path) {
            (Flavor::Firecracker, "GET", "/") => Reply::Json(
                200,
                json!({
                    "app_name": "Firecracker",
                    "id": self.id,
                    "state": self.phase().firecracker_state(),
                    "vmm_version": FIRECRACKER_VERSION,
                }),
            ),
            (Flavor::Firecracker, "PUT", "/actions")
                if body.is_some_and(|b| b["action_type"] == "InstanceStart") =>
            {
                if let Some(refusal) = self.refuse_start() {
                    return refusal;
                }
                self.boot();
                Reply::Empty(204)
            }
            (Flavor::Firecracker, "PATCH", "/vm") => self.firecracker_vm_state(body),
            (Flavor::Firecracker, "PUT", "/snapshot/create") => self.firecracker_snapshot(body),
            (Flavor::Firecracker, "PUT", "/snapshot/load") => self.firecracker_load(body),
            (Flavor::Firecracker, "PUT", _) => {
                self.configured(path, body);
                Reply::Empty(204)
            }
            (Flavor::CloudHypervisor, "PUT", "/api/v1/vm.pause") => self.ch_pause(),
            (Flavor::CloudHypervisor, "PUT", "/api/v1/vm.resume") => self.ch_resume(),
            (Flavor::CloudHypervisor, "PUT", "/api/v1/vm.snapshot") => self.ch_snapshot(body),
            (Flavor::CloudHypervisor, "PUT", "/api/v1/vm.restore") => self.ch_restore(body),
            (Flavor::CloudHypervisor, "GET", "/api/v1/vmm.ping") => {
                Reply::Json(200, json!({ "version": CLOUD_HYPERVISOR_VERSION }))
            }
            (Flavor::CloudHypervisor, "PUT", "/api/v1/vm.create") => {
                self.create(body);
                Reply::Empty(204)
            }
            (Flavor::CloudHypervisor, "GET", "/api/v1/vm.info") => {
                let machine = lock(&self.machine).clone();
                match machine.config {
                    Some(config) => Reply::Json(
                        200,
                        json!({
                            "config": config,
                            "state": machine.phase.cloud_hypervisor_state(),
                        }),
                    ),
                    None => Reply::Empty(404),
                }
            }
            (Flavor::CloudHypervisor, "PUT", "/api/v1/vm.boot") => {
                self.boot();
                Reply::Empty(204)
            }
            _ => Reply::Empty(204),
        }
    }

    /// `vm.create`: remember the VM and its serial file; warn about disks without
    /// `image_type`.
    fn create(&self, body: Option<&Value>) {
        let Some(body) = body else { return };
        self.created(body);
        for disk in body["disks"].as_array().into_iter().flatten() {
            if disk.get("image_type").is_none() {
                self.log_line(&format!(
                    "cloud-hypervisor: 0.012345s: <vmm> WARN:block/src/lib.rs:421 -- Disk {} \
                     has no image_type: autodetected the image type, which is deprecated; \
                     writes to sector 0 are disabled",
                    disk["path"].as_str().unwrap_or("?")
                ));
            }
        }
    }

    /// Start the guest: its console output, then its fate.
    fn boot(self: Arc<Self>) {
        lock(&self.machine).phase = Phase::Running;
        let guest = lock(&self.shared.guest).clone();
        self.console(&guest.console);
        tokio::spawn(async move {
            tokio::time::sleep(guest.after).await;
            match (guest.fate, self.shared.flavor) {
                (Fate::Runs, _) => {}
                // Modelled for Cloud Hypervisor only.
                (Fate::VcpuError, Flavor::Firecracker) => {}
                (Fate::VcpuError, Flavor::CloudHypervisor) => {
                    self.log_line(
                        "cloud-hypervisor: 3.456789s: <vcpu0> ERROR:vmm/src/cpu.rs:1187 -- \
                         VCPU generated error: VcpuUnhandledKvmExit",
                    );
                    self.end(0).await;
                }
                (Fate::Reboot, Flavor::CloudHypervisor) => {
                    // In place: the guest boots again under the same process.
                    self.console("reboot: Restarting system\n");
                    self.console(&guest.console);
                }
                (Fate::Reboot, Flavor::Firecracker) => {
                    self.console("reboot: Restarting system\n");
                    self.end(0).await;
                }
                (Fate::PowerOff, _) => {
                    self.console("reboot: Power down\n");
                    self.end(0).await;
                }
            }
        });
    }

    /// Append to the guest's serial console: Firecracker's stdout, Cloud Hypervisor's file.
    fn console(&self, text: &str) {
        let path = match self.shared.flavor {
            Flavor::Firecracker => Some(PathBuf::from(format!("/proc/{}/fd/1", self.pid))),
            Flavor::CloudHypervisor => lock(&self.serial).clone(),
        };
        if let Some(path) = path {
            // Cloud Hypervisor creates its serial file.
            if let Ok(mut file) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                let _ = file.write_all(text.as_bytes());
            }
        }
    }

    /// One line of the VMM's own log.
    fn log_line(&self, line: &str) {
        append(&self.log, &format!("{line}\n"));
    }

    /// End the process with `status` (it waits on its FIFO).
    async fn end(&self, status: i32) {
        let fifo = self.shared.registry.join(format!("{}.end", self.pid));
        let _ = tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(fifo)
                .and_then(|mut f| writeln!(f, "{status}"))
        })
        .await;
    }
}

fn append(path: &Path, text: &str) {
    if text.is_empty() {
        return;
    }
    // A process already gone has no fd to write to: nothing to model then.
    if let Ok(mut file) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = file.write_all(text.as_bytes());
    }
}

/// `PUT` → `Put`, as Firecracker logs methods.
fn capitalized(method: &str) -> String {
    let lower = method.to_ascii_lowercase();
    let mut chars = lower.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

fn reply(answer: Reply) -> Response {
    let code = |s: u16| StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    match answer {
        Reply::Json(s, v) => (code(s), axum::Json(v)).into_response(),
        Reply::Text(s, t) => (code(s), t).into_response(),
        Reply::Empty(s) => code(s).into_response(),
        Reply::Hang => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
