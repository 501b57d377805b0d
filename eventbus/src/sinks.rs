//! Alert sinks: each configured receiver (Alertmanager's API v2, a generic
//! JSON webhook) is handed the detector's alerts from its own cursor in the
//! store.
//!
//! A sink reads stored alerts in offset order, posts them in batches and
//! moves its cursor past a batch only when the receiver answered 2xx, so an
//! outage of the receiver loses nothing (the sink retries with backoff and
//! the cursor holds age retention), and a restart resends at most the batch
//! that was in flight. A receiver that refuses a batch as invalid (4xx other
//! than 408 and 429) would refuse it forever: that batch is logged and
//! counted in `alert_sink_rejected`, and the sink goes on. A sink never
//! holds ingest or the detector up.
//!
//! A sink configured for the first time starts at the end of the store: it
//! delivers alerts from then on, not the store's whole history.

use std::sync::Arc;
use std::time::Duration;

use amoskys_client::render::{event_json, severity_name};
use amoskys_detect::DETECT_COLLECTOR;
use amoskys_proto::Event;
use amoskys_proto::event::Payload;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::{AlertSinkConfig, SinkKind};
use crate::export::message_id;
use crate::filter::EventFilter;
use crate::metrics::{SinkLabel, SinkReasonLabel};
use crate::service::BusState;
use crate::store::{Hold, QuerySpec};
use crate::writer::now_ns;

/// What every detector's agent id starts with (`amoskys:detect/<shard>`).
const DETECTOR_ID_PREFIX: &str = "amoskys:detect/";
/// How long an idle sink waits for the detector's next alerts before it
/// looks at the store anyway.
const IDLE: Duration = Duration::from_millis(50);
/// Offsets looked through per read, so a store with few alerts is passed
/// in steps whose cursor is saved.
const SCAN: u64 = 65_536;
/// The longest wait between retries of a failed delivery.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
enum SinkError {
    /// Worth retrying: the receiver may come back.
    #[error("{reason}: {message}")]
    Retry {
        reason: &'static str,
        message: String,
    },
    /// The receiver refused the batch as invalid; sending it again would
    /// be refused again.
    #[error("refused with {status}: {body}")]
    Refused { status: u16, body: String },
}

fn hold(kind: SinkKind) -> Hold {
    match kind {
        SinkKind::Alertmanager => Hold::Alertmanager,
        SinkKind::Webhook => Hold::Webhook,
    }
}

/// Where a sink resumes, saved so that retention holds it from now on.
/// Called before retention first runs.
pub fn start_cursor(state: &BusState, kind: SinkKind) -> Result<u64, crate::store::StoreError> {
    let cursor = match state.store.sink_cursor(hold(kind))? {
        Some(c) => c,
        None => state.store.next_offset(),
    };
    state.store.set_sink_cursor(hold(kind), cursor)?;
    Ok(cursor)
}

/// Starts the sink; it runs until the bus stops.
pub fn spawn(
    state: Arc<BusState>,
    cfg: AlertSinkConfig,
    base_url: String,
    cursor: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        tokio::select! {
            _ = run(&state, &cfg, &base_url, cursor) => {}
            _ = state.stop.cancelled() => {}
        }
    })
}

