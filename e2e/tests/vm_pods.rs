//! VM pods on a cluster of two nodes (docs: the VM-pod contract of issue 18): every MicroVM is
//! backed by a pod the controller makes, kube-scheduler places and the kubelet runs, and the
//! VMM lives in that pod. Checked here, against the upstream cluster of `scripts/cluster.sh`
//! with Ignis installed by Helm (`IGNIS_E2E_KUBECONFIG` and `IGNIS_E2E_CLUSTER_ENV`):
//!
//! - a VM on each node (nodeSelector by hostname), each backed by its pod `vm-<name>`: owned by
//!   the MicroVM, carrying its labels, memory requests = limits = guest memory + the VMM's
//!   overhead, and the VMM in that pod's cgroup, as a non-root uid under seccomp;
//! - a Service selecting VMs by label, reached from a pod on the other node;
//! - `kubectl port-forward` to the VM pod reaches the guest's HTTP port, `kubectl logs` shows
//!   the guest's console;
//! - `spec.suspend` saves the VM on B and restores it, its pod kept: the guest's uptime and a
//!   tmpfs note survive, the Service reaches it again, no snapshot is left on any node;
//! - a `MicroVMPool`'s warm VMs are VM pods with the pool's labels; a claim is Ready at once in
//!   a warm VM's pod, relabelled and owned by the claimant, behind a Service selecting the
//!   claimant's labels; the pool refills; deleting it leaves the claimed VM running;
//! - `kubectl drain` honours a PodDisruptionBudget (refused, then a server-side dry run, then
//!   for real), evicts the VM pod, and the MicroVM says why its VM stopped;
//! - a VM pod deleted by hand: `Always` gets a new pod and is Ready again, `Once` stays down;
//! - a node lost (`scripts/cluster.sh stop-node`: its kubelet, containerd, pods and VMMs
//!   killed), tainted `node.kubernetes.io/out-of-service` as in Kubernetes' non-graceful node
//!   shutdown: its `Always` VM is Ready on the other node within [`NODE_LOSS_BOUND`].
//!
//! One test in phases on one namespace; the node-loss phase is last, because the node stays
//! down (run this file last, before `scripts/cluster.sh down`). Without a cluster it is not
//! run, and fails when `IGNIS_REQUIRE_ALL=1`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ignis::api::RunPolicy;
use ignis::testing::MicroVmBuilder;
use ignis_e2e::upstream::{Upstream, live_after, pid_live, pids_matching};
use ignis_e2e::{Cluster, http_get_via, wait_until};
use serde_json::{Value, json};

#[path = "vm_pods/pool.rs"]
mod pool;
#[path = "vm_pods/suspend.rs"]
mod suspend;

const NS: &str = "e2e-vm-pods";
/// The guest's memory; its pod asks for this plus the VMM's overhead.
const GUEST_MEMORY_MI: u64 = 128;
/// What the demo guest prints once it is up, and what its web server says.
const CONSOLE_MARKER: &str = "ignis: ready";
const PAGE: &str = "ignis demo guest";
/// From a node's loss to its `Always` VM Ready on the other node. Measured on the two-node
/// cluster of `scripts/cluster.sh` (2 cores, TCG): the node grace period (20 s) until NotReady,
/// then the taint, the pod GC's force delete, a new pod, its sandbox, the boot.
const NODE_LOSS_BOUND: Duration = Duration::from_secs(150);

/// One phase of the test, on the shared context.
type Phase = fn(&Ctx);

struct Ctx {
    cluster: Cluster,
    up: Upstream,
    /// The two nodes the test uses: A (the first, with the control plane) and B.
    a: String,
    b: String,
}

