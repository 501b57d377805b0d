//! The process collector's settings (`collectors.process`) and their checks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, parse_duration};

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

#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub mode: ProcessMode,
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
