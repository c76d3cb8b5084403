//! What the two HTTP-API VMMs (Firecracker, Cloud Hypervisor) share: a minimal HTTP/1.1
//! client over the VMM's unix socket with a deadline on every request, and the create path
//! around it (spawn through [`super::process`], wait for the socket, send the pre-boot
//! configuration, leave nothing behind on failure).
//!
//! Backends turn a [`VmConfig`](super::VmConfig) into [`ApiRequest`]s with pure functions; this
//! module is the only place that touches the socket, so the request plans can be checked
//! against the official specs without any I/O.

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

pub(crate) mod snapshot;

use super::process::{self, Output};
use super::{ExitQuirks, SnapshotFiles, VmConfig, VmmError, VmmHandle, VmmState};
use crate::api::{Accelerator, Hypervisor};

/// One call to a VMM's HTTP API, as planned by a backend.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiRequest {
    pub method: Method,
    /// The request target, e.g. `/drives/rootfs` or `/api/v1/vm.boot`.
    pub path: String,
    /// The JSON body; `None` for calls the spec defines without one.
    pub body: Option<Value>,
}

impl ApiRequest {
    pub fn get(path: impl Into<String>) -> Self {
        ApiRequest {
            method: Method::GET,
            path: path.into(),
            body: None,
        }
    }

    pub fn put(path: impl Into<String>, body: Option<Value>) -> Self {
        ApiRequest {
            method: Method::PUT,
            path: path.into(),
            body,
        }
    }

    pub fn patch(path: impl Into<String>, body: Value) -> Self {
        ApiRequest {
            method: Method::PATCH,
            path: path.into(),
            body: Some(body),
        }
    }

    /// How errors name this call: `PUT /machine-config`.
    pub fn operation(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A VMM's answer: status and raw body.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ApiResponse {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
}

impl ApiResponse {
    /// The body as JSON, or a `Protocol` error naming `operation`.
    pub(crate) fn json(&self, operation: &str) -> Result<Value, VmmError> {
        serde_json::from_slice(&self.body).map_err(|e| VmmError::Protocol {
            operation: operation.to_owned(),
            detail: format!("response is not JSON: {e}"),
        })
    }
}

/// Aborts the connection task when the request is done or abandoned (timeout), so no task
/// outlives its request.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Send one request on a fresh connection and read the whole response, all within `timeout`.
/// Any HTTP status is a success here; see [`call`] for the status check.
pub(crate) async fn send(
    socket: &Path,
    request: &ApiRequest,
    timeout: Duration,
) -> Result<ApiResponse, VmmError> {
    let operation = request.operation();
    match tokio::time::timeout(timeout, exchange(socket, request, &operation)).await {
        Ok(result) => result,
        Err(_) => Err(VmmError::ApiTimeout { operation, timeout }),
    }
}

async fn exchange(
    socket: &Path,
    request: &ApiRequest,
    operation: &str,
) -> Result<ApiResponse, VmmError> {
    let protocol = |detail: String| VmmError::Protocol {
        operation: operation.to_owned(),
        detail,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| VmmError::Io {
            operation: operation.to_owned(),
            source,
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| protocol(format!("HTTP handshake: {e}")))?;
    let _connection = AbortOnDrop(tokio::spawn(async move {
        // The connection's own error surfaces through `send_request` below.
        let _ = connection.await;
    }));

    let body = match &request.body {
        Some(value) => Bytes::from(
            serde_json::to_vec(value).map_err(|e| protocol(format!("encoding body: {e}")))?,
        ),
        None => Bytes::new(),
    };
    let mut builder = Request::builder()
        .method(request.method.clone())
        .uri(request.path.as_str())
        .header(HOST, "localhost")
        .header(ACCEPT, "application/json");
    if request.body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    let http_request = builder
        .body(Full::new(body))
        .map_err(|e| protocol(format!("building request: {e}")))?;
    let response = sender
        .send_request(http_request)
        .await
        .map_err(|e| protocol(format!("no response: {}", crate::error::chain(&e))))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| protocol(format!("reading response body: {e}")))?
        .to_bytes();
    Ok(ApiResponse { status, body })
}

/// Send a request and require a 2xx answer; anything else becomes `ApiFault` carrying the
/// VMM's own message.
pub(crate) async fn call(
    socket: &Path,
    request: &ApiRequest,
    timeout: Duration,
) -> Result<ApiResponse, VmmError> {
    let response = send(socket, request, timeout).await?;
    if (200..300).contains(&response.status) {
        Ok(response)
    } else {
        Err(VmmError::ApiFault {
            operation: request.operation(),
            status: response.status,
            fault: fault_text(&response.body),
        })
    }
}

/// The human message in a VMM error body. Firecracker answers `{"fault_message": ...}`;
/// Cloud Hypervisor answers a JSON list of its error chain (older releases: plain text).
pub(crate) fn fault_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body).trim().to_owned();
    let message = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => ["fault_message", "error", "message"]
            .iter()
            .find_map(|key| map.get(*key).and_then(Value::as_str).map(str::to_owned)),
        Ok(Value::Array(items)) => {
            let parts: Vec<&str> = items.iter().filter_map(Value::as_str).collect();
            (!parts.is_empty()).then(|| parts.join(": "))
        }
        Ok(Value::String(s)) => Some(s),
        _ => None,
    };
    match message {
        Some(m) if !m.trim().is_empty() => m.trim().to_owned(),
        _ if text.is_empty() => "(no error message in the response)".to_owned(),
        _ => text,
    }
}