#[test]
fn vm_pods_on_two_nodes() {
    let Some(ctx) = Ctx::new() else {
        return;
    };
    let _ns = ctx.cluster.namespace(NS);
    let started = Instant::now();
    let phases: [(&str, Phase); 9] = [
        ("a VM on each node, in its pod", a_vm_on_each_node),
        (
            "a Service from the other node",
            a_service_reaches_vms_from_the_other_node,
        ),
        (
            "port-forward and logs",
            port_forward_and_logs_reach_the_guest,
        ),
        (
            "suspend and resume",
            suspend::suspend_and_resume_keep_the_guest,
        ),
        (
            "a claim from a pool behind a Service",
            pool::a_claim_is_served_by_a_service,
        ),
        (
            "a VM pod deleted by hand",
            a_deleted_vm_pod_follows_the_run_policy,
        ),
        ("drain with a PodDisruptionBudget", drain_evicts_the_vm_pod),
        ("a node lost", a_lost_nodes_vm_comes_back_elsewhere),
        ("nothing leaked", nothing_of_the_deleted_vms_is_left),
    ];
    for (name, phase) in phases {
        let t0 = Instant::now();
        phase(&ctx);
        println!(
            "PASSED phase {name:?} in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    }
    println!("vm pod phases took {:?}", started.elapsed());
}

impl Ctx {
    fn new() -> Option<Ctx> {
        let require_all = std::env::var("IGNIS_REQUIRE_ALL").is_ok_and(|v| v == "1");
        if std::env::var("IGNIS_E2E_KUBECONFIG").is_err() {
            assert!(
                !require_all,
                "VM pods need a cluster: set IGNIS_E2E_KUBECONFIG and IGNIS_E2E_CLUSTER_ENV \
                 (scripts/cluster.sh up && scripts/cluster.sh install-ignis)"
            );
            println!("skipped: VM pods need a cluster (IGNIS_E2E_KUBECONFIG is not set)");
            return None;
        }
        let up = match Upstream::from_env() {
            Some(up) => up,
            None if require_all => panic!("VM pods need IGNIS_E2E_CLUSTER_ENV (cluster.env)"),
            None => return None,
        };
        assert!(
            up.nodes.len() >= 2,
            "VM pods are checked across two nodes; the cluster has {:?} (scripts/cluster.sh up \
             --nodes 2)",
            up.nodes
        );
        let (a, b) = (up.nodes[0].name.clone(), up.nodes[1].name.clone());
        Some(Ctx {
            cluster: Cluster::start(),
            up,
            a,
            b,
        })
    }

    fn get(&self, object: &str, jsonpath: &str) -> String {
        self.cluster.kubectl_ok(&[
            "get",
            "-n",
            NS,
            object,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
    }

    fn json(&self, object: &str) -> Value {
        let text = self
            .cluster
            .kubectl_ok(&["get", "-n", NS, object, "-o", "json"]);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{object} as JSON: {e}\n{text}"))
    }

    fn apply_json(&self, object: &Value) {
        let applied = self.cluster.apply(NS, &object.to_string());
        assert!(applied.success, "apply {object}: {}", applied.stderr);
    }

    /// A MicroVM of the demo web guest on the pod network (no `network` stanza), ready when
    /// its port 80 answers, with `labels` and `placement` merged into its spec.
    fn apply_vm(&self, name: &str, labels: Value, policy: RunPolicy, placement: Value) {
        let mut vm = MicroVmBuilder::sample(name)
            .guest(
                &self.cluster.guest_dir.join("vmlinuz"),
                &self.cluster.guest_dir.join("initrd.cpio"),
            )
            .memory(&format!("{GUEST_MEMORY_MI}Mi"))
            .cmdline("console=ttyS0 panic=-1 quiet")
            .tcp_port(80)
            .run_policy(policy)
            .grace_period_seconds(5)
            .json();
        vm["metadata"]["labels"] = labels;
        if let (Some(spec), Value::Object(extra)) = (vm["spec"].as_object_mut(), placement) {
            spec.extend(extra);
        }
        self.apply_json(&vm);
    }

    fn wait_ready(&self, vm: &str, timeout: Duration) {
        let waited = self.cluster.kubectl(&[
            "wait",
            "-n",
            NS,
            "--for=condition=Ready",
            &format!("mvm/{vm}"),
            &format!("--timeout={}s", timeout.as_secs()),
        ]);
        assert!(
            waited.success,
            "mvm/{vm} not Ready: {}\n{}\n{}",
            waited.stderr,
            self.cluster.describe(NS, &format!("mvm/{vm}")),
            self.cluster.describe(NS, &format!("pod/vm-{vm}"))
        );
    }

    fn ready(&self, vm: &str) -> bool {
        self.cluster
            .kubectl(&[
                "get",
                "-n",
                NS,
                &format!("mvm/{vm}"),
                "-o",
                r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
            ])
            .stdout
            == "True"
    }

    /// The uid of `vm`'s pod, or empty when it has none.
    fn pod_uid(&self, vm: &str) -> String {
        self.cluster
            .kubectl(&[
                "get",
                "-n",
                NS,
                &format!("pod/vm-{vm}"),
                "-o",
                "jsonpath={.metadata.uid}",
                "--ignore-not-found",
            ])
            .stdout
    }

    /// What the MicroVM tells about itself: its conditions' reasons and messages, and its
    /// Events' reasons and messages (lowercase, for searching).
    fn told(&self, vm: &str) -> String {
        let conditions = self.get(
            &format!("mvm/{vm}"),
            r#"{range .status.conditions[*]}{.type}={.status} {.reason}: {.message}{"\n"}{end}"#,
        );
        let events = self.cluster.kubectl_ok(&[
            "get",
            "events",
            "-n",
            NS,
            "--field-selector",
            &format!("involvedObject.name={vm}"),
            "-o",
            r#"jsonpath={range .items[*]}{.reason}: {.message}{"\n"}{end}"#,
        ]);
        format!("{conditions}{events}").to_lowercase()
    }

    /// The single VMM process of the MicroVM `vm` (the agents share this machine's PID
    /// namespace, so every node's VMMs are visible here).
    fn vmm_pid(&self, vm: &str) -> u32 {
        let uid = self.get(&format!("mvm/{vm}"), "{.metadata.uid}");
        let pids: Vec<u32> = pids_matching(&uid)
            .into_iter()
            // The binary, not the name: QEMU runs as `-name ...,process=ignis-<uid>`.
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe"))
                    .is_ok_and(|exe| exe.to_string_lossy().contains("qemu"))
            })
            .collect();
        assert_eq!(pids.len(), 1, "one VMM for mvm/{vm} ({uid}): {pids:?}");
        pids[0]
    }
}

/// `value` of a Kubernetes quantity in bytes (the forms a pod's memory takes).
fn bytes(quantity: &str) -> u64 {
    let units = [
        ("Ki", 1u64 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return n.parse::<u64>().expect("a whole quantity") * factor;
        }
    }
    quantity.parse().expect("a whole quantity in bytes")
}

/// `value` of a Kubernetes cpu quantity in millicores.
fn millicores(quantity: &str) -> u64 {
    match quantity.strip_suffix('m') {
        Some(m) => m.parse().expect("millicores"),
        None => quantity.parse::<u64>().expect("cores") * 1000,
    }
}

fn on_node(node: &str) -> Value {
    json!({ "nodeSelector": { "kubernetes.io/hostname": node } })
}

fn web_labels(node_label: &str) -> Value {
    json!({ "app": "web", "e2e-node": node_label })
}

fn a_vm_on_each_node(ctx: &Ctx) {
    ctx.apply_vm("web-a", web_labels("a"), RunPolicy::Always, on_node(&ctx.a));
    ctx.apply_vm("web-b", web_labels("b"), RunPolicy::Always, on_node(&ctx.b));
    for (vm, node) in [("web-a", &ctx.a), ("web-b", &ctx.b)] {
        ctx.wait_ready(vm, Duration::from_secs(240));
        assert_eq!(&ctx.get(&format!("mvm/{vm}"), "{.status.nodeName}"), node);
        the_vm_pod_is_the_vms(ctx, vm, node);
    }
}

/// The pod of `vm` on `node`: the contract's shape, and the VMM inside it.
fn the_vm_pod_is_the_vms(ctx: &Ctx, vm: &str, node: &str) {
    let mvm = ctx.json(&format!("mvm/{vm}"));
    let pod = ctx.json(&format!("pod/vm-{vm}"));
    let owner = &pod["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "MicroVM", "{owner}");
    assert_eq!(owner["name"], vm);
    assert_eq!(owner["uid"], mvm["metadata"]["uid"]);
    assert_eq!(owner["controller"], true);
    let labels = &pod["metadata"]["labels"];
    for (key, value) in mvm["metadata"]["labels"].as_object().expect("labels") {
        assert_eq!(&labels[key], value, "the pod carries label {key}: {labels}");
    }
    assert_eq!(labels["ignis.dev/microvm"], vm);
    assert_eq!(pod["spec"]["nodeName"], node);

    let container = &pod["spec"]["containers"][0];
    let resources = &container["resources"];
    let (requests, limits) = (&resources["requests"], &resources["limits"]);
    let memory = bytes(requests["memory"].as_str().expect("memory request"));
    assert_eq!(
        Some(memory),
        limits["memory"].as_str().map(bytes),
        "memory requests = limits: {resources}"
    );
    assert!(
        memory > GUEST_MEMORY_MI << 20,
        "the pod's memory ({memory} bytes) is the guest's {GUEST_MEMORY_MI}Mi plus the VMM's \
         overhead: {resources}"
    );
    let vcpus: u64 = mvm["spec"]["resources"]["vcpus"].as_u64().expect("vcpus");
    assert_eq!(
        requests["cpu"].as_str().map(millicores),
        Some(vcpus * 100),
        "{resources}"
    );
    assert_eq!(
        limits["cpu"].as_str().map(millicores),
        Some(vcpus * 1000),
        "{resources}"
    );
    // The pod is Ready with its guest, and the guest answers at the pod IP.
    let ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    assert!(ready, "pod vm-{vm} is Ready: {}", pod["status"]);
    assert_eq!(
        mvm["status"]["ipAddresses"][0], pod["status"]["podIP"],
        "status.ipAddresses[0] is the pod IP"
    );

    // The VMM: in the pod's cgroup (its leaf `ignis-vmm` below the pod's own, never a
    // container's: cgroup v2 takes no process beside child cgroups), below its node's, as a
    // non-root uid with a seccomp filter.
    let pid = ctx.vmm_pid(vm);
    let pod_uid = pod["metadata"]["uid"].as_str().expect("pod uid");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("VMM cgroup");
    let leaf = format!("pod{pod_uid}");
    let memory_line = cgroups
        .lines()
        .find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == "memory"))
        })
        .or_else(|| cgroups.lines().find(|l| l.starts_with("0::")))
        .unwrap_or_else(|| panic!("no memory cgroup for VMM {pid}:\n{cgroups}"));
    let path = memory_line.splitn(3, ':').nth(2).unwrap_or_default();
    assert!(
        path.ends_with(&format!("/{leaf}/ignis-vmm")),
        "VMM {pid} of mvm/{vm} is in its pod's cgroup {leaf}: {path}\n{cgroups}"
    );
    let node_cgroup = &ctx.up.node_named(node).cgroup;
    if let Some(node_cgroup) = node_cgroup {
        assert!(
            path.starts_with(&format!("{node_cgroup}/")),
            "below node {node}'s cgroup {node_cgroup}: {path}"
        );
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("VMM status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uids = field("Uid");
    assert!(
        !uids.is_empty() && uids.iter().all(|u| *u != "0"),
        "VMM {pid} runs as a non-root uid: {uids:?}"
    );
    assert_eq!(
        field("Seccomp"),
        ["2"],
        "VMM {pid} runs under a seccomp filter"
    );
    assert_eq!(field("NoNewPrivs"), ["1"], "VMM {pid} has no_new_privs");
}

/// The agent's image (on every node already; nothing can be pulled here): a client pod with
/// busybox.
fn client_pod(ctx: &Ctx, name: &str, node: &str) {
    let image = ctx.cluster.kubectl_ok(&[
        "get",
        "-n",
        &ctx.up.release_namespace,
        "daemonset/ignis-agent",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    ctx.apply_json(&json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": { "app": "e2e-client" } },
        "spec": {
            "nodeSelector": { "kubernetes.io/hostname": node },
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": false,
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": 65534, "runAsGroup": 65534,
                "seccompProfile": { "type": "RuntimeDefault" }
            },
            "containers": [{
                "name": "client",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "sleep", "900"],
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] }
                }
            }]
        }
    }));
    ctx.cluster.kubectl_ok(&[
        "wait",
        "-n",
        NS,
        "--for=condition=Ready",
        &format!("pod/{name}"),
        "--timeout=120s",
    ]);
}

