//! Images through the agent's gRPC API, the way the controller drives it, with real parts:
//! Debian's `docker-registry` on loopback (one with htpasswd basic auth), images pushed with
//! `skopeo`, the demo guest's kernel booted by QEMU (TCG) from a kernel image.
//!
//! - each pull failure shows in the VM's status with its reason and the registry's message
//!   while it is retried (or fails the VM when it is permanent), and leaves nothing in the
//!   cache, and nothing of the VM after `DeleteVM`;
//! - a pull secret for a basic-auth registry arrives with an apply that changes nothing, and
//!   the retried pull takes it; the VM boots; its status shows the resolved digest;
//! - a tag that moves changes nothing: the next run boots the pinned digest from the cache,
//!   with the registry gone;
//! - `DeleteVM` releases the VM's leases.
//!
//! Runs in the host's network namespace with guest networking off (the registry is on
//! loopback); DHCP and disks are in `tests/image_guest_boot.rs`.

mod common;
mod image_support;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use ignis::agent::{AcceleratorFlag, AgentConfig};
use ignis::proto;
use image_support::*;

const BOOT: Duration = Duration::from_secs(90);
const SEEN: Duration = Duration::from_secs(30);

fn config(state_dir: &Path) -> AgentConfig {
    let mut config = AgentConfig::local(state_dir);
    config.accelerator = AcceleratorFlag::Tcg;
    config.boot_timeout = BOOT;
    allow_test_guests(&mut config);
    // The host's own namespace: never reconfigure it.
    config.network = None;
    config
}

/// The demo guest from a kernel image (`kernel_image`), its initrd from the node.
fn image_spec(
    uid: &str,
    kernel_image: &str,
    guest: &ignis::agent::guest::DemoGuest,
) -> proto::VmSpec {
    proto::VmSpec {
        kernel_path: String::new(),
        kernel_image: kernel_image.into(),
        ..demo_spec(uid, guest)
    }
}

fn docker_config(registry: &str) -> Vec<u8> {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    serde_json::json!({"auths": {registry: {"auth": auth}}})
        .to_string()
        .into_bytes()
}

/// Entries, staging and trash of the node's cache, and the leases.
fn cache_state(state: &Path) -> (Vec<String>, Vec<String>, Vec<String>) {
    let cache = state.join("images");
    let entries = ["kernel", "initrd", "rootfs"]
        .iter()
        .flat_map(|k| {
            tree(&cache.join("entries").join(k))
                .into_iter()
                .filter(|p| !p.contains('/'))
                .map(move |p| format!("{k}/{p}"))
        })
        .collect();
    let mut partial = tree(&cache.join("staging"));
    partial.extend(tree(&cache.join("trash")));
    (entries, partial, tree(&cache.join("leases")))
}

