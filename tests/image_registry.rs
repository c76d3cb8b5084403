//! Pulling guest images from a real registry (Debian's `docker-registry` on loopback, images
//! pushed with `skopeo`) into the node cache: every layout kind, a shared cache safe under
//! concurrent pulls that survives a restart and pins digests, garbage collection that spares
//! leased entries, basic auth with a pull secret, and each failure with its reason and nothing
//! half-written.

mod common;
mod image_support;

use common::net::runtime;

use std::path::Path;

use ignis::ErrorReason;
use ignis::agent::image::{
    DiskFormat, ImageError, ImageKind, ImageStore, ImageStoreConfig, PullRequest,
    RegistryCredentials, ResolvedImage,
};
use image_support::*;

fn anon() -> RegistryCredentials {
    RegistryCredentials::anonymous()
}

async fn pull(
    store: &ImageStore,
    holder: &str,
    kind: ImageKind,
    reference: &str,
    credentials: &RegistryCredentials,
) -> Result<ResolvedImage, ImageError> {
    store
        .pull(PullRequest {
            holder,
            kind,
            reference,
            credentials,
        })
        .await
}

/// Nothing but complete entries: no staging, no trash.
fn assert_clean(cache: &Path) {
    for sub in ["staging", "trash"] {
        let left = tree(&cache.join(sub));
        assert!(left.is_empty(), "{sub} not empty: {left:?}");
    }
}

fn entry_count(cache: &Path) -> usize {
    ImageKind::ALL
        .iter()
        .map(|k| {
            tree(&cache.join("entries").join(k.as_str()))
                .iter()
                .filter(|p| !p.contains('/'))
                .count()
        })
        .sum()
}

#[test]
fn every_layout_kind_becomes_the_file_a_vmm_boots() {
    let reg = Registry::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    let kernel = fake_bzimage(64 * 1024);
    oci_image(
        &layout,
        "kernel",
        &[tar_layer(&[
            Item::Dir("boot"),
            Item::File("boot/vmlinuz-6.1.0", &kernel),
            Item::Symlink("boot/vmlinuz", "vmlinuz-6.1.0"),
        ])],
    );
    oci_image(
        &layout,
        "initrd",
        &[tar_layer(&[
            Item::Dir("boot"),
            Item::File("boot/initrd.img", b"070701..."),
        ])],
    );
    // A filesystem in two layers; the second deletes a file of the first.
    oci_image(
        &layout,
        "fs",
        &[
            tar_layer(&[
                Item::Dir("etc"),
                Item::File("etc/hello", b"hello from the image\n"),
                Item::File("etc/gone", b"deleted by the upper layer\n"),
                Item::Dir("sbin"),
                Item::File("sbin/init", b"#!/bin/sh\n"),
            ]),
            tar_layer(&[Item::File("etc/.wh.gone", b"")]),
        ],
    );
    let qcow2_bytes = qcow2_bytes(dir.path(), "64M", None);
    disk_image(&layout, "containerdisk", &[("disk.qcow2", &qcow2_bytes)]);
    let raw = vec![0x55u8; 1 << 20];
    disk_image(&layout, "rawdisk", &[("root.img", &raw)]);
    for (tag, repo) in [
        ("kernel", "k/kernel:v1"),
        ("initrd", "k/initrd:v1"),
        ("fs", "k/fs:v1"),
        ("containerdisk", "k/cdisk:v1"),
        ("rawdisk", "k/raw:v1"),
    ] {
        reg.push(&layout, tag, repo);
    }

    let cache = dir.path().join("cache");
    runtime().block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("open");
        let r = |repo: &str| format!("{}/{repo}", reg.addr);

        let k = pull(
            &store,
            "vm-1",
            ImageKind::Kernel,
            &r("k/kernel:v1"),
            &anon(),
        )
        .await
        .expect("kernel");
        assert_eq!(std::fs::read(&k.path).expect("read kernel"), kernel);
        assert!(k.digest.starts_with("sha256:"));
        assert_eq!(k.path.file_name().expect("name"), "vmlinuz");

        let i = pull(
            &store,
            "vm-1",
            ImageKind::Initrd,
            &r("k/initrd:v1"),
            &anon(),
        )
        .await
        .expect("initrd");
        assert_eq!(std::fs::read(&i.path).expect("read initrd"), b"070701...");

        let fs = pull(&store, "vm-1", ImageKind::Rootfs, &r("k/fs:v1"), &anon())
            .await
            .expect("fs rootfs");
        assert_eq!(fs.disk_format, Some(DiskFormat::Raw));
        assert!(fs.from_filesystem);
        assert_eq!(ext4_cat(&fs.path, "/etc/hello"), "hello from the image\n");
        assert_eq!(ext4_cat(&fs.path, "/sbin/init"), "#!/bin/sh\n");
        assert_eq!(ext4_cat(&fs.path, "/etc/gone"), "", "whiteout honoured");

        let cd = pull(&store, "vm-1", ImageKind::Rootfs, &r("k/cdisk:v1"), &anon())
            .await
            .expect("containerDisk");
        assert_eq!(cd.disk_format, Some(DiskFormat::Qcow2));
        assert!(!cd.from_filesystem);
        assert_eq!(std::fs::read(&cd.path).expect("read qcow2"), qcow2_bytes);

        let raw_disk = pull(&store, "vm-1", ImageKind::Rootfs, &r("k/raw:v1"), &anon())
            .await
            .expect("raw containerDisk");
        assert_eq!(raw_disk.disk_format, Some(DiskFormat::Raw));
        assert_eq!(std::fs::read(&raw_disk.path).expect("raw"), raw);

        // The same image read as another kind is a layout error, not a guess.
        let e = pull(
            &store,
            "vm-1",
            ImageKind::Kernel,
            &r("k/initrd:v1"),
            &anon(),
        )
        .await
        .expect_err("initrd image as kernel");
        assert_eq!(e.reason(), "ImageBadLayout");
        assert!(e.to_string().contains("/boot/vmlinuz is missing"), "{e}");
        assert_clean(&cache);
        assert_eq!(entry_count(&cache), 5);
    });
}

