//! What an `EventBus` becomes: its bus config, ConfigMap, StatefulSet,
//! headless and client Services and PodDisruptionBudget. Pure functions of
//! the resource; the reconciler applies them.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec as K8sServiceSpec, TopologySpreadConstraint,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde::Serialize;

use amoskys_client::shard::{MAX_SHARDS, ShardMap};
use amoskys_proto::StatsResponse;

use crate::crd::{AlertReceiverSpec, EventBus};
use crate::labels::{CONFIG_HASH, hash, labels, owned_meta, rendered, selector};

/// The `app.kubernetes.io/component` of bus objects.
pub const COMPONENT: &str = "bus";
/// Where the bus's ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/amoskys/config";
/// Where the bus's server certificate Secret is mounted.
pub const TLS_DIR: &str = "/etc/amoskys/tls";
/// Where the dashboard's admin token Secret is mounted.
pub const TOKEN_DIR: &str = "/etc/amoskys/dashboard";
/// The WAL volume's mount: the bus's data directory.
pub const WAL_DIR: &str = "/var/lib/amoskys/wal";
/// The backup volume's mount.
pub const BACKUP_DIR: &str = "/var/lib/amoskys/backup";
/// Where the peer certificate (role peer) shards call each other with is mounted.
pub const PEER_TLS_DIR: &str = "/etc/amoskys/peer";
/// Where the shard map ConfigMap is mounted; kubelet refreshes the file in
/// place, and the bus re-reads it without restarting.
pub const SHARDS_DIR: &str = "/etc/amoskys/shards";
/// Where the rules ConfigMap is mounted: the bus's `detection.rulesDir`,
/// re-read when kubelet updates the file.
pub const RULES_DIR: &str = "/etc/amoskys/rules";
/// The pod label the StatefulSet controller sets to the pod's ordinal.
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// The NATS export's TLS Secret's mount.
pub const NATS_TLS_DIR: &str = "/etc/amoskys/nats-tls";
/// The NATS export's credentials Secret's mount.
pub const NATS_CREDS_DIR: &str = "/etc/amoskys/nats-creds";
/// Alertmanager's CA Secret's mount.
pub const AM_CA_DIR: &str = "/etc/amoskys/alertmanager-ca";
/// Alertmanager's bearer token Secret's mount.
pub const AM_TOKEN_DIR: &str = "/etc/amoskys/alertmanager-token";
/// The webhook's CA Secret's mount.
pub const WEBHOOK_CA_DIR: &str = "/etc/amoskys/webhook-ca";
/// The webhook's bearer token Secret's mount.
pub const WEBHOOK_TOKEN_DIR: &str = "/etc/amoskys/webhook-token";
/// The key of the credentials Secret that holds the `.creds` file.
pub const NATS_CREDS_KEY: &str = "nats.creds";
/// The bus drains for up to its shutdown grace (20 s) on SIGTERM; the pod
/// gets more so it is never killed mid-drain.
pub const TERMINATION_GRACE_SECONDS: i64 = 40;

/// A spec field that cannot work, named as in the resource.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSpec {
    /// The field's path, e.g. `spec.wal.size`.
    pub field: String,
    /// Why it cannot work.
    pub message: String,
}

/// An [`InvalidSpec`] for `field`.
pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> InvalidSpec {
    InvalidSpec {
        field: field.into(),
        message: message.into(),
    }
}

/// Names of everything an EventBus owns.
pub struct Names {
    /// The StatefulSet.
    pub statefulset: String,
    /// The headless Service giving each pod its DNS name.
    pub headless: String,
    /// The client Service.
    pub service: String,
    /// The bus ConfigMap.
    pub config: String,
    /// The PodDisruptionBudget.
    pub pdb: String,
    /// The CA Secret (certificate and key).
    pub ca_secret: String,
    /// The bus's server certificate Secret.
    pub server_secret: String,
    /// The admin client certificate Secret.
    pub admin_secret: String,
    /// The dashboard's admin token Secret.
    pub dashboard_secret: String,
    /// The peer certificate Secret (shard to shard).
    pub peer_secret: String,
    /// The ConfigMap with the shard map.
    pub shards: String,
    /// The ConfigMap with the detection rules that compiled and passed
    /// their tests.
    pub rules: String,
}

