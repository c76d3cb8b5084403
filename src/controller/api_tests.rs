//! API-interaction tests: `reconcile` against a mock Kubernetes API (tower-test, the kube-rs
//! controller-rs `ApiServerVerifier` pattern) and a fake agent (a unit-test double of the
//! gRPC service) on a real unix socket. They check the exact requests the controller sends:
//! the metadata patch, the status apply body and its `fieldManager`/`force`, the Events, and
//! the agent calls.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use kube::runtime::reflector;
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::agents::{AgentEndpoint, AgentPool};
use super::decide::AgentLink;
use super::events::{EventRecorder, Reporter};
use super::fixtures::{deleting, microvm, placed};
use super::metrics::ControllerMetrics;
use super::scheduler::PlacementStrategy;
use super::{Context, NodeLabels, reconcile};
use crate::api::{FIELD_MANAGER, FINALIZER, MicroVM, MicroVMPool, NODE_LABEL};
use crate::error::ErrorReason;
use crate::testing::fake_agent::{Calls, serve_fake_agent};
use crate::vm::{DesiredState, RunState, SequencedEvent, VmEvent};

pub(super) type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
pub(super) type Respond = tower_test::mock::SendResponse<Response<Body>>;

pub(super) const DEADLINE: Duration = Duration::from_secs(10);

/// Serve a fake agent on a unix socket; returns its calls and the socket's directory.
pub(super) async fn fake_agent(
    shutdown: CancellationToken,
) -> (Arc<Mutex<Calls>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (calls, _) = serve_fake_agent(&dir.path().join("agent.sock"), Vec::new(), shutdown);
    (calls, dir)
}

/// A pool with the controller's default grace and heartbeat timeout and no agents yet.
pub(super) fn pool(shutdown: &CancellationToken) -> AgentPool {
    let (pool, _signals) = AgentPool::new(
        Duration::from_secs(10),
        Duration::from_secs(30),
        None,
        shutdown.clone(),
    );
    pool
}

pub(super) fn context(client: Client, pool: AgentPool) -> Arc<Context> {
    let (store, _writer) = reflector::store::<MicroVM>();
    Arc::new(Context {
        client: client.clone(),
        pool,
        store,
        recorder: EventRecorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_string(),
                instance: None,
            },
        ),
        metrics: ControllerMetrics::default(),
        strategy: PlacementStrategy::Spread,
        nodes: NodeLabels {
            api: Api::all(client),
            cache: Mutex::new(Default::default()),
        },
        placing: tokio::sync::Mutex::new(Default::default()),
        failures: Mutex::new(Default::default()),
        vm_pods: None,
        node_meta: None,
        pods_listed: {
            let listed = CancellationToken::new();
            listed.cancel();
            listed
        },
        pools: reflector::store::<MicroVMPool>().0,
        pools_listed: {
            let listed = CancellationToken::new();
            listed.cancel();
            listed
        },
        pool_triggers: tokio::sync::mpsc::unbounded_channel().0,
        claiming: Mutex::new(Default::default()),
    })
}

/// The next request; asserts method and path, returns the query pairs, the body and the
/// responder.
pub(super) async fn expect(
    handle: &mut Handle,
    method: Method,
    path: &str,
) -> (BTreeMap<String, String>, Value, Option<String>, Respond) {
    let (request, respond) = tokio::time::timeout(DEADLINE, handle.next_request())
        .await
        .expect("request within deadline")
        .expect("service called");
    assert_eq!(request.method(), method, "{}", request.uri());
    assert_eq!(request.uri().path(), path);
    let query = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON body")
    };
    (query, body, content_type, respond)
}

pub(super) fn ok(respond: Respond, body: &impl serde::Serialize) {
    respond.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(body).expect("serializes")))
            .expect("response"),
    );
}

fn not_found(respond: Respond) {
    let status = json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": "NotFound", "code": 404, "message": "not found",
    });
    respond.send_response(
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from(serde_json::to_vec(&status).expect("serializes")))
            .expect("response"),
    );
}

