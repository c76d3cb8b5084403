//! MicroVM → the agent's backend-neutral `VmSpec`, and the hash of what needs a new boot to
//! change. Pure.

use prost::Message;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::api::{
    AcceleratorChoice, HypervisorChoice, InterfaceMode, MicroVM, parse_quantity_bytes,
};
use crate::proto;

/// A MicroVM the agent API cannot express. Permanent: the object must change first.
#[derive(Debug, Error, PartialEq, Eq, strum::IntoStaticStr)]
pub enum VmSpecError {
    #[error("the MicroVM has no uid yet")]
    MissingUid,
    #[error("spec.resources.memory {memory:?} is not a valid quantity")]
    #[strum(serialize = "InvalidMemory")]
    Memory {
        memory: String,
        #[source]
        source: crate::api::QuantityError,
    },
    #[error(
        "spec.{field}.image is not supported by this version of ignis: put the file on the node and use spec.{field}.path"
    )]
    ImageUnsupported { field: &'static str },
    #[error("spec.kernel needs a path")]
    MissingKernel,
}

/// The VM description the agent gets, and its hash.
#[derive(Clone, Debug, PartialEq)]
pub struct BuiltSpec {
    pub spec: proto::VmSpec,
    pub hash: String,
}

/// Build the agent's `VmSpec` for a MicroVM.
pub fn build(mvm: &MicroVM) -> Result<BuiltSpec, VmSpecError> {
    let meta = &mvm.metadata;
    let uid = meta.uid.clone().ok_or(VmSpecError::MissingUid)?;
    let s = &mvm.spec;
    let memory_bytes =
        parse_quantity_bytes(&s.resources.memory).map_err(|source| VmSpecError::Memory {
            memory: s.resources.memory.clone(),
            source,
        })?;
    if s.kernel.image.is_some() {
        return Err(VmSpecError::ImageUnsupported { field: "kernel" });
    }
    let kernel_path = s.kernel.path.clone().ok_or(VmSpecError::MissingKernel)?;
    let initrd_path = match &s.initrd {
        None => String::new(),
        Some(i) if i.image.is_some() => {
            return Err(VmSpecError::ImageUnsupported { field: "initrd" });
        }
        Some(i) => i.path.clone().unwrap_or_default(),
    };
    let (rootfs_path, rootfs_read_only) = match &s.rootfs {
        None => (String::new(), false),
        Some(r) if r.image.is_some() => {
            return Err(VmSpecError::ImageUnsupported { field: "rootfs" });
        }
        Some(r) => (r.path.clone().unwrap_or_default(), r.read_only),
    };
    let interfaces = s
        .network
        .iter()
        .flat_map(|n| n.interfaces.iter())
        .map(|i| proto::NetworkInterface {
            name: i.name.clone(),
            mode: match i.mode {
                InterfaceMode::Nat => "nat",
                InterfaceMode::Bridge => "bridge",
                InterfaceMode::None => "none",
            }
            .to_string(),
            bridge: i.bridge.clone().unwrap_or_default(),
            address: i.address.clone().unwrap_or_default(),
            mac: i.mac.clone().unwrap_or_default(),
        })
        .collect();
    let spec = proto::VmSpec {
        uid,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        hypervisor: match s.hypervisor {
            HypervisorChoice::Auto => "auto",
            HypervisorChoice::Qemu => "qemu",
            HypervisorChoice::Firecracker => "firecracker",
            HypervisorChoice::CloudHypervisor => "cloud-hypervisor",
        }
        .to_string(),
        accelerator: match s.accelerator {
            AcceleratorChoice::Auto => "auto",
            AcceleratorChoice::Kvm => "kvm",
            AcceleratorChoice::Tcg => "tcg",
        }
        .to_string(),
        vcpus: s.resources.vcpus,
        memory_bytes,
        kernel_path,
        kernel_cmdline: s.kernel.cmdline.clone().unwrap_or_default(),
        initrd_path,
        rootfs_path,
        rootfs_read_only,
        interfaces,
        user_data: s.user_data.clone().unwrap_or_default(),
        readiness_console_marker: s
            .readiness
            .as_ref()
            .and_then(|r| r.console_marker.clone())
            .unwrap_or_default(),
        readiness_tcp_port: s
            .readiness
            .as_ref()
            .and_then(|r| r.tcp_port)
            .map(u32::from)
            .unwrap_or_default(),
        termination_grace_period_seconds: s.termination_grace_period_seconds,
    };
    let hash = spec_hash(&spec);
    Ok(BuiltSpec { spec, hash })
}

/// Hash of every boot-relevant field. The grace period is left out: it only matters when
/// stopping, so changing it must not replace a running guest.
pub fn spec_hash(spec: &proto::VmSpec) -> String {
    let mut boot = spec.clone();
    boot.termination_grace_period_seconds = 0;
    // prost encodes fields in tag order and VmSpec has no maps, so the bytes are canonical.
    let digest = Sha256::digest(boot.encode_to_vec());
    hex::encode(&digest[..8])
}

/// vCPUs and memory a MicroVM reserves; `None` when the memory quantity is invalid.
pub fn reserved(mvm: &MicroVM) -> Option<(u32, u64)> {
    let memory = parse_quantity_bytes(&mvm.spec.resources.memory).ok()?;
    Some((mvm.spec.resources.vcpus, memory))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::microvm;
    use crate::error::ErrorReason;

    #[test]
    fn builds_every_field() {
        let mvm = microvm("web");
        let built = build(&mvm).expect("builds");
        assert_eq!(built.spec.uid, "uid-web");
        assert_eq!(built.spec.namespace, "default");
        assert_eq!(built.spec.memory_bytes, 256 << 20);
        assert_eq!(built.spec.kernel_path, "/var/lib/ignis/guest/vmlinuz");
        assert_eq!(built.spec.hypervisor, "auto");
        assert_eq!(built.spec.readiness_console_marker, "ignis: ready");
        assert_eq!(built.spec.termination_grace_period_seconds, 30);
        assert_eq!(built.hash.len(), 16);
    }

    #[test]
    fn hash_ignores_grace_period_and_follows_boot_fields() {
        let mvm = microvm("web");
        let base = build(&mvm).expect("builds").hash;
        let mut grace = mvm.clone();
        grace.spec.termination_grace_period_seconds = 5;
        assert_eq!(build(&grace).expect("builds").hash, base);
        let mut cmdline = mvm.clone();
        cmdline.spec.kernel.cmdline = Some("console=ttyS0 quiet".to_string());
        assert_ne!(build(&cmdline).expect("builds").hash, base);
    }

    #[test]
    fn images_are_refused_with_a_reason() {
        let mut mvm = microvm("web");
        mvm.spec.kernel.path = None;
        mvm.spec.kernel.image = Some("registry.local/kernel:6".to_string());
        let err = build(&mvm).expect_err("must fail");
        assert_eq!(err.reason(), "ImageUnsupported");
        assert!(err.to_string().contains("spec.kernel.image"));
    }

    #[test]
    fn bad_memory_is_refused() {
        let mut mvm = microvm("web");
        mvm.spec.resources.memory = "lots".to_string();
        assert_eq!(
            build(&mvm).expect_err("must fail").reason(),
            "InvalidMemory"
        );
        assert_eq!(reserved(&mvm), None);
    }
}
