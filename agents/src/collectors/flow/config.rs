//! The flow collector's settings (`collectors.flow`) and their checks.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, invalid, parse_duration};

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
            })
        } else {
            None
        })
    }
}
