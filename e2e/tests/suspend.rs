//! `spec.suspend` against `ignis dev`, in a network namespace of the test's own: a suspended
//! guest keeps its uptime, a tmpfs note and its listening port at the same address when it is
//! resumed; its snapshot is the VMM's alone on the node's disk and is gone after the resume;
//! a damaged snapshot gets `SnapshotUnrestorable` and a cold boot, never a hang; nothing is
//! left in the node's snapshot directory after the delete. (On a cluster, `vm_pods.rs` checks
//! the same through a Service.)

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use ignis_e2e::{Cluster, http_get_via, parse_guest_state};

const NS: &str = "e2e-suspend";

/// The guest's uptime and note from `/cgi-bin/state`, or `None` when it does not answer.
fn guest_state(cluster: &Cluster, ip: &str, query: &str) -> Option<(f64, String)> {
    let response = http_get_via(
        |program| cluster.command(program),
        &format!("{ip}:80"),
        &format!("/cgi-bin/state{query}"),
    )?;
    parse_guest_state(&response)
}

fn set_suspend(cluster: &Cluster, suspend: bool) {
    cluster.kubectl_ok(&[
        "patch",
        "-n",
        NS,
        "mvm/web",
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"suspend":{suspend}}}}}"#),
    ]);
}

fn wait_phase(cluster: &Cluster, phase: &str) {
    cluster.wait_jsonpath(
        NS,
        "mvm/web",
        "{.status.phase}",
        Duration::from_secs(120),
        |p| p == phase,
    );
}

fn wait_ready(cluster: &Cluster) {
    cluster.kubectl_ok(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Ready",
        "mvm/web",
        "--timeout=120s",
    ]);
}

fn condition(cluster: &Cluster, kind: &str) -> String {
    cluster.kubectl_ok(&[
        "get",
        "-n",
        NS,
        "mvm/web",
        "-o",
        &format!(
            r#"jsonpath={{.status.conditions[?(@.type=="{kind}")].status}} {{.status.conditions[?(@.type=="{kind}")].reason}}"#
        ),
    ])
}

#[test]
fn suspend_and_resume_keep_the_guest() {
    if std::env::var("IGNIS_E2E_KUBECONFIG").is_ok() {
        ignis::testing::prerequisite::missing(
            "suspend_and_resume_keep_the_guest",
            "reaching a guest's IP from here needs `ignis dev`; on a cluster vm_pods.rs checks suspend",
        );
        return;
    }
    let Some(cluster) = Cluster::start_in_netns("ignis-e2e-suspend") else {
        return;
    };
    let _ns = cluster.namespace(NS);
    let applied = cluster.apply(NS, &cluster.demo_web_vm("web"));
    assert!(applied.success, "{}", applied.stderr);
    wait_ready(&cluster);
    let ip = cluster.kubectl_ok(&[
        "get",
        "-n",
        NS,
        "mvm/web",
        "-o",
        "jsonpath={.status.ipAddresses[0]}",
    ]);
    let uid = cluster.kubectl_ok(&["get", "-n", NS, "mvm/web", "-o", "jsonpath={.metadata.uid}"]);
    let snapshots: PathBuf = cluster
        .guest_dir
        .parent()
        .expect("the dev data directory")
        .join("snapshots");
    let (before, note) = guest_state(&cluster, &ip, "?set=kept").expect("the guest's state");
    assert_eq!(note, "kept");

    // Suspend: Suspended, the guest's memory in a file only its VMM's uid may read.
    set_suspend(&cluster, true);
    wait_phase(&cluster, "Suspended");
    assert_eq!(condition(&cluster, "Suspended"), "True Suspended");
    assert_eq!(
        condition(&cluster, "Ready"),
        " ",
        "no Ready while suspended"
    );
    let stream = snapshots.join(&uid).join("qemu.vmstate");
    let meta = std::fs::metadata(&stream).expect("the snapshot file");
    assert_eq!(meta.mode() & 0o777, 0o600, "owner-only snapshot");
    assert_ne!(meta.uid(), 0, "owned by the VMM's uid, not root");
    let dir_mode = std::fs::metadata(snapshots.join(&uid)).expect("dir").mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    assert!(
        guest_state(&cluster, &ip, "").is_none(),
        "a suspended guest does not answer"
    );

    // Resume: the same guest, at the same address.
    set_suspend(&cluster, false);
    wait_ready(&cluster);
    let (after, note) = guest_state(&cluster, &ip, "").expect("the resumed guest's state");
    assert_eq!(note, "kept", "the tmpfs note survives");
    assert!(
        after >= before && after < before + 30.0,
        "uptime goes on from {before} s (now {after} s)"
    );
    assert!(
        !snapshots.join(&uid).exists(),
        "a spent snapshot is removed"
    );
    let reasons = cluster.event_reasons(NS, "web");
    assert!(
        reasons.contains("Suspended") && reasons.contains("Resuming"),
        "{reasons}"
    );

    // A damaged snapshot: a clear reason and a cold boot.
    set_suspend(&cluster, true);
    wait_phase(&cluster, "Suspended");
    std::fs::write(&stream, b"QEVM not a migration stream").expect("damage the snapshot");
    set_suspend(&cluster, false);
    wait_ready(&cluster);
    assert_eq!(
        condition(&cluster, "Suspended"),
        "False SnapshotUnrestorable",
        "{}",
        cluster.describe(NS, "mvm/web")
    );
    let (cold, note) = guest_state(&cluster, &ip, "").expect("the cold-booted guest's state");
    assert_eq!(note, "", "a cold boot starts with an empty tmpfs");
    // The empty note says it booted anew; its uptime (the same ~2 s to Ready as the first
    // boot's) may equal the resumed guest's when that one was measured just after its resume.
    assert!(
        cold < after + 1.0,
        "booted anew: uptime {cold} s, the resumed guest had {after} s"
    );
    assert!(
        cluster
            .event_reasons(NS, "web")
            .contains("SnapshotUnrestorable")
    );

    // Suspended and deleted: nothing left in the node's snapshot directory.
    set_suspend(&cluster, true);
    wait_phase(&cluster, "Suspended");
    cluster.delete_and_wait(NS, "mvm/web");
    let left: Vec<_> = std::fs::read_dir(&snapshots)
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "snapshots left after the delete: {left:?}");
}
