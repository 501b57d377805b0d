//! The bus's HTTP side: `/metrics`, `/healthz`, `/readyz`, and the dashboard
//! with its API (once the store is open). Plain HTTP, or TLS with optional
//! client certificates when `httpTls` is set.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::dashboard::auth::ConnPeer;
use crate::metrics::{BusMetrics, RouteLabel};
use crate::registry::Registry;
use crate::store::Store;
use crate::tls::ReloadingTls;
use amoskys_client::identity::PeerIdentity;

/// Health the HTTP endpoints report: set by the server as it recovers and
/// starts serving.
#[derive(Default)]
pub struct Health {
    pub recovering: AtomicBool,
    pub serving: AtomicBool,
}

pub struct HttpState {
    pub metrics: Arc<BusMetrics>,
    pub health: Arc<Health>,
    pub writable: Arc<AtomicBool>,
    pub store: OnceLock<Arc<Store>>,
    pub registry: OnceLock<Arc<Registry>>,
    /// The data directory, whose filesystem's size and free space are exported.
    pub data_dir: std::path::PathBuf,
    /// The dashboard's routes, installed once the store is open.
    pub dashboard: OnceLock<Router>,
}

impl HttpState {
    /// Why the bus is not ready, or None when it is.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.health.recovering.load(Ordering::SeqCst) {
            Some("recovering: opening the WAL")
        } else if !self.writable.load(Ordering::SeqCst) {
            Some("the WAL cannot be written; acks are withheld")
        } else if !self.health.serving.load(Ordering::SeqCst) {
            Some("not serving (starting or shutting down)")
        } else {
            None
        }
    }
}

async fn metrics(State(s): State<Arc<HttpState>>) -> impl IntoResponse {
    if let Some(store) = s.store.get() {
        s.metrics.stored_events.set(store.event_count() as i64);
        let store = store.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || store.wal_bytes()).await {
            s.metrics.wal_bytes.set(bytes as i64);
        }
    }
    if let Some(reg) = s.registry.get() {
        s.metrics.connected_agents.set(reg.connected_count() as i64);
    }
    let dir = s.data_dir.clone();
    if let Ok(Ok(fs)) = tokio::task::spawn_blocking(move || rustix::fs::statvfs(&dir)).await {
        // f_bavail: what an unprivileged writer may still use.
        let block = fs.f_frsize.max(1);
        s.metrics
            .wal_volume_size_bytes
            .set(fs.f_blocks.saturating_mul(block) as i64);
        s.metrics
            .wal_volume_free_bytes
            .set(fs.f_bavail.saturating_mul(block) as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<HttpState>>) -> (StatusCode, String) {
    match s.not_ready() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

async fn dashboard(State(s): State<Arc<HttpState>>, req: Request) -> Response {
    match s.dashboard.get() {
        Some(r) => match r.clone().oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        },
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the bus is starting: its store is not open yet\n",
        )
            .into_response(),
    }
}

/// Paths timed under their own label; anything else is "other", so the
/// metric's series stay bounded whatever clients request.
const TIMED_ROUTES: [&str; 16] = [
    "/",
    "/agents",
    "/agent",
    "/events",
    "/login",
    "/logout",
    "/assets/app.js",
    "/assets/app.css",
    "/api/overview",
    "/api/agents",
    "/api/agent",
    "/api/control",
    "/api/events",
    "/api/event",
    "/api/tail",
    "/metrics",
];

async fn timed(State(s): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let route = TIMED_ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("other");
    let started = Instant::now();
    let resp = next.run(req).await;
    s.metrics
        .http_request_seconds
        .get_or_create(&RouteLabel {
            route: route.to_string(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(dashboard)
        .layer(axum::middleware::from_fn_with_state(state.clone(), timed))
        .with_state(state)
}

pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    tls: Option<Arc<ReloadingTls>>,
    stop: CancellationToken,
) {
    let app = router(state.clone());
    match tls {
        None => {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }
        Some(tls) => serve_tls(listener, app, tls, state.metrics.clone(), stop).await,
    }
}

/// HTTPS: each connection gets the current certificate (rotations apply to
/// new connections) and carries the client certificate, if one was offered,
/// to the handlers as [`ConnPeer`].
async fn serve_tls(
    listener: TcpListener,
    app: Router,
    tls: Arc<ReloadingTls>,
    metrics: Arc<BusMetrics>,
    stop: CancellationToken,
) {
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.http_current());
        let app = app.clone();
        let metrics = metrics.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let stream = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let why = crate::tls::classify_handshake_error(&e);
                    metrics
                        .tls_handshake_failures
                        .get_or_create(&crate::metrics::reason(why))
                        .inc();
                    debug!(%remote, error = %e, "HTTPS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let peer: Option<PeerIdentity> = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|der| PeerIdentity::from_der(der).ok());
            let app = app.layer(axum::Extension(ConnPeer(peer)));
            let service = hyper_util::service::TowerToHyperService::new(app);
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        debug!(%remote, error = %e, "HTTPS connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    conns.close();
    conns.wait().await;
}
