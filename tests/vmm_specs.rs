//! The Firecracker and Cloud Hypervisor backends, checked against the VMMs' official API specs
//! (`tests/fixtures/specs/`): every planned request must name a spec path and method, carry a
//! body that validates against the spec's schema (with undeclared fields refused), and come in
//! an order the VMM accepts. Then the I/O layer runs against the VMMs' test double
//! (`ignis::testing::vmm`: a stand-in process and its API on a unix socket) held to the same
//! spec, answering only with responses the spec documents.

mod vmm_support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::http::Method;
use ignis::ErrorReason;
use ignis::agent::vmm::cloud_hypervisor::{self as ch, CloudHypervisorBackend};
use ignis::agent::vmm::firecracker::{self as fc, FirecrackerBackend};
use ignis::agent::vmm::http::{ApiRequest, HttpApi};
use ignis::agent::vmm::process::start_time as process_start_time;
use ignis::agent::vmm::{VmmBackend, VmmError, VmmState};
use ignis::api::Accelerator;
use ignis::testing::vmm::{Flavor, Reply};
use serde_json::json;
use vmm_support::*;

// ---------------------------------------------------------------------------------------------
// Plans against the specs.

#[test]
fn firecracker_plans_follow_the_spec() {
    let spec = Spec::firecracker();
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, config) in configs(dir.path()) {
        let sequence = firecracker_sequence(&config);
        for request in &sequence {
            spec.check(request)
                .unwrap_or_else(|e| panic!("config {name}: {e}"));
        }
        check_firecracker_order(&spec, &sequence).unwrap_or_else(|e| panic!("config {name}: {e}"));

        // The backend-neutral config arrives where Firecracker reads it.
        let body = |path: &str| {
            sequence
                .iter()
                .find(|r| r.path == path)
                .and_then(|r| r.body.clone())
                .unwrap_or_else(|| panic!("config {name}: no PUT {path}"))
        };
        assert_eq!(body("/machine-config")["vcpu_count"], json!(config.vcpus));
        assert_eq!(
            body("/machine-config")["mem_size_mib"],
            json!(config.memory_mib)
        );
        let boot = body("/boot-source");
        assert_eq!(boot["kernel_image_path"], json!(config.kernel));
        assert_eq!(boot["boot_args"], json!(config.cmdline));
        assert_eq!(
            boot.get("initrd_path").cloned(),
            config.initrd.as_ref().map(|p| json!(p))
        );
        for disk in &config.disks {
            let drive = body(&format!("/drives/{}", disk.id));
            assert_eq!(drive["path_on_host"], json!(disk.path));
            assert_eq!(drive["is_root_device"], json!(disk.root));
            assert_eq!(drive["is_read_only"], json!(disk.read_only));
        }
        for n in &config.nets {
            let iface = body(&format!("/network-interfaces/{}", n.id));
            assert_eq!(iface["host_dev_name"], json!(n.tap));
            assert_eq!(iface["guest_mac"], json!(n.mac));
            assert_eq!(iface["iface_id"], json!(n.id));
        }
        let has_mmds = sequence.iter().any(|r| r.path == "/mmds");
        assert_eq!(has_mmds, config.user_data.is_some(), "config {name}");
        if let Some(user_data) = &config.user_data {
            assert_eq!(body("/mmds")["latest"]["user-data"], json!(user_data));
        }
    }
}

