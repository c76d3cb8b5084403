//! Cloud Hypervisor backend.
//!
//! Targets the Cloud Hypervisor REST API **v0.3.0** (OpenAPI 3.0.1,
//! `tests/fixtures/specs/cloud-hypervisor-api.yaml`, from cloud-hypervisor/cloud-hypervisor
//! `vmm/src/api/openapi/cloud-hypervisor.yaml` @ ae44c29), served under `/api/v1`.
//!
//! Pure planning (`VmConfig` → ordered [`ApiRequest`]s: `vmm.ping`, `vm.create`, then
//! `vm.boot`) and a thin I/O layer in [`super::http`]. The guest serial console is written by
//! Cloud Hypervisor itself to the console log (`serial: File`); the VMM's own output (its log
//! goes to stderr) goes to `<state_dir>/vmm.log`. Cloud Hypervisor has no metadata service, so
//! `user_data` is not passed on by this backend.
//!
//! Confined, Cloud Hypervisor runs jailed as Firecracker does (see
//! [`super::firecracker::jail`]): as the VM's uid and gid, chrooted into `<state_dir>/jail`
//! with only its kernel, initrd, disks, console file, API socket, `/dev/kvm` and
//! `/dev/net/tun`, in new mount and pid namespaces, `--seccomp true`; every path it is given
//! is the one inside the jail. Its taps are opened by name (in the VM's network namespace,
//! owned by its uid): `vm.create` takes tap descriptors only as `SCM_RIGHTS` on the API
//! socket, which the agent's HTTP client does not send.
//!
//! Suspend and resume (issue #20, `docs/fast-start.md`): `vm.pause`, then `vm.snapshot`
//! into a `file://` directory; resume is a fresh Cloud Hypervisor without `vm.create`,
//! `vm.restore` from that directory (the VM stays paused), and `start` sends `vm.resume`
//! because the VM reports `Paused`. Where the files are, in and out of the jail:
//! `vmm/http/snapshot.rs`.
//!
//! What v54 was seen doing (issue #13), and how the agent copes:
//! - after a vCPU error it logs `VCPU generated error` and exits with status 0, so its end is
//!   classified from its log too ([`super::exit::CLOUD_HYPERVISOR`]), not from the code alone;
//! - a guest reset reboots the guest in place: the process does not end, so no run ends;
//! - a disk without `image_type` gets a warning (the type is auto-detected, which is
//!   deprecated, and writes to sector 0 are disabled), so every disk names its type.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use super::http::{self, ApiRequest, HttpApi};
use super::jailer::{Jail, JailFile};
use super::{ExitQuirks, VmConfig, VmmError, VmmState};
use crate::api::Hypervisor;

/// The API version the requests are written against.
pub const SPEC_VERSION: &str = "0.3.0";

/// The spec's server base path.
pub(crate) const API_PREFIX: &str = "/api/v1";

/// The guest's serial console file, at the jail's root.
const CONSOLE_IN_JAIL: &str = "console.log";

/// How long a freshly spawned Cloud Hypervisor may take to open its API socket.
pub(crate) const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Cloud Hypervisor over its HTTP API on a unix socket.
pub type CloudHypervisorBackend = http::HttpBackend<CloudHypervisor>;

/// Cloud Hypervisor's wire: the plans below.
pub struct CloudHypervisor;

impl HttpApi for CloudHypervisor {
    const KIND: Hypervisor = Hypervisor::CloudHypervisor;
    const QUIRKS: &'static ExitQuirks = &super::exit::CLOUD_HYPERVISOR;
    const CONSOLE_ON_STDOUT: bool = false;
    const SOCKET_TIMEOUT: Duration = SOCKET_TIMEOUT;

    /// The command line: the API socket, and its seccomp filters on (`--seccomp true`, the
    /// default, said explicitly so no build or wrapper default turns them off); the VM is
    /// described through `vm.create`.
    fn spawn_args(config: &VmConfig) -> Vec<String> {
        vec![
            "--api-socket".to_owned(),
            format!("path={}", config.api_socket.display()),
            "--seccomp".to_owned(),
            "true".to_owned(),
        ]
    }

