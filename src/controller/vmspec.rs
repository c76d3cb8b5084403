//! MicroVM → the agent's backend-neutral [`VmSpec`], and the hash of what needs a new boot
//! to change. Pure.

use thiserror::Error;

use crate::api::{InterfaceMode, MicroVM, parse_quantity_bytes};
use crate::vm::{GuestFile, GuestMetadata, Interface, VmSpec, VmUid};

/// A MicroVM the agent API cannot express. Permanent: the object must change first.
#[derive(Debug, Error, PartialEq, Eq, strum::IntoStaticStr)]
pub(crate) enum VmSpecError {
    #[error("the MicroVM has no uid yet")]
    MissingUid,
    #[error("metadata.uid cannot name a VM")]
    #[strum(serialize = "InvalidUid")]
    Uid(#[source] crate::vm::InvalidUid),
    #[error("spec.resources.memory {memory:?} is not a valid quantity")]
    #[strum(serialize = "InvalidMemory")]
    Memory {
        memory: String,
        #[source]
        source: crate::api::QuantityError,
    },
    #[error("spec.{field}.image {reference:?} is not a valid image reference: {detail}")]
    #[strum(serialize = "InvalidImageReference")]
    ImageReference {
        field: &'static str,
        reference: String,
        detail: String,
    },
    #[error("spec.kernel needs a path or an image")]
    MissingKernel,
}

/// The VM description the agent gets, and its hash.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct BuiltSpec {
    pub(crate) spec: VmSpec,
    pub(crate) hash: String,
    /// What the guest reads over its metadata channel.
    pub(crate) metadata: GuestMetadata,
    /// The MicroVM the VM answers to, when it is a claimed warm VM.
    pub(crate) owner: Option<VmUid>,
}

/// Build the agent's [`VmSpec`]; `in_pod`: the VM runs in its VM pod, where a MicroVM with no
/// `network` stanza gets one interface on the pod network (`eth0`, mode `pod`), as KubeVirt
/// gives every VM the pod network by default.
pub(crate) fn build(mvm: &MicroVM, in_pod: bool) -> Result<BuiltSpec, VmSpecError> {
    let meta = &mvm.metadata;
    meta.uid.as_ref().ok_or(VmSpecError::MissingUid)?;
    let identity = super::identity::of(mvm);
    let uid = VmUid::new(identity.vm_uid).map_err(VmSpecError::Uid)?;
    let s = &mvm.spec;
    let memory_bytes =
        parse_quantity_bytes(&s.resources.memory).map_err(|source| VmSpecError::Memory {
            memory: s.resources.memory.clone(),
            source,
        })?;
    let kernel =
        guest_file("kernel", &s.kernel.path, &s.kernel.image)?.ok_or(VmSpecError::MissingKernel)?;
    let initrd = match &s.initrd {
        None => None,
        Some(i) => guest_file("initrd", &i.path, &i.image)?,
    };
    let (rootfs, rootfs_read_only) = match &s.rootfs {
        None => (None, false),
        Some(r) => (guest_file("rootfs", &r.path, &r.image)?, r.read_only),
    };
    let mut interfaces: Vec<Interface> = s
        .network
        .iter()
        .flat_map(|n| n.interfaces.iter())
        .map(|i| Interface {
            name: i.name.clone(),
            mode: i.mode,
            bridge: i.bridge.clone(),
            address: i.address.clone(),
            mac: i.mac.clone(),
        })
        .collect();
    if in_pod && s.network.is_none() {
        interfaces.push(Interface {
            name: "eth0".to_string(),
            mode: InterfaceMode::Pod,
            ..Default::default()
        });
    }
    let spec = VmSpec {
        uid,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        hypervisor: s.hypervisor.pinned(),
        accelerator: s.accelerator.pinned(),
        vcpus: s.resources.vcpus,
        memory_bytes,
        kernel,
        kernel_cmdline: s.kernel.cmdline.clone().unwrap_or_default(),
        initrd,
        rootfs,
        rootfs_read_only,
        interfaces,
        user_data: s.user_data.clone(),
        readiness_console_marker: s.readiness.as_ref().and_then(|r| r.console_marker.clone()),
        readiness_tcp_port: s.readiness.as_ref().and_then(|r| r.tcp_port),
        termination_grace_period_seconds: s.termination_grace_period_seconds,
    };
    let metadata = GuestMetadata {
        hostname: spec.name.clone(),
        labels: guest_labels(mvm),
        user_data: s.user_data.clone(),
    };
    let hash = match claimed_hash(mvm, &spec) {
        Some(hash) => hash,
        None => spec.boot_hash(),
    };
    Ok(BuiltSpec {
        spec,
        hash,
        metadata,
        owner: identity.owner,
    })
}

/// A claimed warm VM booted from the pool's template, not from this spec: while the spec
/// still matches that template, it stands for the warm VM's boot (no new boot); once it
/// differs, its own hash asks for one.
fn claimed_hash(mvm: &MicroVM, spec: &VmSpec) -> Option<String> {
    let claim = mvm.status.as_ref()?.claim.as_ref()?;
    let template = claim.template_hash.as_deref()?;
    (claim.vm_uid.is_some() && spec.template_hash() == template)
        .then(|| claim.boot_hash.clone())
        .flatten()
}