/// Wait until the VMM accepts connections on `socket`. A VMM that exits first is reported
/// with the end of its log, since that is where it says why.
pub(crate) async fn wait_for_socket(
    socket: &Path,
    child: &mut tokio::process::Child,
    timeout: Duration,
    vmm_log: &Path,
) -> Result<(), VmmError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmmError::Exited {
                operation: "waiting for the API socket".to_owned(),
                detail: format!("{status}; vmm.log: {}", process::log_tail(vmm_log)),
            });
        }
        if UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(VmmError::SocketTimeout {
                path: socket.to_path_buf(),
                timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Everything [`launch`] needs to bring an HTTP-API VMM up to "configured, not booted".
pub(crate) struct Launch<'a> {
    pub(crate) binary: &'a Path,
    pub(crate) args: Vec<String>,
    /// Where the VMM's stdout goes (Firecracker writes the guest serial console there).
    pub(crate) stdout: &'a Path,
    /// The VMM's own log (`<state_dir>/vmm.log`), its stderr.
    pub(crate) vmm_log: &'a Path,
    pub(crate) api_socket: &'a Path,
    pub(crate) console_log: &'a Path,
    /// The pre-boot requests, in order.
    pub(crate) requests: &'a [ApiRequest],
    pub(crate) socket_timeout: Duration,
    pub(crate) api_timeout: Duration,
    /// Where the VMM runs (see [`process::spawn`]).
    pub(crate) confinement: Option<&'a process::Confinement>,
    /// The VMM's jail, when it runs in one (see [`process::spawn_jailed`]).
    pub(crate) jail: Option<&'a super::jailer::Jail>,
}

/// The create path both HTTP-API VMMs share: refuse what needs KVM without it, plan the
/// pre-boot requests, then launch (`spawn_args`, the jail it runs in if any, and where the
/// guest console goes are the backend's own).
pub(crate) async fn create_vm(
    hypervisor: Hypervisor,
    config: &VmConfig,
    plan: impl FnOnce(&VmConfig) -> Result<Vec<ApiRequest>, VmmError>,
    (spawn_args, jail): (Vec<String>, Option<&super::jailer::Jail>),
    console_on_stdout: bool,
    socket_timeout: Duration,
    api_timeout: Duration,
) -> Result<super::Spawned, VmmError> {
    if config.accelerator != Accelerator::Kvm {
        return Err(VmmError::UnsupportedAccelerator {
            hypervisor,
            accelerator: config.accelerator,
        });
    }
    let requests = plan(config)?;
    let binary = process::resolve_binary(&config.binary)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| VmmError::Io {
        operation: "creating the state directory".to_owned(),
        source,
    })?;
    let vmm_log = process::log_path(&config.state_dir);
    launch(Launch {
        binary: &binary,
        args: spawn_args,
        stdout: if console_on_stdout {
            &config.console_log
        } else {
            &vmm_log
        },
        vmm_log: &vmm_log,
        api_socket: &config.api_socket,
        console_log: &config.console_log,
        requests: &requests,
        socket_timeout,
        api_timeout,
        confinement: config.confinement.as_ref(),
        jail,
    })
    .await
}

