//! `ignis bench soak`: a mixed failure workload on the `ignis dev` stack with real QEMU, bounded
//! by time and by a count of cycles, with the agent's resources sampled before, during and
//! after. Each cycle runs, side by side: a guest booted to Ready, then one whose VMM is
//! SIGKILLed once Ready (the run policy restarts it), then one whose spec changes (a new run),
//! each deleted after; a guest that panics at boot (no init) crash-looping under the
//! controller's back-off, deleted during it; a guest whose console marker never appears,
//! deleted during its second boot after a boot timeout; and every `--restart-every` cycles the
//! agent is SIGKILLed mid-cycle and started again (its VMMs re-adopted). Once the workload is
//! removed, every figure must be back at its baseline (`soak_sample::checks`); the bench fails
//! otherwise.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use tokio_util::sync::CancellationToken;

use super::machine::Machine;
use super::soak_sample::{self, Check, Sample};
use super::stack::{NAMESPACE, Stack, StackOptions, http_get, sample_microvm};
use super::stats::Target;
use super::{BenchError, Report, Row};
use crate::agent::guest::DemoGuest;
use crate::api::{ConditionType, MicroVM, MicroVmBuilder, find_condition};

/// The stack agent's boot deadline: the never-ready guest misses it once per run, and a
/// guest that boots (2–3 s under TCG, 10 s on a loaded 2-core machine) makes it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(20);
/// The longest one step of the workload may take (a boot under load, a back-off, a delete).
const STEP: Duration = Duration::from_secs(180);
/// How long the figures get to come back to the baseline once the workload is gone: the
/// agent reaps and releases in the background, and tokio's idle blocking threads exit after
/// 10 s.
const SETTLE: Duration = Duration::from_secs(45);
const POLL: Duration = Duration::from_millis(200);

/// Flags of `ignis bench soak`.
#[derive(Debug, clap::Args)]
pub(crate) struct SoakArgs {
    /// How long the workload runs after the warm-up: no cycle starts after it.
    #[arg(long, default_value = "90s", value_parser = crate::time::parse_duration)]
    pub(crate) duration: Duration,
    /// At most this many workload cycles.
    #[arg(long, default_value_t = 1000)]
    pub(crate) cycles: usize,
    /// SIGKILL and restart the agent in the middle of every Nth cycle (0: never).
    #[arg(long, default_value_t = 2)]
    pub(crate) restart_every: usize,
    /// Time between samples.
    #[arg(long, default_value = "1s", value_parser = crate::time::parse_duration)]
    pub(crate) sample_every: Duration,
}

impl Default for SoakArgs {
    fn default() -> Self {
        SoakArgs {
            duration: Duration::from_secs(90),
            cycles: 1000,
            restart_every: 2,
            sample_every: Duration::from_secs(1),
        }
    }
}

/// What the sampler looks at; the agent's pid changes when it is restarted.
#[derive(Clone)]
struct Probe {
    dir: PathBuf,
    client: kube::Client,
    agent_pid: Arc<AtomicU32>,
    controller_pid: u32,
    agent_health: std::net::SocketAddr,
    started: Instant,
}

impl Probe {
    async fn sample(&self, phase: &str) -> Sample {
        let pid = self.agent_pid.load(Ordering::SeqCst);
        let mut s = Sample {
            t_s: self.started.elapsed().as_secs_f64(),
            phase: phase.to_owned(),
            ..Sample::default()
        };
        soak_sample::agent_figures(pid, &mut s);
        s.processes = soak_sample::held_processes(pid, &self.dir, &[self.controller_pid]);
        s.taps = soak_sample::ignis_taps();
        s.state_dirs = soak_sample::subdirs(&self.dir.join("state").join("vms"));
        let all = ListParams::default();
        s.microvms = Api::<MicroVM>::all(self.client.clone())
            .list_metadata(&all)
            .await
            .map_or(0, |l| l.items.len() as u64);
        s.events = Api::<k8s_openapi::api::events::v1::Event>::all(self.client.clone())
            .list_metadata(&all)
            .await
            .map_or(0, |l| l.items.len() as u64);
        s.watchers = match http_get(self.agent_health, "/metrics").await {
            Ok((200, body)) => soak_sample::prometheus_sum(&body, "ignis_agent_vmm_watchers"),
            _ => None,
        };
        s
    }
}

