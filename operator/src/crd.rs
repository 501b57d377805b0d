//! Custom resources of `amoskys.io/v1alpha1`. The CRD YAML under `crds/` and
//! `charts/amoskys/crds/` is generated from these types (`amoskys crdgen`).

use std::collections::BTreeMap;

use amoskys_agents::config::{InventorySpec, ProcessSpec, SnmpVersion, SyntheticSpec};
use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every AMOSKYS resource.
pub const GROUP: &str = "amoskys.io";
/// Their API version.
pub const VERSION: &str = "v1alpha1";

// ---- EventBus --------------------------------------------------------------

/// A durable event bus: a StatefulSet of `amoskys bus` with WAL volumes,
/// services and the mTLS certificates the operator issues.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "amoskys.io",
    version = "v1alpha1",
    kind = "EventBus",
    namespaced,
    shortname = "ebus",
    category = "amoskys",
    status = "EventBusStatus",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.activeShards","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","jsonPath":".status.activeShards"}"#,
    printcolumn = r#"{"name":"Retiring","type":"integer","jsonPath":".status.retiringShards"}"#,
    printcolumn = r#"{"name":"Cert Expires","type":"date","jsonPath":".status.certificates.serverNotAfter"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct EventBusSpec {
    /// Shards that take events: one bus pod each, with its own WAL volume.
    /// Lowering it retires the shards above: they take no new events and
    /// keep answering reads until their newest event is older than the
    /// retention, and only then are their pods removed.
    #[serde(default = "one")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 16").message("replicas must be between 1 and 16"))]
    pub replicas: i32,
    /// Remove retiring shards at once, with the events they hold (a Warning
    /// event says so), instead of keeping them until their data ages out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discard_retiring_shards: bool,
    /// The amoskys image; the operator's own image when empty.
    #[serde(default)]
    pub image: String,
    /// CPU and memory for each bus pod.
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// The write-ahead store: its volume, retention and fsync policy.
    #[serde(default)]
    pub wal: WalSpec,
    /// Certificate lifetimes, or cert-manager as the issuer.
    #[serde(default)]
    pub tls: TlsSpec,
    /// The client Service.
    #[serde(default)]
    pub service: ServiceSpec,
    /// Backups of each pod's store onto a volume of its own; none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,
    /// Where the bus hands its events on; nothing leaves it when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export: Option<ExportSpec>,
    /// Where the detector's alerts are delivered; they stay in the store
    /// (and the dashboard) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerting: Option<AlertingSpec>,
    /// The NetworkPolicy that admits traffic to the bus pods.
    #[serde(default)]
    pub network_policy: NetworkPolicySpec,
}

/// Who may reach the bus pods. gRPC: the pods of the AgentSets that send to
/// this bus, the bus's own pods (shard to shard), the operator, and the
/// namespaces named here; HTTP (dashboard, metrics): the bus's namespace and
/// the namespaces named here.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct NetworkPolicySpec {
    /// false: the operator creates no NetworkPolicy (one it created before
    /// stays until you delete it).
    pub enabled: bool,
    /// Namespaces whose pods may use the gRPC port (readers, admins, the CLI).
    pub client_namespaces: Vec<String>,
    /// Namespaces whose pods may use the HTTP port (e.g. Prometheus's).
    pub http_namespaces: Vec<String>,
    /// The nodes' address ranges. Agents with the flow or process collector
    /// run in the host's network, where no pod selector matches them; with
    /// such agents and no ranges here, the gRPC port stays open to all (mTLS
    /// still decides who gets in).
    #[serde(rename = "agentCIDRs")]
    pub agent_cidrs: Vec<String>,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            client_namespaces: Vec::new(),
            http_namespaces: Vec::new(),
            agent_cidrs: Vec::new(),
        }
    }
}

/// Alert receivers, each fed from its own durable cursor.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct AlertingSpec {
    /// The dashboard's address as users reach it (an Ingress); each alert
    /// links to its event there. The bus's own address when empty.
    pub external_url: String,
    /// Alertmanager's API v2, e.g. http://alertmanager.monitoring:9093.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alertmanager: Option<AlertReceiverSpec>,
    /// A generic JSON webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<AlertReceiverSpec>,
}