/// Send a request whose answer carries nothing the caller needs (start, stop).
pub(crate) async fn send_action(
    handle: &VmmHandle,
    request: &ApiRequest,
    timeout: Duration,
) -> Result<(), VmmError> {
    call(&handle.api_socket, request, timeout).await.map(|_| ())
}

/// Ask the VMM for its state; a VMM process that is gone is `Exited` without asking.
pub(crate) async fn query_state(
    handle: &VmmHandle,
    request: &ApiRequest,
    timeout: Duration,
    parse: fn(&Value) -> Result<VmmState, String>,
) -> Result<VmmState, VmmError> {
    if !process::is_alive(handle) {
        return Ok(VmmState::Exited);
    }
    let operation = request.operation();
    let response = call(&handle.api_socket, request, timeout).await?;
    parse(&response.json(&operation)?).map_err(|detail| VmmError::Protocol { operation, detail })
}

/// Spawn the VMM, wait for its socket, send the pre-boot requests. On any failure the VMM is
/// killed and reaped, so a failed create leaves no process behind.
pub(crate) async fn launch(launch: Launch<'_>) -> Result<super::Spawned, VmmError> {
    // A socket left by an earlier run would make the VMM refuse to bind (and would let us
    // talk to nobody); the state dir belongs to this VM, so it is ours to remove.
    match std::fs::remove_file(launch.api_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(VmmError::Io {
                operation: "removing a stale API socket".to_owned(),
                source,
            });
        }
    }
    let vmm_log = launch.vmm_log;
    let mut child = process::spawn_jailed(
        launch.binary,
        &launch.args,
        Output::Append(launch.stdout),
        Output::Append(vmm_log),
        launch.confinement,
        launch.jail,
        Vec::new(),
    )?;
    let result = async {
        let handle = process::handle_for(&child, launch.api_socket, launch.console_log)?;
        wait_for_socket(
            launch.api_socket,
            &mut child,
            launch.socket_timeout,
            vmm_log,
        )
        .await?;
        configure(launch.api_socket, launch.requests, launch.api_timeout).await?;
        Ok(handle)
    }
    .await;
    match result {
        Ok(handle) => Ok(super::Spawned { handle, child }),
        Err(error) => Err(abandon(child, error, vmm_log).await),
    }
}

/// Send planned requests in order, stopping at the first failure.
pub(crate) async fn configure(
    socket: &Path,
    requests: &[ApiRequest],
    timeout: Duration,
) -> Result<(), VmmError> {
    for request in requests {
        call(socket, request, timeout).await?;
    }
    Ok(())
}

/// Kill and reap a VMM whose create failed. When the VMM had already died, its own log
/// explains the failure better than the broken connection does.
async fn abandon(mut child: tokio::process::Child, error: VmmError, vmm_log: &Path) -> VmmError {
    let died_on_its_own = matches!(child.try_wait(), Ok(Some(_)));
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    match error {
        VmmError::Io { operation, .. } | VmmError::Protocol { operation, .. }
            if died_on_its_own =>
        {
            VmmError::Exited {
                operation,
                detail: format!("vmm.log: {}", process::log_tail(vmm_log)),
            }
        }
        other => other,
    }
}

