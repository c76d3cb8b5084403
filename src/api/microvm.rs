//! `MicroVM` spec and status types (docs/design.md section 1).

// kube-derive takes repeated `printcolumn(type_ = ...)` entries, which clippy mistakes for
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A virtual machine that Ignis boots and supervises on one node.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ignis.dev",
    version = "v1alpha1",
    kind = "MicroVM",
    plural = "microvms",
    singular = "microvm",
    shortname = "mvm",
    category = "ignis",
    namespaced,
    status = "MicroVMStatus",
    derive = "PartialEq",
    doc = "A microVM workload: a guest kernel booted by a VMM on one node and supervised there.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "IP", type_ = "string", json_path = ".status.ipAddresses[0]"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.hypervisor == oldSelf.hypervisor").message("spec.hypervisor is immutable: delete and recreate the MicroVM to change it").field_path(".hypervisor"),
    validation = Rule::new("self.accelerator == oldSelf.accelerator").message("spec.accelerator is immutable: delete and recreate the MicroVM to change it").field_path(".accelerator"),
    validation = Rule::new("self.resources == oldSelf.resources").message("spec.resources is immutable while the MicroVM exists: delete and recreate it to resize").field_path(".resources"),
    validation = Rule::new("self.kernel == oldSelf.kernel").message("spec.kernel is immutable: delete and recreate the MicroVM to change it").field_path(".kernel"),
    validation = Rule::new("has(self.initrd) == has(oldSelf.initrd) && (!has(self.initrd) || self.initrd == oldSelf.initrd)").message("spec.initrd is immutable: delete and recreate the MicroVM to change it").field_path(".initrd"),
    validation = Rule::new("has(self.rootfs) == has(oldSelf.rootfs) && (!has(self.rootfs) || self.rootfs == oldSelf.rootfs)").message("spec.rootfs is immutable: delete and recreate the MicroVM to change it").field_path(".rootfs"),
    validation = Rule::new("has(self.network) == has(oldSelf.network) && (!has(self.network) || self.network == oldSelf.network)").message("spec.network is immutable: delete and recreate the MicroVM to change it").field_path(".network"),
    validation = Rule::new("has(self.userData) == has(oldSelf.userData) && (!has(self.userData) || self.userData == oldSelf.userData)").message("spec.userData is immutable: it is handed to the guest at boot").field_path(".userData"),
    validation = Rule::new("has(self.nodeSelector) == has(oldSelf.nodeSelector) && (!has(self.nodeSelector) || self.nodeSelector == oldSelf.nodeSelector)").message("spec.nodeSelector is immutable: a placed MicroVM never moves").field_path(".nodeSelector"),
    validation = Rule::new("has(self.pool) == has(oldSelf.pool) && (!has(self.pool) || self.pool == oldSelf.pool)").message("spec.pool is immutable: a MicroVM claims from its pool once, when it is made").field_path(".pool"),
)]
#[serde(rename_all = "camelCase")]
pub struct MicroVMSpec {
    /// What to do when the guest stops: `Always` restarts it, `RerunOnFailure` restarts it only
    /// after a failure, `Once` never restarts it, `Halted` keeps it stopped.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// `true` saves the running guest's memory and device state to its node's disk and ends
    /// its VMM (phase `Suspended`); `false` again restores it from there, its uptime, memory
    /// and open connections as they were. A VM asked to be suspended before it ever ran boots
    /// first. `runPolicy: Halted` wins: a halted VM is stopped, not suspended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// The VMM to boot the guest with; `auto` picks the best one available on the node.
    #[serde(default)]
    pub hypervisor: HypervisorChoice,
    /// Hardware acceleration: `kvm` refuses to run without working KVM, `tcg` always emulates,
    /// `auto` uses KVM when the node's probe says it works.
    #[serde(default)]
    pub accelerator: AcceleratorChoice,
    /// vCPUs and memory of the guest.
    pub resources: Resources,
    /// The guest kernel and its command line.
    pub kernel: KernelSource,
    /// An optional initial ramdisk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<ImageSource>,
    /// An optional root filesystem disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<RootfsSource>,
    /// Network interfaces of the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkSpec>,
    /// Data handed to the guest at boot: a cloud-init NoCloud drive (label `cidata`), and
    /// MMDS under Firecracker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Secrets in the MicroVM's namespace (`kubernetes.io/dockerconfigjson` or
    /// `kubernetes.io/dockercfg`) whose credentials pull its images. They are passed to the
    /// node for the pull only and never written to its disk.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// Labels a node must carry for the VM to be placed there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Node affinity, pod affinity and anti-affinity of the VM pod, as in a pod's spec. On a
    /// cluster kube-scheduler honours it; `ignis dev` (one node, Ignis's own placement)
    /// ignores it. A change applies to the next VM pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Tolerations of the VM pod, as in a pod's spec (cluster only; `ignis dev` ignores them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    /// The PriorityClass of the VM pod: its scheduling priority and who it may preempt
    /// (cluster only; `ignis dev` ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
    /// How Ignis decides the guest is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ReadinessProbe>,
    /// A `MicroVMPool` in this namespace to take a warm VM from, with no boot. The spec must
    /// match the pool's template apart from `userData`, `runPolicy`, `suspend` and the grace
    /// period; otherwise, or when the pool has no Ready VM, the MicroVM boots cold and says
    /// why (docs/fast-start.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pool: Option<String>,
    /// Seconds between a graceful stop request and a forced kill.
    #[serde(default = "default_grace_period")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: i64,
}

