//! Helm v4 (built from its official Go module by `scripts/tools.sh`) against `ignis dev`'s API
//! server: install, upgrade, uninstall, and install again under the same name. Helm keeps its
//! releases in Secrets that it deletes with a protobuf `DeleteOptions` body; the second install
//! only works when the uninstall really purged them. Runs in CI: a missing Helm is built, and a
//! build that fails fails the test.

mod gitops_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gitops_support::{root, run};
use kube::api::{Api, ListParams};
use tokio_util::sync::CancellationToken;

/// The Helm binary, built by scripts/tools.sh when it is not cached yet.
fn helm() -> PathBuf {
    let tools = root().join("scripts/tools.sh");
    let out = run(
        Command::new(&tools).args(["build", "helm"]),
        Duration::from_secs(1800),
    );
    assert!(
        out.status.success(),
        "scripts/tools.sh build helm failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = run(
        Command::new(&tools).args(["bindir", "helm"]),
        Duration::from_secs(30),
    );
    let helm = PathBuf::from(String::from_utf8_lossy(&dir.stdout).trim()).join("helm");
    assert!(helm.is_file(), "no helm binary at {}", helm.display());
    helm
}

/// A chart with a ConfigMap and a MicroVM whose run policy comes from the values.
fn write_chart(dir: &Path) -> PathBuf {
    let chart = dir.join("chart");
    std::fs::create_dir_all(chart.join("templates")).expect("chart dir");
    std::fs::write(
        chart.join("Chart.yaml"),
        "apiVersion: v2\nname: roundtrip\nversion: 0.1.0\n",
    )
    .expect("Chart.yaml");
    std::fs::write(
        chart.join("values.yaml"),
        "runPolicy: Always\ngreeting: hello\n",
    )
    .expect("values");
    std::fs::write(
        chart.join("templates/configmap.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\n\
         data:\n  greeting: {{ .Values.greeting | quote }}\n",
    )
    .expect("configmap template");
    std::fs::write(
        chart.join("templates/microvm.yaml"),
        "apiVersion: ignis.dev/v1alpha1\nkind: MicroVM\nmetadata:\n  name: {{ .Release.Name }}-vm\n\
         spec:\n  runPolicy: {{ .Values.runPolicy }}\n  resources: {vcpus: 1, memory: 256Mi}\n\
         \x20 kernel: {path: /boot/vmlinuz}\n",
    )
    .expect("microvm template");
    chart
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_upgrade_uninstall_install_again() {
    let helm = helm();
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = ignis::dev::api_server_config(tmp.path().join("data")).expect("config");
    config.node_name = "dev-node".into();
    let shutdown = CancellationToken::new();
    let api = ignis::dev::apiserver::start(config, shutdown.clone())
        .await
        .expect("start");
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let chart = write_chart(tmp.path());
    let client = kube::Client::try_from(api.client_config()).expect("client");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), "default");
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "default");
    let vms: Api<ignis::api::MicroVM> = Api::namespaced(client, "default");

    let home = tmp.path().join("home");
    let helm_cmd = |args: &[&str]| {
        let mut cmd = Command::new(&helm);
        cmd.args(args)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("HOME", &home)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        let out = run(&mut cmd, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "helm {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let chart_path = chart.display().to_string();
    let release_secrets = || async {
        secrets
            .list(&ListParams::default().labels("owner=helm,name=rt"))
            .await
            .expect("list release secrets")
            .items
            .len()
    };

    helm_cmd(&["install", "rt", &chart_path]);
    assert_eq!(release_secrets().await, 1);
    let vm = vms.get("rt-vm").await.expect("the chart's MicroVM");
    assert_eq!(vm.spec.run_policy, ignis::api::RunPolicy::Always);

    helm_cmd(&[
        "upgrade",
        "rt",
        &chart_path,
        "--set",
        "runPolicy=Halted",
        "--set",
        "greeting=hi",
    ]);
    assert_eq!(release_secrets().await, 2, "one Secret per revision");
    assert_eq!(
        vms.get("rt-vm").await.expect("vm").spec.run_policy,
        ignis::api::RunPolicy::Halted
    );
    let cm = cms.get("rt-config").await.expect("configmap");
    assert_eq!(
        cm.data
            .unwrap_or_default()
            .get("greeting")
            .map(String::as_str),
        Some("hi")
    );
    let listed = helm_cmd(&["list", "-o", "json"]);
    assert!(listed.contains("\"revision\":\"2\""), "{listed}");

    helm_cmd(&["uninstall", "rt"]);
    assert_eq!(release_secrets().await, 0, "uninstall purges the release");
    assert!(vms.get_opt("rt-vm").await.expect("get").is_none());
    assert!(cms.get_opt("rt-config").await.expect("get").is_none());

    helm_cmd(&["install", "rt", &chart_path]);
    assert_eq!(release_secrets().await, 1);
    assert_eq!(
        vms.get("rt-vm").await.expect("vm").spec.run_policy,
        ignis::api::RunPolicy::Always
    );

    shutdown.cancel();
    api.stopped().await;
}
