//! Issue #19's attacks, run on a real cluster (`IGNIS_E2E_KUBECONFIG`) as a tenant: a
//! ServiceAccount that may only create MicroVMs and Secrets in one namespace, with a token
//! from `kubectl create token` and a kubeconfig holding nothing else. Each attack must be
//! refused by the API or end `Failed` with a permanent reason, and never run; the tenant can
//! read none of Ignis' own Secrets.
//!
//! Written against docs/security.md and the VM-pod contract: the host-path refusals come with
//! the confined VMM (branch `jailer`). TCG is not attacked here: the test cluster's nodes have
//! no usable KVM, so its admin allows TCG.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ignis::api::InterfaceMode;
use ignis::testing::MicroVmBuilder;
use ignis_e2e::Cluster;

const NS: &str = "e2e-attacks";
const SA: &str = "tenant";

/// The tenant's kubectl: a kubeconfig with the cluster's address and CA and the token only.
struct Tenant<'a> {
    cluster: &'a Cluster,
    kubeconfig: PathBuf,
}

impl Tenant<'_> {
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut child = self
            .cluster
            .command("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--request-timeout=30s")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("kubectl output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

fn tenant<'a>(cluster: &'a Cluster, dir: &Path) -> Tenant<'a> {
    cluster.kubectl_ok(&["create", "serviceaccount", SA, "-n", NS]);
    cluster.kubectl_ok(&[
        "create",
        "role",
        "tenant",
        "-n",
        NS,
        "--verb=get,list,watch,create,update,patch,delete",
        "--resource=microvms.ignis.dev,secrets",
    ]);
    cluster.kubectl_ok(&[
        "create",
        "rolebinding",
        "tenant",
        "-n",
        NS,
        "--role=tenant",
        &format!("--serviceaccount={NS}:{SA}"),
    ]);
    let token = cluster.kubectl_ok(&["create", "token", SA, "-n", NS, "--duration=1h"]);
    let server = cluster.kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.server}",
    ]);
    let ca = cluster.kubectl_ok(&[
        "config",
        "view",
        "--raw",
        "--minify",
        "-o",
        "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ]);
    let kubeconfig = dir.join("tenant.kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: tenant\n  user:\n    token: {}\ncontexts:\n- name: t\n  context: {{cluster: c, user: tenant, namespace: {NS}}}\ncurrent-context: t\n",
            token.trim()
        ),
    )
    .expect("write the tenant's kubeconfig");
    Tenant {
        cluster,
        kubeconfig,
    }
}

/// The demo guest with `edit` applied to its manifest.
fn manifest(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut vm = MicroVmBuilder::sample(name)
        .guest(
            Path::new("/var/lib/ignis/guest/vmlinuz"),
            Path::new("/var/lib/ignis/guest/initrd.cpio"),
        )
        .memory("128Mi")
        .grace_period_seconds(5)
        .json();
    edit(&mut vm["spec"]);
    serde_json::to_string(&vm).expect("json")
}

/// Applied by the tenant: refused by the API, or `Failed` with a reason among `reasons` (any
/// reason when empty) within two minutes, never `Running`.
fn refused_or_failed(t: &Tenant<'_>, name: &str, yaml: &str, reasons: &[&str]) {
    let (applied, out) = t.kubectl(&["apply", "-f", "-"], Some(yaml));
    if !applied {
        assert!(
            out.contains("denied") || out.contains("Invalid") || out.contains("invalid"),
            "{name}: the API refused it, but not by validation: {out}"
        );
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, phase) = t.kubectl(
            &["get", "mvm", name, "-o", "jsonpath={.status.phase}"],
            None,
        );
        assert_ne!(phase.trim(), "Running", "{name} must never run");
        if phase.trim() == "Failed" {
            let (_, why) = t.kubectl(
                &[
                    "get",
                    "mvm",
                    name,
                    "-o",
                    "jsonpath={.status.conditions[*].reason}",
                ],
                None,
            );
            assert!(
                reasons.is_empty() || reasons.iter().any(|r| why.contains(r)),
                "{name}: failed with {why:?}, expected one of {reasons:?}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: neither refused nor Failed (phase {phase:?})"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn a_tenant_cannot_reach_the_node_through_a_microvm() {
    if std::env::var("IGNIS_E2E_KUBECONFIG").is_err() {
        assert!(
            std::env::var("IGNIS_REQUIRE_ALL").as_deref() != Ok("1"),
            "the attack suite needs a cluster: set IGNIS_E2E_KUBECONFIG (scripts/cluster.sh up)"
        );
        println!("skipped: the attack suite runs on a cluster (IGNIS_E2E_KUBECONFIG)");
        return;
    }
    let cluster = Cluster::start();
    let _ns = cluster.namespace(NS);
    let dir = tempfile::tempdir().expect("tempdir");
    let t = tenant(&cluster, dir.path());

    // Ignis' own Secrets and every other namespace are out of the tenant's reach.
    for secret in ["ignis-ca", "ignis-agent-tls"] {
        let (ok, out) = t.kubectl(&["get", "secret", secret, "-n", "ignis-system"], None);
        assert!(!ok && out.contains("forbidden"), "{secret}: {out}");
    }

    let host_paths: [(&str, &str, &str); 4] = [
        ("steal-tls-key", "initrd", "/etc/ignis/tls/tls.key"),
        (
            "other-vms-image",
            "rootfs",
            "/var/lib/ignis/images/entries/initrd",
        ),
        ("node-disk", "rootfs", "/dev/vda"),
        ("node-shadow", "kernel", "/proc/1/root/etc/shadow"),
    ];
    for (name, field, path) in host_paths {
        let yaml = manifest(name, |spec| {
            spec[field] = serde_json::json!({ "path": path });
        });
        refused_or_failed(&t, name, &yaml, &[]);
    }

    let bridge = manifest("pod-bridge", |spec| {
        let mut with = MicroVmBuilder::sample("x")
            .interface("eth0", InterfaceMode::Bridge)
            .json();
        with["spec"]["network"]["interfaces"][0]["bridge"] = "cni0".into();
        with["spec"]["network"]["interfaces"][0]["address"] = "10.244.0.250/24".into();
        spec["network"] = with["spec"]["network"].take();
    });
    refused_or_failed(&t, "pod-bridge", &bridge, &["BridgeNotAllowed"]);
}
