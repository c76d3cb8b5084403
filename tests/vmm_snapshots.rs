//! Suspend and resume on Firecracker and Cloud Hypervisor, checked as `vmm_specs.rs` checks the
//! rest: the planned snapshot and restore requests against the VMMs' official API specs
//! (bodies, paths, and the order each VMM accepts), then the whole round trip — boot, snapshot,
//! kill, a fresh VMM, restore, start resumes — against the test double
//! (`ignis::testing::vmm`), which models what the real programs do around snapshots.

mod vmm_support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ignis::ErrorReason;
use ignis::agent::vmm::cloud_hypervisor::{self as ch, CloudHypervisorBackend};
use ignis::agent::vmm::firecracker::{self as fc, FirecrackerBackend};
use ignis::agent::vmm::http::{ApiRequest, HttpApi};
use ignis::agent::vmm::process::Confinement;
use ignis::agent::vmm::{SnapshotFiles, VmConfig, VmmBackend, VmmError, VmmState};
use ignis::testing::vmm::{FakeVmm, Flavor};
use serde_json::json;
use vmm_support::*;

const MIB: u64 = 1024 * 1024;

/// A VM's snapshot directory as the agent makes it: its own, mode 0700.
fn snapshot_dir(dir: &Path) -> SnapshotFiles {
    let path = dir.join("snapshots").join("vm");
    std::fs::create_dir_all(&path).expect("snapshot dir");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    SnapshotFiles {
        dir: path,
        owner: None,
    }
}

fn restoring(config: &VmConfig, snapshot: &SnapshotFiles) -> VmConfig {
    let mut config = config.clone();
    config.restore = Some(snapshot.clone());
    config
}

fn confined(config: &mut VmConfig) {
    config.confinement = Some(Confinement {
        uid: 100_009,
        gid: 100_009,
        netns: None,
        cgroups: Vec::new(),
    });
}

// ---------------------------------------------------------------------------------------------
// Plans against the specs.

#[test]
fn firecracker_snapshot_and_restore_plans_follow_the_spec() {
    let spec = Spec::firecracker();
    let tmp = tempfile::tempdir().expect("tempdir");
    let snap = Path::new("/var/lib/ignis/snapshots/uid");
    for (name, config) in configs(tmp.path()) {
        let suspend = firecracker_suspend_sequence(&config, snap);
        let resume = firecracker_resume_sequence(
            &restoring(
                &config,
                &SnapshotFiles {
                    dir: snap.into(),
                    owner: None,
                },
            ),
            snap,
        );
        for request in suspend.iter().chain(&resume) {
            spec.check(request)
                .unwrap_or_else(|e| panic!("config {name}: {e}"));
        }
        check_firecracker_order(&spec, &suspend).unwrap_or_else(|e| panic!("config {name}: {e}"));
        check_firecracker_order(&spec, &resume).unwrap_or_else(|e| panic!("config {name}: {e}"));
        // Nothing configures the VMM that loads: the snapshot brings the machine.
        assert_eq!(resume[0].path, "/snapshot/load", "config {name}");
    }
    assert_eq!(
        fc::Firecracker::plan_pause(),
        ApiRequest::patch("/vm", json!({"state": "Paused"}))
    );
    assert_eq!(
        fc::Firecracker::plan_resume(),
        ApiRequest::patch("/vm", json!({"state": "Resumed"}))
    );
    assert_eq!(
        fc::Firecracker::plan_snapshot(snap).body,
        Some(json!({
            "snapshot_type": "Full",
            "snapshot_path": "/var/lib/ignis/snapshots/uid/vmstate",
            "mem_file_path": "/var/lib/ignis/snapshots/uid/memory",
        }))
    );
    assert_eq!(
        fc::Firecracker::plan_restore(snap).body,
        Some(json!({
            "snapshot_path": "/var/lib/ignis/snapshots/uid/vmstate",
            "mem_backend": {
                "backend_type": "File",
                "backend_path": "/var/lib/ignis/snapshots/uid/memory",
            },
            "resume_vm": false,
        }))
    );
}

