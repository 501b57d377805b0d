//! The JSON API behind the pages.

use std::collections::BTreeMap;
use std::sync::Arc;

use amoskys_proto::{
    AgentRecord, Control, ControlRequest, ListAgentsRequest, QueryRequest, StatsRequest, control,
};
use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::require_admin;
use super::{ApiError, Authed, Dashboard, bad_request, params};
use crate::store::{PageRequest, QuerySpec, StoreError};
use crate::writer::now_ns;
use amoskys_client::phase::Phase;
use amoskys_client::render::{event_json, event_line, timestamp};
use amoskys_client::shard::format_cursor;

/// Events one search request may decode before it returns a cursor.
const MAX_SCAN: usize = 5_000;
const RECENT_ALERTS_SHOWN: usize = 10;

type ApiResult = Result<Json<Value>, ApiError>;

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Unavailable => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(store_error)
}

fn ms(ns: i64) -> i64 {
    ns / 1_000_000
}

/// One agent as the list and the detail page show it.
fn agent_row(d: &Dashboard, a: &AgentRecord) -> Value {
    let (phase, reason) = d.phase_of(a);
    let hb = a.last_heartbeat.clone().unwrap_or_default();
    let eps = d
        .history()
        .agent_eps(&a.agent_id)
        .unwrap_or(hb.events_per_second);
    json!({
        "agent_id": a.agent_id,
        "node": a.node,
        "shard": a.shard,
        "phase": phase.as_str(),
        "phase_reason": reason,
        "connected": a.connected,
        "version": if hb.version.is_empty() { a.version.clone() } else { hb.version.clone() },
        "eps": eps,
        "events": a.events,
        "last_seq": a.last_seq,
        "incarnation": format!("{:016x}", a.incarnation),
        "incarnation_started": ms(a.incarnation_started),
        "incarnations": a.incarnations,
        "previous_unacked": a.previous_unacked,
        "refused_streams": a.refused_streams,
        "last_refusal": a.last_refusal,
        "bus_lost": a.bus_lost,
        "first_seen": ms(a.first_seen),
        "last_seen": ms(a.last_seen),
        "last_heartbeat": ms(a.last_heartbeat_at),
        "spool_bytes": hb.spool_bytes,
        "spool_events": hb.spool_events,
        "dropped": hb.dropped.max(a.gaps_dropped),
        "produced": hb.produced,
        "uptime_seconds": hb.uptime_seconds,
        "cert_serial": hb.cert_serial,
        "collectors": hb.collectors.iter().map(|c| json!({
            "name": c.name,
            "mode": c.mode,
            "paused": c.paused,
            "interval_ms": c.interval_ms,
            "produced": c.produced,
            "dropped": c.dropped,
            "errors": c.errors,
            "last_error": c.last_error,
        })).collect::<Vec<_>>(),
        "last_control": a.last_control.as_ref().map(|c| json!({
            "control_id": c.control_id, "ok": c.ok, "message": c.message,
        })),
    })
}

/// Every shard's agents (a shard that does not answer is left out and named).
async fn all_agents(d: &Dashboard) -> Result<(Vec<AgentRecord>, Vec<u32>), ApiError> {
    let r = d
        .bus
        .agents(ListAgentsRequest {
            local: false,
            allow_partial: true,
        })
        .await?;
    Ok((r.agents, r.missing_shards))
}

