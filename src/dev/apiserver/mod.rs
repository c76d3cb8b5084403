//! The embedded Kubernetes-compatible API server of `ignis dev` (DESIGN.md section 2, "dev").
//!
//! It serves the subset of the Kubernetes API that kubectl and the Ignis controller use —
//! discovery, OpenAPI, MicroVM plus a few core kinds, list/watch with real resourceVersion
//! semantics, the status subresource, finalizers, patches and Table output — from SQLite, on a
//! loopback address, behind a bearer token that is kept with the data so kubeconfigs survive a
//! restart. It speaks HTTPS with a per-data-directory CA, because kubectl sends bearer tokens
//! only over TLS. It is a development aid, never a cluster.

mod convert;
mod discovery;
mod errors;
mod handlers;
mod openapi;
mod patch;
mod protobuf;
mod resources;
mod route;
mod schema;
mod selector;
mod store;
mod table;
mod tls;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use errors::{ApiError, Cause};
pub use handlers::ObjectWrites;
pub use resources::{RegistryError, ResourceDef};
pub use store::StoreError;

use handlers::{Server, WriteOptions};
use resources::Registry;
use store::{EventType, Store};

/// Namespaces that always exist and cannot be deleted.
pub const PROTECTED_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// How the server is started.
#[derive(Clone, Debug)]
pub struct ApiServerConfig {
    /// Where `state.db` lives.
    pub data_dir: PathBuf,
    /// Must be a loopback address; port 0 picks a free one.
    pub listen: SocketAddr,
    /// The name of the one Node.
    pub node_name: String,
    /// Labels of the Node besides `kubernetes.io/{hostname,arch,os}`.
    pub node_labels: BTreeMap<String, String>,
    /// vCPUs of the Node.
    pub node_vcpus: u32,
    /// Memory of the Node, bytes.
    pub node_memory_bytes: u64,
    /// Watch history kept for resuming watches; older versions answer `410 Expired`.
    pub history_limit: u64,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
}

