//! `ignis dev`: the whole system on one machine. An embedded Kubernetes-compatible API server
//! (SQLite, loopback, bearer token), the controller and one local agent run in this process;
//! `kubectl` drives them through the kubeconfig this command writes.

mod admission;
pub(crate) mod agent_link;
pub mod apiserver;

pub use admission::{MicroVmResourceError, api_server_config, microvm_resource};
pub use agent_link::AgentLinkError;

use agent_link::AgentLink;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AcceleratorFlag, AgentConfig, guest};
use crate::api::{ConditionType, FIELD_MANAGER, MicroVM, find_condition};
use crate::controller::{self, ControllerConfig};
use crate::telemetry::{self, MetricsRegistry, Readiness};

/// The MicroVM `--demo` applies (the same file as `config/samples/microvm-minimal.yaml`).
const DEMO_MANIFEST: &str = include_str!("../../config/samples/microvm-minimal.yaml");

/// Flags of `ignis dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Where everything lives: API objects (`apiserver/`), VM state (`vms/`), the demo guest
    /// (`guest/`) and the kubeconfig. The samples expect the default.
    #[arg(long, env = "IGNIS_DEV_DATA_DIR", default_value = "/var/lib/ignis")]
    pub data_dir: PathBuf,
    /// Where to write the kubeconfig (default: `<data-dir>/kubeconfig`).
    #[arg(long, env = "IGNIS_DEV_KUBECONFIG_OUT")]
    pub kubeconfig_out: Option<PathBuf>,
    /// Loopback port of the API server (0 picks a free one).
    #[arg(long, env = "IGNIS_DEV_API_PORT", default_value_t = 6443)]
    pub api_port: u16,
    /// Address of `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "IGNIS_DEV_HEALTH_ADDR", default_value = "127.0.0.1:9440")]
    pub health_addr: SocketAddr,
    /// Accelerator policy of the local agent.
    #[arg(long, env = "IGNIS_ACCELERATOR", value_enum, default_value = "auto")]
    pub accelerator: AcceleratorFlag,
    /// Apply the minimal sample MicroVM, wait for it to be Ready and print its console.
    #[arg(long)]
    pub demo: bool,
    /// Use the simulated VMM (control-plane benchmarks only; shows as `hypervisor: simulated`).
    #[arg(long, hide = true)]
    pub simulated: bool,
}

