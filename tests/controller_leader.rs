//! Leader election for real: two `ignis controller` processes against the dev API server and
//! one agent (simulated VMM, so no guest boots). Exactly one holds the Lease and reconciles;
//! when it is SIGKILLed the standby takes the Lease over within the lease duration and
//! reconciles what is created after the kill; a SIGTERMed leader exits cleanly and releases
//! the Lease.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::simulated::{self, SimulatedNode};
use ignis::api::{FINALIZER, InterfaceMode, MicroVM, NODE_LABEL};
use ignis::testing::MicroVmBuilder;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::PostParams;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const NODE: &str = "leader-node";
const LEASE: &str = "ignis-controller-test";
const LEASE_SECONDS: u64 = 3;
/// Slack on top of the lease duration for the standby's poll and a loaded 2-core machine.
const HANDOVER_MARGIN: Duration = Duration::from_secs(3);

/// One `ignis controller` process; SIGKILLed and reaped when dropped, so a failing test leaks
/// nothing. Its log is printed when the test panics.
struct ControllerProcess {
    identity: String,
    child: Child,
    health: u16,
    log: PathBuf,
}

impl ControllerProcess {
    fn spawn(identity: &str, kubeconfig: &Path, socket: &Path, dir: &Path) -> Self {
        let health = free_port();
        let log = dir.join(format!("{identity}.log"));
        let stderr = std::fs::File::create(&log).expect("controller log");
        let child = Command::new(env!("CARGO_BIN_EXE_ignis"))
            .args([
                "controller",
                "--leader-election",
                "true",
                "--lease-name",
                LEASE,
                "--lease-namespace",
                "default",
                "--lease-duration",
                &format!("{LEASE_SECONDS}s"),
                "--agent-endpoint",
                &format!("{NODE}=unix://{}", socket.display()),
                "--health-addr",
                &format!("127.0.0.1:{health}"),
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", identity)
            .env("IGNIS_LOG_LEVEL", "info,ignis=debug")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn ignis controller");
        ControllerProcess {
            identity: identity.to_string(),
            child,
            health,
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal the controller");
    }

    /// `ignis_controller_reconciles_total` from /metrics; 0 while the counter is not exported
    /// (a standby registers the controller's metrics only once it leads).
    async fn reconciles(&self) -> u64 {
        let metrics = http_get(self.health, "/metrics").await;
        assert!(
            metrics.starts_with("HTTP/1.1 200"),
            "{}: /metrics: {metrics}",
            self.identity
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("ignis_controller_reconciles_total "))
            .map_or(0, |v| v.trim().parse().expect("counter value"))
    }

    async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {within:?}",
                self.identity
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- log of {} -----\n{}", self.identity, self.log_text());
        }
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out));
    let _ = read.await;
    out
}