#[test]
fn cloud_hypervisor_snapshot_and_restore_plans_follow_the_spec() {
    let spec = Spec::cloud_hypervisor();
    let tmp = tempfile::tempdir().expect("tempdir");
    let snap = Path::new("/var/lib/ignis/snapshots/uid");
    for (name, config) in configs(tmp.path()) {
        let suspend = cloud_hypervisor_suspend_sequence(&config, snap);
        let resume = cloud_hypervisor_resume_sequence(
            &restoring(
                &config,
                &SnapshotFiles {
                    dir: snap.into(),
                    owner: None,
                },
            ),
            snap,
        );
        for request in suspend.iter().chain(&resume) {
            spec.check(request)
                .unwrap_or_else(|e| panic!("config {name}: {e}"));
        }
        check_cloud_hypervisor_order(&spec, &suspend)
            .unwrap_or_else(|e| panic!("config {name}: {e}"));
        check_cloud_hypervisor_order(&spec, &resume)
            .unwrap_or_else(|e| panic!("config {name}: {e}"));
        assert!(
            !resume.iter().any(|r| r.path.ends_with("vm.create")),
            "config {name}: a VM created before vm.restore makes it answer 404"
        );
    }
    assert_eq!(
        ch::CloudHypervisor::plan_pause().operation(),
        "PUT /api/v1/vm.pause"
    );
    assert_eq!(
        ch::CloudHypervisor::plan_resume().operation(),
        "PUT /api/v1/vm.resume"
    );
    assert_eq!(
        ch::CloudHypervisor::plan_snapshot(snap).body,
        Some(json!({"destination_url": "file:///var/lib/ignis/snapshots/uid"}))
    );
    assert_eq!(
        ch::CloudHypervisor::plan_restore(Path::new("/")).body,
        Some(json!({"source_url": "file:///"}))
    );
}

/// The order checkers refuse what the VMMs refuse around snapshots.
#[test]
fn the_order_checkers_refuse_what_the_vmms_would_around_snapshots() {
    let spec = Spec::firecracker();
    let snap = Path::new("/snap");
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = base_config(tmp.path());
    let plan = fc::Firecracker::plan_create(&config).expect("plan");
    let load = fc::Firecracker::plan_restore(snap);
    let wrong: [Vec<ApiRequest>; 5] = [
        // A load into a configured VMM.
        [plan.clone(), vec![load.clone()]].concat(),
        // A snapshot of a running microVM.
        [
            plan.clone(),
            vec![
                fc::Firecracker::plan_start(),
                fc::Firecracker::plan_snapshot(snap),
            ],
        ]
        .concat(),
        // A boot after a load.
        vec![load.clone(), fc::Firecracker::plan_start()],
        // A pause before anything started.
        [plan, vec![fc::Firecracker::plan_pause()]].concat(),
        // Configuration after a load.
        vec![
            load,
            ApiRequest::put("/boot-source", Some(json!({"kernel_image_path": "/k"}))),
        ],
    ];
    for requests in &wrong {
        assert!(
            check_firecracker_order(&spec, requests).is_err(),
            "{:?} passed",
            requests
                .iter()
                .map(ApiRequest::operation)
                .collect::<Vec<_>>()
        );
    }

    let spec = Spec::cloud_hypervisor();
    let plan = ch::CloudHypervisor::plan_create(&config).expect("plan");
    let restore = ch::CloudHypervisor::plan_restore(snap);
    let wrong: [Vec<ApiRequest>; 4] = [
        [plan.clone(), vec![restore.clone()]].concat(),
        [
            plan.clone(),
            vec![
                ch::CloudHypervisor::plan_start(),
                ch::CloudHypervisor::plan_snapshot(snap),
            ],
        ]
        .concat(),
        vec![restore, ch::CloudHypervisor::plan_start()],
        [plan, vec![ch::CloudHypervisor::plan_resume()]].concat(),
    ];
    for requests in &wrong {
        assert!(
            check_cloud_hypervisor_order(&spec, requests).is_err(),
            "{:?} passed",
            requests
                .iter()
                .map(ApiRequest::operation)
                .collect::<Vec<_>>()
        );
    }
}

