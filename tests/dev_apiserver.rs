//! The dev API server against real clients: kubectl (as installed) and kube-rs.

mod dev_support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use dev_support::*;
use futures::{StreamExt, TryStreamExt};
use ignis::api::MicroVM;
use ignis::dev::apiserver;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drives_the_microvm_lifecycle() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = start_in(tmp.path(), |_| {}).await;

    // Discovery: short name, group and status subresource are found by kubectl.
    let resources = dev.kubectl_ok(&["api-resources", "--api-group=ignis.dev"]);
    assert!(
        resources.contains("microvms") && resources.contains("mvm"),
        "{resources}"
    );

    // Apply a valid MicroVM; the printer columns show.
    let out = dev.kubectl_stdin(&["apply", "-f", "-"], Some(&vm_yaml("web", 1)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = dev.kubectl_ok(&["get", "mvm"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .expect("header")
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "PHASE", "NODE", "IP", "READY", "AGE"]);
    assert!(table.contains("web"));
    let wide = dev.kubectl_ok(&["get", "mvm", "-o", "wide"]);
    assert!(wide.starts_with("NAME"));

    // Defaults are applied by the server, like a real one does for a CRD schema.
    let yaml = dev.kubectl_ok(&["get", "mvm", "web", "-o", "yaml"]);
    assert!(
        yaml.contains("runPolicy: Always") && yaml.contains("generation: 1"),
        "{yaml}"
    );
    let json: Value =
        serde_json::from_str(&dev.kubectl_ok(&["get", "mvm", "web", "-o", "json"])).expect("json");
    assert_eq!(json["spec"]["resources"]["vcpus"], 1);

    // An invalid MicroVM is refused, naming the field.
    let out = dev.kubectl_stdin(&["apply", "-f", "-"], Some(&vm_yaml("bad", 0)));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("spec.resources.vcpus") && stderr.contains("is invalid"),
        "{stderr}"
    );
    // Unknown fields are refused under kubectl's default strict field validation.
    let unknown = vm_yaml("unk", 1).replace("  kernel:\n", "  foo: bar\n  kernel:\n");
    let out = dev.kubectl_stdin(&["apply", "-f", "-"], Some(&unknown));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("unknown field \"spec.foo\""), "{stderr}");

    // With --validate=warn they are dropped with a warning instead.
    let out = dev.kubectl_stdin(&["apply", "--validate=warn", "-f", "-"], Some(&unknown));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("Warning: unknown field \"spec.foo\""),
        "{stderr}"
    );
    dev.kubectl_ok(&["delete", "mvm", "unk"]);

    // explain reads the OpenAPI v3 schema.
    let explain = dev.kubectl_ok(&["explain", "mvm.spec"]);
    assert!(
        explain.contains("resources") && explain.contains("kernel"),
        "{explain}"
    );
    let explain = dev.kubectl_ok(&["explain", "mvm.spec.resources"]);
    assert!(explain.contains("vcpus"), "{explain}");

    // kubectl wait sees Ready once a status apply (kube-rs, forced) sets it.
    let kube = client(&dev).await;
    let api: Api<MicroVM> = Api::namespaced(kube, "default");
    let waiter = {
        let path = dev.kubeconfig.clone();
        let home = dev.dir.clone();
        std::thread::spawn(move || {
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(path)
                .args(["wait", "--for=condition=Ready", "mvm/web", "--timeout=30s"])
                .env("HOME", home)
                .output()
                .expect("kubectl wait")
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let patched = api
        .patch_status(
            "web",
            &PatchParams::apply("ignis-controller").force(),
            &Patch::Apply(ready_status("Running")),
        )
        .await
        .expect("status apply");
    assert_eq!(patched.metadata.generation, Some(1));
    let waited = tokio::task::spawn_blocking(move || waiter.join().expect("join"))
        .await
        .expect("join");
    assert!(
        waited.status.success(),
        "{}",
        String::from_utf8_lossy(&waited.stderr)
    );
    let table = dev.kubectl_ok(&["get", "mvm", "web"]);
    let row: Vec<&str> = table
        .lines()
        .nth(1)
        .expect("row")
        .split_whitespace()
        .collect();
    assert_eq!(
        &row[..5],
        ["web", "Running", "dev-node", "10.88.0.5", "True"]
    );

    // Imperative creates of core kinds (kubectl sends protobuf for these).
    dev.kubectl_ok(&["create", "namespace", "team"]);
    dev.kubectl_ok(&[
        "create",
        "configmap",
        "c1",
        "-n",
        "team",
        "--from-literal=a=b",
    ]);
    let cm = dev.kubectl_ok(&[
        "get",
        "configmap",
        "c1",
        "-n",
        "team",
        "-o",
        "jsonpath={.data.a}",
    ]);
    assert_eq!(cm, "b");

    // Label selectors.
    assert!(
        dev.kubectl_ok(&["get", "mvm", "-l", "app=web", "-o", "name"])
            .contains("web")
    );
    assert!(
        dev.kubectl_ok(&["get", "mvm", "-l", "app in (web,db),tier", "-o", "name"])
            .contains("web")
    );
    assert!(
        !dev.kubectl_ok(&["get", "mvm", "-l", "app notin (web)", "-o", "name"])
            .contains("web")
    );
    assert!(
        !dev.kubectl_ok(&["get", "mvm", "-l", "!tier", "-o", "name"])
            .contains("web")
    );

    // Server-side apply conflicts with the client-side apply that owns a label, unless forced.
    let relabelled = vm_yaml("web", 1).replace("app: web", "app: db");
    let out = dev.kubectl_stdin(&["apply", "--server-side", "-f", "-"], Some(&relabelled));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("conflict") && stderr.contains(".metadata.labels.app"),
        "{stderr}"
    );
    let out = dev.kubectl_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        Some(&relabelled),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dev.kubectl_ok(&["get", "mvm", "-l", "app=db", "-o", "name"])
            .contains("web")
    );

    // Delete with a finalizer: the object stays, marked, until the finalizer goes.
    dev.kubectl_ok(&[
        "patch",
        "mvm",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["ignis.dev/vm-cleanup"]}}"#,
    ]);
    dev.kubectl_ok(&["delete", "mvm", "web", "--wait=false"]);
    let marked = api.get("web").await.expect("still there");
    assert!(marked.metadata.deletion_timestamp.is_some());
    dev.kubectl_ok(&[
        "patch",
        "mvm",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    let gone = api.get_opt("web").await.expect("get");
    assert!(
        gone.is_none(),
        "the object goes once its finalizers are gone"
    );

    // The observer saw create, finalizer patch and status apply of `web`.
    let writes = dev.writes.of("default", "web");
    assert_eq!(writes.iter().filter(|v| *v == "create").count(), 1);
    assert_eq!(writes.iter().filter(|v| *v == "apply/status").count(), 1);
    // No debug routes: the counting is the embedder's business.
    assert!(
        !dev.kubectl(&["get", "--raw", "/debug/ignis/requests"])
            .status
            .success()
    );
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_client_sees_real_api_semantics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = start_in(tmp.path(), |c| c.history_limit = 50).await;
    let kube = client(&dev).await;
    let api: Api<MicroVM> = Api::namespaced(kube.clone(), "default");

    // A watcher started first sees the object arrive.
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    let created = api
        .create(&PostParams::default(), &vm_object("a"))
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.metadata.uid.is_some());
    let seen = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = events.try_next().await.expect("watch") {
            if let watcher::Event::Apply(vm) | watcher::Event::InitApply(vm) = ev
                && vm.metadata.name.as_deref() == Some("a")
            {
                return vm;
            }
        }
        panic!("watch ended")
    })
    .await
    .expect("watcher saw the object within 10s");
    assert_eq!(seen.metadata.uid, created.metadata.uid);

    // Generation moves only with the spec.
    let labelled = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
        )
        .await
        .expect("label patch");
    assert_eq!(labelled.metadata.generation, Some(1));
    let status = api
        .patch_status(
            "a",
            &PatchParams::apply("ignis-controller").force(),
            &Patch::Apply(ready_status("Starting")),
        )
        .await
        .expect("status apply");
    assert_eq!(status.metadata.generation, Some(1));
    assert_eq!(
        status
            .status
            .as_ref()
            .and_then(|s| s.conditions.first())
            .map(|c| c.status.as_str()),
        Some("True")
    );
    // Main-resource writes ignore status; status writes ignore spec.
    let spec = api
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runPolicy": "Once"}, "status": {"phase": "Failed"}})),
        )
        .await
        .expect("spec patch");
    assert_eq!(spec.metadata.generation, Some(2));
    assert_eq!(
        spec.status
            .as_ref()
            .and_then(|s| s.phase)
            .map(|p| p.as_str()),
        Some("Starting")
    );
    let status = api
        .patch_status(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runPolicy": "Halted"}, "status": {"phase": "Running"}})),
        )
        .await
        .expect("status merge");
    assert_eq!(status.spec.run_policy, ignis::api::RunPolicy::Once);
    assert_eq!(status.metadata.generation, Some(2));
    // Conditions merge by type under apply: a second condition keeps the first.
    let scheduled = json!({"apiVersion": "ignis.dev/v1alpha1", "kind": "MicroVM",
        "status": {"conditions": [{"type": "Scheduled", "status": "True", "reason": "Placed",
        "message": "", "lastTransitionTime": "2026-11-22T10:00:00Z"}]}});
    let both = api
        .patch_status(
            "a",
            &PatchParams::apply("other").force(),
            &Patch::Apply(scheduled),
        )
        .await
        .expect("second apply");
    assert_eq!(both.status.as_ref().map(|s| s.conditions.len()), Some(2));
    // A manager that stops applying a field loses it; fields another manager owns stay.
    let mut without_ready = ready_status("Running");
    without_ready["status"]["conditions"] = json!([]);
    without_ready["status"]
        .as_object_mut()
        .expect("status")
        .remove("ipAddresses");
    let dropped = api
        .patch_status(
            "a",
            &PatchParams::apply("ignis-controller").force(),
            &Patch::Apply(without_ready),
        )
        .await
        .expect("third apply");
    let status = dropped.status.expect("status");
    assert!(status.ip_addresses.is_empty());
    let types: Vec<&str> = status.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Scheduled"]);

    // 409 on a stale update.
    let mut stale = created.clone();
    stale.spec.run_policy = ignis::api::RunPolicy::Halted;
    let err = api
        .replace("a", &PostParams::default(), &stale)
        .await
        .expect_err("stale");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.reason == "Conflict"),
        "{err:?}"
    );
    // 422 with the real server's shape.
    let mut bad = vm_object("bad");
    bad.spec.resources.vcpus = 0;
    match api.create(&PostParams::default(), &bad).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"));
            assert!(
                s.message
                    .starts_with("MicroVM.ignis.dev \"bad\" is invalid: "),
                "{}",
                s.message
            );
            assert!(s.message.contains("spec.resources.vcpus"));
        }
        other => panic!("expected 422, got {other:?}"),
    }
    // 404 and 409 AlreadyExists.
    assert!(matches!(api.get("nope").await, Err(kube::Error::Api(s)) if s.code == 404));
    assert!(
        matches!(api.create(&PostParams::default(), &vm_object("a")).await,
        Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists")
    );
    // Strategic merge patch is refused for a custom resource, as on a real server.
    assert!(matches!(
        api.patch("a", &PatchParams::default(), &Patch::Strategic(json!({"spec": {}}))).await,
        Err(kube::Error::Api(s)) if s.code == 415));

    // Watch resume from a version replays only what came after it.
    let from = spec.metadata.resource_version.clone().expect("rv");
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &from)
        .await
        .expect("watch")
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.try_next())
        .await
        .expect("event in time")
        .expect("ok")
        .expect("some");
    match first {
        WatchEvent::Modified(vm) => {
            assert!(
                vm.metadata
                    .resource_version
                    .expect("rv")
                    .parse::<u64>()
                    .expect("n")
                    > from.parse::<u64>().expect("n")
            );
        }
        other => panic!("expected MODIFIED after {from}, got {other:?}"),
    }
    // An object that stops matching a label-selecting watch is DELETED for that watch.
    let now = dev
        .handle
        .current_resource_version()
        .expect("rv")
        .to_string();
    let mut selected = api
        .watch(&WatchParams::default().labels("x=y").timeout(5), &now)
        .await
        .expect("watch")
        .boxed();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": null}}})),
    )
    .await
    .expect("unlabel");
    let left = loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), selected.try_next())
            .await
            .expect("event in time")
            .expect("ok")
            .expect("some");
        if !matches!(ev, WatchEvent::Bookmark(_)) {
            break ev;
        }
    };
    assert!(matches!(left, WatchEvent::Deleted(_)), "{left:?}");

    // Bookmarks arrive on a quiet watch that asks for them.
    let mut quiet = api
        .watch(
            &WatchParams::default().timeout(5),
            &dev.handle
                .current_resource_version()
                .expect("rv")
                .to_string(),
        )
        .await
        .expect("watch")
        .boxed();
    let bookmark = tokio::time::timeout(Duration::from_secs(5), quiet.try_next())
        .await
        .expect("bookmark in time")
        .expect("ok")
        .expect("some");
    assert!(matches!(bookmark, WatchEvent::Bookmark(_)), "{bookmark:?}");
    // After compaction an old version answers 410 Expired.
    dev.handle.compact_history(1).expect("compact");
    let mut expired = api
        .watch(&WatchParams::default().timeout(5), &from)
        .await
        .expect("watch")
        .boxed();
    match tokio::time::timeout(Duration::from_secs(5), expired.try_next())
        .await
        .expect("in time")
    {
        Ok(Some(WatchEvent::Error(e))) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }

    // kube-rs' finalizer helper: add on apply, run cleanup and release on delete.
    {
        use kube::runtime::controller::Action;
        use kube::runtime::finalizer::{Event as Fin, finalizer};
        let fin = api
            .create(&PostParams::default(), &vm_object("fin"))
            .await
            .expect("create");
        let step = |vm: MicroVM| {
            let api = api.clone();
            async move {
                finalizer(
                    &api,
                    ignis::api::FINALIZER,
                    std::sync::Arc::new(vm),
                    |event| async move {
                        Ok::<_, std::io::Error>(match event {
                            Fin::Apply(_) | Fin::Cleanup(_) => Action::await_change(),
                        })
                    },
                )
                .await
                .expect("finalizer step");
            }
        };
        step(fin).await;
        let held = api.get("fin").await.expect("get");
        assert_eq!(
            held.metadata.finalizers.as_deref(),
            Some(&[ignis::api::FINALIZER.to_string()][..])
        );
        api.delete("fin", &DeleteParams::default())
            .await
            .expect("delete");
        let deleting = api.get("fin").await.expect("still there");
        assert!(deleting.metadata.deletion_timestamp.is_some());
        step(deleting).await;
        assert!(
            api.get_opt("fin").await.expect("get").is_none(),
            "released after cleanup"
        );
    }

    // Delete without finalizers removes at once.
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(api.get_opt("a").await.expect("get").is_none());
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_events_show_in_kubectl_describe() {
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = start_in(tmp.path(), |_| {}).await;
    let kube = client(&dev).await;
    let api: Api<MicroVM> = Api::namespaced(kube.clone(), "default");
    let vm = api
        .create(&PostParams::default(), &vm_object("ev"))
        .await
        .expect("create");
    let reporter = Reporter {
        controller: "ignis-controller".into(),
        instance: Some("dev".into()),
    };
    let recorder = Recorder::new(kube, reporter);
    let event = Event {
        type_: EventType::Normal,
        reason: "GuestReady".into(),
        note: Some("booted in 412ms".into()),
        action: "Boot".into(),
        secondary: None,
    };
    // Twice: the second publish turns into a series patch on the same Event.
    for _ in 0..2 {
        recorder
            .publish(&event, &vm.object_ref(&()))
            .await
            .expect("publish");
    }
    let describe = dev.kubectl_ok(&["describe", "mvm", "ev"]);
    assert!(
        describe.contains("GuestReady") && describe.contains("booted in 412ms"),
        "{describe}"
    );
    let events = dev.kubectl_ok(&["get", "events"]);
    assert!(events.contains("GuestReady"), "{events}");
    let new_api = dev.kubectl_ok(&["get", "events.v1.events.k8s.io", "-o", "json"]);
    let list: Value = serde_json::from_str(&new_api).expect("json");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["items"][0]["series"]["count"], 2);
    dev.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_objects_versions_and_token() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = start_in(tmp.path(), |_| {}).await;
    let out = dev.kubectl_stdin(&["apply", "-f", "-"], Some(&vm_yaml("keep", 2)));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = dev.handle.token.clone();
    let rv = dev.handle.current_resource_version().expect("rv");
    let old_kubeconfig = std::fs::read_to_string(&dev.kubeconfig).expect("read");
    let old_port = dev.handle.addr.port().to_string();
    dev.stop().await;

    let dev = start_in(tmp.path(), |_| {}).await;
    assert_eq!(dev.handle.token, token);
    assert!(dev.handle.current_resource_version().expect("rv") >= rv);
    // The kubeconfig written before the restart still works (same token and CA).
    let stale = tmp.path().join("old-kubeconfig");
    let new_port = dev.handle.addr.port().to_string();
    std::fs::write(&stale, old_kubeconfig.replace(&old_port, &new_port)).expect("write");
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&stale)
        .args(["get", "mvm", "-o", "name", "--request-timeout=20s"])
        .env("HOME", tmp.path())
        .output()
        .expect("kubectl");
    let names = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(names.contains("microvm.ignis.dev/keep"), "{names}");
    let kube = client(&dev).await;
    let api: Api<MicroVM> = Api::namespaced(kube, "default");
    let vm = api.get("keep").await.expect("kept");
    assert_eq!(vm.spec.resources.vcpus, 2);
    let updated = api
        .patch(
            "keep",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"n": "1"}}})),
        )
        .await
        .expect("patch");
    assert!(
        updated
            .metadata
            .resource_version
            .expect("rv")
            .parse::<u64>()
            .expect("n")
            > rv
    );
    dev.stop().await;
}

