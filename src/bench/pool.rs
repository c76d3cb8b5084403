//! `ignis bench pool`: warm pools (`MicroVMPool`) beside a cold boot of the same template, in
//! one run, on the dev stack or (`--cluster`) on a real cluster with VM pods:
//!
//! 1. **cold**: `--cold` MicroVMs of the template, one at a time, apply → Ready;
//! 2. **fill**: a pool of `--pool-size` warm VMs, from its create to `readyReplicas` all;
//! 3. **cost**: what the idle warm VMs cost the node: their VMMs' RSS and PSS
//!    (`/proc/<pid>/smaps_rollup`) and CPU time over `--idle-window`. On the dev stack the
//!    VMM pids come from the agent itself (`GetVM`, the pid it supervises); on a cluster, whose
//!    agents answer only mTLS, from `/proc` (QEMU runs as `-name ...,process=ignis-<uid>`);
//! 4. **burst**: `--claims` MicroVMs naming the pool, all created at once; each timed from its
//!    create call to this process' watch seeing `Ready=True`, beside `status.claim.latencyMs`
//!    (the controller's own figure) and the sustained claims/s;
//! 5. **refill**: a second pool of `--refill`, drained by as many claims at once, timed from
//!    the drain (its last claim Ready) to `readyReplicas` back at full.
//!
//! Between the phases everything is deleted and gone, so a phase's VMs do not load the next.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::join_all;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use super::machine::Machine;
use super::pool_figures::{Claim, Refill, Run, WarmCost, parse_cpu_ticks, parse_smaps_rollup};
use super::stack::{NAMESPACE, Stack, StackOptions};
use super::{BenchError, Report};
use crate::agent::guest::{DEFAULT_CMDLINE, DemoGuest};
use crate::api::{ClaimStatus, MicroVM, MicroVMPool, MicroVmBuilder, POOL_LABEL};
use crate::dev::agent_link::AgentLink;

/// Flags of `ignis bench pool`.
#[derive(Debug, clap::Args)]
pub(crate) struct PoolArgs {
    /// Warm VMs in the pool the burst claims from.
    #[arg(long, default_value_t = DEFAULT_POOL_SIZE)]
    pub(crate) pool_size: u32,
    /// Claims created at once against it.
    #[arg(long, default_value_t = DEFAULT_POOL_SIZE as usize)]
    pub(crate) claims: usize,
    /// Cold boots of the same template (one at a time), the baseline.
    #[arg(long, default_value_t = 5)]
    pub(crate) cold: usize,
    /// The pool drained and timed while it refills (0: skip).
    #[arg(long, default_value_t = 20)]
    pub(crate) refill: u32,
    /// Guest memory of every VM of the run.
    #[arg(long, default_value = DEFAULT_MEMORY)]
    pub(crate) memory: String,
    /// How long the idle warm VMs' CPU time is sampled.
    #[arg(long, default_value = "10s", value_parser = crate::time::parse_duration)]
    pub(crate) idle_window: Duration,
    /// Deadline of one phase (a pool's fill, a burst, a cold boot).
    #[arg(long, default_value = "600s", value_parser = crate::time::parse_duration)]
    pub(crate) timeout: Duration,
    /// Run against a cluster (VM pods) instead of a dev stack of the bench's own.
    #[arg(long)]
    pub(crate) cluster: bool,
    /// With `--cluster`: its admin kubeconfig (`scripts/cluster.sh kubeconfig`).
    #[arg(long, env = "KUBECONFIG")]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// With `--cluster`: the demo guest's directory as the agents see it.
    #[arg(long, default_value = "/var/lib/ignis/guest")]
    pub(crate) guest_dir: PathBuf,
    /// The dev stack's agent on the `simulated` VMM (a `sleep` per VM, no guest): the claim
    /// path of the control plane alone, without TCG boots of the refill taking the CPUs.
    #[arg(long, conflicts_with = "cluster")]
    pub(crate) simulated: bool,
}

