//! What `ignis bench soak` samples, and its verdict: the agent's fds by kind, RSS, threads,
//! the processes it holds (its children, and every process naming the stack's directory),
//! Ignis taps on the host, VM state directories, the API's MicroVMs and Events, and the
//! agent's own `agent_vmm_watchers` gauge. The verdict is pure: a sample after the workload
//! is removed against the baseline, each figure within its tolerance.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::stats::parse_ppid;
use crate::agent::open_fds::{self, FdKind};

/// One look at the stack.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the bench started.
    pub(crate) t_s: f64,
    /// `baseline`, `load`, `quiesce` or `after`.
    pub(crate) phase: String,
    pub(crate) agent_pid: u32,
    pub(crate) fds: BTreeMap<String, u64>,
    pub(crate) rss_bytes: u64,
    pub(crate) threads: u64,
    /// Children of the agent and processes naming the stack's directory (VMMs, dnsmasq).
    pub(crate) processes: u64,
    pub(crate) taps: u64,
    /// Directories under the agent's `vms/` (one per VM it holds).
    pub(crate) state_dirs: u64,
    pub(crate) microvms: u64,
    pub(crate) events: u64,
    /// The agent's `agent_vmm_watchers` (all labels); `None` when /metrics did not answer.
    pub(crate) watchers: Option<f64>,
}

/// The figures an agent process shows in `/proc`: fds by kind, RSS, threads.
pub(crate) fn agent_figures(pid: u32, sample: &mut Sample) {
    sample.agent_pid = pid;
    sample.fds = open_fds::count(Some(pid))
        .into_iter()
        .map(|(k, n)| (k.as_str().to_owned(), n))
        .collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    sample.rss_bytes = super::stats::parse_vm_rss(&status).unwrap_or(0);
    sample.threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
}

/// Live processes that are children of `agent`, or name `dir` on their command line (a VMM
/// re-adopted by a restarted agent is nobody's child of ours), but neither `skip`.
pub(crate) fn held_processes(agent: u32, dir: &Path, skip: &[u32]) -> u64 {
    let dir = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != agent && !skip.contains(pid))
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // A zombie holds nothing but its pid; the agent reaps it.
            let live = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|s| s != "Z" && s != "X");
            let child = parse_ppid(&stat) == Some(agent);
            let names_dir = std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&dir));
            live && (child || names_dir)
        })
        .count() as u64
}

/// Links on the host with the shape of an Ignis tap.
pub(crate) fn ignis_taps() -> u64 {
    std::fs::read_dir("/sys/class/net").map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                crate::agent::net::tap::looks_like_tap_name(&e.file_name().to_string_lossy())
            })
            .count() as u64
    })
}

/// Subdirectories of `dir`.
pub(crate) fn subdirs(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count() as u64
    })
}