/// Jailed, a VMM that loads a snapshot finds its files read-only at its root, and is told `/`.
#[test]
fn a_jailed_restore_binds_the_snapshot_files_read_only_at_the_jail_root() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let snapshot = snapshot_dir(tmp.path());
    for file in ["vmstate", "memory"] {
        std::fs::write(snapshot.dir.join(file), "x").expect("write");
    }
    let (_, mut config) = configs(tmp.path()).pop().expect("user_data config");
    confined(&mut config);
    let (jail, seen) = fc::jail(&restoring(&config, &snapshot)).expect("jail");
    let bound: Vec<(PathBuf, &str, bool)> = jail
        .files
        .iter()
        .filter(|f| f.host.starts_with(&snapshot.dir))
        .map(|f| (f.host.clone(), f.name.as_str(), f.writable))
        .collect();
    assert_eq!(
        bound,
        [
            (snapshot.dir.join("memory"), "memory", false),
            (snapshot.dir.join("vmstate"), "vmstate", false),
        ]
    );
    assert_eq!(fc::Firecracker::plan_create(&seen).expect("plan"), []);
    // Drives keep their jail paths, so the state's drive paths resolve as they did.
    let (_, booted) = fc::jail(&config).expect("jail");
    assert_eq!(seen.disks, booted.disks);
    assert_eq!(
        fc::Firecracker::plan_restore(Path::new("/"))
            .body
            .expect("body")["snapshot_path"],
        json!("/vmstate")
    );

    let ch_snapshot = SnapshotFiles {
        dir: tmp.path().join("ch-snapshot"),
        owner: None,
    };
    std::fs::create_dir(&ch_snapshot.dir).expect("dir");
    for file in ["config.json", "state.json", "memory-ranges"] {
        std::fs::write(ch_snapshot.dir.join(file), "x").expect("write");
    }
    let (jail, seen) = ch::CloudHypervisor::jail(&restoring(&config, &ch_snapshot))
        .expect("jail")
        .expect("confined");
    let names: Vec<&str> = jail
        .files
        .iter()
        .filter(|f| f.host.starts_with(&ch_snapshot.dir))
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(names, ["config.json", "memory-ranges", "state.json"]);
    assert!(jail.files.iter().any(|f| f.name == "console.log"));
    assert_eq!(
        paths(&ch::CloudHypervisor::plan_create(&seen).expect("plan")),
        ["GET /api/v1/vmm.ping"]
    );

    // A snapshot file that would shadow one of the jail's own is refused.
    std::fs::write(snapshot.dir.join("kernel"), "x").expect("write");
    let err = fc::jail(&restoring(&config, &snapshot)).expect_err("clash");
    assert_eq!(err.reason(), "SnapshotUnrestorable");
}

fn paths(requests: &[ApiRequest]) -> Vec<String> {
    requests.iter().map(ApiRequest::operation).collect()
}

// ---------------------------------------------------------------------------------------------
// The round trip against the double.

fn backend(fake: &FakeVmm) -> Box<dyn VmmBackend> {
    match fake.flavor() {
        Flavor::Firecracker => Box::new(FirecrackerBackend::new(fake.binary()).expect("backend")),
        Flavor::CloudHypervisor => {
            Box::new(CloudHypervisorBackend::new(fake.binary()).expect("backend"))
        }
    }
}

fn check_order(flavor: Flavor, requests: &[ApiRequest]) {
    let result = match flavor {
        Flavor::Firecracker => check_firecracker_order(&Spec::firecracker(), requests),
        Flavor::CloudHypervisor => {
            check_cloud_hypervisor_order(&Spec::cloud_hypervisor(), requests)
        }
    };
    result.unwrap_or_else(|e| panic!("{flavor:?}: {e}: {:?}", paths(requests)));
}