#[test]
fn the_cache_is_shared_pinned_by_digest_and_survives_a_restart() {
    let mut reg = Registry::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    let v1 = fake_bzimage(4 << 20);
    let mut v2 = v1.clone();
    v2[0x300] = 1;
    kernel_image(&layout, "v1", &v1);
    kernel_image(&layout, "v2", &v2);
    reg.push(&layout, "v1", "k/kernel:stable");
    let reference = format!("{}/k/kernel:stable", reg.addr);
    let cache = dir.path().join("cache");
    let rt = runtime();

    let first = rt.block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("open");
        // Four VMs pull the same image at once, on the runtime's threads: one download, one
        // entry, one path.
        let tasks: Vec<_> = ["vm-a", "vm-b", "vm-c", "vm-d"]
            .into_iter()
            .map(|holder| {
                let store = store.clone();
                let reference = reference.clone();
                tokio::spawn(async move {
                    pull(&store, holder, ImageKind::Kernel, &reference, &anon()).await
                })
            })
            .collect();
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.expect("join").expect("pull"));
        }
        let a = got[0].clone();
        for other in &got[1..] {
            assert_eq!(other.path, a.path);
            assert_eq!(other.digest, a.digest);
        }
        assert_eq!(entry_count(&cache), 1);
        let entries = store.entries().expect("entries");
        assert_eq!(entries[0].holders, ["vm-a", "vm-b", "vm-c", "vm-d"]);
        assert_clean(&cache);
        a
    });

    // The tag moves; a VM pinned to its digest keeps what it had.
    reg.push(&layout, "v2", "k/kernel:stable");
    rt.block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("reopen");
        let moved = pull(&store, "vm-e", ImageKind::Kernel, &reference, &anon())
            .await
            .expect("moved tag");
        assert_ne!(moved.digest, first.digest);
        assert_eq!(std::fs::read(&moved.path).expect("v2"), v2);
        assert_eq!(entry_count(&cache), 2);
    });

    // Agent restart with the registry gone: the pinned reference is served from the cache.
    reg.stop();
    rt.block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("reopen");
        let pinned = first.pinned_reference();
        let again = pull(&store, "vm-a", ImageKind::Kernel, &pinned, &anon())
            .await
            .expect("pinned pull without a registry");
        assert_eq!(again.path, first.path);
        assert_eq!(std::fs::read(&again.path).expect("v1"), v1);
        // A tag needs the registry to resolve: unreachable, with nothing written.
        let e = pull(&store, "vm-f", ImageKind::Kernel, &reference, &anon())
            .await
            .expect_err("registry down");
        assert_eq!(e.reason(), "RegistryUnreachable", "{e}");
        assert_clean(&cache);
    });
}

