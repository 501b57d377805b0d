//! Agent configuration: a YAML file overridden by flags.
//!
//! The `collectors:` section has exactly the shape of `AgentSet.spec.collectors`
//! so the operator renders it straight into a ConfigMap. Every key is checked
//! when loaded: an unknown key, a bad value or an unreadable credentials file
//! is an error naming the key, and nothing starts half-configured.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The file as written. Durations ("15s", "1m") and sizes ("256MiB") are
/// strings, checked in [`resolve`].
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AgentConfigFile {
    pub agent_id: Option<String>,
    pub node: Option<String>,
    pub bus: Option<String>,
    pub bus_server_name: Option<String>,
    pub tls_dir: Option<PathBuf>,
    pub spool_dir: Option<PathBuf>,
    pub http: Option<String>,
    pub spool: SpoolFile,
    pub batch: BatchFile,
    pub heartbeat_interval: Option<String>,
    pub shutdown_grace: Option<String>,
    pub tls_reload_interval: Option<String>,
    pub collectors: Collectors,
}

#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SpoolFile {
    pub max_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BatchFile {
    pub max_events: Option<usize>,
    pub max_delay: Option<String>,
    pub window: Option<usize>,
}

/// `AgentSet.spec.collectors`: one optional section per collector. A section
/// that is absent takes its defaults (process and inventory on, the rest off).
#[derive(Debug, Default, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Collectors {
    pub process: ProcessSpec,
    pub flow: FlowSpec,
    pub snmp: SnmpSpec,
    pub inventory: InventorySpec,
    pub synthetic: SyntheticSpec,
}

#[derive(
    Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ProcessMode {
    /// The kernel's process-events connector when permitted, else polling.
    #[default]
    Auto,
    Netlink,
    Poll,
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProcessSpec {
    pub enabled: bool,
    pub mode: ProcessMode,
    /// How often the polling path scans /proc.
    pub poll_interval: String,
}

impl Default for ProcessSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: ProcessMode::Auto,
            poll_interval: "1s".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FlowSpec {
    pub enabled: bool,
    pub interface: String,
    pub bpf_filter: String,
    /// Read this capture file instead of a live interface.
    pub pcap_file: String,
    pub idle_timeout: String,
    pub active_timeout: String,
    pub max_flows: usize,
    pub snaplen: i32,
}

impl Default for FlowSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interface: "any".into(),
            bpf_filter: String::new(),
            pcap_file: String::new(),
            idle_timeout: "15s".into(),
            active_timeout: "60s".into(),
            max_flows: 65_536,
            snaplen: 128,
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SnmpSpec {
    pub enabled: bool,
    pub interval: String,
    pub timeout: String,
    pub retries: u32,
    pub targets: Vec<SnmpTarget>,
}

impl Default for SnmpSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: "30s".into(),
            timeout: "2s".into(),
            retries: 1,
            targets: Vec::new(),
        }
    }
}

#[derive(
    Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SnmpVersion {
    #[default]
    V2c,
    V3,
}

/// One device. Secrets are files (a mounted Kubernetes Secret), never inline.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SnmpTarget {
    pub name: String,
    /// host:port (port defaults to 161).
    pub address: String,
    pub version: SnmpVersion,
    pub community_file: Option<PathBuf>,
    pub user: String,
    /// md5, sha1, sha224, sha256, sha384, sha512.
    pub auth_protocol: String,
    pub auth_password_file: Option<PathBuf>,
    /// des, aes128, aes192, aes256; empty for authNoPriv.
    pub priv_protocol: String,
    pub priv_password_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct InventorySpec {
    pub enabled: bool,
    pub interval: String,
    pub discovery: DiscoverySpec,
}

