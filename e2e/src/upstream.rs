//! The upstream cluster of `scripts/cluster.sh` (N nodes on this machine, each a network
//! namespace of its own), for the tests only a real cluster can run (e2e/tests/cluster.rs,
//! e2e/tests/vm_pods.rs): its facts come from the `cluster.env` file `up` writes, named by
//! `IGNIS_E2E_CLUSTER_ENV`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// What `scripts/cluster.sh` says about its cluster.
#[derive(Clone, Debug)]
pub struct Upstream {
    pub kubeconfig: PathBuf,
    /// The network namespace every part of the cluster (and every VM) runs in.
    pub netns: String,
    pub node: String,
    pub node_ip: String,
    pub audit_log: PathBuf,
    pub helm: PathBuf,
    pub chart: PathBuf,
    pub release: String,
    pub release_namespace: String,
    /// The agent's state directory on the node (the host).
    pub agent_state_dir: PathBuf,
    /// The Helm values `install-ignis` used.
    pub values: PathBuf,
    /// The cluster's image registry (`host:port`, plain HTTP, reached from the host and the
    /// agent) and its `user:password`.
    pub registry: Option<String>,
    pub registry_creds: Option<String>,
    /// Every node, the first one first (the one `netns`, `node`, `node_ip` and
    /// `agent_state_dir` describe).
    pub nodes: Vec<UpstreamNode>,
    /// `scripts/cluster.sh` of the cluster (for `exec` and `stop-node`), when it says.
    pub cluster_sh: Option<PathBuf>,
}

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamNode {
    pub name: String,
    pub ip: String,
    /// Its network namespace (its kubelet, kube-proxy, containerd, agent and NAT guests).
    pub netns: String,
    pub pod_cidr: Option<String>,
    /// Its agent's state directory on the host.
    pub agent_state_dir: PathBuf,
    /// The cgroup (below every hierarchy's root) its pods and VMMs live under.
    pub cgroup: Option<String>,
}

impl Upstream {
    /// The cluster named by `IGNIS_E2E_CLUSTER_ENV`, or `None` with the reason printed.
    pub fn from_env() -> Option<Upstream> {
        let Ok(path) = std::env::var("IGNIS_E2E_CLUSTER_ENV") else {
            ignis::testing::prerequisite::missing(
                "a cluster-only test",
                "needs the upstream cluster of scripts/cluster.sh (IGNIS_E2E_CLUSTER_ENV, set by scripts/test.sh)",
            );
            return None;
        };
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("IGNIS_E2E_CLUSTER_ENV={path}: {e}"));
        Some(Self::parse(&text))
    }

    fn parse(text: &str) -> Upstream {
        let vars: BTreeMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |k: &str| {
            vars.get(k)
                .unwrap_or_else(|| panic!("cluster.env lacks {k}"))
                .to_string()
        };
        let mut nodes: Vec<UpstreamNode> = (1..)
            .map_while(|i| {
                let key = |k: &str| {
                    vars.get(format!("NODE_{i}_{k}").as_str())
                        .map(|v| v.to_string())
                };
                Some(UpstreamNode {
                    name: key("NAME")?,
                    ip: key("IP").unwrap_or_else(|| panic!("cluster.env lacks NODE_{i}_IP")),
                    netns: key("NETNS")
                        .unwrap_or_else(|| panic!("cluster.env lacks NODE_{i}_NETNS")),
                    pod_cidr: key("POD_CIDR"),
                    agent_state_dir: key("AGENT_STATE_DIR")
                        .unwrap_or_else(|| panic!("cluster.env lacks NODE_{i}_AGENT_STATE_DIR"))
                        .into(),
                    cgroup: key("CGROUP"),
                })
            })
            .collect();
        if nodes.is_empty() {
            // A one-node cluster.env of before NODES.
            nodes.push(UpstreamNode {
                name: get("NODE"),
                ip: get("NODE_IP"),
                netns: get("NETNS"),
                pod_cidr: None,
                agent_state_dir: get("AGENT_STATE_DIR").into(),
                cgroup: None,
            });
        }
        Upstream {
            nodes,
            cluster_sh: vars.get("CLUSTER_SH").map(PathBuf::from),
            kubeconfig: get("KUBECONFIG").into(),
            netns: get("NETNS"),
            node: get("NODE"),
            node_ip: get("NODE_IP"),
            audit_log: get("AUDIT_LOG").into(),
            helm: get("HELM").into(),
            chart: get("CHART").into(),
            release: get("RELEASE"),
            release_namespace: get("RELEASE_NAMESPACE"),
            agent_state_dir: get("AGENT_STATE_DIR").into(),
            values: get("VALUES").into(),
            registry: vars.get("REGISTRY").map(|v| v.to_string()),
            registry_creds: vars.get("REGISTRY_CREDS").map(|v| v.to_string()),
        }
    }

    /// A command run inside the cluster's network namespace (where the VMs' bridge and taps
    /// are), in the host's mount namespace.
    pub fn in_netns(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// The node named `name` (a Node's name, e.g. a MicroVM's `status.nodeName`).
    pub fn node_named(&self, name: &str) -> &UpstreamNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name:?} in cluster.env: {:?}", self.nodes))
    }

    /// A command run inside node `node`'s network namespace, in the host's mount namespace
    /// (what `scripts/cluster.sh exec NODE -- CMD` does).
    pub fn in_node_netns(&self, node: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node_named(node).netns))
            .arg("--")
            .arg(program);
        cmd
    }

    /// `scripts/cluster.sh ARGS` of this cluster (`exec`, `stop-node`), with a deadline.
    pub fn cluster_sh(&self, args: &[&str]) -> Output {
        let script = self
            .cluster_sh
            .as_ref()
            .expect("cluster.env names no CLUSTER_SH (written by scripts/cluster.sh up)");
        let child = Command::new("bash")
            .arg(script)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("bash runs");
        crate::wait_with_deadline(child, Duration::from_secs(120))
    }

    /// `helm ARGS` against this cluster, in the release's namespace, with a deadline.
    pub fn helm(&self, args: &[&str]) -> Output {
        let child = Command::new(&self.helm)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--namespace", &self.release_namespace])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("helm runs");
        crate::wait_with_deadline(child, Duration::from_secs(600))
    }

    /// Run `helm ARGS` and panic with its output unless it succeeds.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        let out = self.helm(args);
        assert!(
            out.status.success(),
            "helm {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `helm <verb>` (install or upgrade) of the release from the chart with the installed
    /// values plus `extra`, waiting (at most 5 minutes) for it to be ready.
    pub fn helm_release(&self, verb: &str, extra: &[&str]) -> String {
        let chart = self.chart.display().to_string();
        let values = self.values.display().to_string();
        let mut args = vec![verb, &self.release, &chart, "-f", &values];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--wait", "--timeout", "5m"]);
        self.helm_ok(&args)
    }

    /// Audit events (one JSON object a line) whose user matches `user_prefix` and whose
    /// response code is `code`.
    pub fn audit_events(&self, user_prefix: &str, code: i64) -> Vec<serde_json::Value> {
        audit_events_in(&self.audit_log, 0, user_prefix, code)
    }
}