pub async fn overview(State(d): State<Arc<Dashboard>>, Authed(_): Authed) -> ApiResult {
    let bus = &d.bus;
    let stats = bus
        .all_stats(StatsRequest {
            local: false,
            allow_partial: true,
        })
        .await?;
    let (agents, mut missing) = all_agents(&d).await?;
    missing.extend(&stats.missing_shards);
    missing.sort_unstable();
    missing.dedup();
    let mut by_phase: BTreeMap<&str, usize> = Phase::ALL.iter().map(|p| (p.as_str(), 0)).collect();
    for a in &agents {
        *by_phase.entry(d.phase_of(a).0.as_str()).or_default() += 1;
    }
    let (series, (eps, eps_by_collector)) = {
        let h = d.history();
        (h.series(), h.current())
    };
    let not_after = d.tls.not_after();
    let alerts: Vec<Value> = bus
        .alerts
        .newest(RECENT_ALERTS_SHOWN)
        .iter()
        .map(event_line)
        .collect();
    let backup = match &bus.backups {
        None => Value::Null,
        Some(b) => {
            let errors = bus.metrics.backup_errors.get();
            match b.try_lock() {
                Ok(held) => {
                    let list = held.list();
                    let newest = list.last();
                    json!({
                        "running": false,
                        "count": list.len(),
                        "newest_at": newest.map(|n| n.created_at * 1000),
                        "newest_bytes": newest.map(|n| n.size_bytes),
                        "errors": errors,
                    })
                }
                // A backup holds the lock while it runs.
                Err(_) => json!({"running": true, "errors": errors}),
            }
        }
    };
    Ok(Json(json!({
        "version": crate::service::VERSION,
        "now": ms(now_ns()),
        "sample_interval_ms": d.cfg.sample_interval.as_millis() as u64,
        "events_stored": stats.events_stored,
        "first_offset": stats.first_offset,
        "next_offset": stats.next_offset,
        "oldest_stored_at": (stats.oldest_stored_at > 0).then(|| ms(stats.oldest_stored_at)),
        "wal_bytes": stats.wal_bytes,
        "writable": stats.writable,
        "shard": stats.shard,
        "shards": bus.shards.map().shards(),
        "missing_shards": missing,
        "sync_policy": bus.cfg.sync.as_str(),
        "agents_total": agents.len(),
        "agents_by_phase": by_phase,
        "eps": eps,
        "eps_by_collector": eps_by_collector,
        "series": series,
        "certificate": {
            "serial": d.tls.serial(),
            "not_after": not_after * 1000,
            "expires_in_seconds": not_after - now_ns() / 1_000_000_000,
        },
        "recent_alerts": alerts,
        "backup": backup,
    })))
}

pub async fn agents(State(d): State<Arc<Dashboard>>, Authed(_): Authed) -> ApiResult {
    let (agents, missing) = all_agents(&d).await?;
    let rows: Vec<Value> = agents.iter().map(|a| agent_row(&d, a)).collect();
    Ok(Json(json!({ "agents": rows, "missing_shards": missing })))
}

pub async fn agent(
    State(d): State<Arc<Dashboard>>,
    Authed(_): Authed,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let p = params::parse(q.as_deref(), &["id"]).map_err(bad_request)?;
    let id = p
        .get("id")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad_request("id: missing (the agent id)".into()))?;
    let (agents, missing) = all_agents(&d).await?;
    let rec = agents
        .into_iter()
        .find(|a| &a.agent_id == id)
        .ok_or_else(|| {
            let hint = if missing.is_empty() {
                String::new()
            } else {
                format!(" (shards {missing:?} did not answer)")
            };
            ApiError(StatusCode::NOT_FOUND, format!("no agent {id:?}{hint}"))
        })?;
    let mut row = agent_row(&d, &rec);
    row["series"] = json!(d.history().agent_series(id));
    Ok(Json(row))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlBody {
    agent_id: String,
    collector: String,
    /// pause, resume or set_interval.
    action: String,
    #[serde(default)]
    interval_ms: u64,
}

