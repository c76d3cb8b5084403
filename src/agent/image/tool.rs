//! Running the node's disk tools (`mkfs.ext4`, `qemu-img`, `cp`, `genisoimage`) to completion,
//! bounded in time, with their stderr kept for the error a person reads.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

/// Why a tool run failed.
#[derive(Debug, Error, strum::IntoStaticStr)]
pub enum ToolError {
    #[error("{tool} is not installed")]
    #[strum(serialize = "DiskToolMissing")]
    Missing {
        tool: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed ({status}): {stderr}")]
    #[strum(serialize = "DiskToolFailed")]
    Failed {
        tool: &'static str,
        status: String,
        stderr: String,
    },
    #[error("{tool} did not finish within {timeout:?}")]
    #[strum(serialize = "DiskToolFailed")]
    TimedOut {
        tool: &'static str,
        timeout: Duration,
    },
}

/// Where to look when `PATH` lacks the sbin directories (a non-login root shell, systemd).
const SBIN: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

fn locate(tool: &str) -> PathBuf {
    let in_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if in_path {
        return PathBuf::from(tool);
    }
    SBIN.iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(tool))
}

/// Run `tool args…` with no stdin, wait at most `timeout` (then kill it), and return stdout.
pub async fn run<I, S>(tool: &'static str, args: I, timeout: Duration) -> Result<String, ToolError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let child = tokio::process::Command::new(locate(tool))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ToolError::Missing { tool, source })?;
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(source)) => return Err(ToolError::Missing { tool, source }),
        Err(_) => return Err(ToolError::TimedOut { tool, timeout }),
    };
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(ToolError::Failed {
            tool,
            status: out.status.to_string(),
            stderr: last_lines(&stderr, 6),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_missing_failed_and_slow_tools() {
        let e = run("ignis-no-such-tool", ["x"], Duration::from_secs(5))
            .await
            .expect_err("missing");
        assert!(matches!(e, ToolError::Missing { .. }), "{e}");
        let e = run(
            "sh",
            ["-c", "echo one >&2; echo two >&2; exit 3"],
            Duration::from_secs(5),
        )
        .await
        .expect_err("fails");
        assert!(e.to_string().contains("one | two"), "{e}");
        let e = run("sleep", ["5"], Duration::from_millis(100))
            .await
            .expect_err("slow");
        assert!(matches!(e, ToolError::TimedOut { .. }), "{e}");
        assert_eq!(
            run("echo", ["hi"], Duration::from_secs(5))
                .await
                .expect("echo"),
            "hi\n"
        );
    }
}
