//! The operator's Prometheus metrics: reconciles, errors and durations per
//! controller, certificate expiry, and the Agent status sync.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Metric labels: which controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `eventbus`, `agentset` or `agents`.
    pub controller: String,
}

/// Metric labels: a controller and what failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// `eventbus`, `agentset` or `agents`.
    pub controller: String,
    /// What failed, from `Error::kind`: `conflict`, `forbidden`, `api`,
    /// `kube_client`, `pki`, `invalid_object`, ...
    pub kind: String,
}

/// Metric labels: an agent's phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Pending, Running, Degraded or Disconnected.
    pub phase: String,
}

/// Metric labels: how an attempt ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: String,
}

/// Metric labels: a certificate's Secret.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabel {
    /// The Secret's namespace.
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
}

/// The operator's metrics, served on its `/metrics`.
pub struct Metrics {
    /// `amoskys_operator_reconciles_total`: reconciles run, per controller.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// `amoskys_operator_reconcile_errors_total`: reconciles that failed,
    /// per controller and kind of error.
    pub reconcile_errors: Family<ErrorLabel, Counter>,
    /// `amoskys_operator_reconcile_duration_seconds`: time one reconcile took.
    pub reconcile_seconds: Family<ControllerLabel, Histogram>,
    /// Unix seconds at which each issued certificate expires.
    pub certificate_not_after: Family<CertLabel, Gauge>,
    /// `amoskys_operator_agents`: Agent resources the status sync keeps current.
    pub agents: Gauge,
    /// `amoskys_operator_agents_by_phase`: those Agents by phase.
    pub agents_by_phase: Family<PhaseLabel, Gauge>,
    /// `amoskys_operator_registry_errors_total`: failed reads of a bus
    /// replica's agent registry.
    pub registry_errors: Counter,
    /// `amoskys_operator_registry_connects_total`: admin connections dialled
    /// to bus replicas.
    pub registry_connects: Counter,
    /// `amoskys_operator_rule_set_pushes_total`: rule sets handed to bus
    /// pods that did not run the cluster's current one, by result.
    pub rule_set_pushes: Family<ResultLabel, Counter>,
    /// `amoskys_operator_leader`: 1 while this replica holds the lease.
    pub leader: Gauge,
    registry: Mutex<Registry>,
}

fn label(controller: &str) -> ControllerLabel {
    ControllerLabel {
        controller: controller.into(),
    }
}

impl Metrics {
    /// One reconcile: its duration, and the kind of error if it failed.
    pub fn observe(&self, controller: &str, took: Duration, failed: Option<&str>) {
        let l = label(controller);
        self.reconciles.get_or_create(&l).inc();
        if let Some(kind) = failed {
            self.reconcile_errors
                .get_or_create(&ErrorLabel {
                    controller: controller.into(),
                    kind: kind.into(),
                })
                .inc();
        }
        self.reconcile_seconds
            .get_or_create(&l)
            .observe(took.as_secs_f64());
    }

    /// Records the expiry of the certificate in `namespace/secret`.
    pub fn certificate(&self, namespace: &str, secret: &str, not_after: i64) {
        self.certificate_not_after
            .get_or_create(&CertLabel {
                namespace: namespace.into(),
                secret: secret.into(),
            })
            .set(not_after);
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_5, 2.0, 16))
            }),
            certificate_not_after: Family::default(),
            agents: Gauge::default(),
            agents_by_phase: Family::default(),
            registry_errors: Counter::default(),
            registry_connects: Counter::default(),
            rule_set_pushes: Family::default(),
            leader: Gauge::default(),
            registry: Mutex::new(Registry::with_prefix("amoskys_operator")),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register(
                "reconciles",
                "Reconciles run, per controller",
                m.reconciles.clone(),
            );
            r.register(
                "reconcile_errors",
                "Reconciles that failed, per controller and kind of error",
                m.reconcile_errors.clone(),
            );
            r.register(
                "reconcile_duration_seconds",
                "Time one reconcile took, per controller",
                m.reconcile_seconds.clone(),
            );
            r.register(
                "certificate_not_after_seconds",
                "Unix time at which an issued certificate expires, per Secret",
                m.certificate_not_after.clone(),
            );
            r.register(
                "agents",
                "Agent resources the status sync keeps current",
                m.agents.clone(),
            );
            r.register(
                "agents_by_phase",
                "Agent resources by phase (Pending, Running, Degraded, Disconnected)",
                m.agents_by_phase.clone(),
            );
            r.register(
                "registry_errors",
                "Failed reads of a bus replica's agent registry",
                m.registry_errors.clone(),
            );
            r.register(
                "registry_connects",
                "Admin connections dialled to bus replicas (kept between registry reads)",
                m.registry_connects.clone(),
            );
            r.register(
                "rule_set_pushes",
                "Rule sets handed to bus pods that did not run the cluster's current one, by result",
                m.rule_set_pushes.clone(),
            );
            r.register(
                "leader",
                "1 while this replica holds the leader lease",
                m.leader.clone(),
            );
        }
        m
    }
}
