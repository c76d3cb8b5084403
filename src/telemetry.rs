//! Cross-cutting plumbing every subcommand shares: structured logs, the Prometheus registry,
//! the `/metrics` `/healthz` `/readyz` HTTP server, and the shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Telemetry failures: all at start-up, all fatal.
#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("cannot bind the health/metrics server to {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the signal handler")]
    Signal(#[source] std::io::Error),
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, for log pipelines.
    Json,
    /// Human-readable lines.
    #[default]
    Pretty,
}

/// Install the global tracing subscriber. `RUST_LOG` overrides `default_level`.
pub fn init_tracing(format: LogFormat, default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests, `dev` starting several parts) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}

/// A Prometheus registry shared by the parts of one process.
#[derive(Clone, Default)]
pub(crate) struct MetricsRegistry(Arc<Mutex<Registry>>);

impl MetricsRegistry {
    /// A registry whose metrics all start with `prefix_`.
    pub(crate) fn with_prefix(prefix: &str) -> Self {
        Self(Arc::new(Mutex::new(Registry::with_prefix(prefix))))
    }

    /// Register metrics; called once per component at start-up.
    pub(crate) async fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut *self.0.lock().await);
    }

    /// The text exposition format.
    pub(crate) async fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &*self.0.lock().await);
        out
    }
}

/// Whether the process is ready to serve; components flip it once their start-up is done.
#[derive(Clone, Default)]
pub(crate) struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub(crate) fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct HealthState {
    metrics: MetricsRegistry,
    readiness: Readiness,
}

/// The router serving `/metrics`, `/healthz` and `/readyz`.
pub(crate) fn health_router(metrics: MetricsRegistry, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(HealthState { metrics, readiness })
}

async fn readyz(State(state): State<HealthState>) -> impl IntoResponse {
    if state.readiness.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_handler(State(state): State<HealthState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode().await,
    )
}

/// Bind the health server now (so a bad address fails start-up) and serve it until `shutdown`.
pub(crate) async fn spawn_health_server(
    addr: SocketAddr,
    metrics: MetricsRegistry,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<SocketAddr, TelemetryError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| TelemetryError::Bind { addr, source })?;
    let app = health_router(metrics, readiness);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "health server stopped");
        }
    });
    tracing::info!(%bound, "health server listening");
    Ok(bound)
}

/// A token cancelled on the first SIGTERM or SIGINT; a second signal exits at once.
pub fn shutdown_signal() -> Result<CancellationToken, TelemetryError> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).map_err(TelemetryError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(TelemetryError::Signal)?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[tokio::test]
    async fn health_endpoints_follow_readiness_and_expose_metrics() {
        let metrics = MetricsRegistry::with_prefix("ignis_test");
        let counter: Counter = Counter::default();
        metrics
            .register(|r| r.register("things", "Things seen", counter.clone()))
            .await;
        counter.inc();
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let addr = spawn_health_server(
            "127.0.0.1:0".parse().expect("addr"),
            metrics,
            readiness.clone(),
            shutdown.clone(),
        )
        .await
        .expect("bind");

        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .expect("write");
            let mut body = String::new();
            stream.read_to_string(&mut body).await.expect("read");
            body
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        readiness.set_ready(true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/metrics").await.contains("ignis_test_things_total 1"));
        shutdown.cancel();
    }
}
