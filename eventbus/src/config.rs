//! Bus configuration: a YAML file (`--config`) overridden by flags.
//!
//! Every key is checked when loaded; an unknown key or a bad value is an
//! error naming the key, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use amoskys_client::parse::{ParseError, parse_bytes, parse_duration};
use serde::Deserialize;

/// Why a bus config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// A value is not allowed.
    #[error("{key}: {message}")]
    Invalid {
        /// The key, as the file writes it.
        key: &'static str,
        /// What is wrong with its value.
        message: String,
    },
}

impl From<ParseError> for ConfigError {
    fn from(e: ParseError) -> Self {
        ConfigError::Invalid {
            key: e.key,
            message: e.message,
        }
    }
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// When a group of writes is fsynced before its acks go out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// Every client batch is written and fsynced on its own.
    Always,
    /// One fsync for each group commit (all batches the writer drained at once).
    Batch,
    /// No fsync: acked events survive a process crash (they are in the OS page
    /// cache) but not a power loss.
    Never,
}

impl SyncPolicy {
    /// The policy as the config writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncPolicy::Always => "always",
            SyncPolicy::Batch => "batch",
            SyncPolicy::Never => "never",
        }
    }
}

impl std::str::FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "batch" => Ok(SyncPolicy::Batch),
            "never" => Ok(SyncPolicy::Never),
            other => Err(format!("{other:?} is not one of always, batch, never")),
        }
    }
}

/// The YAML file's shape; all keys optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BusConfigFile {
    /// `listen`: The gRPC (mTLS) address agents and readers connect to.
    pub listen: Option<String>,
    /// `http`: The HTTP address: metrics, health and the dashboard.
    pub http: Option<String>,
    /// `dataDir`: The store's directory.
    pub data_dir: Option<PathBuf>,
    /// `tlsDir`: The directory with the bus's `tls.crt`, `tls.key` and `ca.crt`.
    pub tls_dir: Option<PathBuf>,
    /// `retention`: How long events are kept.
    pub retention: Option<String>,
    /// `maxBytes`: A cap on the store's bytes; the oldest events go first.
    pub max_bytes: Option<String>,
    /// `sync`: When writes are fsynced before their acks.
    pub sync: Option<String>,
    /// `maxMessageBytes`: The largest gRPC message taken or sent.
    pub max_message_bytes: Option<String>,
    /// `queueDepth`: Client batches waiting for the writer; beyond it, publishers wait.
    pub queue_depth: Option<usize>,
    /// `writeBufferBytes`: RocksDB memtable size: bounds memory and the size of each log file.
    pub write_buffer_bytes: Option<String>,
    /// `maxGroupEvents`: Upper bound on events folded into one group commit.
    pub max_group_events: Option<usize>,
    /// `maxQueryLimit`: The most events one Query returns.
    pub max_query_limit: Option<u32>,
    /// `retentionCheckInterval`: How often retention runs.
    pub retention_check_interval: Option<String>,
    /// `tlsReloadInterval`: How often the TLS files are checked for a change.
    pub tls_reload_interval: Option<String>,
    /// `shutdownGrace`: How long a stopping bus drains before it closes.
    pub shutdown_grace: Option<String>,
    /// `logFormat`: `text` or `json`.
    pub log_format: Option<String>,
    /// `httpTls`: Serve the HTTP address over TLS with the bus certificate.
    pub http_tls: Option<bool>,
    /// `adminTokenFile`: A file of dashboard admin tokens, one per line.
    pub admin_token_file: Option<PathBuf>,
    /// `readerTokenFile`: A file of dashboard reader tokens, one per line.
    pub reader_token_file: Option<PathBuf>,
    /// `dashboard`: The `dashboard:` section.
    pub dashboard: Option<DashboardFile>,
    /// `backup`: The `backup:` section; no backups when absent.
    pub backup: Option<BackupFile>,
    /// `export`: The `export:` section; nothing leaves the bus when absent.
    pub export: Option<ExportFile>,
    /// `sharding`: The `sharding:` section; one unsharded bus when absent.
    pub sharding: Option<ShardingFile>,
    /// `detection`: The `detection:` section; no rules run when absent.
    pub detection: Option<DetectionFile>,
    /// `alerting`: The `alerting:` section; alerts stay in the store when absent.
    pub alerting: Option<AlertingFile>,
}

/// The `alerting:` section: where the detector's alerts are delivered.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AlertingFile {
    /// `externalUrl`: the dashboard's address as users reach it; each alert
    /// links to its event there (`https://amoskys.example.com`).
    pub external_url: Option<String>,
    /// `alertmanager`: Alertmanager's API v2.
    pub alertmanager: Option<AlertSinkFile>,
    /// `webhook`: a generic JSON webhook.
    pub webhook: Option<AlertSinkFile>,
}

/// One receiver under `alerting:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AlertSinkFile {
    /// `url`: Alertmanager's base address (`http://alertmanager:9093`), or
    /// the webhook's full address.
    pub url: Option<String>,
    /// `caFile`: PEM certificates to verify an https receiver with, added
    /// to the system's roots.
    pub ca_file: Option<PathBuf>,
    /// `bearerTokenFile`: a file whose content is sent as
    /// `Authorization: Bearer <token>` (re-read on every delivery).
    pub bearer_token_file: Option<PathBuf>,
    /// `timeout`: how long one delivery may take (`10s`).
    pub timeout: Option<String>,
    /// `maxBatch`: alerts per request (64).
    pub max_batch: Option<usize>,
    /// `resolveAfter` (Alertmanager): an alert's `endsAt` is its last match
    /// plus this (`1h`).
    pub resolve_after: Option<String>,
}

/// Which receiver a sink delivers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// Alertmanager's API v2.
    Alertmanager,
    /// A generic JSON webhook.
    Webhook,
}