/// Boot a VM on the double, snapshot it, and kill its VMM. Returns the config, the snapshot
/// and how many requests the first VMM received.
async fn boot_and_suspend(fake: &FakeVmm, dir: &Path) -> (VmConfig, SnapshotFiles, usize) {
    let (_, mut config) = configs(dir).pop().expect("user_data config");
    config.binary = fake.binary().to_path_buf();
    let backend = backend(fake);
    let snapshot = snapshot_dir(dir);
    let booted = backend.create(&config).await.expect("create");
    let handle = booted.handle.clone();
    backend.start(&handle).await.expect("boot");
    assert_eq!(
        backend.state(&handle).await.expect("state"),
        VmmState::Running
    );
    backend
        .snapshot(&handle, &snapshot)
        .await
        .expect("snapshot");
    assert_eq!(
        backend.state(&handle).await.expect("state"),
        VmmState::Paused
    );
    backend.kill(&handle).await.expect("kill");
    assert_gone(booted).await;
    let sent = fake.requests().len();
    check_order(fake.flavor(), &fake.requests());
    (config, snapshot, sent)
}

/// The snapshot's files: private to the VMM's ids, the staging directory gone.
fn assert_saved(snapshot: &SnapshotFiles, files: &[&str], memory: &str) {
    let mut names: Vec<String> = std::fs::read_dir(&snapshot.dir)
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, files);
    for name in files {
        let meta = std::fs::metadata(snapshot.dir.join(name)).expect("meta");
        assert_eq!(meta.mode() & 0o777, 0o600, "{name}");
    }
    let memory = std::fs::metadata(snapshot.dir.join(memory)).expect("memory");
    assert_eq!(memory.len(), 256 * MIB, "as large as the guest's memory");
}

async fn round_trip(flavor: Flavor) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = spec_checked(flavor, dir.path());
    let backend = backend(&fake);
    let (config, snapshot, sent) = boot_and_suspend(&fake, dir.path()).await;
    match flavor {
        Flavor::Firecracker => assert_saved(&snapshot, &["memory", "vmstate"], "memory"),
        Flavor::CloudHypervisor => assert_saved(
            &snapshot,
            &["config.json", "memory-ranges", "state.json"],
            "memory-ranges",
        ),
    }

    let spawned = backend
        .create(&restoring(&config, &snapshot))
        .await
        .expect("create to restore");
    let handle = spawned.handle.clone();
    backend.restore(&handle, &snapshot).await.expect("restore");
    assert_eq!(
        backend.state(&handle).await.expect("state"),
        VmmState::Paused
    );
    backend.start(&handle).await.expect("start resumes");
    assert_eq!(
        backend.state(&handle).await.expect("state"),
        VmmState::Running
    );

    let second = fake.requests().split_off(sent);
    check_order(flavor, &second);
    let expected: Vec<ApiRequest> = match flavor {
        Flavor::Firecracker => vec![
            fc::Firecracker::plan_restore(&snapshot.dir),
            fc::Firecracker::plan_state(),
            fc::Firecracker::plan_state(),
            fc::Firecracker::plan_resume(),
            fc::Firecracker::plan_state(),
        ],
        Flavor::CloudHypervisor => vec![
            ch::CloudHypervisor::plan_create(&restoring(&config, &snapshot)).expect("plan")[0]
                .clone(),
            ch::CloudHypervisor::plan_restore(&snapshot.dir),
            ch::CloudHypervisor::plan_state(),
            ch::CloudHypervisor::plan_state(),
            ch::CloudHypervisor::plan_resume(),
            ch::CloudHypervisor::plan_state(),
        ],
    };
    pretty_assertions::assert_eq!(second, expected);
    assert_eq!(fake.violations(), Vec::<String>::new());
    backend.kill(&handle).await.expect("kill");
    assert_gone(spawned).await;
}

#[tokio::test]
async fn firecracker_boot_snapshot_kill_restore_and_start_resumes() {
    within(round_trip(Flavor::Firecracker)).await;
}

#[tokio::test]
async fn cloud_hypervisor_boot_snapshot_kill_restore_and_start_resumes() {
    within(round_trip(Flavor::CloudHypervisor)).await;
}