#[test]
fn cloud_hypervisor_plans_follow_the_spec() {
    let spec = Spec::cloud_hypervisor();
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, config) in configs(dir.path()) {
        let sequence = cloud_hypervisor_sequence(&config);
        for request in &sequence {
            spec.check(request)
                .unwrap_or_else(|e| panic!("config {name}: {e}"));
        }
        check_cloud_hypervisor_order(&spec, &sequence)
            .unwrap_or_else(|e| panic!("config {name}: {e}"));

        let create = sequence
            .iter()
            .find(|r| r.path == "/api/v1/vm.create")
            .and_then(|r| r.body.clone())
            .expect("vm.create body");
        assert_eq!(create["cpus"]["boot_vcpus"], json!(config.vcpus));
        assert_eq!(
            create["memory"]["size"],
            json!(config.memory_mib * 1024 * 1024)
        );
        assert_eq!(create["payload"]["kernel"], json!(config.kernel));
        assert_eq!(
            create["payload"].get("initramfs").cloned(),
            config.initrd.as_ref().map(|p| json!(p))
        );
        assert_eq!(create["serial"]["file"], json!(config.console_log));
        let disks = create["disks"].as_array().cloned().unwrap_or_default();
        assert_eq!(disks.len(), config.disks.len(), "config {name}");
        for disk in &config.disks {
            assert!(
                disks.iter().any(
                    |d| d["path"] == json!(disk.path) && d["readonly"] == json!(disk.read_only)
                ),
                "config {name}: disk {} missing",
                disk.id
            );
        }
        // Every disk names its type: Cloud Hypervisor warns about a guessed one (issue #13).
        for d in &disks {
            assert!(
                d["image_type"] == "Raw" || d["image_type"] == "Qcow2",
                "config {name}: {d}"
            );
        }
        let nets = create["net"].as_array().cloned().unwrap_or_default();
        assert_eq!(nets.len(), config.nets.len(), "config {name}");
        for (n, body) in config.nets.iter().zip(&nets) {
            assert_eq!((&body["tap"], &body["mac"]), (&json!(n.tap), &json!(n.mac)));
        }
    }
}

