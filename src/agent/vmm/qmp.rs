//! A small QMP (QEMU Machine Protocol) client over a unix socket: the greeting and capability
//! negotiation, commands with a deadline, and the asynchronous events that arrive in between
//! (kept so a caller can see e.g. `SHUTDOWN` with its `reason`).
//!
//! Targets the QMP of QEMU 7.2 (`docs/interop/qmp-spec.txt`): one JSON object per line.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, timeout_at};

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct QmpEvent {
    pub(crate) event: String,
    pub(crate) data: Value,
}

/// One message from QEMU.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum QmpMessage {
    Greeting(Value),
    Return {
        id: Option<Value>,
        value: Value,
    },
    Error {
        id: Option<Value>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

/// Errors of the QMP client.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub(crate) enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    #[strum(serialize = "QmpConnectFailed")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {operation} did not answer within {timeout:?}")]
    #[strum(serialize = "QmpTimeout")]
    Timeout {
        operation: String,
        timeout: Duration,
    },
    #[error("QMP I/O during {operation}")]
    #[strum(serialize = "QmpIoError")]
    Io {
        operation: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP {operation}: QEMU closed the connection")]
    #[strum(serialize = "QmpIoError")]
    Closed { operation: String },
    #[error("QMP {operation}: unexpected message: {detail}")]
    #[strum(serialize = "QmpProtocolError")]
    Protocol { operation: String, detail: String },
    #[error("QMP {operation} failed: {class}: {desc}")]
    #[strum(serialize = "QmpCommandFailed")]
    Command {
        operation: String,
        class: String,
        desc: String,
    },
}

/// Parse one QMP line.
pub(crate) fn parse_message(line: &str) -> Result<QmpMessage, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| format!("not an object: {line}"))?;
    if let Some(greeting) = obj.get("QMP") {
        return Ok(QmpMessage::Greeting(greeting.clone()));
    }
    let id = obj.get("id").cloned();
    if let Some(value) = obj.get("return") {
        return Ok(QmpMessage::Return {
            id,
            value: value.clone(),
        });
    }
    if let Some(err) = obj.get("error") {
        let field = |k: &str| {
            err.get(k)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        return Ok(QmpMessage::Error {
            id,
            class: field("class"),
            desc: field("desc"),
        });
    }
    if let Some(event) = obj.get("event").and_then(Value::as_str) {
        return Ok(QmpMessage::Event(QmpEvent {
            event: event.to_string(),
            data: obj.get("data").cloned().unwrap_or(Value::Null),
        }));
    }
    Err(format!("unknown message: {line}"))
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub(crate) struct QmpClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: Vec<QmpEvent>,
    next_id: u64,
}

impl QmpClient {
    /// Connect, read the greeting and leave negotiation mode, all within `timeout`.
    pub(crate) async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = timeout_at(deadline, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                operation: "connect".into(),
                timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut client = QmpClient {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
            next_id: 0,
        };
        match client.read_message("greeting", deadline, timeout).await? {
            QmpMessage::Greeting(_) => {}
            other => {
                return Err(QmpError::Protocol {
                    operation: "greeting".into(),
                    detail: format!("{other:?}"),
                });
            }
        }
        client
            .execute_until("qmp_capabilities", None, None, deadline, timeout)
            .await?;
        Ok(client)
    }

