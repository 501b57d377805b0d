//! Export to NATS JetStream: the bus publishes its store, in offset order,
//! to a stream that already exists, and remembers how far the stream has
//! acknowledged.
//!
//! The cursor (the first offset without a PubAck) lives in the store and
//! moves only over acked events, so a restart resumes there. Each message
//! carries `Nats-Msg-Id: <agent_id>:<incarnation>:<seq>`, so what is sent
//! again after a crash or a failed ack falls in the stream's duplicate
//! window and is stored once. The export runs beside ingest and never holds
//! it up or makes the bus unready; while it is behind, age retention keeps
//! what it has not sent (the size cap does not, and counts what it cuts).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use amoskys_proto::Event;
use async_nats::jetstream::context::{ContextBuilder, PublishAckFuture};
use async_nats::jetstream::message::PublishMessage;
use prost::Message;
use tracing::{info, warn};

use crate::config::{ExportFormat, NatsExportConfig};
use crate::metrics::reason;
use crate::registry::incarnation_hex;
use crate::service::BusState;
use crate::writer::now_ns;

/// Events read from the store at a time.
const READ: usize = 1024;
/// How often an idle export looks for new events.
const IDLE: Duration = Duration::from_millis(20);
/// How often the lag is reported while the export waits to retry.
const LAG_EVERY: Duration = Duration::from_millis(500);
/// How long a PubAck may take before the export reconnects and resends.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an export session ended; the reason labels `export_errors`.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("connecting to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("JetStream stream {stream:?}: {message}")]
    StreamMissing { stream: String, message: String },
    #[error("publishing offset {offset}: {message}")]
    Publish { offset: u64, message: String },
    #[error("no PubAck for offset {offset}: {message}")]
    Ack { offset: u64, message: String },
    #[error("store: {0}")]
    Store(String),
}

impl ExportError {
    fn reason(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "connect",
            Self::StreamMissing { .. } => "stream_missing",
            Self::Publish { .. } => "publish",
            Self::Ack { .. } => "ack",
            Self::Store(_) => "store",
        }
    }
}

