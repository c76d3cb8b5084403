//! Each agent's own serving key and certificate (`tls.servingCert: csr`, the chart's default)
//! on the upstream cluster of `scripts/cluster.sh` with Ignis installed:
//! - every agent serves, in its TLS handshake, a certificate naming its own node only, issued
//!   by the CA of the agents' Secret, with a public key no other agent has; the agents'
//!   Secret holds no key;
//! - the agents' requests are Approved and issued, each by the agent's ServiceAccount from
//!   the node it names (the API server recorded the node of the pod's token);
//! - the agents' ServiceAccount asking for another node's name is Denied (`NodeMismatch`),
//!   and without a node-bound token at all too (`NoNodeBinding`); the same token asking for
//!   its own node is issued (the positive control).

use std::collections::BTreeSet;
use std::time::Duration;

use ignis_e2e::Cluster;
use ignis_e2e::agent_csr::{
    SIGNER, agent_pod_kubeconfig, manifest, request, served_certificate, server_name, settled,
    unique, x509,
};
use ignis_e2e::upstream::Upstream;

const SETTLE: Duration = Duration::from_secs(60);

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
}
