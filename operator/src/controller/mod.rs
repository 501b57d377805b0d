//! The reconcilers: what turns `EventBus` and `AgentSet` resources into
//! running objects, and the bus registry into `Agent` statuses.
//!
//! Each reconciler reads what exists, computes the desired objects with the
//! pure builders, and writes with server-side apply under one field manager,
//! so a second pass over an unchanged cluster writes nothing. Validation
//! happens before the first write: an invalid resource gets
//! `Ready=False/InvalidSpec` and an event, and no objects.

pub mod agents;
pub mod agentset;
pub mod eventbus;
pub mod metrics;
pub mod rules;

use amoskys_proto::StatsResponse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use crate::build::eventbus::InvalidSpec;
use crate::labels::MANAGER;
use crate::rotation::SecretContent;

/// The clock the reconcilers read; tests move it.
pub type Clock = Arc<dyn Fn() -> OffsetDateTime + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(OffsetDateTime::now_utc)
}

/// Why a reconcile (or the operator) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// A certificate could not be made.
    #[error("issuing certificates: {0}")]
    Pki(#[from] amoskys_client::pki::PkiError),
    /// A namespaced object came without its namespace.
    #[error("{kind} {name} has no namespace")]
    NoNamespace {
        /// The object's kind.
        kind: String,
        /// Its name.
        name: String,
    },
    /// An object could not be serialized.
    #[error("serializing {what}: {source}")]
    Json {
        /// What was being serialized.
        what: &'static str,
        /// serde's reason.
        #[source]
        source: serde_json::Error,
    },
    /// An object could not be written as YAML.
    #[error("writing {what} as YAML: {message}")]
    Yaml {
        /// What was being written.
        what: &'static str,
        /// Why it failed.
        message: String,
    },
    /// The leader lease could not be taken or kept.
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    /// Another replica holds the lease now: this one stops reconciling.
    #[error("another replica took the leader lease")]
    LeaseLost,
    /// A local I/O error (the metrics listener).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A short name for what failed, for the reconcile error metric: the
    /// API's answer where there is one (a conflict is not a permission
    /// problem), else the source.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(s)) => match s.code {
                400 | 422 => "invalid_object",
                401 | 403 => "forbidden",
                404 => "not_found",
                409 => "conflict",
                429 => "throttled",
                500..=599 => "api_server",
                _ => "api",
            },
            Error::Kube(_) => "kube_client",
            Error::Pki(_) => "pki",
            Error::NoNamespace { .. } => "no_namespace",
            Error::Json { .. } => "json",
            Error::Yaml { .. } => "yaml",
            Error::Lease(_) | Error::LeaseLost => "lease",
            Error::Io(_) => "io",
        }
    }
}

/// What every reconciler shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's own image: what pods run when a resource names none.
    pub image: Option<String>,
    /// The clock certificates are scheduled by.
    pub clock: Clock,
    /// Publishes Kubernetes events.
    pub recorder: Recorder,
    /// The operator's metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// How long a changed Secret takes to reach every pod and be reloaded.
    pub propagation: Duration,
    /// Serials of the certificates each bus and its agents have loaded, by
    /// `namespace/bus`, as last read from the bus (see [`agents`]).
    pub loaded: Mutex<HashMap<String, Vec<String>>>,
    /// The agent sync's connections to bus replicas.
    pub registry_reader: agents::RegistryReader,
    /// Each shard's own Stats by `namespace/bus` and pod index, as last
    /// read by the agent sync: retiring shards are removed by what they
    /// report, and ExportReady comes from it.
    pub shards_seen: Mutex<HashMap<String, BTreeMap<u32, StatsResponse>>>,
}

