//! Each agent's own serving key and certificate (`tls.servingCert: csr`, the chart's default)
//! on the upstream cluster of `scripts/cluster.sh` with Ignis installed:
//! - every agent serves, in its TLS handshake, a certificate naming its own node only, issued
//!   by the CA of the agents' Secret, with a public key no other agent has; the agents'
//!   Secret holds no key;
//! - the agents' requests are Approved and issued, each by the agent's ServiceAccount from
//!   the node it names (the API server recorded the node of the pod's token);
//! - the agents' ServiceAccount asking for another node's name is Denied (`NodeMismatch`),
//!   and without a node-bound token at all too (`NoNodeBinding`); the same token asking for
//!   its own node is issued (the positive control);
//! - a managed CA rotation (`ignis.dev/rotate-ca`, each phase's overlap skipped by moving its
//!   recorded start back and restarting the controller) rewrites the agents' Secret at every
//!   step; each agent restarts and serves a certificate of the CA that signs at that step,
//!   and the controller reaches both agents again after each step, ending with only the new
//!   CA trusted.

use std::collections::BTreeSet;
use std::time::Duration;

use ignis_e2e::agent_csr::{
    SIGNER, agent_pod_kubeconfig, manifest, request, served_certificate, server_name, settled,
    try_served_certificate, unique, x509,
};
use ignis_e2e::upstream::Upstream;
use ignis_e2e::{Cluster, wait_until};

const SETTLE: Duration = Duration::from_secs(60);
/// The kubelet refreshes a mounted Secret within about two minutes, the agent notices in 10 s.
const AGENT_RESTART: Duration = Duration::from_secs(240);

