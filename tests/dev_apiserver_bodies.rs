//! The dev API server under hostile request bodies (issue 11): bounded before parsing, and
//! never a reason for another request to wait.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Hostile bodies are refused before they are parsed, and while they are, other requests go
/// on: the deepest body (100 000 levels, what took 85 s before) and a 3 MiB body, sent 16 at a
/// time, against the latency of a GET running alongside. The bounds are loose regression
/// guards for a debug build on a shared machine; the printed numbers are the measurement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_are_cheap_and_never_hold_up_other_requests() {
    let tmp = tempfile::tempdir().expect("tmp");
    let config = ignis::dev::api_server_config(tmp.path().join("data")).expect("config");
    let shutdown = CancellationToken::new();
    let api = ignis::dev::apiserver::start(config, shutdown.clone())
        .await
        .expect("start");
    let kube = kube::Client::try_from(api.client_config()).expect("client");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let wide = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "wide"},
        "data": {"a": "x".repeat(3 * 1024 * 1024 - 200)}})
    .to_string();
    let post = |body: String| {
        let kube = kube.clone();
        async move {
            let request = http::Request::post("/api/v1/namespaces/default/configmaps")
                .header("Content-Type", "application/json")
                .body(body.into_bytes())
                .expect("request");
            let started = Instant::now();
            let answer = kube.request_text(request).await;
            (started.elapsed(), answer)
        }
    };
    let stop = CancellationToken::new();
    let getter = {
        let kube = kube.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut count = 0u32;
            while !stop.is_cancelled() {
                let request = http::Request::get("/api/v1/namespaces/default")
                    .body(Vec::new())
                    .expect("request");
                let started = Instant::now();
                kube.request_text(request)
                    .await
                    .expect("GET during hostile bodies");
                worst = worst.max(started.elapsed());
                count += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (worst, count)
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let bodies: Vec<String> = (0..16)
        .map(|i| {
            if i % 2 == 0 {
                deep.clone()
            } else {
                wide.clone()
            }
        })
        .collect();
    let results = futures::stream::iter(bodies.into_iter().map(post))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    stop.cancel();
    let (worst_get, gets) = getter.await.expect("getter");
    let slowest = results.iter().map(|(d, _)| *d).max().unwrap_or_default();
    for (_, answer) in &results {
        // Deep bodies get 400; the wide one is refused for its size (1 MiB of ConfigMap data
        // is the real limit) or over the 3 MiB request limit: never accepted, never a hang.
        assert!(answer.is_err(), "a hostile body was accepted");
    }
    eprintln!(
        "16 hostile bodies (8 x 100 000 levels, 8 x 3 MiB): slowest answer {slowest:?}; \
         {gets} GETs alongside, slowest {worst_get:?}"
    );
    assert!(
        slowest < Duration::from_secs(10),
        "slowest hostile body {slowest:?}"
    );
    assert!(
        worst_get < Duration::from_secs(3),
        "a GET waited {worst_get:?}"
    );
    shutdown.cancel();
    api.stopped().await;
}
