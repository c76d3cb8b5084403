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
//!
//! Confined, Firecracker runs as its jailer would run it ([`jail`]): chrooted into
//! `<state_dir>/jail`, which holds only its binary, the guest's kernel, initrd and disks, its
//! log, its API socket and `/dev/kvm` and `/dev/net/tun`, in new mount and pid namespaces, as
//! the VM's uid and gid, with its own seccomp filters on. Every path it is given (command line
//! and API) is the one inside the jail.
//!
//! Suspend and resume (issue #20, `docs/fast-start.md`): `PATCH /vm Paused`, then a full
//! `PUT /snapshot/create` writing [`STATE_FILE`] and [`MEMORY_FILE`]; resume is a fresh
//! Firecracker configured with nothing, `PUT /snapshot/load` (`resume_vm: false`), and `start`
//! sends `PATCH /vm Resumed` because the microVM reports `Paused`. Where the files are, in and
//! out of the jail: `vmm/http/snapshot.rs`.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{self, ApiRequest, HttpApi};
use super::jailer::{Jail, JailFile};
use super::{ExitQuirks, VmConfig, VmmError, VmmState};
use crate::api::Hypervisor;

/// The API version the requests are written against.
pub const SPEC_VERSION: &str = "1.17.0-dev";

/// The jail's directory, under the VM's state directory.
pub const JAIL_DIR: &str = "jail";

/// The API socket, at the jail's root.
const SOCKET_IN_JAIL: &str = "api.sock";

