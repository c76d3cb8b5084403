//! What the Firecracker and Cloud Hypervisor tests share: the VMMs' official API specs
//! (`tests/fixtures/specs/`) as a checker — every request must name a spec path and method and
//! carry a body that validates against the spec's schema (undeclared fields refused), in an
//! order the VMM accepts, and every answer of the test double must be one the spec documents —
//! the VmConfigs the backends plan, and the test double (`ignis::testing::vmm`) wired to that
//! checker.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::Method;
use ignis::agent::vmm::cloud_hypervisor as ch;
use ignis::agent::vmm::firecracker as fc;
use ignis::agent::vmm::http::{ApiRequest, HttpApi};
use ignis::agent::vmm::process::start_time as process_start_time;
use ignis::agent::vmm::{DiskConfig, NetConfig, VmConfig, VmmHandle};
use ignis::api::Accelerator;
use ignis::testing::vmm::{FakeVmm, Flavor};
use serde_json::{Value, json};

pub const TEST_DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The spec: paths, methods, body schemas.

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dialect {
    Swagger2,
    OpenApi3,
}

pub struct Spec {
    doc: Value,
    dialect: Dialect,
    /// The server base path requests carry before the spec's path (`/api/v1`).
    base: String,
}

/// YAML to JSON with every map key as a string (the specs key responses by integer codes).
fn yaml_to_json(value: serde_yaml::Value) -> Value {
    use serde_yaml::Value as Y;
    match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => serde_json::to_value(&n).expect("YAML number"),
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(items.into_iter().map(yaml_to_json).collect()),
        Y::Mapping(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Y::String(s) => s,
                        Y::Number(n) => n.to_string(),
                        Y::Bool(b) => b.to_string(),
                        other => panic!("unsupported YAML key {other:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Y::Tagged(tagged) => yaml_to_json(tagged.value),
    }
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/specs")
        .join(name)
}

impl Spec {
    fn load(name: &str) -> Spec {
        let text = std::fs::read_to_string(fixture(name)).expect("spec fixture");
        let doc = yaml_to_json(serde_yaml::from_str(&text).expect("spec YAML"));
        let (dialect, base) = if doc.get("swagger").is_some() {
            let base = doc["basePath"]
                .as_str()
                .unwrap_or("/")
                .trim_end_matches('/');
            (Dialect::Swagger2, base.to_owned())
        } else {
            let url = doc["servers"][0]["url"].as_str().expect("servers[0].url");
            let path = url
                .split("://")
                .nth(1)
                .and_then(|r| r.find('/').map(|i| &r[i..]));
            (Dialect::OpenApi3, path.unwrap_or("").to_owned())
        };
        Spec { doc, dialect, base }
    }

    pub fn firecracker() -> Spec {
        Spec::load("firecracker-api.yaml")
    }

    pub fn cloud_hypervisor() -> Spec {
        Spec::load("cloud-hypervisor-api.yaml")
    }

    /// The spec path template matching a request target, e.g. `/drives/{drive_id}`.
    fn template_for(&self, path: &str) -> Result<String, String> {
        let relative = path
            .strip_prefix(&self.base)
            .filter(|r| r.starts_with('/'))
            .ok_or_else(|| format!("{path} is not under the base path {:?}", self.base))?;
        let segments: Vec<&str> = relative.split('/').collect();
        let paths = self.doc["paths"].as_object().expect("paths");
        paths
            .keys()
            .find(|template| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == segments.len()
                    && parts.iter().zip(&segments).all(|(t, s)| {
                        (t.starts_with('{') && t.ends_with('}') && !s.is_empty()) || t == s
                    })
            })
            .cloned()
            .ok_or_else(|| format!("no spec path matches {relative}"))
    }

    /// The spec operation for a method and request target.
    pub fn operation(&self, method: &Method, path: &str) -> Result<(String, &Value), String> {
        let template = self.template_for(path)?;
        let key = method.as_str().to_ascii_lowercase();
        let op = &self.doc["paths"][&template][&key];
        if op.is_object() {
            Ok((template, op))
        } else {
            Err(format!("the spec has no {method} for {template}"))
        }
    }

    /// The body schema of an operation and whether the body is required.
    fn body_schema(&self, op: &Value) -> Option<(Value, bool)> {
        match self.dialect {
            Dialect::Swagger2 => op["parameters"]
                .as_array()?
                .iter()
                .find(|p| p["in"] == "body")
                .map(|p| (p["schema"].clone(), p["required"] == true)),
            Dialect::OpenApi3 => {
                let body = &op["requestBody"];
                let schema = &body["content"]["application/json"]["schema"];
                (!schema.is_null()).then(|| (schema.clone(), body["required"] == true))
            }
        }
    }

    /// A validator for `schema` (which may `$ref` the spec's definitions). Objects that list
    /// their properties refuse others, so a misspelt field fails instead of being ignored.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let mut root = match self.dialect {
            Dialect::Swagger2 => json!({ "definitions": self.doc["definitions"].clone() }),
            Dialect::OpenApi3 => {
                json!({ "components": { "schemas": self.doc["components"]["schemas"].clone() } })
            }
        };
        root["allOf"] = json!([schema]);
        strict(&mut root);
        jsonschema::draft4::new(&root).expect("spec schema compiles")
    }

    /// Check one request against the spec: path, method, body.
    pub fn check(&self, request: &ApiRequest) -> Result<(), String> {
        let operation = request.operation();
        let (_, op) = self
            .operation(&request.method, &request.path)
            .map_err(|e| format!("{operation}: {e}"))?;
        match (self.body_schema(op), &request.body) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(format!("{operation}: the spec defines no body")),
            (Some((_, true)), None) => Err(format!("{operation}: the spec requires a body")),
            (Some(_), None) => Ok(()),
            (Some((schema, _)), Some(body)) => {
                let validator = self.validator(&schema);
                let errors: Vec<String> = validator
                    .iter_errors(body)
                    .map(|e| format!("{} at {}", e, e.instance_path()))
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "{operation}: body {body} violates the spec: {errors:?}"
                    ))
                }
            }
        }
    }

    /// Check a response the fake server is about to send: documented status, and a body that
    /// fits the documented schema.
    pub fn check_response(
        &self,
        method: &Method,
        path: &str,
        status: u16,
        body: Option<&Value>,
    ) -> Result<(), String> {
        let (template, op) = self.operation(method, path)?;
        let responses = &op["responses"];
        let documented = &responses[status.to_string()];
        let documented = if documented.is_object() {
            documented
        } else if responses["default"].is_object() && status >= 400 {
            &responses["default"]
        } else {
            return Err(format!(
                "{method} {template}: status {status} is not documented"
            ));
        };
        let schema = match self.dialect {
            Dialect::Swagger2 => documented["schema"].clone(),
            Dialect::OpenApi3 => documented["content"]["application/json"]["schema"].clone(),
        };
        match (schema.is_null(), body) {
            (true, _) | (false, None) => Ok(()),
            (false, Some(body)) => {
                let validator = self.validator(&schema);
                match validator.validate(body) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!("{method} {template}: response {body}: {e}")),
                }
            }
        }
    }
}