/// Confined, each VMM is jailed: its plans still follow its spec, and name only paths inside
/// its jail (`--seccomp true` stays on Cloud Hypervisor's command line; Firecracker's never
/// says `--no-seccomp`).
#[test]
fn jailed_plans_follow_the_spec_and_name_only_paths_inside_the_jail() {
    let (fc_spec, ch_spec) = (Spec::firecracker(), Spec::cloud_hypervisor());
    let dir = tempfile::tempdir().expect("tempdir");
    let host = dir.path().display().to_string();
    for (name, mut config) in configs(dir.path()) {
        config.confinement = Some(ignis::agent::vmm::process::Confinement {
            uid: 100_010,
            gid: 100_010,
            netns: None,
            cgroups: Vec::new(),
        });
        let (fc_jail, fc_seen) = fc::Firecracker::jail(&config)
            .expect("jail")
            .expect("confined");
        let (ch_jail, ch_seen) = ch::CloudHypervisor::jail(&config)
            .expect("jail")
            .expect("confined");
        for jail in [&fc_jail, &ch_jail] {
            assert_eq!(jail.root, config.state_dir.join(fc::JAIL_DIR), "{name}");
            assert!(jail.files.iter().any(|f| f.host == config.kernel), "{name}");
        }
        let fc_sequence = firecracker_sequence(&fc_seen);
        let ch_sequence = cloud_hypervisor_sequence(&ch_seen);
        for request in &fc_sequence {
            fc_spec
                .check(request)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        for request in &ch_sequence {
            ch_spec
                .check(request)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        check_firecracker_order(&fc_spec, &fc_sequence).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_cloud_hypervisor_order(&ch_spec, &ch_sequence)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let fc_args = fc::Firecracker::spawn_args(&fc_seen);
        let ch_args = ch::CloudHypervisor::spawn_args(&ch_seen);
        assert!(!fc_args.iter().any(|a| a == "--no-seccomp"), "{name}");
        assert!(
            ch_args.windows(2).any(|w| w == ["--seccomp", "true"]),
            "{name}"
        );
        let everything = fc_sequence
            .iter()
            .chain(&ch_sequence)
            .filter_map(|r| r.body.as_ref().map(|b| b.to_string()))
            .chain(fc_args)
            .chain(ch_args);
        for text in everything {
            assert!(
                !text.contains(&host) && !text.contains("/var/lib/ignis"),
                "{name}: a host path reaches the jailed VMM: {text}"
            );
        }
    }
}

/// The checker is not a rubber stamp: wrong paths, methods, fields, types and orders fail.
#[test]
fn the_spec_checker_rejects_what_the_vmms_would() {
    let spec = Spec::firecracker();
    let bad = [
        ApiRequest::put("/boot", Some(json!({"kernel_image_path": "/k"}))),
        ApiRequest::get("/actions"),
        ApiRequest::put("/boot-source", Some(json!({"kernel_path": "/k"}))),
        ApiRequest::put(
            "/boot-source",
            Some(json!({"kernel_image_path": "/k", "extra": 1})),
        ),
        ApiRequest::put(
            "/machine-config",
            Some(json!({"vcpu_count": 0, "mem_size_mib": 128})),
        ),
        ApiRequest::put(
            "/machine-config",
            Some(json!({"vcpu_count": "2", "mem_size_mib": 128})),
        ),
        ApiRequest::put("/actions", Some(json!({"action_type": "Reboot"}))),
        ApiRequest::put("/actions", None),
        ApiRequest::put("/drives/rootfs", Some(json!({"drive_id": "rootfs"}))),
        ApiRequest::put("/mmds/config", Some(json!({"version": "V2"}))),
    ];
    for request in &bad {
        assert!(
            spec.check(request).is_err(),
            "{} {:?} passed",
            request.operation(),
            request.body
        );
    }
    let wrong_order = vec![
        fc::Firecracker::plan_start(),
        ApiRequest::put("/boot-source", Some(json!({"kernel_image_path": "/k"}))),
    ];
    assert!(check_firecracker_order(&spec, &wrong_order).is_err());
    let mmds_first = vec![
        ApiRequest::put(
            "/mmds/config",
            Some(json!({"network_interfaces": ["eth0"]})),
        ),
        ApiRequest::put(
            "/network-interfaces/eth0",
            Some(json!({"iface_id": "eth0", "host_dev_name": "tap0"})),
        ),
    ];
    assert!(check_firecracker_order(&spec, &mmds_first).is_err());

    let spec = Spec::cloud_hypervisor();
    let bad = [
        ApiRequest::put("/vm.create", Some(json!({"payload": {}}))),
        ApiRequest::put("/api/v1/vm.create", None),
        ApiRequest::put(
            "/api/v1/vm.create",
            Some(json!({"cpus": {"boot_vcpus": 1}})),
        ),
        ApiRequest::put(
            "/api/v1/vm.create",
            Some(json!({"payload": {}, "memory": {"size": "1G"}})),
        ),
        ApiRequest::put(
            "/api/v1/vm.create",
            Some(json!({"payload": {}, "serial": {"mode": "Pipe"}})),
        ),
        ApiRequest::put("/api/v1/vmm.ping", None),
        ApiRequest::put("/api/v1/vm.boot", Some(json!({}))),
    ];
    for request in &bad {
        assert!(
            spec.check(request).is_err(),
            "{} {:?} passed",
            request.operation(),
            request.body
        );
    }
    assert!(check_cloud_hypervisor_order(&spec, &[ch::CloudHypervisor::plan_start()]).is_err());
}

// ---------------------------------------------------------------------------------------------
// The I/O layer against the test double.

/// A process that is no VMM at all: `body` is its shell script.
fn stand_in(dir: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("stand-in");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write stand-in");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[tokio::test]
async fn firecracker_create_start_state_stop_against_the_spec() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, mut config) = configs(dir.path()).pop().expect("user_data config");
        let fake = spec_checked(Flavor::Firecracker, dir.path());
        config.binary = fake.binary().to_path_buf();
        let backend = FirecrackerBackend::new(&config.binary).expect("backend");
        // A socket file left by an earlier run: neither the double nor Firecracker could bind
        // over it.
        std::fs::write(&config.api_socket, "").expect("stale socket");

        let spawned = backend.create(&config).await.expect("create");
        let spawns = fake.spawns();
        assert_eq!(spawns.len(), 1);
        assert_eq!(spawns[0].args, fc::Firecracker::spawn_args(&config));
        assert!(dir.path().join("vmm.log").exists());

        let handle = &spawned.handle;
        assert_eq!(
            backend.state(handle).await.expect("state"),
            VmmState::Created
        );
        backend.start(handle).await.expect("start");
        assert_eq!(
            backend.state(handle).await.expect("state"),
            VmmState::Running
        );
        backend.stop(handle).await.expect("stop");

        // `start` asks first whether the guest is paused (restored: resume) or created (boot).
        let mut expected = fc::Firecracker::plan_create(&config).expect("plan");
        expected.extend([
            fc::Firecracker::plan_state(),
            fc::Firecracker::plan_state(),
            fc::Firecracker::plan_start(),
            fc::Firecracker::plan_state(),
            fc::Firecracker::plan_stop(),
        ]);
        pretty_assertions::assert_eq!(fake.requests(), expected);
        assert_eq!(fake.violations(), Vec::<String>::new());
        check_firecracker_order(&Spec::firecracker(), &fake.requests()).expect("order");

        backend.kill(handle).await.expect("kill");
        assert_gone(spawned).await;
    })
    .await;
}

