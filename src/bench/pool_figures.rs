//! The arithmetic of `ignis bench pool`, apart from its I/O: what one claim and one run
//! measured, the table they make, and the few `/proc` files a warm VM's cost is read from.

use serde::Serialize;

use super::Row;
use super::stats::{MIB, Summary, Target, summarize};

/// The goals of issue 20 on `ignis dev`.
pub(crate) const CLAIM_P50_GOAL_MS: f64 = 50.0;
pub(crate) const CLAIM_P99_GOAL_MS: f64 = 200.0;
pub(crate) const CLAIMS_PER_S_GOAL: f64 = 200.0;

/// One claim of the burst.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Claim {
    pub(crate) name: String,
    /// `status.claim.outcome` (`Claimed`, `PoolEmpty`, ...), empty when none was written.
    pub(crate) outcome: String,
    /// From this client's create call to its watch seeing `Ready=True`.
    pub(crate) ready_ms: f64,
    /// The create call alone: request → the API server's answer (admission and storage).
    pub(crate) create_ms: f64,
    /// From the create call of the burst's first claim to this one's Ready.
    pub(crate) ready_since_burst_ms: f64,
    /// `status.claim.latencyMs`: the controller's own figure, creation → claim written.
    pub(crate) server_ms: Option<f64>,
}

impl Claim {
    pub(crate) fn hit(&self) -> bool {
        self.outcome == "Claimed"
    }
}

/// What a set of warm VMs costs the node: their VMMs' memory and CPU.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct WarmCost {
    /// Warm VMs whose VMM was found.
    pub(crate) vms: usize,
    pub(crate) rss_bytes: u64,
    pub(crate) pss_bytes: u64,
    /// CPU time the VMMs used over `window_s`, in seconds.
    pub(crate) cpu_s: f64,
    pub(crate) window_s: f64,
}

impl WarmCost {
    fn per_vm(&self, total: f64) -> f64 {
        total / self.vms.max(1) as f64
    }
}

/// A drained pool filling up again.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Refill {
    pub(crate) replicas: u32,
    /// From the last claim of the drain seen Ready to `readyReplicas` back at `replicas`.
    pub(crate) refill_ms: f64,
    /// The drain's claims that took a warm VM.
    pub(crate) drained_by_hits: usize,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Run {
    /// `ignis dev`, or the cluster.
    pub(crate) target: String,
    /// The agent ran the `simulated` VMM: no guests.
    pub(crate) simulated: bool,
    pub(crate) pool_size: u32,
    pub(crate) guest_memory_mib: u64,
    pub(crate) cold_ms: Vec<f64>,
    /// From the pool's create to `readyReplicas == pool_size`.
    pub(crate) fill_ms: f64,
    pub(crate) warm: WarmCost,
    pub(crate) claims: Vec<Claim>,
    pub(crate) refill: Option<Refill>,
}

/// Claims per second: the warm claims over the time from the burst's first create call to
/// the last warm claim seen Ready (misses boot cold and are not counted).
pub(crate) fn claims_per_s(claims: &[Claim]) -> f64 {
    let hits: Vec<&Claim> = claims.iter().filter(|c| c.hit()).collect();
    let wall_ms = hits
        .iter()
        .map(|c| c.ready_since_burst_ms)
        .fold(0.0, f64::max);
    if hits.is_empty() || wall_ms <= 0.0 {
        return 0.0;
    }
    hits.len() as f64 / (wall_ms / 1000.0)
}

fn quantile_rows(out: &mut Vec<Row>, label: &str, s: &Summary, goals: [Target; 2], note: &str) {
    for (q, v, goal) in [("p50", s.p50, goals[0]), ("p99", s.p99, goals[1])] {
        out.push(Row::new(format!("{label} {q}"), v, "ms", goal).note(note));
    }
}