#[test]
fn gc_removes_least_recently_used_images_no_vm_holds() {
    let reg = Registry::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    for (tag, byte) in [("a", 1u8), ("b", 2), ("c", 3)] {
        let mut k = fake_bzimage(1 << 20);
        k[0x300] = byte;
        kernel_image(&layout, tag, &k);
        reg.push(&layout, tag, &format!("k/{tag}:v1"));
    }
    let cache = dir.path().join("cache");
    runtime().block_on(async {
        let mut config = ImageStoreConfig::new(&cache);
        config.max_bytes = 2 << 20; // room for about one 1 MiB kernel and its record
        let store = ImageStore::open(config).await.expect("open");
        let r = |t: &str| format!("{}/k/{t}:v1", reg.addr);
        let a = pull(&store, "vm-1", ImageKind::Kernel, &r("a"), &anon())
            .await
            .expect("a");
        let b = pull(&store, "vm-2", ImageKind::Kernel, &r("b"), &anon())
            .await
            .expect("b");
        // Both leased: over the limit, yet nothing may go.
        assert_eq!(entry_count(&cache), 2);
        assert!(a.path.exists() && b.path.exists());

        store.release("vm-1").await.expect("release vm-1");
        store.release("vm-1").await.expect("release is idempotent");
        let report = store.gc().await.expect("gc");
        assert_eq!(report.removed.len(), 1);
        assert_eq!(report.removed[0].digest(), a.digest);
        assert!(!a.path.exists());
        assert!(b.path.exists(), "a leased entry is never removed");

        // A new pull runs GC itself once published: the unleased b goes when c arrives.
        store.release("vm-2").await.expect("release vm-2");
        let c = pull(&store, "vm-3", ImageKind::Kernel, &r("c"), &anon())
            .await
            .expect("c");
        assert!(!b.path.exists());
        assert!(c.path.exists());
        assert_eq!(entry_count(&cache), 1);
        assert_clean(&cache);
    });
}

#[test]
fn basic_auth_registry_takes_the_pull_secret() {
    let reg = Registry::start(true);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    let k = fake_bzimage(8192);
    kernel_image(&layout, "k", &k);
    reg.push(&layout, "k", "private/kernel:v1");
    let reference = format!("{}/private/kernel:v1", reg.addr);
    let cache = dir.path().join("cache");
    runtime().block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("open");
        let e = pull(&store, "vm-1", ImageKind::Kernel, &reference, &anon())
            .await
            .expect_err("anonymous");
        assert_eq!(e.reason(), "ImageUnauthorized", "{e}");
        let wrong = RegistryCredentials::basic(&reg.addr, USER, "wrong");
        let e = pull(&store, "vm-1", ImageKind::Kernel, &reference, &wrong)
            .await
            .expect_err("wrong password");
        assert_eq!(e.reason(), "ImageUnauthorized", "{e}");
        assert_eq!(entry_count(&cache), 0);
        assert_clean(&cache);

        // What kubectl create secret docker-registry writes (.dockerconfigjson).
        use base64::Engine;
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
        let secret = format!(
            r#"{{"auths":{{"http://{}":{{"auth":"{auth}"}}}}}}"#,
            reg.addr
        );
        let creds = RegistryCredentials::from_docker_config(secret.as_bytes()).expect("secret");
        let got = pull(&store, "vm-1", ImageKind::Kernel, &reference, &creds)
            .await
            .expect("with the pull secret");
        assert_eq!(std::fs::read(&got.path).expect("kernel"), k);
        // Never on disk: no file in the cache holds the password.
        for f in tree(&cache) {
            let p = cache.join(&f);
            if p.is_file() {
                let bytes = std::fs::read(&p).expect("read");
                assert!(
                    !String::from_utf8_lossy(&bytes).contains(PASSWORD),
                    "{f} holds the password"
                );
            }
        }
    });
}

