//! End-to-end tests: only `kubectl` against `ignis dev` (or `IGNIS_E2E_KUBECONFIG`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ignis_e2e::upstream::pids_matching;
use ignis_e2e::{Cluster, wait_until};

const READY_TIMEOUT: &str = "--timeout=120s";

fn uid_of(cluster: &Cluster, ns: &str, name: &str) -> String {
    cluster.kubectl_ok(&[
        "get",
        "-n",
        ns,
        &format!("mvm/{name}"),
        "-o",
        "jsonpath={.metadata.uid}",
    ])
}

/// PIDs of VMM processes whose command line mentions `uid` (dev mode only: same machine).
fn vmm_pids(uid: &str) -> Vec<u32> {
    pids_matching(uid)
}

#[test]
fn microvm_lifecycle_through_kubectl() {
    let cluster = Cluster::start();
    let ns = cluster.namespace("e2e-lifecycle");
    let ns = ns.name.as_str();

    // Apply and wait for Ready.
    let applied = cluster.apply(ns, &cluster.demo_vm("web", "", "Always"));
    assert!(applied.success, "apply failed: {}", applied.stderr);
    let started = Instant::now();
    cluster.kubectl_ok(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "mvm/web",
        READY_TIMEOUT,
    ]);
    println!("apply -> Ready (kubectl wait): {:?}", started.elapsed());

    // Printer columns.
    let table = cluster.kubectl_ok(&["get", "mvm", "-n", ns]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "PHASE", "NODE", "IP", "READY", "AGE"] {
        assert!(header.contains(column), "missing column {column}: {table}");
    }
    let row = table.lines().nth(1).unwrap_or_default();
    assert!(
        row.contains("web") && row.contains("Running") && row.contains("True"),
        "{table}"
    );
    let status = cluster.kubectl_ok(&[
        "get",
        "mvm/web",
        "-n",
        ns,
        "-o",
        "jsonpath={.status.hypervisor}/{.status.accelerator}/{.status.nodeName}",
    ]);
    assert!(status.starts_with("qemu/"), "status: {status}");

    // A spec edit bumps generation, and the controller catches up with observedGeneration.
    let generation = cluster.kubectl_ok(&[
        "get",
        "mvm/web",
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    cluster.kubectl_ok(&[
        "patch",
        "mvm/web",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"terminationGracePeriodSeconds":7}}"#,
    ]);
    let new_generation = cluster.kubectl_ok(&[
        "get",
        "mvm/web",
        "-n",
        ns,
        "-o",
        "jsonpath={.metadata.generation}",
    ]);
    let expected: i64 = generation.parse::<i64>().expect("generation") + 1;
    assert_eq!(new_generation, expected.to_string());
    cluster.wait_jsonpath(
        ns,
        "mvm/web",
        "{.status.observedGeneration}",
        Duration::from_secs(30),
        |g| g == new_generation,
    );
    let ready_gen = cluster.wait_jsonpath(
        ns,
        "mvm/web",
        r#"{.status.conditions[?(@.type=="Ready")].observedGeneration}"#,
        Duration::from_secs(30),
        |g| g == new_generation,
    );
    assert_eq!(ready_gen, new_generation);

    // An immutable field cannot change.
    let refused = cluster.kubectl(&[
        "patch",
        "mvm/web",
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"resources":{"memory":"512Mi"}}}"#,
    ]);
    assert!(
        !refused.success && refused.stderr.contains("spec.resources"),
        "{refused:?}"
    );

    // Kill the guest's VMM: runPolicy Always restarts it and restartCount rises.
    if cluster.is_dev() {
        let uid = uid_of(&cluster, ns, "web");
        let pids = vmm_pids(&uid);
        assert_eq!(pids.len(), 1, "one VMM for {uid}: {pids:?}");
        Command::new("kill")
            .args(["-KILL", &pids[0].to_string()])
            .status()
            .expect("kill");
        cluster.wait_jsonpath(
            ns,
            "mvm/web",
            "{.status.restartCount}",
            Duration::from_secs(60),
            |c| c.parse::<i32>().unwrap_or(0) >= 1,
        );
        cluster.kubectl_ok(&[
            "wait",
            "-n",
            ns,
            "--for=condition=Ready",
            "mvm/web",
            READY_TIMEOUT,
        ]);
        wait_until(Duration::from_secs(30), "a new VMM", || {
            let now = vmm_pids(&uid);
            now.len() == 1 && now[0] != pids[0]
        });
        let events = cluster.event_reasons(ns, "web");
        assert!(!events.is_empty(), "no Events recorded for mvm/web");
    }

    // Delete: the object goes only after the VM is gone.
    let uid = uid_of(&cluster, ns, "web");
    cluster.kubectl_ok(&[
        "delete",
        "mvm/web",
        "-n",
        ns,
        "--wait=true",
        "--timeout=60s",
    ]);
    if cluster.is_dev() {
        wait_until(Duration::from_secs(10), "no VMM left", || {
            vmm_pids(&uid).is_empty()
        });
    }
}

