//! The process collector's settings (`collectors.process`) and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, parse_duration};

/// How the process collector sees processes start and exit.
#[derive(
    Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum ProcessMode {
    /// The kernel's process-events connector when permitted, else polling.
    #[default]
    Auto,
    /// The process-events connector only (needs CAP_NET_ADMIN).
    Netlink,
    /// Scans of /proc only.
    Poll,
}

/// `collectors.process` as written (also `AgentSet.spec.collectors.process`).
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct ProcessSpec {
    /// On unless turned off.
    pub enabled: bool,
    /// How process starts and exits are seen.
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

/// `collectors.process` checked.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// How processes are seen.
    pub mode: ProcessMode,
    /// How often the polling path scans /proc.
    pub poll_interval: Duration,
}

impl ProcessSpec {
    /// Checks every key; `None` when the collector is off.
    pub fn resolve(&self) -> Result<Option<ProcessConfig>, ConfigError> {
        Ok(if self.enabled {
            Some(ProcessConfig {
                mode: self.mode,
                poll_interval: parse_duration(
                    "collectors.process.pollInterval",
                    &self.poll_interval,
                )?,
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
        let e = err("collectors:\n  process:\n    pollInterval: 0s\n");
        assert!(e.contains("collectors.process.pollInterval"), "{e}");
    }
}
