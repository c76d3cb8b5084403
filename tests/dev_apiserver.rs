//! The dev API server against real clients: kubectl (as installed) and kube-rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ignis::dev::apiserver::{self, ApiServerConfig, ApiServerHandle};
use tokio_util::sync::CancellationToken;

struct Dev {
    handle: ApiServerHandle,
    shutdown: CancellationToken,
    kubeconfig: PathBuf,
    dir: PathBuf,
}

async fn start_in(dir: &Path, tweak: impl FnOnce(&mut ApiServerConfig)) -> Dev {
    let mut config = ApiServerConfig::new(dir.join("data"));
    config.node_name = "dev-node".into();
    config.bookmark_interval = Duration::from_millis(200);
    tweak(&mut config);
    let shutdown = CancellationToken::new();
    let handle = apiserver::start(config, shutdown.clone()).await.expect("start");
    let kubeconfig = dir.join("kubeconfig");
    handle.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    Dev {
        handle,
        shutdown,
        kubeconfig,
        dir: dir.to_path_buf(),
    }
}

impl Dev {
    /// Run kubectl with a deadline; returns its output.
    fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, None)
    }

    fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=20s")
            .args(args)
            .env("HOME", &self.dir)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kubectl {args:?} did not finish within 60s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().expect("output")
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    async fn stop(self) -> PathBuf {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.handle.stopped())
            .await
            .expect("server stops within 10s");
        self.dir
    }
}

#[tokio::test]
#[ignore = "manual: serves for 10 minutes, for poking with kubectl"]
async fn serve_for_manual_testing() {
    let dir = PathBuf::from("/tmp/ignis-dev-manual");
    let dev = start_in(&dir, |_| {}).await;
    eprintln!("KUBECONFIG={}", dev.kubeconfig.display());
    tokio::time::sleep(Duration::from_secs(600)).await;
}