impl Names {
    /// The names for EventBus `bus`.
    pub fn of(bus: &str) -> Self {
        Self {
            statefulset: bus.to_string(),
            headless: format!("{bus}-headless"),
            service: bus.to_string(),
            config: format!("{bus}-config"),
            pdb: bus.to_string(),
            ca_secret: format!("{bus}-ca"),
            server_secret: format!("{bus}-server-tls"),
            admin_secret: format!("{bus}-admin-tls"),
            dashboard_secret: format!("{bus}-dashboard"),
            peer_secret: format!("{bus}-peer-tls"),
            shards: format!("{bus}-shards"),
            rules: format!("{bus}-rules"),
        }
    }
}

fn duration(field: &str, v: &str) -> Result<Duration, InvalidSpec> {
    amoskys_client::parse::duration(v).map_err(|m| invalid(field, m))
}

/// Parsed TLS lifetimes: (leaf validity, renew before, CA validity).
pub fn tls_lifetimes(bus: &EventBus) -> Result<(Duration, Duration, Duration), InvalidSpec> {
    let t = &bus.spec.tls;
    let validity = duration("spec.tls.validity", &t.validity)?;
    let renew_before = if t.renew_before.trim().is_empty() {
        validity / 3
    } else {
        duration("spec.tls.renewBefore", &t.renew_before)?
    };
    if renew_before >= validity {
        return Err(invalid(
            "spec.tls.renewBefore",
            format!(
                "{} must be shorter than spec.tls.validity ({})",
                t.renew_before, t.validity
            ),
        ));
    }
    let ca = duration("spec.tls.caValidity", &t.ca_validity)?;
    if ca <= validity {
        return Err(invalid(
            "spec.tls.caValidity",
            "must be longer than spec.tls.validity",
        ));
    }
    Ok((validity, renew_before, ca))
}