/// Poll `probe` every 50 ms until it yields a value; panics with `what` after `within`.
async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(value)) = tokio::time::timeout(Duration::from_secs(5), probe()).await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lease_spec(leases: &Api<Lease>) -> Option<Value> {
    let lease = leases.get_opt(LEASE).await.ok()??;
    serde_json::to_value(lease.spec?).ok()
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    lease_spec(leases).await?["holderIdentity"]
        .as_str()
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

fn microvm(name: &str, kernel: &Path) -> MicroVM {
    MicroVmBuilder::new(name)
        .namespace("default")
        .memory("128Mi")
        .kernel(kernel)
        .interface("eth0", InterfaceMode::None)
        .build()
}

/// Wait for [`reconciled`]; on timeout the panic shows the object and the agent's VMs.
async fn wait_reconciled(vms: &Api<MicroVM>, name: &str, within: Duration, socket: &Path) -> Value {
    let deadline = Instant::now() + within;
    loop {
        if let Some(vm) = reconciled(vms, name, socket).await {
            return vm;
        }
        if Instant::now() >= deadline {
            let now = vms.get_opt(name).await.ok().flatten();
            panic!(
                "{name} not reconciled within {within:?}: {}\nthe agent has: {:#?}",
                serde_json::to_string_pretty(&now).unwrap_or_default(),
                agent_vms(socket).await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The VMs the agent runs.
async fn agent_vms(socket: &Path) -> Vec<ignis::proto::Vm> {
    let mut agent = common::connect(socket, Duration::from_secs(5)).await;
    agent
        .list_v_ms(ignis::proto::ListVMsRequest::default())
        .await
        .expect("ListVMs")
        .into_inner()
        .vms
}

/// The MicroVM as JSON once the controller has reconciled it: finalizer, placement on our
/// node (condition, status, label), `phase: Running`, and the VM running and ready on the agent
/// (only the controller calls ApplyVM, so it proves a controller acted, not just wrote).
async fn reconciled(vms: &Api<MicroVM>, name: &str, socket: &Path) -> Option<Value> {
    let vm = serde_json::to_value(vms.get_opt(name).await.ok()??).ok()?;
    let finalized = vm["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| f.iter().any(|f| f == FINALIZER));
    let status = &vm["status"];
    let scheduled = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Scheduled" && c["status"] == "True");
    let placed = status["nodeName"] == NODE && vm["metadata"]["labels"][NODE_LABEL] == NODE;
    let running = status["phase"] == "Running";
    if !(finalized && scheduled && placed && running) {
        return None;
    }
    let uid = vm["metadata"]["uid"].as_str()?;
    let on_agent = agent_vms(socket)
        .await
        .into_iter()
        .any(|v| v.uid == uid && v.state == ignis::proto::VmState::Running as i32 && v.ready);
    on_agent.then_some(vm)
}

#[tokio::test]
async fn one_controller_leads_and_a_standby_takes_over_when_it_dies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shutdown = CancellationToken::new();

    let node = SimulatedNode::start(dir.path(), NODE, &shutdown, |_| {}).await;
    let (api, agent, stop_agent, socket, kernel) = (
        node.api,
        node.agent,
        node.stop_agent,
        node.socket,
        node.kernel,
    );
    let kubeconfig = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");

    let client = kube::Client::try_from(api.client_config()).expect("kube client");
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    let vms: Api<MicroVM> = Api::namespaced(client.clone(), "default");

    let started = Instant::now();
    let mut a = ControllerProcess::spawn("controller-a", &kubeconfig, &socket, dir.path());
    let mut b = ControllerProcess::spawn("controller-b", &kubeconfig, &socket, dir.path());

    // Exactly one holds the Lease.
    let first = wait_for(
        "a controller to hold the Lease",
        Duration::from_secs(20),
        || holder(&leases),
    )
    .await;
    println!(
        "{first} holds the Lease {} ms after both started",
        started.elapsed().as_millis()
    );
    let (leader, standby) = match first.as_str() {
        "controller-a" => (&mut a, &mut b),
        "controller-b" => (&mut b, &mut a),
        other => panic!("unexpected holder {other:?}"),
    };
    // Both serve /readyz: the standby is healthy while it waits.
    for process in [&*leader, &*standby] {
        let ready = wait_for("/readyz", Duration::from_secs(10), || async {
            http_get(process.health, "/readyz")
                .await
                .starts_with("HTTP/1.1 200")
                .then_some(())
        });
        ready.await;
    }

    // A MicroVM created now is reconciled, by the leader only.
    vms.create(&PostParams::default(), &microvm("vm-1", &kernel))
        .await
        .expect("create vm-1");
    let vm1 = wait_reconciled(&vms, "vm-1", Duration::from_secs(20), &socket).await;
    println!(
        "vm-1 reconciled by {}, phase {}",
        leader.identity, vm1["status"]["phase"]
    );
    // Let a few renewals pass: the Lease stays with its holder and the standby stays idle.
    tokio::time::sleep(Duration::from_secs(LEASE_SECONDS)).await;
    let spec = lease_spec(&leases).await.expect("the Lease");
    assert_eq!(spec["holderIdentity"], leader.identity.as_str(), "{spec}");
    assert_eq!(spec["leaseDurationSeconds"], LEASE_SECONDS, "{spec}");
    assert_eq!(spec["leaseTransitions"], 0, "{spec}");
    let leader_reconciles = leader.reconciles().await;
    assert!(leader_reconciles > 0, "the leader reconciled nothing");
    assert_eq!(standby.reconciles().await, 0, "the standby reconciled");
    assert!(leader.log_text().contains("became leader"));
    assert!(
        !standby.log_text().contains("became leader"),
        "{}",
        standby.log_text()
    );
    println!(
        "leader {} reconciled {leader_reconciles} times, standby {} 0 times",
        leader.identity, standby.identity
    );

    // SIGKILL the leader: it never releases the Lease, so the standby waits for it to expire.
    leader.signal(Signal::SIGKILL);
    let killed = Instant::now();
    let status = leader.wait_exit(Duration::from_secs(5)).await;
    assert!(!status.success(), "{status:?}");
    vms.create(&PostParams::default(), &microvm("vm-2", &kernel))
        .await
        .expect("create vm-2");
    let new_holder = wait_for(
        "the standby to take the Lease over",
        Duration::from_secs(LEASE_SECONDS) + HANDOVER_MARGIN,
        || async { holder(&leases).await.filter(|h| *h == standby.identity) },
    )
    .await;
    let handover = killed.elapsed();
    println!(
        "{new_holder} took the Lease over {} ms after the leader was SIGKILLed (lease {LEASE_SECONDS}s)",
        handover.as_millis()
    );
    let spec = lease_spec(&leases).await.expect("the Lease");
    assert_eq!(spec["leaseTransitions"], 1, "{spec}");

    // What was created after the kill is reconciled by the new leader.
    wait_reconciled(&vms, "vm-2", Duration::from_secs(20), &socket).await;
    println!(
        "vm-2 reconciled {} ms after the kill",
        killed.elapsed().as_millis()
    );
    assert!(standby.reconciles().await > 0);
    // vm-1 is still where it was: placement never changes.
    let vm1 = reconciled(&vms, "vm-1", &socket)
        .await
        .expect("vm-1 still running");
    assert_eq!(vm1["status"]["nodeName"], NODE);

    // SIGTERM: a clean exit, and the Lease is released so a successor need not wait.
    standby.signal(Signal::SIGTERM);
    let status = standby.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", standby.log_text());
    let spec = lease_spec(&leases).await.expect("the Lease");
    assert!(
        spec["holderIdentity"].as_str().is_none_or(str::is_empty),
        "the Lease was not released: {spec}"
    );
    println!("whole test {} ms", started.elapsed().as_millis());

    simulated::stop_agent(agent, &stop_agent).await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), api.stopped()).await;
}