impl SinkKind {
    /// The name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SinkKind::Alertmanager => "alertmanager",
            SinkKind::Webhook => "webhook",
        }
    }
}

/// One alert receiver, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertSinkConfig {
    /// The receiver.
    pub kind: SinkKind,
    /// Its address (Alertmanager's base, or the webhook's own).
    pub url: String,
    /// Extra roots to verify an https receiver with.
    pub ca_file: Option<PathBuf>,
    /// A bearer token's file, re-read on every delivery.
    pub bearer_token_file: Option<PathBuf>,
    /// How long one delivery may take.
    pub timeout: Duration,
    /// Alerts per request at most.
    pub max_batch: usize,
    /// Alertmanager: `endsAt` is the last match plus this.
    pub resolve_after: Duration,
}

/// The `alerting:` section, checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlertingConfig {
    /// The dashboard's base address for links; None: the bus's HTTP address.
    pub external_url: Option<String>,
    /// The receivers, each with its own cursor.
    pub sinks: Vec<AlertSinkConfig>,
}

/// The largest `maxBatch` a sink takes.
pub const MAX_SINK_BATCH: usize = 1000;

fn resolve_alerting(f: Option<AlertingFile>) -> Result<AlertingConfig, ConfigError> {
    let Some(f) = f else {
        return Ok(AlertingConfig::default());
    };
    // Keys are static so an error names the exact setting.
    struct Keys {
        url: &'static str,
        timeout: &'static str,
        max_batch: &'static str,
        resolve_after: &'static str,
    }
    let sink = |kind: SinkKind, s: AlertSinkFile, k: Keys| -> Result<_, ConfigError> {
        let url = s
            .url
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| invalid(k.url, "required"))?;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(
                k.url,
                format!("{url:?} is not an http:// or https:// address"),
            ));
        }
        let timeout = match s.timeout {
            Some(v) => parse_duration(k.timeout, &v)?,
            None => Duration::from_secs(10),
        };
        if timeout.is_zero() {
            return Err(invalid(k.timeout, "must be longer than 0s"));
        }
        let max_batch = s.max_batch.unwrap_or(64);
        if !(1..=MAX_SINK_BATCH).contains(&max_batch) {
            return Err(invalid(
                k.max_batch,
                format!("{max_batch} is outside 1..={MAX_SINK_BATCH}"),
            ));
        }
        let resolve_after = match s.resolve_after {
            Some(v) => parse_duration(k.resolve_after, &v)?,
            None => Duration::from_secs(3600),
        };
        Ok(AlertSinkConfig {
            kind,
            url,
            ca_file: s.ca_file,
            bearer_token_file: s.bearer_token_file,
            timeout,
            max_batch,
            resolve_after,
        })
    };
    let mut sinks = Vec::new();
    if let Some(s) = f.alertmanager {
        sinks.push(sink(
            SinkKind::Alertmanager,
            s,
            Keys {
                url: "alerting.alertmanager.url",
                timeout: "alerting.alertmanager.timeout",
                max_batch: "alerting.alertmanager.maxBatch",
                resolve_after: "alerting.alertmanager.resolveAfter",
            },
        )?);
    }
    if let Some(s) = f.webhook {
        sinks.push(sink(
            SinkKind::Webhook,
            s,
            Keys {
                url: "alerting.webhook.url",
                timeout: "alerting.webhook.timeout",
                max_batch: "alerting.webhook.maxBatch",
                resolve_after: "alerting.webhook.resolveAfter",
            },
        )?);
    }
    let external_url = f
        .external_url
        .map(|u| u.trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty());
    if let Some(u) = &external_url
        && !(u.starts_with("http://") || u.starts_with("https://"))
    {
        return Err(invalid(
            "alerting.externalUrl",
            format!("{u:?} is not an http:// or https:// address"),
        ));
    }
    Ok(AlertingConfig {
        external_url,
        sinks,
    })
}

/// The `detection:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DetectionFile {
    /// `rulesDir`: a directory of rule files (`*.yaml`, `*.yml`), re-read on change.
    pub rules_dir: Option<PathBuf>,
    /// `reloadInterval`: how often the directory is checked for changes (`2s`).
    pub reload_interval: Option<String>,
    /// `ruleBudget`: mean CEL time per evaluated event above which a rule
    /// is reported Degraded (`50us`).
    pub rule_budget: Option<String>,
    /// `checkpointInterval`: how often the detector saves its cursor (`1s`);
    /// after a crash it evaluates again what came after the last save.
    pub checkpoint_interval: Option<String>,
}

/// Detection rules the bus evaluates on what it stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetectionConfig {
    /// The rule files' directory.
    pub rules_dir: PathBuf,
    /// How often it is checked for changes.
    pub reload_interval: Duration,
    /// Mean CEL time per evaluated event above which a rule is Degraded.
    pub rule_budget: Duration,
    /// How often the cursor and windows are saved.
    pub checkpoint_interval: Duration,
}

/// The `sharding:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ShardingFile {
    /// `index`: this bus's shard index (flag `--shard-index`, env
    /// `AMOSKYS_SHARD_INDEX`, which the StatefulSet sets from the pod index).
    pub index: Option<u32>,
    /// `mapFile`: the shard map (epoch, active, peers), re-read when it
    /// changes (flag `--shard-map`).
    pub map_file: Option<PathBuf>,
    /// `map`: the shard map inline, for a bus that never changes it.
    pub map: Option<amoskys_client::shard::ShardMap>,
    /// `peerTlsDir`: the peer certificate (role peer) this bus calls other
    /// shards with: tls.crt, tls.key, ca.crt.
    pub peer_tls_dir: Option<PathBuf>,
    /// `peerTimeout`: how long a call to another shard may take (`2s`).
    pub peer_timeout: Option<String>,
    /// `mapReloadInterval`: how often `mapFile` is checked (`1s`).
    pub map_reload_interval: Option<String>,
}

