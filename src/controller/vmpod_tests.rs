use super::*;
use crate::api::MicroVmBuilder;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, NodeAffinity, PodCondition, PodStatus,
    Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use pretty_assertions::assert_eq;

fn settings() -> VmPodSettings {
    VmPodSettings {
        image: "registry.local/ignis-controller:1".to_string(),
        overhead: VmmOverhead::default(),
    }
}

fn mvm() -> MicroVmBuilder {
    MicroVmBuilder::new("web")
        .namespace("apps")
        .stored("uid-web", 1, "1")
        .label("app", "web")
        .label(crate::api::NODE_LABEL, "old-node")
}

fn spec(pod: &Pod) -> &PodSpec {
    pod.spec.as_ref().expect("spec")
}

fn required_terms(pod: &Pod) -> Vec<Vec<(String, String, Vec<String>)>> {
    spec(pod)
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| {
            r.node_selector_terms
                .iter()
                .map(|t| {
                    t.match_expressions
                        .iter()
                        .flatten()
                        .map(|e| {
                            (
                                e.key.clone(),
                                e.operator.clone(),
                                e.values.clone().unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn is_true(key: &str) -> (String, String, Vec<String>) {
    (key.to_string(), "In".to_string(), vec!["true".to_string()])
}

#[test]
fn the_pod_carries_name_labels_owner_and_the_launcher() {
    let pod = build(&mvm().build(), &settings()).expect("builds");
    let meta = &pod.metadata;
    assert_eq!(meta.name.as_deref(), Some("vm-web"));
    assert_eq!(meta.namespace.as_deref(), Some("apps"));
    assert_eq!(
        meta.labels.clone().unwrap_or_default(),
        BTreeMap::from([
            ("app".to_string(), "web".to_string()),
            (MICROVM_LABEL.to_string(), "web".to_string()),
        ])
    );
    assert_eq!(
        meta.annotations.clone().unwrap_or_default()[MICROVM_UID_ANNOTATION],
        "uid-web"
    );
    let owner = &meta.owner_references.clone().unwrap_or_default()[0];
    assert_eq!(
        (
            owner.api_version.as_str(),
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str()
        ),
        ("ignis.dev/v1alpha1", "MicroVM", "web", "uid-web")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.block_owner_deletion, Some(true));

    let s = spec(&pod);
    assert_eq!(s.containers.len(), 1);
    let c = &s.containers[0];
    assert_eq!(c.name, "guest");
    assert_eq!(
        c.image.as_deref(),
        Some("registry.local/ignis-controller:1")
    );
    assert_eq!(
        c.args.clone().unwrap_or_default(),
        ["vm-pod", "--console-dir", "/run/ignis"]
    );
    let mount = &c.volume_mounts.clone().unwrap_or_default()[0];
    assert_eq!(
        (mount.name.as_str(), mount.mount_path.as_str()),
        ("console", "/run/ignis")
    );
    let volume = &s.volumes.clone().unwrap_or_default()[0];
    assert_eq!(volume.name, "console");
    assert!(volume.empty_dir.is_some());
    assert_eq!(s.restart_policy.as_deref(), Some("Always"));
    assert_eq!(s.automount_service_account_token, Some(false));
    assert_eq!(s.enable_service_links, Some(false));
    assert_eq!(s.termination_grace_period_seconds, Some(35));
    assert_eq!(
        s.readiness_gates.clone().unwrap_or_default()[0].condition_type,
        "ignis.dev/guest-ready"
    );
}

#[test]
fn the_pod_is_restricted_psa_compliant() {
    let pod = build(&mvm().build(), &settings()).expect("builds");
    let s = spec(&pod);
    let psc = s.security_context.clone().unwrap_or_default();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65534));
    assert_eq!(
        psc.seccomp_profile.map(|p| p.type_).as_deref(),
        Some("RuntimeDefault")
    );
    let csc = s.containers[0].security_context.clone().unwrap_or_default();
    assert_eq!(csc.allow_privilege_escalation, Some(false));
    assert_eq!(
        csc.capabilities.and_then(|c| c.drop).unwrap_or_default(),
        ["ALL"]
    );
    assert!(s.host_network.is_none() && s.host_pid.is_none());
}

#[test]
fn resources_are_guest_memory_plus_the_vmm_overhead_and_the_vcpus() {
    let resources = |b: MicroVmBuilder, overhead: VmmOverhead| {
        let pod = build(
            &b.build(),
            &VmPodSettings {
                overhead,
                ..settings()
            },
        )
        .expect("builds");
        let r = spec(&pod).containers[0]
            .resources
            .clone()
            .unwrap_or_default();
        let get = |m: &Option<BTreeMap<String, Quantity>>, k: &str| {
            m.as_ref().map(|m| m[k].0.clone()).unwrap_or_default()
        };
        (
            get(&r.requests, "memory"),
            get(&r.limits, "memory"),
            get(&r.requests, "cpu"),
            get(&r.limits, "cpu"),
        )
    };
    let qemu = mvm()
        .memory("256Mi")
        .vcpus(2)
        .hypervisor(HypervisorChoice::Qemu);
    assert_eq!(
        resources(qemu, VmmOverhead::default()),
        ("384Mi".into(), "384Mi".into(), "200m".into(), "2".into())
    );
    let fc = mvm()
        .memory("1Gi")
        .hypervisor(HypervisorChoice::Firecracker);
    assert_eq!(
        resources(fc, VmmOverhead::default()).0,
        "1056Mi".to_string()
    );
    // `auto` may land on any VMM: the largest overhead.
    let auto = mvm().memory("256Mi");
    let overhead =
        VmmOverhead::parse(&["qemu=16Mi".into(), "cloud-hypervisor=100Mi".into()]).expect("parses");
    assert_eq!(resources(auto, overhead).0, "356Mi".to_string());
    // Not a whole number of Mi: plain bytes.
    let odd = mvm().memory("100M").hypervisor(HypervisorChoice::Qemu);
    assert_eq!(
        resources(odd, VmmOverhead::default()).0,
        (100_000_000u64 + 128 * MI).to_string()
    );
}

#[test]
fn overhead_flags_parse_and_bad_ones_are_named() {
    let o = VmmOverhead::parse(&["firecracker=64Mi".into()]).expect("parses");
    assert_eq!(o.firecracker, 64 * MI);
    assert_eq!(o.qemu, 128 * MI);
    assert_eq!(o.cloud_hypervisor, 48 * MI);
    assert_eq!(
        VmmOverhead::parse(&["qemu".into()]),
        Err(OverheadError::Malformed("qemu".into()))
    );
    assert_eq!(
        VmmOverhead::parse(&["bochs=1Mi".into()]),
        Err(OverheadError::UnknownHypervisor("bochs=1Mi".into()))
    );
    assert!(matches!(
        VmmOverhead::parse(&["qemu=lots".into()]),
        Err(OverheadError::Quantity { .. })
    ));
}

#[test]
fn placement_passes_the_spec_through_and_requires_an_agent_node() {
    let toleration = Toleration {
        key: Some("dedicated".into()),
        operator: Some("Equal".into()),
        value: Some("vms".into()),
        effect: Some("NoSchedule".into()),
        toleration_seconds: None,
    };
    let built = mvm()
        .node_selector("zone", "a")
        .toleration(toleration.clone())
        .priority_class_name("vm-high")
        .hypervisor(HypervisorChoice::Firecracker)
        .accelerator(AcceleratorChoice::Kvm)
        .build();
    let pod = build(&built, &settings()).expect("builds");
    let s = spec(&pod);
    assert_eq!(
        s.node_selector.clone().unwrap_or_default(),
        BTreeMap::from([("zone".to_string(), "a".to_string())])
    );
    assert_eq!(s.tolerations.clone().unwrap_or_default(), vec![toleration]);
    assert_eq!(s.priority_class_name.as_deref(), Some("vm-high"));
    assert_eq!(
        required_terms(&pod),
        vec![vec![
            is_true("ignis.dev/agent"),
            is_true("hypervisor.ignis.dev/firecracker"),
            is_true("ignis.dev/kvm"),
        ]]
    );
    // auto/auto: any node with an agent.
    let pod = build(&mvm().build(), &settings()).expect("builds");
    assert_eq!(required_terms(&pod), vec![vec![is_true("ignis.dev/agent")]]);
    assert!(spec(&pod).tolerations.is_none() && spec(&pod).node_selector.is_none());
}

#[test]
fn the_users_required_terms_each_get_the_node_requirements() {
    let term = |key: &str| NodeSelectorTerm {
        match_expressions: Some(vec![NodeSelectorRequirement {
            key: key.to_string(),
            operator: "Exists".to_string(),
            values: None,
        }]),
        match_fields: None,
    };
    let affinity = Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![term("gpu"), term("fast")],
            }),
            preferred_during_scheduling_ignored_during_execution: None,
        }),
        ..Default::default()
    };
    let built = mvm()
        .affinity(affinity.clone())
        .hypervisor(HypervisorChoice::Qemu)
        .build();
    let pod = build(&built, &settings()).expect("builds");
    let exists = |k: &str| (k.to_string(), "Exists".to_string(), Vec::new());
    assert_eq!(
        required_terms(&pod),
        vec![
            vec![
                exists("gpu"),
                is_true("ignis.dev/agent"),
                is_true("hypervisor.ignis.dev/qemu")
            ],
            vec![
                exists("fast"),
                is_true("ignis.dev/agent"),
                is_true("hypervisor.ignis.dev/qemu")
            ],
        ]
    );
    // Pod (anti-)affinity passes through untouched.
    assert_eq!(
        spec(&pod)
            .affinity
            .as_ref()
            .and_then(|a| a.pod_affinity.clone()),
        affinity.pod_affinity
    );
}