#[test]
fn each_pull_failure_has_its_reason_and_leaves_nothing() {
    let reg = Registry::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    let k = fake_bzimage(256 * 1024);
    kernel_image(&layout, "good", &k);
    oci_image(
        &layout,
        "nokernel",
        &[tar_layer(&[Item::Dir("etc"), Item::File("etc/x", b"x")])],
    );
    kernel_image(&layout, "notakernel", b"#!/bin/sh\necho hi\n");
    disk_image(&layout, "twodisks", &[("a.img", b"a"), ("b.img", b"b")]);
    let backed = qcow2_bytes(dir.path(), "1M", Some(Path::new("/etc/hostname")));
    disk_image(&layout, "backed", &[("d.qcow2", &backed)]);
    let corrupt_digest = kernel_image(&layout, "corrupt", &fake_bzimage(300_000));
    for (tag, repo) in [
        ("good", "f/good:v1"),
        ("nokernel", "f/nokernel:v1"),
        ("notakernel", "f/notakernel:v1"),
        ("twodisks", "f/twodisks:v1"),
        ("backed", "f/backed:v1"),
        ("corrupt", "f/corrupt:v1"),
    ] {
        reg.push(&layout, tag, repo);
    }
    // Corrupt the stored layer of "corrupt" (same length, other bytes): the registry serves
    // it under its digest unchanged.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(corrupt_digest.trim_start_matches("sha256:")),
        )
        .expect("manifest"),
    )
    .expect("json");
    let layer_digest = manifest["layers"][0]["digest"].as_str().expect("layer");
    let blob = reg.blob_path(layer_digest);
    let mut bytes = std::fs::read(&blob).expect("stored blob");
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&blob, bytes).expect("corrupt");

    let cache = dir.path().join("cache");
    runtime().block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("open");
        let r = |repo: &str| format!("{}/{repo}", reg.addr);
        let closed = format!("127.0.0.1:{}/f/good:v1", free_port());
        let cases: Vec<(ImageKind, String, &str, &str)> = vec![
            (
                ImageKind::Kernel,
                r("f/good:nope"),
                "ImageNotFound",
                "manifest unknown",
            ),
            (
                ImageKind::Kernel,
                r("f/absent:v1"),
                "ImageNotFound",
                "unknown",
            ),
            (ImageKind::Kernel, closed, "RegistryUnreachable", "onnect"),
            (
                ImageKind::Kernel,
                r("f/nokernel:v1"),
                "ImageBadLayout",
                "/boot/vmlinuz is missing",
            ),
            (
                ImageKind::Kernel,
                r("f/notakernel:v1"),
                "ImageBadLayout",
                "neither a bzImage",
            ),
            (
                ImageKind::Rootfs,
                r("f/twodisks:v1"),
                "ImageBadLayout",
                "exactly one disk",
            ),
            (
                ImageKind::Rootfs,
                r("f/backed:v1"),
                "ImageBadLayout",
                "backing file",
            ),
            (
                ImageKind::Kernel,
                r("f/corrupt:v1"),
                "ImageDigestMismatch",
                "sha256",
            ),
            (
                ImageKind::Kernel,
                "Not A Reference!".into(),
                "InvalidImageReference",
                "not valid",
            ),
        ];
        for (kind, reference, reason, needle) in cases {
            let e = pull(&store, "vm-1", kind, &reference, &anon())
                .await
                .expect_err(&reference);
            assert_eq!(e.reason(), reason, "{reference}: {e}");
            let text = format!("{e}");
            assert!(
                text.contains(needle),
                "{reference}: {text:?} lacks {needle:?}"
            );
            assert_eq!(entry_count(&cache), 0, "{reference} left an entry");
            assert_clean(&cache);
        }
        // After every failure, the good image still pulls.
        pull(&store, "vm-1", ImageKind::Kernel, &r("f/good:v1"), &anon())
            .await
            .expect("good");
        assert_eq!(entry_count(&cache), 1);
    });
}

