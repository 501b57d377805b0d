//! The flow collector's settings (`collectors.flow`) and their checks.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, invalid, parse_duration};

/// `collectors.flow` as written.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct FlowSpec {
    /// Off unless set (capturing needs CAP_NET_RAW).
    pub enabled: bool,
    /// The interface captured (`any`).
    pub interface: String,
    /// A BPF filter in tcpdump's syntax; empty captures everything.
    pub bpf_filter: String,
    /// Read this capture file instead of a live interface.
    pub pcap_file: String,
    /// A flow with no packet for this long is exported and closed (`15s`).
    pub idle_timeout: String,
    /// A long flow is exported at least this often (`60s`).
    pub active_timeout: String,
    /// Flows tracked at once; past it the oldest is evicted (65536).
    pub max_flows: usize,
    /// Bytes captured per packet: headers only (128).
    pub snaplen: i32,
    /// Find the process on this host behind each TCP and UDP flow (`true`).
    pub owners: bool,
    /// New flows wait at most this long to be attributed together (`250ms`).
    pub owner_interval: String,
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
            owners: true,
            owner_interval: "250ms".into(),
        }
    }
}

/// `collectors.flow` checked.
#[derive(Debug, Clone)]
pub struct FlowConfig {
    /// The interface captured.
    pub interface: String,
    /// The BPF filter; empty for none.
    pub bpf_filter: String,
    /// A capture file read instead of the interface.
    pub pcap_file: Option<PathBuf>,
    /// When an idle flow is exported.
    pub idle_timeout: Duration,
    /// How often a long flow is exported.
    pub active_timeout: Duration,
    /// Flows tracked at once.
    pub max_flows: usize,
    /// Bytes captured per packet.
    pub snaplen: i32,
    /// How often new flows are attributed to processes; `None` when off.
    pub owner_interval: Option<Duration>,
}

impl FlowSpec {
    /// Checks every key; `None` when the collector is off.
    pub fn resolve(&self, pcap_override: Option<&str>) -> Result<Option<FlowConfig>, ConfigError> {
        Ok(if self.enabled || pcap_override.is_some() {
            let f = self;
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
                owner_interval: if f.owners {
                    Some(parse_duration(
                        "collectors.flow.ownerInterval",
                        &f.owner_interval,
                    )?)
                } else {
                    None
                },
            })
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::config_error as err;

    #[test]
    fn bad_values_name_their_key() {
        let e = err("collectors:\n  flow:\n    enabled: true\n    idleTimeout: soon\n");
        assert!(e.contains("collectors.flow.idleTimeout"), "{e}");
        let e = err("collectors:\n  flow:\n    enabled: true\n    ownerInterval: 0s\n");
        assert!(e.contains("collectors.flow.ownerInterval"), "{e}");
    }
}
