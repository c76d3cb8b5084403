//! `spec.suspend` on the cluster: the VM on B is saved and restored through its spec while its
//! pod stays (and keeps the pod IP); the guest keeps its uptime and a tmpfs note, and answers
//! again through the same Service. A node's snapshot directory is empty once its VMs are gone.

use std::time::Duration;

use super::{Ctx, NS};
use ignis_e2e::upstream::pids_matching;
use ignis_e2e::{parse_guest_state, wait_until};

/// The guest's `/cgi-bin/state`, fetched through `target` from the client pod on A: its
/// uptime in seconds and its note.
fn guest_state(ctx: &Ctx, target: &str, query: &str, timeout: Duration) -> (f64, String) {
    let url = format!("http://{target}/cgi-bin/state{query}");
    let page = super::wget_from_pod(ctx, "client", &url, timeout, |page| {
        parse_guest_state(page).is_some()
    });
    parse_guest_state(&page).unwrap_or_default()
}

fn patch_suspend(ctx: &Ctx, vm: &str, suspend: bool) {
    ctx.cluster.kubectl_ok(&[
        "patch",
        "-n",
        NS,
        &format!("mvm/{vm}"),
        "--type=merge",
        "-p",
        &format!(r#"{{"spec":{{"suspend":{suspend}}}}}"#),
    ]);
}

pub(super) fn suspend_and_resume_keep_the_guest(ctx: &Ctx) {
    let service = ctx.get("service/web-b", "{.spec.clusterIP}");
    let (pod_uid, pod_ip) = (
        ctx.pod_uid("web-b"),
        ctx.get("pod/vm-web-b", "{.status.podIP}"),
    );
    let (before, note) = guest_state(ctx, &service, "?set=kept", Duration::from_secs(60));
    assert_eq!(note, "kept");

    patch_suspend(ctx, "web-b", true);
    ctx.cluster.wait_jsonpath(
        NS,
        "mvm/web-b",
        "{.status.phase}",
        Duration::from_secs(120),
        |phase| phase == "Suspended",
    );
    let told = ctx.told("web-b");
    assert!(
        told.contains("suspended=true suspended: saved on"),
        "the MicroVM says it is saved: {told}"
    );
    assert!(!ctx.ready("web-b"), "a suspended VM is not Ready");
    assert_eq!(
        ctx.pod_uid("web-b"),
        pod_uid,
        "the VM pod stays while the VM is suspended"
    );
    let snapshots = ctx.up.nodes[1].agent_state_dir.join("snapshots");
    let uid = ctx.get("mvm/web-b", "{.metadata.uid}");
    assert!(
        snapshots.join(&uid).join("qemu.vmstate").is_file(),
        "the snapshot is in {}",
        snapshots.display()
    );
    assert!(
        pids_matching(&uid).is_empty(),
        "no VMM runs for a suspended VM"
    );

    patch_suspend(ctx, "web-b", false);
    ctx.wait_ready("web-b", Duration::from_secs(120));
    let (after, note) = guest_state(ctx, &service, "", Duration::from_secs(60));
    assert_eq!(note, "kept", "the tmpfs note survives the suspend");
    assert!(
        after >= before && after < before + 60.0,
        "the guest's uptime goes on from {before} s (now {after} s): it was restored, not booted"
    );
    assert_eq!(ctx.get("pod/vm-web-b", "{.status.podIP}"), pod_ip);
    assert!(
        !snapshots.join(&uid).exists(),
        "a restored VM's snapshot is removed"
    );
}

/// Every node's snapshot directory is empty (or absent) once the test's VMs are deleted.
pub(super) fn no_snapshot_is_left(ctx: &Ctx) {
    for node in &ctx.up.nodes {
        let dir = node.agent_state_dir.join("snapshots");
        wait_until(Duration::from_secs(30), "no snapshot on the node", || {
            std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none())
        });
    }
}