async fn delete(
    client: &mut proto::agent_client::AgentClient<tonic::transport::Channel>,
    uid: &str,
) {
    client
        .delete_vm(proto::DeleteVmRequest {
            uid: uid.into(),
            grace_period_seconds: 1,
            ..Default::default()
        })
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_failures_show_their_reason_while_retried_and_leave_nothing() {
    if !qemu_present() {
        return;
    }
    let reg = Registry::start(false);
    let layout = tempfile::tempdir().expect("layout");
    let layout = layout.path().join("oci");
    // A kernel image without /boot/vmlinuz; a kernel image whose stored layer is corrupted.
    oci_image(
        &layout,
        "nokernel",
        &[tar_layer(&[
            Item::Dir("boot"),
            Item::File("boot/other", b"x"),
        ])],
    );
    let corrupt = kernel_image(&layout, "corrupt", &fake_bzimage(4096));
    reg.push(&layout, "nokernel", "f/nokernel:v1");
    reg.push(&layout, "corrupt", "f/corrupt:v1");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(corrupt.trim_start_matches("sha256:")),
        )
        .expect("manifest"),
    )
    .expect("json");
    let blob = reg.blob_path(manifest["layers"][0]["digest"].as_str().expect("layer"));
    let mut bytes = std::fs::read(&blob).expect("blob");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&blob, bytes).expect("corrupt the blob");

    let guest = demo_guest();
    let tmp = tempfile::tempdir().expect("tmp");
    let (agent, mut client, shutdown) = serve_with_client(config(tmp.path())).await;

    let closed = format!("127.0.0.1:{}/f/k:v1", free_port());
    let retried = [
        (
            "unknown-tag",
            format!("{}/f/nokernel:nope", reg.addr),
            "ImageNotFound",
            "manifest unknown",
        ),
        ("unreachable", closed, "RegistryUnreachable", "onnect"),
        (
            "corrupt",
            format!("{}/f/corrupt:v1", reg.addr),
            "ImageDigestMismatch",
            "sha256",
        ),
    ];
    for (uid, reference, reason, needle) in retried {
        let applied = client
            .apply_vm(apply_request(image_spec(uid, &reference, &guest)))
            .await
            .expect("apply")
            .into_inner();
        // The apply answers at once, while the pull goes on.
        assert_eq!(state_of(&applied), proto::VmState::Creating, "{applied:?}");
        assert!(applied.pulling.is_some(), "{applied:?}");
        let vm = wait_vm(&mut client, uid, SEEN, |vm| {
            vm.pulling
                .as_ref()
                .and_then(|p| p.failure.as_ref())
                .is_some_and(|f| f.attempts >= 2)
        })
        .await;
        let failure = vm
            .pulling
            .as_ref()
            .and_then(|p| p.failure.clone())
            .expect("failure");
        assert_eq!(failure.reason, reason, "{uid}: {failure:?}");
        assert!(
            failure.message.contains(needle),
            "{uid}: {failure:?} lacks {needle:?}"
        );
        assert!(failure.retry_at_unix_ms > 0);
        assert_eq!(
            state_of(&vm),
            proto::VmState::Creating,
            "retried, not failed"
        );
        let (entries, partial, _) = cache_state(tmp.path());
        assert!(
            entries.is_empty() && partial.is_empty(),
            "{uid}: {entries:?} {partial:?}"
        );
        delete(&mut client, uid).await;
        assert!(
            !tmp.path().join("vms").join(uid).exists(),
            "{uid} left its directory"
        );
    }

    // A permanent failure fails the VM, with nothing but its status left.
    let uid = "bad-layout";
    client
        .apply_vm(apply_request(image_spec(
            uid,
            &format!("{}/f/nokernel:v1", reg.addr),
            &guest,
        )))
        .await
        .expect("apply");
    let vm = wait_vm(&mut client, uid, SEEN, |vm| {
        state_of(vm) == proto::VmState::Failed
    })
    .await;
    let exit = vm.exit.clone().expect("exit");
    assert_eq!(exit.reason, "ImageBadLayout", "{exit:?}");
    assert!(
        exit.permanent && exit.message.contains("/boot/vmlinuz"),
        "{exit:?}"
    );
    assert!(vm.pulling.is_none());
    let vm_dir = tmp.path().join("vms").join(uid);
    assert_eq!(files_under(&vm_dir), [Path::new("status.json")]);
    let (entries, partial, _) = cache_state(tmp.path());
    assert!(
        entries.is_empty() && partial.is_empty(),
        "{entries:?} {partial:?}"
    );
    delete(&mut client, uid).await;
    let (_, _, leases) = cache_state(tmp.path());
    assert!(leases.is_empty(), "{leases:?}");

    shutdown.cancel();
    agent.wait().await.expect("agent stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_secret_fixes_a_refused_pull_and_a_moved_tag_changes_nothing() {
    if !qemu_present() {
        return;
    }
    let mut reg = Registry::start(true);
    let guest = demo_guest();
    let dir = tempfile::tempdir().expect("layout");
    let layout = dir.path().join("oci");
    let kernel = std::fs::read(&guest.kernel).expect("demo kernel");
    let digest = kernel_image(&layout, "demo", &kernel);
    kernel_image(&layout, "moved", &fake_bzimage(8192));
    reg.push(&layout, "demo", "guest/kernel:v1");
    let reference = format!("{}/guest/kernel:v1", reg.addr);

    let tmp = tempfile::tempdir().expect("tmp");
    let (agent, mut client, shutdown) = serve_with_client(config(tmp.path())).await;
    let uid = "from-image";

    // Without the Secret: refused by the registry, retried.
    client
        .apply_vm(apply_request(image_spec(uid, &reference, &guest)))
        .await
        .expect("apply");
    let vm = wait_vm(&mut client, uid, SEEN, |vm| {
        vm.pulling.as_ref().is_some_and(|p| p.failure.is_some())
    })
    .await;
    let failure = vm.pulling.and_then(|p| p.failure).expect("failure");
    assert_eq!(failure.reason, "ImageUnauthorized", "{failure:?}");

    // The same apply with the Secret (what the controller sends after each failure): the
    // retry uses it at once and the guest boots.
    let started = Instant::now();
    let mut with_secret = apply_request(image_spec(uid, &reference, &guest));
    with_secret.pull_secrets = vec![docker_config(&reg.addr)];
    client
        .apply_vm(with_secret)
        .await
        .expect("apply with the secret");
    let vm = wait_vm(&mut client, uid, BOOT, |vm| vm.ready).await;
    println!(
        "MEASURE pull with the new secret to ready: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(state_of(&vm), proto::VmState::Running);
    assert_eq!(vm.images.len(), 1, "{vm:?}");
    assert_eq!(vm.images[0].kind(), proto::ImageKind::Kernel);
    assert_eq!(vm.images[0].reference, reference);
    assert_eq!(vm.images[0].digest, digest);
    assert!(vm.pulling.is_none());
    // The Secret never reaches the node's disk.
    for file in files_under(tmp.path()) {
        let bytes = std::fs::read(tmp.path().join(&file)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(PASSWORD),
            "{} holds the password",
            file.display()
        );
    }

    // The tag moves and the registry goes away: run 2 boots the digest run 1 resolved.
    reg.push(&layout, "moved", "guest/kernel:v1");
    reg.stop();
    let mut stop = apply_request(image_spec(uid, &reference, &guest));
    stop.desired_state = proto::DesiredState::Stopped as i32;
    client.apply_vm(stop).await.expect("stop");
    wait_vm(&mut client, uid, BOOT, |vm| {
        state_of(vm) == proto::VmState::Stopped
    })
    .await;
    let mut run2 = apply_request(image_spec(uid, &reference, &guest));
    run2.run = 2;
    client.apply_vm(run2).await.expect("run 2");
    let vm = wait_vm(&mut client, uid, BOOT, |vm| vm.run == 2 && vm.ready).await;
    assert_eq!(
        vm.images[0].digest, digest,
        "the pinned digest, not the moved tag"
    );
    let holders = tree(&tmp.path().join("images/leases"));
    assert!(holders.iter().any(|h| h.starts_with(uid)), "{holders:?}");

    delete(&mut client, uid).await;
    wait_pid_gone(vm.pid, Duration::from_secs(10)).await;
    let (entries, partial, leases) = cache_state(tmp.path());
    assert_eq!(entries.len(), 1, "the entry stays cached: {entries:?}");
    assert!(
        partial.is_empty() && leases.is_empty(),
        "{partial:?} {leases:?}"
    );
    assert!(!tmp.path().join("vms").join(uid).exists());
    shutdown.cancel();
    agent.wait().await.expect("agent stops");
}
