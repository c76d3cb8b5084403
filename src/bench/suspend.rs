//! `ignis bench suspend`: suspend and resume through the dev stack, beside a cold boot of the
//! same MicroVM in the same run. Each round creates the sample MicroVM (256 MiB, the demo
//! guest) and times apply → Ready (the cold boot), then `spec.suspend: true` → phase
//! `Suspended` (the suspend), then `spec.suspend: false` → Ready again (the resume), and
//! weighs its snapshot on the node's disk.

use std::path::Path;
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{Patch, PatchParams};
use serde::Serialize;

use super::machine::Machine;
use super::stack::{Stack, StackOptions};
use super::stats::{Target, summarize};
use super::{BenchError, Report, Row};
use crate::api::{MicroVM, MicroVMStatus, Phase};

/// Flags of `ignis bench suspend`.
#[derive(Debug, clap::Args)]
pub(crate) struct SuspendArgs {
    /// Rounds of cold boot → suspend → resume.
    #[arg(long, default_value_t = 20)]
    pub(crate) count: usize,
    /// Deadline of one step.
    #[arg(long, default_value = "120s", value_parser = crate::time::parse_duration)]
    pub(crate) timeout: Duration,
}

impl Default for SuspendArgs {
    fn default() -> Self {
        SuspendArgs {
            count: 20,
            timeout: Duration::from_secs(120),
        }
    }
}

/// One round.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Round {
    pub(crate) cold_boot_ms: f64,
    pub(crate) suspend_ms: f64,
    pub(crate) resume_ms: f64,
    pub(crate) snapshot_bytes: u64,
    pub(crate) memory_mib: u64,
}

/// How often the bench reads the MicroVM while it waits (a GET; the stack's watch keeps only
/// the first Ready).
const POLL: Duration = Duration::from_millis(5);