/// Refuse undeclared properties in every object schema that declares its properties. Walks
/// schema positions only: a property may itself be named `properties`.
fn strict(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    if map.get("properties").is_some_and(Value::is_object)
        && !map.contains_key("additionalProperties")
    {
        map.insert("additionalProperties".to_owned(), Value::Bool(false));
    }
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            "properties" | "definitions" | "patternProperties" => {
                if let Value::Object(children) = value {
                    children.values_mut().for_each(strict);
                }
            }
            "components" => {
                if let Some(Value::Object(children)) = value.get_mut("schemas") {
                    children.values_mut().for_each(strict);
                }
            }
            "allOf" | "anyOf" | "oneOf" => {
                if let Value::Array(items) = value {
                    items.iter_mut().for_each(strict);
                }
            }
            "items" | "additionalProperties" | "not" => match value {
                Value::Array(items) => items.iter_mut().for_each(strict),
                other => strict(other),
            },
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Order rules, read from the specs where they say it ("Pre-boot only").

/// Firecracker: pre-boot operations before `InstanceStart`, exactly one start, runtime actions
/// after it, and MMDS bound only to interfaces created earlier. Around snapshots:
/// `snapshot/load` only on a fresh process ("before configuring any resource other than the
/// Logger and Metrics"), which then holds a paused microVM that `InstanceStart` cannot start;
/// `PATCH /vm` only once started or loaded; `snapshot/create` only while paused (its
/// description: "The microVM should be in the `Paused` state").
pub fn check_firecracker_order(spec: &Spec, requests: &[ApiRequest]) -> Result<(), String> {
    let (mut started, mut loaded, mut paused) = (false, false, false);
    let mut interfaces: Vec<String> = vec![];
    let mut seen: Vec<String> = vec![];
    for request in requests {
        let operation = request.operation();
        let (template, op) = spec.operation(&request.method, &request.path)?;
        let pre_boot = op["summary"]
            .as_str()
            .is_some_and(|s| s.contains("Pre-boot only"));
        if pre_boot && started {
            return Err(format!(
                "{operation} is pre-boot only but comes after InstanceStart"
            ));
        }
        if pre_boot && loaded {
            return Err(format!("{operation} after snapshot/load"));
        }
        let action = request
            .body
            .as_ref()
            .and_then(|b| b["action_type"].as_str())
            .filter(|_| template == "/actions");
        match action {
            Some("InstanceStart") if loaded => {
                return Err("InstanceStart after snapshot/load: resume it".to_owned());
            }
            Some("InstanceStart") if started => return Err("InstanceStart twice".to_owned()),
            Some("InstanceStart") => {
                for required in ["/machine-config", "/boot-source"] {
                    if !seen.iter().any(|s| s == required) {
                        return Err(format!("InstanceStart before PUT {required}"));
                    }
                }
                started = true;
            }
            Some("SendCtrlAltDel") if !started && !loaded => {
                return Err("SendCtrlAltDel before InstanceStart".to_owned());
            }
            _ => {}
        }
        match template.as_str() {
            "/snapshot/load" => {
                let configured = seen.iter().zip(requests).find(|(t, r)| {
                    r.method != Method::GET && !matches!(t.as_str(), "/logger" | "/metrics")
                });
                if let Some((t, _)) = configured {
                    return Err(format!(
                        "snapshot/load after {t}: only a fresh process loads"
                    ));
                }
                loaded = true;
                paused = request.body.as_ref().is_none_or(|b| b["resume_vm"] != true);
            }
            "/vm" if request.method == Method::PATCH => {
                if !started && !loaded {
                    return Err(format!("{operation} before InstanceStart or snapshot/load"));
                }
                match request.body.as_ref().and_then(|b| b["state"].as_str()) {
                    Some("Paused") => paused = true,
                    Some("Resumed") if !paused => return Err("Resumed while not paused".to_owned()),
                    Some("Resumed") => paused = false,
                    other => return Err(format!("{operation}: state {other:?}")),
                }
            }
            "/snapshot/create" if !paused => {
                return Err("snapshot/create while the microVM is not paused".to_owned());
            }
            _ => {}
        }
        if template == "/network-interfaces/{iface_id}" {
            interfaces.push(request.path.rsplit('/').next().unwrap_or("").to_owned());
        }
        if template == "/mmds/config" {
            let ids = request
                .body
                .as_ref()
                .map(|b| b["network_interfaces"].clone());
            for id in ids.as_ref().and_then(Value::as_array).into_iter().flatten() {
                if !interfaces.iter().any(|i| Some(i.as_str()) == id.as_str()) {
                    return Err(format!("MMDS names interface {id} before it is created"));
                }
            }
        }
        if template == "/mmds" && !seen.iter().any(|s| s == "/mmds/config") {
            return Err("MMDS data before /mmds/config".to_owned());
        }
        seen.push(template);
    }
    Ok(())
}

/// Cloud Hypervisor: `vm.create` once, before anything about the VM; `vm.boot` once, after it;
/// power-button/shutdown only after the boot. Around snapshots: `vm.restore` only while no VM
/// is created (it answers 404 otherwise) and never followed by `vm.boot` (the restored VM is
/// paused: `vm.resume`); `vm.pause` of a running VM, `vm.resume` of a paused one, `vm.snapshot`
/// of a paused one.
pub fn check_cloud_hypervisor_order(spec: &Spec, requests: &[ApiRequest]) -> Result<(), String> {
    let (mut created, mut booted, mut restored, mut paused) = (false, false, false, false);
    for request in requests {
        let (template, _) = spec.operation(&request.method, &request.path)?;
        match template.as_str() {
            "/vmm.ping" => {}
            "/vm.create" if created => return Err("vm.create twice".to_owned()),
            "/vm.create" => created = true,
            "/vm.restore" if created => {
                return Err("vm.restore once a VM is created".to_owned());
            }
            "/vm.restore" => {
                (created, booted, restored) = (true, true, true);
                paused = request.body.as_ref().is_none_or(|b| b["resume"] != true);
            }
            "/vm.boot" if restored => return Err("vm.boot of a restored VM: resume it".to_owned()),
            "/vm.boot" if !created => return Err("vm.boot before vm.create".to_owned()),
            "/vm.boot" if booted => return Err("vm.boot twice".to_owned()),
            "/vm.boot" => booted = true,
            "/vm.power-button" | "/vm.shutdown" if !booted => {
                return Err(format!("{template} before vm.boot"));
            }
            "/vm.pause" if !booted || paused => {
                return Err("vm.pause of a VM that is not running".to_owned());
            }
            "/vm.pause" => paused = true,
            "/vm.resume" if !paused => return Err("vm.resume of a VM not paused".to_owned()),
            "/vm.resume" => paused = false,
            "/vm.snapshot" if !paused => return Err("vm.snapshot of a VM not paused".to_owned()),
            _ if !created => return Err(format!("{template} before vm.create")),
            _ => {}
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// VmConfigs to plan.

pub fn base_config(dir: &Path) -> VmConfig {
    VmConfig {
        id: "0b7d7c2e-uid".to_owned(),
        vcpus: 2,
        memory_mib: 256,
        kernel: "/var/lib/ignis/guest/vmlinuz".into(),
        cmdline: "console=ttyS0 panic=-1".to_owned(),
        initrd: None,
        disks: vec![],
        nets: vec![],
        user_data: None,
        accelerator: Accelerator::Kvm,
        state_dir: dir.to_path_buf(),
        console_log: dir.join("console.log"),
        api_socket: dir.join("api.sock"),
        binary: "/nonexistent/vmm".into(),
        confinement: None,
        restore: None,
        opened: Default::default(),
    }
}

pub fn net(i: u8) -> NetConfig {
    NetConfig {
        id: format!("eth{i}"),
        tap: format!("ig-tap{i}"),
        mac: format!("06:00:ac:10:00:0{i}"),
    }
}

/// Minimal; with initrd; with disks; with nets; with user data (and a net for it).
pub fn configs(dir: &Path) -> Vec<(&'static str, VmConfig)> {
    let minimal = base_config(dir);
    let mut initrd = minimal.clone();
    initrd.initrd = Some("/var/lib/ignis/guest/initrd.cpio.gz".into());
    let mut disks = initrd.clone();
    disks.disks = vec![
        DiskConfig {
            id: "data".to_owned(),
            path: dir.join("data.img"),
            format: Default::default(),
            read_only: true,
            root: false,
            backing: None,
        },
        DiskConfig {
            id: "rootfs".to_owned(),
            path: dir.join("rootfs.ext4"),
            format: Default::default(),
            read_only: false,
            root: true,
            backing: None,
        },
    ];
    let mut nets = minimal.clone();
    nets.nets = vec![net(0), net(1)];
    let mut user_data = disks.clone();
    user_data.nets = vec![net(0)];
    user_data.user_data = Some("#cloud-config\nhostname: hello\n".to_owned());
    vec![
        ("minimal", minimal),
        ("initrd", initrd),
        ("disks", disks),
        ("nets", nets),
        ("user_data", user_data),
    ]
}

pub fn firecracker_sequence(config: &VmConfig) -> Vec<ApiRequest> {
    let mut all = fc::Firecracker::plan_create(config).expect("plan");
    all.extend([
        fc::Firecracker::plan_start(),
        fc::Firecracker::plan_state(),
        fc::Firecracker::plan_stop(),
    ]);
    all
}

/// Boot, then suspend into `dir` (as the VMM names it).
pub fn firecracker_suspend_sequence(config: &VmConfig, dir: &Path) -> Vec<ApiRequest> {
    let mut all = fc::Firecracker::plan_create(config).expect("plan");
    all.extend([
        fc::Firecracker::plan_start(),
        fc::Firecracker::plan_pause(),
        fc::Firecracker::plan_snapshot(dir),
    ]);
    all
}

/// A fresh VMM for `config` (its `restore` set): load from `dir`, resume, stop.
pub fn firecracker_resume_sequence(config: &VmConfig, dir: &Path) -> Vec<ApiRequest> {
    let mut all = fc::Firecracker::plan_create(config).expect("plan");
    all.extend([
        fc::Firecracker::plan_restore(dir),
        fc::Firecracker::plan_state(),
        fc::Firecracker::plan_resume(),
        fc::Firecracker::plan_stop(),
    ]);
    all
}

pub fn cloud_hypervisor_suspend_sequence(config: &VmConfig, dir: &Path) -> Vec<ApiRequest> {
    let mut all = ch::CloudHypervisor::plan_create(config).expect("plan");
    all.extend([
        ch::CloudHypervisor::plan_start(),
        ch::CloudHypervisor::plan_pause(),
        ch::CloudHypervisor::plan_snapshot(dir),
    ]);
    all
}

pub fn cloud_hypervisor_resume_sequence(config: &VmConfig, dir: &Path) -> Vec<ApiRequest> {
    let mut all = ch::CloudHypervisor::plan_create(config).expect("plan");
    all.extend([
        ch::CloudHypervisor::plan_restore(dir),
        ch::CloudHypervisor::plan_state(),
        ch::CloudHypervisor::plan_resume(),
        ch::CloudHypervisor::plan_stop(),
    ]);
    all
}

pub fn cloud_hypervisor_sequence(config: &VmConfig) -> Vec<ApiRequest> {
    let mut all = ch::CloudHypervisor::plan_create(config).expect("plan");
    all.extend([
        ch::CloudHypervisor::plan_start(),
        ch::CloudHypervisor::plan_state(),
        ch::CloudHypervisor::plan_stop(),
    ]);
    all
}

// ---------------------------------------------------------------------------------------------
// The test double, held to the spec.

/// The spec a flavor of the double is held to.
pub fn spec_of(flavor: Flavor) -> Spec {
    match flavor {
        Flavor::Firecracker => Spec::firecracker(),
        Flavor::CloudHypervisor => Spec::cloud_hypervisor(),
    }
}

/// A double of `flavor` under `dir` that checks every request and answer against the spec.
pub fn spec_checked(flavor: Flavor, dir: &Path) -> FakeVmm {
    let requests = std::sync::Arc::new(spec_of(flavor));
    let replies = requests.clone();
    FakeVmm::start(flavor, dir).checking(
        move |request| requests.check(request),
        move |method: &Method, path: &str, status, body: Option<&Value>| {
            replies.check_response(method, path, status, body)
        },
    )
}

/// Cloud Hypervisor's `vm.info` answer for a created VM, given once (then `None`).
pub fn once_created_vm_info(
    dir: &Path,
) -> impl Fn() -> Option<ignis::testing::vmm::Reply> + Send + Sync + use<> {
    let config = ch::CloudHypervisor::plan_create(&base_config(dir)).expect("plan")[1]
        .body
        .clone();
    let asked = std::sync::atomic::AtomicBool::new(false);
    move || {
        (!asked.swap(true, std::sync::atomic::Ordering::SeqCst)).then(|| {
            ignis::testing::vmm::Reply::Json(200, json!({ "config": config, "state": "Created" }))
        })
    }
}

/// A handle for API calls against a fake server: our own process stands in for the VMM.
pub fn own_handle(socket: &Path) -> VmmHandle {
    let pid = std::process::id();
    VmmHandle {
        pid,
        start_time_ticks: process_start_time(pid).expect("own start time"),
        api_socket: socket.to_path_buf(),
        console_log: socket.with_file_name("console.log"),
    }
}

pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, f)
        .await
        .expect("test exceeded its deadline")
}

pub async fn assert_gone(mut spawned: ignis::agent::vmm::Spawned) {
    let status = tokio::time::timeout(Duration::from_secs(5), spawned.child.wait())
        .await
        .expect("VMM reaped in time")
        .expect("wait");
    assert!(!status.success());
    assert!(process_start_time(spawned.handle.pid).is_none());
}
