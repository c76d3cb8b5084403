//! Pure arithmetic of the benches: percentiles, summaries, verdicts against targets. Kept apart
//! from the I/O so every figure the tables print is a tested function of its samples.

use serde::Serialize;

/// A latency (or any sample) distribution, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Summary {
    pub(crate) n: usize,
    pub(crate) min: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

/// The `q`-quantile (0..=1) of sorted samples, nearest-rank (no interpolation, so every
/// reported figure is a value that was actually measured).
pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarise samples (any order; non-finite values are dropped).
pub(crate) fn summarize(samples: &[f64]) -> Summary {
    let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Summary::default();
    }
    Summary {
        n: v.len(),
        min: v[0],
        p50: quantile(&v, 0.50),
        p90: quantile(&v, 0.90),
        p99: quantile(&v, 0.99),
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

/// How a figure compares with its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) enum Verdict {
    Meets,
    Misses,
    /// No target (an informational figure).
    Info,
}

impl Verdict {
    pub(crate) fn word(self) -> &'static str {
        match self {
            Verdict::Meets => "ok",
            Verdict::Misses => "MISSES",
            Verdict::Info => "",
        }
    }
}

/// A target: a bound on a figure.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) enum Target {
    AtMost(f64),
    AtLeast(f64),
    None,
}

impl Target {
    pub(crate) fn judge(self, value: f64) -> Verdict {
        match self {
            Target::AtMost(t) if value <= t => Verdict::Meets,
            Target::AtLeast(t) if value >= t => Verdict::Meets,
            Target::None => Verdict::Info,
            _ => Verdict::Misses,
        }
    }

    pub(crate) fn describe(self, unit: &str) -> String {
        match self {
            Target::AtMost(t) => format!("≤ {} {unit}", trim(t)),
            Target::AtLeast(t) => format!("≥ {} {unit}", trim(t)),
            Target::None => "-".into(),
        }
    }
}

/// A number for a table: integers without decimals, others with one or two.
pub(crate) fn trim(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 && x.abs() < 1e12 {
        format!("{}", x.round() as i64)
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// `VmRSS` (bytes) from the text of `/proc/<pid>/status`.
pub(crate) fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The value of an unlabelled Prometheus sample `name` in a text exposition.
pub(crate) fn prometheus_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (metric, value) = l.rsplit_once(' ')?;
        (metric == name).then(|| value.trim().parse().ok())?
    })
}

/// The parent pid (field 4) of a `/proc/<pid>/stat` line.
pub(crate) fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) const MIB: f64 = 1024.0 * 1024.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.9), 90.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }

    #[test]
    fn summaries_sort_and_drop_non_finite() {
        let s = summarize(&[3.0, 1.0, f64::NAN, 2.0]);
        assert_eq!(s.n, 3);
        assert_eq!((s.min, s.p50, s.max, s.mean), (1.0, 2.0, 3.0, 2.0));
        assert_eq!(summarize(&[]), Summary::default());
    }

    #[test]
    fn targets_judge_both_directions() {
        assert_eq!(Target::AtMost(3.0).judge(3.0), Verdict::Meets);
        assert_eq!(Target::AtMost(3.0).judge(4.0), Verdict::Misses);
        assert_eq!(Target::AtLeast(500.0).judge(499.0), Verdict::Misses);
        assert_eq!(Target::None.judge(1.0), Verdict::Info);
        assert_eq!(Target::AtMost(15.0).describe("MiB"), "≤ 15 MiB");
    }

    #[test]
    fn numbers_print_compactly() {
        assert_eq!(trim(3.0), "3");
        assert_eq!(trim(1.23456), "1.23");
        assert_eq!(trim(27.1828), "27.2");
        assert_eq!(trim(271.828), "272");
    }

    #[test]
    fn proc_files_parse() {
        let status = "Name:\tignis\nVmPeak:\t  100 kB\nVmRSS:\t   11264 kB\n";
        assert_eq!(parse_vm_rss(status), Some(11264 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        let stat = "42 (qemu (x) y) S 7 42 42 0 -1";
        assert_eq!(parse_ppid(stat), Some(7));
    }

    #[test]
    fn prometheus_samples_are_found_by_exact_name() {
        let text = "# HELP x\nignis_controller_reconciles_total 42\n\
                    ignis_controller_reconciles_total_x 1\n";
        assert_eq!(
            prometheus_value(text, "ignis_controller_reconciles_total"),
            Some(42.0)
        );
        assert_eq!(prometheus_value(text, "missing"), None);
    }
}