    /// `vmm.ping` then `vm.create`; only `vmm.ping` for a VMM that is to load a snapshot
    /// (`vm.restore` answers 404 once a VM is created: the snapshot's `config.json` brings the
    /// VM, whose disks, taps and serial file must be where they were when it was taken).
    fn plan_create(config: &VmConfig) -> Result<Vec<ApiRequest>, VmmError> {
        if config.restore.is_some() {
            return Ok(vec![ApiRequest::get(endpoint("vmm.ping"))]);
        }
        Ok(vec![
            ApiRequest::get(endpoint("vmm.ping")),
            ApiRequest::put(endpoint("vm.create"), Some(vm_config(config)?)),
        ])
    }

    /// Confined, Cloud Hypervisor is jailed, its serial console file bound in too.
    fn jail(config: &VmConfig) -> Result<Option<(Jail, VmConfig)>, VmmError> {
        if config.confinement.is_none() {
            return Ok(None);
        }
        let (mut jail, mut seen) =
            super::firecracker::jail_for(config, Hypervisor::CloudHypervisor)?;
        jail.files.push(JailFile {
            host: config.console_log.clone(),
            name: CONSOLE_IN_JAIL.to_owned(),
            writable: true,
        });
        seen.console_log = Path::new("/").join(CONSOLE_IN_JAIL);
        Ok(Some((jail, seen)))
    }

    /// Boot the created VM.
    fn plan_start() -> ApiRequest {
        ApiRequest::put(endpoint("vm.boot"), None)
    }

    fn plan_pause() -> ApiRequest {
        ApiRequest::put(endpoint("vm.pause"), None)
    }

    fn plan_resume() -> ApiRequest {
        ApiRequest::put(endpoint("vm.resume"), None)
    }

    /// Save the paused VM into a directory: Cloud Hypervisor writes its own files there
    /// (`config.json`, `state.json`, `memory-ranges`).
    fn plan_snapshot(dir: &Path) -> ApiRequest {
        ApiRequest::put(
            endpoint("vm.snapshot"),
            Some(json!({ "destination_url": file_url(dir) })),
        )
    }

    /// Restore the VM from that directory; it stays paused (`resume` left at its default,
    /// false) until `vm.resume`.
    fn plan_restore(dir: &Path) -> ApiRequest {
        ApiRequest::put(
            endpoint("vm.restore"),
            Some(json!({ "source_url": file_url(dir) })),
        )
    }

    /// Ask the guest to shut down through the ACPI power button.
    fn plan_stop() -> ApiRequest {
        ApiRequest::put(endpoint("vm.power-button"), None)
    }

    /// VM information, including its state.
    fn plan_state() -> ApiRequest {
        ApiRequest::get(endpoint("vm.info"))
    }

    /// The VM state in a `VmInfo` body. `Shutdown` means the guest is off: as far as the agent
    /// is concerned the VM has ended.
    fn parse_state(info: &Value) -> Result<VmmState, String> {
        match info.get("state").and_then(Value::as_str) {
            Some("Created") => Ok(VmmState::Created),
            Some("Running") => Ok(VmmState::Running),
            Some("Paused") | Some("BreakPoint") => Ok(VmmState::Paused),
            Some("Shutdown") => Ok(VmmState::Exited),
            Some(other) => Err(format!("unknown VM state {other:?}")),
            None => Err("VmInfo without a state".to_owned()),
        }
    }
}

fn endpoint(name: &str) -> String {
    format!("{API_PREFIX}/{name}")
}

/// A `file://` URL of an absolute path, as Cloud Hypervisor's snapshot calls take it.
fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

/// The `VmConfig` body of `vm.create`.
pub(crate) fn vm_config(config: &VmConfig) -> Result<Value, VmmError> {
    let invalid = |detail: String| VmmError::InvalidConfig {
        hypervisor: Hypervisor::CloudHypervisor,
        detail,
    };
    let memory_bytes = config
        .memory_mib
        .checked_mul(1024 * 1024)
        .filter(|b| i64::try_from(*b).is_ok())
        .ok_or_else(|| invalid(format!("memory of {} MiB is too large", config.memory_mib)))?;
    let roots = config.disks.iter().filter(|d| d.root).count();
    if roots > 1 {
        return Err(invalid("at most one root disk".to_owned()));
    }

    // The root disk goes first so it is /dev/vda, as under Firecracker, which also adds the
    // `root=` parameter itself; doing the same keeps one cmdline working on both.
    let mut disks: Vec<_> = config.disks.iter().collect();
    disks.sort_by_key(|d| !d.root);
    let mut cmdline = config.cmdline.clone();
    if let Some(root) = disks.first().filter(|d| d.root)
        && !cmdline.split_whitespace().any(|p| p.starts_with("root="))
    {
        let mode = if root.read_only { "ro" } else { "rw" };
        cmdline = format!("{cmdline} root=/dev/vda {mode}").trim().to_owned();
    }

    let mut payload = json!({
        "kernel": config.kernel.display().to_string(),
        "cmdline": cmdline,
    });
    if let Some(initrd) = &config.initrd {
        payload["initramfs"] = json!(initrd.display().to_string());
    }
    let mut body = json!({
        "cpus": { "boot_vcpus": config.vcpus, "max_vcpus": config.vcpus },
        "memory": { "size": memory_bytes },
        "payload": payload,
        "serial": { "mode": "File", "file": config.console_log.display().to_string() },
        "console": { "mode": "Off" },
    });
    if !disks.is_empty() {
        body["disks"] = disks
            .iter()
            .map(|d| {
                json!({
                    "id": d.id,
                    "path": d.path.display().to_string(),
                    "readonly": d.read_only,
                    "image_type": image_type(d),
                })
            })
            .collect();
    }
    if !config.nets.is_empty() {
        body["net"] = config
            .nets
            .iter()
            .map(|n| json!({ "id": n.id, "tap": n.tap, "mac": n.mac }))
            .collect();
    }
    Ok(body)
}

