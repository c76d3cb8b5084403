use super::*;
use crate::error::ErrorReason;

fn spec() -> VmSpec {
    VmSpec {
        uid: VmUid::new("u").expect("uid"),
        namespace: "default".into(),
        name: "web".into(),
        hypervisor: Some(Hypervisor::Firecracker),
        accelerator: Some(Accelerator::Kvm),
        vcpus: 2,
        memory_bytes: 256 << 20,
        kernel: GuestFile::Path("/k".into()),
        kernel_cmdline: "console=ttyS0".into(),
        initrd: Some(GuestFile::Path("/i".into())),
        rootfs: Some(GuestFile::Image("127.0.0.1:5000/guest/rootfs:1".into())),
        rootfs_read_only: true,
        interfaces: vec![
            Interface {
                name: "eth0".into(),
                mode: InterfaceMode::None,
                ..Default::default()
            },
            Interface {
                name: "eth1".into(),
                mode: InterfaceMode::Bridge,
                bridge: Some("br-lan".into()),
                address: Some("192.168.1.20/24".into()),
                mac: None,
            },
            Interface {
                name: "eth2".into(),
                mode: InterfaceMode::Pod,
                ..Default::default()
            },
        ],
        user_data: Some("#cloud-config\n".into()),
        readiness_console_marker: None,
        readiness_tcp_port: Some(8080),
        termination_grace_period_seconds: 5,
    }
}

fn wire(request: &ApplyRequest) -> proto::ApplyVmRequest {
    request.into()
}