impl Default for InventorySpec {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: "60s".into(),
            discovery: DiscoverySpec::default(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DiscoverySpec {
    pub enabled: bool,
    pub cidrs: Vec<String>,
    pub ports: Vec<u16>,
    pub probes_per_second: u32,
    pub max_hosts: u64,
    pub connect_timeout: String,
    pub interval: String,
}

impl Default for DiscoverySpec {
    fn default() -> Self {
        Self {
            enabled: false,
            cidrs: Vec::new(),
            ports: vec![22, 80, 443],
            probes_per_second: 50,
            max_hosts: 1024,
            connect_timeout: "500ms".into(),
            interval: "10m".into(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SyntheticSpec {
    pub enabled: bool,
    /// Events per second.
    pub rate: u64,
    pub event_bytes: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            rate: 10,
            event_bytes: 200,
        }
    }
}

/// Flag values; each one set wins over the file. The `amoskys agent` flags
/// are these fields (`#[command(flatten)]`), so a new one is written once.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AgentOverrides {
    /// Stable agent id (default: the node name).
    #[arg(long, env = "AMOSKYS_AGENT_ID")]
    pub agent_id: Option<String>,
    /// Node name (default: $NODE_NAME or the hostname).
    #[arg(long)]
    pub node: Option<String>,
    #[arg(long, env = "AMOSKYS_BUS")]
    pub bus: Option<String>,
    /// Directory with tls.crt, tls.key and ca.crt (reloaded when they change).
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Where unacked events wait (survives restarts).
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
    /// HTTP address for /metrics and /healthz.
    #[arg(long)]
    pub http: Option<String>,
    /// Read flows from this capture file instead of a live interface.
    #[arg(long)]
    pub pcap_file: Option<String>,
}

/// Checked, ready-to-run configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub agent_id: String,
    pub node: String,
    pub bus: String,
    pub bus_server_name: Option<String>,
    pub tls_dir: PathBuf,
    pub spool_dir: PathBuf,
    pub http: Option<SocketAddr>,
    pub spool_max_bytes: u64,
    pub batch_max_events: usize,
    pub batch_max_delay: Duration,
    /// Batches in flight (sent, not yet acked) per connection.
    pub window: usize,
    pub heartbeat_interval: Duration,
    pub shutdown_grace: Duration,
    pub tls_reload_interval: Duration,
    pub collectors: ResolvedCollectors,
}

#[derive(Debug, Clone)]
pub struct ResolvedCollectors {
    pub process: Option<ProcessConfig>,
    pub flow: Option<FlowConfig>,
    pub snmp: Option<SnmpConfig>,
    pub inventory: Option<InventoryConfig>,
    pub synthetic: Option<SyntheticSpec>,
}

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub mode: ProcessMode,
    pub poll_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct FlowConfig {
    pub interface: String,
    pub bpf_filter: String,
    pub pcap_file: Option<PathBuf>,
    pub idle_timeout: Duration,
    pub active_timeout: Duration,
    pub max_flows: usize,
    pub snaplen: i32,
}

#[derive(Debug, Clone)]
pub struct SnmpConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub targets: Vec<SnmpTargetConfig>,
}

#[derive(Clone)]
pub struct SnmpTargetConfig {
    pub name: String,
    pub address: String,
    pub credentials: SnmpCredentials,
}

impl std::fmt::Debug for SnmpTargetConfig {
    // Never print secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnmpTargetConfig")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
pub enum SnmpCredentials {
    V2c {
        community: Vec<u8>,
    },
    V3 {
        user: String,
        auth_protocol: snmp2::v3::AuthProtocol,
        auth_password: Vec<u8>,
        privacy: Option<(snmp2::v3::Cipher, Vec<u8>)>,
    },
}

#[derive(Debug, Clone)]
pub struct InventoryConfig {
    pub interval: Duration,
    pub discovery: Option<DiscoveryConfig>,
}

#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    pub networks: Vec<ipnet::IpNet>,
    pub ports: Vec<u16>,
    pub probes_per_second: u32,
    pub connect_timeout: Duration,
    pub interval: Duration,
}

pub fn read_config_file(path: &Path) -> Result<AgentConfigFile, ConfigError> {
    amoskys_client::parse::read_yaml(path).map_err(|e| ConfigError::File {
        path: e.path,
        message: e.message,
    })
}

/// The config file's text; empty means all defaults.
pub fn parse_config(text: &str) -> Result<AgentConfigFile, String> {
    amoskys_client::parse::parse_yaml(text)
}

pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let d = amoskys_client::parse::parse_duration("duration", s)
        .map_err(|e| invalid(key, e.message))?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

pub fn parse_bytes(key: &str, s: &str) -> Result<u64, ConfigError> {
    amoskys_client::parse::parse_bytes("size", s).map_err(|e| invalid(key, e.message))
}

/// Whether resolving reads the credential files or only checks they are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    Read,
    /// For checking a config where the files exist elsewhere (the
    /// operator validates an AgentSet whose Secrets are mounted only in pods).
    NamedOnly,
}

