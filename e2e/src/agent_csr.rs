//! Agent serving certificates through `CertificateSigningRequest`s on the upstream cluster
//! (`--serving-cert=csr`, the chart's default): requests made with openssl, sent as the
//! agents' ServiceAccount (a token bound to an agent pod, so the API server records its
//! node, or plain impersonation, which records none), and what the controller made of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{Cluster, wait_until};

/// A name part no other call of this process has used.
pub fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// The agents' signer.
pub const SIGNER: &str = "ignis.dev/agent-serving";

/// The DNS name the agent of `node` serves (`controller::tls::agent_server_name`).
pub fn server_name(node: &str) -> String {
    format!("ignis-agent.{node}")
}

/// Run `openssl` (bounded); its output.
pub fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("timeout")
        .arg("30")
        .arg("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A P-256 key and a PKCS#10 request naming `dns` only: (request PEM, key path).
pub fn request(dir: &Path, dns: &str) -> (String, PathBuf) {
    let key = dir.join(format!("{dns}-{}.key", unique()));
    let csr = key.with_extension("csr");
    let s = |p: &Path| p.display().to_string();
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={dns}"),
        "-addext",
        &format!("subjectAltName=DNS:{dns}"),
        "-keyout",
        &s(&key),
        "-out",
        &s(&csr),
    ]);
    (std::fs::read_to_string(&csr).expect("request"), key)
}

/// The manifest of a request named `name` for the agents' signer, as an agent makes it.
pub fn manifest(name: &str, request_pem: &str) -> String {
    let encoded = base64(request_pem.as_bytes());
    serde_json::json!({
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": name},
        "spec": {
            "request": encoded,
            "signerName": SIGNER,
            "usages": ["digital signature", "server auth"],
            "expirationSeconds": 3600,
        }
    })
    .to_string()
}

fn base64(bytes: &[u8]) -> String {
    let mut child = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("base64");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(bytes).expect("write");
    }
    let out = child.wait_with_output().expect("base64");
    String::from_utf8(out.stdout).expect("ascii")
}

/// A kubeconfig for `cluster`'s API server holding `token` and nothing else.
pub fn token_kubeconfig(cluster: &Cluster, dir: &Path, name: &str, token: &str) -> PathBuf {
    let view = |path: &str| {
        cluster.kubectl_ok(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    let server = view("{.clusters[0].cluster.server}");
    let ca = view("{.clusters[0].cluster.certificate-authority-data}");
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: u\n  user:\n    token: {}\ncontexts:\n- name: t\n  context: {{cluster: c, user: u}}\ncurrent-context: t\n",
            token.trim()
        ),
    )
    .expect("write a kubeconfig");
    path
}

/// A token of the agents' ServiceAccount bound to the agent pod `pod` (so carrying its
/// node), in a kubeconfig of its own.
pub fn agent_pod_kubeconfig(cluster: &Cluster, dir: &Path, namespace: &str, pod: &str) -> PathBuf {
    let token = cluster.kubectl_ok(&[
        "create",
        "token",
        "ignis-agent",
        "-n",
        namespace,
        "--bound-object-kind=Pod",
        &format!("--bound-object-name={pod}"),
        "--duration=10m",
    ]);
    token_kubeconfig(cluster, dir, pod, &token)
}

/// How the controller settled a request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// `Approved` or `Denied`, with the condition's reason.
    pub condition: String,
    pub reason: String,
    /// `status.certificate`, PEM.
    pub certificate: String,
}

/// The request `name` once it is denied, or approved and issued (at most `within`).
pub fn settled(cluster: &Cluster, name: &str, within: Duration) -> Settled {
    let mut seen = Settled::default();
    wait_until(within, &format!("CSR {name} to be settled"), || {
        let out = cluster.kubectl(&["get", "csr", name, "-o", "json"]);
        let Ok(csr) = serde_json::from_str::<serde_json::Value>(&out.stdout) else {
            return false;
        };
        let conditions = csr["status"]["conditions"].as_array().cloned();
        let condition = conditions.unwrap_or_default().into_iter().next();
        let certificate = csr["status"]["certificate"].as_str().unwrap_or_default();
        seen = Settled {
            condition: condition
                .as_ref()
                .and_then(|c| c["type"].as_str())
                .unwrap_or_default()
                .to_string(),
            reason: condition
                .as_ref()
                .and_then(|c| c["reason"].as_str())
                .unwrap_or_default()
                .to_string(),
            certificate: decode(certificate),
        };
        seen.condition == "Denied" || !seen.certificate.is_empty()
    });
    seen
}

fn decode(b64: &str) -> String {
    if b64.is_empty() {
        return String::new();
    }
    let mut child = Command::new("base64")
        .arg("-d")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("base64");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b64.as_bytes()).expect("write");
    }
    let out = child.wait_with_output().expect("base64 -d");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl x509 -noout` of `pem` with `args` (e.g. `-ext subjectAltName`, `-pubkey`).
pub fn x509(dir: &Path, pem: &str, args: &[&str]) -> String {
    let file = dir.join(format!("cert-{}.pem", unique()));
    std::fs::write(&file, pem).expect("write");
    let mut all = vec!["x509", "-noout", "-in"];
    let path = file.display().to_string();
    all.push(&path);
    all.extend_from_slice(args);
    String::from_utf8_lossy(&openssl(&all)).into_owned()
}

/// The leaf certificate (PEM) the agent at `ip:port` serves in its TLS handshake, asked for
/// `server_name` by SNI. The handshake itself fails (no client certificate): the server's
/// certificate comes before that.
pub fn served_certificate(ip: &str, port: u16, server_name: &str) -> String {
    try_served_certificate(ip, port, server_name)
        .unwrap_or_else(|error| panic!("no certificate from {ip}:{port}: {error}"))
}

/// [`served_certificate`], or what went wrong (e.g. the agent is restarting).
pub fn try_served_certificate(ip: &str, port: u16, server_name: &str) -> Result<String, String> {
    let out = Command::new("timeout")
        .arg("20")
        .arg("openssl")
        .args(["s_client", "-connect", &format!("{ip}:{port}")])
        .args(["-servername", server_name])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("openssl s_client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    match (text.find(begin), text.find(end)) {
        (Some(b), Some(e)) if e > b => Ok(format!("{}\n", &text[b..e + end.len()])),
        _ => Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))),
    }
}
