//! The system under test: the `ignis dev` stack, with each part where it can be measured
//! alone. The embedded API server runs in this process (its write counter is read directly);
//! the agent and the controller run as child processes of this very binary (`ignis agent`,
//! `ignis controller`), so their RSS, fds and children are theirs only. A watch on every
//! MicroVM stamps the moment each one is first seen Scheduled, Ready and gone.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::BenchError;
use super::stats::parse_vm_rss;
use super::writes::{ObjectWrites, WriteCounter};
use crate::agent::guest;
use crate::api::{ConditionType, MicroVM, MicroVmBuilder, find_condition};
use crate::dev::apiserver::{self, ApiServerHandle};

/// The node every bench stack runs on (the API server's seeded Node and the agent agree).
pub(crate) const NODE: &str = "bench-node";
/// How many times its real capacity the bench stack's agent advertises: the benches put
/// more VMs on this host than it has vCPUs (20 concurrent boots, 10 000 simulated VMs), and
/// measure the control plane and the VMM, not the scheduler refusing an overcommitted node.
pub(crate) const OVERCOMMIT: u32 = 10_000;
/// The MicroVMs' namespace.
pub(crate) const NAMESPACE: &str = "default";

/// What the stack runs on.
#[derive(Clone, Debug)]
pub(crate) struct StackOptions {
    /// The agent runs the `simulated` VMM (control-plane bench only).
    pub(crate) simulated: bool,
    /// The agent's guest boot deadline.
    pub(crate) boot_timeout: Duration,
}

/// When a MicroVM was first seen in each state, by the bench's own watch.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    pub(crate) scheduled: Option<Instant>,
    pub(crate) ready: Option<Instant>,
    pub(crate) gone: Option<Instant>,
    pub(crate) accelerator: Option<String>,
    pub(crate) hypervisor: Option<String>,
    /// Why the VM failed, when its phase went `Failed`.
    pub(crate) failed: Option<String>,
}

pub(crate) type Tracker = Arc<Mutex<HashMap<String, Progress>>>;

/// A running stack. Stop it with [`Stack::stop`]; dropping it kills the children.
pub(crate) struct Stack {
    pub(crate) dir: PathBuf,
    pub(crate) guest: guest::DemoGuest,
    pub(crate) api: ApiServerHandle,
    /// Write requests per object, counted by an observer on the API server's hub.
    pub(crate) write_counter: Arc<WriteCounter>,
    pub(crate) client: kube::Client,
    pub(crate) agent: Child,
    /// How the agent was started, to start it again ([`Stack::restart_agent`]).
    pub(crate) agent_args: Vec<String>,
    pub(crate) agent_health: SocketAddr,
    pub(crate) controller: Child,
    pub(crate) controller_health: SocketAddr,
    pub(crate) tracker: Tracker,
    stop_api: CancellationToken,
    stop_watch: CancellationToken,
}

/// A fresh scratch directory under the system temp dir (no `tempfile` outside tests).
pub(crate) fn scratch_dir(what: &str) -> Result<PathBuf, BenchError> {
    // Short: QEMU's QMP socket lives a few levels down and unix socket paths end at 108 bytes.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = std::env::temp_dir().join(format!("ib-{what}-{}", &id[..8]));
    std::fs::create_dir_all(&dir).map_err(|source| BenchError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    Ok(dir)
}

/// A loopback address with a port that was free a moment ago.
pub(crate) fn free_addr() -> Result<SocketAddr, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| BenchError::Io {
        what: "pick a free port".into(),
        source,
    })?;
    listener.local_addr().map_err(|source| BenchError::Io {
        what: "pick a free port".into(),
        source,
    })
}

/// This binary, to run `ignis agent` / `ignis controller` / `ignis dev` from.
pub(crate) fn self_exe() -> Result<PathBuf, BenchError> {
    std::env::current_exe().map_err(|source| BenchError::Io {
        what: "find the ignis binary".into(),
        source,
    })
}