/// Sends a control to an agent. The answer says whether it reached the
/// agent's stream; the agent's confirmation shows up as `last_control` on
/// `/api/agent` under the returned `control_id`.
pub async fn control(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    body: Result<Json<ControlBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    require_admin(&caller)?;
    let Json(b) = body.map_err(|e| bad_request(format!("body: {}", e.body_text())))?;
    let action = match b.action.as_str() {
        "pause" => control::Action::Pause,
        "resume" => control::Action::Resume,
        "set_interval" => control::Action::SetInterval,
        other => {
            return Err(bad_request(format!(
                "action: {other:?} is not pause, resume or set_interval"
            )));
        }
    };
    let c = Control {
        control_id: 0,
        collector: b.collector,
        action: action as i32,
        interval_ms: b.interval_ms,
    };
    let req = ControlRequest {
        agent_id: b.agent_id,
        control: Some(c),
        requested_by: String::new(),
    };
    let r = d.bus.route_control(req, &caller.who).await?;
    Ok(Json(json!({
        "delivered": r.delivered,
        "control_id": r.control_id,
        "shard": r.shard,
        "message": r.message,
    })))
}

pub async fn events(
    State(d): State<Arc<Dashboard>>,
    Authed(_): Authed,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let s = params::search(q.as_deref()).map_err(bad_request)?;
    if d.bus.sharded() {
        let q = QueryRequest {
            from_time: s.from,
            to_time: s.to,
            filter: Some(s.filter.to_wire()),
            limit: s.limit as u32,
            cursor: s.cursor.clone().unwrap_or_default(),
            allow_partial: true,
            newest_first: true,
            ..Default::default()
        };
        let spec = QuerySpec {
            filter: s.filter,
            limit: s.limit,
            ..Default::default()
        };
        let page = d.bus.newest_first(&q, spec).await?;
        return Ok(Json(json!({
            "events": page.events.iter().map(event_line).collect::<Vec<_>>(),
            "next_before": page.next.as_ref().map(format_cursor),
            "scanned": page.scanned,
            "missing_shards": page.missing_shards,
            "from": (s.from > 0).then(|| timestamp(s.from)),
            "to": (s.to > 0).then(|| timestamp(s.to)),
        })));
    }
    let req = PageRequest {
        before: s.before,
        from_time: s.from,
        to_time: s.to,
        filter: s.filter,
        limit: s.limit,
        max_scan: MAX_SCAN,
    };
    let store = d.bus.store.clone();
    let page = blocking(move || store.page_back(&req)).await?;
    Ok(Json(json!({
        "events": page.events.iter().map(event_line).collect::<Vec<_>>(),
        "next_before": page.next_before,
        "scanned": page.scanned,
        "from": (s.from > 0).then(|| timestamp(s.from)),
        "to": (s.to > 0).then(|| timestamp(s.to)),
    })))
}

pub async fn event(
    State(d): State<Arc<Dashboard>>,
    Authed(_): Authed,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let p = params::parse(q.as_deref(), &["offset", "shard"]).map_err(bad_request)?;
    let offset = params::number::<u64>("offset", p.get("offset"))
        .map_err(bad_request)?
        .ok_or_else(|| bad_request("offset: missing".into()))?;
    let shard = params::number::<u32>("shard", p.get("shard"))
        .map_err(bad_request)?
        .unwrap_or(d.bus.shards.index);
    match d.bus.event_at(shard, offset).await? {
        Some(e) => Ok(Json(event_json(&e))),
        None => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no event at offset {offset} of shard {shard} (never stored, or removed by retention)"
            ),
        )),
    }
}

/// Alert events one Alerts page request reads at most (updates included).
const MAX_ALERT_EVENTS: usize = 5_000;
/// How long an alert counts as open after its last match when no
/// receiver says (the receivers' `resolveAfter` default).
const DEFAULT_OPEN_FOR: std::time::Duration = std::time::Duration::from_secs(3600);

