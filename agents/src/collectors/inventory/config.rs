//! The inventory collector's settings (`collectors.inventory`, with network
//! discovery) and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, invalid, parse_duration};

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

impl InventorySpec {
    /// Checks every key; `None` when the collector is off.
    pub fn resolve(&self) -> Result<Option<InventoryConfig>, ConfigError> {
        Ok(if self.enabled {
            let i = self;
            let discovery = if i.discovery.enabled {
                let d = &i.discovery;
                let mut networks = Vec::new();
                let mut hosts: u64 = 0;
                for (n, cidr) in d.cidrs.iter().enumerate() {
                    let key = format!("collectors.inventory.discovery.cidrs[{n}]");
                    let net: ipnet::IpNet = cidr
                        .parse()
                        .map_err(|e| invalid(&key, format!("{cidr:?} is not a CIDR: {e}")))?;
                    hosts = hosts
                        .saturating_add(crate::collectors::inventory::discovery::host_count(&net));
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
                    interval: parse_duration(
                        "collectors.inventory.discovery.interval",
                        &d.interval,
                    )?,
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
        })
    }
}
