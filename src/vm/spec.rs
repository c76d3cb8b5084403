//! What the controller asks an agent for: the backend-neutral description of a VM, and the
//! apply that carries it (which run, running or stopped).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use super::VmUid;
use crate::api::{Accelerator, Hypervisor, ImageKind, InterfaceMode};

/// One guest network interface as asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    /// Guest-side name (`eth0`).
    pub name: String,
    #[serde(default, deserialize_with = "mode_or_nat")]
    pub mode: InterfaceMode,
    /// `bridge` mode only: the existing bridge to attach to.
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub bridge: Option<String>,
    /// `nat`: an address in the node's range (`10.88.0.9` or `10.88.0.9/16`), else one is
    /// allocated. `bridge`: `a.b.c.d/prefix` handed to the guest as is.
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub address: Option<String>,
    /// A unicast MAC; else one derived from the VM uid and interface name.
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub mac: Option<String>,
}

/// Where a guest file (kernel, initrd, root disk) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestFile {
    /// A file on the node.
    Path(String),
    /// An OCI image reference (`registry/repo:tag` or `registry/repo@sha256:...`); the agent
    /// pulls it into the node's image cache.
    Image(String),
}

impl GuestFile {
    pub fn image(&self) -> Option<&str> {
        match self {
            GuestFile::Image(reference) => Some(reference),
            GuestFile::Path(_) => None,
        }
    }

    pub fn path(&self) -> Option<&str> {
        match self {
            GuestFile::Path(path) => Some(path),
            GuestFile::Image(_) => None,
        }
    }
}

/// The backend-neutral description of a VM, derived from a MicroVM by the controller.
/// Serialized (as the agent's `spec.json` and for [`VmSpec::boot_hash`]) in the flat layout
/// of [`SpecRecord`], so records and hashes of VMs booted before images existed stay valid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "SpecRecord", try_from = "SpecRecord")]
pub struct VmSpec {
    pub(crate) uid: VmUid,
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// `None`: the best VMM the node offers.
    pub(crate) hypervisor: Option<Hypervisor>,
    /// `None`: KVM when the node's probe says it works, else TCG.
    pub(crate) accelerator: Option<Accelerator>,
    pub(crate) vcpus: u32,
    pub(crate) memory_bytes: u64,
    pub(crate) kernel: GuestFile,
    pub(crate) kernel_cmdline: String,
    pub(crate) initrd: Option<GuestFile>,
    pub(crate) rootfs: Option<GuestFile>,
    pub(crate) rootfs_read_only: bool,
    pub(crate) interfaces: Vec<Interface>,
    pub(crate) user_data: Option<String>,
    /// Ready once this text appears on the serial console.
    pub(crate) readiness_console_marker: Option<String>,
    /// Ready once this port on the guest's first address accepts a connection; wins over the
    /// marker when the guest has an address.
    pub(crate) readiness_tcp_port: Option<u16>,
    pub(crate) termination_grace_period_seconds: i64,
}

/// [`VmSpec`] on disk: the layout of agents before images, plus the image references (left
/// out when absent, so a spec without images serializes, and hashes, as it always did).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct SpecRecord {
    uid: VmUid,
    namespace: String,
    name: String,
    #[serde(default, deserialize_with = "absent_if_auto")]
    hypervisor: Option<Hypervisor>,
    #[serde(default, deserialize_with = "absent_if_auto")]
    accelerator: Option<Accelerator>,
    vcpus: u32,
    memory_bytes: u64,
    #[serde(default)]
    kernel_path: String,
    #[serde(default)]
    kernel_cmdline: String,
    #[serde(default, deserialize_with = "absent_if_empty")]
    initrd_path: Option<String>,
    #[serde(default, deserialize_with = "absent_if_empty")]
    rootfs_path: Option<String>,
    #[serde(default)]
    rootfs_read_only: bool,
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default, deserialize_with = "absent_if_empty")]
    user_data: Option<String>,
    #[serde(default, deserialize_with = "absent_if_empty")]
    readiness_console_marker: Option<String>,
    #[serde(default, deserialize_with = "absent_if_empty")]
    readiness_tcp_port: Option<u16>,
    #[serde(default)]
    termination_grace_period_seconds: i64,
    #[serde(
        default,
        deserialize_with = "absent_if_empty",
        skip_serializing_if = "Option::is_none"
    )]
    kernel_image: Option<String>,
    #[serde(
        default,
        deserialize_with = "absent_if_empty",
        skip_serializing_if = "Option::is_none"
    )]
    initrd_image: Option<String>,
    #[serde(
        default,
        deserialize_with = "absent_if_empty",
        skip_serializing_if = "Option::is_none"
    )]
    rootfs_image: Option<String>,
}