/// Which shard this bus is and how it finds the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardingConfig {
    /// This bus's index in the map.
    pub index: u32,
    /// Re-read for new maps; None when the map is fixed.
    pub map_file: Option<PathBuf>,
    /// The map inline, or a single shard; a map file replaces it at start.
    pub map: amoskys_client::shard::ShardMap,
    /// The peer certificate's directory; required when there are peers.
    pub peer_tls_dir: Option<PathBuf>,
    /// Deadline of one call to another shard.
    pub peer_timeout: Duration,
    /// How often the map file is checked.
    pub map_reload_interval: Duration,
}

impl Default for ShardingConfig {
    fn default() -> Self {
        Self {
            index: 0,
            map_file: None,
            map: amoskys_client::shard::ShardMap::single(),
            peer_tls_dir: None,
            peer_timeout: Duration::from_secs(2),
            map_reload_interval: Duration::from_secs(1),
        }
    }
}

/// Reads and checks a shard map file; the error names the file.
pub fn read_shard_map(path: &Path) -> Result<amoskys_client::shard::ShardMap, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    amoskys_client::shard::ShardMap::parse(&text).map_err(|e| ConfigError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The map a bus starts with: its map file's when it has one, else the
/// inline (or single-shard) map; the index must have a place in it.
pub fn load_shard_map(c: &ShardingConfig) -> Result<amoskys_client::shard::ShardMap, ConfigError> {
    let map = match &c.map_file {
        Some(path) => read_shard_map(path)?,
        None => c.map.clone(),
    };
    check_shard_index(c.index, &map)?;
    Ok(map)
}

/// A shard index the map has no place for is refused.
pub fn check_shard_index(
    index: u32,
    map: &amoskys_client::shard::ShardMap,
) -> Result<(), ConfigError> {
    if index >= map.shards() {
        return Err(invalid(
            "sharding.index",
            format!(
                "{index} is not a shard of the map (epoch {}: {} shards)",
                map.epoch,
                map.shards()
            ),
        ));
    }
    Ok(())
}

fn resolve_sharding(
    file: Option<ShardingFile>,
    flag_index: Option<u32>,
    flag_map: Option<PathBuf>,
) -> Result<ShardingConfig, ConfigError> {
    let f = file.unwrap_or_default();
    let mut c = ShardingConfig {
        index: flag_index.or(f.index).unwrap_or(0),
        map_file: flag_map.or(f.map_file),
        peer_tls_dir: f.peer_tls_dir,
        ..ShardingConfig::default()
    };
    // A map file is read when the bus starts (`load_shard_map`), so a config
    // can be checked where the file is not (the operator's tests).
    match (&c.map_file, f.map) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "sharding.map",
                "give either sharding.map or sharding.mapFile, not both",
            ));
        }
        (None, Some(map)) => {
            map.validate()
                .map_err(|e| invalid("sharding.map", e.to_string()))?;
            c.map = map;
        }
        _ => {}
    }
    if c.map_file.is_none() {
        check_shard_index(c.index, &c.map)?;
    }
    if let Some(v) = f.peer_timeout {
        c.peer_timeout = parse_duration("sharding.peerTimeout", &v)?;
        if c.peer_timeout.is_zero() {
            return Err(invalid("sharding.peerTimeout", "must be greater than zero"));
        }
    }
    if let Some(v) = f.map_reload_interval {
        c.map_reload_interval = parse_duration("sharding.mapReloadInterval", &v)?;
        if c.map_reload_interval < Duration::from_millis(50) {
            return Err(invalid(
                "sharding.mapReloadInterval",
                "must be at least 50ms",
            ));
        }
    }
    if c.peer_tls_dir.is_none() && (c.map.shards() > 1 || c.map_file.is_some()) {
        return Err(invalid(
            "sharding.peerTlsDir",
            "required with more than one shard or a map file (the certificate with role peer that shards call each other with)",
        ));
    }
    Ok(c)
}

/// The `export:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExportFile {
    /// `nats`: export to a NATS JetStream stream.
    pub nats: Option<NatsExportFile>,
}

/// The `export.nats:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NatsExportFile {
    /// `url`: the NATS server (`tls://nats:4222`).
    pub url: Option<String>,
    /// `stream`: the JetStream stream, which must exist and take the subjects.
    pub stream: Option<String>,
    /// `subjectPrefix`: subjects are `<prefix>.<collector>.<severity>` (`amoskys`).
    pub subject_prefix: Option<String>,
    /// `tlsDir`: ca.crt to verify the server, and tls.crt and tls.key when
    /// the server wants a client certificate.
    pub tls_dir: Option<PathBuf>,
    /// `credentialsFile`: a NATS `.creds` file (user JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// `format`: `protobuf` (an encoded `Event`) or `json`.
    pub format: Option<String>,
    /// `maxInFlight`: publishes awaiting their PubAck (256).
    pub max_in_flight: Option<usize>,
}

/// How events are written into NATS messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// The `Event`'s protobuf encoding.
    Protobuf,
    /// The `Event` as JSON.
    Json,
}

/// Where and how the bus exports its events to NATS JetStream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsExportConfig {
    /// The NATS server.
    pub url: String,
    /// The stream, which must exist.
    pub stream: String,
    /// Subjects are `<prefix>.<collector>.<severity>`.
    pub subject_prefix: String,
    /// ca.crt, and tls.crt and tls.key when present; None for plain TCP.
    pub tls_dir: Option<PathBuf>,
    /// A NATS `.creds` file.
    pub credentials_file: Option<PathBuf>,
    /// How each event is written.
    pub format: ExportFormat,
    /// Publishes awaiting their PubAck at most.
    pub max_in_flight: usize,
}