/// One alert receiver.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct AlertReceiverSpec {
    /// Alertmanager's base address, or the webhook's full address.
    pub url: String,
    /// A Secret in the bus's namespace whose `ca.crt` verifies an https
    /// receiver (added to the system's roots); none when empty.
    pub ca_secret_name: String,
    /// A Secret in the bus's namespace whose `token` is sent as
    /// `Authorization: Bearer`; none when empty.
    pub token_secret_name: String,
    /// How long one delivery may take.
    pub timeout: String,
    /// Alerts per request at most.
    #[schemars(range(min = 1, max = 1000))]
    pub max_batch: u32,
}

impl Default for AlertReceiverSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            ca_secret_name: String::new(),
            token_secret_name: String::new(),
            timeout: "10s".into(),
            max_batch: 64,
        }
    }
}

/// Exports of the stored events.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", default)]
pub struct ExportSpec {
    /// To a NATS JetStream stream, which must exist.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsExportSpec>,
}

/// Every stored event published to a JetStream stream, in offset order,
/// with `Nats-Msg-Id: <agent_id>:<incarnation>:<seq>`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct NatsExportSpec {
    /// The NATS server, e.g. tls://nats.messaging:4222.
    pub url: String,
    /// The stream; it must take the subjects `<subjectPrefix>.>`.
    pub stream: String,
    /// Subjects are `<subjectPrefix>.<collector>.<severity>`.
    pub subject_prefix: String,
    /// protobuf (an encoded Event) or json.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self in ['protobuf', 'json']", "message": "format must be protobuf or json"}]))]
    pub format: String,
    /// Publishes awaiting their PubAck at most.
    #[schemars(range(min = 1, max = 65536))]
    pub max_in_flight: u32,
    /// A Secret in the bus's namespace with ca.crt to verify the server, and
    /// tls.crt and tls.key when it wants a client certificate (the
    /// cert-manager layout); plain TCP when empty.
    pub tls_secret_name: String,
    /// A Secret in the bus's namespace whose key `nats.creds` is a NATS
    /// credentials file (user JWT and NKey seed); none when empty.
    pub credentials_secret_name: String,
}

impl Default for NatsExportSpec {
    fn default() -> Self {
        Self {
            url: String::new(),
            stream: String::new(),
            subject_prefix: "amoskys".into(),
            format: "protobuf".into(),
            max_in_flight: 256,
            tls_secret_name: String::new(),
            credentials_secret_name: String::new(),
        }
    }
}

fn one() -> i32 {
    1
}

/// The write-ahead store.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct WalSpec {
    /// StorageClass of the WAL volumes; the cluster default when empty.
    pub storage_class_name: Option<String>,
    /// Volume size. Growing it expands the existing claims; shrinking is refused.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.matches('^[0-9]+(Ki|Mi|Gi|Ti)$')", "message": "size must be a quantity like 10Gi"}]))]
    pub size: String,
    /// How long events are kept, e.g. 7d, 12h.
    pub retention: String,
    /// Cap on stored bytes, e.g. 8GiB; empty for none.
    pub max_bytes: String,
    /// When writes are fsynced before acks: always, batch or never.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self in ['always', 'batch', 'never']", "message": "sync must be always, batch or never"}]))]
    pub sync: String,
}

impl Default for WalSpec {
    fn default() -> Self {
        Self {
            storage_class_name: None,
            size: "10Gi".into(),
            retention: "7d".into(),
            max_bytes: String::new(),
            sync: "batch".into(),
        }
    }
}

/// Backups of the store (`amoskys backup`): incremental, each pod onto its
/// own backup volume, restorable with `amoskys backup restore`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BackupSpec {
    /// How often, e.g. 24h, 6h; 0s for only when asked (Admin.Backup).
    pub interval: String,
    /// Backups kept per pod; older ones are removed.
    #[schemars(range(min = 1))]
    pub keep: u32,
    /// StorageClass of the backup volumes; the cluster default when empty.
    pub storage_class_name: Option<String>,
    /// Backup volume size. Like the WAL's, it can grow but not shrink.
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.matches('^[0-9]+(Ki|Mi|Gi|Ti)$')", "message": "size must be a quantity like 10Gi"}]))]
    pub size: String,
}

