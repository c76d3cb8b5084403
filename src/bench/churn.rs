//! `ignis bench churn`: create → Ready → delete → gone, over and over, on real QEMU guests;
//! then a leak check of the agent (its fds, its child processes and every process naming the
//! stack's directory, socket and other files in its state dir, tap devices on the host) that
//! fails the bench when anything is left behind.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::machine::Machine;
use super::stack::{Stack, StackOptions};
use super::stats::{Target, parse_ppid, summarize};
use super::{BenchError, Report, Row};

/// Flags of `ignis bench churn`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChurnArgs {
    /// Create/delete cycles.
    #[arg(long, default_value_t = 100)]
    pub(crate) cycles: usize,
}

impl Default for ChurnArgs {
    fn default() -> Self {
        ChurnArgs { cycles: 100 }
    }
}

/// What the agent holds on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub(crate) struct Holdings {
    pub(crate) fds: usize,
    pub(crate) processes: BTreeSet<u32>,
    pub(crate) sockets: BTreeSet<String>,
    pub(crate) files: BTreeSet<String>,
    pub(crate) net_devices: BTreeSet<String>,
}

/// What `after` holds that `before` did not, one line per kind; empty when nothing leaked.
pub(crate) fn leaks(before: &Holdings, after: &Holdings) -> Vec<String> {
    let mut out = Vec::new();
    if after.fds > before.fds {
        out.push(format!("agent fds {} → {}", before.fds, after.fds));
    }
    let new = |a: &BTreeSet<String>, b: &BTreeSet<String>| -> Vec<String> {
        b.difference(a).cloned().collect()
    };
    let procs: Vec<u32> = after
        .processes
        .difference(&before.processes)
        .copied()
        .collect();
    if !procs.is_empty() {
        out.push(format!("processes {procs:?}"));
    }
    for (kind, a, b) in [
        ("sockets", &before.sockets, &after.sockets),
        ("files", &before.files, &after.files),
        ("net devices", &before.net_devices, &after.net_devices),
    ] {
        let n = new(a, b);
        if !n.is_empty() {
            out.push(format!("{kind} {n:?}"));
        }
    }
    out
}

fn walk(dir: &Path, sockets: &mut BTreeSet<String>, files: &mut BTreeSet<String>) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            walk(&path, sockets, files);
        } else if t.is_socket() {
            sockets.insert(path.display().to_string());
        } else {
            files.insert(path.display().to_string());
        }
    }
}

/// A snapshot of what the stack's agent holds.
pub(crate) fn holdings(stack: &Stack) -> Holdings {
    let agent = stack.agent_pid();
    let fds = std::fs::read_dir(format!("/proc/{agent}/fd")).map_or(0, |d| d.count());
    let dir = stack.dir.display().to_string();
    let mut processes = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if pid == agent || pid == stack.controller_pid() {
                continue;
            }
            let child = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_ppid(&s))
                == Some(agent);
            let names_dir = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&dir))
                .unwrap_or(false);
            if child || names_dir {
                processes.insert(pid);
            }
        }
    }
    let mut sockets = BTreeSet::new();
    let mut files = BTreeSet::new();
    walk(&stack.dir.join("state"), &mut sockets, &mut files);
    let net_devices = std::fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    Holdings {
        fds,
        processes,
        sockets,
        files,
        net_devices,
    }
}

pub(crate) async fn run(
    args: &ChurnArgs,
    machine: &Machine,
    results: &Path,
) -> Result<(), BenchError> {
    println!(
        "churn: {} create → Ready → delete → gone cycles on QEMU",
        args.cycles
    );
    let stack = Stack::start(&StackOptions {
        simulated: false,
        boot_timeout: Duration::from_secs(300),
    })
    .await?;
    let outcome = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = holdings(&stack);
        let mut cycles = Vec::new();
        for i in 0..args.cycles {
            let name = format!("churn-{i}");
            let t = Instant::now();
            stack.create(&name).await?;
            stack
                .wait_for(&name, "Ready", Duration::from_secs(300), |p| {
                    p.ready.is_some()
                })
                .await?;
            stack.delete(&name).await?;
            stack
                .wait_for(&name, "deleted", Duration::from_secs(120), |p| {
                    p.gone.is_some()
                })
                .await?;
            cycles.push(t.elapsed().as_secs_f64() * 1000.0);
            if (i + 1) % 10 == 0 || i + 1 == args.cycles {
                println!(
                    "  {}/{} cycles, last {:.0} ms",
                    i + 1,
                    args.cycles,
                    cycles[i]
                );
            }
        }
        // The agent reaps and cleans up after the object is gone; give it a bounded moment.
        let deadline = Instant::now() + Duration::from_secs(20);
        let (after, left) = loop {
            let after = holdings(&stack);
            let left = leaks(&before, &after);
            if left.is_empty() || Instant::now() > deadline {
                break (after, left);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        Ok::<_, BenchError>((cycles, before, after, left))
    }
    .await;
    stack.stop(outcome.is_err()).await;
    let (cycles, before, after, left) = outcome?;

    let s = summarize(&cycles);
    let mut report = Report::new("churn", machine.clone());
    report
        .rows
        .push(Row::new("cycles", cycles.len() as f64, "", Target::None));
    for (q, v) in [
        ("p50", s.p50),
        ("p90", s.p90),
        ("max", s.max),
        ("mean", s.mean),
    ] {
        report.rows.push(
            Row::new(format!("time per cycle {q}"), v, "ms", Target::None)
                .note("create → Ready → delete → gone"),
        );
    }
    report.rows.push(Row::new(
        "agent fds before",
        before.fds as f64,
        "",
        Target::None,
    ));
    report.rows.push(Row::new(
        "agent fds after",
        after.fds as f64,
        "",
        Target::AtMost(before.fds as f64),
    ));
    report.rows.push(
        Row::new("leaked kinds", left.len() as f64, "", Target::AtMost(0.0))
            .note("processes, sockets, files, taps/net devices, fds"),
    );
    for l in &left {
        report.notes.push(format!("LEAK: {l}"));
    }
    report.data =
        serde_json::json!({ "cycle_ms": cycles, "before": before, "after": after, "leaks": left });
    report.publish(results)?;
    if !left.is_empty() {
        return Err(BenchError::Leak(left.join("; ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_holdings_are_leaks() {
        let before = Holdings {
            fds: 20,
            processes: [1].into(),
            sockets: ["/s/agent.sock".to_string()].into(),
            files: BTreeSet::new(),
            net_devices: ["lo".to_string()].into(),
        };
        let mut after = before.clone();
        after.fds = 19;
        after.processes.clear();
        assert!(leaks(&before, &after).is_empty());
        after.fds = 21;
        after.processes.insert(7);
        after.files.insert("/s/vms/x/console.log".into());
        after.net_devices.insert("ig-tap0".into());
        let l = leaks(&before, &after);
        assert_eq!(l.len(), 4, "{l:?}");
        assert!(l[0].contains("20 → 21"));
    }
}
