//! End-to-end harness: drives Ignis only through `kubectl` and the Kubernetes API.
//!
//! By default each [`Cluster`] spawns `ignis dev` (the binary built in this workspace) on a
//! private data directory and loopback port. With `IGNIS_E2E_KUBECONFIG` set, the same tests
//! run unchanged against that cluster (Ignis installed there, e.g. with the Helm chart); then
//! `IGNIS_E2E_GUEST_DIR` names the node directory holding the demo guest (default
//! `/var/lib/ignis/guest`, where every agent prepares it). [`upstream`] adds what only the
//! upstream cluster of `scripts/cluster.sh` offers, for the cluster-only tests.

pub mod agent_csr;
pub mod upstream;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ignis::api::{InterfaceMode, RunPolicy};
use ignis::testing::MicroVmBuilder;

/// What a kubectl call returned.
#[derive(Debug)]
pub struct Kubectl {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// A running `ignis dev` owned by the test.
pub struct DevProcess {
    child: Child,
    pub data_dir: PathBuf,
    log: PathBuf,
}

/// The system under test.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    /// Where the demo guest's kernel and initrd are on the node(s).
    pub guest_dir: PathBuf,
    dev: Option<DevProcess>,
    /// A network namespace of the test's own that `ignis dev` and kubectl run in, so guest
    /// networking never touches the host's namespace.
    netns: Option<String>,
    _tmp: Option<tempfile::TempDir>,
}

