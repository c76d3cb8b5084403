//! Issue #19's attacks, run on a real cluster (`IGNIS_E2E_KUBECONFIG`, `IGNIS_E2E_CLUSTER_ENV`)
//! as a tenant: a ServiceAccount that may only create MicroVMs and Secrets in one namespace,
//! with a token from `kubectl create token` and a kubeconfig holding nothing else. Each attack
//! must be refused by the API or end `Failed` with a permanent reason and never start a VMM;
//! an evil image is contained. Then, on the node (this host: the nodes share its PID namespace
//! and file system), no VMM of the cluster has a named resource open (or the image cache open
//! for writing), nothing was written outside the image cache, the cache holds no device node
//! and no setuid or setgid file, and the tenant's VMMs run with uids and gids other than 0, no
//! capability, `no_new_privs` and a seccomp filter (`Seccomp: 2`).
//!
//! Runs with VM pods on or off (`IGNIS_CLUSTER_VM_PODS`); TCG is not attacked: the test
//! cluster's nodes have no usable KVM, so its admin allows TCG.

#[path = "attacks/image.rs"]
mod image;
#[path = "attacks/node.rs"]
mod node;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ignis::api::InterfaceMode;
use ignis::testing::MicroVmBuilder;
use ignis_e2e::Cluster;
use ignis_e2e::upstream::Upstream;

use image::{Entry, Registry};

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

impl Tenant<'_> {
    fn apply(&self, yaml: &str) -> (bool, String) {
        self.kubectl(&["apply", "-f", "-"], Some(yaml))
    }

    fn get(&self, name: &str, jsonpath: &str) -> String {
        let (_, out) = self.kubectl(
            &["get", "mvm", name, "-o", &format!("jsonpath={jsonpath}")],
            None,
        );
        out.trim().to_string()
    }
}

/// An attack: a MicroVM the tenant applies, and the reasons its failure may give (any when
/// empty).
struct Attack {
    name: String,
    yaml: String,
    reasons: Vec<&'static str>,
}