/// A snapshot the VMM refuses to load (damaged, missing, or loaded into a VMM configured for a
/// boot) is `SnapshotUnrestorable`, carrying the VMM's own fault text.
async fn refused_loads(flavor: Flavor, state_file: &str, memory_file: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = spec_checked(flavor, dir.path());
    let backend = backend(&fake);
    let (config, snapshot, _) = boot_and_suspend(&fake, dir.path()).await;

    let refused = |damage: &dyn Fn()| {
        damage();
        let backend = &backend;
        let config = restoring(&config, &snapshot);
        let snapshot = snapshot.clone();
        async move {
            let spawned = backend.create(&config).await.expect("create to restore");
            let err = backend
                .restore(&spawned.handle, &snapshot)
                .await
                .expect_err("refused");
            backend.kill(&spawned.handle).await.expect("kill");
            assert_gone(spawned).await;
            err
        }
    };
    let intact = std::fs::read(snapshot.dir.join(state_file)).expect("state");
    let damaged = refused(&|| {
        std::fs::write(snapshot.dir.join(state_file), "\0\0garbage").expect("damage");
    })
    .await;
    assert_eq!(damaged.reason(), "SnapshotUnrestorable");
    assert!(damaged.is_permanent());
    let VmmError::SnapshotUnrestorable { detail } = &damaged else {
        panic!("{damaged:?}")
    };
    assert!(
        detail.contains("HTTP 400") && detail.contains(state_file),
        "{detail}"
    );

    let missing = refused(&|| {
        std::fs::write(snapshot.dir.join(state_file), &intact).expect("repair");
        std::fs::remove_file(snapshot.dir.join(memory_file)).expect("remove");
    })
    .await;
    assert_eq!(missing.reason(), "SnapshotUnrestorable");
    assert!(missing.to_string().contains(memory_file), "{missing}");

    // A VMM configured for a boot loads nothing.
    let mut boot_config = config.clone();
    boot_config.restore = None;
    let spawned = backend.create(&boot_config).await.expect("create");
    let err = backend
        .restore(&spawned.handle, &snapshot)
        .await
        .expect_err("configured");
    assert_eq!(err.reason(), "SnapshotUnrestorable");
    backend.kill(&spawned.handle).await.expect("kill");
    assert_gone(spawned).await;
    assert_eq!(fake.violations(), Vec::<String>::new());
}

#[tokio::test]
async fn firecracker_refuses_a_damaged_or_missing_snapshot_as_unrestorable() {
    within(refused_loads(Flavor::Firecracker, "vmstate", "memory")).await;
}

#[tokio::test]
async fn cloud_hypervisor_refuses_a_damaged_or_missing_snapshot_as_unrestorable() {
    within(refused_loads(
        Flavor::CloudHypervisor,
        "state.json",
        "memory-ranges",
    ))
    .await;
}