/// What one HTTP-API VMM puts on the wire, as pure functions: the rest of a backend (spawn,
/// the create path, start, stop, kill, state, how its end is told) is [`HttpBackend`]'s, the
/// same for both.
pub trait HttpApi: Send + Sync + 'static {
    const KIND: Hypervisor;
    const QUIRKS: &'static ExitQuirks;
    /// Whether the VMM writes the guest console to its stdout (Firecracker) rather than to a
    /// file it opens itself.
    const CONSOLE_ON_STDOUT: bool;
    /// How long a freshly spawned VMM may take to open its API socket.
    const SOCKET_TIMEOUT: Duration;
    fn spawn_args(config: &VmConfig) -> Vec<String>;
    /// The pre-boot requests, in order; for a config with [`VmConfig::restore`] set, only
    /// what a VMM that is to load a snapshot may be sent (nothing that configures the VM).
    fn plan_create(config: &VmConfig) -> Result<Vec<ApiRequest>, VmmError>;
    /// Boot a created guest.
    fn plan_start() -> ApiRequest;
    /// Pause the running guest.
    fn plan_pause() -> ApiRequest;
    /// Resume a paused guest, or one just loaded from a snapshot.
    fn plan_resume() -> ApiRequest;
    /// Save the paused guest into the directory `dir` (as the VMM names it).
    fn plan_snapshot(dir: &Path) -> ApiRequest;
    /// Load the snapshot in the directory `dir` (as the VMM names it), guest left paused.
    fn plan_restore(dir: &Path) -> ApiRequest;
    fn plan_stop() -> ApiRequest;
    fn plan_state() -> ApiRequest;
    fn parse_state(info: &Value) -> Result<VmmState, String>;
    /// The jail a confined VMM runs in, and the config as the VMM sees it from inside (its
    /// paths rewritten); `None` for a VMM that runs unjailed.
    fn jail(_config: &VmConfig) -> Result<Option<(super::jailer::Jail, VmConfig)>, VmmError> {
        Ok(None)
    }
}

/// A VMM driven over its HTTP API on a unix socket; KVM only.
pub struct HttpBackend<A> {
    socket_timeout: Duration,
    api_timeout: Duration,
    api: std::marker::PhantomData<A>,
}

impl<A> std::fmt::Debug for HttpBackend<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpBackend")
            .field("socket_timeout", &self.socket_timeout)
            .field("api_timeout", &self.api_timeout)
            .finish()
    }
}

impl<A: HttpApi> HttpBackend<A> {
    /// A backend for the VMM binary at `binary` (a path, or a name looked up in `PATH`).
    /// Fails with `BinaryNotFound` when there is no such executable.
    pub fn new(binary: impl AsRef<Path>) -> Result<Self, VmmError> {
        process::resolve_binary(binary.as_ref())?;
        Ok(Self::with_default_timeouts())
    }

    fn with_default_timeouts() -> Self {
        HttpBackend {
            socket_timeout: A::SOCKET_TIMEOUT,
            api_timeout: super::API_TIMEOUT,
            api: std::marker::PhantomData,
        }
    }

    /// Override the deadlines (the socket wait, and each API call).
    pub fn with_timeouts(mut self, socket_timeout: Duration, api_timeout: Duration) -> Self {
        self.socket_timeout = socket_timeout;
        self.api_timeout = api_timeout;
        self
    }
}

#[async_trait::async_trait]
impl<A: HttpApi> super::VmmBackend for HttpBackend<A> {
    fn kind(&self) -> Hypervisor {
        A::KIND
    }

    fn supports(&self, accelerator: Accelerator) -> bool {
        accelerator == Accelerator::Kvm
    }

    async fn create(&self, config: &VmConfig) -> Result<super::Spawned, VmmError> {
        let jailed = A::jail(config)?;
        let (seen, jail) = match &jailed {
            Some((jail, seen)) => (seen, Some(jail)),
            None => (config, None),
        };
        create_vm(
            A::KIND,
            config,
            |_| A::plan_create(seen),
            (A::spawn_args(seen), jail),
            A::CONSOLE_ON_STDOUT,
            self.socket_timeout,
            self.api_timeout,
        )
        .await
    }

