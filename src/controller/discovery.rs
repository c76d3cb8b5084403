//! Which agents exist. In a cluster: the agent DaemonSet's pods (label
//! `app.kubernetes.io/name=ignis-agent`), each a node name and a pod IP (the agent uses the
//! host network, so that is the node's address). In `ignis dev`: a static list.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::agents::{AgentEndpoint, AgentPool};

/// Label selecting the agent pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=ignis-agent";

/// Agent endpoints from the agent pods: one per node, only pods that run and have an address.
/// When a node briefly has two pods (rolling update), the running one with the newest name
/// order wins, so the answer is deterministic.
pub fn endpoints_from_pods<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    port: u16,
) -> BTreeMap<String, AgentEndpoint> {
    let mut out: BTreeMap<String, (String, AgentEndpoint)> = BTreeMap::new();
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let Some(status) = pod.status.as_ref() else {
            continue;
        };
        if status.phase.as_deref() != Some("Running") {
            continue;
        }
        let Some(ip) = status.pod_ip.clone().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        let name = pod.metadata.name.clone().unwrap_or_default();
        let endpoint = AgentEndpoint::Tcp { host: ip, port };
        match out.get(&node) {
            Some((existing, _)) if existing >= &name => {}
            _ => {
                out.insert(node, (name, endpoint));
            }
        }
    }
    out.into_iter().map(|(n, (_, e))| (n, e)).collect()
}

/// Watch agent pods and keep the pool in step until `shutdown`.
pub async fn watch_agent_pods(
    client: Client,
    namespace: Option<String>,
    port: u16,
    pool: AgentPool,
    shutdown: CancellationToken,
) {
    let api: Api<Pod> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default().labels(AGENT_SELECTOR)),
    )
    .default_backoff()
    .touched_objects();
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = stream.next() => n,
        };
        match next {
            None => return,
            Some(Err(error)) => tracing::warn!(%error, "agent pod watch failed; retrying"),
            Some(Ok(_)) => {
                let pods = reader.state();
                pool.set_agents(&endpoints_from_pods(pods.iter().map(|p| &**p), port));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use kube::api::ObjectMeta;

    fn pod(name: &str, node: &str, phase: &str, ip: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.to_string()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.to_string()),
                pod_ip: Some(ip.to_string()),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn running_pods_with_an_address_become_endpoints() {
        let pods = [
            pod("agent-a", "node-a", "Running", "10.0.0.1"),
            pod("agent-b", "node-b", "Pending", "10.0.0.2"),
            pod("agent-c", "node-c", "Running", ""),
        ];
        let eps = endpoints_from_pods(pods.iter(), 9443);
        assert_eq!(
            eps,
            BTreeMap::from([(
                "node-a".to_string(),
                AgentEndpoint::Tcp {
                    host: "10.0.0.1".to_string(),
                    port: 9443
                }
            )])
        );
    }

    #[test]
    fn one_endpoint_per_node_and_deleting_pods_are_skipped() {
        let mut old = pod("agent-1", "node-a", "Running", "10.0.0.1");
        let new = pod("agent-2", "node-a", "Running", "10.0.0.9");
        let eps = endpoints_from_pods([&old, &new], 1);
        assert_eq!(
            eps["node-a"],
            AgentEndpoint::Tcp {
                host: "10.0.0.9".to_string(),
                port: 1
            }
        );
        old.metadata.deletion_timestamp = Some(crate::controller::fixtures::at(1));
        assert!(endpoints_from_pods([&old], 1).is_empty());
    }
}