async fn run(state: &Arc<BusState>, cfg: &AlertSinkConfig, base_url: &str, mut cursor: u64) {
    let sink = SinkLabel {
        sink: cfg.kind.as_str().into(),
    };
    let error = |reason: &'static str| {
        state
            .metrics
            .sink_errors
            .get_or_create(&SinkReasonLabel {
                sink: cfg.kind.as_str().into(),
                reason: reason.into(),
            })
            .inc();
    };
    let client = loop {
        match client(cfg) {
            Ok(c) => break c,
            Err(e) => {
                // A CA file mounted late (a Secret) appears without a restart.
                error("config");
                warn!(sink = cfg.kind.as_str(), error = %e, "alert sink cannot start; retrying");
                tokio::time::sleep(MAX_BACKOFF).await;
            }
        }
    };
    info!(sink = cfg.kind.as_str(), url = %cfg.url, from = cursor, "alert sink started");
    let mut written = state.alerts_written.subscribe();
    loop {
        // Marked seen before the store is looked at, so alerts written
        // after this look wake the wait below.
        written.borrow_and_update();
        let first = state.store.first_offset();
        if cursor < first {
            // Only the size cap cuts into what a sink holds.
            error("retention");
            warn!(
                sink = cfg.kind.as_str(),
                from = cursor,
                to = first - 1,
                "the size cap deleted events the alert sink had not passed; alerts among them are not delivered"
            );
            cursor = first;
            save(state, cfg.kind, cursor).await;
        }
        let end = state.store.next_offset();
        state
            .metrics
            .sink_backlog_events
            .get_or_create(&sink)
            .set(end.saturating_sub(cursor) as i64);
        if cursor >= end {
            // Woken by the detector's next alerts; the timeout still moves
            // the cursor over events without alerts.
            let _ = tokio::time::timeout(IDLE, written.changed()).await;
            continue;
        }
        let to = (end - 1).min(cursor + SCAN - 1);
        let alerts = match read_alerts(state, cursor, to, cfg.max_batch).await {
            Ok(a) => a,
            Err(e) => {
                error("store");
                warn!(sink = cfg.kind.as_str(), error = %e, "alert sink cannot read the store");
                tokio::time::sleep(MAX_BACKOFF).await;
                continue;
            }
        };
        // A full read stops at its last event; anything else read to `to`.
        let upto = match alerts.last() {
            Some(last) if alerts.len() == cfg.max_batch => last.offset + 1,
            _ => to + 1,
        };
        let alerts: Vec<Event> = alerts.into_iter().filter(is_detector_alert).collect();
        if !alerts.is_empty() {
            let body = match cfg.kind {
                SinkKind::Alertmanager => alertmanager_body(&alerts, base_url, cfg.resolve_after),
                SinkKind::Webhook => webhook_body(&alerts, base_url),
            };
            let mut backoff = Duration::from_millis(100);
            loop {
                match deliver(&client, cfg, &body).await {
                    Ok(()) => {
                        let now = now_ns();
                        state
                            .metrics
                            .sink_sent
                            .get_or_create(&sink)
                            .inc_by(alerts.len() as u64);
                        let h = state.metrics.sink_delivery_seconds.get_or_create(&sink);
                        for a in &alerts {
                            h.observe((now - a.stored_at).max(0) as f64 / 1e9);
                        }
                        break;
                    }
                    Err(SinkError::Refused { status, body }) => {
                        state
                            .metrics
                            .sink_rejected
                            .get_or_create(&sink)
                            .inc_by(alerts.len() as u64);
                        warn!(
                            sink = cfg.kind.as_str(),
                            status,
                            body = %body,
                            first = alerts[0].offset,
                            alerts = alerts.len(),
                            "the receiver refused these alerts as invalid; they are not sent again"
                        );
                        break;
                    }
                    Err(e @ SinkError::Retry { reason, .. }) => {
                        error(reason);
                        warn!(sink = cfg.kind.as_str(), error = %e, retry_in = ?backoff, "alert delivery failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
        cursor = upto;
        save(state, cfg.kind, cursor).await;
    }
}

/// The detector's events of `[from, to]` (at most `max`), in offset order.
async fn read_alerts(
    state: &BusState,
    from: u64,
    to: u64,
    max: usize,
) -> Result<Vec<Event>, String> {
    let store = state.store.clone();
    let q = QuerySpec {
        from_offset: from,
        to_offset: to,
        from_time: 0,
        to_time: 0,
        filter: EventFilter {
            collectors: vec![DETECT_COLLECTOR.into()],
            ..Default::default()
        },
        limit: max,
    };
    tokio::task::spawn_blocking(move || store.query(&q))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// An alert the detector wrote: its collector, its reserved agent id (no
/// agent can publish under it) and an Alert payload. Events an agent sends
/// with the same collector are not routed.
fn is_detector_alert(e: &Event) -> bool {
    e.agent_id.starts_with(DETECTOR_ID_PREFIX) && matches!(e.payload, Some(Payload::Alert(_)))
}

async fn save(state: &BusState, kind: SinkKind, cursor: u64) {
    let store = state.store.clone();
    let saved =
        tokio::task::spawn_blocking(move || store.set_sink_cursor(hold(kind), cursor)).await;
    if !matches!(saved, Ok(Ok(()))) {
        // The cursor in memory is right; after a restart the sink resends
        // from the last saved one.
        warn!(
            sink = kind.as_str(),
            cursor, "saving the alert sink's cursor failed"
        );
    }
}

fn client(cfg: &AlertSinkConfig) -> Result<reqwest::Client, String> {
    let mut b = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("amoskys-bus/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("caFile {}: {e}", path.display()))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("caFile {}: {e}", path.display()))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| e.to_string())
}

/// Where a sink posts: Alertmanager's alerts endpoint under its base URL,
/// or the webhook's own address.
fn endpoint(cfg: &AlertSinkConfig) -> String {
    match cfg.kind {
        SinkKind::Alertmanager => format!("{}/api/v2/alerts", cfg.url.trim_end_matches('/')),
        SinkKind::Webhook => cfg.url.clone(),
    }
}

async fn deliver(
    client: &reqwest::Client,
    cfg: &AlertSinkConfig,
    body: &Value,
) -> Result<(), SinkError> {
    let mut req = client
        .post(endpoint(cfg))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(path) = &cfg.bearer_token_file {
        // Re-read each time so a rotated token is used without a restart.
        let token = std::fs::read_to_string(path).map_err(|e| SinkError::Retry {
            reason: "token",
            message: format!("bearerTokenFile {}: {e}", path.display()),
        })?;
        req = req.bearer_auth(token.trim());
    }
    let resp = req.send().await.map_err(|e| SinkError::Retry {
        reason: if e.is_timeout() { "timeout" } else { "connect" },
        message: e.to_string(),
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let body: String = text.chars().take(500).collect();
    let code = status.as_u16();
    if status.is_client_error() && code != 408 && code != 429 {
        return Err(SinkError::Refused { status: code, body });
    }
    Err(SinkError::Retry {
        reason: "status",
        message: format!("{status}: {body}"),
    })
}

/// The dashboard's page for one event.
pub fn event_link(base_url: &str, e: &Event) -> String {
    format!("{base_url}/events?shard={}&offset={}", e.shard, e.offset)
}

/// A Prometheus label name: what Alertmanager takes without UTF-8 names.
fn label_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn timestamp_ns(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// Alertmanager API v2 `postableAlerts`. Labels are stable, so a window's
/// update lands on the alert it updates: alertname (the rule), severity,
/// namespace, pod, node, and `dedup_key` (the rule's dedup fingerprint);
/// the rule's own labels (e.g. `mitre`) join them where their names are
/// valid and free.
pub fn alertmanager_body(alerts: &[Event], base_url: &str, resolve_after: Duration) -> Value {
    let items: Vec<Value> = alerts
        .iter()
        .filter_map(|e| {
            let Some(Payload::Alert(a)) = &e.payload else {
                return None;
            };
            let k8s = e.k8s.clone().unwrap_or_default();
            let mut labels = serde_json::Map::new();
            for (k, v) in &e.labels {
                if label_name_ok(k) && !v.is_empty() {
                    labels.insert(k.clone(), json!(v));
                }
            }
            labels.remove("rule");
            let mut set = |k: &str, v: &str| {
                if !v.is_empty() {
                    labels.insert(k.into(), json!(v));
                }
            };
            set("alertname", &a.rule);
            set("severity", &severity_name(e.severity));
            set("namespace", &k8s.namespace);
            set("pod", &k8s.pod);
            set("node", &e.node);
            set("dedup_key", &a.fingerprint);
            let first = if a.first_seen > 0 { a.first_seen } else { e.stored_at };
            let last = a.last_seen.max(first);
            let ends = last.saturating_add(resolve_after.as_nanos().min(i64::MAX as u128) as i64);
            Some(json!({
                "labels": labels,
                "annotations": {
                    "summary": a.summary,
                    "description": a.description,
                    "count": a.count.max(1).to_string(),
                    "source": format!("shard {} offset {} (agent {})", a.source_shard, a.source_offset, a.source_agent),
                    "alert_id": message_id(e),
                },
                // Full precision: receivers time delivery from it.
                "startsAt": timestamp_ns(first),
                "endsAt": timestamp_ns(ends),
                "generatorURL": event_link(base_url, e),
            }))
        })
        .collect();
    Value::Array(items)
}

/// The webhook's body: each alert event whole (as the dashboard shows it),
/// with a stable id receivers can drop repeats by and its dashboard link.
pub fn webhook_body(alerts: &[Event], base_url: &str) -> Value {
    json!({
        "version": "1",
        "alerts": alerts
            .iter()
            .map(|e| json!({
                "id": message_id(e),
                "link": event_link(base_url, e),
                "event": event_json(e),
            }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::{Alert, K8sIdentity, Severity};

    fn alert(offset: u64) -> Event {
        Event {
            agent_id: "amoskys:detect/0".into(),
            seq: offset * 256,
            node: "n1".into(),
            collector: DETECT_COLLECTOR.into(),
            severity: Severity::Error as i32,
            offset,
            stored_at: 2_000_000_000,
            labels: [
                ("rule".into(), "shell".into()),
                ("mitre".into(), "T1059".into()),
                ("bad-name".into(), "x".into()),
            ]
            .into_iter()
            .collect(),
            k8s: Some(K8sIdentity {
                namespace: "web".into(),
                pod: "api-1".into(),
                ..Default::default()
            }),
            payload: Some(Payload::Alert(Alert {
                rule: "shell".into(),
                summary: "shell sh".into(),
                fingerprint: "fp1".into(),
                count: 3,
                first_seen: 1_000_000_000,
                last_seen: 2_000_000_000,
                source_offset: 9,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn alertmanager_alerts_carry_stable_labels_and_a_link() {
        let body = alertmanager_body(&[alert(17)], "https://dash", Duration::from_secs(60));
        let a = &body[0];
        let labels = a["labels"].as_object().unwrap();
        assert_eq!(labels["alertname"], "shell");
        assert_eq!(labels["severity"], "error");
        assert_eq!(labels["namespace"], "web");
        assert_eq!(labels["pod"], "api-1");
        assert_eq!(labels["node"], "n1");
        assert_eq!(labels["dedup_key"], "fp1");
        assert_eq!(labels["mitre"], "T1059");
        assert!(!labels.contains_key("bad-name") && !labels.contains_key("rule"));
        assert_eq!(a["annotations"]["count"], "3");
        assert_eq!(a["startsAt"], "1970-01-01T00:00:01.000000000Z");
        assert_eq!(a["endsAt"], "1970-01-01T00:01:02.000000000Z");
        assert_eq!(a["generatorURL"], "https://dash/events?shard=0&offset=17");
        // Not an alert: nothing to send.
        let other = Event {
            payload: None,
            ..alert(18)
        };
        assert_eq!(alertmanager_body(&[other], "x", Duration::ZERO), json!([]));
    }

    #[test]
    fn only_the_detector_s_alerts_are_routed() {
        assert_eq!(
            amoskys_detect::detector_agent_id(3),
            format!("{DETECTOR_ID_PREFIX}3")
        );
        assert!(is_detector_alert(&alert(1)));
        let forged = Event {
            agent_id: "node-7".into(),
            ..alert(1)
        };
        assert!(!is_detector_alert(&forged));
        let not_an_alert = Event {
            payload: None,
            ..alert(1)
        };
        assert!(!is_detector_alert(&not_an_alert));
    }

    #[test]
    fn webhook_alerts_have_ids_and_links() {
        let body = webhook_body(&[alert(17), alert(20)], "http://d");
        let alerts = body["alerts"].as_array().unwrap();
        assert_eq!(alerts.len(), 2);
        assert_eq!(alerts[0]["id"], message_id(&alert(17)));
        assert_ne!(alerts[0]["id"], alerts[1]["id"]);
        assert_eq!(alerts[1]["link"], "http://d/events?shard=0&offset=20");
        assert_eq!(alerts[0]["event"]["offset"], 17);
    }
}
