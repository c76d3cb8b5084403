//! `ignis bench cluster`: apply → Ready on a real cluster with VM pods (`scripts/cluster.sh up
//! && install-ignis`), split into the steps a user waits through, beside the bare VMM boot of
//! the same guest on this host, alternating so load affects both alike:
//!
//! - **pod scheduled**: the VM pod's `PodScheduled` condition turns True (kube-scheduler);
//! - **sandbox ready**: its `PodReadyToStartContainers` turns True (the kubelet made the pod's
//!   sandbox and network; the agent may now start the VMM in it);
//! - **VMM started**: the MicroVM's phase is `Starting` or later (the agent spawned the VMM);
//! - **guest Ready**: the MicroVM's `Ready` condition turns True (the console marker seen).
//!
//! Every instant is when a watch of this process saw the change (millisecond clock, one watch
//! per kind), so each figure includes one watch delivery; the API's own timestamps have a
//! resolution of a second.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde::Serialize;

use super::boot::bare_boot;
use super::machine::Machine;
use super::stack::scratch_dir;
use super::stats::{Target, summarize};
use super::{BenchError, Report, Row};
use crate::agent::guest::{DEFAULT_CMDLINE, DemoGuest};
use crate::api::{MicroVM, MicroVmBuilder, Phase};

const NAMESPACE: &str = "ignis-bench";

/// Flags of `ignis bench cluster`.
#[derive(Debug, clap::Args)]
pub(crate) struct ClusterArgs {
    /// The cluster's admin kubeconfig (`scripts/cluster.sh kubeconfig`).
    #[arg(long, env = "KUBECONFIG")]
    pub(crate) kubeconfig: PathBuf,
    /// The guest every node has (`vmlinuz` and `initrd.cpio`, in the agents' allowed dir), as
    /// the agents see it.
    #[arg(long, default_value = "/var/lib/ignis/guest")]
    pub(crate) guest_dir: PathBuf,
    /// The same guest's directory on this host, for the bare boots (default: `--guest-dir`;
    /// on `scripts/cluster.sh`'s cluster, `<cluster dir>/ignis/guest`).
    #[arg(long)]
    pub(crate) bare_guest_dir: Option<PathBuf>,
    /// MicroVMs, one after another, and as many bare boots.
    #[arg(long, default_value_t = 20)]
    pub(crate) count: usize,
    /// Deadline of one boot, Ignis or bare.
    #[arg(long, default_value = "180s", value_parser = crate::time::parse_duration)]
    pub(crate) timeout: Duration,
    /// Also suspend each Ready MicroVM and resume it (`spec.suspend`), timing both.
    #[arg(long)]
    pub(crate) suspend: bool,
}

/// When this process saw each step of one VM, from its create.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Steps {
    pub(crate) scheduled_ms: Option<f64>,
    pub(crate) sandbox_ms: Option<f64>,
    pub(crate) vmm_ms: Option<f64>,
    pub(crate) ready_ms: Option<f64>,
    /// With `--suspend`: the suspend and the resume of the Ready VM, in its pod.
    pub(crate) suspend: Option<super::suspend::Cycle>,
}

/// What the watches saw, by MicroVM name (a VM pod is `vm-<name>`).
#[derive(Default)]
struct Seen {
    created: HashMap<String, Instant>,
    steps: HashMap<String, Steps>,
}

impl Seen {
    fn mark(&mut self, name: &str, step: impl FnOnce(&mut Steps) -> &mut Option<f64>) {
        let Some(created) = self.created.get(name) else {
            return;
        };
        let ms = created.elapsed().as_secs_f64() * 1000.0;
        let slot = step(self.steps.entry(name.to_string()).or_default());
        slot.get_or_insert(ms);
    }
}

fn condition_true(pod: &Pod, kind: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == kind && c.status == "True"))
}

fn observe_pod(seen: &Mutex<Seen>, pod: &Pod) {
    let Some(vm) = pod.name_any().strip_prefix("vm-").map(str::to_string) else {
        return;
    };
    let Ok(mut seen) = seen.lock() else { return };
    if condition_true(pod, "PodScheduled") {
        seen.mark(&vm, |s| &mut s.scheduled_ms);
    }
    if condition_true(pod, "PodReadyToStartContainers") {
        seen.mark(&vm, |s| &mut s.sandbox_ms);
    }
}

fn observe_vm(seen: &Mutex<Seen>, vm: &MicroVM) {
    let Some(status) = vm.status.as_ref() else {
        return;
    };
    let Ok(mut seen) = seen.lock() else { return };
    let name = vm.name_any();
    if matches!(
        status.phase,
        Some(Phase::Starting | Phase::Running | Phase::Succeeded | Phase::Failed)
    ) {
        seen.mark(&name, |s| &mut s.vmm_ms);
    }
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if ready {
        seen.mark(&name, |s| &mut s.ready_ms);
    }
}

