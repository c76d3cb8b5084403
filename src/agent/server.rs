//! The agent's gRPC service (`proto/agent.proto`): a thin layer that turns requests into
//! supervisor calls and supervisor errors into gRPC statuses. VM failures are not gRPC
//! errors: they come back as a VM in state FAILED with the reason.
//!
//! This is the agent's gRPC edge: messages are converted to the domain model
//! ([`crate::vm::wire`]) as they come in and back as they go out; nothing behind it sees a
//! generated type.

use std::pin::Pin;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::agent::console;
use crate::agent::supervisor::{Supervisor, SupervisorError};
use crate::error::ErrorReason;
use crate::proto;
use crate::proto::vm_event::Event;
use crate::vm::{VmUid, wire};

/// How often `WatchVMs` sends a heartbeat.
pub(crate) const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// The largest console chunk sent at once.
const CONSOLE_CHUNK: u64 = 64 * 1024;
/// The largest tail a client can ask for.
const CONSOLE_MAX_TAIL: u64 = 16 * 1024 * 1024;

/// The gRPC service.
#[derive(Clone)]
pub(crate) struct AgentService {
    supervisor: Supervisor,
    node_name: String,
    instance_id: String,
    /// Ends open streams so a graceful shutdown does not wait on them forever.
    shutdown: CancellationToken,
}

impl AgentService {
    pub(crate) fn new(
        supervisor: Supervisor,
        node_name: String,
        instance_id: String,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            supervisor,
            node_name,
            instance_id,
            shutdown,
        }
    }
}

impl AgentService {
    /// The tonic service to add to a server.
    pub(crate) fn into_server(self) -> proto::agent_server::AgentServer<Self> {
        proto::agent_server::AgentServer::new(self)
    }
}