#[tokio::test]
async fn refuses_non_loopback_and_unauthenticated_requests() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut config = ignis::dev::api_server_config(tmp.path().join("data")).expect("config");
    config.listen = "0.0.0.0:0".parse().expect("addr");
    let err = apiserver::start(config, CancellationToken::new())
        .await
        .expect_err("refused");
    assert_eq!(err.reason(), "NotLoopback");

    let dev = start_in(tmp.path(), |_| {}).await;
    let mut config = dev.handle.client_config();
    config.auth_info.token = Some("wrong".to_string().into());
    let kube = kube::Client::try_from(config).expect("client");
    let api: Api<MicroVM> = Api::namespaced(kube, "default");
    match api.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!((s.code, s.reason.as_str()), (401, "Unauthorized")),
        other => panic!("expected 401, got {other:?}"),
    }
    dev.stop().await;
}

/// Creates and status applies from 16 concurrent clients; prints the rates (the design's
/// control-plane target is 500 MicroVMs/s to Scheduled) and checks every write landed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writers_get_unique_versions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dev = start_in(tmp.path(), |_| {}).await;
    let kube = client(&dev).await;
    let api: Api<MicroVM> = Api::namespaced(kube.clone(), "default");
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(kube, "default");
    let lease = leases
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
            "metadata": {"name": "ignis-controller"},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15}}))
            .expect("lease"),
        )
        .await
        .expect("create lease");
    let mut taken = lease.clone();
    taken.spec.as_mut().expect("spec").holder_identity = Some("b".into());
    leases
        .replace("ignis-controller", &PostParams::default(), &taken)
        .await
        .expect("take over");
    assert!(
        leases
            .replace("ignis-controller", &PostParams::default(), &taken)
            .await
            .is_err(),
        "a second replace with the old version conflicts"
    );

    let n = 400usize;
    let started = Instant::now();
    let versions = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let vm = api
                    .create(&PostParams::default(), &vm_object(&format!("vm-{i}")))
                    .await
                    .expect("create");
                vm.metadata.resource_version.expect("rv")
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let create_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                api.patch_status(
                    &format!("vm-{i}"),
                    &PatchParams::apply("ignis-controller").force(),
                    &Patch::Apply(ready_status("Scheduled")),
                )
                .await
                .expect("status");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let status_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "dev API server (debug build): {n} creates in {create_secs:.2}s = {:.0}/s; {n} status applies in {status_secs:.2}s = {:.0}/s",
        n as f64 / create_secs,
        n as f64 / status_secs
    );
    let unique: std::collections::BTreeSet<_> = versions.iter().collect();
    assert_eq!(unique.len(), n, "every create got its own resourceVersion");
    let list = api.list(&Default::default()).await.expect("list");
    assert_eq!(list.items.len(), n);
    assert!(
        list.items
            .iter()
            .all(|vm| vm.status.as_ref().and_then(|s| s.phase).is_some())
    );
    assert_eq!(dev.writes.of("default", "vm-7"), ["create", "apply/status"]);
    dev.stop().await;
}

#[tokio::test]
#[ignore = "manual: serves for 10 minutes, for poking with kubectl"]
async fn serve_for_manual_testing() {
    let dir = PathBuf::from("/tmp/ignis-dev-manual");
    let dev = start_in(&dir, |_| {}).await;
    eprintln!("KUBECONFIG={}", dev.kubeconfig.display());
    tokio::time::sleep(Duration::from_secs(600)).await;
}