/// Checks what the schema cannot; the error names the field.
pub fn validate(bus: &EventBus) -> Result<(), InvalidSpec> {
    let s = &bus.spec;
    if !(1..=16).contains(&s.replicas) {
        return Err(invalid("spec.replicas", "must be between 1 and 16"));
    }
    let retention = duration("spec.wal.retention", &s.wal.retention)?;
    if retention.is_zero() {
        return Err(invalid("spec.wal.retention", "must be greater than zero"));
    }
    if !s.wal.max_bytes.trim().is_empty() {
        amoskys_client::parse::parse_bytes("spec.wal.maxBytes", &s.wal.max_bytes)
            .map_err(|e| invalid("spec.wal.maxBytes", e.to_string()))?;
    }
    if !["always", "batch", "never"].contains(&s.wal.sync.as_str()) {
        return Err(invalid(
            "spec.wal.sync",
            format!("{:?} is not always, batch or never", s.wal.sync),
        ));
    }
    if !is_quantity(&s.wal.size) {
        return Err(invalid(
            "spec.wal.size",
            format!("{:?} is not a quantity like 10Gi", s.wal.size),
        ));
    }
    if let Some(b) = &s.backup {
        let every = duration("spec.backup.interval", &b.interval)?;
        if !every.is_zero() && every < Duration::from_secs(1) {
            return Err(invalid(
                "spec.backup.interval",
                "must be at least 1s (or 0s for on demand only)",
            ));
        }
        if b.keep == 0 {
            return Err(invalid("spec.backup.keep", "must be at least 1"));
        }
        if !is_quantity(&b.size) {
            return Err(invalid(
                "spec.backup.size",
                format!("{:?} is not a quantity like 10Gi", b.size),
            ));
        }
    }
    if let Some(n) = s.export.as_ref().and_then(|e| e.nats.as_ref()) {
        if n.url.trim().is_empty() {
            return Err(invalid("spec.export.nats.url", "required"));
        }
        amoskys_client::parse::check_nats_stream(&n.stream)
            .map_err(|m| invalid("spec.export.nats.stream", m))?;
        amoskys_client::parse::check_nats_subject_prefix(&n.subject_prefix)
            .map_err(|m| invalid("spec.export.nats.subjectPrefix", m))?;
        if !["protobuf", "json"].contains(&n.format.as_str()) {
            return Err(invalid(
                "spec.export.nats.format",
                format!("{:?} is not protobuf or json", n.format),
            ));
        }
        if !amoskys_client::parse::EXPORT_MAX_IN_FLIGHT.contains(&(n.max_in_flight as usize)) {
            return Err(invalid(
                "spec.export.nats.maxInFlight",
                format!("{} is outside 1..=65536", n.max_in_flight),
            ));
        }
    }
    if let Some(a) = &s.alerting {
        let http = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        if !a.external_url.trim().is_empty() && !http(a.external_url.trim()) {
            return Err(invalid(
                "spec.alerting.externalUrl",
                format!("{:?} is not an http:// or https:// address", a.external_url),
            ));
        }
        for (field, r) in [
            ("spec.alerting.alertmanager", &a.alertmanager),
            ("spec.alerting.webhook", &a.webhook),
        ] {
            let Some(r) = r else { continue };
            if !http(r.url.trim()) {
                return Err(invalid(
                    format!("{field}.url"),
                    format!("{:?} is not an http:// or https:// address", r.url),
                ));
            }
            if duration(&format!("{field}.timeout"), &r.timeout)?.is_zero() {
                return Err(invalid(
                    format!("{field}.timeout"),
                    "must be longer than 0s",
                ));
            }
            if !(1..=1000).contains(&r.max_batch) {
                return Err(invalid(
                    format!("{field}.maxBatch"),
                    format!("{} is outside 1..=1000", r.max_batch),
                ));
            }
        }
    }
    tls_lifetimes(bus)?;
    if !["ClusterIP", "NodePort", "LoadBalancer"].contains(&s.service.r#type.as_str()) {
        return Err(invalid(
            "spec.service.type",
            format!(
                "{:?} is not ClusterIP, NodePort or LoadBalancer",
                s.service.r#type
            ),
        ));
    }
    for (field, port) in [
        ("spec.service.grpcPort", s.service.grpc_port),
        ("spec.service.httpPort", s.service.http_port),
    ] {
        if !(1..=65535).contains(&port) {
            return Err(invalid(field, format!("{port} is not a port")));
        }
    }
    let np = &s.network_policy;
    for (field, names) in [
        ("spec.networkPolicy.clientNamespaces", &np.client_namespaces),
        ("spec.networkPolicy.httpNamespaces", &np.http_namespaces),
    ] {
        for (n, name) in names.iter().enumerate() {
            let label = name.len() <= 63
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !name.starts_with('-')
                && !name.ends_with('-')
                && !name.is_empty();
            if !label {
                return Err(invalid(
                    format!("{field}[{n}]"),
                    format!("{name:?} is not a namespace name"),
                ));
            }
        }
    }
    for (n, cidr) in np.agent_cidrs.iter().enumerate() {
        let ok = cidr.split_once('/').is_some_and(|(ip, len)| {
            match (ip.parse::<std::net::IpAddr>(), len.parse::<u8>()) {
                (Ok(std::net::IpAddr::V4(_)), Ok(l)) => l <= 32,
                (Ok(std::net::IpAddr::V6(_)), Ok(l)) => l <= 128,
                _ => false,
            }
        });
        if !ok {
            return Err(invalid(
                format!("spec.networkPolicy.agentCIDRs[{n}]"),
                format!("{cidr:?} is not a CIDR like 10.0.0.0/16"),
            ));
        }
    }
    Ok(())
}

