//! The bus's Prometheus metrics (OpenMetrics text via prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

pub fn reason(r: &str) -> ReasonLabel {
    ReasonLabel {
        reason: r.to_string(),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectorLabel {
    pub collector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabel {
    pub sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkReasonLabel {
    pub sink: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleSeverityLabel {
    pub rule: String,
    pub severity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleReasonLabel {
    pub rule: String,
    pub reason: String,
}

/// Distinct collector names kept apart in metrics; the rest count as "other",
/// so a misbehaving agent cannot grow the series without bound.
pub const MAX_COLLECTOR_LABELS: usize = 64;

pub struct BusMetrics {
    pub registry: Registry,
    pub stored_by_collector: Family<CollectorLabel, Counter>,
    /// The same counts, readable for the dashboard's rates.
    collector_totals: Mutex<BTreeMap<String, u64>>,
    pub http_request_seconds: Family<RouteLabel, Histogram>,
    pub dashboard_tail_viewers: Gauge,
    pub dashboard_tail_skipped: Counter,
    pub events_received: Counter,
    pub events_stored: Counter,
    pub duplicates: Counter,
    pub rejected: Family<ReasonLabel, Counter>,
    pub batch_events: Histogram,
    pub group_events: Histogram,
    pub fsync_seconds: Histogram,
    pub ack_latency_seconds: Histogram,
    pub wal_bytes: Gauge,
    /// Size and free bytes of the filesystem holding the data directory,
    /// so "the WAL volume is nearly full" is an alert on the bus's own
    /// metrics, in a cluster or on a host.
    pub wal_volume_size_bytes: Gauge,
    pub wal_volume_free_bytes: Gauge,
    pub stored_events: Gauge,
    pub connected_agents: Gauge,
    pub tls_handshake_failures: Family<ReasonLabel, Counter>,
    pub tls_reloads: Counter,
    pub tls_reload_errors: Counter,
    pub wal_write_errors: Counter,
    pub writable: Gauge,
    pub queue_depth: Gauge,
    pub queue_capacity: Gauge,
    pub max_message_bytes: Gauge,
    pub retention_deleted: Family<ReasonLabel, Counter>,
    pub tail_subscribers: Gauge,
    pub tail_lagged: Counter,
    pub incarnations: Counter,
    pub streams_refused: Counter,
    pub bus_lost: Counter,
    pub backups: Counter,
    pub backup_errors: Counter,
    pub backup_seconds: Histogram,
    pub backup_last_success: Gauge,
    pub backup_bytes: Gauge,
    pub export_published: Counter,
    pub export_acked: Counter,
    pub export_duplicates: Counter,
    pub export_errors: Family<ReasonLabel, Counter>,
    pub export_skipped: Counter,
    pub export_lag_events: Gauge,
    pub export_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub export_ready: Gauge,
    pub shard_index: Gauge,
    pub shard_epoch: Gauge,
    pub shard_active: Gauge,
    pub shard_retiring: Gauge,
    pub shard_map_errors: Counter,
    pub shard_redirects: Counter,
    pub shard_moved_out: Counter,
    pub shard_move_unverified: Counter,
    pub shard_peer_errors: Family<ReasonLabel, Counter>,
    pub detect_rules_loaded: Gauge,
    pub detect_rules_failed: Gauge,
    pub detect_rule_reloads: Counter,
    pub detect_events: Counter,
    pub detect_events_without_cel: Counter,
    pub detect_matches: Family<RuleSeverityLabel, Counter>,
    pub detect_suppressed: Family<RuleReasonLabel, Counter>,
    pub detect_eval_seconds: Family<RuleLabel, Counter<f64, std::sync::atomic::AtomicU64>>,
    pub detect_errors: Family<RuleLabel, Counter>,
    pub detect_rule_degraded: Family<RuleLabel, Gauge>,
    pub detect_alerts: Counter,
    pub detect_alert_seconds: Histogram,
    pub detect_lag_events: Gauge,
    pub detect_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub detect_checkpoint_seconds: Histogram,
    pub detect_checkpoint_bytes: Gauge,
    pub sink_sent: Family<SinkLabel, Counter>,
    pub sink_rejected: Family<SinkLabel, Counter>,
    pub sink_errors: Family<SinkReasonLabel, Counter>,
    pub sink_backlog_events: Family<SinkLabel, Gauge>,
    pub sink_delivery_seconds: Family<SinkLabel, Histogram>,
}

impl BusMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("amoskys_bus");
        let m = Self {
            stored_by_collector: Family::default(),
            collector_totals: Mutex::new(BTreeMap::new()),
            http_request_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_1, 2.0, 16))
            }),
            dashboard_tail_viewers: Gauge::default(),
            dashboard_tail_skipped: Counter::default(),
            events_received: Counter::default(),
            events_stored: Counter::default(),
            duplicates: Counter::default(),
            rejected: Family::default(),
            batch_events: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            group_events: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            ack_latency_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            wal_bytes: Gauge::default(),
            wal_volume_size_bytes: Gauge::default(),
            wal_volume_free_bytes: Gauge::default(),
            stored_events: Gauge::default(),
            connected_agents: Gauge::default(),
            tls_handshake_failures: Family::default(),
            tls_reloads: Counter::default(),
            tls_reload_errors: Counter::default(),
            wal_write_errors: Counter::default(),
            writable: Gauge::default(),
            queue_depth: Gauge::default(),
            queue_capacity: Gauge::default(),
            max_message_bytes: Gauge::default(),
            retention_deleted: Family::default(),
            tail_subscribers: Gauge::default(),
            tail_lagged: Counter::default(),
            incarnations: Counter::default(),
            streams_refused: Counter::default(),
            bus_lost: Counter::default(),
            backups: Counter::default(),
            backup_errors: Counter::default(),
            backup_seconds: Histogram::new(exponential_buckets(0.01, 4.0, 10)),
            backup_last_success: Gauge::default(),
            backup_bytes: Gauge::default(),
            export_published: Counter::default(),
            export_acked: Counter::default(),
            export_duplicates: Counter::default(),
            export_errors: Family::default(),
            export_skipped: Counter::default(),
            export_lag_events: Gauge::default(),
            export_lag_seconds: Gauge::default(),
            export_ready: Gauge::default(),
            detect_rules_loaded: Gauge::default(),
            detect_rules_failed: Gauge::default(),
            detect_rule_reloads: Counter::default(),
            detect_events: Counter::default(),
            detect_events_without_cel: Counter::default(),
            detect_matches: Family::default(),
            detect_suppressed: Family::default(),
            detect_eval_seconds: Family::default(),
            detect_errors: Family::default(),
            detect_rule_degraded: Family::default(),
            detect_alerts: Counter::default(),
            detect_alert_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
            detect_lag_events: Gauge::default(),
            detect_lag_seconds: Gauge::default(),
            detect_checkpoint_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            detect_checkpoint_bytes: Gauge::default(),
            sink_sent: Family::default(),
            sink_rejected: Family::default(),
            sink_errors: Family::default(),
            sink_backlog_events: Family::default(),
            sink_delivery_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 18))
            }),
            shard_index: Gauge::default(),
            shard_epoch: Gauge::default(),
            shard_active: Gauge::default(),
            shard_retiring: Gauge::default(),
            shard_map_errors: Counter::default(),
            shard_redirects: Counter::default(),
            shard_moved_out: Counter::default(),
            shard_move_unverified: Counter::default(),
            shard_peer_errors: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "events_received",
            "Events received from publishers",
            m.events_received.clone(),
        );
        r.register(
            "events_stored",
            "Events made durable in the WAL",
            m.events_stored.clone(),
        );
        r.register(
            "duplicates",
            "Events dropped as already stored (agent_id, seq)",
            m.duplicates.clone(),
        );
        r.register(
            "agent_incarnations",
            "New agent incarnations (a wiped or new spool under a known agent id), each announced as an event",
            m.incarnations.clone(),
        );
        r.register(
            "streams_refused",
            "Publish streams refused because another incarnation of the agent id had a live stream",
            m.streams_refused.clone(),
        );
        r.register(
            "lost",
            "Events agents saw acked that the bus no longer holds (restored from an older backup, a lost volume), each range recorded as a gap event",
            m.bus_lost.clone(),
        );
        r.register(
            "rejected",
            "Messages or events rejected, by reason",
            m.rejected.clone(),
        );
        r.register(
            "batch_events",
            "Events per client batch",
            m.batch_events.clone(),
        );
        r.register(
            "group_events",
            "Events per group commit",
            m.group_events.clone(),
        );
        r.register(
            "wal_write_seconds",
            "Time to write and (per sync policy) fsync one group",
            m.fsync_seconds.clone(),
        );
        r.register(
            "ack_latency_seconds",
            "From batch received to its ack sent",
            m.ack_latency_seconds.clone(),
        );
        r.register(
            "wal_bytes",
            "Bytes the WAL store occupies on disk",
            m.wal_bytes.clone(),
        );
        r.register(
            "wal_volume_size_bytes",
            "Size of the filesystem holding the data directory",
            m.wal_volume_size_bytes.clone(),
        );
        r.register(
            "wal_volume_free_bytes",
            "Bytes the bus may still write on the filesystem holding the data directory",
            m.wal_volume_free_bytes.clone(),
        );
        r.register(
            "stored_event_count",
            "Events currently held (next offset minus first offset)",
            m.stored_events.clone(),
        );
        r.register(
            "connected_agents",
            "Publish streams currently open",
            m.connected_agents.clone(),
        );
        r.register(
            "tls_handshake_failures",
            "Failed TLS handshakes, by reason",
            m.tls_handshake_failures.clone(),
        );
        r.register(
            "tls_reloads",
            "Certificate reloads applied",
            m.tls_reloads.clone(),
        );
        r.register(
            "tls_reload_errors",
            "Certificate reloads refused (old files kept)",
            m.tls_reload_errors.clone(),
        );
        r.register(
            "wal_write_errors",
            "Failed WAL writes (acks withheld until they succeed)",
            m.wal_write_errors.clone(),
        );
        r.register(
            "writable",
            "1 when the WAL accepts writes",
            m.writable.clone(),
        );
        r.register(
            "queue_depth",
            "Client batches waiting for the writer",
            m.queue_depth.clone(),
        );
        r.register(
            "queue_capacity",
            "Limit on client batches waiting for the writer",
            m.queue_capacity.clone(),
        );
        r.register(
            "max_message_bytes",
            "Largest accepted gRPC message",
            m.max_message_bytes.clone(),
        );
        r.register(
            "retention_deleted",
            "Events removed by retention, by reason (age, size)",
            m.retention_deleted.clone(),
        );
        r.register(
            "tail_subscribers",
            "Open Tail streams",
            m.tail_subscribers.clone(),
        );
        r.register(
            "tail_lagged",
            "Times a Tail subscriber fell behind live and was served from the store",
            m.tail_lagged.clone(),
        );
        r.register(
            "events_stored_by_collector",
            "Events made durable, by collector",
            m.stored_by_collector.clone(),
        );
        r.register(
            "http_request_seconds",
            "Server time of HTTP requests (dashboard, API, metrics), by route",
            m.http_request_seconds.clone(),
        );
        r.register(
            "dashboard_tail_viewers",
            "Open live-tail streams in the dashboard",
            m.dashboard_tail_viewers.clone(),
        );
        r.register(
            "dashboard_tail_skipped",
            "Events not sent to dashboard tail viewers (rate cap or slow viewer)",
            m.dashboard_tail_skipped.clone(),
        );
        r.register("backups", "Backups of the store taken", m.backups.clone());
        r.register(
            "backup_errors",
            "Backups of the store that failed",
            m.backup_errors.clone(),
        );
        r.register(
            "backup_seconds",
            "Time to take one backup",
            m.backup_seconds.clone(),
        );
        r.register(
            "backup_last_success_timestamp_seconds",
            "Unix time of the newest backup taken by this process (0: none yet)",
            m.backup_last_success.clone(),
        );
        r.register(
            "backup_size_bytes",
            "Bytes the newest backup refers to (shared table files included)",
            m.backup_bytes.clone(),
        );
        r.register(
            "export_published",
            "Events published to the NATS JetStream export (again after a retry)",
            m.export_published.clone(),
        );
        r.register(
            "export_acked",
            "Events the export's stream acknowledged",
            m.export_acked.clone(),
        );
        r.register(
            "export_duplicates",
            "Events the stream acknowledged as duplicates of ones it held (sent again after a restart or a retry)",
            m.export_duplicates.clone(),
        );
        r.register(
            "export_errors",
            "Export failures by reason (connect, stream_missing, publish, ack, store)",
            m.export_errors.clone(),
        );
        r.register(
            "export_skipped",
            "Events the size cap deleted before the export had them acked (lost to the export)",
            m.export_skipped.clone(),
        );
        r.register(
            "export_lag_events",
            "Stored events the export has not had acked",
            m.export_lag_events.clone(),
        );
        r.register(
            "export_lag_seconds",
            "Age of the oldest stored event the export has not had acked",
            m.export_lag_seconds.clone(),
        );
        r.register(
            "export_ready",
            "1 while the export is connected to its stream",
            m.export_ready.clone(),
        );
        r.register(
            "shard_index",
            "This bus's shard index",
            m.shard_index.clone(),
        );
        r.register(
            "shard_map_epoch",
            "Epoch of the shard map this bus routes by",
            m.shard_epoch.clone(),
        );
        r.register(
            "shard_active",
            "Shards that own agents under the current map",
            m.shard_active.clone(),
        );
        r.register(
            "shard_retiring",
            "1 while this shard is retiring (takes no new events, still serves reads)",
            m.shard_retiring.clone(),
        );
        r.register(
            "shard_map_errors",
            "Shard map files that could not be read or were invalid (the previous map stays)",
            m.shard_map_errors.clone(),
        );
        r.register(
            "shard_redirects",
            "Publish streams sent to the agent's owner shard instead of being taken here",
            m.shard_redirects.clone(),
        );
        r.register(
            "shard_moved_out",
            "Publish streams handed to a new owner after a map change (their batches acked first)",
            m.shard_moved_out.clone(),
        );
        r.register(
            "shard_move_unverified",
            "Agents taken over while a peer shard could not say what it stored of them (resends there may be duplicates)",
            m.shard_move_unverified.clone(),
        );
        r.register(
            "shard_peer_errors",
            "Calls to peer shards that failed, by reason (connect, rpc, timeout)",
            m.shard_peer_errors.clone(),
        );
        registry.register(
            "detect_rules_loaded",
            "Detection rules loaded and evaluating",
            m.detect_rules_loaded.clone(),
        );
        registry.register(
            "detect_rules_failed",
            "Detection rules not loaded: they did not compile or failed an inline test",
            m.detect_rules_failed.clone(),
        );
        registry.register(
            "detect_rule_reloads",
            "Times the rule set was read again and swapped in",
            m.detect_rule_reloads.clone(),
        );
        registry.register(
            "detect_events",
            "Stored events the detector evaluated",
            m.detect_events.clone(),
        );
        registry.register(
            "detect_events_without_cel",
            "Evaluated events for which no rule ran CEL (kind, scope or a prefilter decided)",
            m.detect_events_without_cel.clone(),
        );
        registry.register(
            "detect_matches",
            "Rule matches, by rule and severity (before dedup and thresholds)",
            m.detect_matches.clone(),
        );
        registry.register(
            "detect_suppressed",
            "Matches that did not become a new alert, by rule and reason (dedup: counted in the open alert)",
            m.detect_suppressed.clone(),
        );
        registry.register(
            "detect_eval_seconds",
            "Time spent in each rule's CEL condition",
            m.detect_eval_seconds.clone(),
        );
        registry.register(
            "detect_errors",
            "Events on which a rule's condition failed to evaluate, by rule",
            m.detect_errors.clone(),
        );
        registry.register(
            "detect_rule_degraded",
            "1 while a rule's mean CEL time per event is over detection.ruleBudget (it still runs)",
            m.detect_rule_degraded.clone(),
        );
        registry.register(
            "detect_alerts",
            "Alert events the detector wrote (new alerts and window updates)",
            m.detect_alerts.clone(),
        );
        registry.register(
            "detect_alert_seconds",
            "From a matching event stored to its new alert durable in the store",
            m.detect_alert_seconds.clone(),
        );
        registry.register(
            "detect_lag_events",
            "Stored events the detector has not evaluated yet",
            m.detect_lag_events.clone(),
        );
        registry.register(
            "detect_lag_seconds",
            "Age of the oldest stored event the detector has not evaluated",
            m.detect_lag_seconds.clone(),
        );
        registry.register(
            "detect_checkpoint_seconds",
            "Time to save the detector's cursor and windows (a slow save spaces the next ones out)",
            m.detect_checkpoint_seconds.clone(),
        );
        registry.register(
            "detect_checkpoint_bytes",
            "Size of the detector's last saved checkpoint (cursor and open windows)",
            m.detect_checkpoint_bytes.clone(),
        );
        registry.register(
            "alert_sink_sent",
            "Alerts a receiver acknowledged, by sink (alertmanager, webhook)",
            m.sink_sent.clone(),
        );
        registry.register(
            "alert_sink_rejected",
            "Alerts a receiver refused as invalid (a 4xx other than 408 and 429), logged and not sent again, by sink",
            m.sink_rejected.clone(),
        );
        registry.register(
            "alert_sink_errors",
            "Failed deliveries that are retried, by sink and reason (connect, timeout, status)",
            m.sink_errors.clone(),
        );
        registry.register(
            "alert_sink_backlog_events",
            "Stored events the sink has not passed yet (alerts among them wait for delivery)",
            m.sink_backlog_events.clone(),
        );
        registry.register(
            "alert_sink_delivery_seconds",
            "From an alert stored to its receiver's acknowledgement, by sink",
            m.sink_delivery_seconds.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts stored events by collector (one call per group commit).
    pub fn count_stored<'a>(&self, collectors: impl IntoIterator<Item = &'a str>) {
        let mut group: BTreeMap<&str, u64> = BTreeMap::new();
        for c in collectors {
            *group.entry(c).or_default() += 1;
        }
        let mut totals = self
            .collector_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (c, n) in group {
            let name = if totals.contains_key(c) || totals.len() < MAX_COLLECTOR_LABELS {
                c
            } else {
                "other"
            };
            *totals.entry(name.to_string()).or_default() += n;
            self.stored_by_collector
                .get_or_create(&CollectorLabel {
                    collector: name.to_string(),
                })
                .inc_by(n);
        }
    }

    /// Events stored since start, by collector.
    pub fn collector_totals(&self) -> BTreeMap<String, u64> {
        self.collector_totals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for BusMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_labels_are_capped() {
        let m = BusMetrics::new();
        m.count_stored(["process", "flow", "process"]);
        let names: Vec<String> = (0..MAX_COLLECTOR_LABELS + 10)
            .map(|i| format!("c{i}"))
            .collect();
        m.count_stored(names.iter().map(String::as_str));
        let t = m.collector_totals();
        assert_eq!(t["process"], 2);
        assert_eq!(t["flow"], 1);
        assert_eq!(t.len(), MAX_COLLECTOR_LABELS + 1, "{t:?}");
        assert_eq!(t["other"], 12);
        assert!(
            m.encode()
                .contains("events_stored_by_collector_total{collector=\"process\"} 2")
        );
    }
}
