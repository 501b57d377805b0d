//! The web dashboard and its JSON API, served on the bus's HTTP address.
//!
//! Pages are one static shell plus a little JavaScript, embedded in the
//! binary; everything they show comes from `/api/`. Every page and API call
//! needs a token (header or cookie) or a dashboard client certificate;
//! `/metrics`, `/healthz` and `/readyz` stay open and carry no event data.

mod api;
pub mod auth;
pub mod history;
pub mod params;
mod tail;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::config::DashboardConfig;
use crate::service::BusState;
use crate::tls::ReloadingTls;
use crate::writer::now_ns;
use amoskys_client::phase::{GROWING_SAMPLES, Phase, phase};
use amoskys_proto::{AgentRecord, ListAgentsRequest, StatsRequest};
use auth::{COOKIE_NAME, Caller, ConnPeer, Denied, Tokens, authenticate};
use history::{BusSample, History, ShardCounts};

const SHELL: &str = include_str!("assets/index.html");
const LOGIN: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

pub struct Dashboard {
    pub bus: Arc<BusState>,
    pub tokens: Tokens,
    pub cfg: DashboardConfig,
    pub history: Mutex<History>,
    pub tls: Arc<ReloadingTls>,
    /// Cookies get `Secure` when the HTTP side serves TLS.
    pub secure_cookies: bool,
}

impl Dashboard {
    pub fn new(bus: Arc<BusState>, tls: Arc<ReloadingTls>) -> Arc<Self> {
        let cfg = bus.cfg.dashboard.clone();
        Arc::new(Self {
            tokens: Tokens::from_files(
                cfg.admin_token_file.as_deref(),
                cfg.reader_token_file.as_deref(),
            ),
            history: Mutex::new(History::new(cfg.sample_interval)),
            secure_cookies: bus.cfg.http_tls,
            cfg,
            bus,
            tls,
        })
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Samples rates until the bus stops.
    pub fn spawn_sampler(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.cfg.sample_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = me.bus.stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let (sample, agents) = me.sample().await;
                me.history().record(sample, &agents);
            }
        });
    }

    /// This shard's counters and agents; on a sharded bus every shard's
    /// that answers (the others are left out of this sample's rates).
    async fn sample(&self) -> (BusSample, Vec<AgentRecord>) {
        let bus = &self.bus;
        let at_ns = now_ns();
        if bus.sharded() {
            let stats = bus
                .all_stats(StatsRequest {
                    local: false,
                    allow_partial: true,
                })
                .await;
            let agents = bus
                .agents(ListAgentsRequest {
                    local: false,
                    allow_partial: true,
                })
                .await;
            if let (Ok(stats), Ok(agents)) = (stats, agents) {
                let shards = stats
                    .shards
                    .into_iter()
                    .map(|s| {
                        let by_collector: BTreeMap<String, u64> =
                            s.stored_by_collector.into_iter().collect();
                        let counts = ShardCounts {
                            stored: by_collector.values().sum(),
                            by_collector,
                        };
                        (s.shard, counts)
                    })
                    .collect();
                return (BusSample { at_ns, shards }, agents.agents);
            }
        }
        let counts = ShardCounts {
            stored: bus.metrics.events_stored.get(),
            by_collector: bus.metrics.collector_totals(),
        };
        (
            BusSample::single(at_ns, bus.shards.index, counts),
            bus.registry.list(),
        )
    }

    /// Phase and reason of one agent now.
    pub fn phase_of(&self, rec: &AgentRecord) -> (Phase, String) {
        let trend = self.history().spool_trend(&rec.agent_id, GROWING_SAMPLES);
        phase(
            rec,
            now_ns(),
            self.cfg.agent_missed_after.as_nanos() as i64,
            &trend,
        )
    }
}

/// An authenticated request; the rejection is a JSON 401/403.
pub struct Authed(pub Caller);

pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"amoskys\""),
            );
        }
        r
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(m) => ApiError(StatusCode::UNAUTHORIZED, m),
            Denied::Forbidden(m) => ApiError(StatusCode::FORBIDDEN, m),
        }
    }
}