/// Publishes awaiting their PubAck when `maxInFlight` is not given.
pub const DEFAULT_EXPORT_IN_FLIGHT: usize = 256;

fn resolve_nats_export(f: NatsExportFile) -> Result<NatsExportConfig, ConfigError> {
    let url = f
        .url
        .filter(|u| !u.is_empty())
        .ok_or_else(|| invalid("export.nats.url", "required"))?;
    let stream = f.stream.unwrap_or_default();
    amoskys_client::parse::check_nats_stream(&stream)
        .map_err(|m| invalid("export.nats.stream", m))?;
    let subject_prefix = f.subject_prefix.unwrap_or_else(|| "amoskys".into());
    amoskys_client::parse::check_nats_subject_prefix(&subject_prefix)
        .map_err(|m| invalid("export.nats.subjectPrefix", m))?;
    let format = match f.format.as_deref().unwrap_or("protobuf") {
        "protobuf" => ExportFormat::Protobuf,
        "json" => ExportFormat::Json,
        other => {
            return Err(invalid(
                "export.nats.format",
                format!("{other:?} is not protobuf or json"),
            ));
        }
    };
    let max_in_flight = f.max_in_flight.unwrap_or(DEFAULT_EXPORT_IN_FLIGHT);
    let range = amoskys_client::parse::EXPORT_MAX_IN_FLIGHT;
    if !range.contains(&max_in_flight) {
        return Err(invalid(
            "export.nats.maxInFlight",
            format!("{max_in_flight} is outside {range:?}"),
        ));
    }
    Ok(NatsExportConfig {
        url,
        stream,
        subject_prefix,
        tls_dir: f.tls_dir,
        credentials_file: f.credentials_file,
        format,
        max_in_flight,
    })
}

/// The `backup:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackupFile {
    /// `dir`: where backups go (best on another disk).
    pub dir: Option<PathBuf>,
    /// `interval`: how often (`24h`); `0s` for only when asked.
    pub interval: Option<String>,
    /// `keep`: backups kept (7).
    pub keep: Option<u32>,
}

/// Where and how often the bus backs up its store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackupConfig {
    /// Where backups go.
    pub dir: PathBuf,
    /// None: only when asked (Admin.Backup).
    pub interval: Option<Duration>,
    /// Backups kept; older ones are removed after each new one.
    pub keep: u32,
}

/// How often backups run when the interval is not given.
pub const DEFAULT_BACKUP_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Backups kept when `keep` is not given.
pub const DEFAULT_BACKUP_KEEP: u32 = 7;

/// The `dashboard:` section.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DashboardFile {
    /// `sampleInterval`: how often rates and history are sampled (`5s`).
    pub sample_interval: Option<String>,
    /// `tailMaxEventsPerSecond`: events per second one live-tail viewer gets (500).
    pub tail_max_events_per_second: Option<u32>,
    /// `agentMissedAfter`: heartbeat silence after which an agent is
    /// Disconnected (`30s`).
    pub agent_missed_after: Option<String>,
}

/// What the dashboard needs beyond the bus's own settings.
#[derive(Clone, Debug)]
pub struct DashboardConfig {
    /// Files holding bearer tokens (one per line); re-read when they change.
    pub admin_token_file: Option<PathBuf>,
    /// The same, for reader tokens (read-only views).
    pub reader_token_file: Option<PathBuf>,
    /// How often rates and per-agent history are sampled (15 minutes kept).
    pub sample_interval: Duration,
    /// Events per second one live-tail viewer is sent; the rest are counted
    /// and reported to the viewer as skipped.
    pub tail_max_events_per_second: u32,
    /// Heartbeat silence after which an agent is Disconnected.
    pub agent_missed_after: Duration,
}

/// The bus's resolved, validated configuration.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// The gRPC (mTLS) address agents and readers connect to.
    pub listen: SocketAddr,
    /// The HTTP address: metrics, health and the dashboard.
    pub http: SocketAddr,
    /// The store's directory.
    pub data_dir: PathBuf,
    /// The directory with the bus's `tls.crt`, `tls.key` and `ca.crt`.
    pub tls_dir: PathBuf,
    /// How long events are kept.
    pub retention: Duration,
    /// 0 means no size cap.
    pub max_bytes: u64,
    /// When writes are fsynced before their acks.
    pub sync: SyncPolicy,
    /// The largest gRPC message taken or sent.
    pub max_message_bytes: usize,
    /// Client batches waiting for the writer; beyond it, publishers wait.
    pub queue_depth: usize,
    /// RocksDB memtable size: bounds memory and the size of each log file.
    pub write_buffer_bytes: usize,
    /// Upper bound on events folded into one group commit.
    pub max_group_events: usize,
    /// The most events one Query returns.
    pub max_query_limit: u32,
    /// How often retention runs.
    pub retention_check_interval: Duration,
    /// How often the TLS files are checked for a change.
    pub tls_reload_interval: Duration,
    /// How long a stopping bus drains before it closes.
    pub shutdown_grace: Duration,
    /// Serve the HTTP address over TLS with the bus certificate, accepting
    /// (not requiring) client certificates so an admin certificate can sign in.
    pub http_tls: bool,
    /// The `dashboard:` section.
    pub dashboard: DashboardConfig,
    /// The `backup:` section; no backups when absent.
    pub backup: Option<BackupConfig>,
    /// The `export.nats:` section; no export when absent.
    pub export_nats: Option<NatsExportConfig>,
    /// The `sharding:` section: one unsharded bus by default.
    pub sharding: ShardingConfig,
    /// The `detection:` section; no rules run when absent.
    pub detection: Option<DetectionConfig>,
    /// The `alerting:` section: no receivers by default.
    pub alerting: AlertingConfig,
}