/// Whether `s` is a binary quantity the CRD allows (`10Gi`, `256Mi`).
pub fn is_quantity(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && ["Ki", "Mi", "Gi", "Ti"].contains(&unit)
}

/// The bus's YAML config file (the keys `amoskys bus --config` reads).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct BusFile<'a> {
    listen: String,
    http: String,
    data_dir: &'a str,
    tls_dir: &'a str,
    retention: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    max_bytes: &'a str,
    sync: &'a str,
    admin_token_file: String,
    log_format: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    backup: Option<BackupFile<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    export: Option<ExportFile<'a>>,
    sharding: ShardingFile,
    detection: DetectionFile,
    #[serde(skip_serializing_if = "Option::is_none")]
    alerting: Option<AlertingFile<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AlertingFile<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    external_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    alertmanager: Option<ReceiverFile<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<ReceiverFile<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReceiverFile<'a> {
    url: &'a str,
    timeout: &'a str,
    max_batch: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bearer_token_file: Option<String>,
}

fn receiver_file<'a>(r: &'a AlertReceiverSpec, ca_dir: &str, token_dir: &str) -> ReceiverFile<'a> {
    ReceiverFile {
        url: r.url.trim(),
        timeout: &r.timeout,
        max_batch: r.max_batch,
        ca_file: (!r.ca_secret_name.is_empty()).then(|| format!("{ca_dir}/ca.crt")),
        bearer_token_file: (!r.token_secret_name.is_empty()).then(|| format!("{token_dir}/token")),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DetectionFile {
    rules_dir: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ShardingFile {
    map_file: String,
    peer_tls_dir: &'static str,
}

#[derive(Serialize)]
struct ExportFile<'a> {
    nats: NatsFile<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NatsFile<'a> {
    url: &'a str,
    stream: &'a str,
    subject_prefix: &'a str,
    format: &'a str,
    max_in_flight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_dir: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials_file: Option<String>,
}

#[derive(Serialize)]
struct BackupFile<'a> {
    dir: &'a str,
    interval: &'a str,
    keep: u32,
}

/// A Secret the bus pods mount for a part of the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretMount {
    /// The spec field that names it.
    pub field: String,
    /// The Secret.
    pub secret: String,
    /// The key the bus reads from it.
    pub key: &'static str,
    /// The pod volume's name.
    pub volume: &'static str,
    /// Where it is mounted.
    pub dir: &'static str,
}

/// The Secrets the spec names (NATS export, alert receivers), each with
/// its mount: checked to exist before anything is written.
pub fn secret_mounts(bus: &EventBus) -> Vec<SecretMount> {
    let mut out = Vec::new();
    let mut add = |field: &str, secret: &str, key, volume, dir| {
        if !secret.is_empty() {
            out.push(SecretMount {
                field: field.into(),
                secret: secret.into(),
                key,
                volume,
                dir,
            });
        }
    };
    if let Some(n) = nats_export(bus) {
        add(
            "spec.export.nats.tlsSecretName",
            &n.tls_secret_name,
            "ca.crt",
            "nats-tls",
            NATS_TLS_DIR,
        );
        add(
            "spec.export.nats.credentialsSecretName",
            &n.credentials_secret_name,
            NATS_CREDS_KEY,
            "nats-creds",
            NATS_CREDS_DIR,
        );
    }
    if let Some(a) = &bus.spec.alerting {
        if let Some(r) = &a.alertmanager {
            add(
                "spec.alerting.alertmanager.caSecretName",
                &r.ca_secret_name,
                "ca.crt",
                "am-ca",
                AM_CA_DIR,
            );
            add(
                "spec.alerting.alertmanager.tokenSecretName",
                &r.token_secret_name,
                "token",
                "am-token",
                AM_TOKEN_DIR,
            );
        }
        if let Some(r) = &a.webhook {
            add(
                "spec.alerting.webhook.caSecretName",
                &r.ca_secret_name,
                "ca.crt",
                "webhook-ca",
                WEBHOOK_CA_DIR,
            );
            add(
                "spec.alerting.webhook.tokenSecretName",
                &r.token_secret_name,
                "token",
                "webhook-token",
                WEBHOOK_TOKEN_DIR,
            );
        }
    }
    out
}