/// Path of the `ignis` binary built by this workspace.
pub fn ignis_binary() -> PathBuf {
    if let Ok(path) = std::env::var("IGNIS_BIN") {
        return PathBuf::from(path);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("debug/ignis")
}

impl Cluster {
    /// A cluster for one test: the user's (`IGNIS_E2E_KUBECONFIG`) or a fresh `ignis dev`.
    pub fn start() -> Cluster {
        if let Ok(kubeconfig) = std::env::var("IGNIS_E2E_KUBECONFIG") {
            let guest_dir = std::env::var("IGNIS_E2E_GUEST_DIR")
                .unwrap_or_else(|_| "/var/lib/ignis/guest".into());
            return Cluster {
                kubeconfig: kubeconfig.into(),
                guest_dir: guest_dir.into(),
                dev: None,
                netns: None,
                _tmp: None,
            };
        }
        Self::start_dev(None)
    }

    /// A fresh `ignis dev` inside a new network namespace `name` (created here, removed on
    /// drop). Returns `None`, with the reason printed, when namespaces cannot be made here.
    pub fn start_in_netns(name: &str) -> Option<Cluster> {
        let _ = Command::new("ip")
            .args(["netns", "delete", name])
            .stderr(Stdio::null())
            .status();
        let made = Command::new("ip").args(["netns", "add", name]).status();
        if !matches!(made, Ok(s) if s.success()) {
            ignis::testing::prerequisite::missing(
                name,
                "cannot create a network namespace (needs root and iproute2)",
            );
            return None;
        }
        let lo = Command::new("ip")
            .args(["netns", "exec", name, "ip", "link", "set", "lo", "up"])
            .status();
        assert!(matches!(lo, Ok(s) if s.success()), "loopback up in {name}");
        Some(Self::start_dev(Some(name.to_string())))
    }

    fn start_dev(netns: Option<String>) -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix("ignis-e2e-")
            .tempdir()
            .expect("tempdir");
        let data_dir = tmp.path().join("data");
        let mut cluster = Cluster {
            kubeconfig: tmp.path().join("kubeconfig"),
            guest_dir: data_dir.join("guest"),
            dev: None,
            netns,
            _tmp: None,
        };
        cluster.dev = Some(cluster.spawn_dev(&data_dir));
        cluster._tmp = Some(tmp);
        cluster
    }

    /// Whether this run owns an `ignis dev` (and so may restart it).
    pub fn is_dev(&self) -> bool {
        self.dev.is_some()
    }

    fn spawn_dev(&self, data_dir: &Path) -> DevProcess {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let _ = std::fs::remove_file(&self.kubeconfig);
        let log = data_dir.join("dev.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("dev log");
        let binary = ignis_binary();
        assert!(
            binary.exists(),
            "{} not found: run `cargo build --bin ignis` first",
            binary.display()
        );
        let child = self
            .command(&binary.display().to_string())
            .args(["dev", "--data-dir"])
            .arg(data_dir)
            .arg("--kubeconfig-out")
            .arg(&self.kubeconfig)
            .args(["--api-port", "0", "--health-addr", "127.0.0.1:0"])
            .env(
                "IGNIS_ACCELERATOR",
                std::env::var("IGNIS_ACCELERATOR").unwrap_or_else(|_| "auto".into()),
            )
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("spawn ignis dev");
        let mut dev = DevProcess {
            child,
            data_dir: data_dir.to_path_buf(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = dev.child.try_wait() {
                panic!("ignis dev exited early ({status}):\n{}", dev.log_tail());
            }
            if self.kubeconfig.exists() && self.kubectl(&["get", "namespace", "default"]).success {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "ignis dev not ready in 120s:\n{}",
                dev.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        dev
    }

    /// Stop `ignis dev` with SIGTERM (or SIGKILL when `kill`), then start it again on the
    /// same data directory.
    pub fn restart_dev(&mut self, kill: bool) {
        let mut dev = self.dev.take().expect("restart needs ignis dev");
        dev.stop(kill);
        let data_dir = dev.data_dir.clone();
        self.dev = Some(self.spawn_dev(&data_dir));
    }

    /// The dev process' log so far (for failure messages).
    pub fn dev_log(&self) -> String {
        self.dev
            .as_ref()
            .map(DevProcess::log_tail)
            .unwrap_or_default()
    }

    /// A command that runs where the cluster runs (inside its network namespace, if any).
    pub fn command(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns, program]);
                cmd
            }
            None => Command::new(program),
        }
    }

    /// An HTTP/1.0 GET of `http://{ip}:{port}/` from where the cluster runs; the response, or
    /// `None` when nothing answers within a few seconds.
    pub fn http_get(&self, ip: &str, port: u16) -> Option<String> {
        http_get_via(
            |program| self.command(program),
            &format!("{ip}:{port}"),
            "/",
        )
    }

    /// Run kubectl with this cluster's kubeconfig and a deadline.
    pub fn kubectl(&self, args: &[&str]) -> Kubectl {
        self.kubectl_stdin(args, None)
    }

    /// Run kubectl, feeding `stdin` (for `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Kubectl {
        let mut child = self
            .command("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=30s")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl is installed");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input.as_bytes()).expect("write stdin");
        }
        let output = wait_with_deadline(child, kubectl_deadline(args));
        Kubectl {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Run kubectl and panic with its output (and the dev log) unless it succeeds.
    /// The names of the `kind` objects of `namespace` that `selector` selects.
    pub fn names_selected(
        &self,
        namespace: &str,
        kind: &str,
        selector: &str,
    ) -> std::collections::BTreeSet<String> {
        self.kubectl_ok(&[
            "get",
            "-n",
            namespace,
            kind,
            "-l",
            selector,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect()
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.success,
            "kubectl {args:?} failed:\n{}\n{}\n--- ignis dev log ---\n{}",
            out.stdout,
            out.stderr,
            self.dev_log()
        );
        out.stdout
    }

    /// `kubectl apply -f -` with `yaml`.
    pub fn apply(&self, namespace: &str, yaml: &str) -> Kubectl {
        self.kubectl_stdin(&["apply", "-n", namespace, "-f", "-"], Some(yaml))
    }

    /// A namespace of the test's own, removed when the guard drops.
    pub fn namespace(&self, name: &str) -> Namespace<'_> {
        let _ = self.kubectl(&[
            "delete",
            "namespace",
            name,
            "--ignore-not-found",
            "--wait=true",
        ]);
        self.kubectl_ok(&["create", "namespace", name]);
        Namespace {
            cluster: self,
            name: name.to_string(),
        }
    }

    /// A MicroVM manifest booting the demo guest. `run_policy` as the manifest spells it.
    pub fn demo_vm(&self, name: &str, extra_cmdline: &str, run_policy: &str) -> String {
        let policy: RunPolicy = serde_json::from_value(run_policy.into())
            .unwrap_or_else(|e| panic!("runPolicy {run_policy:?}: {e}"));
        MicroVmBuilder::sample(name)
            .guest(
                &self.guest_dir.join("vmlinuz"),
                &self.guest_dir.join("initrd.cpio"),
            )
            .memory("128Mi")
            .cmdline(&format!("console=ttyS0 panic=-1 quiet {extra_cmdline}"))
            .run_policy(policy)
            .grace_period_seconds(5)
            .yaml()
    }

    /// A MicroVM manifest booting the demo guest with a NAT interface, its web server on :80
    /// as its readiness.
    pub fn demo_web_vm(&self, name: &str) -> String {
        MicroVmBuilder::sample(name)
            .guest(
                &self.guest_dir.join("vmlinuz"),
                &self.guest_dir.join("initrd.cpio"),
            )
            .memory("128Mi")
            .cmdline("console=ttyS0 panic=-1 quiet")
            .interface("eth0", InterfaceMode::Nat)
            .tcp_port(80)
            .grace_period_seconds(5)
            .yaml()
    }

    /// The reasons of the Events about `name`, space-separated.
    pub fn event_reasons(&self, namespace: &str, name: &str) -> String {
        self.kubectl_ok(&[
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={.items[*].reason}",
        ])
    }

    /// `kubectl delete` of `object`, waiting (at most a minute) until it is gone.
    pub fn delete_and_wait(&self, namespace: &str, object: &str) {
        self.kubectl_ok(&[
            "delete",
            object,
            "-n",
            namespace,
            "--wait=true",
            "--timeout=60s",
        ]);
    }

    /// Poll `jsonpath` of `object` until `predicate` holds or `timeout` passes.
    pub fn wait_jsonpath(
        &self,
        namespace: &str,
        object: &str,
        jsonpath: &str,
        timeout: Duration,
        predicate: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let out = self.kubectl(&[
                "get",
                "-n",
                namespace,
                object,
                "-o",
                &format!("jsonpath={jsonpath}"),
            ]);
            if out.success {
                last = out.stdout.clone();
                if predicate(&last) {
                    return last;
                }
            } else {
                last = out.stderr;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!(
            "{object} {jsonpath} did not reach the expected value in {timeout:?}; last: {last:?}\n{}",
            self.describe(namespace, object)
        );
    }

    /// `kubectl describe` plus the dev log, for failure messages.
    pub fn describe(&self, namespace: &str, object: &str) -> String {
        let out = self.kubectl(&["describe", "-n", namespace, object]);
        format!(
            "{}{}\n--- ignis dev log ---\n{}",
            out.stdout,
            out.stderr,
            self.dev_log()
        )
    }
}

/// How long a kubectl call may take: 3 minutes, or longer when it is told to wait longer
/// (`--timeout=300s` of `kubectl wait`), so its own timeout, with its message, comes first.
fn kubectl_deadline(args: &[&str]) -> Duration {
    let asked = args
        .iter()
        .filter_map(|a| a.strip_prefix("--timeout="))
        .filter_map(|t| t.strip_suffix('s'))
        .filter_map(|t| t.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    Duration::from_secs(180.max(asked + 30))
}

/// An HTTP/1.0 GET of `http://{hostport}{path}` run by `on_node` (the command prefix for
/// where the address is routable: a network namespace, or here); the response, or `None`
/// when nothing answers within a few seconds.
pub fn http_get_via(
    on_node: impl Fn(&str) -> Command,
    hostport: &str,
    path: &str,
) -> Option<String> {
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "80"));
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port} && printf 'GET {path} HTTP/1.0\\r\\nHost: {hostport}\\r\\n\\r\\n' >&3 && cat <&3"
    );
    let child = on_node("timeout")
        .args(["5", "bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let out = wait_with_deadline(child, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && text.starts_with("HTTP/")).then_some(text)
}

/// Poll `f` until it holds or `timeout` passes; panic naming `what` then.
/// The demo guest's `/cgi-bin/state` page: its uptime in seconds and its tmpfs note.
pub fn parse_guest_state(page: &str) -> Option<(f64, String)> {
    let field = |name: &str| {
        page.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.trim().to_string())
    };
    Some((field("uptime")?.parse().ok()?, field("note")?))
}

pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

impl DevProcess {
    fn stop(&mut self, kill: bool) {
        let signal = if kill { "-KILL" } else { "-TERM" };
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(6000);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text[start..].to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.as_mut() {
            // SIGTERM: `ignis dev` stops every VM it started before exiting.
            dev.stop(false);
        }
        if let Some(ns) = &self.netns {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

/// A namespace created for one test; deleted (with its MicroVMs) on drop.
pub struct Namespace<'a> {
    cluster: &'a Cluster,
    pub name: String,
}

impl Drop for Namespace<'_> {
    fn drop(&mut self) {
        let _ = self.cluster.kubectl(&[
            "delete",
            "microvms",
            "--all",
            "-n",
            &self.name,
            "--wait=true",
            "--timeout=60s",
        ]);
        let _ = self
            .cluster
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

fn wait_with_deadline(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let out_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let err_thread = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break child.wait().expect("reap killed child");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_thread.join().unwrap_or_default(),
        stderr: err_thread.join().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_may_take_as_long_as_it_is_told_to_wait() {
        assert_eq!(kubectl_deadline(&["get", "pods"]), Duration::from_secs(180));
        assert_eq!(
            kubectl_deadline(&["wait", "--for=condition=Ready", "--timeout=300s"]),
            Duration::from_secs(330)
        );
        assert_eq!(
            kubectl_deadline(&["wait", "--timeout=60s"]),
            Duration::from_secs(180)
        );
    }
}
