//! `ignis agent`: the node's VM supervisor (docs/design.md section 2). It boots VMs through a
//! [`vmm::VmmBackend`], keeps their state under a state directory so VMMs outlive an agent
//! restart, and serves the gRPC API of `proto/agent.proto` — over mutual TLS on TCP (cluster
//! mode), or on a unix socket (`ignis dev`, tests).

pub(crate) mod atomic_file;
pub(crate) mod cgroup;
pub mod cloud_init;
pub mod confine;
pub(crate) mod console;
pub mod csr;
pub mod guest;
pub(crate) mod host;
pub mod image;
pub mod kvm;
pub(crate) mod metadata;
pub mod net;
mod offers;
pub(crate) mod open_fds;
pub(crate) mod pod;
pub(crate) mod server;
pub(crate) mod simulated;
pub(crate) mod state;
pub(crate) mod supervisor;
pub(crate) mod tls;
pub mod vmm;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::telemetry::{self, MetricsRegistry, Readiness};
use supervisor::{AgentMetrics, Supervisor, SupervisorConfig};

/// vCPUs offered per host CPU by default (KubeVirt's default CPU allocation ratio).
pub(crate) const DEFAULT_VCPU_OVERCOMMIT: u32 = 10;

/// Which accelerator the agent offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AcceleratorFlag {
    /// Probe KVM (bounded) and fall back to TCG.
    #[default]
    Auto,
    /// Trust KVM without probing.
    Kvm,
    /// Never use KVM (skips the probe).
    Tcg,
}