/// `wget http://{target}/` from inside pod `client`, until the page answers or `timeout`.
fn fetch_from_pod(ctx: &Ctx, client: &str, target: &str, timeout: Duration) -> String {
    wget_from_pod(ctx, client, &format!("http://{target}/"), timeout, |page| {
        page.contains(PAGE)
    })
}

/// `wget URL` from inside pod `client`, until its answer is `done` or `timeout`.
fn wget_from_pod(
    ctx: &Ctx,
    client: &str,
    url: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let out = ctx.cluster.kubectl(&[
            "exec",
            "-n",
            NS,
            client,
            "--",
            // busybox 1.35's static wget segfaults with -T (any user), so `timeout` bounds it.
            "/bin/busybox",
            "timeout",
            "5",
            "/bin/busybox",
            "wget",
            "-q",
            "-O",
            "-",
            url,
        ]);
        if out.success && done(&out.stdout) {
            return out.stdout;
        }
        assert!(
            Instant::now() < deadline,
            "{client} never got an answer from {url}: {}{}",
            out.stdout,
            out.stderr
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn a_service_reaches_vms_from_the_other_node(ctx: &Ctx) {
    // One Service for all web VMs, one for the VM on B only; the client runs on A.
    for (name, selector) in [
        ("web", json!({ "app": "web" })),
        ("web-b", json!({ "app": "web", "e2e-node": "b" })),
    ] {
        ctx.apply_json(&json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name },
            "spec": { "selector": selector, "ports": [{ "port": 80, "targetPort": 80 }] }
        }));
    }
    let pod_ips = [
        ctx.get("pod/vm-web-a", "{.status.podIP}"),
        ctx.get("pod/vm-web-b", "{.status.podIP}"),
    ];
    ctx.cluster.wait_jsonpath(
        NS,
        "endpointslices",
        "{.items[*].endpoints[*].addresses[0]}",
        Duration::from_secs(60),
        |found| {
            pod_ips
                .iter()
                .all(|ip| found.split_whitespace().any(|f| f == ip))
        },
    );
    client_pod(ctx, "client", &ctx.a);
    let service_ip = ctx.get("service/web-b", "{.spec.clusterIP}");
    let page = fetch_from_pod(ctx, "client", &service_ip, Duration::from_secs(60));
    assert!(page.contains(PAGE), "{page}");
    // And the pod network itself, across the nodes: B's VM at its pod IP from A.
    fetch_from_pod(ctx, "client", &pod_ips[1], Duration::from_secs(30));
}

