//! GitOps on the upstream cluster, driven only by commits pushed to the git server of
//! `scripts/flux.sh`: Flux's source-controller and kustomize-controller (built from their Go
//! modules) apply the repository with `wait: true` and `prune: true`, and their health checks
//! (kstatus) judge the MicroVMs by our conditions.
//!
//! The Flux test runs on the cluster (`IGNIS_E2E_KUBECONFIG`, Ignis installed) with
//! `IGNIS_E2E_FLUX_REPO` and `IGNIS_E2E_FLUX_KUSTOMIZATION` (printed by `scripts/flux.sh up`):
//! on the cluster without them it fails under `IGNIS_REQUIRE_ALL=1`; against `ignis dev` it
//! says it is skipped, like the other cluster-only tests. The Helm `--wait=watcher` test runs
//! wherever the e2e suite runs (`ignis dev`, or the cluster).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ignis::api::RunPolicy;
use ignis::testing::MicroVmBuilder;
use ignis_e2e::Cluster;

/// Flux's timeout for the Kustomization's health checks (scripts/flux.sh, 3m): a MicroVM
/// that can never run must fail it well before.
const FLUX_TIMEOUT: Duration = Duration::from_secs(180);
const LIMIT: Duration = Duration::from_secs(240);

struct Flux {
    cluster: Cluster,
    namespace: String,
    name: String,
    repo: PathBuf,
    _tmp: tempfile::TempDir,
}

fn flux() -> Option<Flux> {
    if std::env::var("IGNIS_E2E_KUBECONFIG").is_err() {
        println!(
            "skipped: needs the upstream cluster with Flux (IGNIS_E2E_KUBECONFIG, scripts/flux.sh up)"
        );
        return None;
    }
    let (Ok(url), Ok(kustomization)) = (
        std::env::var("IGNIS_E2E_FLUX_REPO"),
        std::env::var("IGNIS_E2E_FLUX_KUSTOMIZATION"),
    ) else {
        assert!(
            std::env::var("IGNIS_REQUIRE_ALL").as_deref() != Ok("1"),
            "IGNIS_REQUIRE_ALL=1 on the cluster but IGNIS_E2E_FLUX_REPO or \
             IGNIS_E2E_FLUX_KUSTOMIZATION is unset: run scripts/flux.sh up and export what it prints"
        );
        println!("skipped: Flux is not installed (scripts/flux.sh up prints IGNIS_E2E_FLUX_*)");
        return None;
    };
    let (namespace, name) = kustomization
        .split_once('/')
        .expect("IGNIS_E2E_FLUX_KUSTOMIZATION is namespace/name");
    let tmp = tempfile::tempdir().expect("tmp");
    let repo = tmp.path().join("repo");
    git(tmp.path(), &["clone", "-q", &url, "repo"]);
    git(&repo, &["config", "user.name", "ignis-e2e"]);
    git(&repo, &["config", "user.email", "e2e@ignis.invalid"]);
    Some(Flux {
        cluster: Cluster::start(),
        namespace: namespace.to_string(),
        name: name.to_string(),
        repo,
        _tmp: tmp,
    })
}

/// `git ARGS` in `dir`, bounded by coreutils' `timeout`.
fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["60", "git"])
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The Kustomization's last attempted revision, Ready status and Ready message.
#[derive(Debug)]
struct KsState {
    attempted: String,
    applied: String,
    ready: String,
    message: String,
}

impl Flux {
    /// Write (`Some`) or remove (`None`) files, commit, push; the commit's sha.
    fn commit(&self, files: &[(&str, Option<&str>)], message: &str) -> String {
        for (name, content) in files {
            let path = self.repo.join(name);
            match content {
                Some(text) => std::fs::write(&path, text).expect("write"),
                None => {
                    git(&self.repo, &["rm", "-q", name]);
                }
            }
        }
        git(&self.repo, &["add", "-A"]);
        git(&self.repo, &["commit", "-q", "-m", message]);
        git(&self.repo, &["push", "-q", "origin", "HEAD:main"]);
        git(&self.repo, &["rev-parse", "HEAD"])
    }

    fn state(&self) -> KsState {
        let out = self.cluster.kubectl(&[
            "get",
            "-n",
            &self.namespace,
            &format!("kustomization/{}", self.name),
            "-o",
            "jsonpath={.status.lastAttemptedRevision}\t{.status.lastAppliedRevision}\t{.status.conditions[?(@.type==\"Ready\")].status}\t{.status.conditions[?(@.type==\"Ready\")].message}",
        ]);
        let text = out.stdout;
        let mut parts = text.splitn(4, '\t').map(str::to_string);
        KsState {
            attempted: parts.next().unwrap_or_default(),
            applied: parts.next().unwrap_or_default(),
            ready: parts.next().unwrap_or_default(),
            message: parts.next().unwrap_or_default(),
        }
    }