/// [`Upstream::audit_events`] over the file at `path`, from byte `from` on.
pub fn audit_events_in(
    path: &Path,
    from: u64,
    user_prefix: &str,
    code: i64,
) -> Vec<serde_json::Value> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("audit log {}: {e}", path.display()));
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..])
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| {
            event["user"]["username"]
                .as_str()
                .is_some_and(|u| u.starts_with(user_prefix))
                && event["responseStatus"]["code"].as_i64() == Some(code)
        })
        .collect()
}

/// PIDs of processes whose command line contains `needle` (the VMMs of a VM: the agent runs
/// with the host's PID namespace, so they are visible here).
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let out = Command::new("pgrep")
        .args(["-f", "--", needle])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether `pid` is a live process: it exists and is not a zombie (a killed VMM is one until
/// its parent reaps it).
pub fn pid_live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

/// Wait up to `within` for every pid of `pids` to be gone (or a zombie); the ones still live.
pub fn live_after(pids: &[u32], within: Duration) -> Vec<u32> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let live: Vec<u32> = pids.iter().copied().filter(|p| pid_live(*p)).collect();
        if live.is_empty() || std::time::Instant::now() >= deadline {
            return live;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_env_parses() {
        let up = Upstream::parse(
            "KUBECONFIG=/k\nNETNS=ns\nNODE=n\nNODE_IP=1.2.3.4\nAUDIT_LOG=/a\nHELM=/h\nKUBECTL=/kc\n\
             CHART=/c\nRELEASE=r\nRELEASE_NAMESPACE=rn\nAGENT_STATE_DIR=/s\nVALUES=/v\n",
        );
        assert_eq!(up.netns, "ns");
        assert_eq!(up.node_ip, "1.2.3.4");
        assert_eq!(up.values, PathBuf::from("/v"));
        assert_eq!(up.nodes.len(), 1, "a one-node file of before NODES");
        assert_eq!(up.nodes[0].netns, "ns");
        assert_eq!(up.node_named("n").agent_state_dir, PathBuf::from("/s"));
    }

    #[test]
    fn cluster_env_lists_every_node() {
        let up = Upstream::parse(
            "KUBECONFIG=/k\nNETNS=ns\nNODE=a\nNODE_IP=1.2.3.4\nAUDIT_LOG=/a\nHELM=/h\n\
             CHART=/c\nRELEASE=r\nRELEASE_NAMESPACE=rn\nAGENT_STATE_DIR=/s/a\nVALUES=/v\n\
             NODES=a b\nCLUSTER_SH=/cl.sh\n\
             NODE_1_NAME=a\nNODE_1_IP=1.2.3.4\nNODE_1_NETNS=ns\nNODE_1_AGENT_STATE_DIR=/s/a\n\
             NODE_2_NAME=b\nNODE_2_IP=1.2.3.5\nNODE_2_NETNS=ns-2\nNODE_2_AGENT_STATE_DIR=/s/b\n\
             NODE_2_POD_CIDR=10.214.1.0/24\nNODE_2_CGROUP=/c/b\n",
        );
        let names: Vec<&str> = up.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(up.node_named("b").netns, "ns-2");
        assert_eq!(
            up.node_named("b").pod_cidr.as_deref(),
            Some("10.214.1.0/24")
        );
        assert_eq!(up.cluster_sh, Some(PathBuf::from("/cl.sh")));
    }

    #[test]
    fn audit_events_filter_by_user_and_code() {
        let tmp = tempfile::tempdir().expect("tmp");
        let log = tmp.path().join("audit.log");
        std::fs::write(
            &log,
            r#"{"user":{"username":"system:serviceaccount:ignis-system:ignis-controller"},"responseStatus":{"code":403}}
{"user":{"username":"system:serviceaccount:ignis-system:ignis-controller"},"responseStatus":{"code":200}}
{"user":{"username":"admin"},"responseStatus":{"code":403}}
not json
"#,
        )
        .expect("write");
        let denied = audit_events_in(&log, 0, "system:serviceaccount:ignis-system:", 403);
        assert_eq!(denied.len(), 1);
        assert!(audit_events_in(&log, 1 << 20, "system:", 403).is_empty());
    }
}
