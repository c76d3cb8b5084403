//! A MicroVM from registry images, end to end through kubectl: its kernel, initrd and root
//! disk come from a registry (the debootstrap test guest of `scripts/build-test-guest.sh`,
//! pushed with skopeo), pulled with an `imagePullSecrets` Secret made by `kubectl create secret
//! docker-registry`. The pull is visible (`Pulling` Event), the status shows each image's
//! digest, the guest takes its address by DHCP, answers HTTP on it and shows that its user
//! data ran; deleting the MicroVM stops it.
//!
//! Where the registry is:
//! - On `ignis dev` (the default) the test starts Debian's `docker-registry` with basic auth on
//!   the loopback of a network namespace of its own, where `ignis dev` and kubectl run too, so
//!   the agent reaches it over plain HTTP like any loopback registry. The registry is killed
//!   and the namespace removed when the test ends, pass or fail.
//! - On a real cluster (`IGNIS_E2E_KUBECONFIG`) the agent runs in the cluster's network
//!   namespace and cannot reach a registry on this host's loopback. The cluster of
//!   `scripts/cluster.sh` runs a registry with a login on its node's address, which this host
//!   and the agent both reach (it is in the agent's `--insecure-registry`); its `cluster.env`
//!   (`IGNIS_E2E_CLUSTER_ENV`) names it. Elsewhere set `IGNIS_E2E_REGISTRY` to a registry
//!   (`host:port`) that both this host (skopeo pushes to it) and the agent reach — over HTTPS,
//!   on the agent's own loopback, or listed in its `--insecure-registry` — and, if it needs a
//!   login, `IGNIS_E2E_REGISTRY_CREDS=user:password` (then the test pulls through an
//!   `imagePullSecrets` Secret with them). With neither the test prints why and does not run
//!   the case. The guest's address is routable only on its node: with `cluster.env` the HTTP
//!   and user-data checks run in the network namespace of the guest's node, otherwise they are
//!   left to the agent's TCP readiness probe.
//!
//! One TCG boot of the debootstrap guest; every wait is bounded.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ignis_e2e::upstream::Upstream;
use ignis_e2e::{Cluster, http_get_via};

const USER: &str = "e2e";
const PASSWORD: &str = "e2e-registry-pass";
/// The registry's address inside the test's own network namespace (nothing else is there).
const DEV_REGISTRY: &str = "127.0.0.1:5000";
const NETNS: &str = "ignis-e2e-img";
const USER_DATA: &str =
    "#!/bin/sh\necho \"user-data ran on $(hostname)\" > /srv/www/user-data.txt\n";

/// Fail (never skip) when a prerequisite is missing: `scripts/setup.sh` installs them.
fn require_tools() {
    for (tool, package) in [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("htpasswd", "apache2-utils"),
    ] {
        let found = ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(tool).exists());
        assert!(
            found,
            "`{tool}` is missing: run scripts/setup.sh (Debian package {package})"
        );
    }
}

/// The test guest's OCI layout (`scripts/build-test-guest.sh`, cached by content).
fn guest_layout() -> std::path::PathBuf {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-guest.sh");
    let out = Command::new(&script)
        .arg("build")
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-test-guest.sh");
    assert!(
        out.status.success(),
        "scripts/build-test-guest.sh build failed (run scripts/setup.sh first)"
    );
    std::path::PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("layout path")
            .trim(),
    )
}