/// A path or an image, not both; `None` for neither.
fn guest_file(
    what: &str,
    path: Option<String>,
    image: Option<String>,
) -> Result<Option<GuestFile>, String> {
    match (path, image) {
        (Some(_), Some(_)) => Err(format!("{what} has both a path and an image")),
        (Some(path), None) => Ok(Some(GuestFile::Path(path))),
        (None, Some(image)) => Ok(Some(GuestFile::Image(image))),
        (None, None) => Ok(None),
    }
}

fn split(file: Option<GuestFile>) -> (Option<String>, Option<String>) {
    match file {
        Some(GuestFile::Path(path)) => (Some(path), None),
        Some(GuestFile::Image(image)) => (None, Some(image)),
        None => (None, None),
    }
}

impl From<VmSpec> for SpecRecord {
    fn from(s: VmSpec) -> Self {
        let (kernel_path, kernel_image) = split(Some(s.kernel));
        let (initrd_path, initrd_image) = split(s.initrd);
        let (rootfs_path, rootfs_image) = split(s.rootfs);
        SpecRecord {
            uid: s.uid,
            namespace: s.namespace,
            name: s.name,
            hypervisor: s.hypervisor,
            accelerator: s.accelerator,
            vcpus: s.vcpus,
            memory_bytes: s.memory_bytes,
            kernel_path: kernel_path.unwrap_or_default(),
            kernel_cmdline: s.kernel_cmdline,
            initrd_path,
            rootfs_path,
            rootfs_read_only: s.rootfs_read_only,
            interfaces: s.interfaces,
            user_data: s.user_data,
            readiness_console_marker: s.readiness_console_marker,
            readiness_tcp_port: s.readiness_tcp_port,
            termination_grace_period_seconds: s.termination_grace_period_seconds,
            kernel_image,
            initrd_image,
            rootfs_image,
        }
    }
}

impl TryFrom<SpecRecord> for VmSpec {
    type Error = String;

    fn try_from(r: SpecRecord) -> Result<Self, String> {
        let kernel_path = Some(r.kernel_path).filter(|p| !p.is_empty() || r.kernel_image.is_none());
        Ok(VmSpec {
            uid: r.uid,
            namespace: r.namespace,
            name: r.name,
            hypervisor: r.hypervisor,
            accelerator: r.accelerator,
            vcpus: r.vcpus,
            memory_bytes: r.memory_bytes,
            // An empty path (no kernel given at all) stays a path: the boot refuses it by name.
            kernel: guest_file("kernel", kernel_path, r.kernel_image)?
                .unwrap_or_else(|| GuestFile::Path(String::new())),
            kernel_cmdline: r.kernel_cmdline,
            initrd: guest_file("initrd", r.initrd_path, r.initrd_image)?,
            rootfs: guest_file("rootfs", r.rootfs_path, r.rootfs_image)?,
            rootfs_read_only: r.rootfs_read_only,
            interfaces: r.interfaces,
            user_data: r.user_data,
            readiness_console_marker: r.readiness_console_marker,
            readiness_tcp_port: r.readiness_tcp_port,
            termination_grace_period_seconds: r.termination_grace_period_seconds,
        })
    }
}

impl VmSpec {
    /// Hash of every boot-relevant field. The grace period is left out: it only matters when
    /// stopping, so changing it must not replace a running guest.
    pub(crate) fn boot_hash(&self) -> String {
        let boot = VmSpec {
            termination_grace_period_seconds: 0,
            ..self.clone()
        };
        // Fields serialize in declaration order and there are no maps: the bytes are
        // canonical. Serializing plain data into memory cannot fail.
        let bytes = serde_json::to_vec(&boot).unwrap_or_default();
        hex::encode(&Sha256::digest(bytes)[..8])
    }

    /// Hash of what a pool's warm VM shares with the MicroVM that claims it: the boot fields
    /// without the VM's identity (uid, name, namespace) and `userData`, which a claim hands
    /// the guest through its metadata channel instead.
    pub(crate) fn template_hash(&self) -> String {
        VmSpec {
            uid: VmUid::template(),
            namespace: String::new(),
            name: String::new(),
            user_data: None,
            ..self.clone()
        }
        .boot_hash()
    }

    /// The images the VM boots from, by kind.
    pub(crate) fn images(&self) -> Vec<(ImageKind, &str)> {
        [
            (ImageKind::Kernel, Some(&self.kernel)),
            (ImageKind::Initrd, self.initrd.as_ref()),
            (ImageKind::Rootfs, self.rootfs.as_ref()),
        ]
        .into_iter()
        .filter_map(|(kind, file)| Some((kind, file?.image()?)))
        .collect()
    }

    /// The grace period between a graceful stop and a kill.
    pub(crate) fn grace_period(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            u64::try_from(self.termination_grace_period_seconds).unwrap_or(0),
        )
    }
}