#[tokio::test]
async fn cloud_hypervisor_create_boot_info_power_button_against_the_spec() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, mut config) = configs(dir.path()).pop().expect("user_data config");
        let fake = spec_checked(Flavor::CloudHypervisor, dir.path());
        config.binary = fake.binary().to_path_buf();
        let backend = CloudHypervisorBackend::new(&config.binary).expect("backend");

        let spawned = backend.create(&config).await.expect("create");
        assert_eq!(
            fake.spawns()[0].args,
            ch::CloudHypervisor::spawn_args(&config)
        );

        let handle = &spawned.handle;
        assert_eq!(
            backend.state(handle).await.expect("state"),
            VmmState::Created
        );
        backend.start(handle).await.expect("boot");
        assert_eq!(
            backend.state(handle).await.expect("state"),
            VmmState::Running
        );
        backend.stop(handle).await.expect("power button");

        let mut expected = ch::CloudHypervisor::plan_create(&config).expect("plan");
        expected.extend([
            ch::CloudHypervisor::plan_state(),
            ch::CloudHypervisor::plan_state(),
            ch::CloudHypervisor::plan_start(),
            ch::CloudHypervisor::plan_state(),
            ch::CloudHypervisor::plan_stop(),
        ]);
        pretty_assertions::assert_eq!(fake.requests(), expected);
        assert_eq!(fake.violations(), Vec::<String>::new());
        check_cloud_hypervisor_order(&Spec::cloud_hypervisor(), &fake.requests()).expect("order");

        backend.kill(handle).await.expect("kill");
        assert_gone(spawned).await;
    })
    .await;
}

#[tokio::test]
async fn firecracker_fault_message_names_the_operation_and_kills_the_vmm() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = base_config(dir.path());
        let fault = "Invalid kernel path: No such file or directory (os error 2)";
        let fake = spec_checked(Flavor::Firecracker, dir.path()).answering(
            move |method, path, _| {
                (method == Method::PUT && path == "/boot-source")
                    .then(|| Reply::Json(400, json!({ "fault_message": fault })))
            },
        );
        config.binary = fake.binary().to_path_buf();
        let backend = FirecrackerBackend::new(&config.binary).expect("backend");
        let err = backend.create(&config).await.expect_err("boot source refused");
        match &err {
            VmmError::ApiFault {
                operation,
                status,
                fault: message,
            } => {
                assert_eq!(operation, "PUT /boot-source");
                assert_eq!(*status, 400);
                assert_eq!(message, fault);
            }
            other => panic!("expected ApiFault, got {other:?}"),
        }
        assert!(err.to_string().contains(fault), "{err}");
        assert!(err.is_permanent());
        // Nothing after the failed request, and no VMM left running.
        assert_eq!(fake.requests().len(), 2);
        let pid = fake.spawns()[0].pid;
        assert!(
            process_start_time(pid).is_none(),
            "fake VMM still running after a failed create"
        );

        // The same error shape at runtime, on the InstanceStart action.
        let socket = dir.path().join("runtime.sock");
        let fake = spec_checked(Flavor::Firecracker, &dir.path().join("runtime")).answering(
            |_, path, _| {
                (path == "/actions").then(|| {
                    Reply::Json(
                        400,
                        json!({ "fault_message": "Cannot start microvm without kernel configuration." }),
                    )
                })
            },
        );
        fake.serve_at(&socket);
        let err = backend.start(&own_handle(&socket)).await.expect_err("start refused");
        assert!(
            matches!(&err, VmmError::ApiFault { operation, status: 400, fault }
                if operation == "PUT /actions" && fault.contains("without kernel configuration")),
            "{err:?}"
        );
        assert_eq!(err.reason(), "VmmApiError");
    })
    .await;
}