/// A VM that never started has nothing to snapshot: the VMM refuses, nothing is left staged
/// and the snapshot directory stays empty.
#[tokio::test]
async fn a_snapshot_the_vmm_refuses_leaves_nothing_behind() {
    within(async {
        for flavor in [Flavor::Firecracker, Flavor::CloudHypervisor] {
            let dir = tempfile::tempdir().expect("tempdir");
            let fake = spec_checked(flavor, dir.path());
            let backend = backend(&fake);
            let (_, mut config) = configs(dir.path()).pop().expect("config");
            config.binary = fake.binary().to_path_buf();
            let snapshot = snapshot_dir(dir.path());
            let spawned = backend.create(&config).await.expect("create");
            let err = backend
                .snapshot(&spawned.handle, &snapshot)
                .await
                .expect_err("not started");
            assert_eq!(err.reason(), "VmmApiError", "{flavor:?}: {err}");
            assert_eq!(
                std::fs::read_dir(&snapshot.dir).expect("read").count(),
                0,
                "{flavor:?}"
            );
            backend.kill(&spawned.handle).await.expect("kill");
            assert_gone(spawned).await;
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The jail, for real.

fn poll<T>(mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The jail a confined Firecracker gets to resume, built by `ignis jailer --chroot` from the
/// backend's own plan, with a stand-in VMM (Firecracker cannot run here: no usable KVM;
/// busybox is static like its release binary). The snapshot's files are readable at the jail's
/// root and not writable; what the VMM writes under `/snapshot` — the staging directory the
/// agent makes under the jail's root before a save — lands on the node where the agent
/// collects it, owned by the VM's uid.
#[test]
fn a_jailed_vmm_reads_its_snapshot_read_only_and_saves_where_the_agent_collects() {
    const TEST: &str = "jailed snapshot";
    if !nix::unistd::Uid::effective().is_root() {
        ignis::testing::prerequisite::missing(TEST, "root, to build a jail");
        return;
    }
    let Ok(busybox) = ignis::agent::vmm::process::resolve_binary(Path::new("busybox")) else {
        ignis::testing::prerequisite::missing(TEST, "a static busybox as the stand-in VMM");
        return;
    };
    let (uid, gid) = (150_127, 150_127);
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("vm");
    std::fs::create_dir_all(&state).expect("state dir");
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, "kernel").expect("kernel");
    let snapshot = snapshot_dir(tmp.path());
    std::fs::write(snapshot.dir.join("vmstate"), "saved state").expect("state");
    std::fs::write(snapshot.dir.join("memory"), "saved memory").expect("memory");
    for file in ["vmstate", "memory"] {
        std::os::unix::fs::chown(snapshot.dir.join(file), Some(uid), Some(gid)).expect("chown");
        std::fs::set_permissions(
            snapshot.dir.join(file),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
    }
    let mut config = base_config(&state);
    config.kernel = kernel;
    config.confinement = Some(Confinement {
        uid,
        gid,
        netns: None,
        cgroups: Vec::new(),
    });
    let (jail, seen) = fc::jail(&restoring(&config, &snapshot)).expect("jail");
    let load = fc::Firecracker::plan_restore(Path::new("/"))
        .body
        .expect("body");
    assert_eq!(load["snapshot_path"], json!("/vmstate"));

    let script = "/busybox cat /vmstate /memory > /vmm.log; \
                  if (echo x > /vmstate) 2>&-; then echo state-writable >> /vmm.log; fi; \
                  while [ ! -d /snapshot ]; do /busybox sleep 0.05; done; \
                  echo new-memory > /snapshot/memory; \
                  exec /busybox sleep 30";
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ignis"));
    command.args([
        "jailer",
        "--uid",
        &uid.to_string(),
        "--gid",
        &gid.to_string(),
    ]);
    command.arg("--chroot").arg(&jail.root);
    for file in &jail.files {
        let flag = if file.writable { "--bind-rw" } else { "--bind" };
        command
            .arg(flag)
            .arg(format!("{}={}", file.host.display(), file.name));
    }
    for (host, name) in &jail.links {
        command
            .arg("--link")
            .arg(format!("{}={name}", host.display()));
    }
    let mut stage_one = command
        .arg("--")
        .arg(&busybox)
        .args(["sh", "-c", script])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("run ignis jailer");
    let log = state.join("vmm.log");
    let read = poll(|| {
        let text = std::fs::read_to_string(&log).ok()?;
        text.contains("saved memory").then_some(text)
    });

    // What `Staging::prepare` does before a save: a fresh `snapshot/` under the jail's root,
    // the VM's own. The stand-in then writes its memory file there.
    let staging = jail.root.join("snapshot");
    std::fs::create_dir(&staging).expect("staging");
    std::os::unix::fs::chown(&staging, Some(uid), Some(gid)).expect("chown staging");
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let written = poll(|| {
        let text = std::fs::read_to_string(staging.join("memory")).ok()?;
        (!text.is_empty()).then_some(text)
    });
    let owner = std::fs::metadata(staging.join("memory")).map(|m| m.uid());

    let _ = stage_one.kill();
    stage_one.wait().expect("reap stage one");

    let read = read.expect("the stand-in read its snapshot in the jail");
    assert!(read.starts_with("saved statesaved memory"), "{read}");
    assert!(!read.contains("state-writable"), "{read}");
    assert_eq!(
        std::fs::read_to_string(snapshot.dir.join("vmstate")).expect("state"),
        "saved state"
    );
    assert_eq!(written.as_deref(), Some("new-memory\n"));
    assert_eq!(owner.expect("memory file"), uid);
    assert_eq!(seen.api_socket, Path::new("/api.sock"));
}