/// The table. `goals`: judge the claim figures against issue 20's goals (they are set for
/// `ignis dev`; on a cluster the figures stand beside them unjudged).
pub(crate) fn rows(run: &Run, goals: bool) -> Vec<Row> {
    let none = Target::None;
    let goal = |t: Target| if goals { t } else { none };
    let mut out = Vec::new();
    let cold = summarize(&run.cold_ms);
    quantile_rows(
        &mut out,
        "cold boot: apply → Ready",
        &cold,
        [none, none],
        &format!("{} MicroVMs, one at a time, no pool", cold.n),
    );
    let hits: Vec<&Claim> = run.claims.iter().filter(|c| c.hit()).collect();
    let client = summarize(&hits.iter().map(|c| c.ready_ms).collect::<Vec<_>>());
    let server = summarize(&hits.iter().filter_map(|c| c.server_ms).collect::<Vec<_>>());
    let burst = format!(
        "{} of {} claims at once took a warm VM, pool of {}",
        hits.len(),
        run.claims.len(),
        run.pool_size
    );
    quantile_rows(
        &mut out,
        "claim → Ready",
        &client,
        [
            goal(Target::AtMost(CLAIM_P50_GOAL_MS)),
            goal(Target::AtMost(CLAIM_P99_GOAL_MS)),
        ],
        &format!("create call → Ready seen by a watch; {burst}"),
    );
    quantile_rows(
        &mut out,
        "claim: the create call",
        &summarize(&hits.iter().map(|c| c.create_ms).collect::<Vec<_>>()),
        [none, none],
        "request → the API server's answer, part of claim → Ready",
    );
    quantile_rows(
        &mut out,
        "claim: status.claim.latencyMs",
        &server,
        [none, none],
        "the controller's figure: creation → claim written",
    );
    out.push(
        Row::new(
            "claims/s, sustained",
            claims_per_s(&run.claims),
            "claims/s",
            goal(Target::AtLeast(CLAIMS_PER_S_GOAL)),
        )
        .note("warm claims / (first create → last warm claim Ready)"),
    );
    let misses = run.claims.len() - hits.len();
    out.push(
        Row::new("claims that booted cold", misses as f64, "claims", none)
            .note("outcome other than Claimed (PoolEmpty when the burst outran the pool)"),
    );
    if cold.p50 > 0.0 && client.n > 0 {
        out.push(
            Row::new(
                "claim → Ready p50 / cold boot p50",
                client.p50 / cold.p50,
                "×",
                none,
            )
            .note("the same template, the same run"),
        );
    }
    out.push(
        Row::new("pool fill: create → all Ready", run.fill_ms, "ms", none)
            .note(format!("{} warm VMs, booted in waves of 4", run.pool_size)),
    );
    let w = &run.warm;
    out.push(
        Row::new(
            "warm VM: VMM RSS per VM",
            w.per_vm(w.rss_bytes as f64) / MIB,
            "MiB",
            none,
        )
        .note(format!(
            "sum over {} VMMs / {}; guest memory {} MiB",
            w.vms, w.vms, run.guest_memory_mib
        )),
    );
    out.push(
        Row::new(
            "warm VM: VMM PSS per VM",
            w.per_vm(w.pss_bytes as f64) / MIB,
            "MiB",
            none,
        )
        .note("shared pages (QEMU's libraries) split among the VMMs"),
    );
    out.push(Row::new(
        "warm VM: guest memory",
        run.guest_memory_mib as f64,
        "MiB",
        none,
    ));
    if w.window_s > 0.0 {
        let cores = w.cpu_s / w.window_s;
        out.push(
            Row::new(
                "warm VM: idle CPU per VM",
                w.per_vm(cores) * 100.0,
                "% of a core",
                none,
            )
            .note(format!("VMM user+system time over {:.0} s", w.window_s)),
        );
        out.push(
            Row::new("warm pool: idle CPU, all VMs", cores, "cores", none)
                .note(format!("{} idle warm VMs", w.vms)),
        );
    }
    if let Some(r) = &run.refill {
        out.push(
            Row::new("refill: drained pool → all Ready", r.refill_ms, "ms", none).note(format!(
                "pool of {}, drained by {} claims at once; from the last claim Ready",
                r.replicas, r.drained_by_hits
            )),
        );
    }
    out
}

