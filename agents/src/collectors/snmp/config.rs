//! The SNMP collector's settings (`collectors.snmp`), their checks and the
//! credentials read from their files.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, Secrets, invalid, parse_duration};

/// `collectors.snmp` as written.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SnmpSpec {
    /// Off unless set.
    pub enabled: bool,
    /// How often each target is polled (`30s`).
    pub interval: String,
    /// How long one request waits for its answer (`2s`).
    pub timeout: String,
    /// Requests retried after a timeout (1).
    pub retries: u32,
    /// The devices to poll.
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

/// The SNMP version a target speaks: `v2c` (a community) or `v3` (a user
/// with authentication and, optionally, privacy).
#[derive(
    Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SnmpVersion {
    /// SNMPv2c.
    #[default]
    V2c,
    /// SNMPv3.
    V3,
}

/// One device. Secrets are files (a mounted Kubernetes Secret), never inline.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SnmpTarget {
    /// The name its events carry (default: the address).
    pub name: String,
    /// host:port (port defaults to 161).
    pub address: String,
    /// `v2c` (default) or `v3`.
    pub version: SnmpVersion,
    /// v2c: the file holding the community.
    pub community_file: Option<PathBuf>,
    /// v3: the user name.
    pub user: String,
    /// md5, sha1, sha224, sha256, sha384, sha512.
    pub auth_protocol: String,
    /// v3: the file holding the authentication password.
    pub auth_password_file: Option<PathBuf>,
    /// des, aes128, aes192, aes256; empty for authNoPriv.
    pub priv_protocol: String,
    /// v3 with privacy: the file holding the privacy password.
    pub priv_password_file: Option<PathBuf>,
}

/// `collectors.snmp` checked, credentials read.
#[derive(Debug, Clone)]
pub struct SnmpConfig {
    /// How often each target is polled.
    pub interval: Duration,
    /// How long one request waits.
    pub timeout: Duration,
    /// Retries after a timeout.
    pub retries: u32,
    /// The devices, each resolved.
    pub targets: Vec<SnmpTargetConfig>,
}

/// One device, ready to poll. Its `Debug` never prints the credentials.
#[derive(Clone)]
pub struct SnmpTargetConfig {
    /// The name its events carry.
    pub name: String,
    /// host:port.
    pub address: String,
    /// How requests authenticate.
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

/// A target's credentials, as read from their files.
#[derive(Clone)]
pub enum SnmpCredentials {
    /// SNMPv2c.
    V2c {
        /// The community string.
        community: Vec<u8>,
    },
    /// SNMPv3 (authNoPriv or authPriv).
    V3 {
        /// The user name.
        user: String,
        /// The authentication hash.
        auth_protocol: snmp2::v3::AuthProtocol,
        /// The authentication password.
        auth_password: Vec<u8>,
        /// The privacy cipher and password; None for authNoPriv.
        privacy: Option<(snmp2::v3::Cipher, Vec<u8>)>,
    },
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

impl SnmpSpec {
    /// Checks every key; `None` when the collector is off.
    pub fn resolve(&self, secrets: Secrets) -> Result<Option<SnmpConfig>, ConfigError> {
        Ok(if self.enabled {
            let s = self;
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn unreadable_credentials_file_is_named() {
        let e = crate::config::config_error(
            "collectors:\n  snmp:\n    enabled: true\n    targets:\n    - address: 127.0.0.1\n      communityFile: /nonexistent/community\n",
        );
        assert!(
            e.contains("collectors.snmp.targets[0].communityFile"),
            "{e}"
        );
        assert!(e.contains("/nonexistent/community"), "{e}");
    }
}