/// The disk's `ImageType` (the agent makes the per-VM disk raw for Cloud Hypervisor, but a
/// shared read-only image disk keeps its format).
fn image_type(disk: &crate::agent::vmm::DiskConfig) -> &'static str {
    match disk.format {
        crate::agent::image::DiskFormat::Raw => "Raw",
        crate::agent::image::DiskFormat::Qcow2 => "Qcow2",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::vmm::DiskConfig;
    use crate::api::Accelerator;
    use crate::error::ErrorReason;

    fn config() -> VmConfig {
        VmConfig {
            id: "uid-1".to_owned(),
            vcpus: 1,
            memory_mib: 256,
            kernel: "/k/vmlinux".into(),
            cmdline: "console=ttyS0".to_owned(),
            initrd: Some("/k/initrd".into()),
            disks: vec![],
            nets: vec![],
            user_data: None,
            accelerator: Accelerator::Kvm,
            state_dir: "/s".into(),
            console_log: "/s/console.log".into(),
            api_socket: "/s/api.sock".into(),
            binary: "cloud-hypervisor".into(),
            confinement: None,
            restore: None,
            opened: Default::default(),
        }
    }

    #[test]
    fn memory_is_in_bytes_and_serial_goes_to_the_console_log() {
        let body = vm_config(&config()).expect("body");
        assert_eq!(body["memory"]["size"], json!(256u64 * 1024 * 1024));
        assert_eq!(body["cpus"], json!({"boot_vcpus": 1, "max_vcpus": 1}));
        assert_eq!(
            body["serial"],
            json!({"mode": "File", "file": "/s/console.log"})
        );
        assert_eq!(body["payload"]["initramfs"], json!("/k/initrd"));
        assert!(body.get("disks").is_none() && body.get("net").is_none());
    }

    #[test]
    fn root_disk_is_first_and_named_on_the_cmdline() {
        let disk = |id: &str, root: bool| DiskConfig {
            id: id.to_owned(),
            path: format!("/d/{id}.img").into(),
            format: Default::default(),
            read_only: !root,
            root,
            backing: None,
        };
        let mut c = config();
        c.disks = vec![disk("data", false), disk("rootfs", true)];
        let body = vm_config(&c).expect("body");
        assert_eq!(body["disks"][0]["id"], json!("rootfs"));
        assert_eq!(body["disks"][1]["readonly"], json!(true));
        // Named, so Cloud Hypervisor neither guesses (deprecated) nor blocks sector 0.
        assert_eq!(body["disks"][0]["image_type"], json!("Raw"));
        assert_eq!(body["disks"][1]["image_type"], json!("Raw"));
        assert_eq!(
            body["payload"]["cmdline"],
            json!("console=ttyS0 root=/dev/vda rw")
        );

        c.cmdline = "root=/dev/vdb".to_owned();
        let body = vm_config(&c).expect("body");
        assert_eq!(body["payload"]["cmdline"], json!("root=/dev/vdb"));
    }

    #[test]
    fn absurd_memory_is_refused() {
        let mut c = config();
        c.memory_mib = u64::MAX / 1024;
        assert_eq!(
            vm_config(&c).expect_err("overflow").reason(),
            "InvalidVmConfig"
        );
    }

    #[test]
    fn vm_states_map_to_vmm_states() {
        for (state, expected) in [
            ("Created", VmmState::Created),
            ("Running", VmmState::Running),
            ("Paused", VmmState::Paused),
            ("BreakPoint", VmmState::Paused),
            ("Shutdown", VmmState::Exited),
        ] {
            assert_eq!(
                CloudHypervisor::parse_state(&json!({ "state": state })),
                Ok(expected)
            );
        }
        assert!(CloudHypervisor::parse_state(&json!({"state": "Melted"})).is_err());
    }

    #[test]
    fn confined_cloud_hypervisor_is_jailed_with_seccomp_and_sees_only_jail_paths() {
        let mut c = config();
        c.disks = vec![DiskConfig {
            id: "rootfs".to_owned(),
            path: "/s/rootfs.img".into(),
            format: Default::default(),
            read_only: false,
            root: true,
            backing: None,
        }];
        assert_eq!(CloudHypervisor::jail(&c).expect("unconfined"), None);
        c.confinement = Some(crate::agent::vmm::process::Confinement {
            uid: 100_002,
            gid: 100_002,
            netns: None,
            cgroups: Vec::new(),
        });
        let (jail, seen) = CloudHypervisor::jail(&c).expect("jail").expect("confined");
        assert_eq!(jail.root, std::path::Path::new("/s/jail"));
        let files: Vec<(&str, &str, bool)> = jail
            .files
            .iter()
            .map(|f| (f.host.to_str().expect("utf8"), f.name.as_str(), f.writable))
            .collect();
        assert_eq!(
            files,
            [
                ("/k/vmlinux", "kernel", false),
                ("/k/initrd", "initrd", false),
                ("/s/rootfs.img", "disk-rootfs", true),
                ("/s/vmm.log", "vmm.log", true),
                ("/s/console.log", "console.log", true),
            ]
        );
        assert_eq!(
            CloudHypervisor::spawn_args(&seen),
            ["--api-socket", "path=/api.sock", "--seccomp", "true"]
        );
        let body = vm_config(&seen).expect("body");
        assert_eq!(body["payload"]["kernel"], json!("/kernel"));
        assert_eq!(body["payload"]["initramfs"], json!("/initrd"));
        assert_eq!(body["disks"][0]["path"], json!("/disk-rootfs"));
        assert_eq!(
            body["serial"],
            json!({"mode": "File", "file": "/console.log"})
        );
        assert!(!body.to_string().contains("/s/") && !body.to_string().contains("/k/"));
        // A disk id that would leave the jail's root is refused, naming this VMM.
        c.disks[0].id = "../x".to_owned();
        let err = CloudHypervisor::jail(&c).expect_err("bad id");
        assert!(err.to_string().contains("disk id"), "{err}");
        assert!(matches!(
            err,
            VmmError::InvalidConfig {
                hypervisor: Hypervisor::CloudHypervisor,
                ..
            }
        ));
    }

    #[test]
    fn a_vmm_that_restores_creates_no_vm_and_urls_name_the_directory() {
        let mut c = config();
        c.restore = Some(crate::agent::vmm::SnapshotFiles {
            dir: "/snap".into(),
            owner: None,
        });
        let plan = CloudHypervisor::plan_create(&c).expect("plan");
        assert_eq!(plan, [ApiRequest::get("/api/v1/vmm.ping")]);
        assert_eq!(
            CloudHypervisor::plan_restore(Path::new("/snap")),
            ApiRequest::put(
                "/api/v1/vm.restore",
                Some(json!({"source_url": "file:///snap"}))
            )
        );
        assert_eq!(
            CloudHypervisor::plan_snapshot(Path::new("/snapshot")).body,
            Some(json!({"destination_url": "file:///snapshot"}))
        );
        assert_eq!(
            CloudHypervisor::plan_resume().operation(),
            "PUT /api/v1/vm.resume"
        );
    }

    #[test]
    fn endpoints_live_under_the_api_prefix() {
        assert_eq!(
            CloudHypervisor::plan_start().operation(),
            "PUT /api/v1/vm.boot"
        );
        assert_eq!(
            CloudHypervisor::plan_stop().operation(),
            "PUT /api/v1/vm.power-button"
        );
        assert_eq!(
            CloudHypervisor::plan_state().operation(),
            "GET /api/v1/vm.info"
        );
        assert_eq!(
            CloudHypervisor::spawn_args(&config()),
            ["--api-socket", "path=/s/api.sock", "--seccomp", "true"]
        );
    }
}