async fn wait_status(
    vms: &Api<MicroVM>,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&MicroVMStatus) -> bool,
) -> Result<Instant, BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let vm = vms.get(name).await.map_err(BenchError::Kube)?;
        if vm.status.as_ref().is_some_and(&done) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Timeout {
                what: format!("MicroVM {name} {what}"),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn ready(status: &MicroVMStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

async fn set_suspend(vms: &Api<MicroVM>, name: &str, suspend: bool) -> Result<Instant, BenchError> {
    let patch = serde_json::json!({ "spec": { "suspend": suspend } });
    let sent = Instant::now();
    vms.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(BenchError::Kube)?;
    Ok(sent)
}

/// The bytes of the VM's snapshot directory on the node.
fn snapshot_bytes(stack: &Stack, uid: &str) -> u64 {
    std::fs::read_dir(stack.dir.join("state").join("snapshots").join(uid))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// What one suspend and resume took.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub(crate) struct Cycle {
    /// From `suspend: true` to phase `Suspended`.
    pub(crate) suspend_ms: f64,
    /// From `suspend: false` to `Ready`.
    pub(crate) resume_ms: f64,
    /// What `weigh` said while the VM was suspended.
    pub(crate) snapshot_bytes: u64,
}

/// Suspend a Ready MicroVM, `weigh` its snapshot while it is suspended (it is removed once
/// the guest runs again), and resume it. Shared with `ignis bench cluster --suspend`.
pub(crate) async fn cycle(
    vms: &Api<MicroVM>,
    name: &str,
    timeout: Duration,
    weigh: impl FnOnce() -> u64,
) -> Result<Cycle, BenchError> {
    let ms = |from: Instant, to: Instant| (to - from).as_secs_f64() * 1000.0;
    let asked = set_suspend(vms, name, true).await?;
    let suspended = wait_status(vms, name, "Suspended", timeout, |s| {
        s.phase == Some(Phase::Suspended)
    })
    .await?;
    let snapshot_bytes = weigh();
    let resumed_at = set_suspend(vms, name, false).await?;
    let resumed = wait_status(vms, name, "Ready after resume", timeout, ready).await?;
    Ok(Cycle {
        suspend_ms: ms(asked, suspended),
        resume_ms: ms(resumed_at, resumed),
        snapshot_bytes,
    })
}

async fn round(stack: &Stack, name: &str, timeout: Duration) -> Result<Round, BenchError> {
    let vms = stack.microvms();
    let created = stack.create(name).await?;
    let booted = wait_status(&vms, name, "Ready", timeout, ready).await?;
    let vm: MicroVM = vms.get(name).await.map_err(BenchError::Kube)?;
    let uid = vm.metadata.uid.clone().unwrap_or_default();
    let memory_mib = crate::api::parse_quantity_bytes(&vm.spec.resources.memory)
        .map_err(|e| BenchError::Failed(format!("memory of {name}: {e}")))?
        >> 20;
    let cycle = cycle(&vms, name, timeout, || snapshot_bytes(stack, &uid)).await?;
    stack.delete(name).await?;
    stack
        .wait_for(name, "deleted", Duration::from_secs(60), |p| {
            p.gone.is_some()
        })
        .await?;
    Ok(Round {
        cold_boot_ms: (booted - created).as_secs_f64() * 1000.0,
        suspend_ms: cycle.suspend_ms,
        resume_ms: cycle.resume_ms,
        snapshot_bytes: cycle.snapshot_bytes,
        memory_mib,
    })
}

/// The table of the rounds.
pub(crate) fn rows(rounds: &[Round]) -> Vec<Row> {
    let pick = |f: fn(&Round) -> f64| summarize(&rounds.iter().map(f).collect::<Vec<_>>());
    let cold = pick(|r| r.cold_boot_ms);
    let suspend = pick(|r| r.suspend_ms);
    let resume = pick(|r| r.resume_ms);
    let per_mib = pick(|r| r.snapshot_bytes as f64 / 1e6 / r.memory_mib.max(1) as f64);
    let bytes = pick(|r| r.snapshot_bytes as f64 / 1e6);
    let none = Target::None;
    let mut out = Vec::new();
    for (label, s) in [
        ("cold boot: apply → Ready", &cold),
        ("suspend: spec → Suspended", &suspend),
        ("resume: spec → Ready", &resume),
    ] {
        out.push(Row::new(format!("{label} p50"), s.p50, "ms", none));
        out.push(Row::new(format!("{label} p99"), s.p99, "ms", none));
    }
    out.push(
        Row::new(
            "resume p50 / cold boot p50",
            resume.p50 / cold.p50,
            "×",
            none,
        )
        .note("the same MicroVM, the same run"),
    );
    out.push(Row::new("snapshot size p50", bytes.p50, "MB", none));
    out.push(
        Row::new(
            "snapshot per MiB of guest memory",
            per_mib.p50,
            "MB/MiB",
            none,
        )
        .note("QEMU's migration stream: pages the guest never touched are not written"),
    );
    out
}

pub(crate) async fn run(
    args: &SuspendArgs,
    machine: &Machine,
    results: &Path,
) -> Result<(), BenchError> {
    println!(
        "suspend: {} rounds of cold boot → suspend → resume on ignis dev",
        args.count
    );
    let stack = Stack::start(&StackOptions {
        simulated: false,
        boot_timeout: args.timeout,
    })
    .await?;
    let outcome = async {
        let mut rounds = Vec::new();
        for i in 0..args.count {
            let r = round(&stack, &format!("sus-{i}"), args.timeout).await?;
            println!(
                "  {}/{}: cold boot {:.0} ms, suspend {:.0} ms, resume {:.0} ms, snapshot {:.1} MB",
                i + 1,
                args.count,
                r.cold_boot_ms,
                r.suspend_ms,
                r.resume_ms,
                r.snapshot_bytes as f64 / 1e6
            );
            rounds.push(r);
        }
        Ok::<_, BenchError>(rounds)
    }
    .await;
    stack.stop(outcome.is_err()).await;
    let rounds = outcome?;
    let mut report = Report::new("suspend", machine.clone());
    report.rows = rows(&rounds);
    report.notes.push(
        "the sample MicroVM (256 MiB, 1 vCPU, the demo guest, readiness by console marker) on \
         QEMU under TCG, confined; times from the API write to the status seen by a 5 ms poll; \
         resume's Ready is the restore itself (a restored guest printed its marker before the \
         suspend)"
            .into(),
    );
    report.data = serde_json::json!({ "rounds": rounds, "count": args.count });
    report.publish(results)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_gives_quantiles_and_the_size_per_mib() {
        let rounds: Vec<Round> = (0..4)
            .map(|i| Round {
                cold_boot_ms: 2000.0 + f64::from(i),
                suspend_ms: 700.0,
                resume_ms: 500.0,
                snapshot_bytes: 96_000_000,
                memory_mib: 256,
            })
            .collect();
        let rows = rows(&rounds);
        let find = |label: &str| {
            rows.iter()
                .find(|r| r.metric == label)
                .unwrap_or_else(|| panic!("{label}"))
                .value
        };
        assert_eq!(find("suspend: spec → Suspended p50"), 700.0);
        assert!((find("resume p50 / cold boot p50") - 0.25).abs() < 0.01);
        assert!((find("snapshot per MiB of guest memory") - 0.375).abs() < 0.001);
    }
}