    /// Wait until the Kustomization's verdict on `sha` is `ready` ("True" or "False"),
    /// calling `check` on every state seen meanwhile; the state and the time it took.
    fn verdict(
        &self,
        sha: &str,
        ready: &str,
        mut check: impl FnMut(&KsState),
    ) -> (KsState, Duration) {
        let start = Instant::now();
        loop {
            let s = self.state();
            check(&s);
            let revision = if ready == "True" {
                &s.applied
            } else {
                &s.attempted
            };
            if revision.ends_with(sha) && s.ready == ready {
                return (s, start.elapsed());
            }
            assert!(
                start.elapsed() < LIMIT,
                "the Kustomization never said Ready={ready} on {sha} within {LIMIT:?}; last: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn mvm(&self, name: &str, path: &str) -> String {
        let out = self.cluster.kubectl(&[
            "get",
            "-n",
            "default",
            &format!("mvm/{name}"),
            "-o",
            &format!("jsonpath={path}"),
        ]);
        if out.success {
            out.stdout
        } else {
            String::new()
        }
    }

    fn mvm_exists(&self, name: &str) -> bool {
        self.cluster
            .kubectl(&["get", "-n", "default", &format!("mvm/{name}")])
            .success
    }

    /// The uid of the MicroVM's pod `vm-<name>` (with VM pods on), or empty when it has none.
    fn vm_pod(&self, name: &str) -> String {
        self.cluster
            .kubectl(&[
                "get",
                "-n",
                "default",
                &format!("pod/vm-{name}"),
                "-o",
                "jsonpath={.metadata.uid}",
                "--ignore-not-found",
            ])
            .stdout
    }

    /// The Kustomization's `Healthy` condition: status and message.
    fn healthy(&self) -> (String, String) {
        let out = self.cluster.kubectl_ok(&[
            "get",
            "-n",
            &self.namespace,
            &format!("kustomization/{}", self.name),
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Healthy\")].status}\t{.status.conditions[?(@.type==\"Healthy\")].message}",
        ]);
        let (status, message) = out.split_once('\t').unwrap_or((&out, ""));
        (status.to_string(), message.to_string())
    }
}

const READY: &str = "{.status.conditions[?(@.type==\"Ready\")].status}";

/// The demo guest as a MicroVM, in the `default` namespace the Kustomization targets.
fn vm(cluster: &Cluster, name: &str) -> MicroVmBuilder {
    MicroVmBuilder::sample(name)
        .guest(
            &cluster.guest_dir.join("vmlinuz"),
            &cluster.guest_dir.join("initrd.cpio"),
        )
        .memory("128Mi")
        .cmdline("console=ttyS0 panic=-1 quiet")
        .grace_period_seconds(5)
}

#[test]
fn flux_syncs_microvms_from_git() {
    let Some(f) = flux() else { return };
    let base = vm(&f.cluster, "gitops-vm").yaml();

    // 1. A MicroVM committed: the Kustomization is Ready only once the MicroVM is, and
    //    Flux's health check (kstatus) is what said so.
    let pushed = Instant::now();
    let sha = f.commit(&[("vm.yaml", Some(&base))], "add gitops-vm");
    let mut early = Vec::new();
    let mut seen_applying = false;
    f.verdict(&sha, "True", |s| {
        if s.applied.ends_with(&sha) && s.ready == "True" && f.mvm("gitops-vm", READY) != "True" {
            early.push(format!("{s:?}"));
        }
        seen_applying |= f.mvm_exists("gitops-vm") && f.mvm("gitops-vm", READY) != "True";
    });
    let took = pushed.elapsed();
    assert!(early.is_empty(), "Ready before the MicroVM: {early:?}");
    assert!(
        seen_applying,
        "never saw the MicroVM applied and not yet Ready while Flux waited"
    );
    assert_eq!(f.mvm("gitops-vm", READY), "True");
    let (healthy, said) = f.healthy();
    assert_eq!(healthy, "True", "Flux's Healthy condition: {said}");
    println!("measured: git push -> Kustomization Ready with the VM Ready: {took:?} ({said})");
    let uid = f.mvm("gitops-vm", "{.metadata.uid}");
    assert!(!uid.is_empty());
    assert!(
        !ignis_e2e::upstream::pids_matching(&uid).is_empty(),
        "no VMM runs gitops-vm ({uid})"
    );
    // With VM pods on (the chart's default) the VM runs in pod vm-gitops-vm; without, the
    // controller places it itself and there is no pod. Either way removal must leave none.
    let pod = f.vm_pod("gitops-vm");
    println!(
        "gitops-vm runs {}",
        if pod.is_empty() {
            "without a pod (VM pods off)".to_string()
        } else {
            format!("in pod vm-gitops-vm ({pod})")
        }
    );

    // 2. A changed spec: applied, and the Kustomization waits for the new generation.
    let changed = vm(&f.cluster, "gitops-vm").grace_period_seconds(7).yaml();
    let sha = f.commit(&[("vm.yaml", Some(&changed))], "gitops-vm: longer grace");
    f.verdict(&sha, "True", |_| {});
    let generation = f.mvm("gitops-vm", "{.metadata.generation}");
    assert_eq!(generation, "2");
    assert_eq!(
        f.mvm("gitops-vm", "{.status.observedGeneration}"),
        generation
    );
    assert_eq!(
        f.mvm("gitops-vm", "{.spec.terminationGracePeriodSeconds}"),
        "7"
    );

    // 3. A manifest the API refuses: the Kustomization fails naming the field.
    let bad = vm(&f.cluster, "gitops-bad").vcpus(0).yaml();
    let sha = f.commit(&[("bad.yaml", Some(&bad))], "add an invalid MicroVM");
    let (s, _) = f.verdict(&sha, "False", |_| {});
    assert!(s.message.contains("spec.resources.vcpus"), "{s:?}");
    let sha = f.commit(&[("bad.yaml", None)], "remove the invalid MicroVM");
    f.verdict(&sha, "True", |_| {});

    // 4. A MicroVM no node can take: the Kustomization fails early, not at its timeout.
    let stuck = vm(&f.cluster, "gitops-stuck")
        .node_selector("ignis.dev/e2e-no-such-node", "nowhere")
        .yaml();
    let pushed = Instant::now();
    let sha = f.commit(&[("stuck.yaml", Some(&stuck))], "add gitops-stuck");
    let (s, _) = f.verdict(&sha, "False", |_| {});
    let took = pushed.elapsed();
    assert!(
        took < FLUX_TIMEOUT / 2,
        "failed only after {took:?} (timeout {FLUX_TIMEOUT:?}): {s:?}"
    );
    assert!(
        s.message.contains("MicroVM/default/gitops-stuck") && s.message.contains("Failed"),
        "{s:?}"
    );
    assert_eq!(
        f.mvm(
            "gitops-stuck",
            "{.status.conditions[?(@.type==\"Stalled\")].reason}"
        ),
        "Unschedulable"
    );
    println!("measured: git push -> Kustomization failed on an unplaceable MicroVM: {took:?}");
    let sha = f.commit(&[("stuck.yaml", None)], "remove gitops-stuck");
    f.verdict(&sha, "True", |_| {});
    assert!(!f.mvm_exists("gitops-stuck"), "pruned");

    // 5. Removed from git: pruned, and its VM (and pod, with VM pods on) are gone.
    assert_eq!(
        f.mvm("gitops-vm", "{.metadata.uid}"),
        uid,
        "the same MicroVM"
    );
    let start = Instant::now();
    let sha = f.commit(&[("vm.yaml", None)], "remove gitops-vm");
    while f.mvm_exists("gitops-vm")
        || !ignis_e2e::upstream::pids_matching(&uid).is_empty()
        || !f.vm_pod("gitops-vm").is_empty()
    {
        assert!(
            start.elapsed() < LIMIT,
            "gitops-vm, its VMM or its pod still there"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "measured: git removal -> MicroVM, VMM and pod gone: {:?}",
        start.elapsed()
    );
    f.verdict(&sha, "True", |_| {});

    // 6. runPolicy Halted: healthy (Current), not in progress forever.
    let halted = vm(&f.cluster, "gitops-halted")
        .run_policy(RunPolicy::Halted)
        .yaml();
    let pushed = Instant::now();
    let sha = f.commit(&[("halted.yaml", Some(&halted))], "add gitops-halted");
    f.verdict(&sha, "True", |_| {});
    assert_eq!(f.mvm("gitops-halted", "{.status.phase}"), "Stopped");
    let (healthy, said) = f.healthy();
    assert_eq!(healthy, "True", "Flux's Healthy condition: {said}");
    println!(
        "measured: git push -> Kustomization Ready with a halted MicroVM: {:?}",
        pushed.elapsed()
    );
    let sha = f.commit(&[("halted.yaml", None)], "remove gitops-halted");
    f.verdict(&sha, "True", |_| {});
    assert!(!f.mvm_exists("gitops-halted"), "pruned");
}

/// Helm, built from its module by scripts/tools.sh when it is not cached yet.
fn helm_binary() -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tools.sh");
    let out = Command::new("timeout")
        .arg("1800")
        .arg(&tools)
        .args(["build", "helm"])
        .stdin(Stdio::null())
        .output()
        .expect("tools.sh runs");
    assert!(
        out.status.success(),
        "scripts/tools.sh build helm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = Command::new(&tools)
        .args(["bindir", "helm"])
        .output()
        .expect("tools.sh runs");
    PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim()).join("helm")
}

/// A chart holding one MicroVM manifest.
fn chart(dir: &Path, name: &str, manifest: &str) -> PathBuf {
    let chart = dir.join(name);
    std::fs::create_dir_all(chart.join("templates")).expect("chart dir");
    std::fs::write(
        chart.join("Chart.yaml"),
        format!("apiVersion: v2\nname: {name}\nversion: 0.1.0\n"),
    )
    .expect("Chart.yaml");
    std::fs::write(chart.join("templates/microvm.yaml"), manifest).expect("template");
    chart
}

/// Helm 4's `--wait=watcher` judges MicroVMs with kstatus: an install waits until the VMs are
/// Ready (a brand-new MicroVM reads `status.observedGeneration: 0` by the CRD's default, so it
/// is InProgress before the controller's first status write), and one whose VM can never run
/// fails as soon as it is Stalled, with its Stalled message, not at the timeout. Runs against
/// the cluster of `IGNIS_E2E_KUBECONFIG` (or `ignis dev` without it).
#[test]
fn helm_wait_watcher_waits_for_ready_and_fails_fast_on_a_microvm_that_cannot_run() {
    let cluster = Cluster::start();
    let helm = helm_binary();
    let tmp = tempfile::tempdir().expect("tmp");
    let ns = "e2e-helm-wait";
    let _namespace = cluster.namespace(ns);
    let home = tmp.path().join("home");
    let run = |args: &[&str]| {
        let out = Command::new("timeout")
            .arg("300")
            .arg(&helm)
            .args(args)
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args(["--namespace", ns])
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("helm runs");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    let two = format!(
        "{}\n---\n{}",
        vm(&cluster, "helm-vm").yaml(),
        vm(&cluster, "helm-vm-2").yaml()
    );
    let good = chart(tmp.path(), "vms", &two);
    let start = Instant::now();
    let (ok, said) = run(&[
        "install",
        "vms",
        good.to_str().expect("utf-8"),
        "--wait=watcher",
        "--timeout",
        "3m",
    ]);
    assert!(ok, "helm install --wait=watcher failed: {said}");
    for name in ["helm-vm", "helm-vm-2"] {
        let ready = cluster.kubectl_ok(&[
            "get",
            "-n",
            ns,
            &format!("mvm/{name}"),
            "-o",
            &format!("jsonpath={READY}"),
        ]);
        assert_eq!(ready, "True", "helm returned before mvm/{name} was Ready");
    }
    println!(
        "measured: helm install --wait=watcher -> returned with the VM Ready: {:?}",
        start.elapsed()
    );

    let stuck = vm(&cluster, "helm-stuck")
        .node_selector("ignis.dev/e2e-no-such-node", "nowhere")
        .yaml();
    let bad = chart(tmp.path(), "stuck", &stuck);
    let start = Instant::now();
    let (ok, said) = run(&[
        "install",
        "stuck",
        bad.to_str().expect("utf-8"),
        "--wait=watcher",
        "--timeout",
        "3m",
    ]);
    let took = start.elapsed();
    assert!(
        !ok,
        "helm install of a MicroVM no node takes succeeded: {said}"
    );
    assert!(
        took < Duration::from_secs(90),
        "failed only after {took:?}: {said}"
    );
    assert!(said.contains("helm-stuck"), "{said}");
    let stalled = cluster
        .kubectl(&[
            "get",
            "-n",
            ns,
            "mvm/helm-stuck",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Stalled\")].reason}\t{.status.conditions[?(@.type==\"Stalled\")].message}",
        ])
        .stdout;
    let (reason, message) = stalled.split_once('\t').unwrap_or((&stalled, ""));
    assert_eq!(reason, "Unschedulable", "{stalled:?}; helm said: {said}");
    assert!(
        !message.is_empty() && said.contains(message),
        "helm's error does not carry the Stalled message {message:?}: {said}"
    );
    println!(
        "measured: helm install --wait=watcher failed on an unplaceable MicroVM after {took:?}: {said}"
    );
    let _ = run(&["uninstall", "stuck", "--wait"]);
    let _ = run(&["uninstall", "vms", "--wait"]);
}