/// Start `ignis <args>` with its output in `log`.
pub(crate) fn spawn_ignis(
    args: &[String],
    envs: &[(&str, &std::ffi::OsStr)],
    log: &Path,
) -> Result<Child, BenchError> {
    let exe = self_exe()?;
    let out = std::fs::File::create(log).map_err(|source| BenchError::Io {
        what: format!("create {}", log.display()),
        source,
    })?;
    let err = out.try_clone().map_err(|source| BenchError::Io {
        what: format!("open {}", log.display()),
        source,
    })?;
    let mut cmd = Command::new(&exe);
    cmd.args(["--log-level", "warn", "--log-format", "json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().map_err(|source| BenchError::Io {
        what: format!("spawn {} {}", exe.display(), args.join(" ")),
        source,
    })
}

/// One `GET` over HTTP/1.0; the status code and body.
pub(crate) async fn http_get(
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String), std::io::Error> {
    let work = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "GET timed out"))?
}

/// Poll `/readyz` every millisecond until it answers 200; the time it took from `since`.
/// Spawn `ignis` with `args` and wait up to `timeout` until it answers `/readyz` on `health`:
/// the child, and how long it took to get ready (or why it did not).
pub(crate) async fn start_ignis(
    args: &[String],
    envs: &[(&str, &std::ffi::OsStr)],
    log: &Path,
    health: SocketAddr,
    what: &str,
    timeout: Duration,
) -> Result<(Child, Result<Duration, BenchError>), BenchError> {
    let started = Instant::now();
    let mut child = spawn_ignis(args, envs, log)?;
    let took = wait_readyz(health, &mut child, started, what, timeout).await;
    Ok((child, took))
}

/// The flags of a controller that talks to the local agent at `socket` (node [`NODE`]),
/// without leader election, serving its health on `health`.
pub(crate) fn controller_args(socket: &Path, health: SocketAddr) -> Vec<String> {
    vec![
        "controller".into(),
        "--agent-endpoint".into(),
        format!("{NODE}=unix://{}", socket.display()),
        "--insecure-agents".into(),
        "--leader-election".into(),
        "false".into(),
        "--health-addr".into(),
        health.to_string(),
    ]
}

