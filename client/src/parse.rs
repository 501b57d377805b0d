//! The value syntax every AMOSKYS config shares (bus, agent, operator specs):
//! sizes like `512MiB` and durations like `30s`, with errors naming the key.

use std::time::Duration;

/// A value that does not parse, and the key it was given for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ParseError {
    pub key: &'static str,
    pub message: String,
}

fn invalid(key: &'static str, message: String) -> ParseError {
    ParseError { key, message }
}

/// Parses "7d", "90m", "30s" (humantime) into a duration.
pub fn parse_duration(key: &'static str, s: &str) -> Result<Duration, ParseError> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        invalid(
            key,
            format!("{s:?} is not a duration like 30s, 15m, 7d ({e})"),
        )
    })
}

/// Parses "512MiB", "2GB", "1048576" into bytes.
pub fn parse_bytes(key: &'static str, s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| invalid(key, format!("{s:?} is not a size like 512MiB or 2GB")))?;
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
        other => {
            return Err(invalid(
                key,
                format!("unknown size unit {other:?} in {s:?}"),
            ));
        }
    };
    Ok((n * mult) as u64)
}

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
    fn errors_name_the_key() {
        let e = parse_bytes("spool.maxBytes", "lots").unwrap_err();
        assert_eq!(e.key, "spool.maxBytes");
        assert!(e.to_string().starts_with("spool.maxBytes: "), "{e}");
    }
}
