//! What `ignis controller` is told: its flags, the configuration `start` takes (built from
//! the flags, or directly by `ignis dev` and tests), and the errors of starting it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;

use super::agents::{AgentEndpoint, AgentTls};
use super::scheduler::PlacementStrategy;
use super::tls;
use super::vmpod::{OverheadError, VmPodSettings, VmmOverhead};
use crate::telemetry::MetricsRegistry;

/// Flags of `ignis controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Watch MicroVMs in this namespace only (default: all namespaces).
    #[arg(long, env = "IGNIS_WATCH_NAMESPACE")]
    pub(crate) namespace: Option<String>,
    /// How new VMs are spread over nodes.
    #[arg(long, env = "IGNIS_PLACEMENT", value_enum, default_value_t = PlacementStrategy::Spread)]
    pub(crate) placement: PlacementStrategy,
    /// Port the agents listen on (host network, discovered from the agent pods).
    #[arg(long, env = "IGNIS_AGENT_PORT", default_value_t = 9443)]
    pub(crate) agent_port: u16,
    /// Namespace of the agent pods (default: all namespaces).
    #[arg(long, env = "IGNIS_AGENT_NAMESPACE")]
    pub(crate) agent_namespace: Option<String>,
    /// A static agent, NODE=unix:///path or NODE=host:port; disables pod discovery. Repeatable.
    #[arg(
        long = "agent-endpoint",
        env = "IGNIS_AGENT_ENDPOINTS",
        value_delimiter = ','
    )]
    pub(crate) agent_endpoints: Vec<String>,
    /// Secret holding the CA and certificates for agent mTLS; created when missing.
    #[arg(long, env = "IGNIS_TLS_SECRET", default_value = "ignis-agent-tls")]
    pub(crate) tls_secret: String,
    /// Where the agents' serving certificates come from: `files` (one shared certificate in
    /// the agents' Secret) or `csr` (each agent's own, through a CertificateSigningRequest
    /// this controller approves and signs; agents are then dialed by their node's name).
    #[arg(long, env = "IGNIS_AGENT_SERVING_CERT", value_enum, default_value_t = tls::ServingCert::Files)]
    pub(crate) agent_serving_cert: tls::ServingCert,
    /// The agents' ServiceAccount (in --agent-namespace, else --system-namespace): the only
    /// requester whose agent CSRs are approved.
    #[arg(
        long,
        env = "IGNIS_AGENT_SERVICE_ACCOUNT",
        default_value = "ignis-agent"
    )]
    pub(crate) agent_service_account: String,
    /// Namespace of the TLS Secret and the Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ignis-system")]
    pub(crate) system_namespace: String,
    /// Talk to TCP agents without TLS (testing only).
    #[arg(long, env = "IGNIS_INSECURE_AGENTS")]
    pub(crate) insecure_agents: bool,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "IGNIS_HEALTH_ADDR", default_value = "0.0.0.0:9440")]
    pub(crate) health_addr: SocketAddr,
    /// Leader election.
    #[command(flatten)]
    pub(crate) leader: Box<LeaderArgs>,
    /// How long an agent may be unreachable before its VMs turn Ready=Unknown (e.g. 10s).
    #[arg(long, env = "IGNIS_AGENT_LOST_GRACE", default_value = "10s", value_parser = crate::time::parse_duration)]
    pub(crate) agent_lost_grace: Duration,
    /// Run every VM inside a VM pod that kube-scheduler places (a cluster; the chart sets it).
    /// Off: Ignis places VMs itself and makes no pods (`ignis dev`).
    #[arg(long, env = "IGNIS_VM_PODS")]
    pub(crate) vm_pods: bool,
    /// Image of the VM pods' launcher container (`ignis vm-pod`): the controller's own image.
    /// Required with --vm-pods.
    #[arg(long, env = "IGNIS_VM_POD_IMAGE")]
    pub(crate) vm_pod_image: Option<String>,
    /// Memory a VMM needs beyond its guest's, added to the VM pod's requests and limits:
    /// HYPERVISOR=QUANTITY, repeatable or comma-separated (defaults qemu=128Mi,
    /// firecracker=32Mi, cloud-hypervisor=48Mi).
    #[arg(long, env = "IGNIS_VMM_OVERHEAD", value_delimiter = ',')]
    pub(crate) vmm_overhead: Vec<String>,
}

impl ControllerArgs {
    /// The VM pod settings the flags ask for; `None` without --vm-pods.
    pub(crate) fn vm_pod_settings(&self) -> Result<Option<VmPodSettings>, ControllerError> {
        if !self.vm_pods {
            return Ok(None);
        }
        let image = self
            .vm_pod_image
            .clone()
            .filter(|i| !i.is_empty())
            .ok_or(ControllerError::MissingVmPodImage)?;
        let overhead = VmmOverhead::parse(&self.vmm_overhead).map_err(ControllerError::Overhead)?;
        Ok(Some(VmPodSettings { image, overhead }))
    }
}

/// Leader election flags of `ignis controller`.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaderArgs {
    /// Elect a leader through a Lease so only one replica reconciles.
    #[arg(long, env = "IGNIS_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) leader_election: bool,
    /// Name of the leader election Lease.
    #[arg(long, env = "IGNIS_LEASE_NAME", default_value = "ignis-controller")]
    pub(crate) lease_name: String,
    /// Namespace of the Lease (default: --system-namespace).
    #[arg(long, env = "IGNIS_LEASE_NAMESPACE")]
    pub(crate) lease_namespace: Option<String>,
    /// How long a leader holds the Lease without renewing (e.g. 15s).
    #[arg(long, env = "IGNIS_LEASE_DURATION", default_value = "15s", value_parser = crate::time::parse_duration)]
    pub(crate) lease_duration: Duration,
}