/// Default for `terminationGracePeriodSeconds`.
pub fn default_grace_period() -> i64 {
    30
}

/// What happens when the guest stops.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RunPolicy {
    /// Restart the guest whenever it stops.
    #[default]
    Always,
    /// Restart the guest only when it stopped with a failure.
    RerunOnFailure,
    /// Run the guest once; never restart it.
    Once,
    /// Keep the guest stopped (stops a running one).
    Halted,
}

/// The VMM a user asks for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HypervisorChoice {
    /// The best VMM available on the node.
    #[default]
    Auto,
    /// QEMU with the `microvm` machine type.
    Qemu,
    /// Firecracker.
    Firecracker,
    /// Cloud Hypervisor.
    CloudHypervisor,
}

impl HypervisorChoice {
    /// The VMM this choice pins; `None` for `auto`.
    pub fn pinned(self) -> Option<Hypervisor> {
        match self {
            HypervisorChoice::Auto => None,
            HypervisorChoice::Qemu => Some(Hypervisor::Qemu),
            HypervisorChoice::Firecracker => Some(Hypervisor::Firecracker),
            HypervisorChoice::CloudHypervisor => Some(Hypervisor::CloudHypervisor),
        }
    }
}

/// The accelerator a user asks for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AcceleratorChoice {
    /// KVM when it works on the node, TCG otherwise.
    #[default]
    Auto,
    /// KVM only: the VM is refused on nodes without working KVM.
    Kvm,
    /// Software emulation (QEMU only).
    Tcg,
}

impl AcceleratorChoice {
    /// The accelerator this choice pins; `None` for `auto`.
    pub fn pinned(self) -> Option<Accelerator> {
        match self {
            AcceleratorChoice::Auto => None,
            AcceleratorChoice::Kvm => Some(Accelerator::Kvm),
            AcceleratorChoice::Tcg => Some(Accelerator::Tcg),
        }
    }
}

/// The VMM a VM actually runs under, as reported in status.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Hypervisor {
    /// QEMU `-M microvm`.
    Qemu,
    /// Firecracker.
    Firecracker,
    /// Cloud Hypervisor.
    CloudHypervisor,
    /// No VMM at all: the control-plane benchmark's stand-in. Never a default.
    Simulated,
}

impl Hypervisor {
    /// The spelling used in manifests, status and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Hypervisor::Qemu => "qemu",
            Hypervisor::Firecracker => "firecracker",
            Hypervisor::CloudHypervisor => "cloud-hypervisor",
            Hypervisor::Simulated => "simulated",
        }
    }
}

impl std::fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The accelerator a VM actually runs under, as reported in status.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl Accelerator {
    /// The spelling used in status and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Guest resources.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// Number of virtual CPUs, 1 to 64.
    #[serde(default = "default_vcpus")]
    #[schemars(range(min = 1, max = 64))]
    pub vcpus: u32,
    /// Guest memory as a Kubernetes quantity (e.g. `256Mi`), at least 64Mi.
    #[x_kube(validation = Rule::new("isQuantity(self) && quantity(self).compareTo(quantity('64Mi')) >= 0").message("spec.resources.memory must be a quantity of at least 64Mi (for example 256Mi)"))]
    pub memory: String,
}

fn default_vcpus() -> u32 {
    1
}

/// Where a guest kernel comes from, and how it is started.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.path) != has(self.image)").message("spec.kernel: set exactly one of path or image"))]
pub struct KernelSource {
    /// Absolute path of the kernel image on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("spec.kernel.path must be an absolute path"))]
    // The node's agent opens host paths only beneath its admin's directories
    // (`--allowed-path-dir`); these refuse early, naming the field, what can never be there.
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("spec.kernel.path must not contain '..': name the file beneath a directory the node's admin allows"))]
    #[x_kube(validation = Rule::new("!self.matches('^/+(proc|sys|dev)(/|$)')").message("spec.kernel.path must not be under /proc, /sys or /dev: host paths are allowed only beneath the directories the node's admin lists"))]
    pub path: Option<String>,
    /// OCI reference of an image holding the kernel at `/boot/vmlinuz`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub cmdline: Option<String>,
}

