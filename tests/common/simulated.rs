//! The dev API server and an in-process agent on the simulated VMM (no guest runs), on one
//! node: what the controller tests drive.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ignis::agent::{self, AcceleratorFlag, AgentConfig, AgentHandle};
use ignis::controller::ControllerHandle;
use ignis::dev::apiserver::{self, ApiServerHandle};
use tokio_util::sync::CancellationToken;

pub struct SimulatedNode {
    pub api: ApiServerHandle,
    pub agent: AgentHandle,
    /// Cancels the agent only (the API server stops with the token given to `start`).
    pub stop_agent: CancellationToken,
    /// The agent's unix socket.
    pub socket: PathBuf,
    /// A stand-in kernel in `dir`: the simulated VMM never reads it, but the agent checks it
    /// is readable.
    pub kernel: PathBuf,
}

impl SimulatedNode {
    /// Start both in `dir`, the API server on `shutdown`; `tune` adjusts the agent's config.
    pub async fn start(
        dir: &Path,
        node: &str,
        shutdown: &CancellationToken,
        tune: impl FnOnce(&mut AgentConfig),
    ) -> SimulatedNode {
        let mut api_config = ignis::dev::api_server_config(dir.join("apiserver")).expect("config");
        api_config.node_name = node.into();
        let api = apiserver::start(api_config, shutdown.clone())
            .await
            .expect("start the dev API server");

        let mut agent_config = AgentConfig::local(&dir.join("agent"));
        agent_config.node_name = node.into();
        agent_config.accelerator = AcceleratorFlag::Tcg;
        agent_config.simulated = true;
        agent_config.network = None;
        agent_config
            .vmm_policy
            .allowed_path_dirs
            .push(dir.to_path_buf());
        agent_config.stop_vms_on_exit = true;
        tune(&mut agent_config);
        let stop_agent = CancellationToken::new();
        let agent = agent::serve(agent_config, stop_agent.clone())
            .await
            .expect("start the agent");
        let socket = agent.socket_path().expect("unix socket").to_path_buf();
        let kernel = dir.join("vmlinuz");
        std::fs::write(&kernel, b"not a kernel: the simulated VMM never reads it").expect("kernel");
        SimulatedNode {
            api,
            agent,
            stop_agent,
            socket,
            kernel,
        }
    }
}

/// Stop the agent and wait (bounded) for it to stop cleanly.
pub async fn stop_agent(agent: AgentHandle, stop: &CancellationToken) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(20), agent.wait())
        .await
        .expect("the agent stops in time")
        .expect("the agent stops cleanly");
}

/// Stop the controller and wait (bounded) for it to stop cleanly.
pub async fn stop_controller(controller: ControllerHandle, stop: &CancellationToken) {
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), controller.wait())
        .await
        .expect("the controller stops in time")
        .expect("the controller stops cleanly");
}
