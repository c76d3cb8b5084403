//! Firecracker backend.
//!
//! Targets the Firecracker API **v1.17.0-dev** (Swagger 2.0,
//! `tests/fixtures/specs/firecracker-api.yaml`, from firecracker-microvm/firecracker
//! `src/firecracker/swagger/firecracker.yaml` @ 81b38b9).
//!
//! As in Firecracker's own code, the API is split in two: pure planning (`VmConfig` → ordered
//! [`ApiRequest`]s: the pre-boot configuration, then the `InstanceStart` action) and a thin I/O
//! layer in [`super::http`]. Firecracker writes the guest serial console to its stdout, so
//! stdout is the console log. Its own log would go to stdout too unless it is given
//! `--log-path` (seen with v1.17-dev: a VM whose guest printed nothing passed the console
//! marker "Running Firecracker" in 41 ms, issue #13), so it gets `--log-path
//! <state_dir>/vmm.log` — a file that must exist, and does: its stderr goes there too — and
//! `--id` with the VM's uid, which prefixes every line. The console log then holds guest
//! output only, which is what readiness markers and boot-timeout messages read. User data goes
//! to the guest through MMDS (v2, EC2 layout: `/latest/user-data`).

use std::time::Duration;

use serde_json::{Value, json};

use super::http::{self, ApiRequest, HttpApi};
use super::{ExitQuirks, VmConfig, VmmError, VmmState};
use crate::api::Hypervisor;

/// The API version the requests are written against.
pub const SPEC_VERSION: &str = "1.17.0-dev";

/// How long a freshly spawned Firecracker may take to open its API socket.
pub(crate) const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Firecracker over its HTTP API on a unix socket.
pub type FirecrackerBackend = http::HttpBackend<Firecracker>;

/// Firecracker's wire: the plans below.
pub struct Firecracker;

impl HttpApi for Firecracker {
    const KIND: Hypervisor = Hypervisor::Firecracker;
    const QUIRKS: &'static ExitQuirks = &super::exit::FIRECRACKER;
    const CONSOLE_ON_STDOUT: bool = true;
    const SOCKET_TIMEOUT: Duration = SOCKET_TIMEOUT;

    /// The command line: the API socket, the instance id and where to log; the VM itself is
    /// described through the API.
    fn spawn_args(config: &VmConfig) -> Vec<String> {
        vec![
            "--api-sock".to_owned(),
            config.api_socket.display().to_string(),
            "--id".to_owned(),
            instance_id(&config.id),
            "--log-path".to_owned(),
            super::process::log_path(&config.state_dir)
                .display()
                .to_string(),
        ]
    }

    /// The pre-boot configuration of `config`, in the order Firecracker needs it: network
    /// interfaces exist before MMDS names them.
    fn plan_create(config: &VmConfig) -> Result<Vec<ApiRequest>, VmmError> {
        let invalid = |detail: String| VmmError::InvalidConfig {
            hypervisor: Hypervisor::Firecracker,
            detail,
        };
        let mut requests = vec![ApiRequest::put(
            "/machine-config",
            Some(json!({
                "vcpu_count": config.vcpus,
                "mem_size_mib": config.memory_mib,
            })),
        )];

        let mut boot_source = json!({
            "kernel_image_path": config.kernel.display().to_string(),
            "boot_args": config.cmdline,
        });
        if let Some(initrd) = &config.initrd {
            boot_source["initrd_path"] = json!(initrd.display().to_string());
        }
        requests.push(ApiRequest::put("/boot-source", Some(boot_source)));

        if config.disks.iter().filter(|d| d.root).count() > 1 {
            return Err(invalid(
                "Firecracker boots from at most one root disk".to_owned(),
            ));
        }
        for disk in &config.disks {
            requests.push(ApiRequest::put(
                format!("/drives/{}", path_segment(&disk.id, "disk id")?),
                Some(json!({
                    "drive_id": disk.id,
                    "path_on_host": disk.path.display().to_string(),
                    "is_root_device": disk.root,
                    "is_read_only": disk.read_only,
                })),
            ));
        }

        for net in &config.nets {
            requests.push(ApiRequest::put(
                format!(
                    "/network-interfaces/{}",
                    path_segment(&net.id, "interface id")?
                ),
                Some(json!({
                    "iface_id": net.id,
                    "host_dev_name": net.tap,
                    "guest_mac": net.mac,
                })),
            ));
        }

        if let Some(user_data) = &config.user_data {
            // Firecracker refuses an MMDS bound to no interface (EmptyNetworkIfaceList), and the
            // guest could not reach it anyway.
            if config.nets.is_empty() {
                return Err(invalid(
                    "user data goes through MMDS, which needs a network interface".to_owned(),
                ));
            }
            let ids: Vec<&str> = config.nets.iter().map(|n| n.id.as_str()).collect();
            requests.push(ApiRequest::put(
                "/mmds/config",
                Some(json!({ "version": "V2", "network_interfaces": ids })),
            ));
            requests.push(ApiRequest::put(
                "/mmds",
                Some(json!({
                    "latest": {
                        "meta-data": { "instance-id": config.id },
                        "user-data": user_data,
                    }
                })),
            ));
        }
        Ok(requests)
    }