/// Watch pods and MicroVMs of the bench namespace into `seen` until the task is aborted.
fn watch(client: &Client, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let vms: Api<MicroVM> = Api::namespaced(client.clone(), NAMESPACE);
    tokio::spawn(async move {
        let pod_events = watcher(pods, watcher::Config::default()).map(|e| e.map(Sighting::pod));
        let vm_events = watcher(vms, watcher::Config::default()).map(|e| e.map(Sighting::vm));
        let mut events = std::pin::pin!(futures::stream::select(pod_events, vm_events));
        while let Some(event) = events.next().await {
            match event {
                Ok(Some(Sighting::Pod(p))) => observe_pod(&seen, &p),
                Ok(Some(Sighting::Vm(v))) => observe_vm(&seen, &v),
                Ok(None) => {}
                Err(error) => {
                    tracing::debug!(%error, "bench watch");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    })
}

/// One object a watch brought (deletions and list markers are of no interest here).
enum Sighting {
    Pod(Box<Pod>),
    Vm(Box<MicroVM>),
}

impl Sighting {
    fn pod(event: watcher::Event<Pod>) -> Option<Sighting> {
        match event {
            watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                Some(Sighting::Pod(Box::new(p)))
            }
            _ => None,
        }
    }

    fn vm(event: watcher::Event<MicroVM>) -> Option<Sighting> {
        match event {
            watcher::Event::Apply(v) | watcher::Event::InitApply(v) => {
                Some(Sighting::Vm(Box::new(v)))
            }
            _ => None,
        }
    }
}

pub(crate) async fn client(kubeconfig: &Path) -> Result<Client, BenchError> {
    let failed =
        |e: String| BenchError::Failed(format!("kubeconfig {}: {e}", kubeconfig.display()));
    let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| failed(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| failed(e.to_string()))?;
    Client::try_from(config).map_err(|e| failed(e.to_string()))
}

fn microvm(name: &str, guest: &DemoGuest) -> MicroVM {
    MicroVmBuilder::sample(name)
        .namespace(NAMESPACE)
        .guest(&guest.kernel, &guest.initrd)
        .cmdline(DEFAULT_CMDLINE)
        .grace_period_seconds(0)
        .build()
}

/// Create one MicroVM, wait until the watches saw it Ready, delete it and wait until its pod
/// is gone, so it does not load the next boot.
async fn one_boot(
    client: &Client,
    seen: &Mutex<Seen>,
    guest: &DemoGuest,
    name: &str,
    timeout: Duration,
    suspend: bool,
) -> Result<Steps, BenchError> {
    let vms: Api<MicroVM> = Api::namespaced(client.clone(), NAMESPACE);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let kube_err = |what: &str, e: kube::Error| BenchError::Failed(format!("{what} {name}: {e}"));
    if let Ok(mut s) = seen.lock() {
        s.created.insert(name.to_string(), Instant::now());
    }
    vms.create(&PostParams::default(), &microvm(name, guest))
        .await
        .map_err(|e| kube_err("create", e))?;
    let started = Instant::now();
    let steps = loop {
        let steps = seen
            .lock()
            .ok()
            .and_then(|s| s.steps.get(name).cloned())
            .unwrap_or_default();
        if steps.ready_ms.is_some() {
            break steps;
        }
        if started.elapsed() > timeout {
            return Err(BenchError::Timeout {
                what: format!("MicroVM {name} Ready on the cluster (saw {steps:?})"),
                after: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let mut steps = steps;
    if suspend {
        steps.suspend = Some(super::suspend::cycle(&vms, name, timeout, || 0).await?);
    }
    vms.delete(name, &DeleteParams::default())
        .await
        .map_err(|e| kube_err("delete", e))?;
    let gone_by = Instant::now() + Duration::from_secs(120);
    while Instant::now() < gone_by {
        let vm = vms.get_opt(name).await.map_err(|e| kube_err("get", e))?;
        let pod = pods
            .get_opt(&format!("vm-{name}"))
            .await
            .map_err(|e| kube_err("get pod of", e))?;
        if vm.is_none() && pod.is_none() {
            return Ok(steps);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(BenchError::Timeout {
        what: format!("MicroVM {name} and its pod gone"),
        after: Duration::from_secs(120),
    })
}

pub(crate) async fn ensure_namespace(client: &Client, name: &str) -> Result<(), BenchError> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": { "name": name }
    }))
    .map_err(|e| BenchError::Failed(format!("namespace object: {e}")))?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(BenchError::Failed(format!("create namespace {name}: {e}"))),
    }
}

/// The results of one run.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ClusterResult {
    pub(crate) ignis: Vec<Steps>,
    pub(crate) bare_ms: Vec<f64>,
}

pub(crate) async fn run(
    args: &ClusterArgs,
    machine: &Machine,
    dir: &Path,
) -> Result<(), BenchError> {
    let in_dir = |dir: &Path| DemoGuest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.cpio"),
        kernel_version: String::new(),
    };
    let guest = in_dir(&args.guest_dir);
    let bare_guest = in_dir(args.bare_guest_dir.as_ref().unwrap_or(&args.guest_dir));
    for file in [&bare_guest.kernel, &bare_guest.initrd] {
        if !file.is_file() {
            return Err(BenchError::Failed(format!(
                "{} is missing (--bare-guest-dir): run scripts/cluster.sh install-ignis first",
                file.display()
            )));
        }
    }
    let client = client(&args.kubeconfig).await?;
    ensure_namespace(&client, NAMESPACE).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watching = watch(&client, seen.clone());
    let bare_root = scratch_dir("cluster-bare")?;
    let mut result = ClusterResult::default();
    let outcome = async {
        for i in 0..args.count {
            let name = format!("boot-{i}");
            let bare_id = format!("bare-{i}");
            // Alternate who goes first so a slow drift of the machine's load hits both.
            if i % 2 == 1 {
                result
                    .bare_ms
                    .push(bare_boot(&bare_guest, &bare_root, &bare_id, args.timeout).await?);
            }
            result
                .ignis
                .push(one_boot(&client, &seen, &guest, &name, args.timeout, args.suspend).await?);
            if i % 2 == 0 {
                result
                    .bare_ms
                    .push(bare_boot(&bare_guest, &bare_root, &bare_id, args.timeout).await?);
            }
            let last = result.ignis.last().cloned().unwrap_or_default();
            println!(
                "  {}/{}: ready {:.0} ms (scheduled {:.0}, sandbox {:.0}, vmm {:.0}), bare {:.0} ms",
                i + 1,
                args.count,
                last.ready_ms.unwrap_or(f64::NAN),
                last.scheduled_ms.unwrap_or(f64::NAN),
                last.sandbox_ms.unwrap_or(f64::NAN),
                last.vmm_ms.unwrap_or(f64::NAN),
                result.bare_ms.last().copied().unwrap_or(f64::NAN),
            );
        }
        Ok::<(), BenchError>(())
    }
    .await;
    watching.abort();
    let _ = std::fs::remove_dir_all(&bare_root);
    outcome?;
    let report = report(&result, machine, args.count);
    report.publish(dir)?;
    Ok(())
}

fn report(result: &ClusterResult, machine: &Machine, count: usize) -> Report {
    let mut report = Report::new("cluster", machine.clone());
    type Step = fn(&Steps) -> Option<f64>;
    let steps: [(&str, Step); 4] = [
        ("apply → pod scheduled", |s| s.scheduled_ms),
        ("apply → pod sandbox ready", |s| s.sandbox_ms),
        ("apply → VMM started", |s| s.vmm_ms),
        ("apply → guest Ready", |s| s.ready_ms),
    ];
    for (metric, get) in steps {
        let samples: Vec<f64> = result.ignis.iter().filter_map(get).collect();
        let s = summarize(&samples);
        for (q, v) in [("p50", s.p50), ("p99", s.p99)] {
            report.rows.push(
                Row::new(format!("{metric} {q}"), v, "ms", Target::None)
                    .note(format!("{} of {count} VMs, one at a time", s.n)),
            );
        }
    }
    type Timed = fn(&super::suspend::Cycle) -> f64;
    let cycles: [(&str, Timed); 2] = [
        ("suspend: spec → Suspended", |c| c.suspend_ms),
        ("resume: spec → Ready", |c| c.resume_ms),
    ];
    for (metric, get) in cycles {
        let samples: Vec<f64> = result
            .ignis
            .iter()
            .filter_map(|s| s.suspend.as_ref().map(get))
            .collect();
        if samples.is_empty() {
            continue;
        }
        let s = summarize(&samples);
        for (q, v) in [("p50", s.p50), ("p99", s.p99)] {
            report.rows.push(
                Row::new(format!("{metric} {q}"), v, "ms", Target::None)
                    .note(format!("{} of {count} VMs, in their pods", s.n)),
            );
        }
    }
    let bare = summarize(&result.bare_ms);
    for (q, v) in [("p50", bare.p50), ("p99", bare.p99)] {
        report.rows.push(
            Row::new(format!("bare VMM boot {q}"), v, "ms", Target::None)
                .note("the same guest on this host's QEMU, spawn → console marker"),
        );
    }
    report.data = serde_json::to_value(result).unwrap_or_default();
    report
}
