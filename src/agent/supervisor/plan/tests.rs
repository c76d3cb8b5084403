use super::*;
use crate::agent::supervisor::tests::dir_with_kernel;
use crate::error::ErrorReason;
use crate::vm::wire::SpecError;

fn env(accelerator: Accelerator) -> PlanEnv {
    PlanEnv {
        host_memory_bytes: 8 << 30,
        accelerator,
        accelerator_detail: "probe said so".into(),
        available: vec![
            (Hypervisor::Qemu, true, true),
            (Hypervisor::Firecracker, true, false),
        ],
        unavailable: vec![(
            Hypervisor::CloudHypervisor,
            "binary cloud-hypervisor not found".into(),
        )],
        simulated: false,
        allow_tcg: true,
    }
}

fn spec() -> VmSpec {
    crate::testing::vm_spec("u")
}

#[test]
fn planning_picks_the_vmm_and_accelerator() {
    let plan = plan_boot(&spec(), &env(Accelerator::Tcg)).expect("plan");
    assert_eq!(
        (plan.hypervisor, plan.accelerator, plan.memory_mib),
        (Hypervisor::Qemu, Accelerator::Tcg, 256)
    );
    let plan = plan_boot(&spec(), &env(Accelerator::Kvm)).expect("plan");
    assert_eq!(
        (plan.hypervisor, plan.accelerator),
        (Hypervisor::Qemu, Accelerator::Kvm)
    );
    let fc = VmSpec {
        hypervisor: Some(Hypervisor::Firecracker),
        ..spec()
    };
    assert_eq!(
        plan_boot(&fc, &env(Accelerator::Kvm))
            .expect("fc")
            .accelerator,
        Accelerator::Kvm
    );
    assert_eq!(
        plan_boot(&fc, &env(Accelerator::Tcg))
            .expect_err("no kvm")
            .reason(),
        "KvmUnavailable"
    );
    let fc_tcg = VmSpec {
        accelerator: Some(Accelerator::Tcg),
        ..fc
    };
    assert_eq!(
        plan_boot(&fc_tcg, &env(Accelerator::Kvm))
            .expect_err("fc tcg")
            .reason(),
        "AcceleratorUnsupported"
    );
}

#[test]
fn planning_refuses_bad_input_with_a_named_cause() {
    let cases = [
        (
            VmSpec {
                memory_bytes: 9 << 30,
                ..spec()
            },
            "InsufficientMemory",
        ),
        (
            VmSpec {
                memory_bytes: 0,
                ..spec()
            },
            "InvalidSpec",
        ),
        (
            VmSpec {
                accelerator: Some(Accelerator::Kvm),
                ..spec()
            },
            "KvmUnavailable",
        ),
        (
            VmSpec {
                hypervisor: Some(Hypervisor::CloudHypervisor),
                ..spec()
            },
            "HypervisorUnavailable",
        ),
        (
            VmSpec {
                hypervisor: Some(Hypervisor::Simulated),
                ..spec()
            },
            "HypervisorUnavailable",
        ),
        (
            VmSpec {
                readiness_tcp_port: Some(80),
                ..spec()
            },
            "ReadinessUnreachable",
        ),
        (
            VmSpec {
                readiness_tcp_port: Some(80),
                interfaces: vec![
                    iface("eth0", InterfaceMode::None, None),
                    iface("eth1", InterfaceMode::Bridge, None),
                ],
                ..spec()
            },
            "ReadinessUnreachable",
        ),
    ];
    for (spec, reason) in cases {
        let error = plan_boot(&spec, &env(Accelerator::Tcg)).expect_err(reason);
        assert_eq!(error.reason(), reason, "{error}");
        assert!(error.is_permanent());
    }
    // What the agent cannot even read (an unknown hypervisor, mode or accelerator, a port out
    // of range) is refused where the request comes in (`vm::wire`), the same way.
    for (error, reason) in [
        (
            SpecError::UnknownHypervisor { value: 99 },
            "UnknownHypervisor",
        ),
        (
            SpecError::InvalidSpec {
                field: "interfaces.mode",
                detail: "42 is not one of nat, bridge, none".into(),
            },
            "InvalidSpec",
        ),
    ] {
        let error = BootError::Spec(error);
        assert_eq!(error.reason(), reason, "{error}");
        assert!(error.is_permanent());
    }
    let unavailable = plan_boot(
        &VmSpec {
            hypervisor: Some(Hypervisor::CloudHypervisor),
            ..spec()
        },
        &env(Accelerator::Tcg),
    )
    .expect_err("ch");
    assert!(
        unavailable
            .to_string()
            .contains("binary cloud-hypervisor not found")
    );
}

fn iface(name: &str, mode: InterfaceMode, address: Option<&str>) -> Interface {
    Interface {
        name: name.into(),
        mode,
        address: address.map(str::to_owned),
        ..Default::default()
    }
}

#[test]
fn networked_specs_plan_and_convert() {
    let nat = VmSpec {
        readiness_tcp_port: Some(80),
        interfaces: vec![iface("eth0", InterfaceMode::Nat, None)],
        ..spec()
    };
    assert!(plan_boot(&nat, &env(Accelerator::Tcg)).is_ok());
    let bridged = VmSpec {
        readiness_tcp_port: Some(8080),
        interfaces: vec![
            iface("eth0", InterfaceMode::None, None),
            Interface {
                bridge: Some("br-lan".into()),
                ..iface("eth1", InterfaceMode::Bridge, Some("192.168.1.20/24"))
            },
        ],
        ..spec()
    };
    assert!(plan_boot(&bridged, &env(Accelerator::Tcg)).is_ok());
    let requests = &bridged.interfaces;
    assert_eq!(
        requests,
        &vec![
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
        ]
    );
    assert!(!needs_tap(&requests[0]) && needs_tap(&requests[1]));
}