/// The spec's NATS export, if it has one.
pub fn nats_export(bus: &EventBus) -> Option<&crate::crd::NatsExportSpec> {
    bus.spec.export.as_ref().and_then(|e| e.nats.as_ref())
}

/// The bus's config file (`bus.yaml`) for the spec.
pub fn bus_config(bus: &EventBus) -> String {
    let s = &bus.spec;
    let f = BusFile {
        listen: format!("0.0.0.0:{}", s.service.grpc_port),
        http: format!("0.0.0.0:{}", s.service.http_port),
        data_dir: WAL_DIR,
        tls_dir: TLS_DIR,
        retention: &s.wal.retention,
        max_bytes: s.wal.max_bytes.trim(),
        sync: &s.wal.sync,
        admin_token_file: format!("{TOKEN_DIR}/token"),
        log_format: "json",
        backup: s.backup.as_ref().map(|b| BackupFile {
            dir: BACKUP_DIR,
            interval: &b.interval,
            keep: b.keep,
        }),
        export: nats_export(bus).map(|n| ExportFile {
            nats: NatsFile {
                url: n.url.trim(),
                stream: &n.stream,
                subject_prefix: &n.subject_prefix,
                format: &n.format,
                max_in_flight: n.max_in_flight,
                tls_dir: (!n.tls_secret_name.is_empty()).then_some(NATS_TLS_DIR),
                credentials_file: (!n.credentials_secret_name.is_empty())
                    .then(|| format!("{NATS_CREDS_DIR}/{NATS_CREDS_KEY}")),
            },
        }),
        // The index comes from the pod (AMOSKYS_SHARD_INDEX), the map from
        // its own ConfigMap: neither is in this file, so scaling changes
        // neither the config hash nor any pod that stays.
        sharding: ShardingFile {
            map_file: format!("{SHARDS_DIR}/map.yaml"),
            peer_tls_dir: PEER_TLS_DIR,
        },
        // The rules come in their own ConfigMap (the operator's checked
        // rule set), so a rule change restarts no pod.
        detection: DetectionFile {
            rules_dir: RULES_DIR,
        },
        alerting: s.alerting.as_ref().map(|a| AlertingFile {
            external_url: a.external_url.trim(),
            alertmanager: a
                .alertmanager
                .as_ref()
                .map(|r| receiver_file(r, AM_CA_DIR, AM_TOKEN_DIR)),
            webhook: a
                .webhook
                .as_ref()
                .map(|r| receiver_file(r, WEBHOOK_CA_DIR, WEBHOOK_TOKEN_DIR)),
        }),
    };
    rendered(bus, &f)
}

fn meta(bus: &EventBus, name: &str) -> ObjectMeta {
    owned_meta(bus, COMPONENT, name)
}

/// The ConfigMap holding the bus's config file.
pub fn config_map(bus: &EventBus) -> ConfigMap {
    let name = Names::of(&bus.name_any()).config;
    crate::labels::config_map(bus, COMPONENT, &name, "bus.yaml", bus_config(bus))
}

/// The ConfigMap with the rule set (`rules.yaml`): every detection rule in
/// the cluster that compiled and passed its inline tests.
pub fn rules_config_map(bus: &EventBus, rules_yaml: String) -> ConfigMap {
    let name = Names::of(&bus.name_any()).rules;
    crate::labels::config_map(bus, COMPONENT, &name, "rules.yaml", rules_yaml)
}