#[tokio::test]
async fn cloud_hypervisor_error_bodies_become_api_faults() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("api.sock");
        let backend = CloudHypervisorBackend::new("sh").expect("backend");
        // `start` asks the VM's state first: a created VM the first time, none after.
        let created = once_created_vm_info(dir.path());
        let fake = spec_checked(Flavor::CloudHypervisor, dir.path()).answering(
            move |_, path, _| match path {
                "/api/v1/vm.boot" => Some(Reply::Text(404, "VmNotCreated".to_owned())),
                "/api/v1/vm.power-button" => Some(Reply::Json(
                    405,
                    json!([
                        "Error from API",
                        "The VM could not be shut down",
                        "VM is not booted"
                    ]),
                )),
                "/api/v1/vm.info" => created().or(Some(Reply::Empty(404))),
                _ => None,
            },
        );
        fake.serve_at(&socket);
        let handle = own_handle(&socket);

        let err = backend.start(&handle).await.expect_err("boot refused");
        assert!(
            matches!(&err, VmmError::ApiFault { operation, status: 404, fault }
                if operation == "PUT /api/v1/vm.boot" && fault == "VmNotCreated"),
            "{err:?}"
        );
        let err = backend
            .stop(&handle)
            .await
            .expect_err("power button refused");
        assert!(
            matches!(&err, VmmError::ApiFault { operation, status: 405, fault }
                if operation == "PUT /api/v1/vm.power-button"
                    && fault == "Error from API: The VM could not be shut down: VM is not booted"),
            "{err:?}"
        );
        let err = backend.state(&handle).await.expect_err("no VM");
        assert!(
            matches!(&err, VmmError::ApiFault { operation, status: 404, .. }
                if operation == "GET /api/v1/vm.info"),
            "{err:?}"
        );
        assert_eq!(fake.violations(), Vec::<String>::new());
    })
    .await;
}

#[tokio::test]
async fn cloud_hypervisor_create_failure_carries_the_server_message() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = base_config(dir.path());
        // vm.create documents only 204; a real Cloud Hypervisor answers failures with 500 and
        // its error chain. The double records that as off-spec, which is the point: the spec
        // does not document it, yet the backend must still report it clearly.
        let fake = spec_checked(Flavor::CloudHypervisor, dir.path()).answering(|_, path, _| {
            (path == "/api/v1/vm.create").then(|| {
                Reply::Json(
                    500,
                    json!([
                        "Error from API",
                        "The VM could not be created",
                        "Cannot open kernel"
                    ]),
                )
            })
        });
        config.binary = fake.binary().to_path_buf();
        let backend = CloudHypervisorBackend::new(&config.binary).expect("backend");
        let err = backend.create(&config).await.expect_err("create refused");
        assert!(
            matches!(&err, VmmError::ApiFault { operation, status: 500, fault }
                if operation == "PUT /api/v1/vm.create" && fault.ends_with("Cannot open kernel")),
            "{err:?}"
        );
        assert_eq!(fake.violations().len(), 1, "{:?}", fake.violations());
    })
    .await;
}

#[tokio::test]
async fn a_vmm_that_never_answers_is_an_api_timeout() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let hanging = |flavor, name: &str| {
            let socket = dir.path().join(name);
            let fake = spec_checked(flavor, &dir.path().join(format!("{name}.d")))
                .answering(|_, _, _| Some(Reply::Hang));
            fake.serve_at(&socket);
            (fake, socket)
        };
        let (_fc_fake, fc_socket) = hanging(Flavor::Firecracker, "fc.sock");
        let (_ch_fake, ch_socket) = hanging(Flavor::CloudHypervisor, "ch.sock");
        let deadline = Duration::from_millis(300);
        let fc = FirecrackerBackend::new("sh")
            .expect("backend")
            .with_timeouts(deadline, deadline);
        let ch = CloudHypervisorBackend::new("sh")
            .expect("backend")
            .with_timeouts(deadline, deadline);
        for (backend, socket, operation) in [
            // `start` asks the state first (boot or resume): that call is the one left hanging.
            (&fc as &dyn VmmBackend, &fc_socket, "GET /"),
            (&ch as &dyn VmmBackend, &ch_socket, "GET /api/v1/vm.info"),
        ] {
            let began = Instant::now();
            let err = backend
                .start(&own_handle(socket))
                .await
                .expect_err("no answer");
            let took = began.elapsed();
            assert!(
                matches!(&err, VmmError::ApiTimeout { operation: o, timeout } if o == operation && *timeout == deadline),
                "{err:?}"
            );
            assert!(took >= deadline && took < deadline + Duration::from_secs(2), "took {took:?}");
            assert_eq!(err.reason(), "VmmTimeout");
        }
    })
    .await;
}

