//! How `ignis dev` talks to its local agent: the agent's gRPC API over its unix socket, as
//! the controller does, never the agent's files or in-process state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::{self, agent_client::AgentClient};

/// Every call is bounded: the demo must never hang on a stuck agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a call to the local agent failed.
#[derive(Debug, Error)]
pub enum AgentLinkError {
    #[error("cannot connect to the agent at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the agent refused the call")]
    Call(#[source] tonic::Status),
}

impl AgentLinkError {
    /// A fixed word for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AgentLinkError::Connect { .. } => "AgentConnect",
            AgentLinkError::Call(_) => "AgentCall",
        }
    }
}

/// A client of the agent listening on a unix socket.
#[derive(Clone, Debug)]
pub(crate) struct AgentLink {
    client: AgentClient<Channel>,
}

impl AgentLink {
    pub(crate) async fn connect(socket: &Path) -> Result<Self, AgentLinkError> {
        let path = socket.to_path_buf();
        let dial = path.clone();
        // The URI is a placeholder: the connector dials the socket.
        let channel = Endpoint::from_static("http://ignis-agent.local")
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let dial = dial.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(dial).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .map_err(|source| AgentLinkError::Connect { path, source })?;
        Ok(AgentLink {
            client: AgentClient::new(channel),
        })
    }

    /// The agent's view of one VM (None when it has no such VM).
    pub(crate) async fn vm(&self, uid: &str) -> Result<Option<proto::Vm>, AgentLinkError> {
        let request = proto::GetVmRequest { uid: uid.into() };
        match self.client.clone().get_vm(request).await {
            Ok(vm) => Ok(Some(vm.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(AgentLinkError::Call(status)),
        }
    }

    /// The last `tail_bytes` of a VM's console, without following it.
    pub(crate) async fn console_tail(
        &self,
        uid: &str,
        tail_bytes: u64,
    ) -> Result<Vec<u8>, AgentLinkError> {
        let request = proto::ConsoleRequest {
            uid: uid.into(),
            tail_bytes,
            follow: false,
        };
        let mut stream = self
            .client
            .clone()
            .console(request)
            .await
            .map_err(AgentLinkError::Call)?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream.message().await.map_err(AgentLinkError::Call)? {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }
}