/// Whether the controller wants the VM's run going.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DesiredState {
    Running,
    Stopped,
    /// Saved to the node's disk with no VMM left; resumed by a later `Running`.
    Suspended,
}

/// Registry credentials for the pulls of one apply: the docker-config payloads
/// (`.dockerconfigjson` or `.dockercfg`) of the MicroVM's image pull secrets, in order. Held in
/// memory only: never serialized, never logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct PullSecrets(pub(crate) Vec<Vec<u8>>);

impl PullSecrets {
    pub fn new(docker_configs: Vec<Vec<u8>>) -> Self {
        PullSecrets(docker_configs)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for PullSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PullSecrets({} redacted)", self.0.len())
    }
}

/// `ApplyVM`: converge the VM onto `spec`, run number `run`, in the desired state. Idempotent
/// by (uid, spec hash, run); the agent keeps it as the VM's `spec.json` (without the pull
/// secrets).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRequest {
    #[serde(flatten)]
    pub(crate) spec: VmSpec,
    /// Hash of the spec fields that need a new boot to change; a different hash replaces the VM.
    pub(crate) spec_hash: String,
    /// The agent boots run N once; a run that ended stays ended until run N+1 is asked for.
    pub(crate) run: u32,
    #[serde(rename = "want_running", with = "desired_on_disk")]
    pub(crate) desired: DesiredState,
    /// For pulling the spec's images; not part of the spec (changing a Secret replaces no VM).
    #[serde(skip)]
    pub(crate) pull_secrets: PullSecrets,
    /// The VM pod the VMM runs in, on a cluster; `None` in `ignis dev` (and in records of
    /// agents before VM pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pod: Option<PodRef>,
    /// What the guest reads over its metadata channel; no part of any hash.
    #[serde(default)]
    pub(crate) metadata: GuestMetadata,
    /// The MicroVM the VM answers to when it is not `spec.uid` (a claimed warm VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) owner: Option<VmUid>,
}

/// What a guest reads over its metadata channel (docs/fast-start.md): who it is now. A claim
/// changes it with no boot, since a NoCloud drive cannot change after boot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestMetadata {
    pub hostname: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub user_data: Option<String>,
}

/// A VM pod as the controller saw it scheduled on the agent's node: the agent finds the pod's
/// sandbox (cgroups, network namespace, launcher container) from its uid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// The pod IP, once the kubelet has reported it.
    #[serde(default)]
    pub ip: Option<std::net::IpAddr>,
}

/// Written as a bool by agents before suspend existed, and still for Running and Stopped, so
/// an older agent reads a newer record; Suspended is the word `"suspended"`.
mod desired_on_disk {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::DesiredState;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OnDisk {
        Running(bool),
        Word(String),
    }

    pub(super) fn serialize<S: Serializer>(d: &DesiredState, s: S) -> Result<S::Ok, S::Error> {
        match d {
            DesiredState::Suspended => s.serialize_str("suspended"),
            d => s.serialize_bool(*d == DesiredState::Running),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DesiredState, D::Error> {
        Ok(match OnDisk::deserialize(d)? {
            OnDisk::Running(true) => DesiredState::Running,
            OnDisk::Running(false) => DesiredState::Stopped,
            OnDisk::Word(w) if w == "suspended" => DesiredState::Suspended,
            OnDisk::Word(w) => {
                return Err(serde::de::Error::custom(format!(
                    "unknown desired state {w:?}"
                )));
            }
        })
    }
}

/// Records written before the typed model said "not given" with an empty string or a 0.
pub(super) fn absent_if_empty<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde_json::Value;
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(None),
        Some(v) => T::deserialize(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
    }
}

/// As [`absent_if_empty`], and `auto` (the old spelling of "the agent chooses") is absent too.
pub(super) fn absent_if_auto<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned,
{
    use serde_json::Value;
    match Option::<Value>::deserialize(d)? {
        Some(Value::String(s)) if s == "auto" => Ok(None),
        other => absent_if_empty(other.unwrap_or(Value::Null)).map_err(serde::de::Error::custom),
    }
}

fn mode_or_nat<'de, D: Deserializer<'de>>(d: D) -> Result<InterfaceMode, D::Error> {
    absent_if_empty(d).map(Option::unwrap_or_default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "web".into(),
            termination_grace_period_seconds: 30,
            ..crate::testing::vm_spec("u")
        }
    }

    #[test]
    fn the_hash_ignores_the_grace_period() {
        let base = spec();
        let grace = VmSpec {
            termination_grace_period_seconds: 5,
            ..spec()
        };
        assert_eq!(base.boot_hash(), grace.boot_hash());
        assert_eq!(base.boot_hash().len(), 16);
        let cmdline = VmSpec {
            kernel_cmdline: "quiet".into(),
            ..spec()
        };
        assert_ne!(base.boot_hash(), cmdline.boot_hash());
    }