/// Every pod's stable address, by ordinal: the headless Service names the
/// server certificate carries.
pub fn shard_urls(bus: &EventBus, shards: i32) -> Vec<String> {
    let n = Names::of(&bus.name_any());
    let ns = bus.namespace().unwrap_or_default();
    (0..shards.max(1))
        .map(|i| {
            format!(
                "https://{}-{i}.{}.{ns}.svc:{}",
                n.statefulset, n.headless, bus.spec.service.grpc_port
            )
        })
        .collect()
}

/// The shard map for the spec's replicas, with `pods` shards in all (the
/// ones above the active count are retiring). The epoch stays while the map
/// is the same as `previous` (what the ConfigMap holds) and goes up by one
/// when it changes, so the pods install each new map exactly once.
pub fn shard_map(bus: &EventBus, previous: Option<&ShardMap>, pods: i32) -> ShardMap {
    let active = bus.spec.replicas.clamp(1, MAX_SHARDS as i32);
    let mut map = ShardMap {
        epoch: 1,
        active: active as u32,
        peers: shard_urls(bus, pods.max(active)),
    };
    if let Some(p) = previous {
        map.epoch = if p.active == map.active && p.peers == map.peers {
            p.epoch
        } else {
            p.epoch + 1
        };
    }
    map
}

/// Pods a bus runs now: its active shards and the retiring ones it still
/// keeps (as its status last said), whichever is more.
pub fn pods_kept(bus: &EventBus) -> i32 {
    let kept = bus
        .status
        .as_ref()
        .map_or(0, |s| s.active_shards + s.retiring_shards);
    bus.spec.replicas.max(kept)
}

/// How many pods to keep: the active shards, and above them every
/// retiring shard up to the highest that may still be needed (a
/// StatefulSet removes its highest pods first). A retiring shard may go
/// once it has reported itself retiring (so it takes nothing new), its
/// newest event is older than the retention, and its export (if any) has
/// nothing left to send; one that has not reported is kept. With
/// `discardRetiringShards`, retiring shards go at once.
pub fn retained_pods(
    bus: &EventBus,
    previous: Option<&ShardMap>,
    seen: &BTreeMap<u32, StatsResponse>,
    now_ns: i64,
) -> i32 {
    let active = bus.spec.replicas.clamp(1, MAX_SHARDS as i32);
    let had = previous.map_or(active, |p| p.shards() as i32);
    if had <= active || bus.spec.discard_retiring_shards {
        return active;
    }
    let Some(keep_for) = retention(bus) else {
        return had;
    };
    let mut pods = had;
    while pods > active {
        let Some(s) = seen.get(&((pods - 1) as u32)) else {
            break;
        };
        let aged_out = removable_after(s, keep_for).is_none_or(|t| t <= now_ns);
        let exported = s.export.as_ref().is_none_or(|e| e.lag_events == 0);
        if !(s.retiring && aged_out && exported) {
            break;
        }
        pods -= 1;
    }
    pods
}

/// When a shard's data has aged out: its newest event's stored time plus
/// the retention (unix ns); None when it holds no event.
pub fn removable_after(s: &StatsResponse, keep_for: Duration) -> Option<i64> {
    let keep = i64::try_from(keep_for.as_nanos()).unwrap_or(i64::MAX);
    (s.newest_stored_at > 0).then(|| s.newest_stored_at.saturating_add(keep))
}

/// The retention (checked by [`validate`]).
pub fn retention(bus: &EventBus) -> Option<Duration> {
    duration("spec.wal.retention", &bus.spec.wal.retention).ok()
}

/// The ConfigMap with the shard map (`map.yaml`), mounted by every pod.
pub fn shard_map_config(bus: &EventBus, map: &ShardMap) -> ConfigMap {
    let name = Names::of(&bus.name_any()).shards;
    crate::labels::config_map(bus, COMPONENT, &name, "map.yaml", rendered(bus, map))
}

