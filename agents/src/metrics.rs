//! The agent's Prometheus metrics (OpenMetrics text via prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectorLabel {
    pub collector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub collector: String,
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetResultLabel {
    pub target: String,
    pub result: String,
}

pub fn collector(c: &str) -> CollectorLabel {
    CollectorLabel {
        collector: c.to_string(),
    }
}

pub fn reason(r: &str) -> ReasonLabel {
    ReasonLabel {
        reason: r.to_string(),
    }
}

pub fn target(t: &str) -> TargetLabel {
    TargetLabel {
        target: t.to_string(),
    }
}

pub struct AgentMetrics {
    pub registry: Registry,
    pub produced: Family<CollectorLabel, Counter>,
    pub collector_errors: Family<CollectorLabel, Counter>,
    pub collector_mode: Family<ModeLabel, Gauge>,
    pub collector_paused: Family<CollectorLabel, Gauge>,
    pub sent: Counter,
    pub acked: Counter,
    pub dropped: Counter,
    pub spool_bytes: Gauge,
    pub spool_events: Gauge,
    pub spool_max_bytes: Gauge,
    pub spool_write_errors: Counter,
    pub connected: Gauge,
    pub reconnects: Counter,
    pub connect_errors: Family<ReasonLabel, Counter>,
    pub tls_reloads: Counter,
    pub process_polling_fallback: Gauge,
    pub flow_packets: Counter,
    pub flow_bytes: Counter,
    pub flow_malformed: Family<ReasonLabel, Counter>,
    pub flow_evicted: Counter,
    pub flow_exported: Counter,
    pub flow_active: Gauge,
    pub flow_kernel_dropped: Gauge,
    pub snmp_polls: Family<TargetResultLabel, Counter>,
    pub snmp_up: Family<TargetLabel, Gauge>,
    pub discovery_probes: Counter,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("amoskys_agent");
        let m = Self {
            registry: Registry::default(),
            produced: Family::default(),
            collector_errors: Family::default(),
            collector_mode: Family::default(),
            collector_paused: Family::default(),
            sent: Counter::default(),
            acked: Counter::default(),
            dropped: Counter::default(),
            spool_bytes: Gauge::default(),
            spool_events: Gauge::default(),
            spool_max_bytes: Gauge::default(),
            spool_write_errors: Counter::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            connect_errors: Family::default(),
            tls_reloads: Counter::default(),
            process_polling_fallback: Gauge::default(),
            flow_packets: Counter::default(),
            flow_bytes: Counter::default(),
            flow_malformed: Family::default(),
            flow_evicted: Counter::default(),
            flow_exported: Counter::default(),
            flow_active: Gauge::default(),
            flow_kernel_dropped: Gauge::default(),
            snmp_polls: Family::default(),
            snmp_up: Family::default(),
            discovery_probes: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "events_produced",
            "Events produced, by collector",
            m.produced.clone(),
        );
        r.register(
            "collector_errors",
            "Collector errors, by collector",
            m.collector_errors.clone(),
        );
        r.register(
            "collector_mode",
            "1 for the mode each collector runs in (e.g. process netlink or poll, flow live or file)",
            m.collector_mode.clone(),
        );
        r.register(
            "collector_paused",
            "1 while a collector is paused by control",
            m.collector_paused.clone(),
        );
        r.register(
            "events_sent",
            "Events sent to the bus (resends included)",
            m.sent.clone(),
        );
        r.register(
            "events_acked",
            "Events the bus acked as durable",
            m.acked.clone(),
        );
        r.register(
            "events_dropped",
            "Events dropped because the spool was full (reported to the bus as gap events)",
            m.dropped.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of events in the spool",
            m.spool_bytes.clone(),
        );
        r.register(
            "spool_events",
            "Events in the spool (not yet acked)",
            m.spool_events.clone(),
        );
        r.register(
            "spool_max_bytes",
            "The spool's byte bound (spool.maxBytes)",
            m.spool_max_bytes.clone(),
        );
        r.register(
            "spool_write_errors",
            "Failed spool writes",
            m.spool_write_errors.clone(),
        );
        r.register(
            "connected",
            "1 while a Publish stream to the bus is open",
            m.connected.clone(),
        );
        r.register(
            "reconnects",
            "Publish streams opened after the first",
            m.reconnects.clone(),
        );
        r.register(
            "connect_errors",
            "Failed connections or streams, by reason",
            m.connect_errors.clone(),
        );
        r.register(
            "tls_reloads",
            "Times changed TLS files were picked up",
            m.tls_reloads.clone(),
        );
        r.register(
            "process_polling_fallback",
            "1 when the process collector polls /proc because the netlink connector is not permitted",
            m.process_polling_fallback.clone(),
        );
        r.register(
            "flow_packets",
            "Packets seen by the flow collector",
            m.flow_packets.clone(),
        );
        r.register(
            "flow_bytes",
            "IP bytes seen by the flow collector",
            m.flow_bytes.clone(),
        );
        r.register(
            "flow_malformed_packets",
            "Packets skipped as truncated or malformed, by reason",
            m.flow_malformed.clone(),
        );
        r.register(
            "flow_evicted",
            "Flows evicted because the table was full (flow.maxFlows)",
            m.flow_evicted.clone(),
        );
        r.register(
            "flow_exported",
            "Flow records exported",
            m.flow_exported.clone(),
        );
        r.register(
            "flow_active",
            "Flows in the flow table",
            m.flow_active.clone(),
        );
        r.register(
            "flow_kernel_dropped",
            "Packets the kernel dropped before capture (libpcap stats)",
            m.flow_kernel_dropped.clone(),
        );
        r.register(
            "snmp_polls",
            "SNMP polls by target and result",
            m.snmp_polls.clone(),
        );
        r.register(
            "snmp_up",
            "1 when the SNMP target answered its last poll",
            m.snmp_up.clone(),
        );
        r.register(
            "discovery_probes",
            "TCP connect probes made by active discovery",
            m.discovery_probes.clone(),
        );
        Self { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}
