//! Building `MicroVM` objects in code: the one builder the benchmarks, the tests and the e2e
//! crate share (through [`crate::testing`]), instead of hand-written JSON, YAML or struct
//! literals each.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Affinity, LocalObjectReference, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::{
    AcceleratorChoice, HypervisorChoice, ImageSource, InterfaceMode, KernelSource, MicroVM,
    MicroVMSpec, NetworkInterface, NetworkSpec, ReadinessProbe, Resources, RootfsSource, RunPolicy,
};

/// The minimal sample (`config/samples/microvm-minimal.yaml`): the demo guest `ignis dev`
/// and every agent prepare under `/var/lib/ignis/guest`.
const SAMPLE: &str = include_str!("../../config/samples/microvm-minimal.yaml");

/// A `MicroVM` under construction.
#[derive(Clone, Debug)]
pub struct MicroVmBuilder {
    vm: MicroVM,
}

impl MicroVmBuilder {
    /// A MicroVM `name` with 1 vCPU, 256Mi and the node's demo kernel, and nothing else: no
    /// namespace, no command line, no readiness, the default run policy and grace period.
    pub fn new(name: &str) -> Self {
        let spec = MicroVMSpec {
            run_policy: RunPolicy::default(),
            suspend: false,
            hypervisor: Default::default(),
            accelerator: Default::default(),
            resources: Resources {
                vcpus: 1,
                memory: "256Mi".to_string(),
            },
            kernel: KernelSource {
                path: Some("/var/lib/ignis/guest/vmlinuz".to_string()),
                image: None,
                cmdline: None,
            },
            initrd: None,
            rootfs: None,
            network: None,
            user_data: None,
            image_pull_secrets: Vec::new(),
            node_selector: None,
            affinity: None,
            tolerations: Vec::new(),
            priority_class_name: None,
            readiness: None,
            pool: None,
            termination_grace_period_seconds: super::default_grace_period(),
        };
        Self {
            vm: MicroVM::new(name, spec),
        }
    }

    /// The minimal sample manifest, named `name`: the demo guest, booted until it prints
    /// `ignis: ready`.
    pub fn sample(name: &str) -> Self {
        // The sample is checked by a test to parse; a broken one is a bug of this build.
        let mut vm: MicroVM = serde_yaml::from_str(SAMPLE)
            .unwrap_or_else(|e| panic!("config/samples/microvm-minimal.yaml: {e}"));
        vm.metadata.name = Some(name.to_string());
        Self { vm }
    }

    /// Boot the demo guest built at `kernel` and `initrd` (a [`DemoGuest`]'s files).
    ///
    /// [`DemoGuest`]: crate::agent::guest::DemoGuest
    pub fn guest(self, kernel: &Path, initrd: &Path) -> Self {
        self.kernel(kernel).initrd(initrd)
    }

    pub fn namespace(mut self, namespace: &str) -> Self {
        self.vm.metadata.namespace = Some(namespace.to_string());
        self
    }

    /// Metadata a stored object has: uid, generation, resourceVersion.
    pub fn stored(mut self, uid: &str, generation: i64, resource_version: &str) -> Self {
        self.vm.metadata.uid = Some(uid.to_string());
        self.vm.metadata.generation = Some(generation);
        self.vm.metadata.resource_version = Some(resource_version.to_string());
        self
    }

