//! What the two HTTP-API VMMs (Firecracker, Cloud Hypervisor) share: a minimal HTTP/1.1
//! client over the VMM's unix socket with a deadline on every request, and the process
//! plumbing around it (spawn in its own process group, wait for the socket, pid-reuse-safe
//! liveness and kill).
//!
//! Backends turn a [`VmConfig`](super::VmConfig) into [`ApiRequest`]s with pure functions; this
//! module is the only place that touches the socket, so the request plans can be checked
//! against the official specs without any I/O.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use super::{VmConfig, VmmError, VmmHandle, VmmState};
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

    /// How errors name this call: `PUT /machine-config`.
    pub fn operation(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// A VMM's answer: status and raw body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Bytes,
}

impl ApiResponse {
    /// The body as JSON, or a `Protocol` error naming `operation`.
    pub fn json(&self, operation: &str) -> Result<Value, VmmError> {
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
pub async fn send(
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
pub async fn call(
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
pub fn fault_text(body: &[u8]) -> String {
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

/// Find a VMM binary: a path with a `/` must exist as an executable file; a bare name is
/// looked up in `PATH`.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf, VmmError> {
    let not_found = || VmmError::BinaryNotFound {
        path: binary.to_path_buf(),
    };
    if binary.as_os_str().is_empty() {
        return Err(not_found());
    }
    if binary.components().count() > 1 || binary.is_absolute() {
        return is_executable(binary)
            .then(|| binary.to_path_buf())
            .ok_or_else(not_found);
    }
    let path_var = std::env::var_os("PATH").ok_or_else(not_found)?;
    std::env::split_paths(&path_var)
        .map(|dir| dir.join(binary))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(not_found)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Where a spawned VMM's output goes.
pub struct VmmOutput<'a> {
    /// The VMM's stdout (Firecracker writes the guest serial console there).
    pub stdout: &'a Path,
    /// The VMM's own log (`<state_dir>/vmm.log`).
    pub stderr: &'a Path,
}

/// Start a VMM in a process group of its own, so signals aimed at the agent do not reach it
/// and it can outlive an agent restart.
pub fn spawn_vmm(
    binary: &Path,
    args: &[String],
    output: VmmOutput<'_>,
) -> Result<tokio::process::Child, VmmError> {
    let spawn_error = |source| VmmError::Spawn {
        binary: binary.to_path_buf(),
        source,
    };
    let open_append = |path: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let stdout = open_append(output.stdout).map_err(spawn_error)?;
    let stderr = open_append(output.stderr).map_err(spawn_error)?;
    tokio::process::Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .map_err(spawn_error)
}

/// Wait until the VMM accepts connections on `socket`. A VMM that exits first is reported
/// with the end of its log, since that is where it says why.
pub async fn wait_for_socket(
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
                detail: format!("{status}; vmm.log: {}", log_tail(vmm_log, 2048)),
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

/// The last `max_bytes` of a log file, lossily decoded; empty when it cannot be read.
pub fn log_tail(path: &Path, max_bytes: usize) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let start = bytes.len().saturating_sub(max_bytes);
    String::from_utf8_lossy(&bytes[start..]).trim().to_owned()
}

/// The start time of a process, `None` when it is gone.
pub fn process_start_time(pid: u32) -> Option<u64> {
    crate::agent::host::proc_stat(pid).map(|stat| stat.start_time_ticks)
}

/// Whether the process behind `handle` is still our VMM (same pid and start time).
pub fn vmm_alive(handle: &VmmHandle) -> bool {
    process_start_time(handle.pid) == Some(handle.start_time_ticks)
}

/// SIGKILL the VMM's process group. A VMM that is already gone (or whose pid now belongs to
/// another process) is not an error: there is nothing left to end.
pub fn kill_vmm(handle: &VmmHandle) -> Result<(), VmmError> {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if !vmm_alive(handle) {
        return Ok(());
    }
    let pid = i32::try_from(handle.pid).map_err(|_| VmmError::Protocol {
        operation: "kill".to_owned(),
        detail: format!("pid {} out of range", handle.pid),
    })?;
    match killpg(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(errno) => Err(VmmError::Io {
            operation: "kill".to_owned(),
            source: std::io::Error::from(errno),
        }),
    }
}

/// The handle of a VMM just spawned.
pub fn handle_for(
    child: &tokio::process::Child,
    api_socket: &Path,
    console_log: &Path,
) -> Result<VmmHandle, VmmError> {
    let exited = |detail: &str| VmmError::Exited {
        operation: "spawn".to_owned(),
        detail: detail.to_owned(),
    };
    let pid = child
        .id()
        .ok_or_else(|| exited("the process ended at once"))?;
    let start_time_ticks =
        process_start_time(pid).ok_or_else(|| exited("the process ended at once"))?;
    Ok(VmmHandle {
        pid,
        start_time_ticks,
        api_socket: api_socket.to_path_buf(),
        console_log: console_log.to_path_buf(),
    })
}

/// Everything [`launch`] needs to bring an HTTP-API VMM up to "configured, not booted".
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub args: Vec<String>,
    pub output: VmmOutput<'a>,
    pub api_socket: &'a Path,
    pub console_log: &'a Path,
    /// The pre-boot requests, in order.
    pub requests: &'a [ApiRequest],
    pub socket_timeout: Duration,
    pub api_timeout: Duration,
}

/// The create path both HTTP-API VMMs share: refuse what needs KVM without it, plan the
/// pre-boot requests, then launch (`spawn_args` and where the guest console goes are the
/// backend's own).
pub async fn create_vm(
    hypervisor: Hypervisor,
    config: &VmConfig,
    plan: impl FnOnce(&VmConfig) -> Result<Vec<ApiRequest>, VmmError>,
    spawn_args: Vec<String>,
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
    let binary = resolve_binary(&config.binary)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|source| VmmError::Io {
        operation: "creating the state directory".to_owned(),
        source,
    })?;
    let vmm_log = config.state_dir.join("vmm.log");
    launch(Launch {
        binary: &binary,
        args: spawn_args,
        output: VmmOutput {
            stdout: if console_on_stdout {
                &config.console_log
            } else {
                &vmm_log
            },
            stderr: &vmm_log,
        },
        api_socket: &config.api_socket,
        console_log: &config.console_log,
        requests: &requests,
        socket_timeout,
        api_timeout,
    })
    .await
}

/// Send a request whose answer carries nothing the caller needs (start, stop).
pub async fn send_action(
    handle: &VmmHandle,
    request: &ApiRequest,
    timeout: Duration,
) -> Result<(), VmmError> {
    call(&handle.api_socket, request, timeout).await.map(|_| ())
}

/// Ask the VMM for its state; a VMM process that is gone is `Exited` without asking.
pub async fn query_state(
    handle: &VmmHandle,
    request: &ApiRequest,
    timeout: Duration,
    parse: fn(&Value) -> Result<VmmState, String>,
) -> Result<VmmState, VmmError> {
    if !vmm_alive(handle) {
        return Ok(VmmState::Exited);
    }
    let operation = request.operation();
    let response = call(&handle.api_socket, request, timeout).await?;
    parse(&response.json(&operation)?).map_err(|detail| VmmError::Protocol { operation, detail })
}

/// Spawn the VMM, wait for its socket, send the pre-boot requests. On any failure the VMM is
/// killed and reaped, so a failed create leaves no process behind.
pub async fn launch(launch: Launch<'_>) -> Result<super::Spawned, VmmError> {
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
    let vmm_log = launch.output.stderr.to_path_buf();
    let mut child = spawn_vmm(launch.binary, &launch.args, launch.output)?;
    let result = async {
        let handle = handle_for(&child, launch.api_socket, launch.console_log)?;
        wait_for_socket(
            launch.api_socket,
            &mut child,
            launch.socket_timeout,
            &vmm_log,
        )
        .await?;
        configure(launch.api_socket, launch.requests, launch.api_timeout).await?;
        Ok(handle)
    }
    .await;
    match result {
        Ok(handle) => Ok(super::Spawned { handle, child }),
        Err(error) => Err(abandon(child, error, &vmm_log).await),
    }
}

/// Send planned requests in order, stopping at the first failure.
pub async fn configure(
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
                detail: format!("vmm.log: {}", log_tail(vmm_log, 2048)),
            }
        }
        other => other,
    }
}

