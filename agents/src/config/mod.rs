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

pub(crate) mod value;

pub use crate::collectors::flow::config::{FlowConfig, FlowSpec};
pub use crate::collectors::inventory::config::{
    DiscoveryConfig, DiscoverySpec, InventoryConfig, InventorySpec,
};
pub use crate::collectors::process::config::{ProcessConfig, ProcessMode, ProcessSpec};
pub use crate::collectors::snmp::config::{
    SnmpConfig, SnmpCredentials, SnmpSpec, SnmpTarget, SnmpTargetConfig, SnmpVersion,
};
pub use crate::collectors::synthetic::SyntheticSpec;
use value::invalid;
pub use value::{ConfigError, Secrets, parse_bytes, parse_duration};

/// The file as written. Durations ("15s", "1m") and sizes ("256MiB") are
/// strings, checked in [`resolve`].
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct AgentConfigFile {
    /// `agentId`: the agent's stable id (default: the node name).
    pub agent_id: Option<String>,
    /// `node`: the node name (default: `$NODE_NAME`, then the hostname).
    pub node: Option<String>,
    /// `bus`: the bus URL, `https://host:port`.
    pub bus: Option<String>,
    /// `busServerName`: the name the bus's certificate must carry, when it
    /// differs from the URL's host.
    pub bus_server_name: Option<String>,
    /// `tlsDir`: the directory with `tls.crt`, `tls.key` and `ca.crt`.
    pub tls_dir: Option<PathBuf>,
    /// `spoolDir`: where unacked events wait.
    pub spool_dir: Option<PathBuf>,
    /// `http`: the address for `/metrics` and `/healthz` (`off` for none).
    pub http: Option<String>,
    /// `spool:` the spool's limits.
    pub spool: SpoolFile,
    /// `batch:` how events are batched to the bus.
    pub batch: BatchFile,
    /// `heartbeatInterval`: how often a heartbeat event is sent (`10s`).
    pub heartbeat_interval: Option<String>,
    /// `shutdownGrace`: how long a stopping agent waits for acks (`5s`).
    pub shutdown_grace: Option<String>,
    /// `tlsReloadInterval`: how often the TLS files are checked (`2s`).
    pub tls_reload_interval: Option<String>,
    /// `kubernetes:` what the agent learns from the Kubernetes API.
    pub kubernetes: KubernetesFile,
    /// `collectors:` one section per collector.
    pub collectors: Collectors,
}

/// `kubernetes:` in the file.
#[derive(Debug, Default, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct KubernetesFile {
    /// `pods`: watch this node's pods (in-cluster credentials, `get`,
    /// `list` and `watch` on pods) and add namespace, pod, labels, service
    /// account, container and image to process and flow events (false).
    pub pods: bool,
}

/// `spool:` in the file.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SpoolFile {
    /// `maxBytes`: the spool's cap (`256MiB`); past it the oldest events
    /// are dropped and reported as a gap.
    pub max_bytes: Option<String>,
}

/// `batch:` in the file.
#[derive(Debug, Default, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct BatchFile {
    /// `maxEvents`: events per batch, 1..65536 (512).
    pub max_events: Option<usize>,
    /// `maxDelay`: how long a partial batch waits for more (`100ms`).
    pub max_delay: Option<String>,
    /// `window`: batches in flight per connection, 1..1024 (32).
    pub window: Option<usize>,
}