fn port_forward_and_logs_reach_the_guest(ctx: &Ctx) {
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&ctx.cluster.kubeconfig)
        .args(["port-forward", "-n", NS, "pod/vm-web-a", ":80"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl port-forward");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // "Forwarding from 127.0.0.1:43127 -> 80"
            if let Some(port) = line
                .strip_prefix("Forwarding from 127.0.0.1:")
                .and_then(|rest| rest.split_whitespace().next())
            {
                let _ = tx.send(port.to_string());
            }
        }
    });
    let port = rx.recv_timeout(Duration::from_secs(30));
    let page = port.as_ref().ok().and_then(|port| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = http_get_via(|p: &str| Command::new(p), &format!("127.0.0.1:{port}"), "/");
            if got.is_some() || Instant::now() >= deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    let page = page.unwrap_or_else(|| panic!("nothing through kubectl port-forward ({port:?})"));
    assert!(page.contains(PAGE), "{page}");

    let logs = ctx.cluster.kubectl_ok(&["logs", "-n", NS, "pod/vm-web-a"]);
    assert!(
        logs.contains(CONSOLE_MARKER),
        "kubectl logs shows the guest's console:\n{logs}"
    );
}

fn a_deleted_vm_pod_follows_the_run_policy(ctx: &Ctx) {
    ctx.apply_vm(
        "again",
        json!({ "app": "again" }),
        RunPolicy::Always,
        json!({}),
    );
    ctx.apply_vm("once", json!({ "app": "once" }), RunPolicy::Once, json!({}));
    for vm in ["again", "once"] {
        ctx.wait_ready(vm, Duration::from_secs(240));
    }
    let before = ctx.pod_uid("again");
    let once_pid = ctx.vmm_pid("once");
    let again_pid = ctx.vmm_pid("again");
    for vm in ["again", "once"] {
        ctx.cluster
            .kubectl_ok(&["delete", "-n", NS, &format!("pod/vm-{vm}"), "--wait=false"]);
    }
    // Always: a new pod, and the VM Ready in it.
    wait_until(Duration::from_secs(180), "a new pod for mvm/again", || {
        let now = ctx.pod_uid("again");
        !now.is_empty() && now != before
    });
    ctx.wait_ready("again", Duration::from_secs(240));
    assert_ne!(ctx.vmm_pid("again"), again_pid, "a new VMM in the new pod");
    // Once: the VM stops with its pod and stays down; no new pod.
    wait_until(Duration::from_secs(120), "mvm/once to stop", || {
        !ctx.ready("once") && !pid_live(once_pid)
    });
    std::thread::sleep(Duration::from_secs(15));
    assert!(
        ctx.pod_uid("once").is_empty(),
        "runPolicy Once made a new pod:\n{}",
        ctx.cluster.describe(NS, "mvm/once")
    );
    assert!(!ctx.ready("once"), "mvm/once stays down");
    ctx.cluster.delete_and_wait(NS, "mvm/once");
}