impl Context {
    /// A context on `client`, with the given image and clock.
    pub fn new(client: Client, image: Option<String>, clock: Clock) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        let metrics = Arc::new(metrics::Metrics::default());
        let registry_reader = agents::RegistryReader::new(metrics.registry_connects.clone());
        Self {
            client,
            image,
            clock,
            recorder,
            metrics,
            // kubelet's Secret sync (up to a minute) plus the bus's and
            // agents' file reload interval.
            propagation: Duration::from_secs(120),
            loaded: Mutex::new(HashMap::new()),
            registry_reader,
            shards_seen: Mutex::new(HashMap::new()),
        }
    }

    /// What each shard of bus `key` (`namespace/bus`) last reported.
    pub fn shards_seen(&self, key: &str) -> BTreeMap<u32, StatsResponse> {
        self.shards_seen
            .lock()
            .ok()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_default()
    }

    /// The clock's time now.
    pub fn now(&self) -> OffsetDateTime {
        (self.clock)()
    }

    /// The serials loaded by bus `key` (`namespace/bus`) and its agents,
    /// if the agent sync has read them.
    pub fn loaded(&self, key: &str) -> Option<Vec<String>> {
        self.loaded.lock().ok()?.get(key).cloned()
    }

    /// Publishes an event about `obj`; a failure is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing an event failed");
        }
    }
}

/// Runs one reconcile inside a span naming the object (so every log line of
/// it says which), recording its duration and outcome per controller.
pub async fn observed(
    ctx: &Context,
    controller: &str,
    namespace: &str,
    name: &str,
    reconcile: impl std::future::Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    use tracing::Instrument;
    let span = tracing::info_span!("reconcile", controller, namespace, name);
    let started = std::time::Instant::now();
    let r = reconcile.instrument(span.clone()).await;
    ctx.metrics.observe(
        controller,
        started.elapsed(),
        r.as_ref().err().map(Error::kind),
    );
    if let Err(e) = &r {
        span.in_scope(|| tracing::warn!(error = %e, kind = e.kind(), "reconcile failed"));
    }
    r
}

/// After a failed reconcile (an API error), try again shortly.
pub fn requeue_on_error<K>(_obj: Arc<K>, _e: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(15))
}

/// The object's namespace; an error naming it when it has none.
pub fn namespace<K: Resource<DynamicType = ()>>(obj: &K) -> Result<String, Error> {
    obj.namespace().ok_or_else(|| Error::NoNamespace {
        kind: K::kind(&()).into_owned(),
        name: obj.name_any(),
    })
}

/// Server-side apply of `obj` with the operator's field manager.
pub async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply(MANAGER).force();
    Ok(api.patch(&obj.name_any(), &pp, &Patch::Apply(obj)).await?)
}

/// Writes `status` with a merge patch when it differs from `current`.
pub async fn write_status<K, S>(
    client: &Client,
    obj: &K,
    current: Option<&S>,
    status: &S,
) -> Result<bool, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if current == Some(status) {
        return Ok(false);
    }
    let ns = namespace(obj)?;
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let body = serde_json::json!({ "status": status });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&body),
    )
    .await?;
    Ok(true)
}

/// A condition, keeping the previous transition time when its status did
/// not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: OffsetDateTime,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| time_of(now.unix_timestamp()));
    Condition {
        type_: type_.into(),
        status,
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// A Kubernetes time from Unix seconds (the epoch when out of range).
pub fn time_of(unix_seconds: i64) -> Time {
    Time(Timestamp::from_second(unix_seconds).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// RFC 3339 form of unix seconds, for status fields.
pub fn rfc3339(unix_seconds: i64) -> String {
    time_of(unix_seconds).0.to_string()
}

/// Reports an invalid spec: `Ready=False/InvalidSpec` naming the field (and
/// an event the first time the message appears). Nothing else is written.
pub async fn report_invalid<K>(
    ctx: &Context,
    obj: &K,
    previous: &[Condition],
    inv: &InvalidSpec,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let message = inv.to_string();
    let already = previous
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == "InvalidSpec" && c.message == message);
    if already {
        return Ok(());
    }
    tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), %message, "invalid spec");
    let generation = obj.meta().generation;
    let ready = condition(
        previous,
        "Ready",
        false,
        "InvalidSpec",
        message.clone(),
        generation,
        ctx.now(),
    );
    let mut conditions: Vec<Condition> = previous
        .iter()
        .filter(|c| c.type_ != "Ready")
        .cloned()
        .collect();
    conditions.insert(0, ready);
    let ns = namespace(obj)?;
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    let body = serde_json::json!({
        "status": { "conditions": conditions, "observedGeneration": generation }
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&body),
    )
    .await?;
    ctx.event(obj, true, "InvalidSpec", "Validate", message)
        .await;
    Ok(())
}

