//! `MicroVMPool` on the cluster: warm VMs are VM pods carrying the pool's labels only; a claim
//! is Ready at once in the warm VM's pod, which now carries the claimant's labels and answers
//! to it, so a Service selecting those labels reaches the guest; the pool refills; deleting
//! the pool leaves the claimed VM running; no VM pod is left once everything is deleted.

use std::collections::BTreeSet;
use std::time::Duration;

use ignis::testing::MicroVmBuilder;
use ignis_e2e::wait_until;
use serde_json::json;

use super::{Ctx, GUEST_MEMORY_MI, NS, PAGE};

const POOL: &str = "warm";

/// The demo web guest on the pod network, Ready when its port 80 answers: the pool's
/// template, and (named) a claim matching it.
fn web(ctx: &Ctx, name: &str) -> MicroVmBuilder {
    MicroVmBuilder::sample(name)
        .guest(
            &ctx.cluster.guest_dir.join("vmlinuz"),
            &ctx.cluster.guest_dir.join("initrd.cpio"),
        )
        .memory(&format!("{GUEST_MEMORY_MI}Mi"))
        .cmdline("console=ttyS0 panic=-1 quiet")
        .tcp_port(80)
        .grace_period_seconds(5)
}

fn names(ctx: &Ctx, kind: &str, selector: &str) -> BTreeSet<String> {
    ctx.cluster.names_selected(NS, kind, selector)
}

fn warm_vms(ctx: &Ctx) -> BTreeSet<String> {
    names(ctx, "mvm", &format!("ignis.dev/pool={POOL}"))
}

fn wait_pool_ready(ctx: &Ctx, ready: u32) {
    ctx.cluster.wait_jsonpath(
        NS,
        &format!("mvmpool/{POOL}"),
        r#"{.status.readyReplicas}/{.status.replicas} {.status.conditions[?(@.type=="Ready")].status}"#,
        Duration::from_secs(300),
        |s| s == format!("{ready}/{ready} True"),
    );
}

/// Whether pod `name` exists in the test's namespace.
fn pod_exists(ctx: &Ctx, name: &str) -> bool {
    !ctx.cluster
        .kubectl_ok(&[
            "get",
            "-n",
            NS,
            &format!("pod/{name}"),
            "-o",
            "name",
            "--ignore-not-found",
        ])
        .trim()
        .is_empty()
}

pub(super) fn a_claim_is_served_by_a_service(ctx: &Ctx) {
    let pool = web(ctx, "template").label("tier", "warm").pool_of(POOL, 2);
    ctx.apply_json(&serde_json::to_value(pool).expect("a pool serializes"));
    wait_pool_ready(ctx, 2);
    let warm = warm_vms(ctx);
    assert_eq!(warm.len(), 2, "{warm:?}");
    // Warm VMs are VM pods like any other, with the pool's labels only.
    for vm in &warm {
        let labels = ctx.json(&format!("pod/vm-{vm}"))["metadata"]["labels"].clone();
        assert_eq!(labels["tier"], "warm", "pod vm-{vm}: {labels}");
        assert!(labels.get("app").is_none(), "pod vm-{vm}: {labels}");
    }
    let mut seen_pods: BTreeSet<String> = warm.iter().map(|vm| format!("vm-{vm}")).collect();

    // The claim: Ready at once, in the warm VM's pod.
    ctx.apply_json(&web(ctx, "pooled").label("app", "pooled").pool(POOL).json());
    ctx.wait_ready("pooled", Duration::from_secs(60));
    let claim = ctx.json("mvm/pooled")["status"]["claim"].clone();
    assert_eq!(claim["outcome"], "Claimed", "{claim}");
    let warm_name = claim["warmName"].as_str().expect("warmName").to_string();
    assert!(warm.contains(&warm_name), "{warm_name} of {warm:?}");
    let pod = claim["pod"].as_str().expect("status.claim.pod").to_string();
    assert_eq!(pod, format!("vm-{warm_name}"), "the pod keeps its name");
    let pod_object = ctx.json(&format!("pod/{pod}"));
    assert_eq!(pod_object["metadata"]["labels"]["app"], "pooled");
    let owners = pod_object["metadata"]["ownerReferences"].clone();
    assert!(
        owners.as_array().is_some_and(|o| o
            .iter()
            .any(|r| r["kind"] == "MicroVM" && r["name"] == "pooled")),
        "the claimant owns the pod: {owners}"
    );

    // A Service selecting the claimant's labels has the pod as its endpoint and answers.
    ctx.apply_json(&json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": "pooled" },
        "spec": { "selector": { "app": "pooled" }, "ports": [{ "port": 80, "targetPort": 80 }] }
    }));
    let pod_ip = ctx.get(&format!("pod/{pod}"), "{.status.podIP}");
    ctx.cluster.wait_jsonpath(
        NS,
        "endpointslices",
        // Only this Service selects `app: pooled`, so the pod's IP in any slice is its.
        "{.items[*].endpoints[*].addresses[0]}",
        Duration::from_secs(60),
        |found| found.split_whitespace().any(|ip| ip == pod_ip),
    );
    let service = ctx.get("service/pooled", "{.spec.clusterIP}");
    let url = format!("http://{service}/");
    super::wget_from_pod(ctx, "client", &url, Duration::from_secs(60), |page| {
        page.contains(PAGE)
    });

    // The pool refills, in new pods.
    wait_pool_ready(ctx, 2);
    let refilled = warm_vms(ctx);
    assert_eq!(refilled.len(), 2, "{refilled:?}");
    assert!(!refilled.contains(&warm_name));
    seen_pods.extend(refilled.iter().map(|vm| format!("vm-{vm}")));

    // Deleting the pool removes its warm VMs and leaves the claimed VM running.
    ctx.cluster.delete_and_wait(NS, &format!("mvmpool/{POOL}"));
    wait_until(Duration::from_secs(120), "the warm VMs deleted", || {
        warm_vms(ctx).is_empty()
    });
    assert!(ctx.ready("pooled"), "the claimed VM outlives its pool");
    assert_eq!(ctx.get("mvm/pooled", "{.status.phase}"), "Running");
    super::wget_from_pod(ctx, "client", &url, Duration::from_secs(30), |page| {
        page.contains(PAGE)
    });

    // Everything deleted: none of their VM pods is left.
    ctx.cluster.delete_and_wait(NS, "service/pooled");
    ctx.cluster.delete_and_wait(NS, "mvm/pooled");
    wait_until(
        Duration::from_secs(120),
        "no VM pod of the pool left",
        || seen_pods.iter().all(|p| !pod_exists(ctx, p)),
    );
}