/// Errors of `ignis dev`.
#[derive(Debug, Error)]
pub enum DevError {
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the demo guest (needs /boot/vmlinuz-* and busybox-static)")]
    Guest(#[source] guest::GuestError),
    #[error("the local agent did not start")]
    Agent(#[source] agent::AgentError),
    #[error("the embedded API server did not start")]
    ApiServer(#[source] apiserver::ApiServerError),
    #[error("the MicroVM resource could not be built")]
    Resource(#[source] MicroVmResourceError),
    #[error("cannot write the kubeconfig to {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build a client for the embedded API server")]
    Client(#[source] kube::Error),
    #[error("the controller did not start")]
    Controller(#[source] controller::ControllerError),
    #[error("the health server did not start")]
    Telemetry(#[source] telemetry::TelemetryError),
    #[error("the demo MicroVM could not be applied")]
    Demo(#[source] kube::Error),
    #[error("the demo MicroVM did not become Ready in {0:?}; see `kubectl describe mvm hello`")]
    DemoTimeout(Duration),
    #[error("cannot reach the local agent")]
    AgentLink(#[source] AgentLinkError),
    #[error("the demo manifest is not valid YAML")]
    DemoManifest(#[source] serde_yaml::Error),
}

impl DevError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            DevError::DataDir { .. } => "DataDir",
            DevError::Guest(_) => "DemoGuest",
            DevError::Agent(_) => "Agent",
            DevError::ApiServer(_) => "ApiServer",
            DevError::Resource(e) => e.reason(),
            DevError::Kubeconfig { .. } => "Kubeconfig",
            DevError::Client(_) => "Client",
            DevError::Controller(_) => "Controller",
            DevError::Telemetry(_) => "Telemetry",
            DevError::Demo(_) | DevError::DemoManifest(_) => "Demo",
            DevError::DemoTimeout(_) => "DemoTimeout",
            DevError::AgentLink(e) => e.reason(),
        }
    }
}

/// Run until `shutdown` is cancelled; then stop every VM this process started and exit.
pub async fn run(args: DevArgs, shutdown: CancellationToken) -> Result<(), DevError> {
    let started = Instant::now();
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| DevError::DataDir {
        path: data_dir.clone(),
        source,
    })?;

    let guest_dir = data_dir.join("guest");
    match guest::build_demo_guest(&guest_dir) {
        Ok(built) => {
            tracing::info!(kernel = %built.kernel.display(), initrd = %built.initrd.display(), "demo guest ready")
        }
        Err(error) if !args.demo => {
            tracing::warn!(error = %error, "no demo guest: MicroVMs must bring their own kernel")
        }
        Err(error) => return Err(DevError::Guest(error)),
    }

    // Each part gets its own token so shutdown runs in order: controller, agent, API server.
    let metrics = MetricsRegistry::with_prefix("ignis");
    let readiness = Readiness::default();
    let stop_controller = CancellationToken::new();
    let stop_agent = CancellationToken::new();
    let stop_api = CancellationToken::new();

    let mut agent_config = AgentConfig::local(&data_dir);
    agent_config.accelerator = args.accelerator;
    agent_config.simulated = args.simulated;
    // Ctrl-C stops every VM `ignis dev` started; a SIGKILL leaves them to be re-adopted.
    agent_config.stop_vms_on_exit = true;
    let node_name = agent_config.node_name.clone();
    let agent = agent::serve_with_metrics(agent_config, stop_agent.clone(), metrics.clone())
        .await
        .map_err(DevError::Agent)?;
    let socket = agent
        .socket_path()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| data_dir.join("agent.sock"));

    let mut api_config =
        api_server_config(data_dir.join("apiserver")).map_err(DevError::Resource)?;
    api_config.listen = SocketAddr::from(([127, 0, 0, 1], args.api_port));
    api_config.node_name = node_name.clone();
    if let Ok(capacity) = crate::agent::host::HostCapacity::read() {
        api_config.node_vcpus = capacity.vcpus;
        api_config.node_memory_bytes = capacity.memory_bytes;
    }
    let api = apiserver::start(api_config, stop_api.clone())
        .await
        .map_err(DevError::ApiServer)?;
    let kubeconfig = args
        .kubeconfig_out
        .clone()
        .unwrap_or_else(|| data_dir.join("kubeconfig"));
    api.write_kubeconfig(&kubeconfig)
        .map_err(|source| DevError::Kubeconfig {
            path: kubeconfig.clone(),
            source,
        })?;

    let client = kube::Client::try_from(api.client_config()).map_err(DevError::Client)?;
    let mut controller_config =
        ControllerConfig::with_unix_agents(BTreeMap::from([(node_name.clone(), socket.clone())]));
    controller_config.metrics = metrics.clone();
    let controller = controller::start(client.clone(), controller_config, stop_controller.clone())
        .await
        .map_err(DevError::Controller)?;

    let health = telemetry::spawn_health_server(
        args.health_addr,
        metrics,
        readiness.clone(),
        stop_api.clone(),
    )
    .await
    .map_err(DevError::Telemetry)?;
    readiness.set_ready(true);
    println!(
        "ignis dev is up in {} ms: API {}, node {node_name}, health http://{health}\n\
         export KUBECONFIG={}",
        started.elapsed().as_millis(),
        api.url(),
        kubeconfig.display()
    );

    let outcome = if args.demo {
        tokio::select! {
            result = run_demo(client, &socket, &data_dir) => result,
            () = shutdown.cancelled() => Ok(()),
        }
    } else {
        Ok(())
    };
    if outcome.is_ok() {
        shutdown.cancelled().await;
    }

    tracing::info!("stopping: controller, then every VM, then the API server");
    readiness.set_ready(false);
    stop_controller.cancel();
    if let Err(error) = controller.wait().await {
        tracing::warn!(error = %error, "controller stopped with an error");
    }
    stop_agent.cancel();
    if let Err(error) = agent.wait().await {
        tracing::warn!(error = %error, "agent stopped with an error");
    }
    stop_api.cancel();
    api.stopped().await;
    outcome
}

/// Apply the minimal sample, wait for Ready, print how long it took and the guest's console.
async fn run_demo(
    client: kube::Client,
    agent_socket: &Path,
    data_dir: &Path,
) -> Result<(), DevError> {
    const TIMEOUT: Duration = Duration::from_secs(120);
    let agent = AgentLink::connect(agent_socket)
        .await
        .map_err(DevError::AgentLink)?;
    let mut vm: MicroVM = serde_yaml::from_str(DEMO_MANIFEST).map_err(DevError::DemoManifest)?;
    let guest = data_dir.join("guest");
    vm.spec.kernel.path = Some(guest.join("vmlinuz").display().to_string());
    if let Some(initrd) = vm.spec.initrd.as_mut() {
        initrd.path = Some(guest.join("initrd.cpio").display().to_string());
    }
    let api: Api<MicroVM> = Api::namespaced(client, "default");
    let name = vm.metadata.name.clone().unwrap_or_else(|| "hello".into());
    let applied = Instant::now();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&vm),
    )
    .await
    .map_err(DevError::Demo)?;
    println!("applied MicroVM default/{name}; waiting for Ready…");

    // Ready is believed only when the agent agrees: after a restart of `ignis dev` the stored
    // status still says Ready from the previous run until the controller has caught up.
    let deadline = Instant::now() + TIMEOUT;
    let mut last_said = String::new();
    let obj = loop {
        if Instant::now() > deadline {
            return Err(DevError::DemoTimeout(TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(obj) = api.get(&name).await else {
            continue;
        };
        let status = obj.status.clone().unwrap_or_default();
        let agent_ready =
            match obj.metadata.uid.as_deref() {
                Some(uid) => agent.vm(uid).await.ok().flatten().is_some_and(|vm| {
                    vm.ready && vm.state == crate::proto::VmState::Running as i32
                }),
                None => false,
            };
        match find_condition(&status.conditions, ConditionType::Ready) {
            Some(c) if c.status == "True" && agent_ready => break obj,
            Some(c) => {
                let said = format!("  {name}: Ready={} {} {}", c.status, c.reason, c.message);
                if said != last_said {
                    println!("{said}");
                    last_said = said;
                }
            }
            None => {}
        }
    };
    let status = obj.status.unwrap_or_default();
    println!(
        "MicroVM default/{name} is Ready {} ms after apply: node {}, {} on {}",
        applied.elapsed().as_millis(),
        status.node_name.unwrap_or_default(),
        status.hypervisor.map(|h| h.to_string()).unwrap_or_default(),
        status
            .accelerator
            .map(|a| a.to_string())
            .unwrap_or_default(),
    );
    if let Some(uid) = obj.metadata.uid {
        // Through the agent's Console call, as any client of the agent would read it.
        match agent.console_tail(&uid, 8 * 1024).await {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                println!("--- console of {name} ---");
                let lines: Vec<&str> = text.lines().collect();
                for line in &lines[lines.len().saturating_sub(20)..] {
                    println!("{line}");
                }
                println!("---");
            }
            Err(error) => tracing::warn!(reason = error.reason(), "cannot read the console"),
        }
    }
    println!("kubectl get mvm  (Ctrl-C stops ignis dev and its VMs)");
    Ok(())
}
