//! Pod mode against a mock Kubernetes API (as `api_tests`): the VM pod created, and the VM
//! applied with its pod reference and the pod's readiness gate set, with the exact requests.

use std::sync::Arc;

use http::{Method, Request, Response};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, Pod, PodStatus,
};
use kube::Client;
use kube::client::Body;
use kube::runtime::reflector;
use kube::runtime::watcher::Event;
use tokio_util::sync::CancellationToken;

use super::Context;
use super::api_tests::{
    DEADLINE, context, expect, expect_event, object, ok, pool, pool_with_fake_agent,
};
use super::fixtures::microvm;
use super::reconcile;
use super::vmpod::{self, VmPodSettings, VmmOverhead};
use crate::api::{FINALIZER, MicroVM};
use crate::vm::InterfaceMode;

fn settings() -> VmPodSettings {
    VmPodSettings {
        image: "registry.local/ignis-controller:1".to_string(),
        overhead: VmmOverhead::default(),
    }
}

/// `context` in pod mode, its pod cache holding `pods`.
fn pod_context(client: Client, pool: super::agents::AgentPool, pods: Vec<Pod>) -> Arc<Context> {
    let (store, mut writer) = reflector::store::<Pod>();
    writer.apply_watcher_event(&Event::Init);
    for pod in pods {
        writer.apply_watcher_event(&Event::InitApply(pod));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let base = Arc::into_inner(context(client, pool)).expect("sole owner");
    Arc::new(Context {
        vm_pods: Some((settings(), store)),
        ..base
    })
}

fn with_finalizer() -> MicroVM {
    let mut mvm = microvm("web");
    mvm.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    mvm
}

#[tokio::test]
async fn a_microvm_without_a_pod_gets_its_vm_pod_created() {
    let shutdown = CancellationToken::new();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = pod_context(Client::new(service, "default"), pool(&shutdown), Vec::new());
    let verifier = tokio::spawn(async move {
        let (_, body, _, respond) =
            expect(&mut handle, Method::POST, "/api/v1/namespaces/default/pods").await;
        let expected = vmpod::build(&with_finalizer(), &settings()).expect("builds");
        let sent: Pod = serde_json::from_value(body.clone()).expect("a pod");
        assert_eq!(sent, expected);
        ok(respond, &body);
        let (_, body, _, respond) =
            expect(&mut handle, Method::PATCH, &format!("{}/status", object())).await;
        assert_eq!(body["status"]["phase"], "Pending");
        ok(respond, &with_finalizer());
        expect_event(&mut handle, "CreatedPod").await;
    });
    tokio::time::timeout(DEADLINE, reconcile(Arc::new(with_finalizer()), ctx))
        .await
        .expect("within deadline")
        .expect("reconcile succeeds");
    tokio::time::timeout(DEADLINE, verifier)
        .await
        .expect("verifier within deadline")
        .expect("verifier passed");
    shutdown.cancel();
}

#[tokio::test]
async fn a_running_sandbox_gets_the_vm_with_its_pod_reference() {
    let shutdown = CancellationToken::new();
    let (calls, _dir, pool) = pool_with_fake_agent(&shutdown, "node-b").await;
    let mut pod = vmpod::build(&with_finalizer(), &settings()).expect("builds");
    pod.metadata.uid = Some("pod-uid".to_string());
    pod.spec.as_mut().expect("spec").node_name = Some("node-b".to_string());
    pod.status = Some(PodStatus {
        phase: Some("Running".to_string()),
        pod_ip: Some("10.244.1.7".to_string()),
        container_statuses: Some(vec![ContainerStatus {
            name: "guest".to_string(),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    });
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let ctx = pod_context(Client::new(service, "default"), pool, vec![pod]);
    let verifier = tokio::spawn(async move {
        let (_, body, _, respond) =
            expect(&mut handle, Method::PATCH, &format!("{}/status", object())).await;
        assert_eq!(body["status"]["phase"], "Starting");
        assert_eq!(body["status"]["nodeName"], "node-b");
        ok(respond, &with_finalizer());
        expect_event(&mut handle, "Scheduled").await;
        expect_event(&mut handle, "Starting").await;
    });
    tokio::time::timeout(DEADLINE, reconcile(Arc::new(with_finalizer()), ctx))
        .await
        .expect("within deadline")
        .expect("reconcile succeeds");
    tokio::time::timeout(DEADLINE, verifier)
        .await
        .expect("verifier within deadline")
        .expect("verifier passed");
    let calls = calls.lock().expect("calls");
    assert_eq!(calls.applied.len(), 1);
    let applied = &calls.applied[0];
    let pod = applied.pod.clone().expect("the pod reference");
    assert_eq!(
        (pod.uid.as_str(), pod.namespace.as_str(), pod.name.as_str()),
        ("pod-uid", "default", "vm-web")
    );
    assert_eq!(pod.ip, Some("10.244.1.7".parse().expect("ip")));
    // No network stanza: the pod network.
    assert_eq!(applied.spec.interfaces.len(), 1);
    assert_eq!(applied.spec.interfaces[0].mode, InterfaceMode::Pod);
    shutdown.cancel();
}

#[tokio::test]
async fn nothing_is_decided_before_the_vm_pods_are_listed() {
    // A new leader whose pod cache is still listing would take a running VM's pod for gone
    // and stop the VM: it waits instead, and makes no call.
    let shutdown = CancellationToken::new();
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let listed = pod_context(Client::new(service, "default"), pool(&shutdown), Vec::new());
    let ctx = Arc::new(Context {
        pods_listed: CancellationToken::new(),
        ..Arc::into_inner(listed).expect("sole owner")
    });
    let requeue = tokio::time::timeout(DEADLINE, reconcile(Arc::new(with_finalizer()), ctx))
        .await
        .expect("within deadline")
        .expect("reconcile succeeds");
    assert_eq!(
        requeue,
        kube::runtime::controller::Action::requeue(super::reconcile::CACHE_WAIT)
    );
    let call = tokio::time::timeout(std::time::Duration::from_millis(200), handle.next_request());
    // Pending, or ended with the client dropped: never a request.
    if let Ok(Some((request, _))) = call.await {
        panic!(
            "an API call before the pods are listed: {} {}",
            request.method(),
            request.uri()
        );
    }
    shutdown.cancel();
}