/// `Rss` and `Pss` (bytes) from the text of `/proc/<pid>/smaps_rollup`.
pub(crate) fn parse_smaps_rollup(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// User plus system CPU time (clock ticks) from a `/proc/<pid>/stat` line.
pub(crate) fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the command's closing parenthesis start at field 3 (state); utime and
    // stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::stats::Verdict;

    fn claim(i: usize, outcome: &str, ready_ms: f64, since: f64) -> Claim {
        Claim {
            name: format!("c{i}"),
            outcome: outcome.into(),
            ready_ms,
            create_ms: ready_ms / 4.0,
            ready_since_burst_ms: since,
            server_ms: Some(ready_ms / 2.0),
        }
    }

    fn find(rows: &[Row], label: &str) -> Row {
        rows.iter()
            .find(|r| r.metric == label)
            .unwrap_or_else(|| panic!("no row {label}"))
            .clone()
    }

    #[test]
    fn claims_per_second_count_warm_claims_over_the_burst() {
        let claims = vec![
            claim(0, "Claimed", 10.0, 10.0),
            claim(1, "Claimed", 20.0, 40.0),
            claim(2, "PoolEmpty", 3000.0, 3000.0),
        ];
        assert!((claims_per_s(&claims) - 50.0).abs() < 1e-9, "2 in 40 ms");
        assert_eq!(claims_per_s(&[]), 0.0);
    }

    #[test]
    fn the_table_judges_claims_against_the_goals_on_dev_only() {
        let run = Run {
            target: "ignis dev".into(),
            simulated: false,
            pool_size: 2,
            guest_memory_mib: 64,
            cold_ms: vec![2000.0, 3000.0],
            fill_ms: 4000.0,
            warm: WarmCost {
                vms: 2,
                rss_bytes: 200 << 20,
                pss_bytes: 180 << 20,
                cpu_s: 1.0,
                window_s: 10.0,
            },
            claims: vec![
                claim(0, "Claimed", 30.0, 30.0),
                claim(1, "Claimed", 250.0, 250.0),
                claim(2, "PoolEmpty", 2500.0, 2500.0),
            ],
            refill: Some(Refill {
                replicas: 2,
                refill_ms: 3500.0,
                drained_by_hits: 2,
            }),
        };
        let dev = rows(&run, true);
        let p50 = find(&dev, "claim → Ready p50");
        assert_eq!((p50.value, p50.verdict), (30.0, Verdict::Meets));
        let p99 = find(&dev, "claim → Ready p99");
        assert_eq!((p99.value, p99.verdict), (250.0, Verdict::Misses));
        assert_eq!(find(&dev, "claims that booted cold").value, 1.0);
        assert_eq!(find(&dev, "cold boot: apply → Ready p50").value, 2000.0);
        assert_eq!(find(&dev, "warm VM: VMM RSS per VM").value, 100.0);
        assert_eq!(find(&dev, "warm VM: VMM PSS per VM").value, 90.0);
        assert!((find(&dev, "warm VM: idle CPU per VM").value - 5.0).abs() < 1e-9);
        assert_eq!(find(&dev, "refill: drained pool → all Ready").value, 3500.0);
        assert_eq!(find(&dev, "claim: status.claim.latencyMs p50").value, 15.0);
        let cluster = rows(&run, false);
        assert_eq!(find(&cluster, "claim → Ready p99").verdict, Verdict::Info);
    }

    #[test]
    fn proc_files_parse() {
        let rollup = "55a0-7ff r--p 0 0:0 0 [rollup]\nRss:              102400 kB\n\
                      Pss:               81920 kB\nPss_Anon:  1 kB\n";
        assert_eq!(parse_smaps_rollup(rollup), Some((100 << 20, 80 << 20)));
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
        let stat = "42 (qemu-system-x86 (a) b) S 7 42 42 0 -1 4194560 1 0 0 0 150 25 0 0 20";
        assert_eq!(parse_cpu_ticks(stat), Some(175));
        assert_eq!(parse_cpu_ticks("42 (x) S 1"), None);
    }
}
