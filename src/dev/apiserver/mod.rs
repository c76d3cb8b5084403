//! The embedded Kubernetes-compatible API server of `ignis dev` (docs/design.md section 2, "dev").
//!
//! It serves the subset of the Kubernetes API that kubectl, Helm and the Ignis controller use —
//! discovery, OpenAPI, a few core kinds plus the custom resources its embedder registers,
//! list/watch with real resourceVersion semantics, paging, the status subresource, finalizers,
//! every patch type with server-side apply bookkeeping, and Table output — from SQLite, on a
//! loopback address, behind a bearer token that is kept with the data so kubeconfigs survive a
//! restart. It speaks HTTPS with a per-data-directory CA, because kubectl sends bearer tokens
//! only over TLS. It is a development aid, never a cluster, and it knows nothing of Ignis:
//! resources come in as [`CustomResource`]s with an [`Admission`] hook, and write counting as a
//! [`WriteObserver`].
//!
//! Layout, each module importing only those to its right: `http` (edge: auth, routing) →
//! `rest` (resource verbs) → `watch` → `server`/`write` (semantics) → `store` (SQLite) and
//! `hub` (fan-out); `options` (request options) and `respond` (responses) serve the first
//! three; `body`, `fields`, `managed`, `meta`, `patch`, `schema`, `selector`, `table` are pure
//! helpers.

mod body;
mod convert;
mod discovery;
mod errors;
mod fields;
mod http;
mod hub;
mod managed;
mod meta;
mod openapi;
mod options;
mod patch;
mod protobuf;
mod resources;
mod respond;
mod rest;
mod route;
mod schema;
mod seed;
mod selector;
mod server;
mod store;
mod table;
mod tls;
mod watch;
mod write;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use errors::{ApiError, Cause};
pub use hub::{WriteObserver, WriteRecord};
pub use resources::{Admission, CustomResource, RegistryError};
pub use store::StoreError;

use hub::Hub;
use resources::Registry;
use server::Server;
use store::Store;

/// Namespaces that always exist and cannot be deleted.
pub const PROTECTED_NAMESPACES: [&str; 4] =
    ["default", "kube-system", "kube-public", "kube-node-lease"];

/// How the server is started.
#[derive(Clone)]
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
    /// Custom resources served besides the built-in kinds, with their admission hooks.
    pub custom_resources: Vec<CustomResource>,
    /// Told about every accepted write request.
    pub observers: Vec<Arc<dyn WriteObserver>>,
}

impl ApiServerConfig {
    /// Defaults: `127.0.0.1:0`, the host name as node name, 10 000 events of history, the
    /// built-in kinds only.
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
            custom_resources: Vec::new(),
            observers: Vec::new(),
        }
    }
}

impl std::fmt::Debug for ApiServerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("node_name", &self.node_name)
            .field("custom_resources", &self.custom_resources)
            .field("observers", &self.observers.len())
            .finish_non_exhaustive()
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
    let registry = Registry::new(&config.custom_resources).map_err(ApiServerError::Registry)?;
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
    let server = Arc::new(Server {
        registry,
        store: Mutex::new(store),
        hub: Hub::new(4096, config.observers.clone()),
        token: token.clone(),
        shutdown: shutdown.clone(),
        bookmark_interval: config.bookmark_interval,
        protected_namespaces: PROTECTED_NAMESPACES.map(String::from).to_vec(),
    });
    seed::seed(&server, &config).map_err(ApiServerError::Seed)?;

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
        async move { http::handle(server, request).await }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        assert_eq!(
            mem_total_bytes("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16384 * 1024)
        );
        assert_eq!(mem_total_bytes("nothing"), None);
    }
}