impl Default for BackupSpec {
    fn default() -> Self {
        Self {
            interval: "24h".into(),
            keep: 7,
            storage_class_name: None,
            size: "10Gi".into(),
        }
    }
}

/// The mTLS certificates of the bus, its agents and its admin.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct TlsSpec {
    /// Lifetime of leaf certificates (bus, agents, admin), e.g. 90d.
    pub validity: String,
    /// Renew this long before expiry; a third of `validity` when empty.
    pub renew_before: String,
    /// Lifetime of the CA.
    pub ca_validity: String,
    /// Let cert-manager issue the certificates instead of the operator.
    pub issuer_ref: Option<IssuerRef>,
}

impl Default for TlsSpec {
    fn default() -> Self {
        Self {
            validity: "90d".into(),
            renew_before: String::new(),
            ca_validity: "3650d".into(),
            issuer_ref: None,
        }
    }
}

/// A cert-manager issuer.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRef {
    /// The issuer's name.
    pub name: String,
    /// Issuer or ClusterIssuer.
    #[serde(default = "issuer_kind")]
    pub kind: String,
    /// The issuer's API group.
    #[serde(default = "cert_manager_group")]
    pub group: String,
}

fn issuer_kind() -> String {
    "Issuer".into()
}

fn cert_manager_group() -> String {
    "cert-manager.io".into()
}

/// The client Service in front of the bus pods.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ServiceSpec {
    /// ClusterIP, NodePort or LoadBalancer for the client Service.
    pub r#type: String,
    /// The gRPC (mTLS) port agents and readers connect to.
    pub grpc_port: i32,
    /// The HTTP port: metrics, health and the dashboard.
    pub http_port: i32,
    /// Annotations for the Service (e.g. a load balancer's).
    pub annotations: BTreeMap<String, String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            r#type: "ClusterIP".into(),
            grpc_port: 7443,
            http_port: 9464,
            annotations: BTreeMap::new(),
        }
    }
}

/// What the operator last saw of an EventBus.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventBusStatus {
    /// Ready, and InvalidSpec when the spec is refused.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Bus pods ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// host:port of the client Service's gRPC port.
    #[serde(default)]
    pub endpoint: String,
    /// When the certificates expire.
    #[serde(default)]
    pub certificates: CertificateStatus,
    /// The spec generation this status describes.
    #[serde(default)]
    pub observed_generation: Option<i64>,
    /// Shards taking events (spec.replicas once applied); pods run for
    /// these and the retiring ones.
    #[serde(default)]
    pub active_shards: i32,
    /// Shards kept for their history, taking no new events.
    #[serde(default)]
    pub retiring_shards: i32,
    /// Each shard's state, as last read from its pod.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// The pods' label selector (for the scale subresource and autoscalers).
    #[serde(default)]
    pub selector: String,
}

/// One shard of an EventBus.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// The pod index.
    pub index: i32,
    /// `active` (takes events) or `retiring` (serves reads until its data
    /// ages out).
    pub state: String,
    /// RFC 3339 stored time of its newest event; none when it holds none or
    /// its pod has not answered yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newest_event_time: Option<String>,
    /// Events the shard holds.
    #[serde(default)]
    pub events_stored: u64,
    /// When a retiring shard's pod goes: its newest event plus the retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removable_after: Option<String>,
}

/// Expiry of the certificates the operator issued.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// RFC 3339 expiry of the CA, the bus certificate and the admin certificate.
    pub ca_not_after: Option<String>,
    /// RFC 3339 expiry of the bus's certificate.
    pub server_not_after: Option<String>,
    /// RFC 3339 expiry of the admin certificate.
    pub admin_not_after: Option<String>,
    /// The CA rotation phase, when one is in progress.
    pub rotation: Option<String>,
}

// ---- AgentSet --------------------------------------------------------------