/// The decoded value of `key` in Secret `name` (empty when missing).
fn secret_value(cluster: &Cluster, namespace: &str, name: &str, key: &str) -> String {
    let b64 = cluster.kubectl_ok(&[
        "get",
        "secret",
        name,
        "-n",
        namespace,
        "-o",
        &format!("jsonpath={{.data.{}}}", key.replace('.', "\\.")),
    ]);
    if b64.trim().is_empty() {
        return String::new();
    }
    let out = std::process::Command::new("sh")
        .args(["-c", &format!("echo '{}' | base64 -d", b64.trim())])
        .output()
        .expect("base64");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `leaf` (PEM) verifies against `ca` (PEM) alone.
fn issued_by(dir: &std::path::Path, leaf: &str, ca: &str) -> bool {
    let n = unique();
    let (leaf_file, ca_file) = (
        dir.join(format!("leaf-{n}.pem")),
        dir.join(format!("ca-{n}.pem")),
    );
    std::fs::write(&leaf_file, leaf).expect("write");
    std::fs::write(&ca_file, ca).expect("write");
    std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&ca_file)
        .arg(&leaf_file)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn agent_pod_on(cluster: &Cluster, namespace: &str, node: &str) -> String {
    let pods = cluster.kubectl_ok(&[
        "get",
        "pods",
        "-n",
        namespace,
        "-l",
        "app.kubernetes.io/name=ignis-agent",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    assert!(!pods.trim().is_empty(), "no agent pod on {node}");
    pods.trim().to_string()
}

#[test]
fn each_agent_serves_its_own_certificate_and_only_for_its_node() {
    let Some(up) = Upstream::from_env() else {
        return;
    };
    assert!(up.nodes.len() >= 2, "needs two nodes: {:?}", up.nodes);
    let cluster = Cluster::start();
    let ns = up.release_namespace.clone();
    let tmp = tempfile::tempdir().expect("tmp");
    let agent_user = format!("system:serviceaccount:{ns}:ignis-agent");

    // The agents' Secret: the CA bundle and the signing CA, no key to share.
    let keys = cluster.kubectl_ok(&[
        "get",
        "secret",
        "ignis-agent-tls",
        "-n",
        &ns,
        "-o",
        "go-template={{range $k, $v := .data}}{{$k}} {{end}}",
    ]);
    assert_eq!(keys.trim(), "ca.crt signer.crt", "the agents' Secret");
    let ca = cluster.kubectl_ok(&[
        "get",
        "secret",
        "ignis-agent-tls",
        "-n",
        &ns,
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ]);
    let ca_file = tmp.path().join("ca.crt");
    let decoded = std::process::Command::new("sh")
        .args(["-c", &format!("echo '{}' | base64 -d", ca.trim())])
        .output()
        .expect("base64");
    std::fs::write(&ca_file, decoded.stdout).expect("write");

    // The agents' ServiceAccount may create and read CSRs, and nothing else.
    let can = |args: &[&str]| {
        let mut all = vec!["auth", "can-i"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--as", &agent_user]);
        let out = cluster.kubectl(&all).stdout;
        out.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    for (verb, what) in [
        ("create", "certificatesigningrequests"),
        ("get", "certificatesigningrequests"),
    ] {
        assert_eq!(can(&[verb, what]), "yes", "the agent may {verb} {what}");
    }
    for args in [
        ["list", "certificatesigningrequests", ""],
        [
            "update",
            "certificatesigningrequests",
            "--subresource=approval",
        ],
        [
            "update",
            "certificatesigningrequests",
            "--subresource=status",
        ],
        ["get", "secrets", "-A"],
        ["list", "pods", "-A"],
        ["get", "nodes", ""],
        ["create", "microvms.ignis.dev", "-A"],
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| !a.is_empty()).collect();
        assert_eq!(can(&args), "no", "the agent may {args:?}");
    }

    // What each agent serves.
    let mut keys_seen = BTreeSet::new();
    for node in &up.nodes {
        let pem = served_certificate(&node.ip, 9443, &server_name(&node.name));
        let san = x509(tmp.path(), &pem, &["-ext", "subjectAltName"]);
        let names: Vec<&str> = san
            .lines()
            .skip(1)
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect();
        assert_eq!(
            names,
            [format!("DNS:{}", server_name(&node.name))],
            "the agent on {} names its node only",
            node.name
        );
        let leaf = tmp.path().join(format!("{}.pem", node.name));
        std::fs::write(&leaf, &pem).expect("write");
        let verified = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca_file)
            .arg(&leaf)
            .output()
            .expect("openssl verify");
        assert!(
            verified.status.success(),
            "the agent on {} serves a certificate of the agents' CA: {}",
            node.name,
            String::from_utf8_lossy(&verified.stdout)
        );
        let key = x509(tmp.path(), &pem, &["-pubkey"]);
        assert!(
            keys_seen.insert(key),
            "the agent on {} serves another agent's key",
            node.name
        );
        println!("{} serves {}", node.name, server_name(&node.name));
    }

    // The agents' own requests: by their ServiceAccount, from the node they name, issued.
    let csrs: serde_json::Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "get",
        "csr",
        "--field-selector",
        &format!("spec.signerName={SIGNER}"),
        "-o",
        "json",
    ]))
    .expect("json");
    for node in &up.nodes {
        let issued = csrs["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|c| c["spec"]["username"] == agent_user.as_str())
            .filter(|c| {
                c["spec"]["extra"]["authentication.kubernetes.io/node-name"][0]
                    == node.name.as_str()
            })
            .filter(|c| {
                c["status"]["conditions"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Approved"))
            })
            .filter(|c| c["status"]["certificate"].as_str().is_some())
            .count();
        assert!(
            issued >= 1,
            "no issued request of the agent on {}: {csrs}",
            node.name
        );
    }

    // A token of node A's agent pod asking for node B's name: denied.
    let (a, b) = (&up.nodes[0].name, &up.nodes[1].name);
    let pod_a = agent_pod_on(&cluster, &ns, a);
    let as_a = agent_pod_kubeconfig(&cluster, tmp.path(), &ns, &pod_a);
    let created = |kubeconfig: Option<&std::path::Path>, extra: &[&str], dns: &str| {
        let name = format!("e2e-agent-csr-{}", unique());
        let (pem, _key) = request(tmp.path(), dns);
        let mut args: Vec<String> = Vec::new();
        if let Some(k) = kubeconfig {
            args.extend(["--kubeconfig".into(), k.display().to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["create".into(), "-f".into(), "-".into()]);
        let out = if kubeconfig.is_some() {
            // Only the token: not the admin's kubeconfig that `Cluster` passes.
            let mut child = cluster
                .command("kubectl")
                .args(&args)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("kubectl");
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().expect("stdin");
                stdin
                    .write_all(manifest(&name, &pem).as_bytes())
                    .expect("write");
            }
            let out = child.wait_with_output().expect("kubectl");
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        } else {
            let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = cluster.kubectl_stdin(&arg_refs, Some(&manifest(&name, &pem)));
            (out.success, out.stderr)
        };
        assert!(out.0, "creating {name} for {dns}: {}", out.1);
        name
    };
    let cleanup = |names: &[&str]| {
        for name in names {
            let _ = cluster.kubectl(&["delete", "csr", name, "--ignore-not-found"]);
        }
    };

    let other = created(Some(&as_a), &[], &server_name(b));
    let own = created(Some(&as_a), &[], &server_name(a));
    // Impersonation carries no node: the agents' ServiceAccount without a node-bound token.
    let unbound = created(None, &["--as", &agent_user], &server_name(a));
    let results = [
        settled(&cluster, &other, SETTLE),
        settled(&cluster, &own, SETTLE),
        settled(&cluster, &unbound, SETTLE),
    ];
    cleanup(&[&other, &own, &unbound]);
    let [other, own, unbound] = results;
    assert_eq!(
        (other.condition.as_str(), other.reason.as_str()),
        ("Denied", "NodeMismatch"),
        "node {a}'s agent asking for {b}'s name: {other:?}"
    );
    assert!(other.certificate.is_empty(), "{other:?}");
    assert_eq!(
        (unbound.condition.as_str(), unbound.reason.as_str()),
        ("Denied", "NoNodeBinding"),
        "{unbound:?}"
    );
    assert_eq!(own.condition, "Approved", "its own node: {own:?}");
    let san = x509(tmp.path(), &own.certificate, &["-ext", "subjectAltName"]);
    assert!(
        san.contains(&format!("DNS:{}", server_name(a))),
        "the issued certificate names {a}: {san}"
    );

    a_managed_ca_rotation_reissues_every_agent(&cluster, &up, tmp.path());
}

/// What each node's agent serves now: node name → certificate PEM (empty while the agent
/// is not serving).
fn served(up: &Upstream) -> Vec<(String, String)> {
    up.nodes
        .iter()
        .map(|n| {
            (
                n.name.clone(),
                try_served_certificate(&n.ip, 9443, &server_name(&n.name)).unwrap_or_default(),
            )
        })
        .collect()
}

/// Restart the controller (it takes the next rotation step when it starts) and wait for it.
fn restart_controller(cluster: &Cluster, namespace: &str) {
    cluster.kubectl_ok(&[
        "rollout",
        "restart",
        "deployment/ignis-controller",
        "-n",
        namespace,
    ]);
    cluster.kubectl_ok(&[
        "rollout",
        "status",
        "deployment/ignis-controller",
        "-n",
        namespace,
        "--timeout=180s",
    ]);
}

/// Wait until every agent serves a new certificate (not one of `before`) issued by
/// `signer`, then until the leader has reconnected to every agent since it restarted.
fn agents_reissued(
    cluster: &Cluster,
    up: &Upstream,
    dir: &std::path::Path,
    before: &[(String, String)],
    signer: &str,
    step: &str,
) -> Vec<(String, String)> {
    let ns = &up.release_namespace;
    let mut now = Vec::new();
    wait_until(
        AGENT_RESTART,
        &format!("{step}: every agent restarted and reissued"),
        || {
            now = served(up);
            now.iter()
                .zip(before)
                .all(|((_, cert), (_, old))| cert != old && issued_by(dir, cert, signer))
        },
    );
    wait_until(
        Duration::from_secs(60),
        &format!("{step}: the leader reaches every restarted agent"),
        || {
            let leader = cluster.kubectl_ok(&[
                "get",
                "lease/ignis-controller",
                "-n",
                ns,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ]);
            let logs = cluster.kubectl(&["logs", "-n", ns, leader.trim()]).stdout;
            up.nodes.iter().all(|node| {
                let pod = agent_pod_on(cluster, ns, &node.name);
                let started = cluster.kubectl_ok(&[
                    "get",
                    "pod",
                    &pod,
                    "-n",
                    ns,
                    "-o",
                    "jsonpath={.status.containerStatuses[0].state.running.startedAt}",
                ]);
                let started = started.trim().get(..19).unwrap_or_default().to_string();
                logs.lines().any(|line| {
                    line.contains("agent connected and synced")
                        && line.contains(&format!("\"node\":\"{}\"", node.name))
                        && line
                            .split("\"timestamp\":\"")
                            .nth(1)
                            .and_then(|t| t.get(..19))
                            .is_some_and(|t| t >= started.as_str())
                })
            })
        },
    );
    now
}

/// A managed CA rotation with every agent on its own certificate: Begin, Reissue, Finish.
fn a_managed_ca_rotation_reissues_every_agent(
    cluster: &Cluster,
    up: &Upstream,
    dir: &std::path::Path,
) {
    let ns = up.release_namespace.as_str();
    let started = std::time::Instant::now();
    let old_ca = secret_value(cluster, ns, "ignis-ca", "ca.crt");
    let mut before = served(up);
    // Skip a phase's 15-minute overlap: its recorded start moved back.
    let overlap_passed = || {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            - 3600;
        cluster.kubectl_ok(&[
            "annotate",
            "secret",
            "ignis-ca",
            "-n",
            ns,
            "--overwrite",
            &format!("ignis.dev/ca-phase-since={since}"),
        ]);
    };

    // Begin: a new CA joins the bundle; the old one still signs.
    cluster.kubectl_ok(&[
        "annotate",
        "secret",
        "ignis-ca",
        "-n",
        ns,
        "--overwrite",
        "ignis.dev/rotate-ca=now",
    ]);
    restart_controller(cluster, ns);
    let new_ca = secret_value(cluster, ns, "ignis-ca", "next.crt");
    assert!(!new_ca.is_empty(), "the rotation began");
    assert_eq!(
        secret_value(cluster, ns, "ignis-agent-tls", "signer.crt"),
        old_ca
    );
    before = agents_reissued(cluster, up, dir, &before, &old_ca, "Begin");
    println!("Begin done after {:?}", started.elapsed());

    // Reissue: the new CA signs; agents ask it.
    overlap_passed();
    restart_controller(cluster, ns);
    assert_eq!(secret_value(cluster, ns, "ignis-ca", "ca.crt"), new_ca);
    assert_eq!(
        secret_value(cluster, ns, "ignis-agent-tls", "signer.crt"),
        new_ca
    );
    before = agents_reissued(cluster, up, dir, &before, &new_ca, "Reissue");
    println!("Reissue done after {:?}", started.elapsed());

    // Finish: the old CA leaves the bundle.
    overlap_passed();
    restart_controller(cluster, ns);
    assert!(secret_value(cluster, ns, "ignis-ca", "previous.crt").is_empty());
    assert_eq!(
        secret_value(cluster, ns, "ignis-agent-tls", "ca.crt").trim(),
        new_ca.trim(),
        "only the new CA is trusted"
    );
    let last = agents_reissued(cluster, up, dir, &before, &new_ca, "Finish");
    for (node, cert) in &last {
        assert!(
            !issued_by(dir, cert, &old_ca),
            "{node} serves a certificate of the old CA"
        );
    }
    println!(
        "CA rotation with per-agent certificates took {:?}",
        started.elapsed()
    );
}