#[test]
fn an_apply_crosses_the_wire_unchanged() {
    let pod = PodRef {
        uid: "6f1c2a0e-93d4-4c1e-8d8a-2b7f0c9e1a55".into(),
        namespace: "default".into(),
        name: "vm-web".into(),
        ip: Some("10.244.1.7".parse().expect("ip")),
    };
    let pods = [
        None,
        Some(pod.clone()),
        Some(PodRef {
            ip: Some("fd00::7".parse().expect("ip")),
            ..pod.clone()
        }),
        Some(PodRef { ip: None, ..pod }),
    ];
    for (desired, pod) in [DesiredState::Running, DesiredState::Stopped]
        .into_iter()
        .flat_map(|d| pods.iter().map(move |p| (d, p.clone())))
    {
        let request = ApplyRequest {
            spec: spec(),
            spec_hash: "h".into(),
            run: 3,
            desired,
            pull_secrets: PullSecrets::new(vec![br#"{"auths":{}}"#.to_vec()]),
            pod,
            metadata: Default::default(),
            owner: None,
        };
        let (back, refused) = apply_request(wire(&request)).expect("valid");
        assert_eq!((back, refused), (request, None));
    }
}

fn with_spec(edit: impl FnOnce(&mut proto::VmSpec)) -> proto::ApplyVmRequest {
    let mut request = wire(&ApplyRequest {
        spec: spec(),
        spec_hash: "h".into(),
        run: 1,
        desired: DesiredState::Running,
        pull_secrets: PullSecrets::default(),
        pod: None,
        metadata: Default::default(),
        owner: None,
    });
    if let Some(spec) = request.spec.as_mut() {
        edit(spec);
    }
    request
}

#[test]
fn values_this_agent_does_not_know_refuse_the_vm_with_a_named_cause() {
    let cases: Vec<(proto::ApplyVmRequest, &str, &str)> = vec![
        (with_spec(|s| s.hypervisor = 99), "UnknownHypervisor", "99"),
        (
            with_spec(|s| s.accelerator = 7),
            "InvalidSpec",
            "accelerator",
        ),
        (
            with_spec(|s| s.interfaces[0].mode = 42),
            "InvalidSpec",
            "interfaces.mode",
        ),
        (
            {
                let mut request = with_spec(|_| {});
                request.pod = Some(proto::PodSandbox {
                    uid: "p".into(),
                    ip: "10.244.1.300".into(),
                    ..Default::default()
                });
                request
            },
            "InvalidSpec",
            "pod.ip",
        ),
        (
            with_spec(|s| s.readiness_tcp_port = 70000),
            "InvalidSpec",
            "readiness.tcpPort",
        ),
        (
            with_spec(|s| s.kernel_image = "reg/k:1".into()),
            "InvalidSpec",
            "kernel",
        ),
    ];
    for (request, reason, names) in cases {
        let (read, refused) = apply_request(request).expect("a request");
        let error = refused.expect(reason);
        assert_eq!(error.reason(), reason, "{error}");
        assert!(error.to_string().contains(names), "{error}");
        assert_eq!(read.spec.uid.as_str(), "u", "the VM is still known");
    }
}

#[test]
fn images_cross_the_wire_and_secrets_stay_out_of_records() {
    let request = ApplyRequest {
        spec: VmSpec {
            kernel: GuestFile::Image("reg/k@sha256:00".into()),
            initrd: None,
            ..spec()
        },
        spec_hash: "h".into(),
        run: 1,
        desired: DesiredState::Running,
        pull_secrets: PullSecrets::new(vec![b"hunter2".to_vec()]),
        pod: None,
        metadata: Default::default(),
        owner: None,
    };
    let wire = wire(&request);
    let s = wire.spec.as_ref().expect("spec");
    assert_eq!(
        (s.kernel_path.as_str(), s.kernel_image.as_str()),
        ("", "reg/k@sha256:00")
    );
    assert_eq!(s.rootfs_image, "127.0.0.1:5000/guest/rootfs:1");
    let (back, refused) = apply_request(wire).expect("valid");
    assert_eq!((back.clone(), refused), (request, None));
    let record = serde_json::to_string(&back).expect("json");
    assert!(!record.contains("hunter2"), "{record}");
    assert!(!format!("{back:?}").contains("hunter2"));
}

#[test]
fn an_unspecified_mode_is_nat_and_an_unspecified_choice_is_auto() {
    let (read, refused) = apply_request(with_spec(|s| {
        s.interfaces[0].mode = 0;
        s.hypervisor = 0;
        s.accelerator = 0;
        s.readiness_tcp_port = 0;
    }))
    .expect("valid");
    assert_eq!(refused, None);
    assert_eq!(read.spec.interfaces[0].mode, InterfaceMode::Nat);
    assert_eq!((read.spec.hypervisor, read.spec.accelerator), (None, None));
    assert_eq!(read.spec.readiness_tcp_port, None);
}

#[test]
fn requests_without_a_spec_or_a_usable_uid_are_refused_whole() {
    let missing = proto::ApplyVmRequest::default();
    assert_eq!(
        apply_request(missing).expect_err("no spec").reason(),
        "InvalidRequest"
    );
    let bad = with_spec(|s| s.uid = "../etc".into());
    let error = apply_request(bad).expect_err("bad uid");
    assert!(error.to_string().contains("../etc"), "{error}");
}

#[test]
fn statuses_and_hosts_cross_the_wire_unchanged() {
    let status = VmStatus {
        spec_hash: "h".into(),
        run: 2,
        state: RunState::Exited,
        hypervisor: Some(Hypervisor::Qemu),
        accelerator: Some(Accelerator::Tcg),
        ip_addresses: vec!["10.88.0.5".into()],
        started_at_unix_ms: 10,
        exit: Some(RunExit {
            success: false,
            reason: ExitReason::GuestPanic,
            message: "panic".into(),
            permanent: false,
            exit_code: 0,
            at_unix_ms: 20,
        }),
        pid: 42,
        images: vec![PulledImage {
            kind: ImageKind::Rootfs,
            reference: "reg/r:1".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
        }],
        pulling: Some(Pulling {
            references: vec!["reg/k:1".into()],
            failure: Some(PullFailure {
                reason: "ImageNotFound".into(),
                message: "manifest unknown".into(),
                attempts: 2,
                retry_at_unix_ms: 99,
            }),
        }),
        ..VmStatus::new(VmUid::new("u").expect("uid"), "ns".into(), "n".into())
    };
    assert_eq!(vm_status((&status).into()).expect("valid"), status);
    let mut newer = proto::Vm::from(&status);
    newer.images[0].kind = 9;
    assert!(vm_status(newer).expect("valid").images.is_empty());
    let host = HostInfo {
        node_name: "node-a".into(),
        vcpus_total: 8,
        memory_total_bytes: 1 << 34,
        vcpus_used: 1,
        memory_used_bytes: 1 << 28,
        hypervisors: vec![Hypervisor::Qemu, Hypervisor::Simulated],
        unavailable_hypervisors: vec![(
            Hypervisor::Firecracker,
            "VMM binary firecracker not found".into(),
        )],
        accelerator: Accelerator::Kvm,
        accelerator_detail: "probe booted".into(),
        agent_version: "0.1.0".into(),
        instance_id: "i".into(),
    };
    assert_eq!(host_info((&host).into()), host);
    let mut newer = proto::Host::from(&host);
    newer.hypervisors.push(77);
    assert_eq!(host_info(newer).hypervisors, host.hypervisors);
}

#[test]
fn events_carry_their_sequence() {
    let deleted = SequencedEvent {
        sequence: 7,
        event: VmEvent::Deleted(VmUid::new("u").expect("uid")),
    };
    let wire = proto::VmEvent::from(&deleted);
    assert_eq!(wire.sequence, 7);
    assert!(matches!(
        wire.event,
        Some(proto::vm_event::Event::Deleted(proto::VmDeleted { uid })) if uid == "u"
    ));
}
