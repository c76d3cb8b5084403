//! The real `ignis controller` binary against a minimal HTTP stand-in for the Kubernetes API
//! (list/watch of MicroVMs, patches, Events; no Nodes, no Pods, no CRD). Checks that the
//! controller starts without cluster-only resources, writes finalizer and status with the
//! right field manager, serves /readyz, and exits cleanly on SIGTERM; the ignored test
//! measures its RSS idle and with 1 000 MicroVMs in its cache.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use ignis::testing::{KIND, MicroVmBuilder, microvm_list};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

#[derive(Default)]
struct Seen {
    /// (method, path, query)
    requests: Vec<(String, String, String)>,
    bodies: Vec<Value>,
}

#[derive(Clone)]
struct Fake {
    objects: Arc<BTreeMap<String, Value>>,
    seen: Arc<Mutex<Seen>>,
}

fn microvm(i: usize) -> Value {
    MicroVmBuilder::new(&format!("vm-{i}"))
        .namespace("default")
        .stored(&format!("uid-{i}"), 1, &format!("{}", i + 1))
        .created_at(Time("2026-11-22T10:00:00Z".parse().expect("time")))
        .cmdline("console=ttyS0")
        .console_marker("ignis: ready")
        .json()
}

async fn api(State(fake): State<Fake>, method: Method, uri: Uri, body: Bytes) -> Response {
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or_default().to_string();
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Ok(mut seen) = fake.seen.lock() {
        seen.requests
            .push((method.to_string(), path.clone(), query.clone()));
        seen.bodies.push(parsed.clone());
    }
    let json_response = |code: StatusCode, v: &Value| {
        (
            code,
            [("content-type", "application/json")],
            serde_json::to_vec(v).unwrap_or_default(),
        )
            .into_response()
    };
    if path.ends_with("/microvms") && method == Method::GET {
        if query.contains("watch=true") || query.contains("watch=1") {
            // A watch that never says anything: an idle cluster.
            let pending = futures::stream::pending::<Result<Bytes, Infallible>>();
            return Response::builder()
                .header("content-type", "application/json")
                .body(Body::from_stream(pending))
                .unwrap_or_default();
        }
        let items: Vec<Value> = fake.objects.values().cloned().collect();
        return json_response(StatusCode::OK, &microvm_list(items, "100000"));
    }
    if path.contains("/microvms/") && method == Method::PATCH {
        let name = path
            .trim_end_matches("/status")
            .rsplit('/')
            .next()
            .unwrap_or_default();
        return match fake.objects.get(name) {
            Some(obj) => json_response(StatusCode::OK, obj),
            None => json_response(StatusCode::NOT_FOUND, &not_found()),
        };
    }
    if path.ends_with("/events") && method == Method::POST {
        return json_response(StatusCode::CREATED, &parsed);
    }
    json_response(StatusCode::NOT_FOUND, &not_found())
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
}

struct Running {
    child: Child,
    seen: Arc<Mutex<Seen>>,
    health: u16,
    _dir: tempfile::TempDir,
}

async fn start(count: usize) -> Running {
    let objects: BTreeMap<String, Value> = (0..count)
        .map(|i| (format!("vm-{i}"), microvm(i)))
        .collect();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let fake = Fake {
        objects: Arc::new(objects),
        seen: seen.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let app = Router::new().fallback(api).with_state(fake);
        let _ = axum::serve(listener, app).await;
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context:\n    cluster: fake\n    user: u\n    namespace: default\ncurrent-context: c\n"
        ),
    )
    .expect("kubeconfig");
    let health = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    // IGNIS_BIN measures another build of the same binary (e.g. target/release/ignis).
    let binary =
        std::env::var("IGNIS_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ignis").to_string());
    let child = Command::new(binary)
        .args([
            "controller",
            "--leader-election",
            "false",
            "--agent-endpoint",
            "node-a=unix:///nonexistent/ignis-agent.sock",
            "--health-addr",
            &format!("127.0.0.1:{health}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("IGNIS_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ignis controller");
    Running {
        child,
        seen,
        health,
        _dir: dir,
    }
}

/// Wait until `count` distinct MicroVMs got a status apply.
async fn wait_for_status_writes(running: &Running, count: usize, deadline: Duration) {
    let started = Instant::now();
    loop {
        let written = {
            let seen = running.seen.lock().expect("seen");
            let mut names: Vec<&String> = seen
                .requests
                .iter()
                .filter(|(m, p, _)| m == "PATCH" && p.ends_with("/status"))
                .map(|(_, p, _)| p)
                .collect();
            names.sort();
            names.dedup();
            names.len()
        };
        if written >= count {
            return;
        }
        assert!(
            started.elapsed() < deadline,
            "only {written}/{count} status writes after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out).await;
    out
}

async fn stop(mut running: Running) -> std::process::ExitStatus {
    let pid = nix::unistd::Pid::from_raw(running.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let started = Instant::now();
    loop {
        if let Some(status) = running.child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = running.child.kill();
            panic!("controller did not exit within 20s of SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn controller_binary_reconciles_against_a_plain_api_server_and_stops_on_sigterm() {
    let running = start(3).await;
    wait_for_status_writes(&running, 3, Duration::from_secs(30)).await;
    {
        let seen = running.seen.lock().expect("seen");
        for (i, (method, path, query)) in seen.requests.iter().enumerate() {
            if method == "PATCH" && path.ends_with("/status") {
                assert!(query.contains("fieldManager=ignis-controller"), "{query}");
                assert!(query.contains("force=true"), "{query}");
                let body = &seen.bodies[i];
                assert_eq!(body["kind"], KIND);
                // The agent socket does not exist: every VM waits for a node.
                assert_eq!(body["status"]["phase"], "Pending");
            }
            if method == "PATCH" && !path.ends_with("/status") {
                assert_eq!(
                    seen.bodies[i]["metadata"]["finalizers"],
                    json!(["ignis.dev/vm-cleanup"])
                );
            }
            // Nothing cluster-only is needed: no Pods, no Leases, no CRDs.
            assert!(!path.contains("/pods"), "{path}");
            assert!(!path.contains("/leases"), "{path}");
            assert!(!path.contains("customresourcedefinitions"), "{path}");
        }
    }
    let ready = http_get(running.health, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    let metrics = http_get(running.health, "/metrics").await;
    assert!(
        metrics.contains("ignis_controller_reconciles_total"),
        "{metrics}"
    );
    let status = stop(running).await;
    assert!(status.success(), "exit status {status:?}");
}

/// `cargo test --test controller_api -- --ignored --nocapture` prints the RSS numbers
/// (`IGNIS_BIN=target/release/ignis` for the release build).
#[tokio::test]
#[ignore = "measurement, not a test: prints RSS idle and with 1000 MicroVMs"]
async fn controller_rss_idle_and_with_1000_microvms() {
    for count in [0usize, 1000] {
        let running = start(count).await;
        if count == 0 {
            // Idle: wait until it has listed and is ready.
            let started = Instant::now();
            while !http_get(running.health, "/readyz")
                .await
                .starts_with("HTTP/1.1 200")
            {
                assert!(started.elapsed() < Duration::from_secs(20), "never ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            wait_for_status_writes(&running, count, Duration::from_secs(120)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(running.child.id());
        println!(
            "controller RSS with {count} MicroVMs: {rss} KiB ({:.1} MiB)",
            rss as f64 / 1024.0
        );
        let status = stop(running).await;
        assert!(status.success());
    }
}
