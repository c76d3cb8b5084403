//! `MicroVMPool` against `ignis dev`, in a network namespace of the test's own: a pool of 2
//! fills; a claim is Ready at once with outcome `Claimed` and no boot (its VM started before the
//! claim existed), is selected by its own labels and answers as itself (hostname and labels
//! through the metadata channel); the pool refills; a claim that does not match the template
//! boots cold and says so; deleting the pool removes its warm VMs and leaves the claimed VM
//! running; nothing is left in the node's snapshot and VM directories at the end. (On a
//! cluster, `vm_pods/pool.rs` checks a Service selecting the claimed VM.)

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use ignis::api::InterfaceMode;
use ignis::testing::MicroVmBuilder;
use ignis_e2e::{Cluster, http_get_via, wait_until};

const NS: &str = "e2e-pool";
const POOL: &str = "web";
const WARM: Duration = Duration::from_secs(180);

/// The demo web guest on a NAT link, Ready when port 80 answers: the pool's template and,
/// named, a claim that matches it.
fn web(cluster: &Cluster, name: &str) -> MicroVmBuilder {
    MicroVmBuilder::sample(name)
        .namespace(NS)
        .guest(
            &cluster.guest_dir.join("vmlinuz"),
            &cluster.guest_dir.join("initrd.cpio"),
        )
        .memory("128Mi")
        .cmdline("console=ttyS0 panic=-1 quiet")
        .interface("eth0", InterfaceMode::Nat)
        .tcp_port(80)
        .grace_period_seconds(5)
}

fn apply_json(cluster: &Cluster, object: serde_json::Value) {
    let json = object.to_string();
    let applied = cluster.apply(NS, &json);
    assert!(applied.success, "apply {json}: {}", applied.stderr);
}

fn get(cluster: &Cluster, object: &str, jsonpath: &str) -> String {
    cluster.kubectl_ok(&[
        "get",
        "-n",
        NS,
        object,
        "-o",
        &format!("jsonpath={jsonpath}"),
    ])
}

/// The names of the MicroVMs selected by `selector`.
fn selected(cluster: &Cluster, selector: &str) -> BTreeSet<String> {
    cluster.names_selected(NS, "mvm", selector)
}

fn warm_vms(cluster: &Cluster) -> BTreeSet<String> {
    selected(cluster, &format!("ignis.dev/pool={POOL}"))
}

/// Wait until the pool has `ready` Ready warm VMs and says it is Ready.
fn wait_pool_ready(cluster: &Cluster, ready: u32) {
    cluster.wait_jsonpath(
        NS,
        &format!("mvmpool/{POOL}"),
        r#"{.status.readyReplicas}/{.status.replicas} {.status.conditions[?(@.type=="Ready")].status}"#,
        WARM,
        |s| s == format!("{ready}/{ready} True"),
    );
}

fn wait_ready(cluster: &Cluster, vm: &str, timeout: Duration) {
    let waited = cluster.kubectl(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Ready",
        &format!("mvm/{vm}"),
        &format!("--timeout={}s", timeout.as_secs()),
    ]);
    assert!(
        waited.success,
        "mvm/{vm} not Ready: {}\n{}",
        waited.stderr,
        cluster.describe(NS, &format!("mvm/{vm}"))
    );
}

/// The demo guest's `/cgi-bin/state` page at `ip`, or `None` when it does not answer.
fn guest_state(cluster: &Cluster, ip: &str) -> Option<String> {
    http_get_via(
        |program| cluster.command(program),
        &format!("{ip}:80"),
        "/cgi-bin/state",
    )
}

fn dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