/// The default pool and burst. Issue 20 asks for 100 against 100, and the flags take it, but
/// not this machine (2 cores, 24 GiB, TCG): an idle warm demo guest of 128 MiB costs its node
/// some 215 MiB of VMM RSS (measured, 10 idle guests, 2026-12-06: QEMU, the guest's touched
/// pages and TCG's code cache), so 100 warm VMs alone are 21 GiB and 100 claimed plus 100
/// refilling on top do not fit. Idle CPU is no limit (0.4 % of a core per warm guest).
pub(crate) const DEFAULT_POOL_SIZE: u32 = 20;
/// The smallest memory the demo guest boots with in steps of 32 MiB: at 64 MiB its kernel
/// cannot unpack the initramfs, and 96 MiB leaves it little room.
pub(crate) const DEFAULT_MEMORY: &str = "128Mi";

impl Default for PoolArgs {
    fn default() -> Self {
        PoolArgs {
            pool_size: DEFAULT_POOL_SIZE,
            claims: DEFAULT_POOL_SIZE as usize,
            cold: 5,
            refill: 20,
            memory: DEFAULT_MEMORY.into(),
            idle_window: Duration::from_secs(10),
            timeout: Duration::from_secs(600),
            cluster: false,
            kubeconfig: None,
            guest_dir: "/var/lib/ignis/guest".into(),
            simulated: false,
        }
    }
}

/// The cluster's namespace for the bench (the dev stack uses its own `default`).
const CLUSTER_NAMESPACE: &str = "ignis-bench";
/// The dev stack's agent offers this many vCPUs per host CPU (its most): a pool, its claims and
/// its refill are three times the pool's one-vCPU VMs on one host, idle guests (measured).
const VCPU_OVERCOMMIT: u32 = 64;
/// How often a waiting phase looks again.
const POLL: Duration = Duration::from_millis(2);

/// What this process' watch saw, by MicroVM name.
#[derive(Default)]
struct Seen {
    ready: HashMap<String, Instant>,
    claim: HashMap<String, ClaimStatus>,
    failed: HashMap<String, String>,
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap_or_else(|p| p.into_inner())
}

/// Watch the namespace's MicroVMs, stamping when each is first seen Ready.
fn watch(api: Api<MicroVM>, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(event) = events.next().await {
            let now = Instant::now();
            let vm = match event {
                Ok(watcher::Event::Apply(vm) | watcher::Event::InitApply(vm)) => vm,
                Ok(_) => continue,
                Err(error) => {
                    tracing::debug!(%error, "pool bench watch; the watcher retries");
                    continue;
                }
            };
            let Some(status) = vm.status.as_ref() else {
                continue;
            };
            let name = vm.name_any();
            let mut seen = lock(&seen);
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                seen.ready.entry(name.clone()).or_insert(now);
            }
            if status.phase == Some(crate::api::Phase::Failed) {
                seen.failed
                    .insert(name.clone(), format!("{:?}", status.conditions));
            }
            if let Some(claim) = &status.claim {
                seen.claim.insert(name, claim.clone());
            }
        }
    })
}

/// Where the VMM pids come from.
enum Pids {
    /// The dev stack's agent: the pid it supervises for a VM uid.
    Agent(AgentLink),
    /// `/proc`: the QEMU whose command line names the uid.
    Proc,
}

impl Pids {
    async fn of(&self, uid: &str) -> Option<u32> {
        match self {
            Pids::Agent(agent) => match agent.vm(uid).await {
                Ok(Some(vm)) if vm.pid > 0 => Some(vm.pid),
                _ => None,
            },
            Pids::Proc => qemu_of(uid),
        }
    }
}

/// The QEMU process of VM `uid` (named `process=ignis-<uid>` on its command line).
fn qemu_of(uid: &str) -> Option<u32> {
    let needle = format!("process=ignis-{uid}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let named = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle));
            named
                && std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe.to_string_lossy().contains("qemu"))
        })
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    parse_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn clock_ticks_per_s() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// The system under test, and what the bench knows of it.
struct Bench {
    client: Client,
    namespace: String,
    guest: DemoGuest,
    memory: String,
    seen: Arc<Mutex<Seen>>,
    pids: Pids,
    timeout: Duration,
}