#[test]
fn a_cancelled_pull_leaves_nothing_and_the_next_one_completes() {
    let reg = Registry::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    let big = fake_bzimage(48 << 20);
    kernel_image(&layout, "big", &big);
    reg.push(&layout, "big", "k/big:v1");
    let reference = format!("{}/k/big:v1", reg.addr);
    let cache = dir.path().join("cache");
    let rt = runtime();
    // Cut the pull short at several points: during the download, the apply, the publish.
    for cut_ms in [30u64, 150, 600] {
        rt.block_on(async {
            let store = ImageStore::open(ImageStoreConfig::new(&cache))
                .await
                .expect("open");
            let pulled = tokio::time::timeout(
                std::time::Duration::from_millis(cut_ms),
                pull(&store, "vm-1", ImageKind::Kernel, &reference, &anon()),
            )
            .await;
            if let Ok(done) = pulled {
                // Fast enough to finish: a whole entry, then start over.
                done.expect("pull");
                store.release("vm-1").await.expect("release");
                let mut config = ImageStoreConfig::new(&cache);
                config.max_bytes = 0;
                ImageStore::open(config)
                    .await
                    .expect("open")
                    .gc()
                    .await
                    .expect("gc");
            }
        });
        // What an agent finds on its next start: no staging, no half entry.
        rt.block_on(async {
            ImageStore::open(ImageStoreConfig::new(&cache))
                .await
                .expect("reopen");
        });
        assert_clean(&cache);
        assert_eq!(entry_count(&cache), 0, "cut at {cut_ms} ms left an entry");
    }
    rt.block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("open");
        let k = pull(&store, "vm-1", ImageKind::Kernel, &reference, &anon())
            .await
            .expect("complete pull");
        assert_eq!(std::fs::read(&k.path).expect("kernel"), big);
    });
}

/// KEP-2535's rule: an image that needed credentials is served from the node's cache only to a
/// VM whose own credentials the registry accepts for it, even when pinned by digest.
#[test]
fn a_cached_private_image_is_served_only_to_credentials_the_registry_accepts() {
    let reg = Registry::start(true);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    let k = fake_bzimage(8192);
    kernel_image(&layout, "k", &k);
    reg.push(&layout, "k", "private/kernel:v1");
    let reference = format!("{}/private/kernel:v1", reg.addr);
    let cache = dir.path().join("cache");
    let good = RegistryCredentials::basic(&reg.addr, USER, PASSWORD);
    let wrong = RegistryCredentials::basic(&reg.addr, USER, "wrong");
    runtime().block_on(async {
        let store = ImageStore::open(ImageStoreConfig::new(&cache))
            .await
            .expect("open");
        let owner = pull(&store, "vm-owner", ImageKind::Kernel, &reference, &good)
            .await
            .expect("owner pulls with its secret");
        let pinned = owner.pinned_reference();
        // Another namespace's VM names the cached digest: without credentials, or with
        // credentials the registry refuses, it gets nothing and no lease.
        for (holder, creds) in [("vm-anon", anon()), ("vm-wrong", wrong.clone())] {
            let e = pull(&store, holder, ImageKind::Kernel, &pinned, &creds)
                .await
                .expect_err(holder);
            assert_eq!(e.reason(), "ImageUnauthorized", "{holder}: {e}");
        }
        let entries = store.entries().expect("entries");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].holders, ["vm-owner"]);
        // A VM whose secret the registry accepts shares the cached entry.
        let other = pull(&store, "vm-friend", ImageKind::Kernel, &pinned, &good)
            .await
            .expect("accepted credentials");
        assert_eq!(other.path, owner.path);
        assert_eq!(std::fs::read(&other.path).expect("kernel"), k);
        assert_eq!(entry_count(&cache), 1);
        assert_clean(&cache);
    });
}

#[test]
fn an_image_over_the_size_limits_is_refused_permanently_and_leaves_nothing() {
    let reg = Registry::start(false);
    let dir = tempfile::tempdir().expect("tempdir");
    let layout = dir.path().join("oci");
    kernel_image(&layout, "k", &fake_bzimage(1 << 20));
    reg.push(&layout, "k", "big/kernel:v1");
    let reference = format!("{}/big/kernel:v1", reg.addr);
    let cache = dir.path().join("cache");
    runtime().block_on(async {
        for (compressed, unpacked) in [(64, u64::MAX), (u64::MAX, 64 << 10)] {
            let mut config = ImageStoreConfig::new(&cache);
            config.limits.compressed_bytes = compressed;
            config.limits.unpacked_bytes = unpacked;
            let store = ImageStore::open(config).await.expect("open");
            let e = pull(&store, "vm-1", ImageKind::Kernel, &reference, &anon())
                .await
                .expect_err("too large");
            assert_eq!(e.reason(), "ImageTooLarge", "{e}");
            assert!(e.is_permanent());
            assert!(e.to_string().contains("--image-max-"), "{e}");
            assert_eq!(entry_count(&cache), 0);
            assert_clean(&cache);
        }
    });
}