#[test]
fn names_that_cannot_label_a_pod_and_bad_memory_are_refused() {
    let long = "a".repeat(64);
    let err = build(
        &MicroVmBuilder::new(&long).stored("u", 1, "1").build(),
        &settings(),
    )
    .expect_err("refused");
    assert_eq!(<&str>::from(&err), "NameTooLong");
    assert!(err.to_string().contains("metadata.name"), "{err}");
    let ok = "a".repeat(63);
    assert!(
        build(
            &MicroVmBuilder::new(&ok).stored("u", 1, "1").build(),
            &settings()
        )
        .is_ok()
    );
    let err = build(&mvm().memory("lots").build(), &settings()).expect_err("refused");
    assert_eq!(<&str>::from(&err), "InvalidMemory");
    let err = build(&MicroVmBuilder::new("x").build(), &settings()).expect_err("refused");
    assert_eq!(err, VmPodError::MissingUid);
}

fn condition(type_: &str, status: &str, reason: &str, message: &str, at: i64) -> PodCondition {
    PodCondition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: Some(reason.to_string()),
        message: Some(message.to_string()),
        last_transition_time: Some(Time(Timestamp::from_second(at).expect("time"))),
        ..Default::default()
    }
}

fn running_status(ip: &str) -> PodStatus {
    PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some(ip.into()),
        container_statuses: Some(vec![ContainerStatus {
            name: "guest".into(),
            state: Some(ContainerState {
                running: Some(ContainerStateRunning::default()),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn built_pod() -> Pod {
    let mut pod = build(&mvm().build(), &settings()).expect("builds");
    pod.metadata.uid = Some("pod-uid".into());
    pod
}

#[test]
fn view_of_a_new_pod_is_pending_and_owned() {
    let v = view(&built_pod());
    assert_eq!(v.uid, "pod-uid");
    assert_eq!((v.name.as_str(), v.namespace.as_str()), ("vm-web", "apps"));
    assert_eq!(v.owner_uid.as_deref(), Some("uid-web"));
    assert_eq!(v.node, None);
    assert_eq!(v.unschedulable, None);
    assert!(!v.sandbox_running);
    assert_eq!(v.disruption, None);
    assert_eq!(v.guest_ready, None);
}

#[test]
fn view_reads_the_schedulers_verdict_and_the_sandbox() {
    let mut pod = built_pod();
    pod.status = Some(PodStatus {
        phase: Some("Pending".into()),
        conditions: Some(vec![condition(
            "PodScheduled",
            "False",
            "Unschedulable",
            "0/2 nodes are available: 2 Insufficient memory.",
            100,
        )]),
        ..Default::default()
    });
    let v = view(&pod);
    assert_eq!(
        v.unschedulable,
        Some((
            "0/2 nodes are available: 2 Insufficient memory.".to_string(),
            Timestamp::from_second(100).expect("time")
        ))
    );
    pod.spec.as_mut().expect("spec").node_name = Some("node-b".into());
    let mut status = running_status("10.244.1.7");
    status.conditions = Some(vec![condition(GUEST_READY_GATE, "True", "", "", 5)]);
    pod.status = Some(status);
    let v = view(&pod);
    assert_eq!(v.node.as_deref(), Some("node-b"));
    assert!(v.sandbox_running);
    assert_eq!(v.ip, Some("10.244.1.7".parse().expect("ip")));
    assert_eq!(v.guest_ready, Some(true));
    // An IP but no running launcher yet: not running.
    let mut status = running_status("10.244.1.7");
    status.container_statuses = None;
    pod.status = Some(status);
    assert!(!view(&pod).sandbox_running);
}

#[test]
fn view_names_why_the_vm_must_stop() {
    let reason_of = |pod: &Pod| view(pod).disruption.map(|d| d.reason);
    let mut pod = built_pod();
    pod.status = Some(PodStatus {
        phase: Some("Failed".into()),
        reason: Some("Evicted".into()),
        message: Some("The node was low on resource: memory.".into()),
        ..Default::default()
    });
    assert_eq!(
        view(&pod).disruption,
        Some(Disruption {
            reason: "PodEvicted",
            message: "The node was low on resource: memory.".into()
        })
    );
    for (target, reason) in [
        ("EvictionByEvictionAPI", "PodEvicted"),
        ("PreemptionByScheduler", "PodPreempted"),
        ("DeletionByTaintManager", "NodeLost"),
        ("DeletionByPodGC", "NodeLost"),
        ("TerminationByKubelet", "PodEvicted"),
    ] {
        let mut pod = built_pod();
        pod.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
        let mut status = running_status("10.0.0.1");
        status.conditions = Some(vec![condition("DisruptionTarget", "True", target, "m", 1)]);
        pod.status = Some(status);
        assert_eq!(reason_of(&pod), Some(reason), "{target}");
    }
    let mut pod = built_pod();
    pod.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    assert_eq!(reason_of(&pod), Some("PodDeleted"));
    let mut pod = built_pod();
    pod.status = Some(PodStatus {
        phase: Some("Failed".into()),
        ..Default::default()
    });
    assert_eq!(reason_of(&pod), Some("PodFailed"));
    // A pod no MicroVM controls is told apart.
    let mut pod = built_pod();
    pod.metadata.owner_references = None;
    assert_eq!(view(&pod).owner_uid, None);
}
