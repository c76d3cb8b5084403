//! A pool's warm VM claimed by a MicroVM (issue #20), with the simulated VMM (a real `sleep`
//! process): the claim renames the VM with no boot, and from then on only the claimant's
//! applies and deletes count, across a re-adoption too.

use super::*;
use crate::vm::GuestMetadata;

/// The claimant's apply of the warm VM `w`: W's uid and hash, C's name, owner and metadata.
fn claim(w: &str, kernel: &Path, claimant: &str, hostname: &str) -> ApplyRequest {
    let mut request = request(w, kernel, "h", 1, DesiredState::Running);
    request.spec.name = format!("{claimant}-name");
    request.owner = Some(uid(claimant));
    request.metadata = GuestMetadata {
        hostname: hostname.into(),
        labels: [("app".to_string(), hostname.to_string())].into(),
        user_data: Some("#cloud-config\n".into()),
    };
    request
}

#[tokio::test]
async fn a_claim_renames_the_warm_vm_with_no_boot_and_only_the_claimant_counts() {
    let (tmp, kernel) = dir_with_kernel();
    let sup = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    let warm_request = request("w", &kernel, "h", 1, DesiredState::Running);
    let warm_name = warm_request.spec.name.clone();
    sup.apply(warm_request.clone()).await;
    let warm = wait_state(&sup, "w", RunState::Running).await;
    assert_eq!(warm.owner, None);

    let (mut events, _) = sup.subscribe();
    let claimed = sup.apply(claim("w", &kernel, "c", "web-1")).await;
    assert_eq!(claimed.pid, warm.pid, "a claim boots nothing");
    assert_eq!(
        claimed.name, "c-name",
        "the VM answers to its claimant's name"
    );
    assert_eq!(claimed.owner, Some(uid("c")));
    assert_eq!(
        claimed.uid,
        uid("w"),
        "the node keeps it under the warm VM's uid"
    );
    let event = events.try_recv().expect("the rename is published");
    match event.event {
        VmEvent::Changed(status) => assert_eq!(status.name, "c-name"),
        other => panic!("{other:?}"),
    }
    let held = sup
        .inner
        .store
        .read_spec(&uid("w"))
        .ok()
        .flatten()
        .expect("spec");
    assert_eq!(held.owner, Some(uid("c")));
    assert_eq!(held.metadata.hostname, "web-1");

    // A stale reconcile of the warm MicroVM, and a second claim: nothing changes.
    let stale = sup.apply(warm_request.clone()).await;
    assert_eq!((stale.name.as_str(), stale.pid), ("c-name", warm.pid));
    let stale = sup
        .apply(request("w", &kernel, "other", 1, DesiredState::Stopped))
        .await;
    assert_eq!(stale.state, RunState::Running, "W's own stop is ignored");
    let second = sup.apply(claim("w", &kernel, "d", "web-2")).await;
    assert_eq!(second.owner, Some(uid("c")));
    assert_ne!(second.name, warm_name);

    // The claimant's new labels reach the held request with no boot.
    let relabelled = sup.apply(claim("w", &kernel, "c", "web-1b")).await;
    assert_eq!(relabelled.pid, warm.pid);
    let held = sup
        .inner
        .store
        .read_spec(&uid("w"))
        .ok()
        .flatten()
        .expect("spec");
    assert_eq!(held.metadata.labels["app"], "web-1b");

    // Deletes from the warm VM itself or a stranger leave it; the claimant's removes it.
    assert!(
        !sup.delete_for(&uid("w"), Some(Duration::ZERO), None)
            .await
            .expect("delete")
    );
    assert!(
        !sup.delete_for(&uid("w"), Some(Duration::ZERO), Some(uid("d")))
            .await
            .expect("delete")
    );
    assert_eq!(sup.get(&uid("w")).expect("held").pid, warm.pid);

    // A new agent re-adopts the VM with its owner, name and metadata.
    sup.shutdown(false).await;
    let next = supervisor(tmp.path(), Arc::new(SimulatedBackend::default()), true).await;
    assert_eq!(next.adopt().await.expect("adopt"), 1);
    let adopted = next.get(&uid("w")).expect("held");
    assert_eq!(
        (adopted.name.as_str(), adopted.owner.clone(), adopted.pid),
        ("c-name", Some(uid("c")), warm.pid)
    );
    let stale = next.apply(warm_request).await;
    assert_eq!(stale.name, "c-name", "still the claimant's after a restart");
    assert!(
        !next
            .delete_for(&uid("w"), Some(Duration::ZERO), None)
            .await
            .expect("delete")
    );
    assert!(
        next.delete_for(&uid("w"), Some(Duration::ZERO), Some(uid("c")))
            .await
            .expect("delete")
    );
    assert!(next.get(&uid("w")).is_none());
    assert!(!tmp.path().join("vms/w").exists());
    next.shutdown(false).await;
}