    /// Run one command and return its `return` value.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_until(command, arguments, None, Instant::now() + timeout, timeout)
            .await
    }

    /// Run one command with `fd` passed beside it (SCM_RIGHTS), as `getfd` and `add-fd` take
    /// theirs: QEMU gets a file it could never open itself from its sandbox.
    pub(crate) async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.execute_until(
            command,
            arguments,
            Some(fd),
            Instant::now() + timeout,
            timeout,
        )
        .await
    }

    async fn execute_until(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = json!(format!("ignis-{}", self.next_id));
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = request.to_string();
        line.push('\n');
        let sent = match fd {
            Some(fd) => {
                self.send_with_fd(command, line.as_bytes(), fd, deadline, timeout)
                    .await?
            }
            None => 0,
        };
        timeout_at(deadline, self.writer.write_all(&line.as_bytes()[sent..]))
            .await
            .map_err(|_| QmpError::Timeout {
                operation: command.into(),
                timeout,
            })?
            .map_err(|source| QmpError::Io {
                operation: command.into(),
                source,
            })?;
        loop {
            match self.read_message(command, deadline, timeout).await? {
                QmpMessage::Event(e) => self.events.push(e),
                QmpMessage::Return { id: rid, value } if rid.as_ref() == Some(&id) => {
                    return Ok(value);
                }
                QmpMessage::Error {
                    id: rid,
                    class,
                    desc,
                } if rid.as_ref() == Some(&id) => {
                    return Err(QmpError::Command {
                        operation: command.into(),
                        class,
                        desc,
                    });
                }
                // Answers to someone else's id cannot happen on our own connection; ignore.
                _ => {}
            }
        }
    }

    /// Send the start of `bytes` with `fd` attached; returns how many bytes went (the rest is
    /// written as usual: the descriptor travels with the first byte).
    async fn send_with_fd(
        &mut self,
        command: &str,
        bytes: &[u8],
        fd: BorrowedFd<'_>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<usize, QmpError> {
        let stream: &UnixStream = self.writer.as_ref();
        let io = |source| QmpError::Io {
            operation: command.into(),
            source,
        };
        loop {
            timeout_at(deadline, stream.writable())
                .await
                .map_err(|_| QmpError::Timeout {
                    operation: command.into(),
                    timeout,
                })?
                .map_err(io)?;
            let fds = [fd.as_raw_fd()];
            let sent = stream.try_io(Interest::WRITABLE, || {
                nix::sys::socket::sendmsg::<()>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &[nix::sys::socket::ControlMessage::ScmRights(&fds)],
                    nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(io(e)),
            }
        }
    }

    /// The events received so far (while waiting for command answers), oldest first.
    #[cfg(test)]
    pub(crate) fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    async fn read_message(
        &mut self,
        operation: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<QmpMessage, QmpError> {
        let mut line = String::new();
        let n = timeout_at(deadline, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout {
                operation: operation.into(),
                timeout,
            })?
            .map_err(|source| QmpError::Io {
                operation: operation.into(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                operation: operation.into(),
            });
        }
        parse_message(line.trim()).map_err(|detail| QmpError::Protocol {
            operation: operation.into(),
            detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_message_kind() {
        assert!(matches!(
            parse_message(r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#),
            Ok(QmpMessage::Greeting(_))
        ));
        assert_eq!(
            parse_message(r#"{"return": {"status": "running"}, "id": "ignis-1"}"#),
            Ok(QmpMessage::Return {
                id: Some(json!("ignis-1")),
                value: json!({"status": "running"})
            })
        );
        assert_eq!(
            parse_message(
                r#"{"id": "ignis-2", "error": {"class": "CommandNotFound", "desc": "nope"}}"#
            ),
            Ok(QmpMessage::Error {
                id: Some(json!("ignis-2")),
                class: "CommandNotFound".into(),
                desc: "nope".into()
            })
        );
        assert_eq!(
            parse_message(
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#
            ),
            Ok(QmpMessage::Event(QmpEvent {
                event: "SHUTDOWN".into(),
                data: json!({"guest": true, "reason": "guest-shutdown"})
            }))
        );
        assert!(parse_message("[]").is_err());
        assert!(parse_message("{").is_err());
    }

    /// A scripted QMP peer: the client must negotiate, skip events while waiting for its
    /// answer, and keep those events.
    #[tokio::test]
    async fn negotiates_executes_and_keeps_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let mut line = String::new();
            r.read_line(&mut line).await.expect("caps");
            let caps: Value = serde_json::from_str(&line).expect("json");
            assert_eq!(caps["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes())
                .await
                .expect("caps answer");
            line.clear();
            r.read_line(&mut line).await.expect("cmd");
            let cmd: Value = serde_json::from_str(&line).expect("json");
            assert_eq!(cmd["execute"], "query-status");
            w.write_all(b"{\"event\": \"RESUME\", \"data\": {}}\n")
                .await
                .expect("event");
            w.write_all(
                format!(
                    "{{\"return\": {{\"status\": \"running\"}}, \"id\": {}}}\n",
                    cmd["id"]
                )
                .as_bytes(),
            )
            .await
            .expect("answer");
            // Never answer the next command: the client must time out, not hang.
            line.clear();
            let _ = r.read_line(&mut line).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut c = QmpClient::connect(&path, Duration::from_secs(2))
            .await
            .expect("connect");
        let v = c
            .execute("query-status", None, Duration::from_secs(2))
            .await
            .expect("query-status");
        assert_eq!(v["status"], "running");
        assert_eq!(c.take_events()[0].event, "RESUME");
        let err = c
            .execute("cont", None, Duration::from_millis(200))
            .await
            .expect_err("no answer");
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        server.abort();
    }
}