    /// Add a label to the object's metadata.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.vm
            .metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
        self
    }

    pub fn created_at(mut self, at: Time) -> Self {
        self.vm.metadata.creation_timestamp = Some(at);
        self
    }

    /// Ask for the VM suspended (`spec.suspend`).
    pub fn suspend(mut self, suspend: bool) -> Self {
        self.vm.spec.suspend = suspend;
        self
    }

    pub fn run_policy(mut self, policy: RunPolicy) -> Self {
        self.vm.spec.run_policy = policy;
        self
    }

    pub fn hypervisor(mut self, hypervisor: HypervisorChoice) -> Self {
        self.vm.spec.hypervisor = hypervisor;
        self
    }

    pub fn accelerator(mut self, accelerator: AcceleratorChoice) -> Self {
        self.vm.spec.accelerator = accelerator;
        self
    }

    pub fn vcpus(mut self, vcpus: u32) -> Self {
        self.vm.spec.resources.vcpus = vcpus;
        self
    }

    pub fn memory(mut self, memory: &str) -> Self {
        self.vm.spec.resources.memory = memory.to_string();
        self
    }

    pub fn kernel(mut self, path: &Path) -> Self {
        self.vm.spec.kernel.path = Some(path.display().to_string());
        self
    }

    /// Boot the kernel of the OCI image `reference` instead of a node path.
    pub fn kernel_image(mut self, reference: &str) -> Self {
        self.vm.spec.kernel.path = None;
        self.vm.spec.kernel.image = Some(reference.to_string());
        self
    }

    /// The initrd of the OCI image `reference`.
    pub fn initrd_image(mut self, reference: &str) -> Self {
        self.vm.spec.initrd = Some(ImageSource {
            path: None,
            image: Some(reference.to_string()),
        });
        self
    }

    /// The root disk of the OCI image `reference`.
    pub fn rootfs_image(mut self, reference: &str, read_only: bool) -> Self {
        self.vm.spec.rootfs = Some(RootfsSource {
            path: None,
            image: Some(reference.to_string()),
            read_only,
        });
        self
    }

    /// Pull the images with the credentials of Secret `name` too.
    pub fn image_pull_secret(mut self, name: &str) -> Self {
        self.vm.spec.image_pull_secrets.push(LocalObjectReference {
            name: name.to_string(),
        });
        self
    }

    pub fn user_data(mut self, user_data: &str) -> Self {
        self.vm.spec.user_data = Some(user_data.to_string());
        self
    }

    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.vm.spec.kernel.cmdline = Some(cmdline.to_string());
        self
    }

    pub fn initrd(mut self, path: &Path) -> Self {
        self.vm.spec.initrd = Some(ImageSource {
            path: Some(path.display().to_string()),
            image: None,
        });
        self
    }

    /// Ready once `marker` appears on the console.
    pub fn console_marker(mut self, marker: &str) -> Self {
        self.vm.spec.readiness = Some(ReadinessProbe {
            console_marker: Some(marker.to_string()),
            tcp_port: None,
        });
        self
    }

    /// Ready once `port` on the guest's first address accepts a connection.
    pub fn tcp_port(mut self, port: u16) -> Self {
        self.vm.spec.readiness = Some(ReadinessProbe {
            console_marker: None,
            tcp_port: Some(port),
        });
        self
    }

    /// Add an interface `name` in `mode`.
    pub fn interface(mut self, name: &str, mode: InterfaceMode) -> Self {
        self.vm
            .spec
            .network
            .get_or_insert_with(|| NetworkSpec {
                interfaces: Vec::new(),
            })
            .interfaces
            .push(NetworkInterface {
                name: name.to_string(),
                mode,
                bridge: None,
                address: None,
                mac: None,
            });
        self
    }

    pub fn node_selector(mut self, key: &str, value: &str) -> Self {
        self.vm
            .spec
            .node_selector
            .get_or_insert_with(BTreeMap::new)
            .insert(key.to_string(), value.to_string());
        self
    }

    /// The VM pod's affinity (cluster only).
    pub fn affinity(mut self, affinity: Affinity) -> Self {
        self.vm.spec.affinity = Some(affinity);
        self
    }

    /// Add a toleration to the VM pod (cluster only).
    pub fn toleration(mut self, toleration: Toleration) -> Self {
        self.vm.spec.tolerations.push(toleration);
        self
    }

    /// The VM pod's PriorityClass (cluster only).
    pub fn priority_class_name(mut self, name: &str) -> Self {
        self.vm.spec.priority_class_name = Some(name.to_string());
        self
    }

    pub fn grace_period_seconds(mut self, seconds: i64) -> Self {
        self.vm.spec.termination_grace_period_seconds = seconds;
        self
    }

    /// Take a warm VM from the pool `name` (`spec.pool`).
    pub fn pool(mut self, name: &str) -> Self {
        self.vm.spec.pool = Some(name.to_string());
        self
    }

    /// A pool `name` keeping `replicas` warm VMs of this MicroVM's spec and labels.
    pub fn pool_of(self, name: &str, replicas: u32) -> super::MicroVMPool {
        let mut pool = super::MicroVMPool::new(
            name,
            super::MicroVMPoolSpec {
                replicas,
                template: super::MicroVMTemplate {
                    metadata: super::TemplateMetadata {
                        labels: self.vm.metadata.labels.clone().unwrap_or_default(),
                    },
                    spec: super::MicroVMSpec {
                        pool: None,
                        ..self.vm.spec
                    },
                },
            },
        );
        pool.metadata.namespace = self.vm.metadata.namespace;
        pool
    }

    pub fn build(self) -> MicroVM {
        self.vm
    }

    /// The object as JSON, as an API server stores it.
    pub fn json(self) -> serde_json::Value {
        // A MicroVM is plain data: serializing it cannot fail.
        serde_json::to_value(self.vm).unwrap_or_default()
    }

    /// The object as a YAML manifest, for `kubectl apply -f -`.
    pub fn yaml(self) -> String {
        serde_yaml::to_string(&self.vm).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_parses_and_points_at_the_demo_guest() {
        let vm = MicroVmBuilder::sample("hello").build();
        assert_eq!(vm.metadata.name.as_deref(), Some("hello"));
        assert_eq!(
            vm.spec.readiness.and_then(|r| r.console_marker).as_deref(),
            Some("ignis: ready")
        );
        let vm = MicroVmBuilder::sample("x")
            .guest(Path::new("/g/vmlinuz"), Path::new("/g/initrd.cpio"))
            .build();
        assert_eq!(vm.spec.kernel.path.as_deref(), Some("/g/vmlinuz"));
        assert_eq!(
            vm.spec.initrd.and_then(|i| i.path).as_deref(),
            Some("/g/initrd.cpio")
        );
    }

    #[test]
    fn manifests_carry_the_api_version_and_no_status() {
        let json = MicroVmBuilder::new("web")
            .namespace("default")
            .interface("eth0", InterfaceMode::None)
            .json();
        assert_eq!(json["apiVersion"], super::super::API_VERSION);
        assert_eq!(json["kind"], super::super::KIND);
        assert_eq!(json["spec"]["network"]["interfaces"][0]["mode"], "none");
        assert!(json.get("status").is_none_or(serde_json::Value::is_null));
        let yaml = MicroVmBuilder::new("web").yaml();
        assert!(
            yaml.contains(&format!("apiVersion: {}", super::super::API_VERSION)),
            "{yaml}"
        );
    }
}
