//! The agent's own open file descriptors by kind, read from `/proc/self/fd` at every scrape:
//! the gauge that shows a leak class (a pidfd per VMM never reaped, a socket per probe never
//! closed) in production before the process runs out of descriptors.

use std::collections::BTreeMap;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

/// What an open descriptor is, from its `/proc/<pid>/fd/<n>` link. Fixed words, so the label
/// has a bounded set of values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub(crate) enum FdKind {
    /// `anon_inode:[pidfd]`: tokio holds one per child process until it is reaped.
    Pidfd,
    Socket,
    Pipe,
    /// `anon_inode:[eventfd]`, `[eventpoll]`, `[timerfd]`, `[signalfd]`...: the runtime's own.
    AnonInode,
    /// A path: a regular file, a directory, a device (`/dev/kvm`, `/dev/net/tun`).
    File,
}

impl FdKind {
    /// The kind of the descriptor whose link reads `target`.
    pub(crate) fn of_link(target: &str) -> FdKind {
        if target == "anon_inode:[pidfd]" {
            FdKind::Pidfd
        } else if target.starts_with("socket:[") {
            FdKind::Socket
        } else if target.starts_with("pipe:[") {
            FdKind::Pipe
        } else if target.starts_with("anon_inode:") {
            FdKind::AnonInode
        } else {
            FdKind::File
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Open descriptors of process `pid` (`None`: this process) by kind; empty when `/proc`
/// cannot be read. Every kind is present, zero or not, so a series never disappears.
pub(crate) fn count(pid: Option<u32>) -> BTreeMap<FdKind, u64> {
    let dir = match pid {
        Some(pid) => format!("/proc/{pid}/fd"),
        None => "/proc/self/fd".to_owned(),
    };
    let mut counts: BTreeMap<FdKind, u64> = [
        FdKind::Pidfd,
        FdKind::Socket,
        FdKind::Pipe,
        FdKind::AnonInode,
        FdKind::File,
    ]
    .into_iter()
    .map(|k| (k, 0))
    .collect();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    for entry in entries.flatten() {
        // The directory's own descriptor is gone by the time its link is read.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            *counts
                .entry(FdKind::of_link(&target.to_string_lossy()))
                .or_default() += 1;
        }
    }
    counts
}

/// `agent_open_fds{kind}`, computed at each scrape.
#[derive(Debug, Default)]
pub(crate) struct OpenFdsCollector;

impl Collector for OpenFdsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let family = Family::<Vec<(String, String)>, Gauge>::default();
        for (kind, n) in count(None) {
            family
                .get_or_create(&vec![("kind".to_owned(), kind.as_str().to_owned())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let metric = encoder.encode_descriptor(
            "agent_open_fds",
            "File descriptors open in the agent's process, by kind (pidfd, socket, pipe, anon_inode, file)",
            None,
            family.metric_type(),
        )?;
        family.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_classified_into_fixed_kinds() {
        assert_eq!(FdKind::of_link("anon_inode:[pidfd]"), FdKind::Pidfd);
        assert_eq!(FdKind::of_link("socket:[123]"), FdKind::Socket);
        assert_eq!(FdKind::of_link("pipe:[9]"), FdKind::Pipe);
        assert_eq!(FdKind::of_link("anon_inode:[eventpoll]"), FdKind::AnonInode);
        assert_eq!(FdKind::of_link("/dev/null"), FdKind::File);
        assert_eq!(FdKind::Pidfd.as_str(), "pidfd");
        assert_eq!(FdKind::AnonInode.as_str(), "anon_inode");
    }

    #[tokio::test]
    async fn another_process_is_counted_by_kind() {
        // A child whose descriptors are known: stdin and stderr /dev/null, stdout a pipe.
        // (This process's own count moves with every test running beside this one.)
        let mut child = tokio::process::Command::new("sleep")
            .arg("5")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let counts = count(child.id());
        child.kill().await.expect("kill");
        // At least: a test running beside this one may have a descriptor without CLOEXEC
        // open at the fork.
        assert!(counts[&FdKind::Pipe] >= 1, "{counts:?}");
        assert!(counts[&FdKind::File] >= 2, "{counts:?}");
        assert_eq!(counts.len(), 5, "every kind is reported: {counts:?}");
        assert!(count(Some(u32::MAX)).is_empty(), "no such process");
    }
}