/// What a workload step needs, apart from the stack (which the agent restart borrows).
#[derive(Clone)]
struct Load {
    api: Api<MicroVM>,
    guest: DemoGuest,
}

fn is_ready(vm: &MicroVM) -> bool {
    vm.status.as_ref().is_some_and(|s| {
        find_condition(&s.conditions, ConditionType::Ready).is_some_and(|c| c.status == "True")
    })
}

fn restarts(vm: &MicroVM) -> i32 {
    vm.status.as_ref().map_or(0, |s| s.restart_count)
}

fn start_time(vm: &MicroVM) -> Option<String> {
    vm.status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0.to_string())
}

impl Load {
    async fn create(&self, vm: MicroVM) -> Result<(), BenchError> {
        self.api
            .create(&PostParams::default(), &vm)
            .await
            .map(drop)
            .map_err(BenchError::Kube)
    }

    /// Poll `name` until `done` holds; `None` is a deleted object.
    async fn wait(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(Option<&MicroVM>) -> bool,
    ) -> Result<Option<MicroVM>, BenchError> {
        let deadline = Instant::now() + STEP;
        loop {
            // A failed GET (the API busy) is retried like a negative answer.
            if let Ok(vm) = self.api.get_opt(name).await
                && done(vm.as_ref())
            {
                return Ok(vm);
            }
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("MicroVM {name} {what}"),
                    after: STEP,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn delete_and_wait(&self, name: &str) -> Result<(), BenchError> {
        match self.api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(BenchError::Kube(e)),
        }
        self.wait(name, "deleted", |vm| vm.is_none())
            .await
            .map(drop)
    }

    /// The sample MicroVM as [`sample_microvm`] makes it, still open to changes.
    fn sample(&self, name: &str) -> MicroVmBuilder {
        MicroVmBuilder::sample(name)
            .namespace(NAMESPACE)
            .guest(&self.guest.kernel, &self.guest.initrd)
            .grace_period_seconds(0)
    }

    /// Boot to Ready, delete.
    async fn boots(&self, name: &str) -> Result<(), BenchError> {
        self.create(sample_microvm(name, &self.guest)).await?;
        self.wait(name, "Ready", |vm| vm.is_some_and(is_ready))
            .await?;
        self.delete_and_wait(name).await
    }

    /// Boot to Ready, SIGKILL the VMM, wait for the run policy's restart to be Ready, delete.
    async fn vmm_killed(&self, name: &str) -> Result<(), BenchError> {
        self.create(sample_microvm(name, &self.guest)).await?;
        let vm = self
            .wait(name, "Ready", |vm| vm.is_some_and(is_ready))
            .await?
            .ok_or_else(|| BenchError::Failed(format!("{name} vanished")))?;
        let uid = vm.metadata.uid.clone().unwrap_or_default();
        let pids = vmm_pids(&uid);
        if pids.is_empty() {
            return Err(BenchError::Failed(format!(
                "no VMM of {name} ({uid}) found"
            )));
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        self.wait(name, "restarted and Ready", |vm| {
            vm.is_some_and(|vm| restarts(vm) >= 1 && is_ready(vm))
        })
        .await?;
        self.delete_and_wait(name).await
    }

    /// Boot to Ready, change the spec (a new run), wait for the new run to be Ready, delete.
    async fn respec(&self, name: &str) -> Result<(), BenchError> {
        self.create(sample_microvm(name, &self.guest)).await?;
        let vm = self
            .wait(name, "Ready", |vm| vm.is_some_and(is_ready))
            .await?
            .ok_or_else(|| BenchError::Failed(format!("{name} vanished")))?;
        let first = start_time(&vm);
        let patch = serde_json::json!({ "spec": { "resources": { "memory": "192Mi" } } });
        self.api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(BenchError::Kube)?;
        self.wait(name, "Ready in a new run", |vm| {
            vm.is_some_and(|vm| is_ready(vm) && start_time(vm) != first)
        })
        .await?;
        self.delete_and_wait(name).await
    }

    /// A guest with no init: it panics at boot, the VMM exits before Ready, the controller
    /// restarts it with back-off; deleted once it has crashed at least twice.
    async fn crash_loops(&self, name: &str) -> Result<(), BenchError> {
        let vm = self
            .sample(name)
            .cmdline("console=ttyS0 panic=-1 quiet rdinit=/ignis-no-such-init")
            .build();
        self.create(vm).await?;
        self.wait(name, "crash-looping", |vm| {
            vm.is_some_and(|vm| restarts(vm) >= 2)
        })
        .await?;
        self.delete_and_wait(name).await
    }

    /// A guest whose marker never appears: a boot timeout, a restart, deleted while booting.
    async fn never_ready(&self, name: &str) -> Result<(), BenchError> {
        let vm = self
            .sample(name)
            .console_marker("ignis: never printed")
            .build();
        self.create(vm).await?;
        self.wait(name, "restarted after a boot timeout", |vm| {
            vm.is_some_and(|vm| restarts(vm) >= 1)
        })
        .await?;
        self.delete_and_wait(name).await
    }
}

/// Live QEMU processes of the MicroVM `uid` (the backend names them `ignis-<uid>`).
fn vmm_pids(uid: &str) -> Vec<u32> {
    let needle = format!("process=ignis-{uid}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// One cycle `i` of the workload; the agent is restarted in its middle when `restart`.
async fn cycle(
    load: &Load,
    stack: &mut Stack,
    agent_pid: &AtomicU32,
    i: usize,
    restart: bool,
) -> Result<(), BenchError> {
    let sequential = async {
        load.boots(&format!("ok-{i}")).await?;
        load.vmm_killed(&format!("killed-{i}")).await?;
        load.respec(&format!("respec-{i}")).await
    };
    let (panic, never) = (format!("panic-{i}"), format!("never-{i}"));
    let crashing = load.crash_loops(&panic);
    let never = load.never_ready(&never);
    let restarting = async {
        if restart {
            // Mid-cycle: guests booting, one crash-looping, one waiting for its deadline.
            tokio::time::sleep(Duration::from_secs(6)).await;
            let took = stack.restart_agent().await?;
            agent_pid.store(stack.agent_pid(), Ordering::SeqCst);
            println!("  cycle {i}: agent SIGKILLed and restarted in {took:?}");
        }
        Ok::<_, BenchError>(())
    };
    tokio::try_join!(sequential, crashing, never, restarting).map(drop)
}

/// Delete whatever MicroVMs are left and wait until none is.
async fn remove_all(load: &Load) -> Result<(), BenchError> {
    let names: Vec<String> = load
        .api
        .list_metadata(&ListParams::default())
        .await
        .map_err(BenchError::Kube)?
        .items
        .into_iter()
        .filter_map(|o| o.metadata.name)
        .collect();
    for name in names {
        load.delete_and_wait(&name).await?;
    }
    Ok(())
}

/// Samples every `every` into `samples`, tagged with the current phase, until `stop`.
fn spawn_sampler(
    probe: Probe,
    phase: Arc<Mutex<String>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let now = phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let s = probe.sample(&now).await;
            samples.lock().unwrap_or_else(|p| p.into_inner()).push(s);
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// The samples, checks and counts of one run.
struct Outcome {
    samples: Vec<Sample>,
    baseline: Sample,
    after: Sample,
    checks: Vec<Check>,
    cycles: usize,
    restarts: usize,
    load_s: f64,
}

async fn soak(args: &SoakArgs, stack: &mut Stack) -> Result<Outcome, BenchError> {
    let load = Load {
        api: stack.microvms(),
        guest: stack.guest.clone(),
    };
    let agent_pid = Arc::new(AtomicU32::new(stack.agent_pid()));
    let probe = Probe {
        dir: stack.dir.clone(),
        client: stack.client.clone(),
        agent_pid: agent_pid.clone(),
        controller_pid: stack.controller_pid(),
        agent_health: stack.agent_health,
        started: Instant::now(),
    };
    // Warm-up: what the agent sets up once (the first VMM's child reaper, allocator arenas)
    // belongs in the baseline, not in the verdict.
    println!("  warm-up: one guest booted, one crash-looping");
    tokio::try_join!(load.boots("warm-ok"), load.crash_loops("warm-panic"))?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let baseline = probe.sample("baseline").await;

    let phase = Arc::new(Mutex::new("load".to_owned()));
    let samples = Arc::new(Mutex::new(vec![baseline.clone()]));
    let stop = CancellationToken::new();
    let sampler = spawn_sampler(
        probe.clone(),
        phase.clone(),
        samples.clone(),
        args.sample_every,
        stop.clone(),
    );
    let load_started = Instant::now();
    let mut cycles = 0;
    let mut restarts = 0;
    let worked = async {
        while cycles < args.cycles && load_started.elapsed() < args.duration {
            let restart = args.restart_every > 0 && (cycles + 1) % args.restart_every == 0;
            let t = Instant::now();
            cycle(&load, stack, &agent_pid, cycles, restart).await?;
            restarts += usize::from(restart);
            cycles += 1;
            println!(
                "  cycle {cycles} done in {:.0} s ({:.0} s of {:?})",
                t.elapsed().as_secs_f64(),
                load_started.elapsed().as_secs_f64(),
                args.duration
            );
        }
        Ok::<_, BenchError>(())
    }
    .await;
    let load_s = load_started.elapsed().as_secs_f64();
    *phase.lock().unwrap_or_else(|p| p.into_inner()) = "quiesce".into();
    let removed = remove_all(&load).await;
    stop.cancel();
    let _ = sampler.await;
    worked?;
    removed?;

    // Back to the baseline within SETTLE, or the last look is the verdict.
    let mut samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let deadline = Instant::now() + SETTLE;
    let (after, checks) = loop {
        let after = probe.sample("after").await;
        let checks = soak_sample::checks(&baseline, &samples, &after);
        if checks.iter().all(Check::holds) || Instant::now() >= deadline {
            break (after, checks);
        }
        samples.push(Sample {
            phase: "quiesce".into(),
            ..after
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    samples.push(after.clone());
    Ok(Outcome {
        samples,
        baseline,
        after,
        checks,
        cycles,
        restarts,
        load_s,
    })
}

pub(crate) async fn run(
    args: &SoakArgs,
    machine: &Machine,
    results: &Path,
) -> Result<(), BenchError> {
    println!(
        "soak: mixed failure workload on QEMU for {:?} (at most {} cycles), agent restarted every {} cycles",
        args.duration, args.cycles, args.restart_every
    );
    let started = Instant::now();
    let mut stack = Stack::start(&StackOptions {
        simulated: false,
        boot_timeout: BOOT_TIMEOUT,
    })
    .await?;
    let outcome = soak(args, &mut stack).await;
    stack.stop(outcome.is_err()).await;
    let o = outcome?;

    let mut report = Report::new("soak", machine.clone());
    report.rows.push(
        Row::new("cycles", o.cycles as f64, "", Target::None)
            .note("each: boot+delete, VMM SIGKILL, spec change, crash loop, boot timeout"),
    );
    report.rows.push(Row::new(
        "agent restarts (SIGKILL)",
        o.restarts as f64,
        "",
        Target::None,
    ));
    report
        .rows
        .push(Row::new("workload", o.load_s, "s", Target::None));
    report.rows.push(Row::new(
        "whole bench",
        started.elapsed().as_secs_f64(),
        "s",
        Target::None,
    ));
    for c in &o.checks {
        report.rows.push(
            Row::new(
                format!("{} after", c.figure),
                c.after,
                &c.unit,
                Target::AtMost(c.bound),
            )
            .note(format!(
                "baseline {}, peak {}",
                super::stats::trim(c.baseline),
                super::stats::trim(c.peak)
            )),
        );
    }
    report.rows.push(
        Row::new("API Events after", o.after.events as f64, "", Target::None).note(format!(
            "baseline {}; kept by design, aged out by the API",
            o.baseline.events
        )),
    );
    let failed: Vec<String> = o
        .checks
        .iter()
        .filter(|c| !c.holds())
        .map(|c| {
            format!(
                "{}: baseline {}, after {} (bound {})",
                c.figure,
                super::stats::trim(c.baseline),
                super::stats::trim(c.after),
                super::stats::trim(c.bound)
            )
        })
        .collect();
    for f in &failed {
        report.notes.push(format!("LEAK: {f}"));
    }
    report.data = serde_json::json!({
        "samples": o.samples,
        "checks": o.checks,
        "cycles": o.cycles,
        "restarts": o.restarts,
        "duration_s": args.duration.as_secs_f64(),
    });
    report.publish(results)?;
    if !failed.is_empty() {
        return Err(BenchError::Leak(failed.join("; ")));
    }
    Ok(())
}