/// Flags of `ignis agent`.
#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// The node this agent runs on (default: the host name).
    #[arg(long, env = "IGNIS_NODE_NAME")]
    pub(crate) node_name: Option<String>,
    /// Where VM state lives (one directory per VM).
    #[arg(long, env = "IGNIS_STATE_DIR", default_value = "/var/lib/ignis")]
    pub(crate) state_dir: PathBuf,
    /// `unix:///path/agent.sock`, or `HOST:PORT` (needs --tls-cert, --tls-key, --client-ca).
    #[arg(
        long,
        env = "IGNIS_AGENT_LISTEN",
        default_value = "unix:///var/lib/ignis/agent.sock"
    )]
    pub(crate) listen: String,
    /// The agent's TLS certificate (PEM), for TCP.
    #[arg(long, env = "IGNIS_TLS_CERT")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The agent's TLS private key (PEM), for TCP.
    #[arg(long, env = "IGNIS_TLS_KEY")]
    pub(crate) tls_key: Option<PathBuf>,
    /// The CA that signs client certificates (PEM); clients without one are refused.
    #[arg(long, env = "IGNIS_CLIENT_CA")]
    pub(crate) client_ca: Option<PathBuf>,
    /// Where the serving certificate comes from: `files` (--tls-cert and --tls-key) or `csr`
    /// (a key generated here at every start and a certificate for `ignis-agent.<node>`
    /// through a CertificateSigningRequest the controller signs; needs the pod's
    /// ServiceAccount token and --client-ca).
    #[arg(long, env = "IGNIS_SERVING_CERT", value_enum, default_value_t = crate::controller::tls::ServingCert::Files)]
    pub(crate) serving_cert: crate::controller::tls::ServingCert,
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, env = "IGNIS_HEALTH_ADDR", default_value = "0.0.0.0:9441")]
    pub(crate) health_addr: SocketAddr,
    /// Which accelerator to offer.
    #[arg(long, env = "IGNIS_ACCELERATOR", value_enum, default_value_t = AcceleratorFlag::Auto)]
    pub(crate) accelerator: AcceleratorFlag,
    #[arg(long, env = "IGNIS_QEMU_BINARY", default_value = "qemu-system-x86_64")]
    pub(crate) qemu_binary: PathBuf,
    #[arg(long, env = "IGNIS_FIRECRACKER_BINARY", default_value = "firecracker")]
    pub(crate) firecracker_binary: PathBuf,
    #[arg(
        long,
        env = "IGNIS_CLOUD_HYPERVISOR_BINARY",
        default_value = "cloud-hypervisor"
    )]
    pub(crate) cloud_hypervisor_binary: PathBuf,
    /// How long a guest gets to become ready (`60s`, `1500ms`, `2m`).
    #[arg(long, env = "IGNIS_BOOT_TIMEOUT", default_value = "60s", value_parser = crate::time::parse_duration)]
    pub(crate) boot_timeout: Duration,
    /// Size cap of each VM's console log before it is rotated.
    #[arg(long, env = "IGNIS_CONSOLE_MAX_BYTES", default_value_t = 1 << 20)]
    pub(crate) console_max_bytes: u64,
    /// How many suspended VMs this node keeps snapshots of (each weighs about 0.4 MB per MiB
    /// of guest memory); a suspend beyond it is refused and the VM runs on.
    #[arg(long, env = "IGNIS_MAX_SNAPSHOTS", default_value_t = DEFAULT_MAX_SNAPSHOTS)]
    pub(crate) max_snapshots: usize,
    /// Benchmarks only: run VMs on the simulated VMM (no guest; reported as `simulated`).
    #[arg(long, env = "IGNIS_SIMULATED")]
    pub(crate) simulated: bool,
    /// Stop every VM when the agent exits (`ignis dev`); by default VMs outlive the agent.
    #[arg(long, env = "IGNIS_STOP_VMS_ON_EXIT")]
    pub(crate) stop_vms_on_exit: bool,
    /// vCPUs offered for placement per host CPU. Guests idle most of the time, so vCPUs are
    /// overcommitted like KubeVirt's default CPU allocation ratio; memory never is.
    #[arg(long, env = "IGNIS_VCPU_OVERCOMMIT", default_value_t = DEFAULT_VCPU_OVERCOMMIT, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub(crate) vcpu_overcommit: u32,
    /// Benchmarks only, with `--simulated`: multiply the advertised vCPUs and memory.
    #[arg(
        long,
        env = "IGNIS_CAPACITY_MULTIPLIER",
        hide = true,
        default_value_t = 1
    )]
    pub(crate) capacity_multiplier: u32,
    /// The host's cgroup filesystem as mounted in the agent's pod (e.g. /host/sys/fs/cgroup):
    /// VMMs are moved into a node-level cgroup there, so they outlive the agent's container.
    #[arg(long, env = "IGNIS_VMM_CGROUP_ROOT")]
    pub(crate) vmm_cgroup_root: Option<PathBuf>,
    /// Name (or path) of that cgroup in each hierarchy.
    #[arg(long, env = "IGNIS_VMM_CGROUP", default_value = "ignis-vms")]
    pub(crate) vmm_cgroup: String,
    #[command(flatten)]
    pub(crate) network: net::NetworkArgs,
    #[command(flatten)]
    pub(crate) images: image::ImageArgs,
    /// Turn guest networking off: VMs asking for `nat`/`bridge` interfaces fail.
    #[arg(long, env = "IGNIS_NO_NETWORK")]
    pub(crate) no_network: bool,
    /// The first of the unprivileged uids (and gids) VMMs run as, one per VM (never 0).
    #[arg(long, env = "IGNIS_VMM_FIRST_ID", default_value_t = confine::DEFAULT_FIRST_ID, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) vmm_first_id: u32,
    /// How many such ids (so how many VMs may exist on the node at once).
    #[arg(long, env = "IGNIS_VMM_ID_COUNT", default_value_t = confine::DEFAULT_ID_COUNT, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) vmm_id_count: u32,
    /// A directory whose files a MicroVM may name as `kernel.path`, `initrd.path` or
    /// `rootfs.path` (repeatable). Paths are resolved beneath it, no symlink escaping; any
    /// other path fails the VM with `PathNotAllowed`. Default: `<state dir>/guest`, the demo
    /// guest.
    #[arg(
        long = "allowed-path-dir",
        env = "IGNIS_ALLOWED_PATH_DIRS",
        value_delimiter = ','
    )]
    pub(crate) allowed_path_dirs: Vec<PathBuf>,
    /// Let guests run under TCG (emulation). QEMU's security policy: "TCG is not a security
    /// boundary"; only KVM guests are. Off by default: a VM that would need TCG fails with
    /// `TcgNotAllowed`.
    #[arg(long, env = "IGNIS_ALLOW_TCG")]
    pub(crate) allow_tcg: bool,
}