/// Agents on a set of nodes: a DaemonSet of `amoskys agent` sending to one
/// EventBus.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "amoskys.io",
    version = "v1alpha1",
    kind = "AgentSet",
    namespaced,
    shortname = "aset",
    category = "amoskys",
    status = "AgentSetStatus",
    printcolumn = r#"{"name":"Bus","type":"string","jsonPath":".spec.busRef.name"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desired"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.ready"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSetSpec {
    /// The EventBus (same namespace) the agents send to.
    pub bus_ref: BusRef,
    /// One section per collector; an absent section takes its defaults (process
    /// and inventory on, the rest off). The same shape as the agent's own
    /// `collectors:` config, except that SNMP credentials come from a Secret.
    #[serde(default)]
    pub collectors: AgentSetCollectors,
    /// The nodes the agents run on; every node when empty.
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the agents tolerate (e.g. to run on control-plane nodes).
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// CPU and memory for each agent pod.
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// Bound on each agent's on-disk spool, e.g. 256Mi.
    #[serde(default = "spool_size")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(Ki|Mi|Gi)$')").message("spoolSize must be a quantity like 256Mi"))]
    pub spool_size: String,
    /// The amoskys image; the operator's own image when empty.
    #[serde(default)]
    pub image: String,
    /// Stops the agents (the DaemonSet schedules no pods) without deleting anything.
    #[serde(default)]
    pub paused: bool,
    /// The ServiceAccount the agents run as. With one, each agent watches
    /// the pods on its node (it needs `get`, `list` and `watch` on pods: the
    /// chart's `RELEASE-agent` ClusterRole) and gives process and flow
    /// events their namespace, pod, labels, service account, container and
    /// image. Without one the agents get no API token and events carry no
    /// pod identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

fn spool_size() -> String {
    "256Mi".into()
}

/// An EventBus by name.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BusRef {
    /// The EventBus's name.
    pub name: String,
}

/// One section per collector; an absent section takes its defaults (process
/// and inventory on, the rest off). The same shape as the agent's own
/// `collectors:` config, except that SNMP credentials come from a Secret.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default)]
// Unknown sections are kept (not pruned by the API server) so the operator
// can name them in an InvalidSpec condition instead of silently ignoring them.
#[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
pub struct AgentSetCollectors {
    /// Process starts and exits.
    pub process: ProcessSpec,
    /// Network flows, by live capture only in a cluster (no capture files);
    /// enabling it grants the agents CAP_NET_RAW.
    pub flow: FlowCollector,
    /// SNMP polls of network devices.
    pub snmp: SnmpCollector,
    /// Host and device inventory.
    pub inventory: InventorySpec,
    /// Synthetic load, for demos and benchmarks.
    pub synthetic: SyntheticSpec,
    /// Sections naming no known collector.
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// The collectors an AgentSet can enable.
pub const COLLECTORS: [&str; 5] = ["process", "flow", "snmp", "inventory", "synthetic"];

/// Live capture only in a cluster (no capture files).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct FlowCollector {
    /// Off unless set.
    pub enabled: bool,
    /// The interface captured (`any`).
    pub interface: String,
    /// A BPF filter in tcpdump's syntax; empty captures everything.
    pub bpf_filter: String,
    /// A flow with no packet for this long is exported and closed (`15s`).
    pub idle_timeout: String,
    /// A long flow is exported at least this often (`60s`).
    pub active_timeout: String,
    /// Flows tracked at once; past it the oldest is evicted.
    pub max_flows: usize,
    /// Bytes captured per packet: headers only.
    pub snaplen: i32,
    /// Find the process on the node behind each TCP and UDP flow (`true`).
    pub owners: bool,
    /// New flows wait at most this long to be attributed together (`250ms`).
    pub owner_interval: String,
}

impl Default for FlowCollector {
    fn default() -> Self {
        let d = amoskys_agents::config::FlowSpec::default();
        Self {
            enabled: d.enabled,
            interface: d.interface,
            bpf_filter: d.bpf_filter,
            idle_timeout: d.idle_timeout,
            active_timeout: d.active_timeout,
            max_flows: d.max_flows,
            snaplen: d.snaplen,
            owners: d.owners,
            owner_interval: d.owner_interval,
        }
    }
}

