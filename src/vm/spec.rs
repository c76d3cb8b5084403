//! What the controller asks an agent for: the backend-neutral description of a VM, and the
//! apply that carries it (which run, running or stopped).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use sha2::{Digest, Sha256};

use super::VmUid;
use crate::api::{Accelerator, Hypervisor, InterfaceMode};

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

/// The backend-neutral description of a VM, derived from a MicroVM by the controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub(crate) uid: VmUid,
    pub(crate) namespace: String,
    pub(crate) name: String,
    /// `None`: the best VMM the node offers.
    #[serde(default, deserialize_with = "absent_if_auto")]
    pub(crate) hypervisor: Option<Hypervisor>,
    /// `None`: KVM when the node's probe says it works, else TCG.
    #[serde(default, deserialize_with = "absent_if_auto")]
    pub(crate) accelerator: Option<Accelerator>,
    pub(crate) vcpus: u32,
    pub(crate) memory_bytes: u64,
    pub(crate) kernel_path: String,
    #[serde(default)]
    pub(crate) kernel_cmdline: String,
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub(crate) initrd_path: Option<String>,
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub(crate) rootfs_path: Option<String>,
    #[serde(default)]
    pub(crate) rootfs_read_only: bool,
    #[serde(default)]
    pub(crate) interfaces: Vec<Interface>,
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub(crate) user_data: Option<String>,
    /// Ready once this text appears on the serial console.
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub(crate) readiness_console_marker: Option<String>,
    /// Ready once this port on the guest's first address accepts a connection; wins over the
    /// marker when the guest has an address.
    #[serde(default, deserialize_with = "absent_if_empty")]
    pub(crate) readiness_tcp_port: Option<u16>,
    #[serde(default)]
    pub(crate) termination_grace_period_seconds: i64,
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
}

/// `ApplyVM`: converge the VM onto `spec`, run number `run`, in the desired state. Idempotent
/// by (uid, spec hash, run); the agent keeps it as the VM's `spec.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyRequest {
    #[serde(flatten)]
    pub(crate) spec: VmSpec,
    /// Hash of the spec fields that need a new boot to change; a different hash replaces the VM.
    pub(crate) spec_hash: String,
    /// The agent boots run N once; a run that ended stays ended until run N+1 is asked for.
    pub(crate) run: u32,
    #[serde(rename = "want_running", with = "desired_as_bool")]
    pub(crate) desired: DesiredState,
}

mod desired_as_bool {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::DesiredState;

    pub(super) fn serialize<S: Serializer>(d: &DesiredState, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(*d == DesiredState::Running)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DesiredState, D::Error> {
        Ok(if bool::deserialize(d)? {
            DesiredState::Running
        } else {
            DesiredState::Stopped
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
        assert_eq!(read.spec.hypervisor, None);
        assert_eq!(read.spec.accelerator, None);
        assert_eq!(read.spec.initrd_path, None);
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
