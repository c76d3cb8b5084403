//! The differential test of issue 11: one corpus of requests (kubectl verbs, raw HTTP with good
//! and bad input, every patch type, server-side apply with several managers, watches and
//! resumes, deletes with JSON and protobuf bodies, the Python `kubernetes` client, lightkube and
//! kr8s) against the upstream kube-apiserver and against `ignis dev`'s API server. The corpus
//! and the comparison live in `tests/differential/` (Python, where those clients live); this
//! test starts the dev server, prepares the clients (`scripts/setup-clients.sh`) and runs it.
//! kube-apiserver and etcd come from `scripts/tools.sh` (built on first use); a missing
//! prerequisite fails the test with its reason, never skips it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run a command to completion within `limit`, killing its process group on the way out.
fn run_bounded(cmd: &mut Command, limit: Duration) -> (bool, String) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if status.is_none() {
        // SIGTERM lets the harness stop etcd and kube-apiserver; then the whole group goes.
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGTERM);
        std::thread::sleep(Duration::from_secs(5));
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    }
    let out = reader.join().unwrap_or_default();
    (status.is_some_and(|s| s.success()), out)
}

fn client_python() -> PathBuf {
    let (ok, out) = run_bounded(
        &mut Command::new(root().join("scripts/setup-clients.sh")),
        Duration::from_secs(900),
    );
    assert!(ok, "scripts/setup-clients.sh failed:\n{out}");
    PathBuf::from(out.lines().last().expect("the venv's python").trim())
}

async fn start_dev(dir: &Path) -> (ignis::dev::apiserver::ApiServerHandle, CancellationToken) {
    let mut config = ignis::dev::api_server_config(dir.join("data")).expect("config");
    config.node_name = "dev-node".into();
    let shutdown = CancellationToken::new();
    let handle = ignis::dev::apiserver::start(config, shutdown.clone())
        .await
        .expect("start the dev API server");
    handle
        .write_kubeconfig(&dir.join("kubeconfig"))
        .expect("kubeconfig");
    (handle, shutdown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_apiserver_matches_kube_apiserver() {
    let python = client_python();
    let tmp = tempfile::tempdir().expect("tmp");
    let (handle, shutdown) = start_dev(tmp.path()).await;
    let kubeconfig = tmp.path().join("kubeconfig");
    let work = tmp.path().join("work");
    let only = std::env::var("IGNIS_DIFF_ONLY").unwrap_or_default();
    let (ok, out) = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(python);
        cmd.arg(root().join("tests/differential/run.py"))
            .arg("--dev-kubeconfig")
            .arg(&kubeconfig)
            .arg("--workdir")
            .arg(&work);
        if !only.is_empty() {
            cmd.arg("--only").args(only.split(','));
        }
        // Building kube-apiserver cold takes ~15 minutes; the corpus a few more.
        run_bounded(&mut cmd, Duration::from_secs(40 * 60))
    })
    .await
    .expect("harness task");
    println!("{out}");
    shutdown.cancel();
    handle.stopped().await;
    assert!(
        ok,
        "the dev API server differs from kube-apiserver (see above)"
    );
}
