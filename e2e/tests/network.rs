//! Guest networking end to end: a MicroVM's IP in `kubectl get mvm`, and its service reachable.
//! Runs `ignis dev` in a network namespace of the test's own, so the host's is never touched.

use std::time::Duration;

use ignis_e2e::Cluster;

#[test]
fn microvm_gets_an_ip_and_serves_on_it() {
    if std::env::var("IGNIS_E2E_KUBECONFIG").is_ok() {
        // On a cluster, e2e/tests/cluster.rs and vm_pods.rs reach guests (the node's address,
        // the pod IP through a Service); scripts/test.sh runs this file against `ignis dev` only.
        ignis::testing::prerequisite::missing(
            "microvm_gets_an_ip_and_serves_on_it",
            "reaching a guest's IP from here needs `ignis dev` (IGNIS_E2E_KUBECONFIG is set)",
        );
        return;
    }
    let Some(cluster) = Cluster::start_in_netns("ignis-e2e-net") else {
        return;
    };
    let ns = cluster.namespace("e2e-net");
    let ns = ns.name.as_str();
    let manifest = cluster.demo_web_vm("web");
    let applied = cluster.apply(ns, &manifest);
    assert!(applied.success, "{}", applied.stderr);
    cluster.kubectl_ok(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "mvm/web",
        "--timeout=120s",
    ]);

    let ip = cluster.wait_jsonpath(
        ns,
        "mvm/web",
        "{.status.ipAddresses[0]}",
        Duration::from_secs(10),
        |ip| ip.starts_with("10.88."),
    );
    let table = cluster.kubectl_ok(&["get", "mvm", "web", "-n", ns]);
    assert!(table.contains(&ip), "IP column shows {ip}: {table}");

    let response = cluster.http_get(&ip, 80).unwrap_or_else(|| {
        panic!(
            "nothing answers on {ip}:80\n{}",
            cluster.describe(ns, "mvm/web")
        )
    });
    assert!(
        response.starts_with("HTTP/1.") && response.contains("200"),
        "{response}"
    );

    cluster.delete_and_wait(ns, "mvm/web");
    assert!(
        cluster.http_get(&ip, 80).is_none(),
        "{ip} still answers after delete"
    );
}
