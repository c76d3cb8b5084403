use super::*;
use crate::error::ErrorReason;

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
    }
}

fn spec() -> SpecRecord {
    SpecRecord {
        uid: "u".into(),
        hypervisor: "auto".into(),
        accelerator: "auto".into(),
        vcpus: 1,
        memory_bytes: 256 << 20,
        ..Default::default()
    }
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
    let fc = SpecRecord {
        hypervisor: "firecracker".into(),
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
    let fc_tcg = SpecRecord {
        accelerator: "tcg".into(),
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
            SpecRecord {
                hypervisor: "xen".into(),
                ..spec()
            },
            "UnknownHypervisor",
        ),
        (
            SpecRecord {
                memory_bytes: 9 << 30,
                ..spec()
            },
            "InsufficientMemory",
        ),
        (
            SpecRecord {
                memory_bytes: 0,
                ..spec()
            },
            "InvalidSpec",
        ),
        (
            SpecRecord {
                accelerator: "kvm".into(),
                ..spec()
            },
            "KvmUnavailable",
        ),
        (
            SpecRecord {
                hypervisor: "cloud-hypervisor".into(),
                ..spec()
            },
            "HypervisorUnavailable",
        ),
        (
            SpecRecord {
                hypervisor: "simulated".into(),
                ..spec()
            },
            "HypervisorUnavailable",
        ),
        (
            SpecRecord {
                readiness_tcp_port: 80,
                ..spec()
            },
            "ReadinessUnreachable",
        ),
        (
            SpecRecord {
                readiness_tcp_port: 80,
                interfaces: vec![iface("eth0", "none", ""), iface("eth1", "bridge", "")],
                ..spec()
            },
            "ReadinessUnreachable",
        ),
        (
            SpecRecord {
                readiness_tcp_port: 70000,
                interfaces: vec![iface("eth0", "nat", "")],
                ..spec()
            },
            "InvalidSpec",
        ),
        (
            SpecRecord {
                interfaces: vec![iface("eth0", "macvtap", "")],
                ..spec()
            },
            "InvalidSpec",
        ),
    ];
    for (spec, reason) in cases {
        let error = plan_boot(&spec, &env(Accelerator::Tcg)).expect_err(reason);
        assert_eq!(error.reason(), reason, "{error}");
        assert!(error.is_permanent());
    }
    let unavailable = plan_boot(
        &SpecRecord {
            hypervisor: "cloud-hypervisor".into(),
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

fn iface(name: &str, mode: &str, address: &str) -> crate::agent::state::InterfaceRecord {
    crate::agent::state::InterfaceRecord {
        name: name.into(),
        mode: mode.into(),
        address: address.into(),
        ..Default::default()
    }
}

#[test]
fn networked_specs_plan_and_convert() {
    let nat = SpecRecord {
        readiness_tcp_port: 80,
        interfaces: vec![iface("eth0", "nat", "")],
        ..spec()
    };
    assert!(plan_boot(&nat, &env(Accelerator::Tcg)).is_ok());
    let bridged = SpecRecord {
        readiness_tcp_port: 8080,
        interfaces: vec![
            iface("eth0", "none", ""),
            crate::agent::state::InterfaceRecord {
                bridge: "br-lan".into(),
                ..iface("eth1", "bridge", "192.168.1.20/24")
            },
        ],
        ..spec()
    };
    assert!(plan_boot(&bridged, &env(Accelerator::Tcg)).is_ok());
    let requests = interface_requests(&bridged).expect("requests");
    assert_eq!(
        requests,
        vec![
            InterfaceRequest {
                name: "eth0".into(),
                mode: InterfaceMode::None,
                ..Default::default()
            },
            InterfaceRequest {
                name: "eth1".into(),
                mode: InterfaceMode::Bridge,
                bridge: Some("br-lan".into()),
                address: Some("192.168.1.20/24".into()),
                mac: None,
            },
        ]
    );
    assert!(!needs_tap(&requests[0]) && needs_tap(&requests[1]));
    assert_eq!(
        interface_requests(&SpecRecord {
            interfaces: vec![iface("eth0", "", "")],
            ..spec()
        })
        .expect("default")[0]
            .mode,
        InterfaceMode::Nat,
        "an empty mode is nat"
    );
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
    };
    assert_eq!(
        guest_cmdline("console=ttyS0 quiet ", std::slice::from_ref(&eth0)),
        "console=ttyS0 quiet ignis.ip=10.88.0.5/16 ignis.gw=10.88.0.1"
    );
    assert_eq!(
        guest_cmdline("", std::slice::from_ref(&eth0)),
        "ignis.ip=10.88.0.5/16 ignis.gw=10.88.0.1"
    );
    assert_eq!(guest_cmdline("console=ttyS0", &[]), "console=ttyS0");
}

#[test]
fn file_checks_tell_missing_from_unreadable() {
    let tmp = tempfile::tempdir().expect("tmp");
    let kernel = tmp.path().join("vmlinuz");
    std::fs::write(&kernel, b"k").expect("kernel");
    let ok = SpecRecord {
        kernel_path: kernel.display().to_string(),
        ..spec()
    };
    assert!(check_files(&ok).is_ok());
    let missing = SpecRecord {
        kernel_path: "/nope".into(),
        ..spec()
    };
    assert_eq!(
        check_files(&missing).expect_err("missing").reason(),
        "KernelNotFound"
    );
    let dir_initrd = SpecRecord {
        initrd_path: tmp.path().display().to_string(),
        ..ok.clone()
    };
    assert_eq!(
        check_files(&dir_initrd).expect_err("dir").reason(),
        "InitrdUnreadable"
    );
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, b"").expect("empty");
    let empty_initrd = SpecRecord {
        initrd_path: empty.display().to_string(),
        ..ok
    };
    assert_eq!(
        check_files(&empty_initrd).expect_err("empty").reason(),
        "InitrdUnreadable"
    );
}