impl Attack {
    fn new(
        name: &str,
        reasons: &[&'static str],
        edit: impl FnOnce(&mut serde_json::Value),
    ) -> Self {
        Attack {
            name: name.to_string(),
            yaml: manifest(name, edit),
            reasons: reasons.to_vec(),
        }
    }
}

/// Symlinks the test plants in the admin's guest directory (as a careless admin or a
/// compromised image build might), removed on drop.
struct Planted(Vec<PathBuf>);

impl Drop for Planted {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Applies every attack, then waits (at most three minutes in all) until each is refused by
/// the API or `Failed` with one of its reasons; none may ever be `Running`. Returns the
/// MicroVM uid of each one the API accepted.
fn all_refused_or_failed(t: &Tenant<'_>, attacks: &[Attack]) -> Vec<(String, String)> {
    let mut pending = Vec::new();
    for a in attacks {
        let (applied, out) = t.apply(&a.yaml);
        if applied {
            pending.push(a);
        } else {
            assert!(
                (out.contains("denied") || out.contains("Invalid") || out.contains("invalid"))
                    && out.contains("spec."),
                "{}: the API refused it, but not by validation naming the field: {out}",
                a.name
            );
            println!("{}: refused by the API: {}", a.name, out.trim());
        }
    }
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !pending.is_empty() {
        pending.retain(|a| {
            let phase = t.get(&a.name, "{.status.phase}");
            assert_ne!(phase, "Running", "{} must never run", a.name);
            if phase != "Failed" {
                return true;
            }
            let why = t.get(&a.name, "{.status.conditions[*].reason}");
            let message = t.get(&a.name, "{.status.conditions[*].message}");
            assert!(
                a.reasons.is_empty() || a.reasons.iter().any(|r| why.contains(r)),
                "{}: failed with {why:?} ({message}), expected one of {:?}",
                a.name,
                a.reasons
            );
            println!("{}: Failed, {why}: {message}", a.name);
            accepted.push((a.name.clone(), t.get(&a.name, "{.metadata.uid}")));
            false
        });
        if pending.is_empty() {
            break;
        }
        let names: Vec<&str> = pending.iter().map(|a| a.name.as_str()).collect();
        assert!(
            Instant::now() < deadline,
            "neither refused nor Failed within 3 minutes: {names:?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    accepted
}

/// Waits (at most four minutes) for the tenant's MicroVM `name` to be Running; its uid.
fn running(t: &Tenant<'_>, name: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let phase = t.get(name, "{.status.phase}");
        if phase == "Running" {
            return t.get(name, "{.metadata.uid}");
        }
        assert!(
            phase != "Failed" && Instant::now() < deadline,
            "{name} is not Running ({phase:?}): {}",
            t.get(name, "{.status.conditions}")
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The hostile images, pushed to the cluster's registry: their references (contained, escapes
/// through symlinks and hard links, path traversal, too large).
fn evil_images(up: &Upstream, nonce: &str) -> [String; 4] {
    let registry = Registry {
        addr: up
            .registry
            .clone()
            .expect("cluster.env names no REGISTRY (scripts/cluster.sh up runs one)"),
        creds: up
            .registry_creds
            .clone()
            .expect("cluster.env names no REGISTRY_CREDS"),
    };
    // The demo guest's initrd, so the contained image boots.
    let initrd_path = up.nodes[0].agent_state_dir.join("guest/initrd.cpio");
    let initrd = std::fs::read(&initrd_path)
        .unwrap_or_else(|e| panic!("the demo guest's initrd {}: {e}", initrd_path.display()));
    let contained = image::tar(&[
        Entry::Dir("boot/"),
        Entry::File("boot/initrd.img", 0o644, &initrd),
        Entry::Dir("dev/"),
        Entry::Device("dev/evil-mem", true, 1, 1),
        Entry::Device("dev/evil-disk", false, 254, 0),
        Entry::Dir("bin/"),
        Entry::File("bin/evil-setuid", 0o4755, b"#!/bin/sh\n"),
        Entry::File("bin/evil-setgid", 0o2755, b"#!/bin/sh\n"),
        // Symlinks out of the tree are kept as symlinks (they resolve in the image's root).
        Entry::Symlink("escape", "/var/lib/ignis"),
        Entry::Symlink("climb", "../../../../../../../.."),
    ]);
    // A file written through a symlink that leaves the tree, the same by climbing, a hard
    // link to a node file.
    let escape = format!("escape/pwned-symlink-{nonce}");
    let climb = format!("climb/var/lib/ignis/pwned-climb-{nonce}");
    let escapes = image::tar(&[
        Entry::Dir("boot/"),
        Entry::Symlink("escape", "/var/lib/ignis"),
        Entry::File(&escape, 0o644, b"pwned"),
        Entry::Symlink("climb", "../../../../../../../.."),
        Entry::File(&climb, 0o644, b"pwned"),
        Entry::HardLink("boot/shadow", "/etc/shadow"),
        Entry::File("boot/initrd.img", 0o644, b"not an initrd"),
    ]);
    let traversal_name = format!("../../../../../../var/lib/ignis/pwned-dotdot-{nonce}");
    let traversal = image::tar(&[
        Entry::Dir("boot/"),
        Entry::File(&traversal_name, 0o644, b"pwned"),
        Entry::File("boot/initrd.img", 0o644, b"not an initrd"),
    ]);
    let small = image::tar(&[Entry::File("boot/initrd.img", 0o644, b"tiny")]);
    [
        registry.push(&format!("attacks/contained-{nonce}"), &contained, None),
        registry.push(&format!("attacks/escapes-{nonce}"), &escapes, None),
        registry.push(&format!("attacks/traversal-{nonce}"), &traversal, None),
        // 64 GiB declared: above any default limit (4Gi compressed).
        registry.push(&format!("attacks/huge-{nonce}"), &small, Some(64 << 30)),
    ]
}

/// The legitimate VM's guest can send only as itself and reaches neither the node's services
/// nor link-local metadata: the rules that say so are in place where its tap is (they are
/// exercised packet by packet in tests/net_guard.rs and the VM-pod tests).
fn network_contained(up: &Upstream, t: &Tenant<'_>, vm_pods: bool, vmm: u32) {
    let nft = |mut cmd: std::process::Command, table: &[&str]| {
        let out = cmd
            .args(["list", "table"])
            .args(table)
            .output()
            .expect("nft runs");
        assert!(
            out.status.success(),
            "nft list table {table:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    if vm_pods {
        // The VMM is in its pod's network namespace, where the tap and the table are.
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{vmm}/ns/net"))
            .args(["--", "nft"]);
        let rules = nft(cmd, &["ip", "ignis_pod"]);
        for needle in [
            "iifname \"tap0\" ip saddr != 10.0.2.2 drop",
            "iifname \"tap0\" ether saddr != ",
        ] {
            assert!(
                rules.contains(needle),
                "VMM {vmm}'s pod lacks {needle:?}:\n{rules}"
            );
        }
        return;
    }
    let node = t.get("legit", "{.status.nodeName}");
    let ip = t.get("legit", "{.status.ipAddresses[0]}");
    assert!(!ip.is_empty(), "legit has an address");
    let guard = nft(up.in_node_netns(&node, "nft"), &["bridge", "ignis"]);
    assert!(
        guard.contains(&format!("ip saddr {ip}")) && guard.contains("drop"),
        "node {node}'s guard lets only {ip} out of its tap:\n{guard}"
    );
    let filter = nft(up.in_node_netns(&node, "nft"), &["ip", "ignis"]);
    for needle in ["hook input", "169.254.0.0/16"] {
        assert!(
            filter.contains(needle),
            "node {node}'s ip ignis lacks {needle:?}:\n{filter}"
        );
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
    let Some(up) = Upstream::from_env() else {
        return;
    };
    let cluster = Cluster::start();
    let _ns = cluster.namespace(NS);
    let dir = tempfile::tempdir().expect("tempdir");
    let t = tenant(&cluster, dir.path());
    let nonce = format!(
        "{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );

    // Ignis' own Secrets and every other namespace are out of the tenant's reach.
    for secret in ["ignis-ca", "ignis-agent-tls"] {
        let (ok, out) = t.kubectl(&["get", "secret", secret, "-n", "ignis-system"], None);
        assert!(!ok && out.contains("forbidden"), "{secret}: {out}");
    }

    // A legitimate VM of the tenant's: its VMM is the one checked for confinement, its network
    // for the anti-spoofing and node-service rules. With VM pods it is on the pod's network
    // (the default), without on the node's NAT bridge.
    let values: serde_json::Value =
        serde_json::from_str(&up.helm_ok(&["get", "values", &up.release, "--all", "-o", "json"]))
            .expect("helm values");
    let vm_pods = values["controller"]["vmPods"]["enabled"] != false;
    println!("VM pods: {vm_pods}");
    let (ok, out) = t.apply(&manifest("legit", |spec| {
        if !vm_pods {
            spec["network"] =
                serde_json::json!({ "interfaces": [{ "name": "eth0", "mode": "nat" }] });
        }
    }));
    assert!(ok, "the tenant's own VM: {out}");

    // Symlinks in the admin's directory pointing out of it (absolute, and climbing).
    let guest_host = up.nodes[0].agent_state_dir.join("guest");
    let key_link = format!("attack-{nonce}-key");
    let climb_link = format!("attack-{nonce}-climb");
    let planted = Planted(vec![
        guest_host.join(&key_link),
        guest_host.join(&climb_link),
    ]);
    std::os::unix::fs::symlink("/etc/ignis/tls/tls.key", &planted.0[0]).expect("plant");
    std::os::unix::fs::symlink("../../../../../../..", &planted.0[1]).expect("plant");

    let (secret_ok, out) = t.kubectl(
        &[
            "create",
            "secret",
            "docker-registry",
            "regcred",
            &format!(
                "--docker-server={}",
                up.registry.clone().unwrap_or_default()
            ),
            &format!(
                "--docker-username={}",
                up.registry_creds
                    .clone()
                    .unwrap_or_default()
                    .split(':')
                    .next()
                    .unwrap_or("")
            ),
            &format!(
                "--docker-password={}",
                up.registry_creds
                    .clone()
                    .unwrap_or_default()
                    .split_once(':')
                    .map(|c| c.1)
                    .unwrap_or("")
            ),
        ],
        None,
    );
    assert!(secret_ok, "the tenant's pull secret: {out}");
    let [contained, escapes, traversal, huge] = evil_images(&up, &nonce);
    let with_image = |spec: &mut serde_json::Value, field: &str, image: &str| {
        spec[field] = serde_json::json!({ "image": image });
        spec["imagePullSecrets"] = serde_json::json!([{ "name": "regcred" }]);
    };

    let path = |name: &str, field: &'static str, path: String| {
        Attack::new(name, &["PathNotAllowed"], move |spec| {
            spec[field] = serde_json::json!({ "path": path });
        })
    };
    let attacks = vec![
        path("steal-tls-key", "initrd", "/etc/ignis/tls/tls.key".into()),
        path("other-vms-images", "rootfs", "/var/lib/ignis/nodes".into()),
        path("node-disk", "rootfs", "/dev/vda".into()),
        path("node-shadow", "kernel", "/proc/1/root/etc/shadow".into()),
        path(
            "dotdot",
            "rootfs",
            "/var/lib/ignis/guest/../../../etc/shadow".into(),
        ),
        path(
            "symlink-key",
            "initrd",
            format!("/var/lib/ignis/guest/{key_link}"),
        ),
        path(
            "symlink-climb",
            "rootfs",
            format!("/var/lib/ignis/guest/{climb_link}/etc/shadow"),
        ),
        Attack::new("pod-bridge", &["BridgeNotAllowed"], |spec| {
            let mut with = MicroVmBuilder::sample("x")
                .interface("eth0", InterfaceMode::Bridge)
                .json();
            with["spec"]["network"]["interfaces"][0]["bridge"] = "cni0".into();
            with["spec"]["network"]["interfaces"][0]["address"] = "10.244.0.250/24".into();
            spec["network"] = with["spec"]["network"].take();
        }),
        Attack::new("image-escapes", &["ImageBadLayout"], |spec| {
            with_image(spec, "initrd", &escapes)
        }),
        Attack::new("image-traversal", &["ImageBadLayout"], |spec| {
            with_image(spec, "initrd", &traversal)
        }),
        Attack::new("image-huge", &["ImageTooLarge"], |spec| {
            with_image(spec, "initrd", &huge)
        }),
    ];
    // The contained image runs: its device nodes, setuid bits and escapes are dropped.
    let (ok, out) = t.apply(&manifest("image-contained", |spec| {
        with_image(spec, "initrd", &contained)
    }));
    assert!(ok, "image-contained: {out}");
    let refused = all_refused_or_failed(&t, &attacks);
    let legit_uid = running(&t, "legit");
    let contained_uid = running(&t, "image-contained");

    // The VM of another tenant's image: the cache file itself, now that one is there.
    let cache_files = node::find_bad(&up.nodes[0].agent_state_dir.join("images"), &|p, m| {
        (m.is_file() && p.ends_with("initrd.img")).then(|| "a cached initrd".to_string())
    });
    let cached = cache_files
        .iter()
        .filter_map(|f| f.split(": ").next())
        .find_map(|f| {
            let rel = Path::new(f)
                .strip_prefix(&up.nodes[0].agent_state_dir)
                .ok()?;
            Some(format!(
                "/var/lib/ignis/nodes/{}/{}",
                up.nodes[0].name,
                rel.display()
            ))
        });
    let mut refused = refused;
    if let Some(cached) = &cached {
        refused.extend(all_refused_or_failed(
            &t,
            &[path("cached-initrd-as-disk", "rootfs", cached.clone())],
        ));
    }

    // On the node: no VMM for any refused VM; the tenant's VMMs confined.
    let vmms = node::vmms(&up);
    for (name, uid) in &refused {
        let started = node::vmms_of(&vmms, uid);
        assert!(started.is_empty(), "{name}: a VMM was started: {started:?}");
    }
    for (name, uid) in [("legit", &legit_uid), ("image-contained", &contained_uid)] {
        let of = node::vmms_of(&vmms, uid);
        assert_eq!(of.len(), 1, "one VMM for {name} ({uid}): {vmms:?}");
        node::assert_confined(of[0].pid, name);
        println!("{name}: VMM {} confined", of[0].pid);
    }
    network_contained(&up, &t, vm_pods, node::vmms_of(&vmms, &legit_uid)[0].pid);

    // No VMM of the cluster has a named resource open, or a cached image open for writing.
    for vmm in &vmms {
        for f in node::open_files(vmm.pid) {
            let named = f.target.ends_with("/tls.key")
                || f.target.ends_with("/etc/shadow")
                || f.target.starts_with("/dev/vd")
                || f.target.starts_with("/dev/sd")
                || f.target.starts_with("/dev/mem");
            assert!(!named, "VMM {} has {} open", vmm.pid, f.target);
            assert!(
                !(f.writable && f.target.contains("/images/")),
                "VMM {} has the image cache's {} open for writing",
                vmm.pid,
                f.target
            );
        }
    }
    // Nothing written outside the image cache: the cluster's directories (every node's and
    // every container's file system, the agents' state) and the host's /tmp and /etc.
    let cluster_dir = up.kubeconfig.parent().expect("the cluster's directory");
    for root in [cluster_dir, Path::new("/tmp"), Path::new("/etc")] {
        // The files the images name are `pwned-<how>-<nonce>` (the registry's own copies
        // of the images are named for their repositories, not so).
        let escaped = node::find_bad(root, &|p, _| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            (name.starts_with("pwned-")
                && name.ends_with(&nonce)
                && !p.to_string_lossy().contains("/images/"))
            .then(|| "written by an image".to_string())
        });
        assert!(
            escaped.is_empty(),
            "written outside the image cache: {escaped:?}"
        );
    }
    // The cache holds no device node and no setuid or setgid file.
    for n in &up.nodes {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let bad = node::find_bad(&n.agent_state_dir.join("images"), &|_, m| {
            let t = m.file_type();
            if t.is_block_device() || t.is_char_device() {
                Some("a device node".into())
            } else if !t.is_symlink() && m.permissions().mode() & 0o6000 != 0 {
                Some(format!("mode {:o}", m.permissions().mode()))
            } else {
                None
            }
        });
        assert!(bad.is_empty(), "node {}'s image cache: {bad:?}", n.name);
    }
    drop(planted);
}