impl From<tonic::Status> for ApiError {
    /// A read across shards failed: a shard that does not answer is 503,
    /// a bad argument 400.
    fn from(s: tonic::Status) -> Self {
        let code = match s.code() {
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, s.message().to_string())
    }
}

pub fn bad_request(m: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m)
}

impl FromRequestParts<Arc<Dashboard>> for Authed {
    type Rejection = ApiError;
    async fn from_request_parts(
        parts: &mut Parts,
        d: &Arc<Dashboard>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnPeer>()
            .and_then(|p| p.0.as_ref());
        Ok(Authed(authenticate(&parts.headers, peer, &d.tokens)?))
    }
}

/// The page shell for a signed-in user, the sign-in page otherwise.
async fn page(auth: Result<Authed, ApiError>) -> Response {
    match auth {
        Ok(_) => (page_headers(), Html(SHELL)).into_response(),
        Err(ApiError(status, msg)) => login_page(status, &msg),
    }
}

fn login_page(status: StatusCode, msg: &str) -> Response {
    let escaped = msg
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    (
        status,
        page_headers(),
        Html(LOGIN.replace("{{message}}", &escaped)),
    )
        .into_response()
}

/// Pages load nothing from elsewhere and cannot be framed.
fn page_headers() -> [(header::HeaderName, &'static str); 4] {
    [
        (header::CACHE_CONTROL, "no-store"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ]
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

fn session_cookie(d: &Dashboard, token: &str) -> String {
    format!(
        "{COOKIE_NAME}={token}; Path=/; HttpOnly; SameSite=Strict{}",
        if d.secure_cookies { "; Secure" } else { "" }
    )
}

/// Checks a token and, when it is good, keeps it in an HttpOnly cookie so
/// pages and the live tail (EventSource cannot send headers) carry it.
fn sign_in(d: &Dashboard, token: &str) -> Response {
    let token = token.trim();
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
        headers.insert(header::AUTHORIZATION, v);
    }
    match authenticate(&headers, None, &d.tokens) {
        Ok(c) => {
            tracing::info!(who = %c.who, "dashboard sign-in");
            match HeaderValue::from_str(&session_cookie(d, token)) {
                Ok(cookie) => {
                    let mut r = Redirect::to("/").into_response();
                    r.headers_mut().insert(header::SET_COOKIE, cookie);
                    r
                }
                Err(_) => login_page(
                    StatusCode::BAD_REQUEST,
                    "the token has characters a cookie cannot hold",
                ),
            }
        }
        Err(Denied::Unauthenticated(m) | Denied::Forbidden(m)) => {
            login_page(StatusCode::UNAUTHORIZED, &m)
        }
    }
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// `/login?token=…` is the link `amoskys up` prints.
async fn login_get(State(d): State<Arc<Dashboard>>, Query(q): Query<LoginQuery>) -> Response {
    match q.token {
        Some(t) => sign_in(&d, &t),
        None => login_page(StatusCode::OK, "paste your dashboard token"),
    }
}

async fn login_post(
    State(d): State<Arc<Dashboard>>,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    sign_in(&d, &f.token)
}

async fn logout(State(d): State<Arc<Dashboard>>) -> Response {
    let mut r = Redirect::to("/login").into_response();
    let clear = format!(
        "{COOKIE_NAME}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if d.secure_cookies { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&clear) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Dashboard routes; the HTTP module adds them once the store is open.
pub fn router(d: Arc<Dashboard>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/agents", get(page))
        .route("/agent", get(page))
        .route("/events", get(page))
        .route("/alerts", get(page))
        .route("/login", get(login_get).post(login_post))
        .route("/logout", post(logout))
        .route(
            "/assets/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/assets/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route("/api/overview", get(api::overview))
        .route("/api/agents", get(api::agents))
        .route("/api/agent", get(api::agent))
        .route("/api/control", post(api::control))
        .route("/api/events", get(api::events))
        .route("/api/alerts", get(api::alerts))
        .route("/api/event", get(api::event))
        .route("/api/tail", get(tail::tail))
        .fallback(api::not_found)
        .with_state(d)
}