impl BusConfig {
    /// Every default, with the two directories a bus cannot do without.
    pub fn defaults(data_dir: PathBuf, tls_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            http: SocketAddr::from(([127, 0, 0, 1], 9464)),
            data_dir,
            tls_dir,
            retention: Duration::from_secs(7 * 24 * 3600),
            max_bytes: 0,
            sync: SyncPolicy::Batch,
            max_message_bytes: 4 * 1024 * 1024,
            queue_depth: 1024,
            write_buffer_bytes: crate::store::DEFAULT_WRITE_BUFFER_BYTES,
            max_group_events: 65_536,
            max_query_limit: 100_000,
            retention_check_interval: Duration::from_secs(30),
            tls_reload_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(20),
            http_tls: false,
            dashboard: DashboardConfig {
                admin_token_file: None,
                reader_token_file: None,
                sample_interval: Duration::from_secs(5),
                tail_max_events_per_second: 500,
                agent_missed_after: Duration::from_secs(30),
            },
            backup: None,
            export_nats: None,
            sharding: ShardingConfig::default(),
            detection: None,
            alerting: AlertingConfig::default(),
        }
    }
}

/// Values given on the command line; each wins over the file. The `amoskys
/// bus` flags are these fields (`#[command(flatten)]`), so a new setting is
/// written here once, with its help text.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct BusOverrides {
    /// gRPC (mTLS) address.
    #[arg(long)]
    pub listen: Option<String>,
    /// HTTP address for /metrics, /healthz, /readyz.
    #[arg(long)]
    pub http: Option<String>,
    /// Where the store (RocksDB) lives.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Directory with tls.crt, tls.key and ca.crt (reloaded when they change).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Keep events this long (e.g. 7d, 12h).
    #[arg(long)]
    pub retention: Option<String>,
    /// Cap on stored bytes (e.g. 20GiB); oldest events go first.
    #[arg(long)]
    pub max_bytes: Option<String>,
    /// always | batch | never: when writes are fsynced before acks.
    #[arg(long)]
    pub sync: Option<String>,
    /// Largest gRPC message accepted (e.g. 4MiB).
    #[arg(long)]
    pub max_message_bytes: Option<String>,
    /// Client batches that may wait for the writer.
    #[arg(long)]
    pub queue_depth: Option<usize>,
    /// Serve the HTTP address over TLS (bus certificate); an admin or reader
    /// client certificate then signs in to the dashboard without a token.
    #[arg(long)]
    pub http_tls: bool,
    /// File of dashboard admin tokens, one per line (re-read on change).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// File of dashboard reader tokens (read-only: no control).
    #[arg(long)]
    pub reader_token_file: Option<PathBuf>,
    /// Take backups of the store into this directory (daily unless the
    /// config file's backup.interval says otherwise).
    #[arg(long)]
    pub backup_dir: Option<PathBuf>,
    /// This bus's shard index (a StatefulSet sets it from the pod index).
    #[arg(long, env = "AMOSKYS_SHARD_INDEX")]
    pub shard_index: Option<u32>,
    /// The shard map file (epoch, active, peers), re-read when it changes.
    #[arg(long)]
    pub shard_map: Option<PathBuf>,
    /// Evaluate the detection rules in this directory (YAML rule files,
    /// re-read when they change) on every stored event.
    #[arg(long)]
    pub rules_dir: Option<PathBuf>,
}

/// Reads and parses the config file at `path`; the error names the file.
pub fn read_config_file(path: &Path) -> Result<BusConfigFile, ConfigError> {
    amoskys_client::parse::read_yaml(path).map_err(|e| ConfigError::File {
        path: e.path,
        message: e.message,
    })
}

/// The config file's text; empty means all defaults.
pub fn parse_config(text: &str) -> Result<BusConfigFile, String> {
    amoskys_client::parse::parse_yaml(text)
}

fn parse_addr(key: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| invalid(key, format!("{s:?} is not an address like 127.0.0.1:7443")))
}