fn read_secret(
    key: &str,
    path: &Option<PathBuf>,
    secrets: Secrets,
) -> Result<Vec<u8>, ConfigError> {
    let Some(path) = path else {
        return Err(invalid(
            key,
            "missing (a path to a file holding the secret)",
        ));
    };
    if secrets == Secrets::NamedOnly {
        return Ok(Vec::new());
    }
    let raw = std::fs::read(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    // Mounted Secrets often end with a newline that is not part of the secret.
    let trimmed = raw.trim_ascii_end().to_vec();
    if trimmed.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(trimmed)
}

fn auth_protocol(key: &str, s: &str) -> Result<snmp2::v3::AuthProtocol, ConfigError> {
    use snmp2::v3::AuthProtocol::*;
    Ok(match s.to_ascii_lowercase().as_str() {
        "md5" => Md5,
        "sha" | "sha1" => Sha1,
        "sha224" => Sha224,
        "sha256" => Sha256,
        "sha384" => Sha384,
        "sha512" => Sha512,
        other => {
            return Err(invalid(
                key,
                format!("{other:?} is not one of md5, sha1, sha224, sha256, sha384, sha512"),
            ));
        }
    })
}

fn cipher(key: &str, s: &str) -> Result<snmp2::v3::Cipher, ConfigError> {
    use snmp2::v3::Cipher::*;
    Ok(match s.to_ascii_lowercase().as_str() {
        "des" => Des,
        "aes" | "aes128" => Aes128,
        "aes192" => Aes192,
        "aes256" => Aes256,
        other => {
            return Err(invalid(
                key,
                format!("{other:?} is not one of des, aes128, aes192, aes256"),
            ));
        }
    })
}

fn resolve_snmp_target(
    i: usize,
    t: &SnmpTarget,
    secrets: Secrets,
) -> Result<SnmpTargetConfig, ConfigError> {
    let k = |f: &str| format!("collectors.snmp.targets[{i}].{f}");
    if t.address.trim().is_empty() {
        return Err(invalid(k("address"), "missing (host or host:port)"));
    }
    // host:port and [v6]:port carry a port; a bare host or [v6] gets 161.
    let has_port = if t.address.starts_with('[') {
        t.address.contains("]:")
    } else {
        t.address.contains(':')
    };
    let address = if has_port {
        t.address.clone()
    } else {
        format!("{}:161", t.address)
    };
    let credentials = match t.version {
        SnmpVersion::V2c => SnmpCredentials::V2c {
            community: read_secret(&k("communityFile"), &t.community_file, secrets)?,
        },
        SnmpVersion::V3 => {
            if t.user.is_empty() {
                return Err(invalid(k("user"), "missing (required for version v3)"));
            }
            let auth = auth_protocol(
                &k("authProtocol"),
                if t.auth_protocol.is_empty() {
                    "sha1"
                } else {
                    &t.auth_protocol
                },
            )?;
            let auth_password =
                read_secret(&k("authPasswordFile"), &t.auth_password_file, secrets)?;
            let privacy = if t.priv_protocol.is_empty() {
                None
            } else {
                Some((
                    cipher(&k("privProtocol"), &t.priv_protocol)?,
                    read_secret(&k("privPasswordFile"), &t.priv_password_file, secrets)?,
                ))
            };
            SnmpCredentials::V3 {
                user: t.user.clone(),
                auth_protocol: auth,
                auth_password,
                privacy,
            }
        }
    };
    Ok(SnmpTargetConfig {
        name: if t.name.is_empty() {
            address.clone()
        } else {
            t.name.clone()
        },
        address,
        credentials,
    })
}

pub fn resolve_collectors(
    c: &Collectors,
    pcap_override: Option<&str>,
) -> Result<ResolvedCollectors, ConfigError> {
    resolve_collectors_with(c, pcap_override, Secrets::Read)
}

pub fn resolve_collectors_with(
    c: &Collectors,
    pcap_override: Option<&str>,
    secrets: Secrets,
) -> Result<ResolvedCollectors, ConfigError> {
    let process = if c.process.enabled {
        Some(ProcessConfig {
            mode: c.process.mode,
            poll_interval: parse_duration(
                "collectors.process.pollInterval",
                &c.process.poll_interval,
            )?,
        })
    } else {
        None
    };
    let flow = if c.flow.enabled || pcap_override.is_some() {
        let f = &c.flow;
        let pcap_file = pcap_override
            .map(str::to_string)
            .or_else(|| (!f.pcap_file.is_empty()).then(|| f.pcap_file.clone()));
        if let Some(p) = &pcap_file
            && std::fs::metadata(p).is_err()
        {
            return Err(invalid(
                "collectors.flow.pcapFile",
                format!("cannot read {p}"),
            ));
        }
        if f.max_flows == 0 {
            return Err(invalid(
                "collectors.flow.maxFlows",
                "must be greater than 0",
            ));
        }
        if !(64..=65_535).contains(&f.snaplen) {
            return Err(invalid("collectors.flow.snaplen", "must be 64..65535"));
        }
        if f.interface.is_empty() && pcap_file.is_none() {
            return Err(invalid("collectors.flow.interface", "missing"));
        }
        Some(FlowConfig {
            interface: f.interface.clone(),
            bpf_filter: f.bpf_filter.clone(),
            pcap_file: pcap_file.map(PathBuf::from),
            idle_timeout: parse_duration("collectors.flow.idleTimeout", &f.idle_timeout)?,
            active_timeout: parse_duration("collectors.flow.activeTimeout", &f.active_timeout)?,
            max_flows: f.max_flows,
            snaplen: f.snaplen,
        })
    } else {
        None
    };
    let snmp = if c.snmp.enabled {
        let s = &c.snmp;
        if s.targets.is_empty() {
            return Err(invalid(
                "collectors.snmp.targets",
                "empty: an enabled SNMP collector needs at least one target",
            ));
        }
        let targets = s
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| resolve_snmp_target(i, t, secrets))
            .collect::<Result<Vec<_>, _>>()?;
        Some(SnmpConfig {
            interval: parse_duration("collectors.snmp.interval", &s.interval)?,
            timeout: parse_duration("collectors.snmp.timeout", &s.timeout)?,
            retries: s.retries,
            targets,
        })
    } else {
        None
    };
    let inventory = if c.inventory.enabled {
        let i = &c.inventory;
        let discovery = if i.discovery.enabled {
            let d = &i.discovery;
            let mut networks = Vec::new();
            let mut hosts: u64 = 0;
            for (n, cidr) in d.cidrs.iter().enumerate() {
                let key = format!("collectors.inventory.discovery.cidrs[{n}]");
                let net: ipnet::IpNet = cidr
                    .parse()
                    .map_err(|e| invalid(&key, format!("{cidr:?} is not a CIDR: {e}")))?;
                hosts =
                    hosts.saturating_add(crate::collectors::inventory::discovery::host_count(&net));
                networks.push(net);
            }
            if networks.is_empty() {
                return Err(invalid(
                    "collectors.inventory.discovery.cidrs",
                    "empty: discovery needs at least one CIDR",
                ));
            }
            if hosts > d.max_hosts {
                return Err(invalid(
                    "collectors.inventory.discovery.cidrs",
                    format!(
                        "{hosts} addresses is more than maxHosts ({}); narrow the ranges or raise maxHosts",
                        d.max_hosts
                    ),
                ));
            }
            if d.ports.is_empty() || d.ports.contains(&0) {
                return Err(invalid(
                    "collectors.inventory.discovery.ports",
                    "needs at least one port, none of them 0",
                ));
            }
            if d.probes_per_second == 0 {
                return Err(invalid(
                    "collectors.inventory.discovery.probesPerSecond",
                    "must be greater than 0",
                ));
            }
            Some(DiscoveryConfig {
                networks,
                ports: d.ports.clone(),
                probes_per_second: d.probes_per_second,
                connect_timeout: parse_duration(
                    "collectors.inventory.discovery.connectTimeout",
                    &d.connect_timeout,
                )?,
                interval: parse_duration("collectors.inventory.discovery.interval", &d.interval)?,
            })
        } else {
            None
        };
        Some(InventoryConfig {
            interval: parse_duration("collectors.inventory.interval", &i.interval)?,
            discovery,
        })
    } else {
        None
    };
    let synthetic = if c.synthetic.enabled {
        if c.synthetic.rate == 0 {
            return Err(invalid(
                "collectors.synthetic.rate",
                "must be greater than 0",
            ));
        }
        if c.synthetic.event_bytes > 1024 * 1024 {
            return Err(invalid(
                "collectors.synthetic.eventBytes",
                "must be at most 1MiB",
            ));
        }
        Some(c.synthetic.clone())
    } else {
        None
    };
    Ok(ResolvedCollectors {
        process,
        flow,
        snmp,
        inventory,
        synthetic,
    })
}

