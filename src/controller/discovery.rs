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
/// Label selecting the controller pods.
pub const CONTROLLER_SELECTOR: &str = "app.kubernetes.io/name=ignis-controller";

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
    .default_backoff();
    let mut stream = std::pin::pin!(stream);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = stream.next() => n,
        };
        match next {
            None => return,
            Some(Err(error)) => tracing::warn!(%error, "agent pod watch failed; retrying"),
            Some(Ok(event)) if store_is_current(&event) => {
                let pods = reader.state();
                let endpoints = endpoints_from_pods(pods.iter().map(|p| &**p), port);
                tracing::debug!(agents = endpoints.len(), "agent pods changed");
                pool.set_agents(&endpoints);
            }
            Some(Ok(_)) => {}
        }
    }
}

/// Whether the reflector's store is whole after `event`. During a (re)list it fills a buffer
/// that replaces the store only at `InitDone`: reading it at `InitApply` would see nothing,
/// and a controller started beside a steady agent pod would never dial it.
fn store_is_current(event: &watcher::Event<Pod>) -> bool {
    matches!(
        event,
        watcher::Event::InitDone | watcher::Event::Apply(_) | watcher::Event::Delete(_)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::decide::AgentLink;
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

    #[tokio::test]
    async fn a_steady_agent_pod_is_dialed_at_start() {
        // A unit-test double of kube-apiserver: the list (as a real apiserver answers it)
        // returns one running agent pod, then the watch stays open with nothing new, which is
        // what a controller replacing a lost leader sees.
        use http::{Request, Response};
        use kube::client::Body;
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let shutdown = CancellationToken::new();
        // No grace: a node the pool does not know is Absent at once, one it dials is Lost (not
        // yet connected), so the two are told apart without waiting.
        let (pool, _signals) = AgentPool::new(
            std::time::Duration::ZERO,
            std::time::Duration::from_secs(30),
            None,
            shutdown.clone(),
        );
        tokio::spawn(watch_agent_pods(
            client,
            Some("ignis-system".into()),
            9443,
            pool.clone(),
            shutdown.clone(),
        ));
        let (request, respond) = handle.next_request().await.expect("list");
        assert!(
            request
                .uri()
                .query()
                .unwrap_or_default()
                .contains("labelSelector")
        );
        let list = serde_json::json!({
            "apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "5"},
            "items": [serde_json::to_value(pod("agent-x", "node-a", "Running", "10.0.0.1"))
                .expect("pod")],
        });
        respond.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&list).expect("json")))
                .expect("response"),
        );
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while matches!(pool.link("node-a"), AgentLink::Absent) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent pod listed at start was never dialed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        shutdown.cancel();
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