/// Merges file and flags over the defaults and validates the result.
pub fn resolve(file: BusConfigFile, flags: BusOverrides) -> Result<BusConfig, ConfigError> {
    let data_dir = flags
        .data_dir
        .or(file.data_dir)
        .ok_or_else(|| invalid("dataDir", "required (flag --data-dir or key dataDir)"))?;
    let tls_dir = flags
        .tls_dir
        .or(file.tls_dir)
        .ok_or_else(|| invalid("tlsDir", "required (flag --tls-dir or key tlsDir)"))?;
    let mut c = BusConfig::defaults(data_dir, tls_dir);
    if let Some(v) = flags.listen.or(file.listen) {
        c.listen = parse_addr("listen", &v)?;
    }
    if let Some(v) = flags.http.or(file.http) {
        c.http = parse_addr("http", &v)?;
    }
    if let Some(v) = flags.retention.or(file.retention) {
        c.retention = parse_duration("retention", &v)?;
        if c.retention.is_zero() {
            return Err(invalid("retention", "must be greater than zero"));
        }
    }
    if let Some(v) = flags.max_bytes.or(file.max_bytes) {
        c.max_bytes = parse_bytes("maxBytes", &v)?;
    }
    if let Some(v) = flags.sync.or(file.sync) {
        c.sync = v.parse().map_err(|m: String| invalid("sync", m))?;
    }
    if let Some(v) = flags.max_message_bytes.or(file.max_message_bytes) {
        let n = parse_bytes("maxMessageBytes", &v)?;
        if !(1024..=256 * 1024 * 1024).contains(&n) {
            return Err(invalid(
                "maxMessageBytes",
                format!("{n} is outside 1KiB..256MiB"),
            ));
        }
        c.max_message_bytes = n as usize;
    }
    if let Some(v) = flags.queue_depth.or(file.queue_depth) {
        if v == 0 {
            return Err(invalid("queueDepth", "must be at least 1"));
        }
        c.queue_depth = v;
    }
    if let Some(v) = file.write_buffer_bytes {
        let n = parse_bytes("writeBufferBytes", &v)?;
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&n) {
            return Err(invalid(
                "writeBufferBytes",
                format!("{n} is outside 64KiB..1GiB"),
            ));
        }
        c.write_buffer_bytes = n as usize;
    }
    if let Some(v) = file.max_group_events {
        if v == 0 {
            return Err(invalid("maxGroupEvents", "must be at least 1"));
        }
        c.max_group_events = v;
    }
    if let Some(v) = file.max_query_limit {
        if v == 0 {
            return Err(invalid("maxQueryLimit", "must be at least 1"));
        }
        c.max_query_limit = v;
    }
    if let Some(v) = file.retention_check_interval {
        c.retention_check_interval = parse_duration("retentionCheckInterval", &v)?;
    }
    if let Some(v) = file.tls_reload_interval {
        c.tls_reload_interval = parse_duration("tlsReloadInterval", &v)?;
    }
    if let Some(v) = file.shutdown_grace {
        c.shutdown_grace = parse_duration("shutdownGrace", &v)?;
    }
    c.http_tls = flags.http_tls || file.http_tls.unwrap_or(false);
    c.dashboard.admin_token_file = flags.admin_token_file.or(file.admin_token_file);
    c.dashboard.reader_token_file = flags.reader_token_file.or(file.reader_token_file);
    if let Some(d) = file.dashboard {
        if let Some(v) = d.sample_interval {
            let i = parse_duration("dashboard.sampleInterval", &v)?;
            if i < Duration::from_millis(100) {
                return Err(invalid(
                    "dashboard.sampleInterval",
                    "must be at least 100ms",
                ));
            }
            c.dashboard.sample_interval = i;
        }
        if let Some(v) = d.tail_max_events_per_second {
            if v == 0 {
                return Err(invalid(
                    "dashboard.tailMaxEventsPerSecond",
                    "must be at least 1",
                ));
            }
            c.dashboard.tail_max_events_per_second = v;
        }
        if let Some(v) = d.agent_missed_after {
            c.dashboard.agent_missed_after = parse_duration("dashboard.agentMissedAfter", &v)?;
        }
    }
    c.backup = resolve_backup(flags.backup_dir, file.backup, &c.data_dir)?;
    c.export_nats = file
        .export
        .and_then(|e| e.nats)
        .map(resolve_nats_export)
        .transpose()?;
    c.sharding = resolve_sharding(file.sharding, flags.shard_index, flags.shard_map)?;
    c.detection = resolve_detection(flags.rules_dir, file.detection)?;
    c.alerting = resolve_alerting(file.alerting)?;
    if let Some(v) = file.log_format
        && v != "text"
        && v != "json"
    {
        return Err(invalid("logFormat", format!("{v:?} is not text or json")));
    }
    Ok(c)
}

fn resolve_detection(
    flag_dir: Option<PathBuf>,
    file: Option<DetectionFile>,
) -> Result<Option<DetectionConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let Some(rules_dir) = flag_dir.or(file.rules_dir) else {
        if file.reload_interval.is_some()
            || file.rule_budget.is_some()
            || file.checkpoint_interval.is_some()
        {
            return Err(invalid(
                "detection.rulesDir",
                "required when the detection section is given (or flag --rules-dir)",
            ));
        }
        return Ok(None);
    };
    let reload_interval = match file.reload_interval {
        Some(v) => parse_duration("detection.reloadInterval", &v)?,
        None => Duration::from_secs(2),
    };
    if reload_interval < Duration::from_millis(50) {
        return Err(invalid("detection.reloadInterval", "must be at least 50ms"));
    }
    let rule_budget = match file.rule_budget {
        Some(v) => parse_duration("detection.ruleBudget", &v)?,
        None => Duration::from_micros(50),
    };
    let checkpoint_interval = match file.checkpoint_interval {
        Some(v) => parse_duration("detection.checkpointInterval", &v)?,
        None => Duration::from_secs(1),
    };
    if checkpoint_interval.is_zero() {
        return Err(invalid(
            "detection.checkpointInterval",
            "must be longer than 0s",
        ));
    }
    Ok(Some(DetectionConfig {
        rules_dir,
        reload_interval,
        rule_budget,
        checkpoint_interval,
    }))
}