#[test]
fn the_guest_cmdline_gets_the_network_parameters() {
    let eth0 = AttachedInterface {
        name: "eth0".into(),
        mode: InterfaceMode::Nat,
        tap: "igabc".into(),
        mac: "02:00:00:00:00:01".into(),
        bridge: "ignis0".into(),
        address: Some(("10.88.0.5".parse().expect("ip"), 16)),
        gateway: Some("10.88.0.1".parse().expect("gw")),
        dns: vec!["10.88.0.1".parse().expect("dns")],
        reachable_at: None,
    };
    let eth0 = std::slice::from_ref(&eth0);
    assert_eq!(
        guest_cmdline("console=ttyS0 quiet ", eth0, "web"),
        "console=ttyS0 quiet ip=10.88.0.5::10.88.0.1:255.255.0.0:web:eth0:off:10.88.0.1"
    );
    assert_eq!(
        guest_cmdline("", eth0, "web"),
        "ip=10.88.0.5::10.88.0.1:255.255.0.0:web:eth0:off:10.88.0.1"
    );
    assert_eq!(guest_cmdline("console=ttyS0", &[], "web"), "console=ttyS0");
    assert_eq!(
        guest_cmdline("console=ttyS0 ip=dhcp", eth0, "web"),
        "console=ttyS0 ip=dhcp",
        "the spec's own ip= wins"
    );
}

#[test]
fn file_checks_tell_missing_from_unreadable_and_refuse_what_is_not_allowed() {
    let (tmp, kernel) = dir_with_kernel();
    let allowed = [tmp.path().to_path_buf()];
    let check = |spec: &VmSpec| check_files(spec, &allowed);
    let ok = VmSpec {
        kernel: GuestFile::Path(kernel.display().to_string()),
        ..spec()
    };
    assert!(check(&ok).is_ok());
    let image = VmSpec {
        kernel: GuestFile::Image("reg/k:1".into()),
        rootfs: Some(GuestFile::Image("reg/r:1".into())),
        ..spec()
    };
    assert!(check(&image).is_ok(), "images are checked by the pull");
    let missing = VmSpec {
        kernel: GuestFile::Path(tmp.path().join("nope").display().to_string()),
        ..spec()
    };
    assert_eq!(
        check(&missing).expect_err("missing").reason(),
        "KernelNotFound"
    );
    let sub = tmp.path().join("sub");
    std::fs::create_dir(&sub).expect("dir");
    let dir_initrd = VmSpec {
        initrd: Some(GuestFile::Path(sub.display().to_string())),
        ..ok.clone()
    };
    assert_eq!(
        check(&dir_initrd).expect_err("dir").reason(),
        "InitrdUnreadable"
    );
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, b"").expect("empty");
    let empty_initrd = VmSpec {
        initrd: Some(GuestFile::Path(empty.display().to_string())),
        ..ok.clone()
    };
    assert_eq!(
        check(&empty_initrd).expect_err("empty").reason(),
        "InitrdUnreadable"
    );
    for outside in ["/proc/1/root/etc/shadow", "/etc/hostname", "/nope"] {
        let refused = VmSpec {
            rootfs: Some(GuestFile::Path(outside.into())),
            ..ok.clone()
        };
        let error = check(&refused).expect_err(outside);
        assert_eq!(error.reason(), "PathNotAllowed", "{outside}");
        assert!(error.is_permanent());
        assert!(error.full_message().starts_with("rootfs.path refused: "));
    }
}

#[test]
fn tcg_runs_only_where_the_admin_allows_it() {
    let mut no_tcg = env(Accelerator::Tcg);
    no_tcg.allow_tcg = false;
    let error = plan_boot(&spec(), &no_tcg).expect_err("TCG refused");
    assert_eq!(error.reason(), "TcgNotAllowed");
    assert!(error.is_permanent());
    assert!(error.to_string().contains("TCG is not a security boundary"));
    let mut kvm = env(Accelerator::Kvm);
    kvm.allow_tcg = false;
    assert_eq!(
        plan_boot(&spec(), &kvm).expect("KVM").accelerator,
        Accelerator::Kvm
    );
}

#[test]
fn a_vm_pod_has_one_pod_network_whose_address_is_not_chosen() {
    let pod = crate::vm::PodRef {
        uid: "u".into(),
        namespace: "default".into(),
        name: "vm-web".into(),
        ip: None,
    };
    let with = |interfaces: Vec<Interface>| VmSpec {
        interfaces,
        ..crate::testing::vm_spec("u")
    };
    let one = with(vec![iface("eth0", InterfaceMode::Pod, None)]);
    assert!(check_pod_interfaces(&one, Some(&pod)).is_ok());
    assert!(check_pod_interfaces(&with(vec![]), None).is_ok());
    let cases = [
        (one.clone(), None, "NoVmPod"),
        (
            with(vec![
                iface("eth0", InterfaceMode::Pod, None),
                iface("eth1", InterfaceMode::Pod, None),
            ]),
            Some(&pod),
            "InvalidSpec",
        ),
        (
            with(vec![iface("eth0", InterfaceMode::Pod, Some("10.0.0.2/24"))]),
            Some(&pod),
            "InvalidSpec",
        ),
    ];
    for (spec, pod, reason) in cases {
        let error = check_pod_interfaces(&spec, pod).expect_err(reason);
        assert_eq!(error.reason(), reason, "{error}");
        assert!(error.is_permanent());
    }
    // A pod interface carries an address (the pod IP) for TCP readiness; none is on the node.
    assert!(gets_an_address(&one.interfaces[0]) && !needs_tap(&one.interfaces[0]));
}