/// The Alerts page: the detector's alerts in a time range, repeats folded
/// into their counts, filtered, with counts by severity, rule and namespace
/// over the whole range so the facets show what the filters hide.
pub async fn alerts(
    State(d): State<Arc<Dashboard>>,
    Authed(_): Authed,
    RawQuery(q): RawQuery,
) -> ApiResult {
    let p = params::parse(
        q.as_deref(),
        &["since", "severity", "rule", "namespace", "open"],
    )
    .map_err(bad_request)?;
    let since = match p.get("since").map(|s| s.trim()) {
        None | Some("") => std::time::Duration::from_secs(24 * 3600),
        Some(s) => humantime::parse_duration(s).map_err(|e| {
            bad_request(format!(
                "since: {s:?} is not a duration like 1h or 7d ({e})"
            ))
        })?,
    };
    let min_severity = params::filter(&p).map_err(bad_request)?.min_severity;
    let open_only = match p.get("open").map(String::as_str) {
        None | Some("") | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => return Err(bad_request(format!("open: {v:?} is not true or false"))),
    };
    let (rule, namespace) = (p.get("rule").cloned(), p.get("namespace").cloned());
    let now = now_ns();
    let from = now.saturating_sub(i64::try_from(since.as_nanos()).unwrap_or(i64::MAX));
    let open_for = d
        .bus
        .cfg
        .alerting
        .sinks
        .iter()
        .map(|s| s.resolve_after)
        .max()
        .unwrap_or(DEFAULT_OPEN_FOR);
    let open_after = now.saturating_sub(i64::try_from(open_for.as_nanos()).unwrap_or(i64::MAX));

    // Newest first, page by page, until the range or the bound runs out.
    let mut events = Vec::new();
    let mut missing = Vec::new();
    let mut cursor = String::new();
    let truncated = loop {
        let q = QueryRequest {
            from_time: from,
            filter: Some(amoskys_proto::Filter {
                collectors: vec![amoskys_detect::DETECT_COLLECTOR.into()],
                ..Default::default()
            }),
            limit: 1000,
            cursor: std::mem::take(&mut cursor),
            allow_partial: true,
            newest_first: true,
            ..Default::default()
        };
        let spec = QuerySpec {
            filter: crate::filter::EventFilter {
                collectors: vec![amoskys_detect::DETECT_COLLECTOR.into()],
                ..Default::default()
            },
            limit: 1000,
            ..Default::default()
        };
        let page = d.bus.newest_first(&q, spec).await?;
        events.extend(page.events);
        missing.extend(page.missing_shards);
        match page.next {
            Some(next) if events.len() < MAX_ALERT_EVENTS => cursor = format_cursor(&next),
            Some(_) => break true,
            None => break false,
        }
    };
    missing.sort_unstable();
    missing.dedup();

    let mut facets: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
    let mut rows = Vec::new();
    for (e, a) in amoskys_client::alerts::fold(&events) {
        let ns = e
            .k8s
            .as_ref()
            .map(|k| k.namespace.clone())
            .unwrap_or_default();
        let open = a.last_seen >= open_after;
        let severity = amoskys_client::render::severity_name(e.severity);
        for (facet, v) in [
            ("severity", severity.to_string()),
            ("rule", a.rule.clone()),
            ("namespace", ns.clone()),
        ] {
            *facets.entry(facet).or_default().entry(v).or_default() += 1;
        }
        if e.severity < min_severity
            || rule.as_ref().is_some_and(|r| *r != a.rule)
            || namespace.as_ref().is_some_and(|n| *n != ns)
            || (open_only && !open)
        {
            continue;
        }
        let pod = e.k8s.as_ref().map(|k| k.pod.clone()).unwrap_or_default();
        rows.push(json!({
            "rule": a.rule,
            "severity": severity,
            "summary": a.summary,
            "count": a.count,
            "first_seen": ms(a.first_seen),
            "last_seen": ms(a.last_seen),
            "open": open,
            "namespace": ns,
            "pod": pod,
            "node": e.node,
            "kind": a.kind,
            "shard": e.shard,
            "offset": e.offset,
            "source": {"shard": a.source_shard, "offset": a.source_offset, "agent": a.source_agent},
        }));
    }
    Ok(Json(json!({
        "alerts": rows,
        "facets": facets,
        "from": timestamp(from),
        "open_for_seconds": open_for.as_secs(),
        "truncated": truncated,
        "missing_shards": missing,
    })))
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no such page: {}", uri.path()),
    )
}