    /// Boot the guest.
    fn plan_start() -> ApiRequest {
        action("InstanceStart")
    }

    /// Ask the guest to shut down: Firecracker's only graceful stop is a Ctrl-Alt-Del.
    fn plan_stop() -> ApiRequest {
        action("SendCtrlAltDel")
    }

    /// Instance information (`describeInstance`).
    fn plan_state() -> ApiRequest {
        ApiRequest::get("/")
    }

    /// The VM state in an `InstanceInfo` body.
    fn parse_state(info: &Value) -> Result<VmmState, String> {
        match info.get("state").and_then(Value::as_str) {
            Some("Not started") => Ok(VmmState::Created),
            Some("Running") => Ok(VmmState::Running),
            Some("Paused") => Ok(VmmState::Paused),
            Some(other) => Err(format!("unknown instance state {other:?}")),
            None => Err("InstanceInfo without a state".to_owned()),
        }
    }
}

/// Ids become path segments; one that would change the path is refused rather than escaped.
fn path_segment<'a>(id: &'a str, what: &str) -> Result<&'a str, VmmError> {
    let ok = !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(id)
    } else {
        Err(VmmError::InvalidConfig {
            hypervisor: Hypervisor::Firecracker,
            detail: format!("{what} {id:?} must be non-empty ASCII letters, digits, '_', '-', '.'"),
        })
    }
}

/// Firecracker's instance id (`--id`): 1 to 64 ASCII letters, digits and `-`. A VM uid is at
/// most 64 of those plus `_` and `.`, which become `-`.
fn instance_id(uid: &str) -> String {
    let id: String = uid
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    if id.is_empty() {
        "ignis-vm".to_owned()
    } else {
        id
    }
}

