//! Housekeeping every few seconds: drift repair (VMs no MicroVM owns are removed from their
//! agent after a grace period), the per-phase gauges, and in pod mode the node labels.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use tokio_util::sync::CancellationToken;

use crate::api::Phase;
use crate::error::ErrorReason;
use crate::vm::{HostInfo, VmUid};

use super::decide::AgentLink;
use super::nodelabels::{self, AgentState};

use super::reconcile::Context;

/// Every few seconds: remove VMs no MicroVM owns (after a grace period), and refresh the
/// gauges. Waits for the cache first, or everything would look orphaned.
pub(super) async fn housekeeping(
    ctx: Arc<Context>,
    drift_grace: Duration,
    cache_ready: CancellationToken,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = cache_ready.cancelled() => {}
    }
    let mut orphans: HashMap<VmUid, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let state = ctx.store.state();
        // A claimed warm VM keeps the id it was made with: its claimant owns it by that id.
        let owned: HashSet<String> = state
            .iter()
            .flat_map(|o| [o.uid(), Some(super::identity::of(o).vm_uid)])
            .flatten()
            .collect();
        let mut census: HashMap<Phase, i64> = HashMap::new();
        for obj in &state {
            let phase = obj
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(Phase::Pending);
            *census.entry(phase).or_default() += 1;
        }
        ctx.metrics
            .set_phases(&census.into_iter().collect::<Vec<_>>());
        ctx.metrics
            .agents_connected
            .set(ctx.pool.connected() as i64);
        super::pools::sweep(&ctx).await;

        for (node, uid) in drift_due(&ctx.pool.held_vms(), &owned, &mut orphans, drift_grace) {
            tracing::warn!(%node, %uid, "removing a VM no MicroVM owns (drift repair)");
            ctx.metrics.drift_removed.inc();
            let pool = ctx.pool.clone();
            // A claimed VM whose claimant is gone answers only to that claimant's uid.
            let owner = pool.vm(&node, uid.as_str()).and_then(|vm| vm.owner);
            tokio::spawn(async move {
                if let Err(error) = pool
                    .delete_vm(&node, &uid, owner.as_ref(), Duration::from_secs(30))
                    .await
                {
                    tracing::warn!(%node, %uid, reason = error.reason(), %error, "drift repair failed");
                }
            });
        }
    }
}

/// Pod mode, every few seconds: bring each node's Ignis labels in line with its agent (see
/// `nodelabels`). It needs only the agents and the Nodes, so it does not wait for the MicroVM
/// cache as housekeeping does: no VM pod can be placed before its node is labelled.
pub(super) async fn node_labels(ctx: Arc<Context>, shutdown: CancellationToken) {
    let Some(nodes) = ctx.node_meta.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        sync_node_labels(&ctx, &nodes).await;
    }
}

async fn sync_node_labels(ctx: &Context, nodes: &Store<PartialObjectMeta<Node>>) {
    let hosts: HashMap<String, HostInfo> = ctx.pool.hosts().into_iter().collect();
    let api: Api<Node> = Api::all(ctx.client.clone());
    for node in nodes.state() {
        let name = node.name_any();
        let state = match hosts.get(&name) {
            Some(host) => AgentState::Connected(host),
            None if ctx.pool.link(&name) == AgentLink::Absent => AgentState::Gone,
            None => AgentState::Unsure,
        };
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let Some(patch) = nodelabels::patch(&labels, state) else {
            continue;
        };
        if let Err(error) = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            tracing::warn!(node = %name, %error, "cannot update the node's Ignis labels");
        }
    }
}

/// Drift repair's decision: which held VMs (`(node, uid)`) no MicroVM owns and have been
/// orphaned for `grace`. `orphans` remembers when each was first seen unowned; entries that
/// became owned or are no longer held are forgotten, and returned VMs are dropped from it.
pub(super) fn drift_due(
    held: &[(String, VmUid)],
    owned: &HashSet<String>,
    orphans: &mut HashMap<VmUid, Instant>,
    grace: Duration,
) -> Vec<(String, VmUid)> {
    let held_uids: HashSet<&VmUid> = held.iter().map(|(_, u)| u).collect();
    orphans.retain(|uid, _| held_uids.contains(uid) && !owned.contains(uid.as_str()));
    let mut due = Vec::new();
    for (node, uid) in held {
        if owned.contains(uid.as_str()) {
            continue;
        }
        let since = *orphans.entry(uid.clone()).or_insert_with(Instant::now);
        if since.elapsed() >= grace {
            orphans.remove(uid);
            due.push((node.clone(), uid.clone()));
        }
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_removes_only_unowned_vms_after_the_grace_period() {
        let uid = |s: &str| VmUid::new(s).expect("uid");
        let held = vec![
            ("node-a".to_string(), uid("owned")),
            ("node-a".to_string(), uid("orphan")),
        ];
        let owned = HashSet::from(["owned".to_string()]);
        let mut orphans = HashMap::new();
        // First sighting: remembered, not removed yet.
        assert!(drift_due(&held, &owned, &mut orphans, Duration::from_secs(30)).is_empty());
        assert!(orphans.contains_key("orphan"));
        // Seen long enough ago: removed, and forgotten.
        orphans.insert(uid("orphan"), Instant::now() - Duration::from_secs(31));
        assert_eq!(
            drift_due(&held, &owned, &mut orphans, Duration::from_secs(30)),
            vec![("node-a".to_string(), uid("orphan"))]
        );
        assert!(orphans.is_empty());
        // An orphan whose MicroVM shows up (cache lag) is forgiven.
        drift_due(&held, &owned, &mut orphans, Duration::from_secs(30));
        let owned_now = HashSet::from(["owned".to_string(), "orphan".to_string()]);
        assert!(drift_due(&held, &owned_now, &mut orphans, Duration::ZERO).is_empty());
        assert!(orphans.is_empty());
    }
}