pub(crate) async fn wait_readyz(
    addr: SocketAddr,
    child: &mut Child,
    since: Instant,
    what: &str,
    timeout: Duration,
) -> Result<Duration, BenchError> {
    let deadline = since + timeout;
    loop {
        if let Ok((200, _)) = http_get(addr, "/readyz").await {
            return Ok(since.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(BenchError::Failed(format!("{what} exited early: {status}")));
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: format!("{what} /readyz"),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Resident memory of a process, in bytes.
pub(crate) fn rss_of(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_vm_rss(&s))
}

/// Resident memory of this process.
pub(crate) fn own_rss() -> Option<u64> {
    rss_of(std::process::id())
}

/// The MicroVM `name` as the sample manifest has it, pointed at this stack's guest.
pub(crate) fn sample_microvm(name: &str, guest: &guest::DemoGuest) -> MicroVM {
    MicroVmBuilder::sample(name)
        .namespace(NAMESPACE)
        .guest(&guest.kernel, &guest.initrd)
        // Deleted VMs are killed at once instead of idling through a grace period, so they
        // do not load the CPU under the next measurement.
        .grace_period_seconds(0)
        .build()
}

impl Stack {
    /// Start the API server here, then the agent and the controller as children.
    pub(crate) async fn start(options: &StackOptions) -> Result<Stack, BenchError> {
        Self::start_with(options, &[]).await
    }

    /// [`Stack::start`], the agent given `agent_flags` too.
    pub(crate) async fn start_with(
        options: &StackOptions,
        agent_flags: &[String],
    ) -> Result<Stack, BenchError> {
        let dir = scratch_dir(if options.simulated { "sim" } else { "qemu" })?;
        let guest_dir = dir.join("guest");
        let guest = tokio::task::spawn_blocking(move || guest::build_demo_guest(&guest_dir))
            .await
            .map_err(|e| BenchError::Failed(format!("guest build task: {e}")))?
            .map_err(BenchError::Guest)?;

        let stop_api = CancellationToken::new();
        let mut config = crate::dev::api_server_config(dir.join("apiserver"))
            .map_err(|e| BenchError::Failed(format!("the MicroVM resource: {e}")))?;
        let write_counter = Arc::new(WriteCounter::default());
        config.observers.push(write_counter.clone());
        config.node_name = NODE.into();
        // The node advertises room for every VM a bench creates: the benches measure the
        // control plane and the VMM, not the scheduler refusing an overcommitted host.
        config.node_vcpus = 1_000_000;
        config.node_memory_bytes = 1 << 60;
        config.history_limit = 1_000_000;
        let api = apiserver::start(config, stop_api.clone())
            .await
            .map_err(BenchError::ApiServer)?;
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig)
            .map_err(|source| BenchError::Io {
                what: "write the kubeconfig".into(),
                source,
            })?;
        let client = kube::Client::try_from(api.client_config()).map_err(BenchError::Kube)?;

        let socket = dir.join("agent.sock");
        let agent_health = free_addr()?;
        let mut agent_args: Vec<String> = vec![
            "agent".into(),
            "--node-name".into(),
            NODE.into(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--listen".into(),
            format!("unix://{}", socket.display()),
            "--health-addr".into(),
            agent_health.to_string(),
            "--accelerator".into(),
            "tcg".into(),
            // No KVM here: emulation, allowed explicitly (it is no security boundary).
            "--allow-tcg".into(),
            // The demo guest is built beside the agent's state, not in it.
            "--allowed-path-dir".into(),
            dir.join("guest").display().to_string(),
            "--boot-timeout".into(),
            format!("{}s", options.boot_timeout.as_secs().max(1)),
            "--stop-vms-on-exit".into(),
        ];
        if options.simulated {
            agent_args.push("--simulated".into());
            agent_args.push("--capacity-multiplier".into());
            agent_args.push(OVERCOMMIT.to_string());
        }
        agent_args.extend_from_slice(agent_flags);
        let (agent, ready) = start_ignis(
            &agent_args,
            &[],
            &dir.join("agent.log"),
            agent_health,
            "agent",
            Duration::from_secs(60),
        )
        .await?;
        ready?;

        let controller_health = free_addr()?;
        let (controller, ready) = start_ignis(
            &controller_args(&socket, controller_health),
            &[("KUBECONFIG", kubeconfig.as_os_str())],
            &dir.join("controller.log"),
            controller_health,
            "controller",
            Duration::from_secs(60),
        )
        .await?;
        ready?;

        let tracker: Tracker = Arc::default();
        let stop_watch = CancellationToken::new();
        tokio::spawn(track(
            Api::namespaced(client.clone(), NAMESPACE),
            tracker.clone(),
            stop_watch.clone(),
        ));
        Ok(Stack {
            dir,
            guest,
            api,
            write_counter,
            client,
            agent,
            agent_args,
            agent_health,
            controller,
            controller_health,
            tracker,
            stop_api,
            stop_watch,
        })
    }

    /// SIGKILL the agent, as a crash would (its VMMs keep running), and start it again with
    /// the same flags; it re-adopts them. How long the new one took to answer `/readyz`.
    pub(crate) async fn restart_agent(&mut self) -> Result<Duration, BenchError> {
        let _ = self.agent.kill().await;
        let log = self
            .dir
            .join(format!("agent-{}.log", crate::time::now_unix_ms()));
        let (agent, ready) = start_ignis(
            &self.agent_args,
            &[],
            &log,
            self.agent_health,
            "restarted agent",
            Duration::from_secs(60),
        )
        .await?;
        self.agent = agent;
        ready
    }

    pub(crate) fn microvms(&self) -> Api<MicroVM> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }

    pub(crate) fn agent_pid(&self) -> u32 {
        self.agent.id().unwrap_or(0)
    }

    pub(crate) fn controller_pid(&self) -> u32 {
        self.controller.id().unwrap_or(0)
    }

    /// Create the sample MicroVM `name` (POST, as `kubectl create -f` / client-side
    /// `kubectl apply` of a new object does); the instant the request was sent.
    pub(crate) async fn create(&self, name: &str) -> Result<Instant, BenchError> {
        let vm = sample_microvm(name, &self.guest);
        let sent = Instant::now();
        self.microvms()
            .create(&PostParams::default(), &vm)
            .await
            .map_err(BenchError::Kube)?;
        Ok(sent)
    }

    /// Delete `name` (`kubectl delete mvm NAME --wait=false`).
    pub(crate) async fn delete(&self, name: &str) -> Result<(), BenchError> {
        match self.microvms().delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(BenchError::Kube(e)),
        }
    }

    pub(crate) fn progress(&self, name: &str) -> Progress {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .unwrap_or_default()
    }

    /// Wait until `done` holds for `name`'s progress; its progress then.
    pub(crate) async fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Progress) -> bool,
    ) -> Result<Progress, BenchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.progress(name);
            if done(&p) {
                return Ok(p);
            }
            if let Some(why) = &p.failed {
                return Err(BenchError::Failed(format!(
                    "MicroVM {name} failed while waiting for {what}: {why} (logs in {})",
                    self.dir.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("MicroVM {name} {what}"),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// How many tracked MicroVMs satisfy `f`.
    pub(crate) fn count(&self, f: impl Fn(&Progress) -> bool) -> usize {
        self.tracker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| f(p))
            .count()
    }

    /// Writes the dev server recorded, per object key.
    pub(crate) fn writes(&self) -> BTreeMap<String, ObjectWrites> {
        self.write_counter.snapshot()
    }

    /// Scrape one unlabelled sample from the controller's /metrics.
    pub(crate) async fn controller_metric(&self, name: &str) -> Option<f64> {
        let (_, body) = http_get(self.controller_health, "/metrics").await.ok()?;
        super::stats::prometheus_value(&body, name)
    }

    /// Stop the controller, then the agent (which stops its VMs), then the API server, and
    /// remove the scratch directory.
    /// `keep` leaves the directory (logs) behind, for a run that failed.
    pub(crate) async fn stop(mut self, keep: bool) {
        self.stop_watch.cancel();
        terminate(&mut self.controller, Duration::from_secs(10)).await;
        terminate(&mut self.agent, Duration::from_secs(30)).await;
        self.stop_api.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.api.stopped()).await;
        if keep {
            eprintln!("logs of the failed run kept in {}", self.dir.display());
        } else if let Err(error) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(%error, dir = %self.dir.display(), "cannot remove the scratch dir");
        }
    }
}

