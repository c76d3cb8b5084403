//! `ignis bench control-plane`: how fast the controller places MicroVMs and what it costs in
//! memory, with the agent on the `simulated` VMM (the only bench that uses it: no guest boots,
//! so the control plane is all that is measured). Each count runs on a fresh stack.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;

use super::machine::Machine;
use super::stack::{Stack, StackOptions, own_rss, rss_of};
use super::stats::{MIB, Target};
use super::{BenchError, Report, Row};
use crate::api::{InterfaceMode, NetworkInterface, NetworkSpec};

/// Flags of `ignis bench control-plane`.
#[derive(Debug, clap::Args)]
pub(crate) struct ControlPlaneArgs {
    /// How many MicroVMs, one fresh stack per count.
    #[arg(long, value_delimiter = ',', default_values_t = [1000usize, 10000])]
    pub(crate) counts: Vec<usize>,
    /// Creates in flight at once.
    #[arg(long, default_value_t = 32)]
    pub(crate) parallel: usize,
    /// MicroVMs with one interface of mode `none` instead of the default NAT one: the agent
    /// makes no tap and no NAT rules, so its per-VM network setup (one at a time in the agent)
    /// is left out and the control plane is what is measured.
    #[arg(long)]
    pub(crate) no_network: bool,
}

impl Default for ControlPlaneArgs {
    fn default() -> Self {
        ControlPlaneArgs {
            counts: vec![1000, 10000],
            parallel: 32,
            no_network: false,
        }
    }
}

/// The controller RSS target at a count (docs/design.md §6 names 0, 1 000 and 10 000).
pub(crate) fn rss_target_mib(count: usize) -> Target {
    match count {
        0 => Target::AtMost(15.0),
        1000 => Target::AtMost(25.0),
        10000 => Target::AtMost(80.0),
        _ => Target::None,
    }
}

const RECONCILES: &str = "ignis_controller_reconciles_total";

/// Results of one count.
#[derive(Debug, serde::Serialize)]
pub(crate) struct CountResult {
    pub(crate) count: usize,
    pub(crate) create_s: f64,
    pub(crate) scheduled_s: f64,
    /// All Ready after this long, if they all were.
    pub(crate) ready_s: Option<f64>,
    pub(crate) ready_count: usize,
    pub(crate) reconciles: f64,
    pub(crate) microvm_writes: u64,
    pub(crate) all_writes: u64,
    pub(crate) controller_rss_idle: u64,
    pub(crate) controller_rss_loaded: u64,
    pub(crate) bench_rss_idle: u64,
    pub(crate) bench_rss_loaded: u64,
    /// (seconds since the first create, MicroVMs Scheduled) every 100 ms.
    pub(crate) timeline: Vec<(f64, usize)>,
}

async fn one(count: usize, args: &ControlPlaneArgs) -> Result<CountResult, BenchError> {
    let stack = Stack::start(&StackOptions {
        simulated: true,
        boot_timeout: Duration::from_secs(60),
    })
    .await?;
    let outcome = measure(&stack, count, args.parallel, args.no_network).await;
    stack.stop(outcome.is_err()).await;
    outcome
}

