//! The inventory collector's settings (`collectors.inventory`, with network
//! discovery) and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, invalid, parse_duration};

/// `collectors.inventory` as written (also the AgentSet's).
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct InventorySpec {
    /// On unless turned off.
    pub enabled: bool,
    /// How often host facts, listening sockets and neighbours are read again.
    pub interval: String,
    /// Probing the local networks for devices; off unless enabled.
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

/// `collectors.inventory.discovery` as written.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct DiscoverySpec {
    /// Off unless set: probing networks must be asked for.
    pub enabled: bool,
    /// The networks probed, e.g. `10.0.0.0/24`.
    pub cidrs: Vec<String>,
    /// TCP ports tried on each host.
    pub ports: Vec<u16>,
    /// The probe rate cap, connection attempts per second.
    pub probes_per_second: u32,
    /// The most hosts all `cidrs` together may hold (a guard against a /8).
    pub max_hosts: u64,
    /// How long one connection attempt waits.
    pub connect_timeout: String,
    /// How often the networks are probed again.
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

/// `collectors.inventory` checked.
#[derive(Debug, Clone)]
pub struct InventoryConfig {
    /// How often the host's inventory is taken.
    pub interval: Duration,
    /// Network discovery, when enabled.
    pub discovery: Option<DiscoveryConfig>,
}

/// `collectors.inventory.discovery` checked.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The networks probed.
    pub networks: Vec<ipnet::IpNet>,
    /// TCP ports tried on each host.
    pub ports: Vec<u16>,
    /// Connection attempts per second at most.
    pub probes_per_second: u32,
    /// How long one attempt waits.
    pub connect_timeout: Duration,
    /// How often the networks are probed again.
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

#[cfg(test)]
mod tests {
    use crate::config::config_error as err;

    #[test]
    fn discovery_refuses_large_ranges() {
        let e = err(
            "collectors:\n  inventory:\n    discovery:\n      enabled: true\n      cidrs: [10.0.0.0/8]\n",
        );
        assert!(e.contains("maxHosts"), "{e}");
    }
}