/// How a VMM run ended, from its exit status (known only for our own child) and the end of
/// the guest console. Both HTTP-API VMMs exit 0 when the guest powers off or resets.
pub fn classify_exit(
    vmm: &str,
    status: Option<std::process::ExitStatus>,
    console_tail: &str,
) -> super::GuestExit {
    use std::os::unix::process::ExitStatusExt;
    let panicked = console_tail.contains("Kernel panic");
    let shut_down = [
        "reboot: Power down",
        "reboot: System halted",
        "reboot: Restarting system",
    ]
    .iter()
    .any(|marker| console_tail.contains(marker));
    let exit = |success, reason, message: String, code| super::GuestExit {
        success,
        reason,
        message,
        exit_code: code,
    };
    let Some(status) = status else {
        return if panicked {
            exit(
                false,
                "GuestPanic",
                "the guest kernel panicked".to_owned(),
                None,
            )
        } else if shut_down {
            exit(
                true,
                "GuestShutdown",
                "the guest shut down".to_owned(),
                None,
            )
        } else {
            exit(
                false,
                "VmmExitedWhileAgentDown",
                format!("{vmm} exited while the agent was not watching"),
                None,
            )
        };
    };
    let code = status.code();
    match (code, status.signal()) {
        (_, Some(signal)) if signal == nix::sys::signal::Signal::SIGKILL as i32 => exit(
            false,
            "VmmKilled",
            format!("{vmm} was killed (SIGKILL)"),
            None,
        ),
        (_, Some(signal)) => exit(
            false,
            "VmmCrashed",
            format!("{vmm} died from signal {signal}"),
            None,
        ),
        (Some(0), _) if panicked => exit(
            false,
            "GuestPanic",
            "the guest kernel panicked".to_owned(),
            code,
        ),
        (Some(0), _) => exit(
            true,
            "GuestShutdown",
            "the guest shut down".to_owned(),
            code,
        ),
        (Some(c), _) => exit(
            false,
            "VmmCrashed",
            format!("{vmm} exited with code {c}"),
            code,
        ),
        (None, None) => exit(false, "VmmCrashed", format!("{vmm} ended: {status}"), None),
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
    fn stat_start_time_survives_odd_command_names() {
        let stat = "4242 (fire cracker) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 \
                    3 0 987654 1000000 200 18446744073709551615";
        let parse = |s| crate::agent::host::parse_proc_stat(s).map(|s| s.start_time_ticks);
        assert_eq!(parse(stat), Some(987654));
        assert_eq!(parse("garbage"), None);
    }

    #[test]
    fn own_process_has_a_start_time() {
        let ours = process_start_time(std::process::id());
        assert!(ours.is_some_and(|t| t > 0));
    }

    #[test]
    fn resolve_binary_requires_an_executable() {
        assert!(matches!(
            resolve_binary(Path::new("/nonexistent/firecracker")),
            Err(VmmError::BinaryNotFound { .. })
        ));
        assert!(matches!(
            resolve_binary(Path::new("ignis-no-such-vmm-binary")),
            Err(VmmError::BinaryNotFound { .. })
        ));
        assert!(matches!(
            resolve_binary(Path::new("")),
            Err(VmmError::BinaryNotFound { .. })
        ));
        // `sh` is on PATH on every machine this runs on.
        assert!(resolve_binary(Path::new("sh")).is_ok());
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("not-executable");
        std::fs::write(&plain, "").expect("write");
        assert!(resolve_binary(&plain).is_err());
    }

    #[test]
    fn exits_are_classified_by_status_and_console() {
        use std::os::unix::process::ExitStatusExt;
        use std::process::ExitStatus;
        let clean = classify_exit(
            "firecracker",
            Some(ExitStatus::from_raw(0)),
            "reboot: Restarting system",
        );
        assert_eq!((clean.success, clean.reason), (true, "GuestShutdown"));
        let panic = classify_exit(
            "firecracker",
            Some(ExitStatus::from_raw(0)),
            "Kernel panic - not syncing: Attempted to kill init!",
        );
        assert_eq!((panic.success, panic.reason), (false, "GuestPanic"));
        // Raw wait status: exit code in the high byte.
        let crashed = classify_exit("cloud-hypervisor", Some(ExitStatus::from_raw(1 << 8)), "");
        assert_eq!((crashed.reason, crashed.exit_code), ("VmmCrashed", Some(1)));
        assert!(
            crashed
                .message
                .contains("cloud-hypervisor exited with code 1")
        );
        let killed = classify_exit("firecracker", Some(ExitStatus::from_raw(9)), "");
        assert_eq!(killed.reason, "VmmKilled");
        let segv = classify_exit("firecracker", Some(ExitStatus::from_raw(11)), "");
        assert_eq!(segv.reason, "VmmCrashed");
        let unknown = classify_exit("firecracker", None, "booting...");
        assert_eq!(unknown.reason, "VmmExitedWhileAgentDown");
        let adopted_clean = classify_exit("firecracker", None, "reboot: Power down");
        assert_eq!(adopted_clean.reason, "GuestShutdown");
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