/// Errors of `ignis controller`.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum ControllerError {
    #[error("cannot create a Kubernetes client")]
    #[strum(serialize = "KubeClient")]
    Client(#[source] kube::Error),
    #[error("cannot start the health server")]
    Telemetry(#[source] crate::telemetry::TelemetryError),
    #[error("bad --agent-endpoint {0:?}: expected NODE=unix:///path or NODE=host:port")]
    BadEndpoint(String),
    #[error("cannot set up agent TLS")]
    Tls(#[source] tls::TlsError),
    #[error("leadership lost; exiting so a fresh replica can stand by")]
    LostLeadership,
    #[error("the controller task failed")]
    Task(#[source] tokio::task::JoinError),
    #[error("--vm-pods needs --vm-pod-image (the controller's own image)")]
    MissingVmPodImage,
    #[error("bad --vmm-overhead")]
    #[strum(serialize = "BadVmmOverhead")]
    Overhead(#[source] OverheadError),
}

/// Where pod discovery looks for agents.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    pub(crate) namespace: Option<String>,
    pub(crate) port: u16,
}

/// Everything `start` needs; `ignis dev` and tests build it directly.
#[derive(Clone)]
pub struct ControllerConfig {
    /// Watch one namespace, or all.
    pub(crate) namespace: Option<String>,
    pub(crate) placement: PlacementStrategy,
    /// Static agents (node name → endpoint); used when `discovery` is `None`.
    pub(crate) static_agents: BTreeMap<String, AgentEndpoint>,
    /// Discover agents from their pods (cluster mode).
    pub(crate) discovery: Option<DiscoveryConfig>,
    /// Client TLS for TCP agents, the latest (renewed while the controller runs).
    pub(crate) tls: Option<AgentTls>,
    pub(crate) agent_lost_grace: Duration,
    /// A stream silent this long (no heartbeat) counts as broken.
    pub(crate) heartbeat_timeout: Duration,
    /// How long a VM no MicroVM owns may live on an agent.
    pub(crate) drift_grace: Duration,
    pub(crate) metrics: MetricsRegistry,
    /// Reporting instance for Events (the pod name in a cluster).
    pub(crate) instance: Option<String>,
    /// Run VMs in VM pods (`--vm-pods`); `None`: Ignis places them itself (`ignis dev`).
    pub(crate) vm_pods: Option<VmPodSettings>,
}

impl ControllerConfig {
    /// `ignis dev` / tests: static unix-socket agents, no discovery, no TLS.
    pub fn with_unix_agents(agents: BTreeMap<String, std::path::PathBuf>) -> Self {
        Self {
            namespace: None,
            placement: PlacementStrategy::Spread,
            static_agents: agents
                .into_iter()
                .map(|(n, p)| (n, AgentEndpoint::Unix(p)))
                .collect(),
            discovery: None,
            tls: None,
            agent_lost_grace: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(30),
            drift_grace: Duration::from_secs(30),
            metrics: MetricsRegistry::with_prefix("ignis"),
            instance: None,
            vm_pods: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_have_the_documented_defaults() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ControllerArgs,
        }
        let cli = Cli::parse_from([
            "ignis",
            "--agent-endpoint",
            "local=unix:///run/ignis/agent.sock",
            "--leader-election",
            "false",
        ]);
        assert_eq!(cli.args.health_addr.to_string(), "0.0.0.0:9440");
        assert_eq!(cli.args.agent_lost_grace, Duration::from_secs(10));
        assert_eq!(cli.args.placement, PlacementStrategy::Spread);
        assert!(!cli.args.leader.leader_election);
        assert_eq!(cli.args.agent_endpoints.len(), 1);
        assert!(!cli.args.vm_pods);
        assert_eq!(cli.args.vm_pod_settings().ok(), Some(None));
    }

    #[test]
    fn vm_pods_need_an_image_and_take_overheads() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ControllerArgs,
        }
        let cli = Cli::parse_from(["ignis", "--vm-pods"]);
        assert!(matches!(
            cli.args.vm_pod_settings(),
            Err(ControllerError::MissingVmPodImage)
        ));
        let cli = Cli::parse_from([
            "ignis",
            "--vm-pods",
            "--vm-pod-image",
            "r/ignis-controller:1",
            "--vmm-overhead",
            "qemu=200Mi,firecracker=40Mi",
        ]);
        let settings = cli.args.vm_pod_settings().ok().flatten().expect("settings");
        assert_eq!(settings.image, "r/ignis-controller:1");
        assert_eq!(settings.overhead.qemu, 200 << 20);
        assert_eq!(settings.overhead.firecracker, 40 << 20);
        assert_eq!(settings.overhead.cloud_hypervisor, 48 << 20);
        let cli = Cli::parse_from([
            "ignis",
            "--vm-pods",
            "--vm-pod-image=x",
            "--vmm-overhead=qemu",
        ]);
        assert!(matches!(
            cli.args.vm_pod_settings(),
            Err(ControllerError::Overhead(_))
        ));
    }
}
