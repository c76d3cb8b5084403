//! What only a real cluster can show, on the upstream cluster of `scripts/cluster.sh` (two nodes
//! by default) with Ignis installed by `scripts/cluster.sh install-ignis` (Helm):
//! the installation itself (CRD accepted, 2 controller replicas with one leader, an agent pod
//! on every node, the TLS Secrets, nothing refused by RBAC in the apiserver's audit log), the CA key out
//! of the nodes' reach, a guest reachable on its IP, leader failover, an agent pod deleted
//! and its VM re-adopted, `helm upgrade`, and `helm uninstall` leaving nothing behind.
//!
//! One test, in phases: they share one installation and one running VM, and each phase
//! changes the installation the next one starts from. The last phase installs Ignis again.

use std::process::Command;
use std::time::{Duration, Instant};

use ignis_e2e::agent_csr;
use ignis_e2e::upstream::{Upstream, live_after, pids_matching};
use ignis_e2e::{Cluster, http_get_via, wait_until};

const NS: &str = "e2e-cluster";
const SERVICE_ACCOUNTS: &str = "system:serviceaccount:";

struct Ctx {
    cluster: Cluster,
    up: Upstream,
}

impl Ctx {
    fn sys(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.up.release_namespace.as_str()];
        all.extend_from_slice(args);
        self.cluster.kubectl_ok(&all)
    }

    fn jsonpath(&self, namespace: &str, object: &str, path: &str) -> String {
        self.cluster.kubectl_ok(&[
            "get",
            "-n",
            namespace,
            object,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    fn wait_ready(&self, vm: &str) {
        self.cluster.kubectl_ok(&[
            "wait",
            "-n",
            NS,
            "--for=condition=Ready",
            &format!("mvm/{vm}"),
            "--timeout=180s",
        ]);
    }

    /// The node `vm` runs on (`status.nodeName`).
    fn node_of(&self, vm: &str) -> String {
        let node = self.jsonpath(NS, &format!("mvm/{vm}"), "{.status.nodeName}");
        assert!(!node.is_empty(), "mvm/{vm} has no node");
        node
    }

    /// The agent pod on `node`.
    fn agent_on(&self, node: &str) -> String {
        let found = self.sys(&[
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=ignis-agent",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
        ]);
        let pods: Vec<&str> = found.lines().collect();
        assert_eq!(pods.len(), 1, "one agent pod on {node}: {pods:?}");
        pods[0].to_string()
    }

    /// What says a VM was not rebooted: its VMM process, its start time, its restart count.
    fn vm_identity(&self, vm: &str) -> (Vec<u32>, String) {
        let uid = self.jsonpath(NS, &format!("mvm/{vm}"), "{.metadata.uid}");
        let status = self.jsonpath(
            NS,
            &format!("mvm/{vm}"),
            "{.status.startTime}/{.status.restartCount}/{.status.nodeName}",
        );
        (pids_matching(&uid), status)
    }

    fn leader(&self) -> String {
        self.jsonpath(
            &self.up.release_namespace,
            "lease/ignis-controller",
            "{.spec.holderIdentity}",
        )
    }

    fn pods(&self, name: &str) -> Vec<String> {
        self.sys(&[
            "get",
            "pods",
            "-l",
            &format!("app.kubernetes.io/name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}{\"\\n\"}{end}",
        ])
        .lines()
        .map(str::to_string)
        .collect()
    }

    /// Whether the agents get their own certificates (`tls.servingCert: csr`): their
    /// Secret then holds the signing CA's certificate.
    fn csr_mode(&self) -> bool {
        self.secret_keys("ignis-agent-tls")
            .iter()
            .any(|k| k == "signer.crt")
    }

    fn secret_keys(&self, name: &str) -> Vec<String> {
        let out = self.sys(&[
            "get",
            "secret",
            name,
            "-o",
            "go-template={{range $k, $v := .data}}{{$k}}\n{{end}}",
        ]);
        out.lines().map(str::to_string).collect()
    }

    fn secret_file(&self, name: &str, key: &str, dir: &std::path::Path) -> std::path::PathBuf {
        let b64 = self.sys(&[
            "get",
            "secret",
            name,
            "-o",
            &format!("jsonpath={{.data.{}}}", key.replace('.', "\\.")),
        ]);
        let path = dir.join(format!("{name}-{key}"));
        let decoded =
            output_with_input(Command::new("base64").arg("-d"), b64.as_bytes()).expect("base64 -d");
        std::fs::write(&path, decoded.stdout).expect("write secret file");
        path
    }

    /// The controller never gave up on stopping `vm`'s VM (the Warning it writes when it
    /// releases a MicroVM whose agent it counts as unreachable).
    fn no_release_without_stop(&self, vm: &str) {
        let messages = self.cluster.kubectl_ok(&[
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            &format!("involvedObject.name={vm},reason=AgentUnreachable"),
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ]);
        assert!(
            !messages.contains("released without stopping"),
            "mvm/{vm} was released with its VM still running:\n{messages}"
        );
    }

    fn no_denials(&self, when: &str) {
        let prefix = format!("{SERVICE_ACCOUNTS}{}:", self.up.release_namespace);
        let denied = self.up.audit_events(&prefix, 403);
        assert!(
            denied.is_empty(),
            "{when}: the apiserver refused our service accounts {} time(s):\n{}",
            denied.len(),
            denied
                .iter()
                .take(10)
                .map(|e| format!(
                    "{} {} {}",
                    e["user"]["username"], e["verb"], e["requestURI"]
                ))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn ignis_on_an_upstream_cluster() {
    let Some(up) = Upstream::from_env() else {
        ignis::testing::prerequisite::missing(
            "ignis_on_an_upstream_cluster",
            "needs the upstream cluster: IGNIS_E2E_CLUSTER_ENV (scripts/cluster.sh up && install-ignis)",
        );
        return;
    };
    let cluster = Cluster::start();
    let ctx = Ctx { cluster, up };
    let started = Instant::now();
    installation_is_whole(&ctx);
    the_ca_key_stays_off_the_nodes(&ctx);

    let _ns = ctx.cluster.namespace(NS);
    let applied = ctx
        .cluster
        .apply(NS, &ctx.cluster.demo_vm("survivor", "", "Always"));
    assert!(applied.success, "{}", applied.stderr);
    ctx.wait_ready("survivor");
    let (pids, _) = ctx.vm_identity("survivor");
    assert_eq!(pids.len(), 1, "one VMM: {pids:?}");
    let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", pids[0])).expect("cgroup");
    // With VM pods (the chart's default) the VMM lives in its pod's cgroup, beside the pod's
    // container; without, in the node-level VMM cgroup. Never in the agent's container.
    let vm_pod = ctx.cluster.kubectl(&[
        "get",
        "-n",
        NS,
        "pod/vm-survivor",
        "-o",
        "jsonpath={.metadata.uid}",
    ]);
    let expected = if vm_pod.success && !vm_pod.stdout.is_empty() {
        format!("/pod{}/ignis-vmm", vm_pod.stdout.trim())
    } else {
        "/ignis-vms".to_string()
    };
    assert!(
        cgroup
            .lines()
            .filter(|l| l.contains(":memory:") || l.starts_with("0::"))
            .all(|l| l.ends_with(&expected)),
        "the VMM is in {expected}, not the agent's container:\n{cgroup}"
    );

    a_guest_serves_on_its_ip(&ctx);
    leader_failover_leaves_vms_alone(&ctx);
    a_deleted_agent_pod_readopts_its_vm(&ctx);
    helm_upgrade_applies_a_changed_value(&ctx);
    ctx.no_denials("before uninstall");
    helm_uninstall_leaves_nothing(&ctx);
    println!("cluster phases took {:?}", started.elapsed());
}

fn installation_is_whole(ctx: &Ctx) {
    let ns = &ctx.up.release_namespace;
    // The CRD: structural (no NonStructuralSchema condition) and established.
    let conditions = ctx.jsonpath(
        "default",
        "crd/microvms.ignis.dev",
        "{range .status.conditions[*]}{.type}={.status};{end}",
    );
    assert!(conditions.contains("Established=True"), "{conditions}");
    assert!(!conditions.contains("NonStructuralSchema"), "{conditions}");
    // Two controller replicas, one leader among them.
    assert_eq!(
        ctx.jsonpath(ns, "deployment/ignis-controller", "{.status.readyReplicas}"),
        "2"
    );
    let controllers = ctx.pods("ignis-controller");
    assert_eq!(controllers.len(), 2, "{controllers:?}");
    wait_until(Duration::from_secs(60), "a leader", || {
        controllers.contains(&ctx.leader())
    });
    // An agent pod runs on every node, on the node's address.
    let nodes = &ctx.up.nodes;
    assert_eq!(
        ctx.jsonpath(ns, "daemonset/ignis-agent", "{.status.numberReady}"),
        nodes.len().to_string()
    );
    let agents = ctx.pods("ignis-agent");
    assert_eq!(agents.len(), nodes.len(), "{agents:?}");
    for node in nodes {
        let agent = ctx.agent_on(&node.name);
        assert_eq!(
            ctx.jsonpath(ns, &format!("pod/{agent}"), "{.status.podIP}"),
            node.ip,
            "the agent on {}",
            node.name
        );
    }
    // The Secrets the controller bootstrapped.
    let agent_keys = ctx.secret_keys("ignis-agent-tls");
    if ctx.csr_mode() {
        assert_eq!(
            agent_keys,
            ["ca.crt", "signer.crt"],
            "CSR mode: the agents' Secret holds the CA certificates, no key"
        );
    } else {
        assert_eq!(
            agent_keys,
            ["ca.crt", "tls.crt", "tls.key"],
            "the agents' Secret holds their pair and the CA certificate, nothing else"
        );
    }
    assert_eq!(ctx.secret_keys("ignis-ca"), ["ca.crt", "ca.key"]);
    ctx.no_denials("after install");
}

/// Defect 5 of issue 13: a node can read the agents' Secret only, and nothing in it mints a
/// client certificate an agent accepts ("CN=evil").
fn the_ca_key_stays_off_the_nodes(ctx: &Ctx) {
    let ns = &ctx.up.release_namespace;
    let node_user = format!("system:node:{}", ctx.up.node);
    let can = |who: &[&str], what: &str| {
        let mut args = vec!["auth", "can-i", "get", what, "-n", ns];
        args.extend_from_slice(who);
        // "yes", or "no" followed by the authorizer's reason.
        let out = ctx.cluster.kubectl(&args).stdout;
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let node = ["--as", node_user.as_str(), "--as-group", "system:nodes"];
    assert_eq!(
        can(&node, "secret/ignis-ca"),
        "no",
        "the node reads the CA key"
    );
    assert_eq!(
        can(&node, "secret/ignis-agent-tls"),
        "yes",
        "the node serves the agents' Secret to its agent pod"
    );
    let agent_sa = format!("{SERVICE_ACCOUNTS}{ns}:ignis-agent");
    assert_eq!(can(&["--as", &agent_sa], "secret/ignis-ca"), "no");

    let tmp = tempfile::tempdir().expect("tmp");
    let ca = ctx.secret_file("ignis-agent-tls", "ca.crt", tmp.path());
    let (node_cert, node_key) = if ctx.csr_mode() {
        // What a node holds in CSR mode: its agent's own pair, issued through a request made
        // with a token of its agent pod.
        let pod = ctx.agent_on(&ctx.up.node);
        let kubeconfig = agent_csr::agent_pod_kubeconfig(&ctx.cluster, tmp.path(), ns, &pod);
        let (pem, key) = agent_csr::request(tmp.path(), &agent_csr::server_name(&ctx.up.node));
        let name = format!("e2e-cluster-node-pair-{}", agent_csr::unique());
        let out = ctx
            .cluster
            .command("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["create", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(agent_csr::manifest(&name, &pem).as_bytes())?;
                child.wait_with_output()
            })
            .expect("kubectl create csr");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let issued = agent_csr::settled(&ctx.cluster, &name, Duration::from_secs(60));
        ctx.cluster.kubectl_ok(&["delete", "csr", &name]);
        assert_eq!(issued.condition, "Approved", "{issued:?}");
        let cert = tmp.path().join("node.crt");
        std::fs::write(&cert, &issued.certificate).expect("write");
        (cert, key)
    } else {
        (
            ctx.secret_file("ignis-agent-tls", "tls.crt", tmp.path()),
            ctx.secret_file("ignis-agent-tls", "tls.key", tmp.path()),
        )
    };
    let (evil_cert, evil_key) = mint(tmp.path(), "evil", &node_cert, &node_key);
    let (posing_cert, posing_key) = mint(tmp.path(), "ignis-controller", &node_cert, &node_key);
    // The positive control: a controller certificate from the CA (only an admin can do this).
    let (ctl_cert, ctl_key) = mint(
        tmp.path(),
        "ignis-controller",
        &ctx.secret_file("ignis-ca", "ca.crt", tmp.path()),
        &ctx.secret_file("ignis-ca", "ca.key", tmp.path()),
    );
    let call = |cert: &std::path::Path, key: &std::path::Path| grpc_get_host(ctx, &ca, cert, key);
    let accepted = call(&ctl_cert, &ctl_key);
    assert!(
        accepted.contains("grpc-status: 0"),
        "the controller's identity is accepted: {accepted}"
    );
    for (what, cert, key) in [
        ("CN=evil signed with the node's key", &evil_cert, &evil_key),
        (
            "the controller's name signed with the node's key",
            &posing_cert,
            &posing_key,
        ),
        ("the node's own pair as a client", &node_cert, &node_key),
    ] {
        let answer = call(cert, key);
        assert!(
            !answer.contains("grpc-status: 0"),
            "{what} was accepted by the agent: {answer}"
        );
    }
}

/// A client certificate for `name` signed by `issuer_cert`/`issuer_key`, with openssl.
fn mint(
    dir: &std::path::Path,
    name: &str,
    issuer_cert: &std::path::Path,
    issuer_key: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf) {
    // The key and request as an agent's (the request's own name is not copied: `x509 -req`
    // takes extensions from the extension file only).
    let (_, key) = agent_csr::request(dir, name);
    let csr = key.with_extension("csr");
    let cert = key.with_extension("crt");
    let ext = key.with_extension("ext");
    std::fs::write(
        &ext,
        format!("extendedKeyUsage=clientAuth\nsubjectAltName=DNS:{name}\n"),
    )
    .expect("ext");
    let s = |p: &std::path::Path| p.display().to_string();
    agent_csr::openssl(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(issuer_cert),
        "-CAkey",
        &s(issuer_key),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&cert),
    ]);
    (cert, key)
}

/// Run `cmd` with `input` on its stdin; its output.
fn output_with_input(cmd: &mut Command, input: &[u8]) -> std::io::Result<std::process::Output> {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("stdin").write_all(input)?;
    child.wait_with_output()
}

/// An empty `GetHost` gRPC call with curl (HTTP/2 over mutual TLS); the response headers and
/// trailers, or curl's error.
fn grpc_get_host(
    ctx: &Ctx,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> String {
    // The name the agent serves: its node's in CSR mode, the shared one otherwise.
    let name = if ctx.csr_mode() {
        agent_csr::server_name(&ctx.up.node)
    } else {
        "ignis-agent".to_string()
    };
    let resolve = format!("{name}:9443:{}", ctx.up.node_ip);
    let mut curl = Command::new("timeout");
    curl.args(["20", "curl", "-sS", "--http2", "-D", "-", "-o", "/dev/null"])
        .args(["--resolve", &resolve, "--cacert"])
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        // One gRPC frame: not compressed, length 0 (an empty GetHostRequest).
        .args(["--data-binary", "@-"])
        .arg(format!("https://{name}:9443/ignis.agent.v1.Agent/GetHost"));
    let out = output_with_input(&mut curl, &[0, 0, 0, 0, 0]).expect("curl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Guest networking inside the agent pod: the NAT bridge and the tap in the node's network
/// namespace, the guest's IP in `status.ipAddresses`, its server answering there.
fn a_guest_serves_on_its_ip(ctx: &Ctx) {
    let manifest = ctx.cluster.demo_web_vm("web");
    let applied = ctx.cluster.apply(NS, &manifest);
    assert!(applied.success, "{}", applied.stderr);
    ctx.wait_ready("web");
    let ip = ctx.jsonpath(NS, "mvm/web", "{.status.ipAddresses[0]}");
    assert!(ip.starts_with("10.88."), "guest IP {ip:?}");
    // A NAT guest's address is routable on its own node only.
    let node = ctx.node_of("web");
    let response = http_get_via(
        |program| ctx.up.in_node_netns(&node, program),
        &format!("{ip}:80"),
        "/",
    )
    .unwrap_or_default();
    assert!(
        response.starts_with("HTTP/1.") && response.contains("200"),
        "the guest answers on {ip}:80 from the node: {response:?}"
    );
    ctx.cluster.delete_and_wait(NS, "mvm/web");
}

fn leader_failover_leaves_vms_alone(ctx: &Ctx) {
    let before = ctx.vm_identity("survivor");
    // A MicroVM deleted during the handover: the new leader starts before it has dialed the
    // agent, and must still stop the VM rather than release it (CI once caught a VMM left so).
    let applied = ctx
        .cluster
        .apply(NS, &ctx.cluster.demo_vm("handover", "", "Always"));
    assert!(applied.success, "{}", applied.stderr);
    ctx.wait_ready("handover");
    let (handover_pids, _) = ctx.vm_identity("handover");
    let leader = ctx.leader();
    let t0 = Instant::now();
    ctx.sys(&["delete", "pod", &leader, "--wait=false"]);
    ctx.cluster
        .kubectl_ok(&["delete", "-n", NS, "mvm/handover", "--wait=false"]);
    wait_until(Duration::from_secs(120), "another replica to lead", || {
        let now = ctx.leader();
        !now.is_empty() && now != leader && ctx.pods("ignis-controller").contains(&now)
    });
    println!(
        "leader {leader} deleted; {} leads after {:?}",
        ctx.leader(),
        t0.elapsed()
    );
    // The new leader reconciles: a new VM boots...
    let applied = ctx
        .cluster
        .apply(NS, &ctx.cluster.demo_vm("after-failover", "", "Always"));
    assert!(applied.success, "{}", applied.stderr);
    ctx.wait_ready("after-failover");
    ctx.cluster.kubectl_ok(&[
        "delete",
        "-n",
        NS,
        "mvm/after-failover",
        "--wait=true",
        "--timeout=90s",
    ]);
    wait_until(Duration::from_secs(120), "mvm/handover to go", || {
        ctx.cluster
            .kubectl(&["get", "-n", NS, "mvm/handover", "-o", "name"])
            .stdout
            .trim()
            .is_empty()
    });
    ctx.no_release_without_stop("handover");
    let left = live_after(&handover_pids, Duration::from_secs(30));
    assert!(
        left.is_empty(),
        "the VMM {left:?} of a MicroVM deleted during the leader handover is left"
    );
    // ...and the running one was never touched.
    ctx.wait_ready("survivor");
    assert_eq!(
        ctx.vm_identity("survivor"),
        before,
        "same VMM, start time, restarts"
    );
    ctx.sys(&[
        "rollout",
        "status",
        "deployment/ignis-controller",
        "--timeout=180s",
    ]);
}

fn a_deleted_agent_pod_readopts_its_vm(ctx: &Ctx) {
    let before = ctx.vm_identity("survivor");
    let old = ctx.agent_on(&ctx.node_of("survivor"));
    let others: Vec<String> = ctx
        .pods("ignis-agent")
        .into_iter()
        .filter(|p| *p != old)
        .collect();
    ctx.sys(&["delete", "pod", &old, "--wait=true", "--timeout=120s"]);
    assert_eq!(
        ctx.vm_identity("survivor").0,
        before.0,
        "the VMM outlived the agent's container"
    );
    ctx.sys(&[
        "rollout",
        "status",
        "daemonset/ignis-agent",
        "--timeout=180s",
    ]);
    let new = ctx.agent_on(&ctx.node_of("survivor"));
    assert_ne!(new, old, "a new agent pod");
    for other in &others {
        assert!(
            ctx.pods("ignis-agent").contains(other),
            "the other nodes' agents were left alone: {other}"
        );
    }
    ctx.wait_ready("survivor");
    let logs = ctx.sys(&["logs", &format!("pod/{new}")]);
    assert!(
        logs.contains("\"held\":1"),
        "the new agent re-adopted the VM:\n{logs}"
    );
    assert_eq!(
        ctx.vm_identity("survivor"),
        before,
        "re-adopted, not rebooted"
    );
}

fn helm_upgrade_applies_a_changed_value(ctx: &Ctx) {
    let before = ctx.vm_identity("survivor");
    let agents = ctx.pods("ignis-agent");
    ctx.up
        .helm_release("upgrade", &["--set", "controller.placement=binpack"]);
    ctx.sys(&[
        "rollout",
        "status",
        "deployment/ignis-controller",
        "--timeout=180s",
    ]);
    let args = ctx.jsonpath(
        &ctx.up.release_namespace,
        "deployment/ignis-controller",
        "{.spec.template.spec.containers[0].args}",
    );
    assert!(args.contains("--placement=binpack"), "{args}");
    wait_until(
        Duration::from_secs(120),
        "the new controllers to lead",
        || {
            let leader = ctx.leader();
            ctx.pods("ignis-controller").contains(&leader)
        },
    );
    assert_eq!(
        ctx.pods("ignis-agent"),
        agents,
        "the agent was not restarted"
    );
    ctx.wait_ready("survivor");
    assert_eq!(ctx.vm_identity("survivor"), before);
    // Back to the installed values, so what follows starts from them.
    ctx.up.helm_release("upgrade", &[]);
}

fn helm_uninstall_leaves_nothing(ctx: &Ctx) {
    let (pids, _) = ctx.vm_identity("survivor");
    let uid = ctx.jsonpath(NS, "mvm/survivor", "{.metadata.uid}");
    let t0 = Instant::now();
    // The survivor still exists: the pre-delete hook deletes it and waits for its VM.
    ctx.up
        .helm_ok(&["uninstall", &ctx.up.release, "--wait", "--timeout", "5m"]);
    println!("helm uninstall with a running MicroVM: {:?}", t0.elapsed());
    let left = ctx.cluster.kubectl_ok(&["get", "mvm", "-A", "-o", "name"]);
    assert!(left.trim().is_empty(), "MicroVMs left: {left}");
    ctx.no_release_without_stop("survivor");
    assert!(pids_matching(&uid).is_empty(), "a VMM of the VM is left");
    let left = live_after(&pids, Duration::from_secs(30));
    assert!(left.is_empty(), "VMM {left:?} is left");
    wait_until(Duration::from_secs(120), "no pods of the release", || {
        ctx.sys(&["get", "pods", "-o", "name"]).trim().is_empty()
    });
    for node in &ctx.up.nodes {
        let taps = ctx
            .up
            .in_node_netns(&node.name, "ip")
            .args(["-o", "link", "show", "type", "tun"])
            .output()
            .expect("ip link");
        assert!(
            String::from_utf8_lossy(&taps.stdout).trim().is_empty(),
            "taps left on {}: {}",
            node.name,
            String::from_utf8_lossy(&taps.stdout)
        );
        let vms = node.agent_state_dir.join("vms");
        let left: Vec<_> = std::fs::read_dir(&vms)
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "VM state left in {}: {left:?}",
            vms.display()
        );
    }
    // The hook scaled the controller to zero before Helm deleted its RBAC: nothing was
    // refused, not even to a controller shutting down.
    ctx.no_denials("after uninstall");

    // Leave the cluster as it was found.
    ctx.up.helm_release("install", &[]);
}