/// A file the VM needs, from the node's filesystem or an OCI image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.path) != has(self.image)").message("spec.initrd: set exactly one of path or image"))]
pub struct ImageSource {
    /// Absolute path on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("spec.initrd.path must be an absolute path"))]
    // The node's agent opens host paths only beneath its admin's directories
    // (`--allowed-path-dir`); these refuse early, naming the field, what can never be there.
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("spec.initrd.path must not contain '..': name the file beneath a directory the node's admin allows"))]
    #[x_kube(validation = Rule::new("!self.matches('^/+(proc|sys|dev)(/|$)')").message("spec.initrd.path must not be under /proc, /sys or /dev: host paths are allowed only beneath the directories the node's admin lists"))]
    pub path: Option<String>,
    /// OCI reference of an image holding the file at `/boot/initrd.img`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The guest's root disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.path) != has(self.image)").message("spec.rootfs: set exactly one of path or image"))]
pub struct RootfsSource {
    /// Absolute path of a raw disk image on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("spec.rootfs.path must be an absolute path"))]
    // The node's agent opens host paths only beneath its admin's directories
    // (`--allowed-path-dir`); these refuse early, naming the field, what can never be there.
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.](/|$)')").message("spec.rootfs.path must not contain '..': name the file beneath a directory the node's admin allows"))]
    #[x_kube(validation = Rule::new("!self.matches('^/+(proc|sys|dev)(/|$)')").message("spec.rootfs.path must not be under /proc, /sys or /dev: host paths are allowed only beneath the directories the node's admin lists"))]
    pub path: Option<String>,
    /// OCI reference of an image holding a disk under `/disk/` (raw or qcow2), or a root
    /// filesystem, which becomes an ext4 disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Attach the disk read-only. From an image, the node's cached disk is then shared by
    /// every VM using it; otherwise each VM writes to its own copy-on-write disk.
    #[serde(default)]
    pub read_only: bool,
}

/// Which part of a guest an OCI image holds: it decides the file read from the image.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    /// `/boot/vmlinuz`.
    Kernel,
    /// `/boot/initrd.img`.
    Initrd,
    /// A disk under `/disk/`, or the image's filesystem as an ext4 disk.
    Rootfs,
}

impl ImageKind {
    pub const ALL: [ImageKind; 3] = [ImageKind::Kernel, ImageKind::Initrd, ImageKind::Rootfs];

    /// The spelling used in manifests, status, file names and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Kernel => "kernel",
            ImageKind::Initrd => "initrd",
            ImageKind::Rootfs => "rootfs",
        }
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ImageKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        ImageKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or(())
    }
}

/// An image a VM boots from, as resolved on its node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// Which part of the guest it holds.
    pub kind: ImageKind,
    /// The reference as the spec gives it.
    pub image: String,
    /// The manifest digest it resolved to (`sha256:...`); every run of the VM uses this one,
    /// whatever the tag points at later.
    pub digest: String,
}

/// Guest networking.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// The guest's interfaces, keyed by name.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[x_kube(validation = Rule::new("self.all(i, self.exists_one(j, j.name == i.name))").message("spec.network.interfaces: interface names must be unique"))]
    pub interfaces: Vec<NetworkInterface>,
}

/// One guest network interface.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.mode != 'bridge' || has(self.bridge)").message("spec.network.interfaces[].bridge is required when mode is bridge"),
    validation = Rule::new("self.mode == 'bridge' || !has(self.bridge)").message("spec.network.interfaces[].bridge is only allowed when mode is bridge"),
)]
pub struct NetworkInterface {
    /// Interface name inside the guest (e.g. `eth0`).
    #[schemars(length(min = 1, max = 15), regex(pattern = r"^[a-z][a-z0-9]*$"))]
    pub name: String,
    /// `nat` (node bridge + NAT), `bridge` (an existing bridge), `none`, or `pod` (the VM
    /// pod's network, on a cluster).
    #[serde(default)]
    pub mode: InterfaceMode,
    /// Name of an existing bridge on the node (mode `bridge` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Static address in CIDR form; by default one is allocated from the node's range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("spec.network.interfaces[].address must be an address in CIDR form, e.g. 10.88.0.10/24"))]
    pub address: Option<String>,
    /// MAC address; by default one is derived from the VM's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$"))]
    pub mac: Option<String>,
}

/// How an interface is connected.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceMode {
    /// A tap on the node's Ignis bridge with outbound NAT.
    #[default]
    Nat,
    /// A tap attached to a named existing bridge.
    Bridge,
    /// No connectivity (the device exists, nothing is behind it).
    None,
    /// The VM pod's network: the guest answers at the pod IP (on a cluster; the default there
    /// for a MicroVM without a `network` stanza).
    Pod,
}

