//! What every AMOSKYS config shares (bus, agent, operator specs): YAML files
//! where empty means all defaults, sizes like `512MiB` and durations like
//! `30s`, with errors naming the file or the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// A config file that cannot be read or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config file {}: {message}", path.display())]
pub struct FileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

/// Parses a YAML config; empty text (or only comments) is all defaults.
pub fn parse_yaml<T: DeserializeOwned + Default>(text: &str) -> Result<T, String> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_saphyr::from_str(text).map_err(|e| e.to_string())
}

/// Reads and parses a YAML config file.
pub fn read_yaml<T: DeserializeOwned + Default>(path: &Path) -> Result<T, FileError> {
    let file_err = |message| FileError {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
    parse_yaml(&text).map_err(file_err)
}

/// A value that does not parse, and the key it was given for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ParseError {
    /// The key, as the file or flag names it.
    pub key: &'static str,
    /// What is wrong with the value.
    pub message: String,
}

fn invalid(key: &'static str, message: String) -> ParseError {
    ParseError { key, message }
}

/// Parses "7d", "90m", "30s" (humantime) into a duration.
pub fn parse_duration(key: &'static str, s: &str) -> Result<Duration, ParseError> {
    duration(s).map_err(|m| invalid(key, m))
}

/// Parses "512MiB", "2GB", "1048576" into bytes.
pub fn parse_bytes(key: &'static str, s: &str) -> Result<u64, ParseError> {
    bytes(s).map_err(|m| invalid(key, m))
}

/// [`parse_duration`] for callers that name the key themselves: the error
/// is the message only.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration like 30s, 15m, 7d ({e})"))
}

/// [`parse_bytes`] for callers that name the key themselves: the error is
/// the message only.
pub fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 512MiB or 2GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0f64.powi(4),
        other => return Err(format!("unknown size unit {other:?} in {s:?}")),
    };
    Ok((n * mult) as u64)
}

/// Why `s` cannot name a JetStream stream, if it cannot (NATS refuses
/// these characters in stream names).
pub fn check_nats_stream(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("required".into());
    }
    if s.contains(['.', '*', '>', ' ', '/', '\\']) {
        return Err(format!(
            "{s:?} may not contain '.', '*', '>', '/', '\\' or spaces"
        ));
    }
    Ok(())
}

/// Why `s` cannot begin NATS subjects, if it cannot: it must be
/// dot-separated tokens without wildcards or spaces.
pub fn check_nats_subject_prefix(s: &str) -> Result<(), String> {
    if s.is_empty()
        || s.split('.')
            .any(|t| t.is_empty() || t.contains(['*', '>', ' ']))
    {
        return Err(format!(
            "{s:?} is not a subject of dot-separated tokens without wildcards"
        ));
    }
    Ok(())
}

/// How many publishes an export may have awaiting their acks.
pub const EXPORT_MAX_IN_FLIGHT: std::ops::RangeInclusive<usize> = 1..=65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("k", "512MiB").unwrap(), 512 * 1024 * 1024);
        assert_eq!(parse_bytes("k", "2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("k", "1048576").unwrap(), 1_048_576);
        assert!(parse_bytes("k", "12 parsecs").is_err());
        assert_eq!(
            parse_duration("k", "7d").unwrap(),
            Duration::from_secs(604_800)
        );
        assert!(parse_duration("k", "soon").is_err());
    }

    #[test]
    fn empty_yaml_is_defaults_and_errors_name_the_file() {
        #[derive(Debug, Default, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct C {
            a: Option<u32>,
        }
        assert_eq!(parse_yaml::<C>("  \n").unwrap(), C::default());
        assert_eq!(parse_yaml::<C>("a: 3").unwrap(), C { a: Some(3) });
        assert!(parse_yaml::<C>("b: 3").unwrap_err().contains('b'));
        let e = read_yaml::<C>(Path::new("/nonexistent/amoskys.yaml")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config file /nonexistent/amoskys.yaml: "),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse_bytes("spool.maxBytes", "lots").unwrap_err();
        assert_eq!(e.key, "spool.maxBytes");
        assert!(e.to_string().starts_with("spool.maxBytes: "), "{e}");
    }
}