/// A supervisor error as a gRPC status.
pub(crate) fn status_of(error: &SupervisorError) -> Status {
    let message = format!("{}: {error}", error.reason());
    match error {
        SupervisorError::InvalidRequest { .. } => Status::invalid_argument(message),
        SupervisorError::NotFound { .. } => Status::not_found(message),
        SupervisorError::State(_) | SupervisorError::Console(_) => Status::internal(message),
    }
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl proto::agent_server::Agent for AgentService {
    async fn get_host(
        &self,
        _request: Request<proto::GetHostRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        let host = self.supervisor.host(&self.node_name, &self.instance_id);
        Ok(Response::new((&host).into()))
    }

    async fn apply_vm(
        &self,
        request: Request<proto::ApplyVmRequest>,
    ) -> Result<Response<proto::Vm>, Status> {
        let (request, refused) = wire::apply_request(request.into_inner()).map_err(|e| {
            status_of(&SupervisorError::InvalidRequest {
                detail: e.to_string(),
            })
        })?;
        let status = match refused {
            None => self.supervisor.apply(request).await,
            Some(error) => self.supervisor.refuse(request, error).await,
        };
        Ok(Response::new((&status).into()))
    }

    async fn delete_vm(
        &self,
        request: Request<proto::DeleteVmRequest>,
    ) -> Result<Response<proto::DeleteVmResponse>, Status> {
        let request = request.into_inner();
        let grace = u64::try_from(request.grace_period_seconds)
            .ok()
            .map(Duration::from_secs);
        let uid = VmUid::new(request.uid).map_err(|e| {
            status_of(&SupervisorError::InvalidRequest {
                detail: e.to_string(),
            })
        })?;
        let asker = match request.owner_uid.as_str() {
            "" => None,
            owner => Some(VmUid::new(owner).map_err(|e| {
                status_of(&SupervisorError::InvalidRequest {
                    detail: e.to_string(),
                })
            })?),
        };
        self.supervisor
            .delete_for(&uid, grace, asker)
            .await
            .map(|existed| Response::new(proto::DeleteVmResponse { existed }))
            .map_err(|e| status_of(&e))
    }

    async fn get_vm(
        &self,
        request: Request<proto::GetVmRequest>,
    ) -> Result<Response<proto::Vm>, Status> {
        let uid = request.into_inner().uid;
        VmUid::new(uid.clone())
            .ok()
            .and_then(|uid| self.supervisor.get(&uid))
            .map(|vm| Response::new((&vm).into()))
            .ok_or_else(|| status_of(&SupervisorError::NotFound { uid }))
    }

    async fn list_v_ms(
        &self,
        _request: Request<proto::ListVMsRequest>,
    ) -> Result<Response<proto::ListVMsResponse>, Status> {
        Ok(Response::new(proto::ListVMsResponse {
            vms: self.supervisor.list().iter().map(proto::Vm::from).collect(),
        }))
    }

    type WatchVMsStream = Stream<proto::VmEvent>;

    async fn watch_v_ms(
        &self,
        _request: Request<proto::WatchVMsRequest>,
    ) -> Result<Response<Self::WatchVMsStream>, Status> {
        let (mut events, mut sequence) = self.supervisor.subscribe();
        let (tx, rx) = mpsc::channel(256);
        let supervisor = self.supervisor.clone();
        let instance_id = self.instance_id.clone();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // Subscribed first, snapshot second: a change in between arrives twice, never
            // zero times, and every event carries the whole VM, so twice is harmless.
            if !send_snapshot(&tx, &supervisor, sequence).await {
                return;
            }
            let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            heartbeat.tick().await;
            loop {
                let out = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    event = events.recv() => match event {
                        Ok(event) => {
                            sequence = event.sequence;
                            proto::VmEvent::from(&event)
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            if !send_snapshot(&tx, &supervisor, sequence).await {
                                return;
                            }
                            continue;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = heartbeat.tick() => proto::VmEvent {
                        sequence,
                        event: Some(Event::Heartbeat(proto::Heartbeat {
                            instance_id: instance_id.clone(),
                            at_unix_ms: crate::time::now_unix_ms(),
                        })),
                    },
                };
                if tx.send(Ok(out)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ConsoleStream = Stream<proto::ConsoleChunk>;

    async fn console(
        &self,
        request: Request<proto::ConsoleRequest>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        let request = request.into_inner();
        let uid = VmUid::new(request.uid.clone()).map_err(|_| {
            status_of(&SupervisorError::NotFound {
                uid: request.uid.clone(),
            })
        })?;
        let path = self
            .supervisor
            .console_path(&uid)
            .map_err(|e| status_of(&e))?;
        // The follow cursor is placed before the tail is read: a line written in between may
        // come twice, but none is lost.
        let mut cursor = console::LogCursor::new(&path, None);
        let tail = console::read_tail(&path, request.tail_bytes.min(CONSOLE_MAX_TAIL))
            .map_err(|e| status_of(&SupervisorError::Console(e)))?;
        let (tx, rx) = mpsc::channel(16);
        let supervisor = self.supervisor.clone();
        let shutdown = self.shutdown.clone();
        let follow = request.follow;
        tokio::spawn(async move {
            if !tail.is_empty()
                && tx
                    .send(Ok(proto::ConsoleChunk { data: tail }))
                    .await
                    .is_err()
            {
                return;
            }
            if !follow {
                return;
            }
            loop {
                // Read first, then check whether the VM is over, so its last output is sent.
                let ended = supervisor.get(&uid).is_none_or(|vm| vm.state.is_ended());
                loop {
                    match cursor.read_new(CONSOLE_CHUNK) {
                        Ok(data) if data.is_empty() => break,
                        Ok(data) => {
                            if tx.send(Ok(proto::ConsoleChunk { data })).await.is_err() {
                                return;
                            }
                        }
                        Err(error) => {
                            let _ = tx
                                .send(Err(status_of(&SupervisorError::Console(error))))
                                .await;
                            return;
                        }
                    }
                }
                if ended {
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(console::POLL_INTERVAL) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Every VM, then `synced`; false when the client went away.
async fn send_snapshot(
    tx: &mpsc::Sender<Result<proto::VmEvent, Status>>,
    supervisor: &Supervisor,
    sequence: u64,
) -> bool {
    for vm in supervisor.list() {
        let event = proto::VmEvent {
            sequence,
            event: Some(Event::Vm((&vm).into())),
        };
        if tx.send(Ok(event)).await.is_err() {
            return false;
        }
    }
    tx.send(Ok(proto::VmEvent {
        sequence,
        event: Some(Event::Synced(true)),
    }))
    .await
    .is_ok()
}