/// The shard map a ConfigMap made by [`shard_map_config`] holds, if it
/// parses.
pub fn shard_map_of(cm: &ConfigMap) -> Option<ShardMap> {
    let text = cm.data.as_ref()?.get("map.yaml")?;
    ShardMap::parse(text).ok()
}

fn port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_string()),
        port: p,
        target_port: Some(IntOrString::String(name.to_string())),
        ..Default::default()
    }
}

/// The client Service (what agents and people connect to) and the headless
/// one that gives every pod a stable DNS name.
pub fn services(bus: &EventBus) -> (Service, Service) {
    let n = Names::of(&bus.name_any());
    let s = &bus.spec.service;
    let ports = vec![port("grpc", s.grpc_port), port("http", s.http_port)];
    let sel = selector(COMPONENT, &bus.name_any());
    let mut client_meta = meta(bus, &n.service);
    if !s.annotations.is_empty() {
        client_meta.annotations = Some(s.annotations.clone());
    }
    let client = Service {
        metadata: client_meta,
        spec: Some(K8sServiceSpec {
            type_: Some(s.r#type.clone()),
            selector: Some(sel.clone()),
            ports: Some(ports.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let headless = Service {
        metadata: meta(bus, &n.headless),
        spec: Some(K8sServiceSpec {
            cluster_ip: Some("None".into()),
            // Pods get DNS names before they are ready, so peers and the
            // operator can reach a bus that is still recovering.
            publish_not_ready_addresses: Some(true),
            selector: Some(sel),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    };
    (client, headless)
}

/// DNS names the server certificate must carry: both Services in every
/// form, and every pod through the headless Service.
pub fn server_dns_names(bus: &EventBus) -> Vec<String> {
    let n = Names::of(&bus.name_any());
    let ns = bus.namespace().unwrap_or_else(|| "default".into());
    let mut names = Vec::new();
    for svc in [&n.service, &n.headless] {
        names.push(svc.clone());
        names.push(format!("{svc}.{ns}"));
        names.push(format!("{svc}.{ns}.svc"));
        names.push(format!("{svc}.{ns}.svc.cluster.local"));
    }
    // Retiring pods too: their peers still verify them.
    for i in 0..pods_kept(bus) {
        let pod = format!("{}-{i}", n.statefulset);
        names.push(format!("{pod}.{}.{ns}.svc", n.headless));
        names.push(format!("{pod}.{}.{ns}.svc.cluster.local", n.headless));
    }
    names
}

/// `host:port` of the client Service's gRPC port, for the status.
pub fn endpoint(bus: &EventBus) -> String {
    let n = Names::of(&bus.name_any());
    let ns = bus.namespace().unwrap_or_else(|| "default".into());
    format!("{}.{ns}.svc:{}", n.service, bus.spec.service.grpc_port)
}

fn restricted() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(path != WAL_DIR),
        ..Default::default()
    }
}

/// The bus's StatefulSet; the operator's image when the spec names none.
pub fn statefulset(bus: &EventBus, operator_image: Option<&str>) -> StatefulSet {
    let name = bus.name_any();
    let n = Names::of(&name);
    let s = &bus.spec;
    let config = bus_config(bus);
    let image = crate::labels::image(&s.image, operator_image);
    let sel = selector(COMPONENT, &name);
    let container = Container {
        name: "bus".into(),
        image: Some(image),
        args: Some(vec![
            "bus".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/bus.yaml"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("grpc".into()),
                container_port: s.service.grpc_port,
                ..Default::default()
            },
            ContainerPort {
                name: Some("http".into()),
                container_port: s.service.http_port,
                ..Default::default()
            },
        ]),
        env: Some(vec![EnvVar {
            name: "AMOSKYS_SHARD_INDEX".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.labels['{POD_INDEX_LABEL}']"),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        resources: s.resources.clone(),
        security_context: Some(restricted()),
        volume_mounts: Some(
            [
                mount("wal", WAL_DIR),
                mount("config", CONFIG_DIR),
                mount("tls", TLS_DIR),
                mount("dashboard", TOKEN_DIR),
                mount("peer", PEER_TLS_DIR),
                mount("shards", SHARDS_DIR),
                mount("rules", RULES_DIR),
            ]
            .into_iter()
            .chain(s.backup.as_ref().map(|_| mount("backup", BACKUP_DIR)))
            .chain(secret_mounts(bus).iter().map(|m| mount(m.volume, m.dir)))
            .collect(),
        ),
        ..Default::default()
    };
    let secret = |vol: &str, secret: &str| Volume {
        name: vol.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            run_as_group: Some(65532),
            fs_group: Some(65532),
            ..Default::default()
        }),
        automount_service_account_token: Some(false),
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: "kubernetes.io/hostname".into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(sel.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        volumes: Some(
            vec![
                Volume {
                    name: "config".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: n.config.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "shards".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: n.shards.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "rules".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: n.rules.clone(),
                        // A pod starts before the first rule set is written.
                        optional: Some(true),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                secret("tls", &n.server_secret),
                secret("dashboard", &n.dashboard_secret),
                secret("peer", &n.peer_secret),
            ]
            .into_iter()
            .chain(
                secret_mounts(bus)
                    .iter()
                    .map(|m| secret(m.volume, &m.secret)),
            )
            .collect(),
        ),
        ..Default::default()
    };
    let mut pod_labels = labels(COMPONENT, &name);
    pod_labels.extend(sel.clone());
    StatefulSet {
        metadata: meta(bus, &n.statefulset),
        spec: StatefulSetSpec {
            replicas: Some(s.replicas),
            service_name: Some(n.headless.clone()),
            selector: LabelSelector {
                match_labels: Some(sel),
                ..Default::default()
            },
            // Pods are independent shards: start and stop them together.
            pod_management_policy: Some("Parallel".into()),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH.to_string(),
                        hash(&[&config]),
                    )])),
                    ..Default::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(claim_templates(bus)),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The volumes each pod gets, with the spec fields that size them. A
/// pod's claim is named `<template>-<statefulset>-<ordinal>`.
pub struct ClaimKind {
    /// The claim template's name (`wal`, `backup`).
    pub template: &'static str,
    /// The spec field that sizes it.
    pub size_field: &'static str,
    /// The size the spec asks for.
    pub size: String,
    storage_class_name: Option<String>,
}

impl ClaimKind {
    /// Whether `claim` (a PVC name) was made from this template.
    pub fn owns(&self, bus: &str, claim: &str) -> bool {
        claim
            .strip_prefix(self.template)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_prefix(bus))
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|ordinal| ordinal.parse::<u32>().is_ok())
    }
}

/// The claim templates the spec asks for (the WAL, and backups if set).
pub fn claim_kinds(bus: &EventBus) -> Vec<ClaimKind> {
    let s = &bus.spec;
    let wal = ClaimKind {
        template: "wal",
        size_field: "spec.wal.size",
        size: s.wal.size.clone(),
        storage_class_name: s.wal.storage_class_name.clone(),
    };
    let backup = s.backup.as_ref().map(|b| ClaimKind {
        template: "backup",
        size_field: "spec.backup.size",
        size: b.size.clone(),
        storage_class_name: b.storage_class_name.clone(),
    });
    std::iter::once(wal).chain(backup).collect()
}

fn claim_templates(bus: &EventBus) -> Vec<PersistentVolumeClaim> {
    claim_kinds(bus)
        .into_iter()
        .map(|k| PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(k.template.into()),
                labels: Some(labels(COMPONENT, &bus.name_any())),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: k.storage_class_name,
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".to_string(), Quantity(k.size))])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// Keeps all but one bus pod up through voluntary disruptions (node
/// drains); a single-replica bus may still be moved.
pub fn pdb(bus: &EventBus) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(bus, &Names::of(&bus.name_any()).pdb),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(COMPONENT, &bus.name_any())),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}