#[test]
fn invalid_manifests_are_refused_naming_the_field() {
    let cluster = Cluster::start();
    let ns = cluster.namespace("e2e-invalid");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/samples/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("invalid samples")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        let field = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("ignis.dev/test-expect-field:"))
            .map(|f| f.trim().trim_matches('"').to_string())
            .expect("sample names its field");
        let out = cluster.apply(&ns.name, &text);
        assert!(!out.success, "{} was accepted", file.display());
        assert!(
            out.stderr.contains(&field),
            "{}: error does not name {field}: {}",
            file.display(),
            out.stderr
        );
    }
    let listed = cluster.kubectl_ok(&["get", "mvm", "-n", &ns.name, "-o", "name"]);
    assert!(
        listed.trim().is_empty(),
        "invalid objects were stored: {listed}"
    );
}

#[test]
fn restart_keeps_state_and_readopts_the_vm() {
    let mut cluster = Cluster::start();
    if !cluster.is_dev() {
        // On a cluster, e2e/tests/cluster.rs restarts the agent and the controller (leader
        // failover) instead; scripts/test.sh runs this test against `ignis dev` only.
        ignis::testing::prerequisite::missing(
            "restart_keeps_state_and_readopts_the_vm",
            "restarting the control plane needs `ignis dev` (IGNIS_E2E_KUBECONFIG is set)",
        );
        return;
    }
    let ns = "e2e-restart";
    cluster.kubectl_ok(&["create", "namespace", ns]);
    assert!(
        cluster
            .apply(ns, &cluster.demo_vm("keeper", "", "Always"))
            .success
    );
    cluster.kubectl_ok(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "mvm/keeper",
        READY_TIMEOUT,
    ]);
    let uid = uid_of(&cluster, ns, "keeper");
    let before = vmm_pids(&uid);
    assert_eq!(before.len(), 1);

    // SIGKILL: nothing gets to clean up; the VM must survive and be re-adopted.
    cluster.restart_dev(true);
    cluster.kubectl_ok(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "mvm/keeper",
        READY_TIMEOUT,
    ]);
    assert_eq!(
        uid_of(&cluster, ns, "keeper"),
        uid,
        "object kept across the restart"
    );
    assert_eq!(
        vmm_pids(&uid),
        before,
        "the same VMM process was re-adopted"
    );
    let restarts = cluster.kubectl_ok(&[
        "get",
        "mvm/keeper",
        "-n",
        ns,
        "-o",
        "jsonpath={.status.restartCount}",
    ]);
    assert_eq!(restarts, "0");

    cluster.kubectl_ok(&[
        "delete",
        "mvm/keeper",
        "-n",
        ns,
        "--wait=true",
        "--timeout=60s",
    ]);
    wait_until(Duration::from_secs(10), "no VMM left", || {
        vmm_pids(&uid).is_empty()
    });
}

#[test]
fn ten_microvms_at_once() {
    let cluster = Cluster::start();
    let ns = cluster.namespace("e2e-ten");
    let ns = ns.name.as_str();
    let manifests: Vec<String> = (0..10)
        .map(|i| cluster.demo_vm(&format!("vm-{i}"), "", "Always"))
        .collect();
    let started = Instant::now();
    let out = cluster.apply(ns, &manifests.join("---\n"));
    assert!(out.success, "{}", out.stderr);
    cluster.kubectl_ok(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "mvm",
        "--all",
        "--timeout=300s",
    ]);
    println!("10 MicroVMs apply -> all Ready: {:?}", started.elapsed());
    let phases = cluster.kubectl_ok(&[
        "get",
        "mvm",
        "-n",
        ns,
        "-o",
        "jsonpath={.items[*].status.phase}",
    ]);
    assert_eq!(
        phases
            .split_whitespace()
            .filter(|p| *p == "Running")
            .count(),
        10,
        "{phases}"
    );
    cluster.kubectl_ok(&[
        "delete",
        "mvm",
        "--all",
        "-n",
        ns,
        "--wait=true",
        "--timeout=120s",
    ]);
}
