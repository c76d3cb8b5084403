//! Shared by the dev API server's integration tests: an in-process server with a write
//! observer, kubectl with a deadline, and MicroVM fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ignis::api::MicroVM;
use ignis::dev::apiserver::{self, ApiServerConfig, ApiServerHandle, WriteObserver, WriteRecord};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const VM_YAML: &str = "apiVersion: ignis.dev/v1alpha1
kind: MicroVM
metadata:
  name: NAME
  labels: {app: web, tier: front}
spec:
  resources: { vcpus: VCPUS, memory: 256Mi }
  kernel:
    path: /var/lib/ignis/guest/vmlinuz
    cmdline: \"console=ttyS0 panic=-1\"
";

pub fn vm_yaml(name: &str, vcpus: u32) -> String {
    VM_YAML
        .replace("NAME", name)
        .replace("VCPUS", &vcpus.to_string())
}

pub fn vm_object(name: &str) -> MicroVM {
    serde_json::from_value(json!({
        "apiVersion": "ignis.dev/v1alpha1", "kind": "MicroVM",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "api"}},
        "spec": {"resources": {"vcpus": 1, "memory": "128Mi"},
                 "kernel": {"path": "/boot/vmlinuz"}}
    }))
    .expect("valid MicroVM")
}

/// A Ready status as the controller writes it, with the generation it observed (the CRD's
/// default `observedGeneration: 0` would otherwise keep `kubectl wait` waiting).
pub fn ready_status(manager_phase: &str) -> Value {
    json!({
        "apiVersion": "ignis.dev/v1alpha1", "kind": "MicroVM",
        "status": {"phase": manager_phase, "nodeName": "dev-node", "ipAddresses": ["10.88.0.5"],
            "restartCount": 0, "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "GuestReady",
                "message": "booted", "lastTransitionTime": "2026-11-22T10:00:00Z"}]}
    })
}

pub async fn client(dev: &Dev) -> kube::Client {
    kube::Client::try_from(dev.handle.client_config()).expect("kube client")
}

/// Counts accepted writes per `namespace/name` and verb of MicroVMs, through the hub's
/// observer interface (what the boot benchmark does).
#[derive(Default)]
pub struct MicroVmWrites(pub std::sync::Mutex<std::collections::BTreeMap<String, Vec<String>>>);

impl WriteObserver for MicroVmWrites {
    fn observe(&self, w: &WriteRecord<'_>) {
        if w.resource == "ignis.dev/microvms" {
            self.0
                .lock()
                .expect("writes")
                .entry(format!("{}/{}", w.namespace, w.name))
                .or_default()
                .push(w.verb.to_string());
        }
    }
}

impl MicroVmWrites {
    pub fn of(&self, ns: &str, name: &str) -> Vec<String> {
        self.0
            .lock()
            .expect("writes")
            .get(&format!("{ns}/{name}"))
            .cloned()
            .unwrap_or_default()
    }
}

pub struct Dev {
    pub handle: ApiServerHandle,
    pub writes: std::sync::Arc<MicroVmWrites>,
    pub shutdown: CancellationToken,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
}

pub async fn start_in(dir: &Path, tweak: impl FnOnce(&mut ApiServerConfig)) -> Dev {
    let mut config = ignis::dev::api_server_config(dir.join("data")).expect("config");
    let writes = std::sync::Arc::new(MicroVmWrites::default());
    config.observers.push(writes.clone());
    config.node_name = "dev-node".into();
    config.bookmark_interval = Duration::from_millis(200);
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let handle = apiserver::start(config, shutdown.clone())
        .await
        .expect("start");
    let kubeconfig = dir.join("kubeconfig");
    handle.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    Dev {
        handle,
        writes,
        shutdown,
        kubeconfig,
        dir: dir.to_path_buf(),
    }
}

impl Dev {
    /// Run kubectl with a deadline; returns its output.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=20s")
            .args(args)
            .env("HOME", &self.dir)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kubectl {args:?} did not finish within 60s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("output")
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub async fn stop(self) -> PathBuf {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle.stopped())
            .await
            .expect("server stops within 10s");
        self.dir
    }
}