/// SIGTERM, then SIGKILL after `grace`.
pub(crate) async fn terminate(child: &mut Child, grace: Duration) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Watch every MicroVM and stamp state changes as they arrive.
async fn track(api: Api<MicroVM>, tracker: Tracker, stop: CancellationToken) {
    let config = watcher::Config::default();
    let mut stream = watcher::watcher(api, config).boxed();
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return,
            event = stream.next() => event,
        };
        let Some(event) = event else { return };
        let now = Instant::now();
        let (obj, deleted) = match event {
            Ok(watcher::Event::Apply(o)) | Ok(watcher::Event::InitApply(o)) => (o, false),
            Ok(watcher::Event::Delete(o)) => (o, true),
            Ok(_) => continue,
            Err(error) => {
                tracing::debug!(%error, "bench watch error; the watcher retries");
                continue;
            }
        };
        let Some(name) = obj.metadata.name.clone() else {
            continue;
        };
        let status = obj.status.clone().unwrap_or_default();
        let is_true = |t| find_condition(&status.conditions, t).is_some_and(|c| c.status == "True");
        let mut map = tracker.lock().unwrap_or_else(|p| p.into_inner());
        let p = map.entry(name).or_default();
        if deleted {
            p.gone.get_or_insert(now);
            continue;
        }
        if is_true(ConditionType::Scheduled) {
            p.scheduled.get_or_insert(now);
        }
        if is_true(ConditionType::Ready) {
            p.ready.get_or_insert(now);
        }
        if status.phase == Some(crate::api::Phase::Failed) {
            let why = find_condition(&status.conditions, ConditionType::Ready)
                .map(|c| format!("{}: {}", c.reason, c.message))
                .unwrap_or_else(|| "phase Failed".into());
            p.failed = Some(why);
        }
        if p.accelerator.is_none() {
            p.accelerator = status.accelerator.map(|a| a.to_string());
        }
        if p.hypervisor.is_none() {
            p.hypervisor = status.hypervisor.map(|h| h.to_string());
        }
    }
}