/// Starts the export; it runs until the bus stops.
pub fn spawn(state: Arc<BusState>, cfg: NatsExportConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = tokio::select! {
                r = session(&state, &cfg) => r,
                _ = state.stop.cancelled() => Ok(()),
            };
            state.metrics.export_ready.set(0);
            let Err(e) = result else { return };
            state
                .metrics
                .export_errors
                .get_or_create(&reason(e.reason()))
                .inc();
            *state.export_error.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((e.reason().to_string(), e.to_string()));
            warn!(error = %e, retry_in = ?backoff, "NATS export stopped; retrying");
            // The lag keeps growing while the export is down: keep saying so.
            let retry_at = tokio::time::Instant::now() + backoff;
            loop {
                if let Ok(cursor) = stored_cursor(&state).await {
                    report_lag(&state, cursor).await;
                }
                let tick = (tokio::time::Instant::now() + LAG_EVERY).min(retry_at);
                tokio::select! {
                    _ = tokio::time::sleep_until(tick) => {}
                    _ = state.stop.cancelled() => return,
                }
                if tick >= retry_at {
                    break;
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

/// Where the export resumes: the stored cursor, or the first stored event.
async fn stored_cursor(state: &Arc<BusState>) -> Result<u64, ExportError> {
    let store = state.store.clone();
    blocking(move || {
        Ok(store
            .export_cursor()?
            .unwrap_or_else(|| store.first_offset()))
    })
    .await
}

async fn connect(cfg: &NatsExportConfig) -> Result<async_nats::Client, ExportError> {
    let failed = |message: String| ExportError::Connect {
        url: cfg.url.clone(),
        message,
    };
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(ACK_TIMEOUT));
    if let Some(dir) = &cfg.tls_dir {
        opts = opts
            .require_tls(true)
            .add_root_certificates(dir.join("ca.crt"));
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        if cert.exists() && key.exists() {
            opts = opts.add_client_certificate(cert, key);
        }
    }
    if let Some(creds) = &cfg.credentials_file {
        opts = opts
            .credentials_file(creds)
            .await
            .map_err(|e| failed(format!("credentials file {}: {e}", creds.display())))?;
    }
    opts.connect(cfg.url.as_str())
        .await
        .map_err(|e| failed(e.to_string()))
}

/// Blocking store work, off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ExportError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ExportError::Store(e.to_string()))?
        .map_err(|e| ExportError::Store(e.to_string()))
}

/// One connection's worth of export: returns only with an error (or never,
/// until the bus stops and the caller drops it).
async fn session(state: &Arc<BusState>, cfg: &NatsExportConfig) -> Result<(), ExportError> {
    let client = connect(cfg).await?;
    let js = ContextBuilder::new()
        .max_ack_inflight(cfg.max_in_flight + 1)
        .ack_timeout(ACK_TIMEOUT)
        .build(client);
    js.get_stream(&cfg.stream)
        .await
        .map_err(|e| ExportError::StreamMissing {
            stream: cfg.stream.clone(),
            message: e.to_string(),
        })?;
    let mut cursor = stored_cursor(state).await?;
    report_lag(state, cursor).await;
    state.metrics.export_ready.set(1);
    *state.export_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    info!(url = %cfg.url, stream = %cfg.stream, from = cursor, "NATS export connected");

    // In flight, oldest first: (offset, its PubAck).
    let mut pending: VecDeque<(u64, PublishAckFuture)> = VecDeque::new();
    let mut next = cursor;
    // What the store holds; an idle export polls often and need not write.
    let mut saved = cursor;
    loop {
        let first = state.store.first_offset();
        if cursor < first && pending.is_empty() {
            let lost = first - cursor;
            state.metrics.export_skipped.inc_by(lost);
            warn!(
                from = cursor,
                to = first - 1,
                events = lost,
                "the size cap deleted events the NATS export had not sent; they are lost to it"
            );
            cursor = first;
            next = next.max(first);
            save(state, first, &mut saved).await?;
        }
        let store = state.store.clone();
        let from = next;
        let events = blocking(move || store.read_from(from, READ)).await?;
        if events.is_empty() {
            // Caught up: settle what is in flight, then wait for more.
            while let Some(p) = pending.pop_front() {
                cursor = acked(state, p).await?;
            }
            save(state, cursor, &mut saved).await?;
            report_lag(state, cursor).await;
            tokio::time::sleep(IDLE).await;
            continue;
        }
        for e in events {
            let offset = e.offset;
            let publish = PublishMessage::build()
                .payload(payload(&e, cfg.format).into())
                .message_id(message_id(&e));
            let ack = js
                .send_publish(subject(&cfg.subject_prefix, &e), publish)
                .await
                .map_err(|err| ExportError::Publish {
                    offset,
                    message: err.to_string(),
                })?;
            state.metrics.export_published.inc();
            pending.push_back((offset, ack));
            next = offset + 1;
            if pending.len() >= cfg.max_in_flight
                && let Some(p) = pending.pop_front()
            {
                cursor = acked(state, p).await?;
            }
        }
        save(state, cursor, &mut saved).await?;
        report_lag(state, cursor).await;
    }
}

/// Waits for one PubAck; the cursor then passes its event.
async fn acked(
    state: &BusState,
    (offset, ack): (u64, PublishAckFuture),
) -> Result<u64, ExportError> {
    let ack = ack.await.map_err(|e| ExportError::Ack {
        offset,
        message: e.to_string(),
    })?;
    state.metrics.export_acked.inc();
    if ack.duplicate {
        // Sent again after a restart or a retry; the stream kept the first.
        state.metrics.export_duplicates.inc();
    }
    Ok(offset + 1)
}

async fn save(state: &BusState, cursor: u64, saved: &mut u64) -> Result<(), ExportError> {
    if cursor == *saved {
        return Ok(());
    }
    let store = state.store.clone();
    blocking(move || store.set_export_cursor(cursor)).await?;
    *saved = cursor;
    Ok(())
}

/// Sets the lag gauges: stored events from `cursor` on, and the age of the
/// one at `cursor`.
async fn report_lag(state: &Arc<BusState>, cursor: u64) {
    let store = state.store.clone();
    let oldest = blocking(move || store.read_from(cursor, 1)).await;
    let behind = state.store.next_offset().saturating_sub(cursor);
    state.metrics.export_lag_events.set(behind as i64);
    let age = match oldest.ok().and_then(|v| v.first().map(|e| e.stored_at)) {
        Some(t) if behind > 0 => (now_ns() - t).max(0) as f64 / 1e9,
        _ => 0.0,
    };
    state.metrics.export_lag_seconds.set(age);
}

/// `<agent_id>:<incarnation>:<seq>`; the bus's own events (seq 0) are
/// named by their offset instead, as there can be several per incarnation.
pub fn message_id(e: &Event) -> String {
    let inc = incarnation_hex(e.incarnation);
    if e.seq == 0 {
        format!("{}:{inc}:bus-{}", e.agent_id, e.offset)
    } else {
        format!("{}:{inc}:{}", e.agent_id, e.seq)
    }
}

/// `<prefix>.<collector>.<severity>`, each name made a single safe token.
pub fn subject(prefix: &str, e: &Event) -> String {
    let severity = amoskys_client::render::severity_name(e.severity);
    format!("{prefix}.{}.{}", token(&e.collector), token(&severity))
}

/// A subject token: anything but letters, digits, `-` and `_` becomes `_`
/// (dots would split it, `*` and `>` are wildcards); empty becomes `_`.
fn token(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn payload(e: &Event, format: ExportFormat) -> Vec<u8> {
    match format {
        ExportFormat::Protobuf => e.encode_to_vec(),
        // An Event always serializes; the fallback only keeps this total.
        ExportFormat::Json => serde_json::to_vec(e).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::Severity;

    #[test]
    fn subjects_and_ids_are_safe_and_stable() {
        let e = Event {
            agent_id: "node-1".into(),
            seq: 42,
            incarnation: 0xab,
            collector: "snmp.v2 *x>".into(),
            severity: Severity::Warning as i32,
            offset: 7,
            ..Default::default()
        };
        assert_eq!(subject("amoskys.ev", &e), "amoskys.ev.snmp_v2__x_.warning");
        assert_eq!(
            message_id(&e),
            format!("node-1:{}:42", incarnation_hex(0xab))
        );
        let bus = Event {
            seq: 0,
            ..e.clone()
        };
        assert_eq!(
            message_id(&bus),
            format!("node-1:{}:bus-7", incarnation_hex(0xab))
        );
        let none = Event {
            collector: String::new(),
            ..Default::default()
        };
        assert_eq!(subject("p", &none), "p._.unspecified");
        let back = Event::decode(&*payload(&e, ExportFormat::Protobuf)).unwrap();
        assert_eq!(back, e);
        let json: serde_json::Value =
            serde_json::from_slice(&payload(&e, ExportFormat::Json)).unwrap();
        assert_eq!(json["seq"], 42);
    }
}