pub(super) async fn expect_event(handle: &mut Handle, reason: &str) {
    let (_, body, _, respond) = expect(
        handle,
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/default/events",
    )
    .await;
    assert_eq!(body["reason"], reason);
    assert_eq!(body["regarding"]["name"], "web");
    assert_eq!(body["reportingController"], FIELD_MANAGER);
    ok(respond, &body);
}

/// The path of the MicroVM `default/web`.
pub(super) fn object() -> String {
    crate::testing::microvm_path("default", "web")
}

/// A fake agent on `node` and a pool connected to it: the agent's recorded calls, its
/// directory (keep it alive), the pool.
pub(super) async fn pool_with_fake_agent(
    shutdown: &CancellationToken,
    node: &str,
) -> (Arc<Mutex<Calls>>, tempfile::TempDir, AgentPool) {
    let (calls, dir) = fake_agent(shutdown.clone()).await;
    let pool = pool(shutdown);
    pool.set_agents(&BTreeMap::from([(
        node.to_string(),
        AgentEndpoint::Unix(dir.path().join("agent.sock")),
    )]));
    wait_connected(&pool, node).await;
    (calls, dir, pool)
}

pub(super) async fn wait_connected(pool: &AgentPool, node: &str) {
    tokio::time::timeout(DEADLINE, async {
        while pool.link(node) != AgentLink::Connected {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("agent connects within the deadline");
}

#[tokio::test]
async fn new_vm_is_placed_started_and_reported_in_three_writes() {
    let shutdown = CancellationToken::new();
    let (calls, _dir, pool) = pool_with_fake_agent(&shutdown, "node-a").await;

    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = context(client, pool);
    let mvm = microvm("web");

    let verifier = tokio::spawn(async move {
        // Node labels for the candidate (the dev server has no Nodes: 404 is fine).
        let (_, _, _, respond) = expect(&mut handle, Method::GET, "/api/v1/nodes/node-a").await;
        not_found(respond);
        // Write 1: finalizer and node label in one merge patch, guarded by resourceVersion.
        let (_, body, content_type, respond) = expect(&mut handle, Method::PATCH, &object()).await;
        assert_eq!(
            content_type.as_deref(),
            Some("application/merge-patch+json")
        );
        assert_eq!(
            body,
            json!({"metadata": {
                "resourceVersion": "1",
                "finalizers": [FINALIZER],
                "labels": {NODE_LABEL: "node-a"},
            }})
        );
        let mut patched = microvm("web");
        patched.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
        ok(respond, &patched);
        // Write 2: the status, by server-side apply with our field manager, forced.
        let status_path = format!("{}/status", object());
        let (query, body, content_type, respond) =
            expect(&mut handle, Method::PATCH, &status_path).await;
        assert_eq!(
            content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(
            query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert_eq!(query.get("force").map(String::as_str), Some("true"));
        assert_eq!(body["apiVersion"], crate::api::API_VERSION);
        assert_eq!(body["kind"], "MicroVM");
        assert_eq!(body["status"]["phase"], "Starting");
        assert_eq!(body["status"]["nodeName"], "node-a");
        assert_eq!(body["status"]["observedGeneration"], 1);
        let conditions = body["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .clone();
        let find = |t: &str| {
            conditions
                .iter()
                .find(|c| c["type"] == t)
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(find("Scheduled")["status"], "True");
        assert_eq!(find("Scheduled")["reason"], "Placed");
        assert_eq!(find("Ready")["status"], "False");
        assert_eq!(find("Ready")["reason"], "Starting");
        assert_eq!(find("Reconciling")["status"], "True");
        assert_eq!(find("Ready")["observedGeneration"], 1);
        ok(respond, &patched);
        expect_event(&mut handle, "Scheduled").await;
        expect_event(&mut handle, "Starting").await;
        handle
    });

    let action = tokio::time::timeout(DEADLINE, reconcile(Arc::new(mvm), ctx.clone()))
        .await
        .expect("reconcile within deadline")
        .expect("reconcile succeeds");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(super::reconcile::RESYNC)
    );
    let mut handle = tokio::time::timeout(DEADLINE, verifier)
        .await
        .expect("verifier within deadline")
        .expect("verifier passed");
    {
        let calls = calls.lock().expect("calls");
        assert_eq!(calls.applied.len(), 1);
        let applied = &calls.applied[0];
        assert_eq!(applied.run, 0);
        assert_eq!(applied.desired, DesiredState::Running);
        let spec = &applied.spec;
        assert_eq!((spec.uid.as_str(), spec.name.as_str()), ("uid-web", "web"));
        assert_eq!(spec.memory_bytes, 256 << 20);
    }
    // The ApplyVM answer is in the pool's view at once.
    assert_eq!(ctx.pool.vm("node-a", "uid-web").map(|v| v.run), Some(0));
    // Nothing else was sent.
    tokio::task::yield_now().await;
    assert!(
        tokio::time::timeout(Duration::from_millis(100), handle.next_request())
            .await
            .is_err()
    );
    shutdown.cancel();
}

#[tokio::test]
async fn unschedulable_vm_gets_finalizer_condition_and_event() {
    let shutdown = CancellationToken::new();
    let pool = pool(&shutdown);
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"), pool);
    let verifier = tokio::spawn(async move {
        let (_, body, _, respond) = expect(&mut handle, Method::PATCH, &object()).await;
        assert_eq!(
            body,
            json!({"metadata": {"resourceVersion": "1", "finalizers": [FINALIZER]}})
        );
        ok(respond, &microvm("web"));
        let (query, body, _, respond) =
            expect(&mut handle, Method::PATCH, &format!("{}/status", object())).await;
        assert_eq!(
            query.get("fieldManager").map(String::as_str),
            Some(FIELD_MANAGER)
        );
        assert_eq!(query.get("force").map(String::as_str), Some("true"));
        assert_eq!(body["status"]["phase"], "Pending");
        let scheduled = body["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Scheduled").cloned())
            .expect("Scheduled condition");
        assert_eq!(scheduled["status"], "False");
        assert_eq!(scheduled["reason"], "Unschedulable");
        assert!(
            scheduled["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("noAgents"))
        );
        ok(respond, &microvm("web"));
        expect_event(&mut handle, "FailedScheduling").await;
    });
    let action = tokio::time::timeout(DEADLINE, reconcile(Arc::new(microvm("web")), ctx))
        .await
        .expect("within deadline")
        .expect("reconcile succeeds");
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(super::decide::UNSCHEDULABLE_GRACE)
    );
    tokio::time::timeout(DEADLINE, verifier)
        .await
        .expect("verifier within deadline")
        .expect("verifier passed");
    shutdown.cancel();
}

#[tokio::test]
async fn deleted_vm_is_removed_from_the_agent_before_the_finalizer_goes() {
    let shutdown = CancellationToken::new();
    let (calls, _dir, pool) = pool_with_fake_agent(&shutdown, "node-a").await;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"), pool);
    let agent_calls = calls.clone();
    let verifier = tokio::spawn(async move {
        let (_, body, _, respond) = expect(&mut handle, Method::PATCH, &object()).await;
        // The agent was asked first.
        assert_eq!(
            agent_calls.lock().expect("calls").deleted,
            vec!["uid-web".to_string()]
        );
        assert_eq!(
            body,
            json!({"metadata": {"resourceVersion": "1", "finalizers": []}})
        );
        ok(respond, &microvm("web"));
    });
    tokio::time::timeout(
        DEADLINE,
        reconcile(Arc::new(deleting(placed("web", "node-a"))), ctx),
    )
    .await
    .expect("within deadline")
    .expect("reconcile succeeds");
    tokio::time::timeout(DEADLINE, verifier)
        .await
        .expect("verifier within deadline")
        .expect("verifier passed");
    assert!(calls.lock().expect("calls").applied.is_empty());
    shutdown.cancel();
}

#[tokio::test]
async fn a_deletion_seen_before_the_agent_is_discovered_keeps_its_finalizer() {
    // A controller just started (a new leader, or the pods of a Helm upgrade): its MicroVM
    // list can come back before its agent pod list. Releasing the object then would leave its
    // VM running with nobody to stop it (CI saw it on `helm uninstall`).
    let shutdown = CancellationToken::new();
    let pool = pool(&shutdown);
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    // No API call is expected at all: any (the finalizer patch) fails the reconcile.
    drop(handle);
    let ctx = context(Client::new(service, "default"), pool);
    tokio::time::timeout(
        DEADLINE,
        reconcile(Arc::new(deleting(placed("web", "node-a"))), ctx),
    )
    .await
    .expect("within deadline")
    .expect("nothing written: the finalizer stays until the agent is reached");
    shutdown.cancel();
}

#[tokio::test]
async fn a_failed_status_write_is_an_error_with_a_reason() {
    let shutdown = CancellationToken::new();
    let pool = pool(&shutdown);
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = context(Client::new(service, "default"), pool);
    let mut mvm = microvm("web");
    mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    let verifier = tokio::spawn(async move {
        let (_, _, _, respond) =
            expect(&mut handle, Method::PATCH, &format!("{}/status", object())).await;
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "Conflict", "code": 409, "message": "conflict",
        });
        respond.send_response(
            Response::builder()
                .status(StatusCode::CONFLICT)
                .body(Body::from(serde_json::to_vec(&status).expect("json")))
                .expect("response"),
        );
    });
    let result = tokio::time::timeout(DEADLINE, reconcile(Arc::new(mvm), ctx.clone()))
        .await
        .expect("within deadline");
    let error = result.expect_err("must fail");
    assert_eq!(error.reason(), "Conflict");
    verifier.await.expect("verifier passed");
    let text = {
        let registry = crate::telemetry::MetricsRegistry::with_prefix("t");
        let m = ctx.metrics.clone();
        registry
            .register(|r| r.register("errors", "e", m.errors))
            .await;
        registry.encode().await
    };
    assert!(
        text.contains("t_errors_total{reason=\"Conflict\"} 1"),
        "{text}"
    );
    shutdown.cancel();
}

async fn next_signal(
    signals: &mut mpsc::UnboundedReceiver<super::agents::PoolSignal>,
) -> super::agents::PoolSignal {
    tokio::time::timeout(DEADLINE, signals.recv())
        .await
        .expect("signal within deadline")
        .expect("pool alive")
}

#[tokio::test]
async fn agent_stream_feeds_the_view_and_triggers_reconciles_and_loss_heals() {
    use super::agents::PoolSignal;
    let shutdown = CancellationToken::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("agent.sock");
    let web = microvm("web");
    let running = super::fixtures::agent_vm(&web, "h", 0, RunState::Running);
    let agent_stop = shutdown.child_token();
    let (_, watchers) = serve_fake_agent(&path, vec![running.clone()], agent_stop.clone());
    let grace = Duration::from_millis(400);
    let (pool, mut signals) =
        AgentPool::new(grace, Duration::from_secs(30), None, shutdown.clone());
    pool.set_agents(&BTreeMap::from([(
        "node-a".to_string(),
        AgentEndpoint::Unix(path.clone()),
    )]));
    // The snapshot lands in the view; synced asks for the node's VMs to be reconciled.
    assert_eq!(
        next_signal(&mut signals).await,
        PoolSignal::Node("node-a".to_string())
    );
    assert_eq!(pool.link("node-a"), AgentLink::Connected);
    assert_eq!(pool.vm("node-a", "uid-web"), Some(running.clone()));
    assert_eq!(pool.hosts().len(), 1);
    assert_eq!(
        pool.held_vms(),
        vec![("node-a".to_string(), running.uid.clone())]
    );

    // A change on the stream triggers exactly that object.
    let mut exited = running.clone();
    exited.state = RunState::Exited;
    assert!(
        watchers
            .send(SequencedEvent {
                sequence: 2,
                event: VmEvent::Changed(Box::new(exited.clone())),
            })
            .await
    );
    assert_eq!(
        next_signal(&mut signals).await,
        PoolSignal::Vm {
            namespace: "default".to_string(),
            name: "web".to_string()
        }
    );
    assert_eq!(pool.vm("node-a", "uid-web"), Some(exited));

    // The agent goes away: reconnecting within the grace period, lost after it.
    agent_stop.cancel();
    watchers.close();
    assert_eq!(
        next_signal(&mut signals).await,
        PoolSignal::Vm {
            namespace: "default".to_string(),
            name: "web".to_string()
        }
    );
    assert!(
        matches!(pool.link("node-a"), AgentLink::Reconnecting { lost_after } if lost_after <= grace)
    );
    tokio::time::sleep(grace).await;
    assert_eq!(pool.link("node-a"), AgentLink::Lost);
    assert!(pool.hosts().is_empty());

    // It comes back: the link heals and the node is reconciled again.
    let (_, _watchers) = serve_fake_agent(&path, vec![running], shutdown.child_token());
    tokio::time::timeout(DEADLINE, async {
        loop {
            if next_signal(&mut signals).await == PoolSignal::Node("node-a".to_string()) {
                break;
            }
        }
    })
    .await
    .expect("reconnects within the deadline");
    assert_eq!(pool.link("node-a"), AgentLink::Connected);
    shutdown.cancel();
}

#[tokio::test]
async fn lease_is_created_when_missing_and_left_alone_when_fresh_elsewhere() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let elector = super::leader::LeaderElector::new(
        Api::<Lease>::namespaced(client, "ignis-system"),
        "ignis-controller",
        "me",
        Duration::from_secs(15),
    );
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ignis-system/leases";
    let verifier = tokio::spawn(async move {
        // Round 1: no Lease → create it, holding it ourselves.
        let (_, _, _, respond) = expect(
            &mut handle,
            Method::GET,
            &format!("{LEASES}/ignis-controller"),
        )
        .await;
        not_found(respond);
        let (_, body, _, respond) = expect(&mut handle, Method::POST, LEASES).await;
        assert_eq!(body["metadata"]["name"], "ignis-controller");
        assert_eq!(body["spec"]["holderIdentity"], "me");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        ok(respond, &body);
        // Round 2: held by another replica that just renewed → no write at all.
        let (_, _, _, respond) = expect(
            &mut handle,
            Method::GET,
            &format!("{LEASES}/ignis-controller"),
        )
        .await;
        let now = jiff::Timestamp::now();
        ok(
            respond,
            &json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "ignis-controller", "resourceVersion": "7"},
                "spec": {"holderIdentity": "other", "leaseDurationSeconds": 15,
                         "renewTime": now.to_string()},
            }),
        );
        handle
    });
    assert!(elector.try_once().await.expect("round 1"));
    assert!(!elector.try_once().await.expect("round 2"));
    let mut handle = verifier.await.expect("verifier passed");
    assert!(
        tokio::time::timeout(Duration::from_millis(100), handle.next_request())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn tls_secrets_are_bootstrapped_when_missing() {
    use super::tls;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    const SECRETS: &str = "/api/v1/namespaces/ignis-system/secrets";
    let verifier = tokio::spawn(async move {
        // No client certificate of the user's own, no CA yet: the CA is created...
        for name in [tls::CLIENT_SECRET, tls::CA_SECRET] {
            let (_, _, _, respond) =
                expect(&mut handle, Method::GET, &format!("{SECRETS}/{name}")).await;
            not_found(respond);
        }
        let (_, body, _, respond) = expect(&mut handle, Method::POST, SECRETS).await;
        assert_eq!(body["metadata"]["name"], tls::CA_SECRET);
        assert!(body["data"][tls::CA_KEY].is_string());
        ok(respond, &body);
        // ...and the agents' Secret holds the CA certificate and their own pair, nothing else.
        let (_, _, _, respond) = expect(
            &mut handle,
            Method::GET,
            &format!("{SECRETS}/ignis-agent-tls"),
        )
        .await;
        not_found(respond);
        let (_, body, _, respond) = expect(&mut handle, Method::POST, SECRETS).await;
        assert_eq!(body["metadata"]["name"], "ignis-agent-tls");
        assert_eq!(body["type"], "kubernetes.io/tls");
        let keys: Vec<&String> = body["data"].as_object().expect("data").keys().collect();
        assert_eq!(keys, [tls::CA_CERT, tls::TLS_CERT, tls::TLS_KEY]);
        ok(respond, &body);
    });
    tls::ensure_secret(client, "ignis-system", "ignis-agent-tls")
        .await
        .expect("bootstrapped");
    verifier.await.expect("verifier passed");
}

#[tokio::test]
async fn an_admins_annotation_starts_a_ca_rotation_and_the_agents_trust_both() {
    use super::tls;
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    const SECRETS: &str = "/api/v1/namespaces/ignis-system/secrets";
    let old = tls::CaSet::new(tls::Ca::generate().expect("CA"));
    let old_pem = old.signing.cert_pem.clone();
    let stored = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {
            "name": tls::CA_SECRET, "namespace": "ignis-system", "resourceVersion": "7",
            "annotations": { tls::ROTATE_ANNOTATION: "now" },
        },
        "type": "Opaque",
        "data": old.secret_data(),
    });
    let verifier = tokio::spawn(async move {
        let (_, _, _, respond) = expect(
            &mut handle,
            Method::GET,
            &format!("{SECRETS}/{}", tls::CLIENT_SECRET),
        )
        .await;
        not_found(respond);
        let ca_path = format!("{SECRETS}/{}", tls::CA_SECRET);
        let (_, _, _, respond) = expect(&mut handle, Method::GET, &ca_path).await;
        ok(respond, &stored);
        // The new CA is written beside the old one, at the version read; the request is
        // consumed and the phase's start recorded.
        let (_, body, _, respond) = expect(&mut handle, Method::PUT, &ca_path).await;
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        let annotations = &body["metadata"]["annotations"];
        assert!(
            annotations.get(tls::ROTATE_ANNOTATION).is_none(),
            "{annotations}"
        );
        assert!(
            annotations[tls::SINCE_ANNOTATION].is_string(),
            "{annotations}"
        );
        for key in [tls::CA_CERT, tls::CA_KEY, "next.crt", "next.key"] {
            assert!(body["data"][key].is_string(), "{key} in {}", body["data"]);
        }
        ok(respond, &body);
        // The agents' Secret trusts both CAs; its leaf is still the old CA's.
        let (_, _, _, respond) = expect(
            &mut handle,
            Method::GET,
            &format!("{SECRETS}/ignis-agent-tls"),
        )
        .await;
        not_found(respond);
        let (_, body, _, respond) = expect(&mut handle, Method::POST, SECRETS).await;
        let bundle = body["data"][tls::CA_CERT].as_str().expect("ca.crt");
        ok(respond, &body);
        bundle.to_string()
    });
    tls::ensure_secret(client, "ignis-system", "ignis-agent-tls")
        .await
        .expect("rotation begun");
    let bundle = verifier.await.expect("verifier passed");
    use base64::Engine as _;
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(bundle)
        .expect("base64");
    let bundle = String::from_utf8(bundle).expect("pem");
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2, "{bundle}");
    assert!(
        bundle.starts_with(&old_pem),
        "the old CA still signs: first"
    );
}