/// SNMP polling, with credentials from Secrets.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SnmpCollector {
    /// Off unless set.
    pub enabled: bool,
    /// How often each target is polled (`30s`).
    pub interval: String,
    /// How long one request waits for its answer (`2s`).
    pub timeout: String,
    /// Requests retried after a timeout.
    pub retries: u32,
    /// The devices to poll.
    pub targets: Vec<SnmpTargetSpec>,
}

impl Default for SnmpCollector {
    fn default() -> Self {
        let d = amoskys_agents::config::SnmpSpec::default();
        Self {
            enabled: d.enabled,
            interval: d.interval,
            timeout: d.timeout,
            retries: d.retries,
            targets: Vec::new(),
        }
    }
}

/// One SNMP device; its secrets are keys of a Secret in the AgentSet's
/// namespace, mounted into the agents as files.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct SnmpTargetSpec {
    /// The name its events carry (default: the address).
    pub name: String,
    /// host:port (port defaults to 161).
    pub address: String,
    /// v2c (default) or v3.
    pub version: SnmpVersion,
    /// v3 user name.
    pub user: String,
    /// v3: md5, sha1, sha224, sha256, sha384 or sha512.
    pub auth_protocol: String,
    /// v3: des, aes128, aes192 or aes256; empty for authNoPriv.
    pub priv_protocol: String,
    /// The Secret holding `community` (v2c) or `authPassword` and
    /// `privPassword` (v3).
    pub credentials_secret: String,
}

/// What the operator last saw of an AgentSet.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentSetStatus {
    /// Ready, and InvalidSpec when the spec is refused.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Agent pods the DaemonSet wants.
    #[serde(default)]
    pub desired: i32,
    /// Agent pods ready.
    #[serde(default)]
    pub ready: i32,
    /// The spec generation this status describes.
    #[serde(default)]
    pub observed_generation: Option<i64>,
}

// ---- Agent -----------------------------------------------------------------

/// One agent on one node, written by the operator from the bus's registry.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "amoskys.io",
    version = "v1alpha1",
    kind = "Agent",
    namespaced,
    shortname = "ag",
    category = "amoskys",
    status = "AgentStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"EPS","type":"number","jsonPath":".status.eventsPerSecond"}"#,
    printcolumn = r#"{"name":"Spool","type":"integer","jsonPath":".status.spoolBytes"}"#,
    printcolumn = r#"{"name":"Last Seen","type":"date","jsonPath":".status.lastSeen"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// The AgentSet it belongs to.
    pub agent_set: String,
    /// The node it runs on.
    pub node: String,
    /// `<agentset>/<node>`, the id the agent publishes under.
    pub agent_id: String,
}

/// The agent as the bus's registry last saw it.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Pending, Running, Disconnected or Degraded.
    pub phase: String,
    /// Why it is in that phase.
    pub reason: String,
    /// RFC 3339 time of its last heartbeat.
    pub last_seen: Option<String>,
    /// Events per second at its last heartbeat.
    pub events_per_second: f64,
    /// Events the bus has stored from it.
    pub events_total: u64,
    /// Bytes waiting in its spool.
    pub spool_bytes: u64,
    /// Events it dropped because its spool was full.
    pub dropped: u64,
    /// Its collectors and the mode each runs in.
    pub collectors: Vec<AgentCollectorStatus>,
    /// Its version.
    pub version: String,
    /// The serial of the client certificate it connects with.
    pub cert_serial: String,
    /// The incarnation now publishing (hex): a random id made with the
    /// agent's spool. It changes when the spool is wiped or replaced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub incarnation: String,
    /// RFC 3339 time the bus first saw the current incarnation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation_started: Option<String>,
    /// Incarnations the bus has seen under this agent id.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub incarnations: u64,
    /// Events the previous incarnation's spool still held unacked at its
    /// last heartbeat that never arrived: lost with the spool.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub previous_unacked: u64,
    /// Publish streams refused because another agent (another incarnation)
    /// held this agent id's stream: two hosts share one id.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub refused_streams: u64,
    /// The text of the latest refusal, naming both streams' addresses.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_refusal: String,
    /// Events the agent saw acked that the bus no longer holds (a restore
    /// from an older backup, a lost volume).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub lost_by_bus: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One collector of an agent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentCollectorStatus {
    /// The collector's name.
    pub name: String,
    /// e.g. netlink or poll for process, live for flow, paused.
    pub mode: String,
}