/// Where the images go: a registry the test runs (killed on drop), or the user's.
struct Registry {
    addr: String,
    /// `user:password`, when the registry wants a login.
    creds: Option<String>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Registry {
    /// Debian's docker-registry with basic auth, started where `cluster` runs.
    fn start(cluster: &Cluster) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let htpasswd = Command::new("htpasswd")
            .args(["-Bbn", USER, PASSWORD])
            .output()
            .expect("htpasswd");
        assert!(htpasswd.status.success(), "htpasswd failed");
        std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout).expect("htpasswd file");
        std::fs::create_dir(dir.path().join("storage")).expect("storage");
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root}/storage\nhttp:\n  addr: {DEV_REGISTRY}\nauth:\n  htpasswd:\n    realm: ignis-e2e\n    path: {root}/htpasswd\n",
            root = dir.path().display()
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("config");
        let log = std::fs::File::create(dir.path().join("registry.log")).expect("log");
        let child = cluster
            .command("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let registry = Registry {
            addr: DEV_REGISTRY.into(),
            creds: Some(format!("{USER}:{PASSWORD}")),
            child: Some(child),
            _dir: Some(dir),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let here = |program: &str| cluster.command(program);
        while !get(&here, &format!("{DEV_REGISTRY}/v2/")).starts_with("HTTP/1.") {
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer on {DEV_REGISTRY} in 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        registry
    }

    /// A registry somebody else runs: `IGNIS_E2E_REGISTRY` (and `IGNIS_E2E_REGISTRY_CREDS`),
    /// or the one `scripts/cluster.sh` runs in its cluster.
    fn external(addr: String, creds: Option<String>) -> Registry {
        Registry {
            addr,
            creds,
            child: None,
            _dir: None,
        }
    }

    fn image(&self, tag: &str) -> String {
        format!("{}/ignis-e2e/{tag}:v1", self.addr)
    }

    /// `skopeo copy` of `tag` of the layout, from where `cluster` runs.
    fn push(&self, cluster: &Cluster, layout: &std::path::Path, tag: &str) {
        let mut cmd = cluster.command("timeout");
        cmd.args([
            "300",
            "skopeo",
            "copy",
            "--quiet",
            "--insecure-policy",
            "--dest-tls-verify=false",
        ]);
        if let Some(creds) = &self.creds {
            cmd.args(["--dest-creds", creds]);
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.image(tag)))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "skopeo push of {} failed: {}",
            self.image(tag),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where a guest's address is routable: the node (the cluster's network namespace), or where
/// `ignis dev` runs.
type OnNode<'a> = &'a dyn Fn(&str) -> Command;
type NodeCommand<'a> = Box<dyn Fn(&str) -> Command + 'a>;

/// An HTTP/1.0 GET of `http://{hostport_path}` from the node: the raw response, or empty when
/// nothing answers within a few seconds.
fn get(on_node: OnNode, hostport_path: &str) -> String {
    let (hostport, path) = hostport_path.split_once('/').unwrap_or((hostport_path, ""));
    http_get_via(on_node, hostport, &format!("/{path}")).unwrap_or_default()
}

