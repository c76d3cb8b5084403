//! Helpers for the networking tests: run a test's body in a network namespace the test creates
//! (never the host's own), and look at the namespace with the standard tools (`ip -j`,
//! `nft -j`) — independent witnesses of what the code under test did.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const CHILD_ENV: &str = "IGNIS_NET_TEST_CHILD";

fn tool_present(name: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(name).exists())
}

/// Run the calling test `test` (its exact name) again, as a child process inside a fresh
/// network namespace, and wait for it with a deadline. Returns `true` in that child (run the
/// body), `false` in the parent (done: the child's verdict was asserted). Skips, saying why,
/// only without root or `ip`/`nft`.
pub fn in_fresh_netns(test: &str, timeout: Duration) -> bool {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        return true;
    }
    if !nix::unistd::Uid::effective().is_root() {
        ignis::testing::prerequisite::missing(
            test,
            "needs root (network namespaces, taps, nftables)",
        );
        return false;
    }
    for tool in ["ip", "nft"] {
        if !tool_present(tool) {
            ignis::testing::prerequisite::missing(
                test,
                &format!("`{tool}` is not installed (iproute2, nftables)"),
            );
            return false;
        }
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let ns = format!(
        "ignis-t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let added = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .expect("run ip netns add");
    assert!(added.success(), "ip netns add {ns} failed");

    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns])
        .arg(&exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, test)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the test in the namespace");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Anything the body left running in the namespace (a VMM after a failed assertion) is ours.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", &ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let deleted = Command::new("ip").args(["netns", "del", &ns]).status();
    let status = status.unwrap_or_else(|| panic!("{test} did not finish within {timeout:?}"));
    assert!(status.success(), "{test} failed in its namespace: {status}");
    assert!(
        deleted.is_ok_and(|s| s.success()),
        "ip netns del {ns} failed"
    );
    false
}

fn json_of(program: &str, args: &[&str]) -> Value {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Value::Array(vec![]);
    }
    serde_json::from_slice(&out.stdout).expect("json")
}

/// `ip -j -d link show` of the namespace.
pub fn links() -> Vec<Value> {
    json_of("ip", &["-j", "-d", "link", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

pub fn link(name: &str) -> Option<Value> {
    links().into_iter().find(|l| l["ifname"] == name)
}

/// Names of the tun/tap links.
pub fn taps() -> Vec<String> {
    links()
        .into_iter()
        .filter(|l| l["linkinfo"]["info_kind"] == "tun")
        .filter_map(|l| l["ifname"].as_str().map(str::to_string))
        .collect()
}

/// `addr/prefix` strings of a link's IPv4 addresses.
pub fn ipv4_addrs(name: &str) -> Vec<String> {
    json_of("ip", &["-j", "-4", "addr", "show", "dev", name])
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or(""), a["prefixlen"]))
        .collect()
}

/// The rules of the whole nftables ruleset, as JSON values.
pub fn nft_rules() -> Vec<Value> {
    json_of("nft", &["-j", "list", "ruleset"])["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("rule").cloned())
        .collect()
}

/// Names of the nftables tables.
pub fn nft_tables() -> Vec<String> {
    json_of("nft", &["-j", "list", "tables"])["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["table"]["name"].as_str().map(str::to_string))
        .collect()
}

/// Files under a directory, recursively, relative, as strings.
pub fn relative_files(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = super::files_under(dir)
        .into_iter()
        .map(|p| p.display().to_string())
        .collect();
    out.sort();
    out
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A plain HTTP/1.0 GET of a guest's `path`; `None` until it answers.
pub async fn http_get(ip: std::net::Ipv4Addr, port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect((ip, port));
    let mut stream = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}