// ---- Detection rules -------------------------------------------------------

/// A detection rule for the events of pods in its own namespace. The spec is
/// the rule file's (docs/detection.md); the operator compiles it, runs its
/// inline tests and hands it to every EventBus.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "amoskys.io",
    version = "v1alpha1",
    kind = "DetectionRule",
    namespaced,
    shortname = "dr",
    category = "amoskys",
    status = "DetectionRuleStatus",
    printcolumn = r#"{"name":"Severity","type":"string","jsonPath":".spec.severity"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Compiled","type":"string","jsonPath":".status.conditions[?(@.type==\"Compiled\")].status"}"#,
    printcolumn = r#"{"name":"Tests","type":"string","jsonPath":".status.conditions[?(@.type==\"TestsPassed\")].status"}"#,
    printcolumn = r#"{"name":"Loaded","type":"string","jsonPath":".status.conditions[?(@.type==\"Loaded\")].status"}"#,
    printcolumn = r#"{"name":"Matches-24h","type":"integer","jsonPath":".status.matches24h"}"#,
    printcolumn = r#"{"name":"Last-Match","type":"date","jsonPath":".status.lastMatch"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct DetectionRuleSpec {
    /// The rule.
    #[serde(flatten)]
    pub rule: amoskys_detect::RuleSpec,
}

/// A detection rule for any event: narrowed by namespaces and a pod
/// selector, and seeing node-level events (no pod) unless told not to.
#[derive(CustomResource, JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "amoskys.io",
    version = "v1alpha1",
    kind = "ClusterDetectionRule",
    shortname = "cdr",
    category = "amoskys",
    status = "DetectionRuleStatus",
    printcolumn = r#"{"name":"Severity","type":"string","jsonPath":".spec.severity"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Compiled","type":"string","jsonPath":".status.conditions[?(@.type==\"Compiled\")].status"}"#,
    printcolumn = r#"{"name":"Tests","type":"string","jsonPath":".status.conditions[?(@.type==\"TestsPassed\")].status"}"#,
    printcolumn = r#"{"name":"Loaded","type":"string","jsonPath":".status.conditions[?(@.type==\"Loaded\")].status"}"#,
    printcolumn = r#"{"name":"Matches-24h","type":"integer","jsonPath":".status.matches24h"}"#,
    printcolumn = r#"{"name":"Last-Match","type":"date","jsonPath":".status.lastMatch"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct ClusterDetectionRuleSpec {
    /// The rule.
    #[serde(flatten)]
    pub rule: amoskys_detect::RuleSpec,
}

/// What the operator made of a rule.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DetectionRuleStatus {
    /// Compiled (the condition type-checks against the event fields; the
    /// message names the field, line and column of an error), TestsPassed
    /// (every inline test), Loaded (running on every bus pod, as the pods
    /// report it).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The spec generation this status describes.
    #[serde(default)]
    pub observed_generation: Option<i64>,
    /// Inline tests run.
    #[serde(default)]
    pub tests: u32,
    /// Of those, passed.
    #[serde(default)]
    pub tests_passed: u32,
    /// Matches among events stored in the last 24 hours, summed over every
    /// bus pod (each counts since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches24h: Option<u64>,
    /// The stored time of the event evaluated at the newest match on any
    /// bus pod (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_match: Option<String>,
}

/// The CRDs, in the order they are written.
pub fn all()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        EventBus::crd(),
        AgentSet::crd(),
        Agent::crd(),
        DetectionRule::crd(),
        ClusterDetectionRule::crd(),
    ]
}

/// The CRDs as one multi-document YAML file.
pub fn yaml() -> Result<String, serde_saphyr::ser::Error> {
    let mut out =
        String::from("# Generated by `amoskys crdgen` from operator/src/crd.rs; do not edit.\n");
    for crd in all() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}
