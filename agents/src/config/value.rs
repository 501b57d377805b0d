//! What every part of the agent's config shares: the error naming a key,
//! durations and sizes as the file writes them, and whether credential files
//! are read.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let d = amoskys_client::parse::duration(s).map_err(|m| invalid(key, m))?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

pub fn parse_bytes(key: &str, s: &str) -> Result<u64, ConfigError> {
    amoskys_client::parse::bytes(s).map_err(|m| invalid(key, m))
}

/// Whether resolving reads the credential files or only checks they are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    Read,
    /// For checking a config where the files exist elsewhere (the
    /// operator validates an AgentSet whose Secrets are mounted only in pods).
    NamedOnly,
}