/// `AgentSet.spec.collectors`: one optional section per collector. A section
/// that is absent takes its defaults (process and inventory on, the rest off).
#[derive(Debug, Default, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct Collectors {
    /// Process starts and exits.
    pub process: ProcessSpec,
    /// Network flows captured with libpcap.
    pub flow: FlowSpec,
    /// SNMP polls of network devices.
    pub snmp: SnmpSpec,
    /// Host and device inventory.
    pub inventory: InventorySpec,
    /// Synthetic load, for benchmarks and tests.
    pub synthetic: SyntheticSpec,
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
    /// The bus to stream to (https://host:port).
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
    /// The agent's stable id: its events' `agent_id`.
    pub agent_id: String,
    /// The node the agent runs on.
    pub node: String,
    /// The bus URL.
    pub bus: String,
    /// The name the bus's certificate must carry, if not the URL's host.
    pub bus_server_name: Option<String>,
    /// The directory with the agent's certificate, key and CA.
    pub tls_dir: PathBuf,
    /// Where unacked events wait.
    pub spool_dir: PathBuf,
    /// The address for `/metrics` and `/healthz`, if served.
    pub http: Option<SocketAddr>,
    /// The spool's cap in bytes.
    pub spool_max_bytes: u64,
    /// Events per batch.
    pub batch_max_events: usize,
    /// How long a partial batch waits for more.
    pub batch_max_delay: Duration,
    /// Batches in flight (sent, not yet acked) per connection.
    pub window: usize,
    /// How often a heartbeat event is sent.
    pub heartbeat_interval: Duration,
    /// How long a stopping agent waits for acks.
    pub shutdown_grace: Duration,
    /// How often the TLS files are checked for a change.
    pub tls_reload_interval: Duration,
    /// Whether this node's pods are watched to give events their identity.
    pub watch_pods: bool,
    /// The collectors that run, each checked.
    pub collectors: ResolvedCollectors,
}

/// The collectors' sections after checking; `None` for one that is off.
#[derive(Debug, Clone)]
pub struct ResolvedCollectors {
    /// The process collector's settings.
    pub process: Option<ProcessConfig>,
    /// The flow collector's settings.
    pub flow: Option<FlowConfig>,
    /// The SNMP collector's settings, credentials read.
    pub snmp: Option<SnmpConfig>,
    /// The inventory collector's settings.
    pub inventory: Option<InventoryConfig>,
    /// The synthetic collector's settings.
    pub synthetic: Option<SyntheticSpec>,
}

/// Reads and parses the config file at `path`; the error names the file.
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

/// Checks every collector's section, reading credential files.
pub fn resolve_collectors(
    c: &Collectors,
    pcap_override: Option<&str>,
) -> Result<ResolvedCollectors, ConfigError> {
    resolve_collectors_with(c, pcap_override, Secrets::Read)
}

/// Checks every collector's section; `secrets` says whether credential
/// files are read or only checked to be named (the operator's case).
pub fn resolve_collectors_with(
    c: &Collectors,
    pcap_override: Option<&str>,
    secrets: Secrets,
) -> Result<ResolvedCollectors, ConfigError> {
    Ok(ResolvedCollectors {
        process: c.process.resolve()?,
        flow: c.flow.resolve(pcap_override)?,
        snmp: c.snmp.resolve(secrets)?,
        inventory: c.inventory.resolve()?,
        synthetic: c.synthetic.resolve()?,
    })
}

/// This host's name, or `localhost` when it has none.
pub fn hostname() -> String {
    sysinfo::System::host_name().unwrap_or_else(|| "localhost".into())
}

/// The file with the flags over it, checked: every error names its key.
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
        watch_pods: file.kubernetes.pods,
    })
}

/// The error a config file gets, from parsing or resolving: what the
/// collectors' config tests check their messages against.
#[cfg(test)]
pub(crate) fn config_error(yaml: &str) -> String {
    match parse_config(yaml) {
        Err(e) => e,
        Ok(f) => match resolve(f, test_flags()) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected an error for {yaml}"),
        },
    }
}

/// The directories a config needs from flags, as the tests give them.
#[cfg(test)]
fn test_flags() -> AgentOverrides {
    AgentOverrides {
        tls_dir: Some("/tls".into()),
        spool_dir: Some("/spool".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::config_error as err;
    use super::test_flags as base;

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
    fn bad_spool_values_name_their_key() {
        let e = err("spool:\n  maxBytes: lots\n");
        assert!(e.contains("spool.maxBytes"), "{e}");
    }
}