async fn measure(
    stack: &Stack,
    count: usize,
    parallel: usize,
    no_network: bool,
) -> Result<CountResult, BenchError> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    let controller_rss_idle = rss_of(stack.controller_pid()).unwrap_or(0);
    let bench_rss_idle = own_rss().unwrap_or(0);
    let rec0 = stack.controller_metric(RECONCILES).await.unwrap_or(0.0);

    let t0 = Instant::now();
    let creates = futures::stream::iter(0..count)
        .map(|i| async move {
            let name = format!("cp-{i}");
            if !no_network {
                return stack.create(&name).await.map(drop);
            }
            let mut vm = super::stack::sample_microvm(&name, &stack.guest);
            vm.spec.network = Some(NetworkSpec {
                interfaces: vec![NetworkInterface {
                    name: "eth0".into(),
                    mode: InterfaceMode::None,
                    bridge: None,
                    address: None,
                    mac: None,
                }],
            });
            stack
                .microvms()
                .create(&Default::default(), &vm)
                .await
                .map(drop)
                .map_err(BenchError::Kube)
        })
        .buffer_unordered(parallel.max(1))
        .collect::<Vec<_>>()
        .await;
    for c in creates {
        c?;
    }
    let create_s = t0.elapsed().as_secs_f64();

    // Counted from the last create (creating is measured, not bounded, above): generous,
    // 20 ms per VM and at least two minutes.
    let deadline =
        t0.elapsed() + Duration::from_secs(120).max(Duration::from_millis(20 * count as u64));
    let mut timeline = Vec::new();
    let mut scheduled_s = None;
    // Ready is waited for at most READY_GRACE past the last Scheduled: some VMs on the
    // simulated VMM stay `Starting` in status (see docs/benchmarks.md), and that must not
    // hide the throughput figures.
    const READY_GRACE: Duration = Duration::from_secs(30);
    let (ready_s, ready_count) = loop {
        let scheduled = stack.count(|p| p.scheduled.is_some());
        let ready = stack.count(|p| p.ready.is_some());
        timeline.push((t0.elapsed().as_secs_f64(), scheduled));
        if scheduled >= count && scheduled_s.is_none() {
            scheduled_s = Some(t0.elapsed().as_secs_f64());
        }
        if ready >= count {
            break (Some(t0.elapsed().as_secs_f64()), ready);
        }
        if scheduled_s.is_some_and(|s| t0.elapsed().as_secs_f64() > s + READY_GRACE.as_secs_f64()) {
            let stuck = not_ready(stack).await;
            println!(
                "  only {ready}/{count} Ready {READY_GRACE:?} after all were Scheduled: {stuck}"
            );
            break (None, ready);
        }
        if t0.elapsed() > deadline {
            let stuck = not_ready(stack).await;
            return Err(BenchError::Timeout {
                what: format!(
                    "{count} MicroVMs Scheduled ({scheduled} Scheduled, {ready} Ready; not Ready: {stuck})"
                ),
                after: deadline,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let scheduled_s = scheduled_s.or(ready_s).unwrap_or(0.0);
    let rec1 = stack.controller_metric(RECONCILES).await.unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = stack.writes();
    let microvm_writes = writes
        .iter()
        .filter(|(k, _)| k.contains("/microvms/"))
        .map(|(_, w)| w.total())
        .sum();
    let all_writes = writes.values().map(|w| w.total()).sum();
    Ok(CountResult {
        count,
        create_s,
        scheduled_s,
        ready_s,
        ready_count,
        reconciles: rec1 - rec0,
        microvm_writes,
        all_writes,
        controller_rss_idle,
        controller_rss_loaded: rss_of(stack.controller_pid()).unwrap_or(0),
        bench_rss_idle,
        bench_rss_loaded: own_rss().unwrap_or(0),
        timeline,
    })
}

/// A few MicroVMs that are not Ready, with their phase and Ready condition, for the error.
async fn not_ready(stack: &Stack) -> String {
    let Ok(list) = stack.microvms().list(&Default::default()).await else {
        return "cannot list".into();
    };
    list.items
        .iter()
        .filter_map(|vm| {
            let st = vm.status.clone().unwrap_or_default();
            let ready =
                crate::api::find_condition(&st.conditions, crate::api::ConditionType::Ready);
            if ready.is_some_and(|c| c.status == "True") {
                return None;
            }
            Some(format!(
                "{} phase {:?} Ready {:?}",
                vm.metadata.name.clone().unwrap_or_default(),
                st.phase,
                ready.map(|c| format!("{} {} {}", c.status, c.reason, c.message))
            ))
        })
        .take(3)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The rows of one count.
pub(crate) fn count_rows(r: &CountResult) -> Vec<Row> {
    let n = r.count as f64;
    let per = |x: f64| if r.count > 0 { x / n } else { 0.0 };
    let rate = |s: f64| if s > 0.0 { n / s } else { 0.0 };
    let c = r.count;
    vec![
        Row::new(
            format!("{c}: create (API) rate"),
            rate(r.create_s),
            "VMs/s",
            Target::None,
        )
        .note("POSTs, 32 in flight"),
        Row::new(
            format!("{c}: time to all Scheduled"),
            r.scheduled_s,
            "s",
            Target::None,
        )
        .note("from the first create"),
        Row::new(
            format!("{c}: MicroVMs/s to Scheduled"),
            rate(r.scheduled_s),
            "VMs/s",
            Target::AtLeast(500.0),
        ),
        match r.ready_s {
            Some(s) => Row::new(
                format!("{c}: time to all Ready (simulated)"),
                s,
                "s",
                Target::None,
            ),
            None => Row::new(
                format!("{c}: MicroVMs Ready 30 s after all Scheduled"),
                r.ready_count as f64,
                "VMs",
                Target::AtLeast(n),
            )
            .note("the rest stayed Starting in status"),
        },
        Row::new(
            format!("{c}: reconciles/s"),
            r.reconciles / r.ready_s.unwrap_or(r.scheduled_s).max(1e-3),
            "/s",
            Target::None,
        )
        .note("over the time to all Ready (or all Scheduled)"),
        Row::new(
            format!("{c}: reconciles per VM"),
            per(r.reconciles),
            "",
            Target::None,
        ),
        Row::new(
            format!("{c}: MicroVM writes per VM"),
            per(r.microvm_writes as f64),
            "writes",
            Target::None,
        )
        .note("object + status, incl. the create"),
        Row::new(
            format!("{c}: API writes per VM, all objects"),
            per(r.all_writes as f64),
            "writes",
            Target::None,
        )
        .note("incl. Events; the dev server counts writes, not reads or watches"),
        Row::new(
            format!("{c}: controller RSS idle"),
            r.controller_rss_idle as f64 / MIB,
            "MiB",
            rss_target_mib(0),
        ),
        Row::new(
            format!("{c}: controller RSS with {c} MicroVMs"),
            r.controller_rss_loaded as f64 / MIB,
            "MiB",
            rss_target_mib(c),
        ),
        Row::new(
            format!("{c}: dev API server RSS with {c} MicroVMs"),
            r.bench_rss_loaded as f64 / MIB,
            "MiB",
            Target::None,
        )
        .note("the bench process: API server + the bench's client and watch"),
    ]
}

pub(crate) async fn run(
    args: &ControlPlaneArgs,
    machine: &Machine,
    results: &Path,
) -> Result<(), BenchError> {
    let mut report = Report::new("control-plane", machine.clone());
    let mut all = Vec::new();
    report.notes.push(
        "agent on the `simulated` VMM (status shows hypervisor: simulated); controller and agent \
         are separate processes (`ignis controller`, `ignis agent`), so controller RSS is its own"
            .into(),
    );
    report.notes.push(
        "the agent advertises ×10 000 its capacity (--capacity-multiplier, simulated backend only) so the scheduler \
         never refuses; the dev API server (SQLite) runs inside the bench process, whose RSS \
         is reported for it"
            .into(),
    );
    if args.no_network {
        report.notes.push(
            "--no-network: every MicroVM has one interface of mode `none`, so the agent sets up \
             no tap and no NAT for it"
                .into(),
        );
    }
    for &count in &args.counts {
        println!("control-plane: {count} MicroVMs on the simulated VMM (fresh stack)");
        let r = one(count, args).await?;
        report.rows.extend(count_rows(&r));
        all.push(r);
        report.data = serde_json::to_value(&all).map_err(BenchError::Json)?;
        // Published after every count, so a larger count that fails keeps the smaller ones.
        report.publish(results)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_divide_by_count_and_time() {
        let r = CountResult {
            count: 1000,
            create_s: 2.0,
            scheduled_s: 4.0,
            ready_s: Some(5.0),
            ready_count: 1000,
            reconciles: 3000.0,
            microvm_writes: 4000,
            all_writes: 6000,
            controller_rss_idle: 11 << 20,
            controller_rss_loaded: 20 << 20,
            bench_rss_idle: 0,
            bench_rss_loaded: 0,
            timeline: vec![],
        };
        let rows = count_rows(&r);
        let get = |m: &str| rows.iter().find(|r| r.metric == m).expect(m).value;
        assert_eq!(get("1000: MicroVMs/s to Scheduled"), 250.0);
        assert_eq!(get("1000: reconciles/s"), 600.0);
        assert_eq!(get("1000: reconciles per VM"), 3.0);
        assert_eq!(get("1000: MicroVM writes per VM"), 4.0);
        assert_eq!(get("1000: controller RSS with 1000 MicroVMs"), 20.0);
        assert_eq!(rss_target_mib(10000), Target::AtMost(80.0));
        assert_eq!(rss_target_mib(50), Target::None);
    }
}