/// The snapshot's microVM state file, in its directory.
pub const STATE_FILE: &str = "vmstate";
/// The snapshot's guest memory file, in its directory.
pub const MEMORY_FILE: &str = "memory";

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
    /// described through the API. Never `--no-seccomp`: Firecracker installs its own
    /// per-thread seccomp filters by default, and that default is what runs.
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
    /// A VMM that is to load a snapshot gets nothing: `/snapshot/load` is "only accepted on a
    /// fresh Firecracker process (before configuring any resource other than the Logger and
    /// Metrics)" (the spec); the snapshot brings the machine, boot source, drives and
    /// interfaces, which must exist at the same paths and tap names as when it was taken.
    fn plan_create(config: &VmConfig) -> Result<Vec<ApiRequest>, VmmError> {
        if config.restore.is_some() {
            return Ok(Vec::new());
        }
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

    /// Confined, Firecracker is always jailed.
    fn jail(config: &VmConfig) -> Result<Option<(Jail, VmConfig)>, VmmError> {
        match config.confinement {
            Some(_) => jail(config).map(Some),
            None => Ok(None),
        }
    }

    /// Boot the guest.
    fn plan_start() -> ApiRequest {
        action("InstanceStart")
    }

    fn plan_pause() -> ApiRequest {
        vm_state("Paused")
    }

    fn plan_resume() -> ApiRequest {
        vm_state("Resumed")
    }

    /// A full snapshot (`snapshot/create` wants the microVM `Paused`): the state and memory
    /// files, both created by Firecracker.
    fn plan_snapshot(dir: &Path) -> ApiRequest {
        ApiRequest::put(
            "/snapshot/create",
            Some(json!({
                "snapshot_type": "Full",
                "snapshot_path": dir.join(STATE_FILE).display().to_string(),
                "mem_file_path": dir.join(MEMORY_FILE).display().to_string(),
            })),
        )
    }

    /// Load the state and map the memory file (`mem_backend`: the spec deprecates
    /// `mem_file_path` here); the guest stays paused until `PATCH /vm Resumed`.
    fn plan_restore(dir: &Path) -> ApiRequest {
        ApiRequest::put(
            "/snapshot/load",
            Some(json!({
                "snapshot_path": dir.join(STATE_FILE).display().to_string(),
                "mem_backend": {
                    "backend_type": "File",
                    "backend_path": dir.join(MEMORY_FILE).display().to_string(),
                },
                "resume_vm": false,
            })),
        )
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

/// The jail of `config`'s Firecracker, and `config` as Firecracker sees it from inside: every
/// file at the jail's root under a fixed name (`kernel`, `initrd`, `disk-<id>`, `vmm.log`,
/// `api.sock`), the state directory the root. The host's API socket path becomes a link into
/// the jail, so the agent talks to it where it always does; the disks the guest may write,
/// and the log, are bound writable and handed to the VM's ids, the rest read-only.
pub fn jail(config: &VmConfig) -> Result<(Jail, VmConfig), VmmError> {
    jail_for(config, Hypervisor::Firecracker)
}

/// [`jail`], for any VMM that opens its own files (Cloud Hypervisor adds its console).
pub(crate) fn jail_for(
    config: &VmConfig,
    hypervisor: Hypervisor,
) -> Result<(Jail, VmConfig), VmmError> {
    let root = Path::new("/");
    let mut seen = config.clone();
    let mut files = vec![JailFile {
        host: config.kernel.clone(),
        name: "kernel".to_owned(),
        writable: false,
    }];
    seen.kernel = root.join("kernel");
    if let Some(initrd) = &config.initrd {
        files.push(JailFile {
            host: initrd.clone(),
            name: "initrd".to_owned(),
            writable: false,
        });
        seen.initrd = Some(root.join("initrd"));
    }
    for (disk, seen_disk) in config.disks.iter().zip(seen.disks.iter_mut()) {
        let id = path_segment(&disk.id, "disk id").map_err(|error| match error {
            VmmError::InvalidConfig { detail, .. } => {
                VmmError::InvalidConfig { hypervisor, detail }
            }
            other => other,
        })?;
        let name = format!("disk-{id}");
        files.push(JailFile {
            host: disk.path.clone(),
            name: name.clone(),
            writable: !disk.read_only,
        });
        seen_disk.path = root.join(name);
        // Firecracker's disks are raw: nothing under them to name.
        seen_disk.backing = None;
    }
    files.push(JailFile {
        host: super::process::log_path(&config.state_dir),
        name: super::process::VMM_LOG.to_owned(),
        writable: true,
    });
    if let Some(snapshot) = &config.restore {
        // The snapshot's files, read-only at the root, where `restore` tells the VMM to look
        // (`super::http::snapshot`); the root's own names, and the staging directory of a
        // later snapshot, are not theirs to take.
        let mut taken: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
        taken.extend([SOCKET_IN_JAIL, "console.log", "snapshot"].map(str::to_owned));
        files.extend(super::http::snapshot::jail_files(snapshot, &taken)?);
    }
    seen.state_dir = root.to_path_buf();
    seen.api_socket = root.join(SOCKET_IN_JAIL);
    let jail = Jail {
        root: config.state_dir.join(JAIL_DIR),
        files,
        links: vec![(config.api_socket.clone(), SOCKET_IN_JAIL.to_owned())],
    };
    Ok((jail, seen))
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

fn vm_state(state: &str) -> ApiRequest {
    ApiRequest::patch("/vm", json!({ "state": state }))
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
    use std::path::PathBuf;

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
            restore: None,
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
        assert!(
            !Firecracker::spawn_args(&config()).contains(&"--no-seccomp".to_owned()),
            "its own seccomp filters stay on"
        );
        assert_eq!(instance_id("0b7d7c2e-9f1a-4c1e"), "0b7d7c2e-9f1a-4c1e");
        assert_eq!(instance_id("a_b.c"), "a-b-c");
        assert_eq!(instance_id(&"x".repeat(80)).len(), 64);
        assert_eq!(instance_id(""), "ignis-vm");
    }

    #[test]
    fn confined_firecracker_is_jailed_and_sees_only_paths_inside_its_jail() {
        let mut c = config();
        c.initrd = Some("/img/initrd.img".into());
        c.disks = vec![
            DiskConfig {
                id: "rootfs".to_owned(),
                path: "/s/rootfs.img".into(),
                format: Default::default(),
                read_only: false,
                root: true,
                backing: Some(("/img/base.qcow2".into(), Default::default())),
            },
            DiskConfig {
                id: "data".to_owned(),
                path: "/img/data.img".into(),
                format: Default::default(),
                read_only: true,
                root: false,
                backing: None,
            },
        ];
        assert_eq!(Firecracker::jail(&c).expect("unconfined"), None);
        c.confinement = Some(crate::agent::vmm::process::Confinement {
            uid: 100_001,
            gid: 100_001,
            netns: None,
            cgroups: Vec::new(),
        });
        let (jail, seen) = Firecracker::jail(&c).expect("jail").expect("confined");
        assert_eq!(jail.root, Path::new("/s/jail"));
        let files: Vec<(&str, &str, bool)> = jail
            .files
            .iter()
            .map(|f| (f.host.to_str().expect("utf8"), f.name.as_str(), f.writable))
            .collect();
        assert_eq!(
            files,
            [
                ("/k/vmlinux", "kernel", false),
                ("/img/initrd.img", "initrd", false),
                ("/s/rootfs.img", "disk-rootfs", true),
                ("/img/data.img", "disk-data", false),
                ("/s/vmm.log", "vmm.log", true),
            ]
        );
        assert_eq!(
            jail.links,
            [(PathBuf::from("/s/api.sock"), "api.sock".to_owned())]
        );
        // The command line and every API body name paths inside the jail only.
        assert_eq!(
            Firecracker::spawn_args(&seen),
            [
                "--api-sock",
                "/api.sock",
                "--id",
                "uid-1",
                "--log-path",
                "/vmm.log"
            ]
        );
        let plan = Firecracker::plan_create(&seen).expect("plan");
        assert_eq!(
            plan[1].body,
            Some(json!({
                "kernel_image_path": "/kernel",
                "initrd_path": "/initrd",
                "boot_args": "console=ttyS0"
            }))
        );
        let drives: Vec<(&Value, &Value)> = plan[2..4]
            .iter()
            .map(|r| {
                let body = r.body.as_ref().expect("body");
                (&body["path_on_host"], &body["is_read_only"])
            })
            .collect();
        assert_eq!(
            drives,
            [
                (&json!("/disk-rootfs"), &json!(false)),
                (&json!("/disk-data"), &json!(true))
            ]
        );
        let host_paths = ["/k/", "/img/", "/s/"];
        for request in &plan {
            let body = request
                .body
                .as_ref()
                .map(Value::to_string)
                .unwrap_or_default();
            assert!(
                host_paths.iter().all(|p| !body.contains(p)),
                "{} names a host path: {body}",
                request.operation()
            );
        }
        // The jail's options reach `ignis jailer` on its command line, before the VMM.
        let line = crate::agent::vmm::jailer::wrapper_args(
            c.confinement.as_ref().expect("confinement"),
            &[],
            None,
            Some(&jail),
            Path::new("/usr/bin/firecracker"),
            Firecracker::spawn_args(&seen),
        );
        let line: Vec<&str> = line.iter().map(|a| a.to_str().expect("utf8")).collect();
        let vmm_at = line.iter().position(|a| *a == "--").expect("--");
        assert!(
            line[..vmm_at]
                .windows(2)
                .any(|w| w == ["--chroot", "/s/jail"])
        );
        assert!(
            line[..vmm_at]
                .windows(2)
                .any(|w| w == ["--bind-rw", "/s/rootfs.img=disk-rootfs"])
        );
        assert!(
            line[..vmm_at]
                .windows(2)
                .any(|w| w == ["--link", "/s/api.sock=api.sock"])
        );
        assert!(!line.contains(&"--no-seccomp"));
    }

    #[test]
    fn a_vmm_that_loads_a_snapshot_is_configured_with_nothing_and_resumed_not_started() {
        let mut c = config();
        c.restore = Some(crate::agent::vmm::SnapshotFiles {
            dir: "/snap".into(),
            owner: None,
        });
        assert_eq!(Firecracker::plan_create(&c).expect("plan"), []);
        let load = Firecracker::plan_restore(Path::new("/snap"));
        assert_eq!(load.operation(), "PUT /snapshot/load");
        let body = load.body.expect("body");
        assert_eq!(body["resume_vm"], json!(false), "paused until start");
        assert_eq!(body["mem_backend"]["backend_path"], json!("/snap/memory"));
        assert!(
            body.get("mem_file_path").is_none(),
            "deprecated by the spec"
        );
        assert_eq!(Firecracker::plan_resume().operation(), "PATCH /vm");
        assert_eq!(
            Firecracker::plan_snapshot(Path::new("/snapshot"))
                .body
                .expect("body")["snapshot_path"],
            json!("/snapshot/vmstate")
        );
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
