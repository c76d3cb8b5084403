//! The agent API's generated types (`proto/agent.proto`) to and from the domain model, once
//! each way. Only the gRPC edges use this: the agent's service (`agent/server.rs`) and the
//! controller's agent pool (`controller/agents.rs`).
//!
//! The wire carries closed sets as enums. An enum value this side does not know (from a newer
//! peer) is not silently taken for the default: in a spec it refuses the VM with a reason,
//! in a report it reads as "not known".

use thiserror::Error;

use super::{
    Accelerator, ApplyRequest, DesiredState, ExitReason, GuestFile, GuestMetadata, HostInfo,
    Hypervisor, ImageKind, Interface, InterfaceMode, InvalidUid, PodRef, PullFailure, PullSecrets,
    PulledImage, Pulling, RunExit, RunState, SequencedEvent, VmEvent, VmSpec, VmStatus, VmUid,
};
use crate::proto;

/// An `ApplyVM` the agent cannot take at all: refused as a request, nothing is recorded.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub(crate) enum RequestError {
    #[error("spec is required")]
    #[strum(serialize = "InvalidRequest")]
    MissingSpec,
    #[error(transparent)]
    #[strum(serialize = "InvalidRequest")]
    Uid(#[from] InvalidUid),
}

/// A spec naming a value this agent does not know: the VM is recorded as failed with this
/// reason, like any other spec that cannot boot.
#[derive(Clone, Debug, Error, PartialEq, Eq, strum::IntoStaticStr)]
pub enum SpecError {
    #[error("unknown hypervisor {value}: use auto, qemu, firecracker or cloud-hypervisor")]
    UnknownHypervisor { value: i32 },
    #[error("invalid VM spec: {field} {detail}")]
    InvalidSpec { field: &'static str, detail: String },
}

fn hypervisor_to_wire(hypervisor: Option<Hypervisor>) -> proto::Hypervisor {
    match hypervisor {
        None => proto::Hypervisor::Unspecified,
        Some(Hypervisor::Qemu) => proto::Hypervisor::Qemu,
        Some(Hypervisor::Firecracker) => proto::Hypervisor::Firecracker,
        Some(Hypervisor::CloudHypervisor) => proto::Hypervisor::CloudHypervisor,
        Some(Hypervisor::Simulated) => proto::Hypervisor::Simulated,
    }
}

/// `Err` for a value this side does not know.
fn hypervisor_from_wire(value: i32) -> Result<Option<Hypervisor>, i32> {
    match proto::Hypervisor::try_from(value) {
        Ok(proto::Hypervisor::Unspecified) => Ok(None),
        Ok(proto::Hypervisor::Qemu) => Ok(Some(Hypervisor::Qemu)),
        Ok(proto::Hypervisor::Firecracker) => Ok(Some(Hypervisor::Firecracker)),
        Ok(proto::Hypervisor::CloudHypervisor) => Ok(Some(Hypervisor::CloudHypervisor)),
        Ok(proto::Hypervisor::Simulated) => Ok(Some(Hypervisor::Simulated)),
        Err(_) => Err(value),
    }
}

fn accelerator_to_wire(accelerator: Option<Accelerator>) -> proto::Accelerator {
    match accelerator {
        None => proto::Accelerator::Unspecified,
        Some(Accelerator::Kvm) => proto::Accelerator::Kvm,
        Some(Accelerator::Tcg) => proto::Accelerator::Tcg,
    }
}

fn accelerator_from_wire(value: i32) -> Result<Option<Accelerator>, i32> {
    match proto::Accelerator::try_from(value) {
        Ok(proto::Accelerator::Unspecified) => Ok(None),
        Ok(proto::Accelerator::Kvm) => Ok(Some(Accelerator::Kvm)),
        Ok(proto::Accelerator::Tcg) => Ok(Some(Accelerator::Tcg)),
        Err(_) => Err(value),
    }
}

fn mode_to_wire(mode: InterfaceMode) -> proto::InterfaceMode {
    match mode {
        InterfaceMode::Nat => proto::InterfaceMode::Nat,
        InterfaceMode::Bridge => proto::InterfaceMode::Bridge,
        InterfaceMode::None => proto::InterfaceMode::None,
        InterfaceMode::Pod => proto::InterfaceMode::Pod,
    }
}

fn mode_from_wire(value: i32) -> Result<InterfaceMode, i32> {
    match proto::InterfaceMode::try_from(value) {
        Ok(proto::InterfaceMode::Unspecified | proto::InterfaceMode::Nat) => Ok(InterfaceMode::Nat),
        Ok(proto::InterfaceMode::Bridge) => Ok(InterfaceMode::Bridge),
        Ok(proto::InterfaceMode::None) => Ok(InterfaceMode::None),
        Ok(proto::InterfaceMode::Pod) => Ok(InterfaceMode::Pod),
        Err(_) => Err(value),
    }
}

fn state_to_wire(state: RunState) -> proto::VmState {
    match state {
        RunState::Creating => proto::VmState::Creating,
        RunState::Starting => proto::VmState::Starting,
        RunState::Running => proto::VmState::Running,
        RunState::Stopping => proto::VmState::Stopping,
        RunState::Stopped => proto::VmState::Stopped,
        RunState::Exited => proto::VmState::Exited,
        RunState::Failed => proto::VmState::Failed,
        RunState::Suspending => proto::VmState::Suspending,
        RunState::Suspended => proto::VmState::Suspended,
    }
}

/// A state not known here reads as still being created: it is not over, and not ready.
fn state_from_wire(value: i32) -> RunState {
    match proto::VmState::try_from(value) {
        Ok(proto::VmState::Starting) => RunState::Starting,
        Ok(proto::VmState::Running) => RunState::Running,
        Ok(proto::VmState::Stopping) => RunState::Stopping,
        Ok(proto::VmState::Stopped) => RunState::Stopped,
        Ok(proto::VmState::Exited) => RunState::Exited,
        Ok(proto::VmState::Failed) => RunState::Failed,
        Ok(proto::VmState::Suspending) => RunState::Suspending,
        Ok(proto::VmState::Suspended) => RunState::Suspended,
        Ok(proto::VmState::Creating | proto::VmState::Unspecified) | Err(_) => RunState::Creating,
    }
}

fn kind_to_wire(kind: ImageKind) -> proto::ImageKind {
    match kind {
        ImageKind::Kernel => proto::ImageKind::Kernel,
        ImageKind::Initrd => proto::ImageKind::Initrd,
        ImageKind::Rootfs => proto::ImageKind::Rootfs,
    }
}

fn kind_from_wire(value: i32) -> Option<ImageKind> {
    match proto::ImageKind::try_from(value) {
        Ok(proto::ImageKind::Kernel) => Some(ImageKind::Kernel),
        Ok(proto::ImageKind::Initrd) => Some(ImageKind::Initrd),
        Ok(proto::ImageKind::Rootfs) => Some(ImageKind::Rootfs),
        Ok(proto::ImageKind::Unspecified) | Err(_) => None,
    }
}

/// A guest file as the wire's (path, image) pair.
fn file_to_wire(file: Option<&GuestFile>) -> (String, String) {
    match file {
        Some(GuestFile::Path(path)) => (path.clone(), String::new()),
        Some(GuestFile::Image(image)) => (String::new(), image.clone()),
        None => (String::new(), String::new()),
    }
}

/// The wire's (path, image) pair as a guest file; both given is refused.
fn file_from_wire(
    field: &'static str,
    path: String,
    image: String,
) -> Result<Option<GuestFile>, SpecError> {
    match (given(path), given(image)) {
        (Some(_), Some(_)) => Err(SpecError::InvalidSpec {
            field,
            detail: "gives both a path and an image: set exactly one".into(),
        }),
        (Some(path), None) => Ok(Some(GuestFile::Path(path))),
        (None, Some(image)) => Ok(Some(GuestFile::Image(image))),
        (None, None) => Ok(None),
    }
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn given(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

impl From<&VmSpec> for proto::VmSpec {
    fn from(spec: &VmSpec) -> Self {
        let (kernel_path, kernel_image) = file_to_wire(Some(&spec.kernel));
        let (initrd_path, initrd_image) = file_to_wire(spec.initrd.as_ref());
        let (rootfs_path, rootfs_image) = file_to_wire(spec.rootfs.as_ref());
        proto::VmSpec {
            uid: spec.uid.to_string(),
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            hypervisor: hypervisor_to_wire(spec.hypervisor) as i32,
            accelerator: accelerator_to_wire(spec.accelerator) as i32,
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            kernel_path,
            kernel_image,
            kernel_cmdline: spec.kernel_cmdline.clone(),
            initrd_path,
            initrd_image,
            rootfs_path,
            rootfs_image,
            rootfs_read_only: spec.rootfs_read_only,
            interfaces: spec
                .interfaces
                .iter()
                .map(|i| proto::NetworkInterface {
                    name: i.name.clone(),
                    mode: mode_to_wire(i.mode) as i32,
                    bridge: text(&i.bridge),
                    address: text(&i.address),
                    mac: text(&i.mac),
                })
                .collect(),
            user_data: text(&spec.user_data),
            readiness_console_marker: text(&spec.readiness_console_marker),
            readiness_tcp_port: spec.readiness_tcp_port.map(u32::from).unwrap_or(0),
            termination_grace_period_seconds: spec.termination_grace_period_seconds,
        }
    }
}

impl From<&ApplyRequest> for proto::ApplyVmRequest {
    fn from(request: &ApplyRequest) -> Self {
        proto::ApplyVmRequest {
            spec: Some((&request.spec).into()),
            spec_hash: request.spec_hash.clone(),
            run: request.run,
            desired_state: match request.desired {
                DesiredState::Running => proto::DesiredState::Running,
                DesiredState::Stopped => proto::DesiredState::Stopped,
                DesiredState::Suspended => proto::DesiredState::Suspended,
            } as i32,
            pull_secrets: request.pull_secrets.0.clone(),
            pod: request.pod.as_ref().map(|pod| proto::PodSandbox {
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ip: pod.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            }),
            metadata: Some(proto::GuestMetadata {
                hostname: request.metadata.hostname.clone(),
                labels: request.metadata.labels.clone().into_iter().collect(),
                user_data: request.metadata.user_data.clone().unwrap_or_default(),
                has_user_data: request.metadata.user_data.is_some(),
            }),
            owner_uid: request
                .owner
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }
}

/// An `ApplyVM` as the agent takes it. A spec naming values this agent does not know still
/// gives a request (those values at their defaults) with the error to record it failed by.
pub(crate) fn apply_request(
    request: proto::ApplyVmRequest,
) -> Result<(ApplyRequest, Option<SpecError>), RequestError> {
    let spec = request.spec.ok_or(RequestError::MissingSpec)?;
    let mut refused = None;
    let mut refuse = |error: SpecError| {
        refused.get_or_insert(error);
    };
    let hypervisor = hypervisor_from_wire(spec.hypervisor).unwrap_or_else(|value| {
        refuse(SpecError::UnknownHypervisor { value });
        None
    });
    let accelerator = accelerator_from_wire(spec.accelerator).unwrap_or_else(|value| {
        refuse(SpecError::InvalidSpec {
            field: "accelerator",
            detail: format!("{value} is not one of auto, kvm, tcg"),
        });
        None
    });
    let interfaces = spec
        .interfaces
        .into_iter()
        .map(|i| Interface {
            mode: mode_from_wire(i.mode).unwrap_or_else(|value| {
                refuse(SpecError::InvalidSpec {
                    field: "interfaces.mode",
                    detail: format!("{value} is not one of nat, bridge, none, pod"),
                });
                InterfaceMode::None
            }),
            name: i.name,
            bridge: given(i.bridge),
            address: given(i.address),
            mac: given(i.mac),
        })
        .collect();
    let readiness_tcp_port = match spec.readiness_tcp_port {
        0 => None,
        port => u16::try_from(port).map(Some).unwrap_or_else(|_| {
            refuse(SpecError::InvalidSpec {
                field: "readiness.tcpPort",
                detail: format!("{port} is not a TCP port (1-65535)"),
            });
            None
        }),
    };
    let mut file = |field, path, image| {
        file_from_wire(field, path, image).unwrap_or_else(|error| {
            refuse(error);
            None
        })
    };
    let kernel = file("kernel", spec.kernel_path, spec.kernel_image)
        // No kernel at all stays an empty path: the boot refuses it by name.
        .unwrap_or_else(|| GuestFile::Path(String::new()));
    let initrd = file("initrd", spec.initrd_path, spec.initrd_image);
    let rootfs = file("rootfs", spec.rootfs_path, spec.rootfs_image);
    let spec = VmSpec {
        uid: VmUid::new(spec.uid)?,
        namespace: spec.namespace,
        name: spec.name,
        hypervisor,
        accelerator,
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_bytes,
        kernel,
        kernel_cmdline: spec.kernel_cmdline,
        initrd,
        rootfs,
        rootfs_read_only: spec.rootfs_read_only,
        interfaces,
        user_data: given(spec.user_data),
        readiness_console_marker: given(spec.readiness_console_marker),
        readiness_tcp_port,
        termination_grace_period_seconds: spec.termination_grace_period_seconds,
    };
    let pod = request.pod.map(|pod| PodRef {
        ip: given(pod.ip).and_then(|ip| {
            ip.parse()
                .map_err(|_| {
                    refuse(SpecError::InvalidSpec {
                        field: "pod.ip",
                        detail: format!("{ip:?} is not an IP address"),
                    });
                })
                .ok()
        }),
        uid: pod.uid,
        namespace: pod.namespace,
        name: pod.name,
    });
    let desired = if request.desired_state == proto::DesiredState::Stopped as i32 {
        DesiredState::Stopped
    } else if request.desired_state == proto::DesiredState::Suspended as i32 {
        DesiredState::Suspended
    } else {
        DesiredState::Running
    };
    Ok((
        ApplyRequest {
            spec,
            spec_hash: request.spec_hash,
            run: request.run,
            desired,
            pull_secrets: PullSecrets(request.pull_secrets),
            pod,
            metadata: request
                .metadata
                .map(|m| GuestMetadata {
                    hostname: m.hostname,
                    labels: m.labels.into_iter().collect(),
                    user_data: m.has_user_data.then_some(m.user_data),
                })
                .unwrap_or_default(),
            owner: match request.owner_uid.as_str() {
                "" => None,
                owner => Some(VmUid::new(owner)?),
            },
        },
        refused,
    ))
}

impl From<&VmStatus> for proto::Vm {
    fn from(status: &VmStatus) -> Self {
        proto::Vm {
            uid: status.uid.to_string(),
            namespace: status.namespace.clone(),
            name: status.name.clone(),
            spec_hash: status.spec_hash.clone(),
            run: status.run,
            state: state_to_wire(status.state) as i32,
            ready: status.ready,
            hypervisor: hypervisor_to_wire(status.hypervisor) as i32,
            accelerator: accelerator_to_wire(status.accelerator) as i32,
            ip_addresses: status.ip_addresses.clone(),
            created_at_unix_ms: status.created_at_unix_ms,
            started_at_unix_ms: status.started_at_unix_ms,
            ready_at_unix_ms: status.ready_at_unix_ms,
            apply_to_ready_ms: status.apply_to_ready_ms,
            exit: status.exit.as_ref().map(|e| proto::ExitInfo {
                success: e.success,
                reason: e.reason.to_string(),
                message: e.message.clone(),
                permanent: e.permanent,
                exit_code: e.exit_code,
                at_unix_ms: e.at_unix_ms,
            }),
            pid: status.pid,
            vcpus: status.vcpus,
            memory_bytes: status.memory_bytes,
            images: status
                .images
                .iter()
                .map(|i| proto::PulledImage {
                    kind: kind_to_wire(i.kind) as i32,
                    reference: i.reference.clone(),
                    digest: i.digest.clone(),
                })
                .collect(),
            pulling: status.pulling.as_ref().map(|p| proto::Pulling {
                references: p.references.clone(),
                failure: p.failure.as_ref().map(|f| proto::PullFailure {
                    reason: f.reason.clone(),
                    message: f.message.clone(),
                    attempts: f.attempts,
                    retry_at_unix_ms: f.retry_at_unix_ms,
                }),
            }),
            snapshot_bytes: status.snapshot_bytes,
            snapshot_issue: status
                .snapshot_issue
                .as_ref()
                .map(|i| proto::SnapshotIssue {
                    reason: i.reason.clone(),
                    message: i.message.clone(),
                    at_unix_ms: i.at_unix_ms,
                }),
            restored: status.restored,
            owner_uid: status
                .owner
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }
}

/// A VM as an agent reported it. Values this side does not know read as not known.
pub(crate) fn vm_status(vm: proto::Vm) -> Result<VmStatus, InvalidUid> {
    Ok(VmStatus {
        uid: VmUid::new(vm.uid)?,
        namespace: vm.namespace,
        name: vm.name,
        spec_hash: vm.spec_hash,
        run: vm.run,
        state: state_from_wire(vm.state),
        ready: vm.ready,
        hypervisor: hypervisor_from_wire(vm.hypervisor).ok().flatten(),
        accelerator: accelerator_from_wire(vm.accelerator).ok().flatten(),
        ip_addresses: vm.ip_addresses,
        created_at_unix_ms: vm.created_at_unix_ms,
        started_at_unix_ms: vm.started_at_unix_ms,
        ready_at_unix_ms: vm.ready_at_unix_ms,
        applied_at_unix_ms: 0,
        apply_to_ready_ms: vm.apply_to_ready_ms,
        exit: vm.exit.map(|e| RunExit {
            success: e.success,
            reason: ExitReason::from_word(&e.reason),
            message: e.message,
            permanent: e.permanent,
            exit_code: e.exit_code,
            at_unix_ms: e.at_unix_ms,
        }),
        pid: vm.pid,
        vcpus: vm.vcpus,
        memory_bytes: vm.memory_bytes,
        boot_timeouts: 0,
        snapshot_bytes: vm.snapshot_bytes,
        snapshot_issue: vm.snapshot_issue.map(|i| crate::vm::SnapshotIssue {
            reason: i.reason,
            message: i.message,
            at_unix_ms: i.at_unix_ms,
        }),
        restored: vm.restored,
        owner: match vm.owner_uid.as_str() {
            "" => None,
            owner => VmUid::new(owner).ok(),
        },
        // An image kind this side does not know is left out.
        images: vm
            .images
            .into_iter()
            .filter_map(|i| {
                Some(PulledImage {
                    kind: kind_from_wire(i.kind)?,
                    reference: i.reference,
                    digest: i.digest,
                })
            })
            .collect(),
        pulling: vm.pulling.map(|p| Pulling {
            references: p.references,
            failure: p.failure.map(|f| PullFailure {
                reason: f.reason,
                message: f.message,
                attempts: f.attempts,
                retry_at_unix_ms: f.retry_at_unix_ms,
            }),
        }),
    })
}

impl From<&HostInfo> for proto::Host {
    fn from(host: &HostInfo) -> Self {
        proto::Host {
            node_name: host.node_name.clone(),
            vcpus_total: host.vcpus_total,
            memory_total_bytes: host.memory_total_bytes,
            vcpus_used: host.vcpus_used,
            memory_used_bytes: host.memory_used_bytes,
            hypervisors: host
                .hypervisors
                .iter()
                .map(|h| hypervisor_to_wire(Some(*h)) as i32)
                .collect(),
            unavailable_hypervisors: host
                .unavailable_hypervisors
                .iter()
                .map(|(h, detail)| proto::UnavailableHypervisor {
                    hypervisor: hypervisor_to_wire(Some(*h)) as i32,
                    detail: detail.clone(),
                })
                .collect(),
            accelerator: accelerator_to_wire(Some(host.accelerator)) as i32,
            accelerator_detail: host.accelerator_detail.clone(),
            agent_version: host.agent_version.clone(),
            instance_id: host.instance_id.clone(),
        }
    }
}

/// A node as its agent described it. VMMs this side does not know are left out; an
/// accelerator it does not know reads as TCG, the one that asks nothing of the node.
pub(crate) fn host_info(host: proto::Host) -> HostInfo {
    HostInfo {
        node_name: host.node_name,
        vcpus_total: host.vcpus_total,
        memory_total_bytes: host.memory_total_bytes,
        vcpus_used: host.vcpus_used,
        memory_used_bytes: host.memory_used_bytes,
        hypervisors: host
            .hypervisors
            .into_iter()
            .filter_map(|h| hypervisor_from_wire(h).ok().flatten())
            .collect(),
        unavailable_hypervisors: host
            .unavailable_hypervisors
            .into_iter()
            .filter_map(|u| Some((hypervisor_from_wire(u.hypervisor).ok().flatten()?, u.detail)))
            .collect(),
        accelerator: accelerator_from_wire(host.accelerator)
            .ok()
            .flatten()
            .unwrap_or(Accelerator::Tcg),
        accelerator_detail: host.accelerator_detail,
        agent_version: host.agent_version,
        instance_id: host.instance_id,
    }
}

impl From<&SequencedEvent> for proto::VmEvent {
    fn from(event: &SequencedEvent) -> Self {
        proto::VmEvent {
            sequence: event.sequence,
            event: Some(match &event.event {
                VmEvent::Changed(status) => proto::vm_event::Event::Vm(status.as_ref().into()),
                VmEvent::Deleted(uid) => proto::vm_event::Event::Deleted(proto::VmDeleted {
                    uid: uid.to_string(),
                }),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