#[tokio::test]
async fn a_socket_that_never_appears_is_a_socket_timeout() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = base_config(dir.path());
        config.binary = stand_in(dir.path(), &format!("echo $$ > {}/pid\nexec sleep 30", dir.path().display()));
        let deadline = Duration::from_millis(300);
        let backend = FirecrackerBackend::new(&config.binary)
            .expect("backend")
            .with_timeouts(deadline, deadline);
        let began = Instant::now();
        let err = backend.create(&config).await.expect_err("no socket");
        assert!(began.elapsed() < deadline * 10, "took {:?}", began.elapsed());
        assert!(
            matches!(&err, VmmError::SocketTimeout { path, timeout } if *path == config.api_socket && *timeout == deadline),
            "{err:?}"
        );

        let backend = CloudHypervisorBackend::new(&config.binary)
            .expect("backend")
            .with_timeouts(deadline, deadline);
        let err = backend.create(&config).await.expect_err("no socket");
        assert!(matches!(err, VmmError::SocketTimeout { .. }), "{err:?}");
        // The VMM that never opened its socket was killed and reaped.
        let pid: u32 = std::fs::read_to_string(dir.path().join("pid"))
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        assert!(process_start_time(pid).is_none(), "VMM {pid} left running");
    })
    .await;
}

#[tokio::test]
async fn a_vmm_that_exits_before_its_socket_reports_its_log() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = base_config(dir.path());
        config.binary = stand_in(
            dir.path(),
            "echo 'Error creating the Kvm object: No such file or directory (os error 2)' >&2\nexit 1",
        );
        for backend in [
            Box::new(FirecrackerBackend::new(&config.binary).expect("backend")) as Box<dyn VmmBackend>,
            Box::new(CloudHypervisorBackend::new(&config.binary).expect("backend")),
        ] {
            let err = backend.create(&config).await.expect_err("VMM exits");
            match &err {
                VmmError::Exited { operation, detail } => {
                    assert!(operation.contains("socket"), "{operation}");
                    assert!(detail.contains("Error creating the Kvm object"), "{detail}");
                    assert!(detail.contains("exit status: 1"), "{detail}");
                }
                other => panic!("expected Exited, got {other:?}"),
            }
            assert_eq!(err.reason(), "VmmCrashed");
        }
    })
    .await;
}

