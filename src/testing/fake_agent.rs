//! A unit-test double of a node agent's gRPC service, for the controller's tests. It models
//! what the real agent (`agent/server.rs`) was observed to do: `GetHost` tells a fixed node
//! (4 vCPUs, 8 GiB, QEMU on TCG); `ApplyVM` answers the VM as CREATING, as the agent answers
//! a first apply before its boot is under way; `DeleteVM` answers that the VM existed;
//! `WatchVMs` sends every held VM, then `synced`, then whatever the test sends. There is no
//! console. Tests talk to it in domain types; the wire conversion is the real one.

use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::proto::{self, agent_server};
use crate::vm::{
    Accelerator, ApplyRequest, HostInfo, Hypervisor, RunState, SequencedEvent, VmEvent, VmStatus,
    wire,
};

/// What the fake agent was asked to do.
#[derive(Default)]
pub struct Calls {
    pub applied: Vec<ApplyRequest>,
    pub deleted: Vec<String>,
}

/// The open `WatchVMs` streams, to send events on (dropping them breaks the streams).
#[derive(Clone, Default)]
pub struct Watchers(Arc<Mutex<Vec<WatchSender>>>);

type WatchSender = mpsc::Sender<Result<proto::VmEvent, Status>>;

impl Watchers {
    /// Send `event` on the first open stream; false when there is none or it is closed.
    pub async fn send(&self, event: SequencedEvent) -> bool {
        let tx = self.0.lock().ok().and_then(|w| w.first().cloned());
        match tx {
            Some(tx) => tx.send(Ok((&event).into())).await.is_ok(),
            None => false,
        }
    }

    /// Close every stream.
    pub fn close(&self) {
        if let Ok(mut w) = self.0.lock() {
            w.clear();
        }
    }
}

/// The node the fake agent describes.
pub fn fake_host() -> HostInfo {
    HostInfo {
        node_name: "node-a".to_string(),
        vcpus_total: 4,
        memory_total_bytes: 8 << 30,
        vcpus_used: 0,
        memory_used_bytes: 0,
        hypervisors: vec![Hypervisor::Qemu],
        unavailable_hypervisors: Vec::new(),
        accelerator: Accelerator::Tcg,
        accelerator_detail: String::new(),
        agent_version: String::new(),
        instance_id: "fake".to_string(),
    }
}

struct FakeAgent {
    calls: Arc<Mutex<Calls>>,
    watchers: Watchers,
    /// Sent on connect, before `synced`.
    initial: Vec<VmStatus>,
}

#[tonic::async_trait]
impl agent_server::Agent for FakeAgent {
    async fn get_host(
        &self,
        _: Request<proto::GetHostRequest>,
    ) -> Result<Response<proto::Host>, Status> {
        Ok(Response::new((&fake_host()).into()))
    }

    async fn apply_vm(
        &self,
        request: Request<proto::ApplyVmRequest>,
    ) -> Result<Response<proto::Vm>, Status> {
        let (request, _) = wire::apply_request(request.into_inner())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let spec = &request.spec;
        let vm = VmStatus {
            spec_hash: request.spec_hash.clone(),
            run: request.run,
            state: RunState::Creating,
            ..VmStatus::new(spec.uid.clone(), spec.namespace.clone(), spec.name.clone())
        };
        if let Ok(mut calls) = self.calls.lock() {
            calls.applied.push(request);
        }
        Ok(Response::new((&vm).into()))
    }

    async fn delete_vm(
        &self,
        request: Request<proto::DeleteVmRequest>,
    ) -> Result<Response<proto::DeleteVmResponse>, Status> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.deleted.push(request.into_inner().uid);
        }
        Ok(Response::new(proto::DeleteVmResponse { existed: true }))
    }

    async fn get_vm(&self, _: Request<proto::GetVmRequest>) -> Result<Response<proto::Vm>, Status> {
        Err(Status::not_found("no such VM"))
    }

    async fn list_v_ms(
        &self,
        _: Request<proto::ListVMsRequest>,
    ) -> Result<Response<proto::ListVMsResponse>, Status> {
        Ok(Response::new(proto::ListVMsResponse::default()))
    }

    type WatchVMsStream = ReceiverStream<Result<proto::VmEvent, Status>>;

    async fn watch_v_ms(
        &self,
        _: Request<proto::WatchVMsRequest>,
    ) -> Result<Response<Self::WatchVMsStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        for vm in &self.initial {
            let event = SequencedEvent {
                sequence: 0,
                event: VmEvent::Changed(Box::new(vm.clone())),
            };
            tx.send(Ok((&event).into()))
                .await
                .map_err(|_| Status::internal("closed"))?;
        }
        let synced = proto::VmEvent {
            sequence: 1,
            event: Some(proto::vm_event::Event::Synced(true)),
        };
        tx.send(Ok(synced))
            .await
            .map_err(|_| Status::internal("closed"))?;
        if let Ok(mut w) = self.watchers.0.lock() {
            w.push(tx);
        }
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type ConsoleStream = ReceiverStream<Result<proto::ConsoleChunk, Status>>;

    async fn console(
        &self,
        _: Request<proto::ConsoleRequest>,
    ) -> Result<Response<Self::ConsoleStream>, Status> {
        Err(Status::unimplemented("no console in the fake"))
    }
}

/// Serve a fake agent at `path` holding `initial` VMs, until `shutdown`.
pub fn serve_fake_agent(
    path: &Path,
    initial: Vec<VmStatus>,
    shutdown: CancellationToken,
) -> (Arc<Mutex<Calls>>, Watchers) {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
    let calls = Arc::new(Mutex::new(Calls::default()));
    let watchers = Watchers::default();
    let agent = FakeAgent {
        calls: calls.clone(),
        watchers: watchers.clone(),
        initial,
    };
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(agent_server::AgentServer::new(agent))
            .serve_with_incoming_shutdown(
                UnixListenerStream::new(listener),
                shutdown.cancelled_owned(),
            )
            .await;
    });
    (calls, watchers)
}