/// The sum of every sample of `name` (any labels) in a Prometheus text exposition.
pub(crate) fn prometheus_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((metric, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let bare = metric.split('{').next().unwrap_or(metric);
        if bare == name
            && let Ok(v) = value.trim().parse::<f64>()
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// One figure's verdict: the baseline, the value once the workload is gone, its bound.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Check {
    pub(crate) figure: String,
    pub(crate) baseline: f64,
    pub(crate) peak: f64,
    pub(crate) after: f64,
    pub(crate) bound: f64,
    pub(crate) unit: String,
}

impl Check {
    pub(crate) fn holds(&self) -> bool {
        self.after <= self.bound
    }
}

/// RSS may exceed the baseline by this fraction plus [`RSS_SLACK_BYTES`]: the allocator keeps
/// some freed pages (glibc arenas per worker thread), so RSS never returns to the byte. A
/// leak of one VMM's worth of state per run (a few KiB) over the default run stays inside it;
/// the longer documented run (hundreds of runs) does not.
pub(crate) const RSS_SLACK_FRACTION: f64 = 0.10;
pub(crate) const RSS_SLACK_BYTES: f64 = 4.0 * 1024.0 * 1024.0;

/// Every figure of `after` against `baseline` (with the `peak` seen under load). Counts of
/// things (fds of each kind, threads, processes, taps, state dirs, MicroVMs, watchers) must
/// be back at the baseline exactly: each is a resource the workload created and must have
/// released. Events are left out: the API keeps them by design (Kubernetes ages them out).
pub(crate) fn checks(baseline: &Sample, samples: &[Sample], after: &Sample) -> Vec<Check> {
    let peak = |f: &dyn Fn(&Sample) -> f64| samples.iter().map(f).fold(f64::MIN, f64::max);
    let mut out = Vec::new();
    let mut exact = |figure: &str, f: &dyn Fn(&Sample) -> f64| {
        out.push(Check {
            figure: figure.to_owned(),
            baseline: f(baseline),
            peak: peak(f).max(f(after)),
            after: f(after),
            bound: f(baseline),
            unit: String::new(),
        });
    };
    for kind in [
        FdKind::Pidfd,
        FdKind::Socket,
        FdKind::Pipe,
        FdKind::AnonInode,
        FdKind::File,
    ] {
        let key = kind.as_str();
        exact(&format!("agent fds: {key}"), &|s: &Sample| {
            s.fds.get(key).copied().unwrap_or(0) as f64
        });
    }
    exact("agent threads", &|s: &Sample| s.threads as f64);
    exact("processes held", &|s: &Sample| s.processes as f64);
    exact("Ignis taps", &|s: &Sample| s.taps as f64);
    exact("VM state dirs", &|s: &Sample| s.state_dirs as f64);
    exact("MicroVMs in the API", &|s: &Sample| s.microvms as f64);
    exact("agent_vmm_watchers", &|s: &Sample| {
        s.watchers.unwrap_or(0.0)
    });
    let rss = |s: &Sample| s.rss_bytes as f64 / (1024.0 * 1024.0);
    out.push(Check {
        figure: "agent RSS".into(),
        baseline: rss(baseline),
        peak: peak(&rss).max(rss(after)),
        after: rss(after),
        bound: rss(baseline) * (1.0 + RSS_SLACK_FRACTION) + RSS_SLACK_BYTES / (1024.0 * 1024.0),
        unit: "MiB".into(),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pidfds: u64, rss_mib: u64, microvms: u64) -> Sample {
        Sample {
            fds: [("pidfd".to_string(), pidfds), ("socket".to_string(), 9)].into(),
            rss_bytes: rss_mib << 20,
            threads: 5,
            microvms,
            watchers: Some(pidfds as f64),
            ..Sample::default()
        }
    }

    #[test]
    fn counts_must_come_back_exactly_and_rss_within_its_slack() {
        let baseline = sample(1, 20, 0);
        let load = vec![sample(4, 40, 3)];
        let flat = checks(&baseline, &load, &sample(1, 22, 0));
        assert!(flat.iter().all(Check::holds), "{flat:?}");
        let rss = flat.iter().find(|c| c.figure == "agent RSS").expect("rss");
        assert_eq!((rss.peak, rss.bound), (40.0, 26.0));

        let leaked = checks(&baseline, &load, &sample(2, 27, 1));
        let failed: Vec<&str> = leaked
            .iter()
            .filter(|c| !c.holds())
            .map(|c| c.figure.as_str())
            .collect();
        assert_eq!(
            failed,
            [
                "agent fds: pidfd",
                "MicroVMs in the API",
                "agent_vmm_watchers",
                "agent RSS"
            ]
        );
    }

    #[test]
    fn labelled_samples_are_summed() {
        let text = "# HELP ignis_agent_vmm_watchers x\n\
                    ignis_agent_vmm_watchers{by=\"wait\"} 2\n\
                    ignis_agent_vmm_watchers{by=\"proc\"} 1\n\
                    ignis_agent_vmm_watchers_other 7\n";
        assert_eq!(prometheus_sum(text, "ignis_agent_vmm_watchers"), Some(3.0));
        assert_eq!(prometheus_sum(text, "ignis_nothing"), None);
    }

    #[test]
    fn this_process_has_threads_rss_and_fds() {
        let mut s = Sample::default();
        agent_figures(std::process::id(), &mut s);
        assert!(
            s.threads >= 1 && s.rss_bytes > 0 && s.fds.values().sum::<u64>() > 0,
            "{s:?}"
        );
    }
}
