//! The controller's Prometheus metrics. Labels are fixed words (reasons, phases, constraints),
//! never free text, to keep cardinality bounded.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use crate::api::Phase;
use crate::telemetry::MetricsRegistry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub(crate) reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PhaseLabel {
    pub(crate) phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StepLabel {
    pub(crate) step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ConstraintLabel {
    pub(crate) constraint: String,
}

/// Every metric the controller exports.
#[derive(Clone)]
pub(crate) struct ControllerMetrics {
    pub(crate) reconciles: Counter,
    pub(crate) errors: Family<ReasonLabel, Counter>,
    pub(crate) duration: Histogram,
    /// Time in each step of a reconcile: where a slow reconcile waits.
    pub(crate) steps: Family<StepLabel, Histogram, fn() -> Histogram>,
    pub(crate) vms: Family<PhaseLabel, Gauge>,
    pub(crate) placement_failures: Family<ConstraintLabel, Counter>,
    pub(crate) agents_connected: Gauge,
    pub(crate) drift_removed: Counter,
    /// Claims that took a warm VM.
    pub(crate) pool_hits: Counter,
    /// Claims that booted cold, by why (`PoolEmpty`, `TemplateMismatch`, `PoolNotFound`).
    pub(crate) pool_misses: Family<ReasonLabel, Counter>,
    /// From a claim's first reconcile to its status written Ready.
    pub(crate) pool_claim_duration: Histogram,
    /// From a pool making a warm VM to that VM being Ready.
    pub(crate) pool_refill_duration: Histogram,
}

/// 1 ms .. ~16 s
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            errors: Family::default(),
            duration: duration_histogram(),
            steps: Family::new_with_constructor(duration_histogram),
            vms: Family::default(),
            placement_failures: Family::default(),
            agents_connected: Gauge::default(),
            drift_removed: Counter::default(),
            pool_hits: Counter::default(),
            pool_misses: Family::default(),
            pool_claim_duration: duration_histogram(),
            pool_refill_duration: duration_histogram(),
        }
    }
}

impl ControllerMetrics {
    /// Create the metrics and register them under `controller_`.
    pub(crate) async fn register(registry: &MetricsRegistry) -> Self {
        let m = Self::default();
        let c = m.clone();
        registry
            .register(move |r| {
                let r = r.sub_registry_with_prefix("controller");
                r.register("reconciles", "Reconciles run", c.reconciles);
                r.register("reconcile_errors", "Reconcile errors by reason", c.errors);
                r.register(
                    "reconcile_duration_seconds",
                    "Time spent in one reconcile",
                    c.duration,
                );
                r.register(
                    "reconcile_step_seconds",
                    "Time one reconcile spends in a step: place, metadata, agent, pod, status, event",
                    c.steps,
                );
                r.register("microvms", "MicroVMs in the cache by phase", c.vms);
                r.register(
                    "placement_failures",
                    "Placements that found no node, by failed constraint",
                    c.placement_failures,
                );
                r.register(
                    "agents_connected",
                    "Agents connected and synced",
                    c.agents_connected,
                );
                r.register(
                    "drift_removed_vms",
                    "VMs no MicroVM owns that were removed from agents",
                    c.drift_removed,
                );
                r.register(
                    "pool_claim_hits",
                    "Claims that took a warm VM from their pool",
                    c.pool_hits,
                );
                r.register(
                    "pool_claim_misses",
                    "Claims that booted cold, by reason",
                    c.pool_misses,
                );
                r.register(
                    "pool_claim_duration_seconds",
                    "From a claim's first reconcile to its status written Ready",
                    c.pool_claim_duration,
                );
                r.register(
                    "pool_refill_duration_seconds",
                    "From a pool making a warm VM to the VM being Ready",
                    c.pool_refill_duration,
                );
            })
            .await;
        m
    }

    /// Record the phase census of the cache.
    pub(crate) fn set_phases(&self, counts: &[(Phase, i64)]) {
        for phase in Phase::ALL {
            let n = counts
                .iter()
                .find(|(p, _)| *p == phase)
                .map_or(0, |(_, n)| *n);
            self.vms
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str().to_string(),
                })
                .set(n);
        }
    }

    pub(crate) fn error(&self, reason: &str) {
        self.errors
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Record how long one step of a reconcile took.
    pub(crate) fn step(&self, step: &str, took: std::time::Duration) {
        self.steps
            .get_or_create(&StepLabel {
                step: step.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub(crate) fn pool_miss(&self, reason: &str) {
        self.pool_misses
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub(crate) fn placement_failure(&self, constraint: &str) {
        self.placement_failures
            .get_or_create(&ConstraintLabel {
                constraint: constraint.to_string(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_are_exported_with_fixed_labels() {
        let registry = MetricsRegistry::with_prefix("ignis");
        let m = ControllerMetrics::register(&registry).await;
        m.reconciles.inc();
        m.error("AgentRpc");
        m.placement_failure("capacity");
        m.set_phases(&[(Phase::Running, 3)]);
        m.duration.observe(0.02);
        m.step("agent", std::time::Duration::from_millis(3));
        m.pool_hits.inc();
        m.pool_miss("PoolEmpty");
        m.pool_claim_duration.observe(0.004);
        let text = registry.encode().await;
        for needle in [
            "ignis_controller_reconciles_total 1",
            "ignis_controller_reconcile_errors_total{reason=\"AgentRpc\"} 1",
            "ignis_controller_placement_failures_total{constraint=\"capacity\"} 1",
            "ignis_controller_microvms{phase=\"Running\"} 3",
            "ignis_controller_microvms{phase=\"Pending\"} 0",
            "ignis_controller_reconcile_duration_seconds_count 1",
            "ignis_controller_agents_connected 0",
            "ignis_controller_reconcile_step_seconds_count{step=\"agent\"} 1",
            "ignis_controller_pool_claim_hits_total 1",
            "ignis_controller_pool_claim_misses_total{reason=\"PoolEmpty\"} 1",
            "ignis_controller_pool_claim_duration_seconds_count 1",
            "ignis_controller_pool_refill_duration_seconds_count 0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