/// `get` retried until it answers, for at most `within`.
fn get_within(on_node: OnNode, hostport_path: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let page = get(on_node, hostport_path);
        if page.starts_with("HTTP/1.") || Instant::now() >= deadline {
            return page;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn manifest(registry: &Registry, with_secret: bool) -> String {
    let user_data = USER_DATA.trim_end().replace('\n', "\n    ");
    let secrets = if with_secret {
        "  imagePullSecrets:\n    - name: regcred\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: ignis.dev/v1alpha1
kind: MicroVM
metadata:
  name: web
spec:
  resources:
    memory: 256Mi
  kernel:
    image: {kernel}
    cmdline: "console=ttyS0 panic=-1 quiet ip=dhcp"
  initrd:
    image: {initrd}
  rootfs:
    image: {rootfs}
{secrets}  network:
    interfaces:
      - name: eth0
        mode: nat
  userData: |
    {user_data}
  readiness:
    tcpPort: 80
  terminationGracePeriodSeconds: 5
"#,
        kernel = registry.image("kernel"),
        initrd = registry.image("initrd"),
        rootfs = registry.image("rootfs"),
    )
}

#[test]
fn microvm_from_registry_images_with_a_pull_secret_boots_by_dhcp() {
    let real = std::env::var("IGNIS_E2E_KUBECONFIG").is_ok();
    let upstream = if real { Upstream::from_env() } else { None };
    let external = match std::env::var("IGNIS_E2E_REGISTRY") {
        Ok(addr) => Some((addr, std::env::var("IGNIS_E2E_REGISTRY_CREDS").ok())),
        Err(_) => upstream
            .as_ref()
            .and_then(|u| Some((u.registry.clone()?, u.registry_creds.clone()))),
    };
    if real && external.is_none() {
        println!(
            "not run: on a real cluster the agent lives in the cluster's network namespace and \
             cannot reach a registry on this host's loopback; set IGNIS_E2E_REGISTRY=host:port \
             (a registry both this host and the agent reach; IGNIS_E2E_REGISTRY_CREDS=user:pass \
             if it needs a login) to run the image case there"
        );
        return;
    }
    require_tools();
    // The guest is built outside any namespace (debootstrap needs the Debian mirror).
    let layout = guest_layout();
    let cluster = if real {
        Cluster::start()
    } else {
        Cluster::start_in_netns(NETNS)
            .expect("the image e2e test needs network namespaces (root and iproute2)")
    };
    // Declared after the cluster, so dropped first: the registry dies before its namespace.
    let registry = match external {
        Some((addr, creds)) => Registry::external(addr, creds),
        None => Registry::start(&cluster),
    };
    let pushed = Instant::now();
    for tag in ["kernel", "initrd", "rootfs"] {
        registry.push(&cluster, &layout, tag);
    }
    println!(
        "pushed the test guest to {} in {:.1} s",
        registry.addr,
        pushed.elapsed().as_secs_f64()
    );
    // Dropped before the registry and the cluster: deletes the MicroVM (its VMM, disk, tap).
    let ns = cluster.namespace("e2e-images");
    let ns = ns.name.as_str();
    if let Some((user, password)) = registry.creds.as_deref().and_then(|c| c.split_once(':')) {
        cluster.kubectl_ok(&[
            "create",
            "secret",
            "docker-registry",
            "regcred",
            "-n",
            ns,
            &format!("--docker-server={}", registry.addr),
            &format!("--docker-username={user}"),
            &format!("--docker-password={password}"),
        ]);
    }
    let applied = cluster.apply(ns, &manifest(&registry, registry.creds.is_some()));
    assert!(applied.success, "{}", applied.stderr);
    let started = Instant::now();
    let waited = cluster.kubectl(&[
        "wait",
        "-n",
        ns,
        "--for=condition=Ready",
        "mvm/web",
        "--timeout=300s",
    ]);
    assert!(
        waited.success,
        "not Ready: {}\n{}",
        waited.stderr,
        cluster.describe(ns, "mvm/web")
    );
    println!(
        "MEASURE e2e: apply -> Ready (cold pull of kernel + initrd + rootfs, DHCP, TCG boot of \
         the debootstrap guest) {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Each image with the digest it resolved to.
    let images = cluster.kubectl_ok(&[
        "get",
        "-n",
        ns,
        "mvm/web",
        "-o",
        r#"jsonpath={range .status.images[*]}{.kind}={.image}@{.digest}{"\n"}{end}"#,
    ]);
    for kind in ["kernel", "initrd", "rootfs"] {
        let line = images
            .lines()
            .find(|l| l.starts_with(&format!("{kind}=")))
            .unwrap_or_else(|| panic!("no {kind} image in status: {images}"));
        assert!(
            line.starts_with(&format!("{kind}={}@sha256:", registry.image(kind))),
            "{line}"
        );
    }
    // The pull was visible while it happened.
    let reasons = cluster.event_reasons(ns, "web");
    assert!(reasons.contains("Pulling"), "events: {reasons}");

    let ip = cluster.kubectl_ok(&[
        "get",
        "-n",
        ns,
        "mvm/web",
        "-o",
        "jsonpath={.status.ipAddresses[0]}",
    ]);
    assert!(!ip.is_empty(), "no address in status");
    // The guest's address is routable on its node: the cluster's network namespace, or where
    // `ignis dev` runs.
    let on_node: Option<NodeCommand> = match (&upstream, real) {
        (Some(u), _) => {
            // Its node: the guest's NAT address is routable there only.
            let node = cluster.kubectl_ok(&[
                "get",
                "-n",
                ns,
                "mvm/web",
                "-o",
                "jsonpath={.status.nodeName}",
            ]);
            let u = u.clone();
            Some(Box::new(move |program: &str| {
                u.in_node_netns(&node, program)
            }))
        }
        (None, false) => Some(Box::new(|program: &str| cluster.command(program))),
        (None, true) => None,
    };
    if let Some(on_node) = &on_node {
        // DHCP gave the guest the address in status (its cmdline asks for DHCP); it answers
        // on it, and its user data ran.
        let page = get_within(
            on_node.as_ref(),
            &format!("{ip}:80/user-data.txt"),
            Duration::from_secs(30),
        );
        assert!(
            page.starts_with("HTTP/1.") && page.contains("user-data ran on web"),
            "{ip}: {page:?}\n{}",
            cluster.describe(ns, "mvm/web")
        );
    } else {
        println!(
            "the guest's address {ip} is routable only on its node: HTTP and user data are not \
             checked from here (Ready means the agent's TCP probe on :80 passed)"
        );
    }

    cluster.delete_and_wait(ns, "mvm/web");
    if let Some(on_node) = &on_node {
        assert!(
            get(on_node.as_ref(), &format!("{ip}:80/")).is_empty(),
            "{ip} still answers after delete"
        );
    }
}