fn resolve_backup(
    flag_dir: Option<PathBuf>,
    file: Option<BackupFile>,
    data_dir: &Path,
) -> Result<Option<BackupConfig>, ConfigError> {
    let file = file.unwrap_or_default();
    let Some(dir) = flag_dir.or(file.dir) else {
        if file.interval.is_some() || file.keep.is_some() {
            return Err(invalid(
                "backup.dir",
                "required when backup.interval or backup.keep is set",
            ));
        }
        return Ok(None);
    };
    // Inside the data dir a backup would be lost with the store it guards,
    // and RocksDB would find foreign files among its own.
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    if abs(&dir).starts_with(abs(data_dir)) {
        return Err(invalid(
            "backup.dir",
            format!("{} is inside dataDir {}", dir.display(), data_dir.display()),
        ));
    }
    let interval = match file.interval {
        None => Some(DEFAULT_BACKUP_INTERVAL),
        Some(v) => {
            let d = parse_duration("backup.interval", &v)?;
            if d.is_zero() {
                None
            } else if d < Duration::from_secs(1) {
                return Err(invalid(
                    "backup.interval",
                    "must be at least 1s (or 0 for on demand only)",
                ));
            } else {
                Some(d)
            }
        }
    };
    let keep = file.keep.unwrap_or(DEFAULT_BACKUP_KEEP);
    if keep == 0 {
        return Err(invalid("backup.keep", "must be at least 1"));
    }
    Ok(Some(BackupConfig {
        dir,
        interval,
        keep,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BusOverrides {
        BusOverrides {
            data_dir: Some("/d".into()),
            tls_dir: Some("/t".into()),
            ..Default::default()
        }
    }

    #[test]
    fn flags_override_file() {
        let file: BusConfigFile =
            serde_saphyr::from_str("sync: never\nretention: 1h\nlisten: 127.0.0.1:1\n").unwrap();
        let mut flags = base();
        flags.sync = Some("always".into());
        let c = resolve(file, flags).unwrap();
        assert_eq!(c.sync, SyncPolicy::Always);
        assert_eq!(c.retention, Duration::from_secs(3600));
        assert_eq!(c.listen.port(), 1);
    }

    #[test]
    fn the_nats_export_section_is_checked_key_by_key() {
        let parse = |yaml: &str| resolve(serde_saphyr::from_str(yaml).unwrap(), base());
        let c = parse("export:\n  nats:\n    url: tls://n:4222\n    stream: EVENTS\n")
            .unwrap()
            .export_nats
            .unwrap();
        assert_eq!(
            (c.subject_prefix.as_str(), c.format, c.max_in_flight),
            ("amoskys", ExportFormat::Protobuf, DEFAULT_EXPORT_IN_FLIGHT)
        );
        assert!(parse("").unwrap().export_nats.is_none());
        for (yaml, key) in [
            ("export:\n  nats:\n    stream: S\n", "export.nats.url:"),
            ("export:\n  nats:\n    url: n\n", "export.nats.stream:"),
            (
                "export:\n  nats:\n    url: n\n    stream: a.b\n",
                "export.nats.stream:",
            ),
            (
                "export:\n  nats:\n    url: n\n    stream: S\n    subjectPrefix: a.>\n",
                "export.nats.subjectPrefix:",
            ),
            (
                "export:\n  nats:\n    url: n\n    stream: S\n    format: xml\n",
                "export.nats.format:",
            ),
            (
                "export:\n  nats:\n    url: n\n    stream: S\n    maxInFlight: 0\n",
                "export.nats.maxInFlight:",
            ),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.to_string().starts_with(key), "{yaml}: {e}");
        }
        let typo = serde_saphyr::from_str::<BusConfigFile>("export:\n  nats:\n    urls: n\n");
        assert!(typo.unwrap_err().to_string().contains("urls"));
    }

    #[test]
    fn the_alerting_section_is_checked_key_by_key() {
        let parse = |yaml: &str| resolve(serde_saphyr::from_str(yaml).unwrap(), base());
        let c = parse(
            "alerting:\n  externalUrl: https://dash.example/\n  alertmanager:\n    url: http://am:9093\n  webhook:\n    url: https://hook.example/x\n    maxBatch: 5\n    timeout: 2s\n",
        )
        .unwrap()
        .alerting;
        assert_eq!(c.external_url.as_deref(), Some("https://dash.example"));
        assert_eq!(c.sinks.len(), 2);
        assert_eq!(
            (c.sinks[0].kind, c.sinks[0].max_batch, c.sinks[0].timeout),
            (SinkKind::Alertmanager, 64, Duration::from_secs(10))
        );
        assert_eq!(c.sinks[0].resolve_after, Duration::from_secs(3600));
        assert_eq!(
            (c.sinks[1].kind, c.sinks[1].max_batch, c.sinks[1].timeout),
            (SinkKind::Webhook, 5, Duration::from_secs(2))
        );
        assert!(parse("").unwrap().alerting.sinks.is_empty());
        for (yaml, key) in [
            (
                "alerting:\n  alertmanager: {}\n",
                "alerting.alertmanager.url:",
            ),
            (
                "alerting:\n  webhook:\n    url: ftp://x\n",
                "alerting.webhook.url:",
            ),
            (
                "alerting:\n  webhook:\n    url: http://x\n    maxBatch: 0\n",
                "alerting.webhook.maxBatch:",
            ),
            (
                "alerting:\n  alertmanager:\n    url: http://x\n    timeout: 0s\n",
                "alerting.alertmanager.timeout:",
            ),
            (
                "alerting:\n  alertmanager:\n    url: http://x\n    resolveAfter: soon\n",
                "alerting.alertmanager.resolveAfter:",
            ),
            ("alerting:\n  externalUrl: dash\n", "alerting.externalUrl:"),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.to_string().starts_with(key), "{yaml}: {e}");
        }
    }

    #[test]
    fn the_detection_section_is_checked_key_by_key() {
        let parse = |yaml: &str| resolve(serde_saphyr::from_str(yaml).unwrap(), base());
        let c = parse("detection:\n  rulesDir: /r\n")
            .unwrap()
            .detection
            .unwrap();
        assert_eq!(
            (c.rules_dir, c.reload_interval, c.rule_budget),
            (
                PathBuf::from("/r"),
                Duration::from_secs(2),
                Duration::from_micros(50)
            )
        );
        assert!(parse("").unwrap().detection.is_none());
        for (yaml, key) in [
            ("detection:\n  reloadInterval: 1s\n", "detection.rulesDir:"),
            (
                "detection:\n  rulesDir: /r\n  reloadInterval: 1ms\n",
                "detection.reloadInterval:",
            ),
            (
                "detection:\n  rulesDir: /r\n  ruleBudget: lots\n",
                "detection.ruleBudget:",
            ),
            (
                "detection:\n  rulesDir: /r\n  checkpointInterval: 0s\n",
                "detection.checkpointInterval:",
            ),
        ] {
            let e = parse(yaml).unwrap_err();
            assert!(e.to_string().starts_with(key), "{yaml}: {e}");
        }
        let flag = resolve(
            BusConfigFile::default(),
            BusOverrides {
                rules_dir: Some("/f".into()),
                ..base()
            },
        )
        .unwrap();
        assert_eq!(flag.detection.unwrap().rules_dir, PathBuf::from("/f"));
    }

    #[test]
    fn errors_name_the_key() {
        let bad = serde_saphyr::from_str::<BusConfigFile>("retension: 1h\n").unwrap_err();
        assert!(bad.to_string().contains("retension"), "{bad}");
        let e = resolve(
            BusConfigFile {
                sync: Some("sometimes".into()),
                ..Default::default()
            },
            base(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("sync:"), "{e}");
        let e = resolve(
            BusConfigFile {
                retention: Some("forever".into()),
                ..Default::default()
            },
            base(),
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("retention:"), "{e}");
        let e = resolve(BusConfigFile::default(), BusOverrides::default()).unwrap_err();
        assert!(e.to_string().starts_with("dataDir:"), "{e}");
        let file: BusConfigFile =
            serde_saphyr::from_str("dashboard:\n  sampleInterval: 1ms\n").unwrap();
        let e = resolve(file, base()).unwrap_err();
        assert!(
            e.to_string().starts_with("dashboard.sampleInterval:"),
            "{e}"
        );
        let bad =
            serde_saphyr::from_str::<BusConfigFile>("dashboard:\n  colour: red\n").unwrap_err();
        assert!(bad.to_string().contains("colour"), "{bad}");
    }

    #[test]
    fn backup_section() {
        let file = |y: &str| serde_saphyr::from_str::<BusConfigFile>(y).unwrap();
        assert_eq!(
            resolve(BusConfigFile::default(), base()).unwrap().backup,
            None
        );
        let c = resolve(file("backup:\n  dir: /b\n"), base()).unwrap();
        assert_eq!(
            c.backup,
            Some(BackupConfig {
                dir: "/b".into(),
                interval: Some(DEFAULT_BACKUP_INTERVAL),
                keep: DEFAULT_BACKUP_KEEP,
            })
        );
        let mut flags = base();
        flags.backup_dir = Some("/flag".into());
        let c = resolve(
            file("backup:\n  dir: /b\n  interval: 0s\n  keep: 2\n"),
            flags,
        )
        .unwrap();
        let b = c.backup.unwrap();
        assert_eq!((b.dir, b.interval, b.keep), ("/flag".into(), None, 2));

        for (yaml, key) in [
            ("backup:\n  keep: 3\n", "backup.dir:"),
            ("backup:\n  dir: /d/backup\n", "backup.dir:"),
            ("backup:\n  dir: /b\n  keep: 0\n", "backup.keep:"),
            ("backup:\n  dir: /b\n  interval: 10ms\n", "backup.interval:"),
            (
                "backup:\n  dir: /b\n  interval: daily\n",
                "backup.interval:",
            ),
        ] {
            let e = resolve(file(yaml), base()).unwrap_err().to_string();
            assert!(e.starts_with(key), "{yaml:?}: {e}");
        }
    }

    #[test]
    fn the_sharding_section_takes_a_map_inline_or_from_a_file_and_checks_the_index() {
        let file = |y: &str| serde_saphyr::from_str::<BusConfigFile>(y).unwrap();
        let c = resolve(BusConfigFile::default(), base()).unwrap().sharding;
        assert_eq!(c, ShardingConfig::default());
        let three = "sharding:\n  index: 2\n  peerTlsDir: /p\n  map:\n    epoch: 4\n    active: 3\n    peers: [\"https://a:1\", \"https://b:1\", \"https://c:1\"]\n";
        let c = resolve(file(three), base()).unwrap().sharding;
        assert_eq!((c.index, c.map.epoch, c.map.active), (2, 4, 3));
        let mut flags = base();
        flags.shard_index = Some(1);
        assert_eq!(resolve(file(three), flags).unwrap().sharding.index, 1);

        let tmp = tempfile::tempdir().unwrap();
        let map = tmp.path().join("map.yaml");
        std::fs::write(
            &map,
            "epoch: 9\nactive: 2\npeers: [\"https://a:1\", \"https://b:1\"]\n",
        )
        .unwrap();
        let mut flags = base();
        flags.shard_map = Some(map.clone());
        flags.shard_index = Some(1);
        let c = resolve(file("sharding:\n  peerTlsDir: /p\n"), flags)
            .unwrap()
            .sharding;
        assert_eq!(c.map_file.as_deref(), Some(map.as_path()));
        assert_eq!(load_shard_map(&c).unwrap().epoch, 9);
        let c3 = ShardingConfig {
            index: 2,
            ..c.clone()
        };
        let e = load_shard_map(&c3).unwrap_err().to_string();
        assert!(e.starts_with("sharding.index: 2"), "{e}");
        std::fs::write(&map, "epoch: 9\nactive: 0\n").unwrap();
        let e = load_shard_map(&c).unwrap_err().to_string();
        assert!(e.contains("map.yaml") && e.contains("active: 0"), "{e}");

        for (yaml, key) in [
            (three.replace("index: 2", "index: 3"), "sharding.index:"),
            (
                three.replace("  peerTlsDir: /p\n", ""),
                "sharding.peerTlsDir:",
            ),
            (three.replace("active: 3", "active: 4"), "sharding.map:"),
            (
                format!("{three}  peerTimeout: 0s\n"),
                "sharding.peerTimeout:",
            ),
            (
                format!("{three}  mapReloadInterval: 1ms\n"),
                "sharding.mapReloadInterval:",
            ),
            (format!("{three}  mapFile: /m\n"), "sharding.map:"),
        ] {
            let e = resolve(file(&yaml), base()).unwrap_err().to_string();
            assert!(e.starts_with(key), "{yaml:?}: {e}");
        }
    }
}