impl ApiServerConfig {
    /// Defaults: `127.0.0.1:0`, the host name as node name, 10 000 events of history.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let node_name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_ascii_lowercase())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ignis-dev".into());
        ApiServerConfig {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            node_name,
            node_labels: BTreeMap::new(),
            node_vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            node_memory_bytes: std::fs::read_to_string("/proc/meminfo")
                .ok()
                .and_then(|m| mem_total_bytes(&m))
                .unwrap_or(1 << 30),
            history_limit: 10_000,
            bookmark_interval: Duration::from_secs(30),
        }
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total_bytes(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Why the server did not start.
#[derive(Debug, Error)]
pub enum ApiServerError {
    #[error("refusing to listen on {0}: the dev API server only listens on loopback addresses")]
    NotLoopback(SocketAddr),
    #[error("cannot open the state database")]
    Store(#[source] StoreError),
    #[error("cannot build the resource registry")]
    Registry(#[source] RegistryError),
    #[error("cannot build the MicroVM validator")]
    Validator(#[source] crate::api::validation::SchemaError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the built-in objects")]
    Seed(#[source] ApiError),
    #[error("cannot set up TLS")]
    Tls(#[source] tls::TlsError),
}

impl ApiServerError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ApiServerError::NotLoopback(_) => "NotLoopback",
            ApiServerError::Store(_) => "Store",
            ApiServerError::Registry(_) => "Registry",
            ApiServerError::Validator(_) => "Validator",
            ApiServerError::Bind { .. } => "Bind",
            ApiServerError::Seed(_) => "Seed",
            ApiServerError::Tls(e) => e.reason(),
        }
    }
}

/// A running server.
pub struct ApiServerHandle {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The bearer token clients must send.
    pub token: String,
    /// The CA that signed the server certificate (DER).
    pub ca_der: Vec<u8>,
    server: Arc<Server>,
    join: JoinHandle<()>,
}

impl std::fmt::Debug for ApiServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl ApiServerHandle {
    /// The server URL.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A kubeconfig for kubectl (context `ignis-dev`, namespace `default`).
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: ignis-dev
  cluster:
    server: {url}
    certificate-authority-data: {ca}
contexts:
- name: ignis-dev
  context:
    cluster: ignis-dev
    user: ignis-dev
    namespace: default
current-context: ignis-dev
users:
- name: ignis-dev
  user:
    token: {token}
",
            url = self.url(),
            ca = tls::base64(tls::pem(&self.ca_der).as_bytes()),
            token = self.token
        )
    }

    /// Write the kubeconfig, readable by the owner only (it holds the token).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(self.kubeconfig_yaml().as_bytes())
    }

    /// A kube-rs client configuration for in-process clients (the controller).
    pub fn client_config(&self) -> kube::Config {
        let uri: axum::http::Uri = match self.url().parse() {
            Ok(uri) => uri,
            // The URL is built from a SocketAddr, which always parses.
            Err(_) => unreachable!("a socket address is a valid URI authority"),
        };
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        config.auth_info.token = Some(self.token.clone().into());
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config
    }

    /// Writes recorded per object, keyed by `group/plural/namespace/name`
    /// (e.g. `ignis.dev/microvms/default/demo`).
    pub fn writes(&self) -> BTreeMap<String, ObjectWrites> {
        self.server.writes_snapshot()
    }

    /// Writes to one MicroVM and its status so far.
    pub fn microvm_writes(&self, namespace: &str, name: &str) -> ObjectWrites {
        self.writes()
            .remove(&format!(
                "{}/microvms/{namespace}/{name}",
                crate::api::GROUP
            ))
            .unwrap_or_default()
    }

    /// Drop watch history so only the newest `keep` events remain.
    pub fn compact_history(&self, keep: u64) -> Result<(), StoreError> {
        self.server.lock().compact(keep)
    }

    /// The newest resourceVersion.
    pub fn current_resource_version(&self) -> Result<u64, StoreError> {
        self.server.lock().current_rv()
    }

    /// Wait until the server has stopped (after the shutdown token was cancelled).
    pub async fn stopped(self) {
        if let Err(error) = self.join.await {
            tracing::warn!(%error, "the dev API server task failed");
        }
    }
}

/// Open the store, seed the built-in objects and start serving.
pub async fn start(
    config: ApiServerConfig,
    shutdown: CancellationToken,
) -> Result<ApiServerHandle, ApiServerError> {
    if !config.listen.ip().is_loopback() {
        return Err(ApiServerError::NotLoopback(config.listen));
    }
    let registry = Registry::new().map_err(ApiServerError::Registry)?;
    let validator =
        crate::api::validation::MicroVmValidator::new().map_err(ApiServerError::Validator)?;
    let data_dir = config.data_dir.clone();
    let history = config.history_limit;
    let store = tokio::task::spawn_blocking(move || Store::open(&data_dir, history))
        .await
        .map_err(|e| ApiServerError::Store(StoreError::Io(std::io::Error::other(e))))?
        .map_err(ApiServerError::Store)?;
    let token = match store.meta_get("token").map_err(ApiServerError::Store)? {
        Some(token) => token,
        None => {
            let token = new_token();
            store
                .meta_set("token", &token)
                .map_err(ApiServerError::Store)?;
            token
        }
    };
    let material = tls::load_or_create(&store).map_err(ApiServerError::Tls)?;
    let acceptor = tls::acceptor(&material).map_err(ApiServerError::Tls)?;
    let (hub, _) = broadcast::channel(4096);
    let server = Arc::new(Server {
        registry,
        store: Mutex::new(store),
        hub,
        token: token.clone(),
        validator,
        writes: Mutex::new(BTreeMap::new()),
        shutdown: shutdown.clone(),
        bookmark_interval: config.bookmark_interval,
    });
    seed(&server, &config).map_err(ApiServerError::Seed)?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ApiServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ApiServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let listener =
        tls::TlsListener::new(listener, acceptor).map_err(|source| ApiServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let app_server = server.clone();
    let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
        let server = app_server.clone();
        async move { handlers::handle(server, request).await }
    });
    let join = tokio::spawn(async move {
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = result {
            tracing::error!(%error, "the dev API server stopped with an error");
        }
    });
    tracing::info!(%addr, "dev API server listening");
    Ok(ApiServerHandle {
        addr,
        token,
        ca_der: material.ca_der,
        server,
        join,
    })
}

fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The Node object for this machine.
fn node_object(config: &ApiServerConfig) -> Value {
    let mut labels: BTreeMap<String, String> = BTreeMap::from([
        ("kubernetes.io/hostname".into(), config.node_name.clone()),
        ("kubernetes.io/arch".into(), discovery::arch().into()),
        ("kubernetes.io/os".into(), std::env::consts::OS.into()),
    ]);
    labels.extend(config.node_labels.clone());
    let capacity = json!({
        "cpu": config.node_vcpus.to_string(),
        "memory": format!("{}Ki", config.node_memory_bytes / 1024),
        "pods": "0",
    });
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": config.node_name, "labels": labels},
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "IgnisDevReady",
                "message": "ignis dev runs this node",
                "lastHeartbeatTime": handlers::now(), "lastTransitionTime": handlers::now(),
            }],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": config.node_name},
            ],
            "nodeInfo": {
                "architecture": discovery::arch(),
                "operatingSystem": std::env::consts::OS,
                "kubeletVersion": format!("ignis-dev-{}", crate::VERSION),
                "kernelVersion": "", "osImage": "", "containerRuntimeVersion": "",
                "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": "",
            },
        },
    })
}

/// Create or refresh the objects the server itself owns: namespaces, the Node, the CRD.
fn seed(server: &Server, config: &ApiServerConfig) -> Result<(), ApiError> {
    let opts = WriteOptions::default();
    let find = |g: &str, p: &str| {
        server
            .registry
            .find(g, "v1", p)
            .cloned()
            .ok_or(ApiError::NoSuchPath)
    };
    let namespaces = find("", "namespaces")?;
    for ns in PROTECTED_NAMESPACES {
        if matches!(
            server.get(&namespaces, "", ns),
            Err(ApiError::NotFound { .. })
        ) {
            server.create(&namespaces, "", json!({"metadata": {"name": ns}}), &opts)?;
        }
    }
    let upsert = |def: &ResourceDef, desired: Value| -> Result<(), ApiError> {
        let name = desired["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        match server.get(def, "", &name) {
            Err(ApiError::NotFound { .. }) => {
                server.create(def, "", desired.clone(), &opts)?;
            }
            Err(other) => return Err(other),
            Ok(_) => {}
        }
        // Refresh everything but identity, directly in the store: these objects are ours.
        let mut live = server.get(def, "", &name)?;
        let mut changed = false;
        for part in ["spec", "status"] {
            if live.get(part) != desired.get(part) {
                live[part] = desired[part].clone();
                changed = true;
            }
        }
        if live["metadata"]["labels"] != desired["metadata"]["labels"] {
            live["metadata"]["labels"] = desired["metadata"]["labels"].clone();
            changed = true;
        }
        if changed {
            let mut store = server.lock();
            let event = store
                .write(&def.storage_key(), "", &name, EventType::Modified, live)
                .map_err(|e| ApiError::internal("refreshing a built-in object", e))?;
            let _ = server.hub.send(Arc::new(event));
        }
        Ok(())
    };
    let mut node = node_object(config);
    // The heartbeat times would make every start a change; keep the stored ones if present.
    if let Ok(live) = server.get(&find("", "nodes")?, "", &config.node_name)
        && live["status"]["conditions"][0]["status"] == "True"
    {
        node["status"]["conditions"] = live["status"]["conditions"].clone();
    }
    upsert(&find("", "nodes")?, node)?;
    let mut crd = server.registry.microvm_crd.clone();
    crd["status"] = json!({
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
        ],
        "acceptedNames": crd["spec"]["names"].clone(),
        "storedVersions": [crate::api::VERSION],
    });
    upsert(
        &find("apiextensions.k8s.io", "customresourcedefinitions")?,
        crd,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_reports_labels_and_capacity() {
        let mut config = ApiServerConfig::new("/nonexistent");
        config.node_name = "n1".into();
        config.node_vcpus = 4;
        config.node_memory_bytes = 8 << 30;
        config
            .node_labels
            .insert("ignis.dev/kvm".into(), "false".into());
        let node = node_object(&config);
        assert_eq!(node["metadata"]["labels"]["kubernetes.io/hostname"], "n1");
        assert_eq!(node["metadata"]["labels"]["ignis.dev/kvm"], "false");
        assert_eq!(node["status"]["capacity"]["cpu"], "4");
        assert_eq!(node["status"]["capacity"]["memory"], "8388608Ki");
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        assert_eq!(
            mem_total_bytes("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16384 * 1024)
        );
        assert_eq!(mem_total_bytes("nothing"), None);
    }
}