/// The labels a guest sees: the MicroVM's own, without the ones Ignis keeps.
pub(crate) fn guest_labels(mvm: &MicroVM) -> std::collections::BTreeMap<String, String> {
    mvm.metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| !k.starts_with("ignis.dev/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The file of one spec field: an image wins over a path (the API server's CEL rule allows
/// only one); an image reference must parse, so a typo stalls the MicroVM here, naming the
/// field, rather than on the node.
fn guest_file(
    field: &'static str,
    path: &Option<String>,
    image: &Option<String>,
) -> Result<Option<GuestFile>, VmSpecError> {
    match (path, image) {
        (_, Some(reference)) => {
            oci_client::Reference::try_from(reference.as_str()).map_err(|e| {
                VmSpecError::ImageReference {
                    field,
                    reference: reference.clone(),
                    detail: e.to_string(),
                }
            })?;
            Ok(Some(GuestFile::Image(reference.clone())))
        }
        (Some(path), None) => Ok(Some(GuestFile::Path(path.clone()))),
        (None, None) => Ok(None),
    }
}

/// vCPUs and memory a MicroVM reserves; `None` when the memory quantity is invalid.
pub(crate) fn reserved(mvm: &MicroVM) -> Option<(u32, u64)> {
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
        let built = build(&mvm, false).expect("builds");
        assert_eq!(built.spec.uid.as_str(), "uid-web");
        assert_eq!(built.spec.namespace, "default");
        assert_eq!(built.spec.memory_bytes, 256 << 20);
        assert_eq!(
            built.spec.kernel,
            GuestFile::Path("/var/lib/ignis/guest/vmlinuz".into())
        );
        assert_eq!(built.spec.hypervisor, None);
        assert_eq!(
            built.spec.readiness_console_marker.as_deref(),
            Some("ignis: ready")
        );
        assert_eq!(built.spec.termination_grace_period_seconds, 30);
        assert_eq!(built.hash.len(), 16);
    }

    #[test]
    fn hash_ignores_grace_period_and_follows_boot_fields() {
        let mvm = microvm("web");
        let base = build(&mvm, false).expect("builds").hash;
        let mut grace = mvm.clone();
        grace.spec.termination_grace_period_seconds = 5;
        assert_eq!(build(&grace, false).expect("builds").hash, base);
        let mut cmdline = mvm.clone();
        cmdline.spec.kernel.cmdline = Some("console=ttyS0 quiet".to_string());
        assert_ne!(build(&cmdline, false).expect("builds").hash, base);
    }

    #[test]
    fn images_become_references_and_bad_ones_name_their_field() {
        let mut mvm = microvm("web");
        mvm.spec.kernel.path = None;
        mvm.spec.kernel.image = Some("registry.local/kernel:6".to_string());
        mvm.spec.rootfs = Some(crate::api::RootfsSource {
            path: None,
            image: Some("registry.local/rootfs@sha256:".to_string() + &"a".repeat(64)),
            read_only: true,
        });
        let built = build(&mvm, false).expect("builds");
        assert_eq!(
            built.spec.kernel,
            GuestFile::Image("registry.local/kernel:6".into())
        );
        assert!(built.spec.rootfs_read_only);
        assert_eq!(built.spec.images().len(), 2);
        assert_ne!(
            built.hash,
            build(&microvm("web"), false).expect("builds").hash
        );
        mvm.spec.kernel.image = Some("Registry.local/UPPER:tag".to_string());
        let err = build(&mvm, false).expect_err("must fail");
        assert_eq!(err.reason(), "InvalidImageReference");
        assert!(err.to_string().contains("spec.kernel.image"), "{err}");
    }

    #[test]
    fn in_a_pod_no_network_means_the_pod_network() {
        let mvm = microvm("web");
        assert!(
            build(&mvm, false)
                .expect("builds")
                .spec
                .interfaces
                .is_empty()
        );
        let in_pod = build(&mvm, true).expect("builds");
        assert_eq!(
            in_pod.spec.interfaces,
            vec![Interface {
                name: "eth0".into(),
                mode: InterfaceMode::Pod,
                ..Default::default()
            }]
        );
        assert_ne!(in_pod.hash, build(&mvm, false).expect("builds").hash);
        // An explicit stanza is the user's choice, even an empty one.
        let mut none = mvm.clone();
        none.spec.network = Some(crate::api::NetworkSpec {
            interfaces: Vec::new(),
        });
        assert!(
            build(&none, true)
                .expect("builds")
                .spec
                .interfaces
                .is_empty()
        );
    }

    #[test]
    fn bad_memory_is_refused() {
        let mut mvm = microvm("web");
        mvm.spec.resources.memory = "lots".to_string();
        assert_eq!(
            build(&mvm, false).expect_err("must fail").reason(),
            "InvalidMemory"
        );
        assert_eq!(reserved(&mvm), None);
    }
}