fn drain(ctx: &Ctx, node: &str, extra: &[&str]) -> ignis_e2e::Kubectl {
    let mut args = vec![
        "drain",
        node,
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--pod-selector=app=web",
    ];
    args.extend_from_slice(extra);
    ctx.cluster.kubectl(&args)
}

fn drain_evicts_the_vm_pod(ctx: &Ctx) {
    let b = ctx.b.clone();
    let pod_before = ctx.pod_uid("web-b");
    // A budget that keeps both web VMs: draining B is refused.
    ctx.apply_json(&json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": { "name": "web" },
        "spec": { "minAvailable": 2, "selector": { "matchLabels": { "app": "web" } } }
    }));
    wait_until(
        Duration::from_secs(30),
        "the budget to count the VMs",
        || ctx.get("pdb/web", "{.status.currentHealthy}") == "2",
    );
    let refused = drain(ctx, &b, &["--dry-run=server", "--timeout=15s"]);
    assert!(
        !refused.success
            && format!("{}{}", refused.stdout, refused.stderr).contains("disruption budget"),
        "drain of {b} honours the budget: {refused:?}"
    );
    // One may go: the server's dry run evicts (nothing), then the drain itself.
    ctx.cluster.kubectl_ok(&[
        "patch",
        "-n",
        NS,
        "pdb/web",
        "--type=merge",
        "-p",
        r#"{"spec":{"minAvailable":1}}"#,
    ]);
    wait_until(Duration::from_secs(30), "the budget to allow one", || {
        ctx.get("pdb/web", "{.status.disruptionsAllowed}") == "1"
    });
    let dry = drain(ctx, &b, &["--dry-run=server", "--timeout=60s"]);
    assert!(
        dry.success && format!("{}{}", dry.stdout, dry.stderr).contains("vm-web-b"),
        "server dry run: {dry:?}"
    );
    assert_eq!(ctx.pod_uid("web-b"), pod_before, "a dry run evicts nothing");
    assert!(ctx.ready("web-b"));
    let drained = drain(ctx, &b, &["--timeout=180s"]);
    assert!(drained.success, "drain {b}: {drained:?}");
    wait_until(
        Duration::from_secs(120),
        "mvm/web-b to say it was evicted",
        || !ctx.ready("web-b") && ctx.told("web-b").contains("evict"),
    );
    // Pinned to the cordoned node, its next pod cannot be placed: the scheduler's word.
    wait_until(
        Duration::from_secs(90),
        "mvm/web-b to say why it waits",
        || {
            let told = ctx.told("web-b");
            told.contains("unschedulable") || told.contains("nodes are available")
        },
    );
    ctx.cluster.kubectl_ok(&["uncordon", &b]);
    ctx.wait_ready("web-b", Duration::from_secs(240));
    assert_eq!(ctx.get("mvm/web-b", "{.status.nodeName}"), b);
}