/// Errors of `ignis agent`.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum AgentError {
    #[error("invalid --listen {value:?}: use unix:///path/agent.sock or HOST:PORT")]
    InvalidListen { value: String },
    #[error("listening on TCP {addr} needs mutual TLS: give --tls-cert, --tls-key and --client-ca")]
    TlsRequired { addr: SocketAddr },
    #[error("--serving-cert=csr needs --client-ca (the CA of the controller's certificate)")]
    CsrNeedsClientCa,
    #[error("cannot obtain the agent's serving certificate")]
    #[strum(serialize = "ServingCert")]
    Csr(#[source] csr::CsrError),
    #[error("cannot read TLS file {path}")]
    #[strum(serialize = "TlsInvalid")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid TLS configuration")]
    #[strum(serialize = "TlsInvalid")]
    Tls(#[source] tonic::transport::Error),
    #[error("cannot listen on {what}")]
    #[strum(serialize = "BindFailed")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the host's capacity")]
    #[strum(serialize = "HostReadFailed")]
    Host(#[source] host::HostError),
    #[error("cannot open the state directory")]
    #[strum(serialize = "StateIoError")]
    State(#[source] state::StateError),
    #[error("cannot re-adopt VMs")]
    #[strum(serialize = "AdoptFailed")]
    Adopt(#[source] supervisor::SupervisorError),
    #[error("gRPC server failed")]
    #[strum(serialize = "ServeFailed")]
    Serve(#[source] tonic::transport::Error),
    #[error("health server")]
    #[strum(serialize = "TelemetryFailed")]
    Telemetry(#[source] telemetry::TelemetryError),
    #[error("KVM")]
    #[strum(transparent)]
    Kvm(#[source] kvm::KvmError),
    #[error("the agent task ended abnormally")]
    #[strum(serialize = "AgentPanicked")]
    Join(#[source] tokio::task::JoinError),
}

/// Where the gRPC server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix://{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// Parse `--listen`.
pub(crate) fn parse_listen(value: &str) -> Result<ListenAddr, AgentError> {
    let invalid = || AgentError::InvalidListen {
        value: value.to_owned(),
    };
    if let Some(path) = value.strip_prefix("unix://") {
        if path.is_empty() || !path.starts_with('/') {
            return Err(invalid());
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    value.parse().map(ListenAddr::Tcp).map_err(|_| invalid())
}

/// The agent's TLS files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// The agent's serving TLS: its identity and the CA of the clients it accepts.
#[derive(Clone, Debug)]
pub enum ServerTls {
    /// Certificate, key and client CA from files (the shared certificate, `ignis dev`, your own
    /// PKI).
    Files(TlsFiles),
    /// A certificate issued through a CSR for a key made here (`--serving-cert=csr`), and the
    /// client CA from a file.
    Issued {
        issued: csr::Issued,
        client_ca: PathBuf,
    },
}

/// When the node's guest networking (bridge, NAT, forwarding) is set up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NetworkSetup {
    /// At agent start (`ignis agent`): a node that cannot do it says so in the log at once.
    #[default]
    AtStart,
    /// When the first VM asks for a `nat`/`bridge` interface (`ignis dev`, tests), so a
    /// machine that never runs a networked guest is never reconfigured. Either way the setup
    /// runs at start when the state directory holds attachments to re-adopt or clean up.
    OnFirstUse,
}

/// The default of `--max-snapshots`.
pub(crate) const DEFAULT_MAX_SNAPSHOTS: usize = 64;

/// Everything [`serve`] needs; built from [`AgentArgs`] or by `ignis dev` and tests.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub(crate) state_dir: PathBuf,
    pub listen: ListenAddr,
    pub tls: Option<ServerTls>,
    pub accelerator: AcceleratorFlag,
    pub(crate) qemu_binary: PathBuf,
    pub(crate) firecracker_binary: PathBuf,
    pub(crate) cloud_hypervisor_binary: PathBuf,
    pub boot_timeout: Duration,
    pub(crate) console_max_bytes: u64,
    /// How many suspended VMs this node keeps snapshots of.
    pub max_snapshots: usize,
    /// The host's cgroup filesystem, where VM pods' cgroups are found (`--vmm-cgroup-root`);
    /// `None`: VMs with a pod fail (`ignis dev` has no pods).
    pub pod_cgroup_root: Option<PathBuf>,
    pub simulated: bool,
    pub stop_vms_on_exit: bool,
    /// vCPUs offered per host CPU.
    pub vcpu_overcommit: u32,
    /// With `simulated` only: advertise this many times the host's capacity.
    pub(crate) capacity_multiplier: u32,
    /// Guest networking; `None` turns it off (VMs asking for `nat`/`bridge` fail).
    pub network: Option<net::NetworkConfig>,
    pub network_setup: NetworkSetup,
    /// The node's image cache (`<state dir>/images`).
    pub images: image::ImageStoreConfig,
    /// How VMMs are confined, which host paths specs may name, whether TCG may run.
    pub vmm_policy: confine::VmmPolicy,
}

impl AgentConfig {
    /// A unix-socket agent on `state_dir` with default settings (for `ignis dev` and tests).
    /// Networking is on with the default bridge and range, set up on first use; set
    /// `network` to `None` to turn it off.
    pub fn local(state_dir: &Path) -> Self {
        Self {
            node_name: host::hostname(),
            state_dir: state_dir.to_path_buf(),
            listen: ListenAddr::Unix(state_dir.join("agent.sock")),
            tls: None,
            accelerator: AcceleratorFlag::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            firecracker_binary: PathBuf::from("firecracker"),
            cloud_hypervisor_binary: PathBuf::from("cloud-hypervisor"),
            boot_timeout: Duration::from_secs(60),
            console_max_bytes: 1 << 20,
            max_snapshots: DEFAULT_MAX_SNAPSHOTS,
            pod_cgroup_root: None,
            simulated: false,
            stop_vms_on_exit: false,
            vcpu_overcommit: DEFAULT_VCPU_OVERCOMMIT,
            capacity_multiplier: 1,
            network: Some(net::NetworkConfig::new(state_dir.join("net"))),
            network_setup: NetworkSetup::OnFirstUse,
            images: image::ImageStoreConfig::new(state_dir.join("images")),
            // Confined as on a cluster; TCG allowed, because `ignis dev` and the tests run
            // where KVM may be missing (a choice made here, visibly, not by default).
            vmm_policy: confine::VmmPolicy {
                ids: Some(confine::IdRange::default()),
                allowed_path_dirs: vec![state_dir.join("guest")],
                allow_tcg: true,
            },
        }
    }

    /// From the command line.
    pub(crate) fn from_args(args: &AgentArgs) -> Result<Self, AgentError> {
        let tls = match (&args.tls_cert, &args.tls_key, &args.client_ca) {
            (Some(cert), Some(key), Some(client_ca))
                if args.serving_cert == crate::controller::tls::ServingCert::Files =>
            {
                Some(ServerTls::Files(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: client_ca.clone(),
                }))
            }
            _ => None,
        };
        Ok(Self {
            node_name: args.node_name.clone().unwrap_or_else(host::hostname),
            state_dir: args.state_dir.clone(),
            listen: parse_listen(&args.listen)?,
            tls,
            accelerator: args.accelerator,
            qemu_binary: args.qemu_binary.clone(),
            firecracker_binary: args.firecracker_binary.clone(),
            cloud_hypervisor_binary: args.cloud_hypervisor_binary.clone(),
            boot_timeout: args.boot_timeout,
            console_max_bytes: args.console_max_bytes,
            max_snapshots: args.max_snapshots,
            pod_cgroup_root: args.vmm_cgroup_root.clone(),
            simulated: args.simulated,
            stop_vms_on_exit: args.stop_vms_on_exit,
            vcpu_overcommit: args.vcpu_overcommit,
            capacity_multiplier: args.capacity_multiplier,
            network: (!args.no_network).then(|| args.network.config(&args.state_dir)),
            network_setup: NetworkSetup::AtStart,
            images: args.images.config(&args.state_dir),
            vmm_policy: confine::VmmPolicy {
                ids: Some(confine::IdRange {
                    first: args.vmm_first_id,
                    count: args.vmm_id_count,
                }),
                allowed_path_dirs: if args.allowed_path_dirs.is_empty() {
                    vec![args.state_dir.join("guest")]
                } else {
                    args.allowed_path_dirs.clone()
                },
                allow_tcg: args.allow_tcg,
            },
        })
    }
}

/// A running agent.
pub struct AgentHandle {
    /// Where it listens (the bound port for `HOST:0`).
    pub listen: ListenAddr,
    /// Changes on every start.
    pub instance_id: String,
    join: JoinHandle<Result<(), AgentError>>,
}

impl AgentHandle {
    /// The unix socket path, when listening on one.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.listen {
            ListenAddr::Unix(path) => Some(path),
            ListenAddr::Tcp(_) => None,
        }
    }

    /// Wait until the agent has stopped (after its shutdown token was cancelled).
    pub async fn wait(self) -> Result<(), AgentError> {
        self.join.await.map_err(AgentError::Join)?
    }
}

/// Bind, re-adopt the VMs of the state directory, and serve in the background until
/// `shutdown` is cancelled.
pub async fn serve(
    config: AgentConfig,
    shutdown: CancellationToken,
) -> Result<AgentHandle, AgentError> {
    serve_with_metrics(config, shutdown, MetricsRegistry::with_prefix("ignis")).await
}

/// [`serve`], registering the agent's metrics in `metrics`.
pub(crate) async fn serve_with_metrics(
    config: AgentConfig,
    shutdown: CancellationToken,
    metrics: MetricsRegistry,
) -> Result<AgentHandle, AgentError> {
    if let ListenAddr::Tcp(addr) = config.listen
        && config.tls.is_none()
    {
        return Err(AgentError::TlsRequired { addr });
    }
    let tls = match &config.tls {
        Some(files) if matches!(config.listen, ListenAddr::Tcp(_)) => Some(load_tls(files)?),
        _ => None,
    };
    let store = state::StateStore::open(&config.state_dir).map_err(AgentError::State)?;
    let mut capacity = host::HostCapacity::read().map_err(AgentError::Host)?;
    capacity.vcpus = capacity.vcpus.saturating_mul(config.vcpu_overcommit.max(1));
    // Control-plane benchmarks place thousands of simulated VMs on one node: on purpose,
    // visibly (`hypervisor: simulated`), and never for real VMs.
    if config.simulated && config.capacity_multiplier > 1 {
        let f = config.capacity_multiplier;
        capacity.vcpus = capacity.vcpus.saturating_mul(f);
        capacity.memory_bytes = capacity.memory_bytes.saturating_mul(f.into());
    }
    let probe = offers::choose_accelerator(&config).await?;
    let (accelerator, accelerator_detail) = (probe.accelerator, probe.detail);
    let instance_id = uuid::Uuid::new_v4().to_string();
    let (backends, unavailable) = offers::backends(&config);
    let supervisor = Supervisor::new(
        SupervisorConfig {
            boot_timeout: config.boot_timeout,
            console_max_bytes: config.console_max_bytes,
            pods: pod::Host::new(config.pod_cgroup_root.clone()),
            host: capacity,
            accelerator,
            accelerator_detail: accelerator_detail.clone(),
            simulated: config.simulated,
            unavailable,
            network: config.network.clone(),
            images: Some(config.images.clone()),
            policy: config.vmm_policy.clone(),
            max_snapshots: config.max_snapshots,
        },
        store,
        backends,
        AgentMetrics::register(&metrics).await,
    );
    supervisor.open_images().await;
    let held = supervisor.adopt().await.map_err(AgentError::Adopt)?;
    // After re-adoption, so the attachments of every VM still held are kept.
    supervisor
        .start_network(config.network_setup == NetworkSetup::AtStart)
        .await;
    supervisor.spawn_housekeeping();
    let service = server::AgentService::new(
        supervisor.clone(),
        config.node_name.clone(),
        instance_id.clone(),
        shutdown.clone(),
    );
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).map_err(AgentError::Tls)?;
    }
    let router = builder.add_service(tonic::service::interceptor::InterceptedService::new(
        service.into_server(),
        tls::ControllerOnly {
            enforce: matches!(config.listen, ListenAddr::Tcp(_)),
        },
    ));
    let stop_vms = config.stop_vms_on_exit;
    let (listen, join) = match &config.listen {
        ListenAddr::Unix(path) => {
            let bind_err = |source| AgentError::Bind {
                what: format!("unix://{}", path.display()),
                source,
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(bind_err)?;
            }
            // A socket left by an agent that was killed; nobody serves it any more.
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(bind_err(e)),
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let path = path.clone();
            let supervisor = supervisor.clone();
            let shutdown = shutdown.clone();
            let socket = path.clone();
            let join = tokio::spawn(async move {
                let served = router
                    .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                    .await;
                supervisor.shutdown(stop_vms).await;
                let _ = std::fs::remove_file(&socket);
                tracing::info!("agent stopped");
                served.map_err(AgentError::Serve)
            });
            (ListenAddr::Unix(path), join)
        }
        ListenAddr::Tcp(addr) => {
            let incoming =
                tonic::transport::server::TcpIncoming::bind(*addr).map_err(|source| {
                    AgentError::Bind {
                        what: addr.to_string(),
                        source,
                    }
                })?;
            let bound = incoming.local_addr().map_err(|source| AgentError::Bind {
                what: addr.to_string(),
                source,
            })?;
            let supervisor = supervisor.clone();
            let shutdown = shutdown.clone();
            let join = tokio::spawn(async move {
                let served = router
                    .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                    .await;
                supervisor.shutdown(stop_vms).await;
                tracing::info!("agent stopped");
                served.map_err(AgentError::Serve)
            });
            (ListenAddr::Tcp(bound), join)
        }
    };
    tracing::info!(
        listen = %listen,
        node = %config.node_name,
        accelerator = %accelerator,
        detail = %accelerator_detail,
        held,
        instance_id = %instance_id,
        "agent serving"
    );
    Ok(AgentHandle {
        listen,
        instance_id,
        join,
    })
}

fn load_tls(tls: &ServerTls) -> Result<tonic::transport::ServerTlsConfig, AgentError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| AgentError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let (identity, client_ca) = match tls {
        ServerTls::Files(files) => (
            tonic::transport::Identity::from_pem(read(&files.cert)?, read(&files.key)?),
            &files.client_ca,
        ),
        ServerTls::Issued { issued, client_ca } => (
            tonic::transport::Identity::from_pem(&issued.cert_pem, &issued.key_pem),
            client_ca,
        ),
    };
    let ca = tonic::transport::Certificate::from_pem(read(client_ca)?);
    // A client CA makes client certificates mandatory (client_auth_optional stays false).
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(ca))
}

/// Run until `shutdown` is cancelled.
pub async fn run(args: AgentArgs, shutdown: CancellationToken) -> Result<(), AgentError> {
    let mut config = AgentConfig::from_args(&args)?;
    // Every node offers the demo guest at `<state-dir>/guest`, so the samples run anywhere
    // the host has a kernel and busybox; nodes without them just don't offer it.
    match guest::build_demo_guest(&config.state_dir.join("guest")) {
        Ok(demo) => tracing::info!(kernel = %demo.kernel.display(), "demo guest ready"),
        Err(error) => tracing::info!(%error, "no demo guest on this node"),
    }
    let metrics = MetricsRegistry::with_prefix("ignis");
    let readiness = Readiness::default();
    telemetry::spawn_health_server(
        args.health_addr,
        metrics.clone(),
        readiness.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(AgentError::Telemetry)?;
    if let Some(root) = &args.vmm_cgroup_root {
        cgroup::configure(root, &args.vmm_cgroup);
    }
    if let Some(ServerTls::Files(files)) = &config.tls {
        tls::watch_files(
            vec![
                files.cert.clone(),
                files.key.clone(),
                files.client_ca.clone(),
            ],
            shutdown.clone(),
        );
    }
    if args.serving_cert == crate::controller::tls::ServingCert::Csr {
        let client_ca = args.client_ca.clone().ok_or(AgentError::CsrNeedsClientCa)?;
        // The signing CA's certificate beside the client CA (the agents' Secret in CSR mode):
        // a CA rotation that reissues changes it, and the agent restarts to ask the new CA.
        let signer = client_ca.with_file_name(crate::controller::tls::SIGNER_CERT);
        let mut watched = vec![client_ca.clone()];
        if signer.exists() {
            watched.push(signer);
        }
        tls::watch_files(watched, shutdown.clone());
        let Some(issued) = csr::obtain(&config.node_name, &shutdown)
            .await
            .map_err(AgentError::Csr)?
        else {
            return Ok(());
        };
        csr::renew_before_expiry(&issued, shutdown.clone());
        config.tls = Some(ServerTls::Issued { issued, client_ca });
    }
    let handle = serve_with_metrics(config, shutdown, metrics).await?;
    readiness.set_ready(true);
    handle.wait().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorReason;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            parse_listen("unix:///run/ignis/agent.sock").expect("unix"),
            ListenAddr::Unix(PathBuf::from("/run/ignis/agent.sock"))
        );
        assert_eq!(
            parse_listen("0.0.0.0:9440").expect("tcp"),
            ListenAddr::Tcp("0.0.0.0:9440".parse().expect("addr"))
        );
        for bad in ["unix://relative.sock", "unix://", "agent.sock", "host:port"] {
            assert_eq!(parse_listen(bad).expect_err(bad).reason(), "InvalidListen");
        }
    }

    #[test]
    fn network_flags_reach_the_config() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("ignis").chain(args.iter().copied()))
                .expect("flags");
            AgentConfig::from_args(&cli.agent).expect("config")
        };
        let default = parse(&["--state-dir", "/srv/ignis"]);
        assert_eq!(
            default.network,
            Some(net::NetworkConfig::new("/srv/ignis/net")),
            "networking is on by default"
        );
        assert_eq!(default.network_setup, NetworkSetup::AtStart);
        let custom = parse(&["--bridge", "br-vm", "--cidr", "172.20.0.0/24"]).network;
        let custom = custom.expect("on");
        assert_eq!(
            (custom.bridge.as_str(), custom.cidr.to_string()),
            ("br-vm", "172.20.0.0/24".to_string())
        );
        assert_eq!(parse(&["--no-network"]).network, None);
        let local = AgentConfig::local(Path::new("/tmp/x"));
        assert_eq!(local.network_setup, NetworkSetup::OnFirstUse);
        assert!(local.network.is_some());
    }

    #[tokio::test]
    async fn tcp_without_tls_is_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let mut config = AgentConfig::local(tmp.path());
        config.listen = ListenAddr::Tcp("127.0.0.1:0".parse().expect("addr"));
        let error = serve(config, CancellationToken::new())
            .await
            .err()
            .expect("refused");
        assert_eq!(error.reason(), "TlsRequired");
    }
}
