//! What the agent tells: sequenced VM events for `WatchVMs` and the metrics kept in step
//! with them.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::broadcast;

use crate::telemetry::MetricsRegistry;
use crate::vm::{RunState, SequencedEvent, VmEvent, VmUid};

/// Capacity of the event hub; a watcher that falls further behind gets a fresh snapshot.
const HUB_CAPACITY: usize = 4096;

/// The agent's metrics.
#[derive(Clone)]
pub(crate) struct AgentMetrics {
    pub(super) vms: Family<Vec<(String, String)>, Gauge>,
    pub(super) boots: Counter,
    pub(super) boot_failures: Family<Vec<(String, String)>, Counter>,
    pub(super) apply_to_ready: Histogram,
    /// Tasks watching a VMM for its end, by how (`wait`: our child, reaped, holding a pidfd;
    /// `proc`: re-adopted, polled in `/proc`). More than the VMs holding a run is a leak.
    pub(super) vmm_watchers: Family<Vec<(String, String)>, Gauge>,
    /// Suspends and resumes, by outcome.
    pub(super) snapshots: Family<Vec<(String, String)>, Counter>,
}

impl AgentMetrics {
    /// Create and register the agent's metrics.
    pub(crate) async fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            vms: Family::default(),
            boots: Counter::default(),
            boot_failures: Family::default(),
            apply_to_ready: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            vmm_watchers: Family::default(),
            snapshots: Family::default(),
        };
        let m = metrics.clone();
        registry
            .register(move |r| {
                r.register("agent_vms", "VMs held by this agent, by state", m.vms);
                r.register("agent_boots", "VMM processes started", m.boots);
                r.register(
                    "agent_boot_failures",
                    "VMs that failed to be created or booted, by reason",
                    m.boot_failures,
                );
                r.register(
                    "agent_apply_to_ready_seconds",
                    "Time from ApplyVM to a ready guest",
                    m.apply_to_ready,
                );
                r.register(
                    "agent_vmm_watchers",
                    "Live tasks watching a VMM for its end, by how (wait: a child reaped through its pidfd; proc: a re-adopted VMM polled in /proc)",
                    m.vmm_watchers,
                );
                r.register(
                    "agent_snapshots",
                    "Suspends and resumes, by outcome (saved, refused, failed, restored, unrestorable)",
                    m.snapshots,
                );
                r.register_collector(Box::new(crate::agent::open_fds::OpenFdsCollector));
            })
            .await;
        metrics
    }

    pub(super) fn boot_failed(&self, reason: &str) {
        self.boot_failures
            .get_or_create(&vec![("reason".to_owned(), reason.to_owned())])
            .inc();
    }

    pub(super) fn snapshot(&self, outcome: &str) {
        self.snapshots
            .get_or_create(&vec![("outcome".to_owned(), outcome.to_owned())])
            .inc();
    }

    /// Count a VMM watcher (`by`: `wait` or `proc`) for as long as the guard lives.
    pub(super) fn watching(&self, by: &'static str) -> Watching {
        let gauge = self
            .vmm_watchers
            .get_or_create(&vec![("by".to_owned(), by.to_owned())])
            .clone();
        gauge.inc();
        Watching(gauge)
    }

    pub(super) fn phase_gauge(&self, phase: RunState) -> Gauge {
        self.vms
            .get_or_create(&vec![("state".to_owned(), phase.as_str().to_owned())])
            .clone()
    }
}

/// One live VMM watcher in `agent_vmm_watchers`; moved into the watcher's task, so the gauge
/// falls whichever way the task ends (the VMM's end, the agent's shutdown, a panic).
pub(super) struct Watching(Gauge);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Sequenced VM events for `WatchVMs`, and the per-state gauge kept in step with them.
pub(super) struct EventHub {
    pub(super) tx: broadcast::Sender<SequencedEvent>,
    pub(super) state: Mutex<HubState>,
}

#[derive(Default)]
pub(super) struct HubState {
    pub(super) sequence: u64,
    pub(super) states: HashMap<VmUid, RunState>,
}

impl EventHub {
    pub(super) fn new() -> Self {
        Self {
            tx: broadcast::channel(HUB_CAPACITY).0,
            state: Mutex::new(HubState::default()),
        }
    }

    pub(super) fn publish(
        &self,
        event: VmEvent,
        uid: &VmUid,
        phase: Option<RunState>,
        metrics: &AgentMetrics,
    ) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.sequence += 1;
        let old = match phase {
            Some(phase) => state.states.insert(uid.clone(), phase),
            None => state.states.remove(uid),
        };
        if old != phase {
            if let Some(old) = old {
                metrics.phase_gauge(old).dec();
            }
            if let Some(new) = phase {
                metrics.phase_gauge(new).inc();
            }
        }
        // No receivers is fine: nobody watches yet.
        let _ = self.tx.send(SequencedEvent {
            sequence: state.sequence,
            event,
        });
    }

    pub(super) fn subscribe(&self) -> (broadcast::Receiver<SequencedEvent>, u64) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (self.tx.subscribe(), state.sequence)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_scrape_shows_open_fds_by_kind_and_live_vmm_watchers() {
        let registry = MetricsRegistry::with_prefix("ignis");
        let metrics = AgentMetrics::register(&registry).await;
        let watching = metrics.watching("wait");
        let text = registry.encode().await;
        assert!(
            text.contains("ignis_agent_vmm_watchers{by=\"wait\"} 1"),
            "{text}"
        );
        for kind in ["pidfd", "socket", "pipe", "anon_inode", "file"] {
            assert!(
                text.contains(&format!("ignis_agent_open_fds{{kind=\"{kind}\"}} ")),
                "{kind}: {text}"
            );
        }
        drop(watching);
        let text = registry.encode().await;
        assert!(
            text.contains("ignis_agent_vmm_watchers{by=\"wait\"} 0"),
            "the watcher's end lowers the gauge: {text}"
        );
    }
}
