//! The agent's Prometheus metrics (OpenMetrics text via prometheus-client).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Metric labels: which collector.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CollectorLabel {
    /// The collector's name (`process`, `flow`, ...).
    pub collector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// Metric labels: a collector and the mode it runs in.
pub struct ModeLabel {
    /// The collector's name.
    pub collector: String,
    /// Its mode, e.g. `netlink` or `poll`.
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// Metric labels: why something failed or was dropped.
pub struct ReasonLabel {
    /// A short, bounded reason such as `tls` or `truncated`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// Metric labels: how something ended.
pub struct ResultLabel {
    /// A short, bounded outcome such as `socket` or `none`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// Metric labels: an SNMP target.
pub struct TargetLabel {
    /// The target's address.
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// Metric labels: an SNMP target and how a poll of it ended.
pub struct TargetResultLabel {
    /// The target's address.
    pub target: String,
    /// `ok` or the failure's kind.
    pub result: String,
}

/// The labels for collector `c`.
pub fn collector(c: &str) -> CollectorLabel {
    CollectorLabel {
        collector: c.to_string(),
    }
}

/// The labels for result `r`.
pub fn result(r: &str) -> ResultLabel {
    ResultLabel {
        result: r.to_string(),
    }
}

/// The labels for reason `r`.
pub fn reason(r: &str) -> ReasonLabel {
    ReasonLabel {
        reason: r.to_string(),
    }
}

/// The labels for SNMP target `t`.
pub fn target(t: &str) -> TargetLabel {
    TargetLabel {
        target: t.to_string(),
    }
}

/// The agent's metrics, served on its `/metrics`.
pub struct AgentMetrics {
    /// Every metric below, registered under the `amoskys_agent` prefix.
    pub registry: Registry,
    /// `amoskys_agent_events_produced_total`: Events produced, by collector.
    pub produced: Family<CollectorLabel, Counter>,
    /// `amoskys_agent_collector_errors_total`: Collector errors, by collector.
    pub collector_errors: Family<CollectorLabel, Counter>,
    /// `amoskys_agent_collector_mode`: 1 for the mode each collector runs in (e.g. process netlink or poll, flow live or file).
    pub collector_mode: Family<ModeLabel, Gauge>,
    /// `amoskys_agent_collector_paused`: 1 while a collector is paused by control.
    pub collector_paused: Family<CollectorLabel, Gauge>,
    /// `amoskys_agent_events_sent_total`: Events sent to the bus (resends included).
    pub sent: Counter,
    /// `amoskys_agent_events_acked_total`: Events the bus acked as durable.
    pub acked: Counter,
    /// `amoskys_agent_events_dropped_total`: Events dropped because the spool was full (reported to the bus as gap events).
    pub dropped: Counter,
    /// `amoskys_agent_spool_bytes`: Bytes of events in the spool.
    pub spool_bytes: Gauge,
    /// `amoskys_agent_spool_events`: Events in the spool (not yet acked).
    pub spool_events: Gauge,
    /// `amoskys_agent_spool_max_bytes`: The spool's byte bound (spool.maxBytes).
    pub spool_max_bytes: Gauge,
    /// `amoskys_agent_spool_write_errors_total`: Failed spool writes.
    pub spool_write_errors: Counter,
    /// `amoskys_agent_connected`: 1 while a Publish stream to the bus is open.
    pub connected: Gauge,
    /// `amoskys_agent_reconnects_total`: Publish streams opened after the first.
    pub reconnects: Counter,
    /// `amoskys_agent_redirects_total`: times a bus shard sent the agent to
    /// its owner shard.
    pub redirects: Counter,
    /// `amoskys_agent_connect_errors_total`: Failed connections or streams, by reason.
    pub connect_errors: Family<ReasonLabel, Counter>,
    /// `amoskys_agent_tls_reloads_total`: Times changed TLS files were picked up.
    pub tls_reloads: Counter,
    /// `amoskys_agent_process_polling_fallback`: 1 when the process collector polls /proc because the netlink connector is not permitted.
    pub process_polling_fallback: Gauge,
    /// `amoskys_agent_flow_packets_total`: Packets seen by the flow collector.
    pub flow_packets: Counter,
    /// `amoskys_agent_flow_bytes_total`: IP bytes seen by the flow collector.
    pub flow_bytes: Counter,
    /// `amoskys_agent_flow_malformed_packets_total`: Packets skipped as truncated or malformed, by reason.
    pub flow_malformed: Family<ReasonLabel, Counter>,
    /// `amoskys_agent_flow_evicted_total`: Flows evicted because the table was full (flow.maxFlows).
    pub flow_evicted: Counter,
    /// `amoskys_agent_flow_exported_total`: Flow records exported.
    pub flow_exported: Counter,
    /// `amoskys_agent_flow_active`: Flows in the flow table.
    pub flow_active: Gauge,
    /// `amoskys_agent_flow_kernel_dropped`: Packets the kernel dropped before capture (libpcap stats).
    pub flow_kernel_dropped: Gauge,
    /// `amoskys_agent_flow_owner_lookups_total`: New TCP/UDP flows looked up for their process, by result (socket, listener, none, skipped).
    pub flow_owner_lookups: Family<ResultLabel, Counter>,
    /// `amoskys_agent_snmp_polls_total`: SNMP polls by target and result.
    pub snmp_polls: Family<TargetResultLabel, Counter>,
    /// `amoskys_agent_snmp_up`: 1 when the SNMP target answered its last poll.
    pub snmp_up: Family<TargetLabel, Gauge>,
    /// `amoskys_agent_discovery_probes_total`: TCP connect probes made by active discovery.
    pub discovery_probes: Counter,
    /// `amoskys_agent_pods_known`: Pods on this node the agent knows (kubernetes.pods).
    pub pods_known: Gauge,
    /// `amoskys_agent_pod_watch_errors_total`: Failed lists or watches of this node's pods.
    pub pod_watch_errors: Counter,
}

impl AgentMetrics {
    /// Every metric at zero, registered.
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
            redirects: Counter::default(),
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
            flow_owner_lookups: Family::default(),
            snmp_polls: Family::default(),
            snmp_up: Family::default(),
            discovery_probes: Counter::default(),
            pods_known: Gauge::default(),
            pod_watch_errors: Counter::default(),
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
            "redirects",
            "Times a bus shard sent the agent to the shard that owns it",
            m.redirects.clone(),
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
            "flow_owner_lookups",
            "New TCP/UDP flows looked up for the process that owns their socket, by result (socket, listener, none, skipped)",
            m.flow_owner_lookups.clone(),
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
        r.register(
            "pods_known",
            "Pods on this node the agent knows (kubernetes.pods)",
            m.pods_known.clone(),
        );
        r.register(
            "pod_watch_errors",
            "Failed lists or watches of this node's pods",
            m.pod_watch_errors.clone(),
        );
        Self { registry, ..m }
    }

    /// The OpenMetrics text of every metric.
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