impl InterfaceMode {
    /// The spelling used in manifests and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            InterfaceMode::Nat => "nat",
            InterfaceMode::Bridge => "bridge",
            InterfaceMode::None => "none",
            InterfaceMode::Pod => "pod",
        }
    }
}

impl std::fmt::Display for InterfaceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How readiness of the guest is decided.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.consoleMarker) != has(self.tcpPort)").message("spec.readiness: set exactly one of consoleMarker or tcpPort"))]
pub struct ReadinessProbe {
    /// Ready once this text appears on the serial console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub console_marker: Option<String>,
    /// Ready once this TCP port on the guest's first address accepts a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub tcp_port: Option<u16>,
}

/// Lifecycle phase, as shown by `kubectl get mvm`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    /// Accepted, not yet placed.
    #[default]
    Pending,
    /// Placed on a node, not yet booting.
    Scheduled,
    /// The VMM is booting the guest.
    Starting,
    /// The guest runs.
    Running,
    /// A stop is in progress.
    Stopping,
    /// The guest's memory is being saved to its node's disk.
    Suspending,
    /// Saved on its node's disk with no VMM running (`spec.suspend`).
    Suspended,
    /// Stopped on purpose (runPolicy Halted).
    Stopped,
    /// The guest exited successfully and will not be restarted.
    Succeeded,
    /// The guest failed and will not be restarted.
    Failed,
    /// The node's agent cannot be reached.
    Unknown,
}

impl Phase {
    /// The spelling used in status and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduled => "Scheduled",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Stopping => "Stopping",
            Phase::Suspending => "Suspending",
            Phase::Suspended => "Suspended",
            Phase::Stopped => "Stopped",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Unknown => "Unknown",
        }
    }

    /// Every phase, for metrics that report a gauge per phase.
    pub const ALL: [Phase; 11] = [
        Phase::Pending,
        Phase::Scheduled,
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Suspending,
        Phase::Suspended,
        Phase::Stopped,
        Phase::Succeeded,
        Phase::Failed,
        Phase::Unknown,
    ];
}

/// Observed state of a `MicroVM`, written only by the controller.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
// A missing status defaults to `observedGeneration: 0`, which the API server fills in on every
// read of an object the controller has not written yet: kstatus (Flux's `wait`, Helm's
// `--wait=watcher`) then sees generation 1 not yet observed and says InProgress, where an
// object with no status at all is Current before the controller has even seen it.
#[schemars(extend("default" = {"observedGeneration": 0}))]
pub struct MicroVMStatus {
    /// Lifecycle phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The node the VM is placed on; never changes once set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The VMM the VM runs under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<Hypervisor>,
    /// The accelerator the VM runs under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accelerator: Option<Accelerator>,
    /// Guest addresses, first interface first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    /// The images the VM boots from, each with the digest it resolved to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["kind"]))]
    pub images: Vec<ImageStatus>,
    /// When the current run of the guest started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// How many times the guest was restarted by its run policy.
    #[serde(default)]
    pub restart_count: i32,
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus-compatible conditions: Scheduled, Ready, Reconciling, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// What became of `spec.pool`: the warm VM taken, or why the MicroVM booted cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ClaimStatus>,
}

/// The outcome of a MicroVM's claim on its pool, written once.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimStatus {
    /// The pool named in `spec.pool`.
    pub pool: String,
    /// `Claimed`, or why the MicroVM booted cold: `PoolEmpty`, `PoolNotFound`,
    /// `TemplateMismatch`.
    pub outcome: ClaimOutcome,
    /// The warm VM taken: its MicroVM's name when it was warm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_name: Option<String>,
    /// The id the node's agent knows the VM by (the warm MicroVM's uid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_uid: Option<String>,
    /// The VM pod the VM runs in (cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The boot hash of the warm VM's spec, which the claiming spec stands for while it still
    /// matches the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_hash: Option<String>,
    /// The template hash both specs shared at the claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    /// From the MicroVM's creation to its claim being written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
}

/// How a claim ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ClaimOutcome {
    /// A warm VM was taken.
    #[default]
    Claimed,
    /// The pool had no Ready warm VM: booted cold.
    PoolEmpty,
    /// No such pool in the namespace: booted cold.
    PoolNotFound,
    /// The spec differs from the template in a field that needs a boot: booted cold.
    TemplateMismatch,
}

impl ClaimOutcome {
    /// The spelling in status, Events and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimOutcome::Claimed => "Claimed",
            ClaimOutcome::PoolEmpty => "PoolEmpty",
            ClaimOutcome::PoolNotFound => "PoolNotFound",
            ClaimOutcome::TemplateMismatch => "TemplateMismatch",
        }
    }
}
