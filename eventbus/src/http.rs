//! The bus's HTTP side: `/metrics`, `/healthz`, `/readyz`.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::BusMetrics;
use crate::registry::Registry;
use crate::server::Health;
use crate::store::Store;

pub struct HttpState {
    pub metrics: Arc<BusMetrics>,
    pub health: Arc<Health>,
    pub writable: Arc<AtomicBool>,
    pub store: OnceLock<Arc<Store>>,
    pub registry: OnceLock<Arc<Registry>>,
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
        let store = store.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || store.wal_bytes()).await {
            s.metrics.wal_bytes.set(bytes as i64);
        }
        if let Some(store) = s.store.get() {
            s.metrics.stored_events.set(store.event_count() as i64);
        }
    }
    if let Some(reg) = s.registry.get() {
        s.metrics.connected_agents.set(reg.connected_count() as i64);
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

pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

pub async fn serve(listener: TcpListener, state: Arc<HttpState>, stop: CancellationToken) {
    let app = router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "HTTP server failed");
    }
}
