//! What the node offers and what its processes are: capacity from `/proc`, and the
//! `/proc/<pid>/stat` reading that tells a live VMM from a dead one (or from a stranger that
//! reused its pid after an agent restart).

use std::path::Path;

use thiserror::Error;

/// Errors reading the host's capacity.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum HostError {
    #[error("cannot read {path}")]
    #[strum(serialize = "HostReadFailed")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {field} line")]
    #[strum(serialize = "HostParseFailed")]
    Parse { path: String, field: &'static str },
}

/// The node's total capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HostCapacity {
    pub(crate) vcpus: u32,
    pub(crate) memory_bytes: u64,
}

impl HostCapacity {
    /// Read `/proc/cpuinfo` and `/proc/meminfo`.
    pub(crate) fn read() -> Result<Self, HostError> {
        let read = |path: &str| {
            std::fs::read_to_string(path).map_err(|source| HostError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let cpuinfo = read("/proc/cpuinfo")?;
        let meminfo = read("/proc/meminfo")?;
        let memory_bytes = parse_mem_total(&meminfo).ok_or(HostError::Parse {
            path: "/proc/meminfo".into(),
            field: "MemTotal",
        })?;
        let vcpus = match parse_cpu_count(&cpuinfo) {
            0 => std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1),
            n => n,
        };
        Ok(Self {
            vcpus,
            memory_bytes,
        })
    }
}

/// `MemTotal:  24684524 kB` → bytes.
pub(crate) fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemTotal:")?;
        let mut parts = rest.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        let factor = match parts.next() {
            Some("kB") | Some("KB") => 1024,
            None => 1,
            Some(_) => return None,
        };
        value.checked_mul(factor)
    })
}

/// The number of `processor` lines.
pub(crate) fn parse_cpu_count(cpuinfo: &str) -> u32 {
    let n = cpuinfo
        .lines()
        .filter(|l| {
            l.split(':')
                .next()
                .is_some_and(|key| key.trim() == "processor")
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The two fields of `/proc/<pid>/stat` that matter to a supervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// `R`, `S`, `Z`, ...
    pub(crate) state: char,
    /// Field 22: start time in clock ticks since boot.
    pub(crate) start_time_ticks: u64,
}

/// Parse `/proc/<pid>/stat`. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted from the last `)`.
pub(crate) fn parse_proc_stat(stat: &str) -> Option<ProcStat> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // Fields after the name start at field 3 (state); start time is field 22.
    let state = fields.next()?.chars().next()?;
    let start_time_ticks = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat {
        state,
        start_time_ticks,
    })
}

/// Read `/proc/<pid>/stat`; `None` when the process does not exist.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    parse_proc_stat(&text)
}

/// Whether `pid` is still the process that started at `start_time_ticks` and has not ended
/// (a zombie has ended: it only waits for its parent to reap it).
pub(crate) fn is_same_live_process(pid: u32, start_time_ticks: u64) -> bool {
    is_live(proc_stat(pid), start_time_ticks)
}

/// The decision behind [`is_same_live_process`], on an already-read stat.
pub(crate) fn is_live(stat: Option<ProcStat>, start_time_ticks: u64) -> bool {
    match stat {
        Some(stat) => {
            stat.start_time_ticks == start_time_ticks && !matches!(stat.state, 'Z' | 'X' | 'x')
        }
        None => false,
    }
}

/// This machine's host name, for the default node name.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_in_kib_becomes_bytes() {
        let meminfo = "MemTotal:       24684524 kB\nMemFree:        24000000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(24_684_524 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: x kB\n"), None);
    }

    #[test]
    fn cpu_count_counts_processor_lines_only() {
        let cpuinfo = "processor\t: 0\nmodel name\t: x\n\nprocessor\t: 1\nmodel name\t: x\n";
        assert_eq!(parse_cpu_count(cpuinfo), 2);
        assert_eq!(parse_cpu_count(""), 0);
    }

    #[test]
    fn proc_stat_survives_odd_command_names() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 3 0 987654 123456 789 18446744073709551615";
        assert_eq!(
            parse_proc_stat(stat),
            Some(ProcStat {
                state: 'S',
                start_time_ticks: 987_654
            })
        );
        assert_eq!(parse_proc_stat("garbage"), None);
    }

    #[test]
    fn liveness_needs_same_start_time_and_no_zombie() {
        let running = Some(ProcStat {
            state: 'S',
            start_time_ticks: 10,
        });
        assert!(is_live(running, 10));
        assert!(!is_live(running, 11), "a reused pid is not our VMM");
        let zombie = Some(ProcStat {
            state: 'Z',
            start_time_ticks: 10,
        });
        assert!(!is_live(zombie, 10));
        assert!(!is_live(None, 10));
    }

    #[test]
    fn this_process_is_alive_by_its_own_start_time() {
        let me = std::process::id();
        let stat = proc_stat(me).expect("own stat");
        assert!(is_same_live_process(me, stat.start_time_ticks));
        assert!(HostCapacity::read().expect("capacity").memory_bytes > 0);
    }
}
