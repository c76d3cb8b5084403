//! QEMU's half of suspend and resume: the guest's memory and device state go through QEMU's
//! migration stream into one file of the VM's snapshot directory, and come back with
//! `-incoming defer` and `migrate-incoming`. The agent opens the file and hands QEMU the
//! descriptor over QMP (`getfd`), so a sandboxed QEMU (`-sandbox on,spawn=deny`, no path of
//! the node) can still write and read it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::qmp::QmpClient;
use super::{SNAPSHOT_TIMEOUT, SnapshotFiles, VmmError, VmmHandle, process};

/// The migration stream's file in the snapshot directory.
const STREAM_FILE: &str = "qemu.vmstate";
/// The name QEMU keeps the handed descriptor under.
const FD_NAME: &str = "ignis-snapshot";
/// How often a running migration is asked how far it is.
const POLL: Duration = Duration::from_millis(10);

/// The stream file of a snapshot.
pub(crate) fn stream_path(snapshot: &SnapshotFiles) -> PathBuf {
    snapshot.dir.join(STREAM_FILE)
}

/// Pause the guest and save it: `stop`, hand over the file, `migrate fd:`, wait for
/// `completed`. The guest is paused first so the stream is written in one pass (a live
/// migration of a guest that keeps writing memory takes longer and saves the same state).
pub(crate) async fn save(handle: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let file = create_stream(snapshot)?;
    let mut qmp = connect(handle).await?;
    call(&mut qmp, "stop", None, deadline).await?;
    hand_over(&mut qmp, &file, deadline).await?;
    call(
        &mut qmp,
        "migrate",
        Some(json!({ "uri": format!("fd:{FD_NAME}") })),
        deadline,
    )
    .await?;
    match wait_for_migration(&mut qmp, deadline).await? {
        Migration::Completed => Ok(()),
        Migration::Failed(detail) => Err(VmmError::Protocol {
            operation: "snapshot".into(),
            detail: format!("QEMU could not save the guest: {detail}"),
        }),
    }
}

/// Load the stream into a QEMU started with `-incoming defer`. The guest stays paused (QEMU
/// runs with `-S`) until `cont`. A stream QEMU refuses (another QEMU version or machine, a
/// damaged file) makes QEMU fail the migration or exit: both are
/// [`VmmError::SnapshotUnrestorable`], with QEMU's own words.
pub(crate) async fn load(handle: &VmmHandle, snapshot: &SnapshotFiles) -> Result<(), VmmError> {
    let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
    let path = stream_path(snapshot);
    let file = File::open(&path).map_err(|e| VmmError::SnapshotUnrestorable {
        detail: format!("cannot open {}: {e}", path.display()),
    })?;
    let unrestorable = |e: VmmError| match e {
        VmmError::Exited { .. } | VmmError::Protocol { .. } => VmmError::SnapshotUnrestorable {
            detail: format!("QEMU refused it: {}", qemu_said(handle)),
        },
        other => other,
    };
    let mut qmp = connect(handle).await.map_err(unrestorable)?;
    hand_over(&mut qmp, &file, deadline)
        .await
        .map_err(unrestorable)?;
    call(
        &mut qmp,
        "migrate-incoming",
        Some(json!({ "uri": format!("fd:{FD_NAME}") })),
        deadline,
    )
    .await
    .map_err(unrestorable)?;
    match wait_for_migration(&mut qmp, deadline)
        .await
        .map_err(unrestorable)?
    {
        Migration::Completed => Ok(()),
        Migration::Failed(detail) => Err(VmmError::SnapshotUnrestorable {
            detail: format!("QEMU could not load it: {detail}"),
        }),
    }
}

/// The end of QEMU's log: where it says why it refused a stream.
fn qemu_said(handle: &VmmHandle) -> String {
    let tail = process::log_tail(&process::log_path_of(handle));
    if tail.trim().is_empty() {
        "it ended without a word".into()
    } else {
        tail.trim().to_string()
    }
}

/// The stream file, new and empty, readable only by its owner: the VMM's ids when confined.
fn create_stream(snapshot: &SnapshotFiles) -> Result<File, VmmError> {
    let path = stream_path(snapshot);
    let io = |source| VmmError::Io {
        operation: format!("create {}", path.display()),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    if let Some((uid, gid)) = snapshot.owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io)?;
    }
    Ok(file)
}

async fn connect(handle: &VmmHandle) -> Result<QmpClient, VmmError> {
    if !process::is_alive(handle) {
        return Err(VmmError::Exited {
            operation: "snapshot".into(),
            detail: format!("process {} is gone", handle.pid),
        });
    }
    QmpClient::connect(&handle.api_socket, super::API_TIMEOUT)
        .await
        .map_err(super::qemu::qmp_error)
}

async fn hand_over(qmp: &mut QmpClient, file: &File, deadline: Instant) -> Result<(), VmmError> {
    let left = left(deadline, "getfd")?;
    qmp.execute_with_fd(
        "getfd",
        Some(json!({ "fdname": FD_NAME })),
        file.as_fd(),
        left,
    )
    .await
    .map(drop)
    .map_err(super::qemu::qmp_error)
}

async fn call(
    qmp: &mut QmpClient,
    command: &str,
    args: Option<Value>,
    deadline: Instant,
) -> Result<Value, VmmError> {
    let left = left(deadline, command)?;
    qmp.execute(command, args, left)
        .await
        .map_err(super::qemu::qmp_error)
}

fn left(deadline: Instant, operation: &str) -> Result<Duration, VmmError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(VmmError::ApiTimeout {
            operation: operation.into(),
            timeout: SNAPSHOT_TIMEOUT,
        });
    }
    Ok(left)
}

/// How a migration ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Migration {
    Completed,
    Failed(String),
}

/// Read `query-migrate`'s answer: `None` while it runs.
pub(crate) fn migration_outcome(answer: &Value) -> Option<Migration> {
    let status = answer.get("status").and_then(Value::as_str).unwrap_or("");
    match status {
        "completed" => Some(Migration::Completed),
        "failed" | "cancelled" => Some(Migration::Failed(
            answer
                .get("error-desc")
                .and_then(Value::as_str)
                .unwrap_or(status)
                .to_string(),
        )),
        _ => None,
    }
}

async fn wait_for_migration(qmp: &mut QmpClient, deadline: Instant) -> Result<Migration, VmmError> {
    loop {
        let answer = call(qmp, "query-migrate", None, deadline).await?;
        if let Some(outcome) = migration_outcome(&answer) {
            return Ok(outcome);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_query_migrate() {
        assert_eq!(migration_outcome(&json!({})), None, "not started yet");
        assert_eq!(migration_outcome(&json!({"status": "active"})), None);
        assert_eq!(
            migration_outcome(&json!({"status": "completed"})),
            Some(Migration::Completed)
        );
        assert_eq!(
            migration_outcome(&json!({"status": "failed", "error-desc": "Input/output error"})),
            Some(Migration::Failed("Input/output error".into()))
        );
        assert_eq!(
            migration_outcome(&json!({"status": "cancelled"})),
            Some(Migration::Failed("cancelled".into()))
        );
    }
}