#[tokio::test]
async fn an_absent_binary_or_tcg_is_refused_up_front() {
    for missing in ["/nonexistent/firecracker", "ignis-test-no-such-firecracker"] {
        let err = FirecrackerBackend::new(missing).expect_err("missing binary");
        assert!(matches!(&err, VmmError::BinaryNotFound { path } if path == Path::new(missing)));
        assert_eq!(err.reason(), "HypervisorUnavailable");
        let err = CloudHypervisorBackend::new(missing).expect_err("missing binary");
        assert!(matches!(err, VmmError::BinaryNotFound { .. }));
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let config = base_config(dir.path());
    let fc = FirecrackerBackend::new("sh").expect("backend");
    let ch = CloudHypervisorBackend::new("sh").expect("backend");
    for backend in [&fc as &dyn VmmBackend, &ch as &dyn VmmBackend] {
        // The binary named in the VmConfig is checked too, before anything is spawned.
        let err = backend.create(&config).await.expect_err("missing binary");
        assert!(matches!(err, VmmError::BinaryNotFound { .. }), "{err:?}");

        assert!(!backend.supports(Accelerator::Tcg));
        let mut tcg = config.clone();
        tcg.accelerator = Accelerator::Tcg;
        let err = backend.create(&tcg).await.expect_err("KVM only");
        assert!(
            matches!(err, VmmError::UnsupportedAccelerator { .. }),
            "{err:?}"
        );
    }
    assert!(!dir.path().join("vmm.log").exists(), "nothing spawned");
}

// ---------------------------------------------------------------------------------------------
// What the real VMMs were seen doing (issue #13), and the double doing the same.

/// Run the double's binary by hand: `args`, stdout to `stdout`. Returns its pid.
async fn run_double(fake: &ignis::testing::vmm::FakeVmm, args: &[&str], stdout: &Path) -> u32 {
    let out = std::fs::File::create(stdout).expect("stdout file");
    let err = std::fs::File::create(stdout.with_extension("err")).expect("stderr file");
    let mut child = tokio::process::Command::new(fake.binary())
        .args(args)
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the double");
    let pid = child.id().expect("pid");
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    pid
}

/// Firecracker logs to stdout unless given `--log-path` (issue #13: its API log ended up in
/// the console file); the log file must already exist (its `docs/logger.md`).
#[tokio::test]
async fn the_firecracker_double_logs_where_firecracker_does() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let fake = ignis::testing::vmm::FakeVmm::start(Flavor::Firecracker, dir.path());
        let sock = |n: &str| dir.path().join(n).display().to_string();

        let stdout = dir.path().join("plain.out");
        run_double(&fake, &["--api-sock", &sock("a.sock")], &stdout).await;
        fake.wait_spawns(1, Duration::from_secs(10)).await;
        let out = std::fs::read_to_string(&stdout).expect("stdout");
        assert!(
            out.contains("[anonymous-instance:main] Running Firecracker v"),
            "{out}"
        );

        let log = dir.path().join("fc.log");
        std::fs::write(&log, "").expect("log file");
        let stdout = dir.path().join("logged.out");
        run_double(
            &fake,
            &[
                "--api-sock",
                &sock("b.sock"),
                "--id",
                "vm-1",
                "--log-path",
                &log.display().to_string(),
            ],
            &stdout,
        )
        .await;
        fake.wait_spawns(2, Duration::from_secs(10)).await;
        assert_eq!(std::fs::read_to_string(&stdout).expect("stdout"), "");
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(text.contains("[vm-1:main] Running Firecracker v"), "{text}");

        let missing = dir.path().join("missing.log").display().to_string();
        let status = tokio::process::Command::new(fake.binary())
            .args(["--api-sock", &sock("c.sock"), "--log-path", &missing])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .expect("run");
        assert_eq!(status.code(), Some(1), "a missing log file is refused");
    })
    .await;
}

/// One raw HTTP/1.1 `PUT` with a JSON body on a unix socket; the status line's code.
async fn put_json(socket: &Path, path: &str, body: &serde_json::Value) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect");
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line")
}

/// Cloud Hypervisor warns about a disk without `image_type` (it guesses the type, which is
/// deprecated, and disables writes to sector 0): the backend names the type, so no warning.
#[tokio::test]
async fn cloud_hypervisor_disks_name_their_type_so_it_guesses_nothing() {
    within(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, mut config) = configs(dir.path())
            .into_iter()
            .find(|(name, _)| *name == "disks")
            .expect("disks config");
        let fake = spec_checked(Flavor::CloudHypervisor, dir.path());
        config.binary = fake.binary().to_path_buf();
        let backend = CloudHypervisorBackend::new(&config.binary).expect("backend");
        let spawned = backend.create(&config).await.expect("create");
        let log = dir.path().join("vmm.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!text.contains("image_type"), "{text}");
        assert_eq!(fake.violations(), Vec::<String>::new());

        // The double does warn about a disk without it, as Cloud Hypervisor v54 does.
        let body = json!({
            "payload": { "kernel": "/k" },
            "disks": [ { "path": "/d/rootfs.img" } ],
        });
        assert_eq!(
            put_json(&config.api_socket, "/api/v1/vm.create", &body).await,
            204
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            text.contains("Disk /d/rootfs.img has no image_type") && text.contains("sector 0"),
            "{text}"
        );
        backend.kill(&spawned.handle).await.expect("kill");
        assert_gone(spawned).await;
    })
    .await;
}