#[test]
fn a_claim_takes_a_warm_vm_and_the_pool_refills() {
    if std::env::var("IGNIS_E2E_KUBECONFIG").is_ok() {
        ignis::testing::prerequisite::missing(
            "a_claim_takes_a_warm_vm_and_the_pool_refills",
            "reaching a guest's IP from here needs `ignis dev`; on a cluster vm_pods.rs checks pools",
        );
        return;
    }
    let Some(cluster) = Cluster::start_in_netns("ignis-e2e-pool") else {
        return;
    };
    let _ns = cluster.namespace(NS);

    // A pool of 2 fills; its warm VMs carry the pool's labels.
    apply_json(
        &cluster,
        serde_json::to_value(
            web(&cluster, "template")
                .label("tier", "warm")
                .pool_of(POOL, 2),
        )
        .expect("a pool serializes"),
    );
    wait_pool_ready(&cluster, 2);
    let warm = warm_vms(&cluster);
    assert_eq!(warm.len(), 2, "two warm VMs: {warm:?}");
    assert_eq!(selected(&cluster, "tier=warm"), warm);

    // A claim: Ready at once, from a warm VM that booted before the claim existed.
    apply_json(
        &cluster,
        web(&cluster, "api").label("app", "api").pool(POOL).json(),
    );
    wait_ready(&cluster, "api", Duration::from_secs(30));
    let claim = get(
        &cluster,
        "mvm/api",
        "{.status.claim.outcome} {.status.claim.warmName}",
    );
    let (outcome, warm_name) = claim.split_once(' ').expect("outcome and warm name");
    assert_eq!(outcome, "Claimed", "{}", cluster.describe(NS, "mvm/api"));
    assert!(warm.contains(warm_name), "{warm_name} was one of {warm:?}");
    assert_eq!(
        get(
            &cluster,
            "mvm/api",
            r#"{.status.conditions[?(@.type=="Ready")].reason}"#
        ),
        "Claimed"
    );
    let (started, created) = (
        get(&cluster, "mvm/api", "{.status.startTime}"),
        get(&cluster, "mvm/api", "{.metadata.creationTimestamp}"),
    );
    // RFC 3339 in UTC, fixed width: the strings order as the instants do.
    assert!(
        !started.is_empty() && started < created,
        "no boot: the VM started at {started}, before the claim was made at {created}"
    );
    assert_eq!(get(&cluster, "mvm/api", "{.status.restartCount}"), "0");

    // Selected by its own labels, not the pool's (ignis dev has no Services; on a cluster
    // vm_pods/pool.rs checks a Service's endpoints).
    assert_eq!(
        selected(&cluster, "app=api"),
        BTreeSet::from(["api".into()])
    );
    assert!(!selected(&cluster, "tier=warm").contains("api"));
    assert!(
        !selected(&cluster, &format!("ignis.dev/pool={POOL}")).contains("api"),
        "a claimed VM is no longer the pool's"
    );

    // The guest is the claimant now: hostname and labels from the metadata channel.
    let ip = get(&cluster, "mvm/api", "{.status.ipAddresses[0]}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = guest_state(&cluster, &ip).unwrap_or_default();
        let says = |line: &str| page.lines().any(|l| l.trim() == line);
        if says("hostname=api") && says("label.app=api") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest does not report the claimant's hostname and labels: {page:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // The pool refills: two Ready warm VMs again, the claimed one not among them.
    wait_pool_ready(&cluster, 2);
    let refilled = warm_vms(&cluster);
    assert_eq!(refilled.len(), 2, "{refilled:?}");
    assert!(!refilled.contains(warm_name));
    assert_eq!(
        get(&cluster, "mvmpool/web", "{.status.claimed}"),
        "1",
        "one MicroVM runs a VM of the pool"
    );

    // A claim whose spec needs another boot (more memory): booted cold, and it says why.
    apply_json(
        &cluster,
        web(&cluster, "odd")
            .memory("192Mi")
            .label("app", "odd")
            .pool(POOL)
            .json(),
    );
    wait_ready(&cluster, "odd", Duration::from_secs(120));
    assert_eq!(
        get(&cluster, "mvm/odd", "{.status.claim.outcome}"),
        "TemplateMismatch",
        "{}",
        cluster.describe(NS, "mvm/odd")
    );
    let (started, created) = (
        get(&cluster, "mvm/odd", "{.status.startTime}"),
        get(&cluster, "mvm/odd", "{.metadata.creationTimestamp}"),
    );
    assert!(
        started >= created,
        "booted after the claim: {started} ≥ {created}"
    );

    // Deleting the pool removes its warm VMs; the claimed VM runs on.
    cluster.delete_and_wait(NS, &format!("mvmpool/{POOL}"));
    wait_until(Duration::from_secs(60), "the warm VMs deleted", || {
        warm_vms(&cluster).is_empty()
    });
    for vm in &refilled {
        assert!(
            !cluster
                .kubectl_ok(&["get", "-n", NS, "mvm", "-o", "name"])
                .contains(vm.as_str()),
            "warm VM {vm} is gone"
        );
    }
    assert_eq!(get(&cluster, "mvm/api", "{.status.phase}"), "Running");
    wait_ready(&cluster, "api", Duration::from_secs(10));
    assert!(
        guest_state(&cluster, &ip).is_some(),
        "the claimed guest still answers"
    );

    // Everything deleted: nothing of any VM is left on the node.
    cluster.delete_and_wait(NS, "mvm/api");
    cluster.delete_and_wait(NS, "mvm/odd");
    let data = cluster.guest_dir.parent().expect("the dev data directory");
    for dir in ["snapshots", "vms"] {
        wait_until(
            Duration::from_secs(30),
            &format!("the node's {dir} directory empty"),
            || dir_is_empty(&data.join(dir)),
        );
    }
}