fn kube(what: String) -> impl FnOnce(kube::Error) -> BenchError {
    move |e| BenchError::Failed(format!("{what}: {e}"))
}

impl Bench {
    fn microvms(&self) -> Api<MicroVM> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn pools(&self) -> Api<MicroVMPool> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The template every VM of the run shares: the demo guest, small, killed at once when
    /// deleted (no grace period idling under the next measurement).
    fn template(&self, name: &str) -> MicroVmBuilder {
        MicroVmBuilder::sample(name)
            .namespace(&self.namespace)
            .guest(&self.guest.kernel, &self.guest.initrd)
            .cmdline(DEFAULT_CMDLINE)
            .memory(&self.memory)
            .grace_period_seconds(0)
    }

    /// Wait until the watch saw every one of `names` Ready; the instants it did.
    async fn wait_ready(&self, names: &[String], what: &str) -> Result<Vec<Instant>, BenchError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            {
                let seen = lock(&self.seen);
                if let Some((name, why)) = names
                    .iter()
                    .find_map(|n| seen.failed.get(n).map(|w| (n, w)))
                {
                    return Err(BenchError::Failed(format!("MicroVM {name} failed: {why}")));
                }
                let at: Vec<Instant> = names
                    .iter()
                    .filter_map(|n| seen.ready.get(n).copied())
                    .collect();
                if at.len() == names.len() {
                    return Ok(at);
                }
                if Instant::now() > deadline {
                    return Err(BenchError::Timeout {
                        what: format!("{what}: {} of {} Ready", at.len(), names.len()),
                        after: self.timeout,
                    });
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Create `pool` with `replicas` warm VMs and wait until all are Ready; how long it took.
    async fn fill(&self, pool: &str, replicas: u32) -> Result<Duration, BenchError> {
        let object = self
            .template("warm")
            .label("app", "bench-warm")
            .pool_of(pool, replicas);
        let sent = Instant::now();
        self.pools()
            .create(&PostParams::default(), &object)
            .await
            .map_err(kube(format!("create pool {pool}")))?;
        self.wait_pool_ready(pool, replicas).await?;
        Ok(sent.elapsed())
    }

    /// Poll `pool` until `replicas` of its warm VMs are Ready.
    async fn wait_pool_ready(&self, pool: &str, replicas: u32) -> Result<Instant, BenchError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let p = self
                .pools()
                .get(pool)
                .await
                .map_err(kube(format!("get pool {pool}")))?;
            let ready = p.status.as_ref().map_or(0, |s| s.ready_replicas);
            if ready >= replicas {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("pool {pool}: {ready} of {replicas} warm VMs Ready"),
                    after: self.timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `count` cold boots of the template, one at a time; apply → Ready of each.
    async fn cold(&self, count: usize) -> Result<Vec<f64>, BenchError> {
        let mut out = Vec::new();
        for i in 0..count {
            let name = format!("cold-{i}");
            let vm = self.template(&name).build();
            let sent = Instant::now();
            self.microvms()
                .create(&PostParams::default(), &vm)
                .await
                .map_err(kube(format!("create {name}")))?;
            let ready = self
                .wait_ready(std::slice::from_ref(&name), "cold boot")
                .await?;
            let ms = (ready[0] - sent).as_secs_f64() * 1000.0;
            println!("  cold {}/{count}: {ms:.0} ms", i + 1);
            out.push(ms);
            self.delete_all().await?;
        }
        Ok(out)
    }

    /// `names` created at once, each claiming from `pool`; each claim's figures.
    async fn burst(&self, pool: &str, names: &[String]) -> Result<Vec<Claim>, BenchError> {
        let api = self.microvms();
        let objects: Vec<MicroVM> = names
            .iter()
            .map(|n| {
                self.template(n)
                    .label("app", "bench-claim")
                    .pool(pool)
                    .build()
            })
            .collect();
        let first = Instant::now();
        let sent = join_all(objects.iter().map(|vm| {
            let api = api.clone();
            async move {
                let at = Instant::now();
                api.create(&PostParams::default(), vm)
                    .await
                    .map(|_| (at, at.elapsed()))
                    .map_err(kube(format!("create claim {}", vm.name_any())))
            }
        }))
        .await
        .into_iter()
        .collect::<Result<Vec<(Instant, Duration)>, BenchError>>()?;
        let ready = self.wait_ready(names, "the claims").await?;
        let mut claims = Vec::new();
        for ((name, (sent, create)), ready) in names.iter().zip(sent).zip(ready) {
            let known = lock(&self.seen).claim.get(name).cloned();
            let status = match known {
                Some(s) => Some(s),
                None => api
                    .get(name)
                    .await
                    .map_err(kube(format!("get {name}")))?
                    .status
                    .and_then(|s| s.claim),
            };
            claims.push(Claim {
                name: name.clone(),
                outcome: status
                    .as_ref()
                    .map(|s| s.outcome.as_str().to_string())
                    .unwrap_or_default(),
                ready_ms: (ready - sent).as_secs_f64() * 1000.0,
                create_ms: create.as_secs_f64() * 1000.0,
                ready_since_burst_ms: (ready - first).as_secs_f64() * 1000.0,
                server_ms: status.and_then(|s| s.latency_ms).map(|ms| ms as f64),
            });
        }
        Ok(claims)
    }

    /// The idle warm VMs of `pool`: their VMMs' memory now, and their CPU over `window`.
    async fn warm_cost(&self, pool: &str, window: Duration) -> Result<WarmCost, BenchError> {
        let warm = self
            .microvms()
            .list(&ListParams::default().labels(&format!("{POOL_LABEL}={pool}")))
            .await
            .map_err(kube(format!("list the warm VMs of {pool}")))?;
        let mut pids = Vec::new();
        for vm in &warm.items {
            if let Some(pid) = self.pids.of(&vm.uid().unwrap_or_default()).await {
                pids.push(pid);
            }
        }
        let mut cost = WarmCost {
            vms: pids.len(),
            ..WarmCost::default()
        };
        for pid in &pids {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
                .ok()
                .and_then(|t| parse_smaps_rollup(&t));
            if let Some((rss, pss)) = rollup {
                cost.rss_bytes += rss;
                cost.pss_bytes += pss;
            }
        }
        let before: u64 = pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let after: u64 = pids.iter().filter_map(|p| cpu_ticks(*p)).sum();
        cost.window_s = started.elapsed().as_secs_f64();
        cost.cpu_s = after.saturating_sub(before) as f64 / clock_ticks_per_s();
        Ok(cost)
    }

    /// Delete every pool, then every MicroVM of the namespace, and wait until they are gone.
    async fn delete_all(&self) -> Result<(), BenchError> {
        let everything = ListParams::default();
        let gone_by = Instant::now() + Duration::from_secs(300);
        loop {
            let pools = self
                .pools()
                .list(&everything)
                .await
                .map_err(kube("list pools".into()))?;
            let vms = self
                .microvms()
                .list(&everything)
                .await
                .map_err(kube("list MicroVMs".into()))?;
            if pools.items.is_empty() && vms.items.is_empty() {
                return Ok(());
            }
            if Instant::now() > gone_by {
                return Err(BenchError::Timeout {
                    what: format!(
                        "{} pools and {} MicroVMs deleted",
                        pools.items.len(),
                        vms.items.len()
                    ),
                    after: Duration::from_secs(300),
                });
            }
            // Pools first, so none makes a new warm VM for one deleted here.
            for p in &pools.items {
                if p.metadata.deletion_timestamp.is_none() {
                    ignore_gone(
                        self.pools()
                            .delete(&p.name_any(), &DeleteParams::default())
                            .await,
                    )?;
                }
            }
            for vm in &vms.items {
                if vm.metadata.deletion_timestamp.is_none() {
                    ignore_gone(
                        self.microvms()
                            .delete(&vm.name_any(), &DeleteParams::default())
                            .await,
                    )?;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A pool of `replicas` drained by as many claims at once, timed while it refills.
    async fn refill(&self, replicas: u32) -> Result<Refill, BenchError> {
        self.fill("refill", replicas).await?;
        let names: Vec<String> = (0..replicas).map(|i| format!("drain-{i}")).collect();
        let claims = self.burst("refill", &names).await?;
        let drained = {
            let seen = lock(&self.seen);
            names
                .iter()
                .filter_map(|n| seen.ready.get(n).copied())
                .max()
                .unwrap_or_else(Instant::now)
        };
        // The claimed VMs go while the pool refills, so the node holds one pool's VMs, not two.
        for name in &names {
            ignore_gone(self.microvms().delete(name, &DeleteParams::default()).await)?;
        }
        let full = self.wait_pool_ready("refill", replicas).await?;
        Ok(Refill {
            replicas,
            refill_ms: (full - drained).as_secs_f64() * 1000.0,
            drained_by_hits: claims.iter().filter(|c| c.hit()).count(),
        })
    }
}

fn ignore_gone<T>(result: Result<T, kube::Error>) -> Result<(), BenchError> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(BenchError::Failed(format!("delete: {e}"))),
    }
}

/// Every phase, in order, on `bench`.
async fn phases(bench: &Bench, args: &PoolArgs) -> Result<Run, BenchError> {
    let mut run = Run {
        pool_size: args.pool_size,
        guest_memory_mib: crate::api::parse_quantity_bytes(&args.memory)
            .map_err(|e| BenchError::Failed(format!("--memory {}: {e}", args.memory)))?
            >> 20,
        ..Run::default()
    };
    bench.delete_all().await?;
    println!("  {} cold boots, one at a time", args.cold);
    run.cold_ms = bench.cold(args.cold).await?;

    println!("  a pool of {} warm VMs", args.pool_size);
    run.fill_ms = bench.fill("bench", args.pool_size).await?.as_secs_f64() * 1000.0;
    println!(
        "  filled in {:.0} ms; idle cost over {:?}",
        run.fill_ms, args.idle_window
    );
    run.warm = bench.warm_cost("bench", args.idle_window).await?;

    println!("  {} claims at once", args.claims);
    let names: Vec<String> = (0..args.claims).map(|i| format!("claim-{i}")).collect();
    run.claims = bench.burst("bench", &names).await?;
    bench.delete_all().await?;
    if args.claims > 0 && !run.claims.iter().any(Claim::hit) {
        let outcomes: Vec<&str> = run.claims.iter().map(|c| c.outcome.as_str()).collect();
        return Err(BenchError::Failed(format!(
            "no claim took a warm VM (outcomes {outcomes:?}): nothing to measure"
        )));
    }

    if args.refill > 0 {
        println!("  a pool of {} drained and refilled", args.refill);
        run.refill = Some(bench.refill(args.refill).await?);
        bench.delete_all().await?;
    }
    Ok(run)
}

fn report(run: &Run, machine: &Machine, cluster: bool) -> Report {
    let mut report = Report::new(
        if cluster { "pool-cluster" } else { "pool" },
        machine.clone(),
    );
    report.rows = super::pool_figures::rows(run, !cluster);
    report.notes.push(if run.simulated {
        format!(
            "on {}: the agent on the `simulated` VMM (a `sleep` process per VM, Ready at once, \
             no guest): the control plane's claim path alone; the warm cost is a sleep's, not a \
             guest's; every instant is when this process' watch saw the change",
            run.target
        )
    } else {
        format!(
            "on {}: the demo guest (1 vCPU, {} MiB, readiness by console marker) on QEMU under \
             the node's accelerator; every instant is when this process' watch saw the change",
            run.target, run.guest_memory_mib
        )
    });
    report.notes.push(format!(
        "goals (issue 20, on ignis dev): claim → Ready p50 ≤ {} ms, p99 ≤ {} ms, ≥ {} claims/s",
        super::pool_figures::CLAIM_P50_GOAL_MS,
        super::pool_figures::CLAIM_P99_GOAL_MS,
        super::pool_figures::CLAIMS_PER_S_GOAL
    ));
    report.data = serde_json::to_value(run).unwrap_or_default();
    report
}

pub(crate) async fn run(args: &PoolArgs, machine: &Machine, dir: &Path) -> Result<(), BenchError> {
    if args.cluster {
        return run_on_cluster(args, machine, dir).await;
    }
    println!(
        "pool: {} cold boots, a pool of {} and {} claims at once, a refill of {}, on ignis dev{}",
        args.cold,
        args.pool_size,
        args.claims,
        args.refill,
        if args.simulated {
            " (simulated VMM)"
        } else {
            ""
        }
    );
    let stack = Stack::start_with(
        &StackOptions {
            simulated: args.simulated,
            boot_timeout: args.timeout,
        },
        &["--vcpu-overcommit".into(), VCPU_OVERCOMMIT.to_string()],
    )
    .await?;
    let outcome = async {
        let agent = AgentLink::connect(&stack.dir.join("agent.sock"))
            .await
            .map_err(|e| BenchError::Failed(format!("the agent's socket: {e}")))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let bench = Bench {
            client: stack.client.clone(),
            namespace: NAMESPACE.into(),
            guest: stack.guest.clone(),
            memory: args.memory.clone(),
            seen: seen.clone(),
            pids: Pids::Agent(agent),
            timeout: args.timeout,
        };
        let watching = watch(bench.microvms(), seen);
        let run = phases(&bench, args).await;
        watching.abort();
        run
    }
    .await;
    stack.stop(outcome.is_err()).await;
    let mut run = outcome?;
    run.target = "ignis dev".into();
    run.simulated = args.simulated;
    report(&run, machine, false).publish(dir)?;
    Ok(())
}

async fn run_on_cluster(args: &PoolArgs, machine: &Machine, dir: &Path) -> Result<(), BenchError> {
    let kubeconfig = args
        .kubeconfig
        .as_ref()
        .ok_or_else(|| BenchError::Failed("--cluster needs --kubeconfig (or KUBECONFIG)".into()))?;
    println!(
        "pool: {} cold boots, a pool of {} and {} claims at once, a refill of {}, on the cluster",
        args.cold, args.pool_size, args.claims, args.refill
    );
    let client = super::cluster::client(kubeconfig).await?;
    super::cluster::ensure_namespace(&client, CLUSTER_NAMESPACE).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let bench = Bench {
        client,
        namespace: CLUSTER_NAMESPACE.into(),
        guest: DemoGuest {
            kernel: args.guest_dir.join("vmlinuz"),
            initrd: args.guest_dir.join("initrd.cpio"),
            kernel_version: String::new(),
        },
        memory: args.memory.clone(),
        seen: seen.clone(),
        pids: Pids::Proc,
        timeout: args.timeout,
    };
    let watching = watch(bench.microvms(), seen);
    let outcome = phases(&bench, args).await;
    watching.abort();
    if outcome.is_err() {
        // Leave nothing running on the cluster after a failed run.
        let _ = bench.delete_all().await;
    }
    let mut run = outcome?;
    run.target = "the cluster (VM pods)".into();
    report(&run, machine, true).publish(dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_flags() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            pool: PoolArgs,
        }
        let parsed = Cli::parse_from(["x"]).pool;
        let default = PoolArgs::default();
        assert_eq!(parsed.pool_size, default.pool_size);
        assert_eq!(parsed.claims, default.claims);
        assert_eq!(parsed.cold, default.cold);
        assert_eq!(parsed.refill, default.refill);
        assert_eq!(parsed.memory, default.memory);
        assert_eq!(parsed.idle_window, default.idle_window);
        assert_eq!(parsed.timeout, default.timeout);
    }
}