fn action(action_type: &str) -> ApiRequest {
    ApiRequest::put("/actions", Some(json!({ "action_type": action_type })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::vmm::VmmBackend;
    use crate::agent::vmm::{DiskConfig, NetConfig};
    use crate::api::Accelerator;
    use crate::error::ErrorReason;

    fn config() -> VmConfig {
        VmConfig {
            id: "uid-1".to_owned(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/k/vmlinux".into(),
            cmdline: "console=ttyS0".to_owned(),
            initrd: None,
            disks: vec![],
            nets: vec![],
            user_data: None,
            accelerator: Accelerator::Kvm,
            state_dir: "/s".into(),
            console_log: "/s/console.log".into(),
            api_socket: "/s/api.sock".into(),
            binary: "firecracker".into(),
            confinement: None,
            opened: Default::default(),
        }
    }

    fn paths(requests: &[ApiRequest]) -> Vec<String> {
        requests.iter().map(ApiRequest::operation).collect()
    }

    #[test]
    fn minimal_plan_is_machine_then_boot_source() {
        let plan = Firecracker::plan_create(&config()).expect("plan");
        assert_eq!(paths(&plan), ["PUT /machine-config", "PUT /boot-source"]);
        assert_eq!(
            plan[0].body,
            Some(json!({"vcpu_count": 2, "mem_size_mib": 256}))
        );
        assert_eq!(
            plan[1].body,
            Some(json!({"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0"}))
        );
    }

    #[test]
    fn user_data_goes_to_mmds_after_the_interfaces() {
        let mut c = config();
        c.nets.push(NetConfig {
            id: "eth0".to_owned(),
            tap: "ig-tap0".to_owned(),
            mac: "06:00:00:00:00:01".to_owned(),
        });
        c.user_data = Some("#cloud-config\n".to_owned());
        let plan = Firecracker::plan_create(&c).expect("plan");
        assert_eq!(
            paths(&plan)[2..],
            [
                "PUT /network-interfaces/eth0",
                "PUT /mmds/config",
                "PUT /mmds"
            ]
        );
        assert_eq!(
            plan[3].body,
            Some(json!({"version": "V2", "network_interfaces": ["eth0"]}))
        );
        assert_eq!(
            plan[4].body.as_ref().map(|b| &b["latest"]["user-data"]),
            Some(&json!("#cloud-config\n"))
        );
    }

    #[test]
    fn user_data_without_a_network_is_refused() {
        let mut c = config();
        c.user_data = Some("x".to_owned());
        let err = Firecracker::plan_create(&c).expect_err("no interface for MMDS");
        assert_eq!(err.reason(), "InvalidVmConfig");
        assert!(err.to_string().contains("MMDS"), "{err}");
    }

    #[test]
    fn two_root_disks_and_path_changing_ids_are_refused() {
        let disk = |id: &str| DiskConfig {
            id: id.to_owned(),
            path: "/d.img".into(),
            format: Default::default(),
            read_only: false,
            root: true,
            backing: None,
        };
        let mut c = config();
        c.disks = vec![disk("a"), disk("b")];
        assert!(Firecracker::plan_create(&c).is_err());
        c.disks = vec![disk("../actions")];
        assert!(Firecracker::plan_create(&c).is_err());
    }

    #[test]
    fn instance_states_map_to_vmm_states() {
        assert_eq!(
            Firecracker::parse_state(&json!({"state": "Not started"})),
            Ok(VmmState::Created)
        );
        assert_eq!(
            Firecracker::parse_state(&json!({"state": "Running"})),
            Ok(VmmState::Running)
        );
        assert_eq!(
            Firecracker::parse_state(&json!({"state": "Paused"})),
            Ok(VmmState::Paused)
        );
        assert!(Firecracker::parse_state(&json!({"state": "Exploded"})).is_err());
        assert!(Firecracker::parse_state(&json!({})).is_err());
    }

    #[test]
    fn firecracker_logs_to_the_vmm_log_under_the_vm_uid_not_to_the_console() {
        assert_eq!(
            Firecracker::spawn_args(&config()),
            [
                "--api-sock",
                "/s/api.sock",
                "--id",
                "uid-1",
                "--log-path",
                "/s/vmm.log"
            ]
        );
        assert_eq!(instance_id("0b7d7c2e-9f1a-4c1e"), "0b7d7c2e-9f1a-4c1e");
        assert_eq!(instance_id("a_b.c"), "a-b-c");
        assert_eq!(instance_id(&"x".repeat(80)).len(), 64);
        assert_eq!(instance_id(""), "ignis-vm");
    }

    #[test]
    fn kvm_only() {
        // `sh` stands in for the binary: only its presence is checked.
        let backend = FirecrackerBackend::new("sh").expect("sh is on PATH");
        assert!(backend.supports(Accelerator::Kvm));
        assert!(!backend.supports(Accelerator::Tcg));
        assert_eq!(backend.kind(), Hypervisor::Firecracker);
    }
}