fn a_lost_nodes_vm_comes_back_elsewhere(ctx: &Ctx) {
    let (a, b) = (ctx.a.clone(), ctx.b.clone());
    // Preferred (not required) on B, so it may move when B is lost.
    let prefer_b = json!({
        "affinity": { "nodeAffinity": { "preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100,
            "preference": { "matchExpressions": [{
                "key": "kubernetes.io/hostname", "operator": "In", "values": [b]
            }]}
        }]}}
    });
    ctx.apply_vm(
        "mover",
        json!({ "app": "mover" }),
        RunPolicy::Always,
        prefer_b,
    );
    ctx.wait_ready("mover", Duration::from_secs(240));
    assert_eq!(
        ctx.get("mvm/mover", "{.status.nodeName}"),
        b,
        "placed as preferred"
    );
    let old_pid = ctx.vmm_pid("mover");

    let lost = Instant::now();
    let out = ctx.up.cluster_sh(&["stop-node", &b]);
    assert!(
        out.status.success(),
        "stop-node {b}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Killed: gone once its new parent reaps it (a zombie meanwhile).
    let left = live_after(&[old_pid], Duration::from_secs(20));
    assert!(
        left.is_empty(),
        "the lost node's VMM {left:?} is still running"
    );
    // Kubernetes' non-graceful node shutdown: once the node is NotReady, the out-of-service
    // taint lets the pod GC force-delete its pods.
    ctx.cluster.wait_jsonpath(
        "default",
        &format!("node/{b}"),
        r#"{.status.conditions[?(@.type=="Ready")].status}"#,
        Duration::from_secs(120),
        |s| s != "True",
    );
    let not_ready = lost.elapsed();
    ctx.cluster.kubectl_ok(&[
        "taint",
        "node",
        &b,
        "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
    ]);
    let deadline = Duration::from_secs(300);
    wait_until(deadline, "mvm/mover Ready on the other node", || {
        ctx.ready("mover") && ctx.get("mvm/mover", "{.status.nodeName}") == a
    });
    let back = lost.elapsed();
    println!(
        "MEASURE node loss: NotReady after {:.1} s, mvm/mover Ready on {a} {:.1} s after {b} was \
         lost",
        not_ready.as_secs_f64(),
        back.as_secs_f64()
    );
    assert!(
        back <= NODE_LOSS_BOUND,
        "node loss to Ready elsewhere took {back:?}, more than {NODE_LOSS_BOUND:?}"
    );
    let pid = ctx.vmm_pid("mover");
    assert_ne!(pid, old_pid);
}

/// The VMs deleted in this test left no VMM behind on any node that is still up.
fn nothing_of_the_deleted_vms_is_left(ctx: &Ctx) {
    let uid = ctx.get("mvm/again", "{.metadata.uid}");
    ctx.cluster.delete_and_wait(NS, "mvm/again");
    wait_until(Duration::from_secs(60), "no VMM of mvm/again", || {
        pids_matching(&uid).is_empty()
    });
    wait_until(Duration::from_secs(60), "no pod of mvm/again", || {
        ctx.pod_uid("again").is_empty()
    });
    suspend::no_snapshot_is_left(ctx);
}