/// What a Secret holds, as the PKI code reads it.
pub fn secret_content(s: &Secret) -> SecretContent {
    let data = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    SecretContent {
        data,
        annotations: s.metadata.annotations.clone().unwrap_or_default(),
    }
}

/// True when `have` already holds what `want` says (data equal, `want`'s
/// annotations present), so no write is needed.
pub fn secret_current(have: Option<&SecretContent>, want: &SecretContent) -> bool {
    have.is_some_and(|h| {
        h.data == want.data
            && want
                .annotations
                .iter()
                .all(|(k, v)| h.annotations.get(k) == Some(v))
    })
}

/// A Secret of `type_` with `content`, owned as `meta` says.
pub fn secret(
    mut meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    type_: &str,
    content: &SecretContent,
) -> Secret {
    meta.annotations = Some(content.annotations.clone());
    Secret {
        metadata: meta,
        type_: Some(type_.into()),
        data: Some(
            content
                .data
                .iter()
                .map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
        ..Default::default()
    }
}

/// Bytes in a storage quantity (`10Gi`, `500M`, `1024`); `None` when it
/// is not one.
pub fn quantity_bytes(q: &str) -> Option<u128> {
    let q = q.trim();
    let digits = q.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u128 = digits.parse().ok()?;
    let mult: u128 = match &q[digits.len()..] {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_errors_are_counted_by_kind() {
        let api = |code| {
            Error::Kube(kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            })))
        };
        assert_eq!(api(409).kind(), "conflict");
        assert_eq!(api(403).kind(), "forbidden");
        assert_eq!(api(422).kind(), "invalid_object");
        assert_eq!(api(503).kind(), "api_server");
        assert_eq!(Error::LeaseLost.kind(), "lease");
        let m = metrics::Metrics::default();
        m.observe("eventbus", Duration::from_millis(3), Some(api(409).kind()));
        m.observe("eventbus", Duration::from_millis(3), None);
        let text = m.encode();
        assert!(
            text.contains(
                "amoskys_operator_reconcile_errors_total{controller=\"eventbus\",kind=\"conflict\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("amoskys_operator_reconciles_total{controller=\"eventbus\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("10Gi"), Some(10 << 30));
        assert_eq!(quantity_bytes("500M"), Some(500_000_000));
        assert_eq!(quantity_bytes("1024"), Some(1024));
        assert_eq!(quantity_bytes("1.5Gi"), None);
        assert_eq!(quantity_bytes("ten"), None);
    }

    #[test]
    fn condition_keeps_transition_time_while_status_holds() {
        let t0 = OffsetDateTime::from_unix_timestamp(1_000).unwrap();
        let t1 = OffsetDateTime::from_unix_timestamp(2_000).unwrap();
        let first = condition(&[], "Ready", true, "Ready", "ok", Some(1), t0);
        let same = condition(
            std::slice::from_ref(&first),
            "Ready",
            true,
            "Ready",
            "ok",
            Some(1),
            t1,
        );
        assert_eq!(same.last_transition_time, time_of(1_000));
        let flipped = condition(&[first], "Ready", false, "Down", "x", Some(1), t1);
        assert_eq!(flipped.last_transition_time, time_of(2_000));
    }
}