    /// Boot, or resume: the VMM itself says which. A VMM that loaded a snapshot holds a
    /// paused guest (Firecracker's `Paused`, Cloud Hypervisor's `Paused`), one that was
    /// configured for a boot holds a created one; asking costs one local call and needs no
    /// marker that an agent restart could lose.
    async fn start(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        let request = match self.state(handle).await? {
            VmmState::Paused => A::plan_resume(),
            _ => A::plan_start(),
        };
        send_action(handle, &request, self.api_timeout).await
    }

    /// Pause (unless paused already), then save into a staging directory and move the files
    /// into `snapshot` (`http/snapshot.rs`). The VMM stays, paused.
    async fn snapshot(&self, handle: &VmmHandle, files: &SnapshotFiles) -> Result<(), VmmError> {
        match self.state(handle).await? {
            VmmState::Running => send_action(handle, &A::plan_pause(), self.api_timeout).await?,
            VmmState::Exited => {
                return Err(VmmError::Exited {
                    operation: "snapshot".to_owned(),
                    detail: format!(
                        "vmm.log: {}",
                        process::log_tail(&process::log_path_of(handle))
                    ),
                });
            }
            VmmState::Paused | VmmState::Created => {}
        }
        let staging = snapshot::Staging::of(handle, files);
        staging.prepare()?;
        let saved = call(
            &handle.api_socket,
            &A::plan_snapshot(&staging.seen),
            super::SNAPSHOT_TIMEOUT,
        )
        .await;
        if let Err(error) = saved {
            staging.discard();
            return Err(error);
        }
        staging.collect(files).map(drop)
    }

    /// Load `files` into a VMM created to restore them. Whatever the VMM refuses (an HTTP
    /// error, or dying on it) is [`VmmError::SnapshotUnrestorable`] with its own words.
    async fn restore(&self, handle: &VmmHandle, files: &SnapshotFiles) -> Result<(), VmmError> {
        let request = A::plan_restore(&snapshot::load_dir(handle, files));
        match call(&handle.api_socket, &request, super::SNAPSHOT_TIMEOUT).await {
            Ok(_) => Ok(()),
            Err(VmmError::ApiFault { status, fault, .. }) => Err(VmmError::SnapshotUnrestorable {
                detail: format!("{} refused it (HTTP {status}): {fault}", A::KIND),
            }),
            Err(VmmError::Io { .. } | VmmError::Protocol { .. }) if !process::is_alive(handle) => {
                Err(VmmError::SnapshotUnrestorable {
                    detail: format!(
                        "{} exited loading it; vmm.log: {}",
                        A::KIND,
                        process::log_tail(&process::log_path_of(handle))
                    ),
                })
            }
            Err(other) => Err(other),
        }
    }

    async fn stop(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        send_action(handle, &A::plan_stop(), self.api_timeout).await
    }

    async fn kill(&self, handle: &VmmHandle) -> Result<(), VmmError> {
        process::kill(handle).await
    }

    async fn state(&self, handle: &VmmHandle) -> Result<VmmState, VmmError> {
        query_state(handle, &A::plan_state(), self.api_timeout, A::parse_state).await
    }

    fn exit_quirks(&self) -> &'static ExitQuirks {
        A::QUIRKS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_text_reads_both_vmms_error_bodies() {
        assert_eq!(
            fault_text(br#"{"fault_message":"The kernel file cannot be opened"}"#),
            "The kernel file cannot be opened"
        );
        assert_eq!(
            fault_text(br#"["Error from API","The VM could not be created","Invalid disk"]"#),
            "Error from API: The VM could not be created: Invalid disk"
        );
        assert_eq!(fault_text(b"VmNotCreated\n"), "VmNotCreated");
        assert_eq!(fault_text(br#""VmNotBooted""#), "VmNotBooted");
        assert_eq!(fault_text(b""), "(no error message in the response)");
        assert_eq!(fault_text(br#"{"other":1}"#), r#"{"other":1}"#);
    }

    #[test]
    fn operation_names_method_and_path() {
        assert_eq!(
            ApiRequest::put("/actions", None).operation(),
            "PUT /actions"
        );
        assert_eq!(ApiRequest::get("/").operation(), "GET /");
    }
}