    #[test]
    fn a_spec_without_images_serializes_and_hashes_as_before_images() {
        // The layout (and so the hash) of every VM running before images existed: changing it
        // would make an upgraded controller replace them all.
        let json = serde_json::to_value(spec()).expect("json");
        let keys: Vec<&str> = json
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        let mut before = vec![
            "uid",
            "namespace",
            "name",
            "hypervisor",
            "accelerator",
            "vcpus",
            "memory_bytes",
            "kernel_path",
            "kernel_cmdline",
            "initrd_path",
            "rootfs_path",
            "rootfs_read_only",
            "interfaces",
            "user_data",
            "readiness_console_marker",
            "readiness_tcp_port",
            "termination_grace_period_seconds",
        ];
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        before.sort_unstable();
        assert_eq!(sorted, before);
        assert_eq!(spec().boot_hash(), "6846d3fb043a71af", "{json}");
    }

    #[test]
    fn image_references_round_trip_and_a_path_with_an_image_is_refused() {
        let with_images = VmSpec {
            kernel: GuestFile::Image("reg/k:1".into()),
            initrd: Some(GuestFile::Image("reg/i:1".into())),
            rootfs: Some(GuestFile::Image("reg/r@sha256:00".into())),
            ..spec()
        };
        let json = serde_json::to_value(&with_images).expect("json");
        assert_eq!(json["kernel_path"], "");
        assert_eq!(json["kernel_image"], "reg/k:1");
        assert_eq!(
            serde_json::from_value::<VmSpec>(json.clone()).expect("back"),
            with_images
        );
        assert_eq!(
            with_images.images(),
            vec![
                (ImageKind::Kernel, "reg/k:1"),
                (ImageKind::Initrd, "reg/i:1"),
                (ImageKind::Rootfs, "reg/r@sha256:00")
            ]
        );
        assert_ne!(with_images.boot_hash(), spec().boot_hash());
        let mut both = json;
        both["kernel_path"] = "/k".into();
        let error = serde_json::from_value::<VmSpec>(both).expect_err("both");
        assert!(error.to_string().contains("kernel has both"), "{error}");
    }

    #[test]
    fn requests_round_trip_and_records_of_the_untyped_agent_still_read() {
        let request = ApplyRequest {
            spec: VmSpec {
                hypervisor: Some(Hypervisor::CloudHypervisor),
                readiness_tcp_port: Some(80),
                interfaces: vec![Interface {
                    name: "eth0".into(),
                    mode: InterfaceMode::Bridge,
                    bridge: Some("br0".into()),
                    ..Default::default()
                }],
                ..spec()
            },
            spec_hash: "h".into(),
            run: 2,
            desired: DesiredState::Stopped,
            pull_secrets: PullSecrets::default(),
            pod: Some(PodRef {
                uid: "0b8f".into(),
                namespace: "default".into(),
                name: "vm-web".into(),
                ip: Some("10.244.1.7".parse().expect("ip")),
            }),
            metadata: GuestMetadata {
                hostname: "web".into(),
                labels: [("app".to_string(), "web".to_string())].into(),
                user_data: Some("#cloud-config\n".into()),
            },
            owner: Some(VmUid::new("claimant").expect("uid")),
        };
        let json = serde_json::to_string(&request).expect("json");
        assert_eq!(
            serde_json::from_str::<ApplyRequest>(&json).expect("back"),
            request
        );
        let old = r#"{"uid":"u","namespace":"default","name":"web","hypervisor":"auto",
            "accelerator":"","vcpus":1,"memory_bytes":268435456,"kernel_path":"/k",
            "kernel_cmdline":"","initrd_path":"","rootfs_path":"","rootfs_read_only":false,
            "interfaces":[{"name":"eth0","mode":"","bridge":"","address":"","mac":""}],
            "user_data":"","readiness_console_marker":"ignis: ready","readiness_tcp_port":0,
            "termination_grace_period_seconds":30,"spec_hash":"h","run":1,"want_running":true}"#;
        let read: ApplyRequest = serde_json::from_str(old).expect("old record");
        assert_eq!(read.pod, None, "records before VM pods have none");
        assert_eq!(read.spec.hypervisor, None);
        assert_eq!(read.spec.accelerator, None);
        assert_eq!(read.spec.initrd, None);
        assert_eq!(read.spec.kernel, GuestFile::Path("/k".into()));
        assert_eq!(read.spec.readiness_tcp_port, None);
        assert_eq!(
            read.spec.readiness_console_marker.as_deref(),
            Some("ignis: ready")
        );
        assert_eq!(read.spec.interfaces[0].mode, InterfaceMode::Nat);
        assert_eq!(read.spec.interfaces[0].bridge, None);
        assert_eq!(read.desired, DesiredState::Running);
    }
}
