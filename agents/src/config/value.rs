//! What every part of the agent's config shares: the error naming a key,
//! durations and sizes as the file writes them, and whether credential files
//! are read.

use std::path::PathBuf;
use std::time::Duration;

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong, with the line where the parser knows it.
        message: String,
    },
    /// A value is not allowed.
    #[error("{key}: {message}")]
    Invalid {
        /// The key's path in the file, e.g. `collectors.flow.idleTimeout`.
        key: String,
        /// What is wrong with its value.
        message: String,
    },
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// A duration as the file writes it (`15s`, `1m`), greater than zero; an
/// error names `key`.
pub fn parse_duration(key: &str, s: &str) -> Result<Duration, ConfigError> {
    let d = amoskys_client::parse::duration(s).map_err(|m| invalid(key, m))?;
    if d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

/// A size as the file writes it (`256MiB`, `64KiB`); an error names `key`.
pub fn parse_bytes(key: &str, s: &str) -> Result<u64, ConfigError> {
    amoskys_client::parse::bytes(s).map_err(|m| invalid(key, m))
}

/// Whether resolving reads the credential files or only checks they are named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    /// Read each credential file (an agent starting).
    Read,
    /// For checking a config where the files exist elsewhere (the
    /// operator validates an AgentSet whose Secrets are mounted only in pods).
    NamedOnly,
}