pub fn hostname() -> String {
    sysinfo::System::host_name().unwrap_or_else(|| "localhost".into())
}

pub fn resolve(file: AgentConfigFile, flags: AgentOverrides) -> Result<AgentConfig, ConfigError> {
    let node = flags
        .node
        .or(file.node)
        .or_else(|| std::env::var("NODE_NAME").ok())
        .unwrap_or_else(hostname);
    let agent_id = flags
        .agent_id
        .or(file.agent_id)
        .unwrap_or_else(|| node.clone());
    if agent_id.is_empty() || agent_id.len() > 253 || agent_id.chars().any(char::is_control) {
        return Err(invalid("agentId", "must be 1..253 printable characters"));
    }
    let bus = flags
        .bus
        .or(file.bus)
        .unwrap_or_else(|| "https://127.0.0.1:7443".into());
    if !bus.starts_with("https://") {
        return Err(invalid("bus", format!("{bus:?} must start with https://")));
    }
    let http = match flags.http.or(file.http) {
        Some(s) if s.is_empty() || s == "off" => None,
        Some(s) => Some(
            s.parse()
                .map_err(|e| invalid("http", format!("{s:?} is not host:port: {e}")))?,
        ),
        None => None,
    };
    let spool_max_bytes = parse_bytes(
        "spool.maxBytes",
        file.spool.max_bytes.as_deref().unwrap_or("256MiB"),
    )?;
    if spool_max_bytes < 64 * 1024 {
        return Err(invalid("spool.maxBytes", "must be at least 64KiB"));
    }
    let batch_max_events = file.batch.max_events.unwrap_or(512);
    if !(1..=65_536).contains(&batch_max_events) {
        return Err(invalid("batch.maxEvents", "must be 1..65536"));
    }
    let window = file.batch.window.unwrap_or(32);
    if !(1..=1024).contains(&window) {
        return Err(invalid("batch.window", "must be 1..1024"));
    }
    Ok(AgentConfig {
        collectors: resolve_collectors(&file.collectors, flags.pcap_file.as_deref())?,
        agent_id,
        node,
        bus,
        bus_server_name: file.bus_server_name,
        tls_dir: flags
            .tls_dir
            .or(file.tls_dir)
            .ok_or_else(|| invalid("tlsDir", "missing (--tls-dir or tlsDir)"))?,
        spool_dir: flags
            .spool_dir
            .or(file.spool_dir)
            .ok_or_else(|| invalid("spoolDir", "missing (--spool-dir or spoolDir)"))?,
        http,
        spool_max_bytes,
        batch_max_events,
        batch_max_delay: parse_duration(
            "batch.maxDelay",
            file.batch.max_delay.as_deref().unwrap_or("100ms"),
        )?,
        window,
        heartbeat_interval: parse_duration(
            "heartbeatInterval",
            file.heartbeat_interval.as_deref().unwrap_or("10s"),
        )?,
        shutdown_grace: parse_duration(
            "shutdownGrace",
            file.shutdown_grace.as_deref().unwrap_or("5s"),
        )?,
        tls_reload_interval: parse_duration(
            "tlsReloadInterval",
            file.tls_reload_interval.as_deref().unwrap_or("2s"),
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AgentOverrides {
        AgentOverrides {
            tls_dir: Some("/tls".into()),
            spool_dir: Some("/spool".into()),
            ..Default::default()
        }
    }

    fn err(yaml: &str) -> String {
        match parse_config(yaml) {
            Err(e) => e,
            Ok(f) => match resolve(f, base()) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("expected an error for {yaml}"),
            },
        }
    }

    #[test]
    fn defaults_enable_process_and_inventory_only() {
        let c = resolve(parse_config("").unwrap(), base()).unwrap();
        assert!(c.collectors.process.is_some());
        assert!(c.collectors.inventory.is_some());
        assert!(c.collectors.flow.is_none());
        assert!(c.collectors.snmp.is_none());
        assert!(c.collectors.synthetic.is_none());
        assert_eq!(c.spool_max_bytes, 256 * 1024 * 1024);
    }

    #[test]
    fn unknown_collector_and_key_are_named() {
        assert!(err("collectors:\n  kernel: {}\n").contains("kernel"));
        assert!(err("collectors:\n  flow:\n    idleTimout: 5s\n").contains("idleTimout"));
        assert!(err("spool:\n  size: 1MiB\n").contains("size"));
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = err("collectors:\n  flow:\n    enabled: true\n    idleTimeout: soon\n");
        assert!(e.contains("collectors.flow.idleTimeout"), "{e}");
        let e = err("collectors:\n  process:\n    pollInterval: 0s\n");
        assert!(e.contains("collectors.process.pollInterval"), "{e}");
        let e = err("spool:\n  maxBytes: lots\n");
        assert!(e.contains("spool.maxBytes"), "{e}");
    }

    #[test]
    fn unreadable_credentials_file_is_named() {
        let e = err(
            "collectors:\n  snmp:\n    enabled: true\n    targets:\n    - address: 127.0.0.1\n      communityFile: /nonexistent/community\n",
        );
        assert!(
            e.contains("collectors.snmp.targets[0].communityFile"),
            "{e}"
        );
        assert!(e.contains("/nonexistent/community"), "{e}");
    }

    #[test]
    fn discovery_refuses_large_ranges() {
        let e = err(
            "collectors:\n  inventory:\n    discovery:\n      enabled: true\n      cidrs: [10.0.0.0/8]\n",
        );
        assert!(e.contains("maxHosts"), "{e}");
    }

    #[test]
    fn secrets_are_trimmed_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c");
        std::fs::write(&p, "s3cret\n").unwrap();
        let t = SnmpTarget {
            address: "10.0.0.1".into(),
            community_file: Some(p),
            ..Default::default()
        };
        let r = resolve_snmp_target(0, &t, Secrets::Read).unwrap();
        assert_eq!(r.address, "10.0.0.1:161");
        match &r.credentials {
            SnmpCredentials::V2c { community } => assert_eq!(community, b"s3cret"),
            _ => panic!("v2c expected"),
        }
        assert!(!format!("{r:?}").contains("s3cret"));
    }
}
