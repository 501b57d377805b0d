//! Query parameters of the JSON API, checked strictly: an unknown name, a bad
//! time or a limit out of range is a 400 naming the parameter.

use std::collections::HashMap;

use crate::filter::EventFilter;
use amoskys_client::render::parse_severity;

pub const MAX_PAGE: usize = 500;
pub const DEFAULT_PAGE: usize = 100;
const MAX_TEXT: usize = 256;
const MAX_LIST_ITEMS: usize = 32;

const FILTER_KEYS: [&str; 4] = ["collector", "agent", "severity", "text"];

/// The parameters of a query string, by name; each may appear once.
pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(format!(
                "unknown parameter {k:?}; this endpoint takes {}",
                allowed.join(", ")
            ));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("parameter {k:?} given more than once"));
        }
    }
    Ok(out)
}

fn list(key: &str, v: Option<&String>) -> Result<Vec<String>, String> {
    let items: Vec<String> = v
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    if items.len() > MAX_LIST_ITEMS {
        return Err(format!("{key}: at most {MAX_LIST_ITEMS} values"));
    }
    if let Some(long) = items.iter().find(|s| s.len() > MAX_TEXT) {
        return Err(format!("{key}: value of {} bytes is too long", long.len()));
    }
    Ok(items)
}

/// collector, agent (comma-separated lists), severity (minimum, by name),
/// text (case-insensitive substring).
pub fn filter(p: &HashMap<String, String>) -> Result<EventFilter, String> {
    let min_severity = match p.get("severity").map(|s| s.trim()) {
        None | Some("") => 0,
        Some(name) => parse_severity(name).map(|s| s as i32).ok_or_else(|| {
            format!(
                "severity: {name:?} is not one of debug, info, notice, warning, error, critical"
            )
        })?,
    };
    let text = p.get("text").cloned().unwrap_or_default();
    if text.len() > MAX_TEXT {
        return Err(format!("text: at most {MAX_TEXT} bytes"));
    }
    Ok(EventFilter {
        collectors: list("collector", p.get("collector"))?,
        agent_ids: list("agent", p.get("agent"))?,
        min_severity,
        text: text.to_lowercase(),
    })
}

/// RFC 3339 ("2026-11-26T12:00:00Z") or unix nanoseconds.
pub fn time(key: &str, v: Option<&String>) -> Result<i64, String> {
    let Some(v) = v.map(|s| s.trim()).filter(|s| !s.is_empty()) else {
        return Ok(0);
    };
    if let Ok(ns) = v.parse::<i64>() {
        return if ns < 0 {
            Err(format!("{key}: must not be negative"))
        } else {
            Ok(ns)
        };
    }
    let t = humantime::parse_rfc3339_weak(v).map_err(|e| {
        format!(
            "{key}: {v:?} is not an RFC 3339 time (2026-11-26T12:00:00Z) or unix nanoseconds ({e})"
        )
    })?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .ok_or_else(|| format!("{key}: {v:?} is out of range"))
}

pub fn number<T: std::str::FromStr>(key: &str, v: Option<&String>) -> Result<Option<T>, String> {
    v.map(|s| {
        s.trim()
            .parse::<T>()
            .map_err(|_| format!("{key}: {s:?} is not a non-negative integer"))
    })
    .transpose()
}

/// A search page: filters, time range, cursor and size.
#[derive(Debug)]
pub struct Search {
    pub filter: EventFilter,
    pub from: i64,
    pub to: i64,
    pub before: u64,
    /// On a sharded bus, `before` is the cursor a previous page returned.
    pub cursor: Option<String>,
    pub limit: usize,
}

pub const SEARCH_KEYS: [&str; 8] = [
    "collector",
    "agent",
    "severity",
    "text",
    "from",
    "to",
    "before",
    "limit",
];

pub fn search(raw: Option<&str>) -> Result<Search, String> {
    let p = parse(raw, &SEARCH_KEYS)?;
    let from = time("from", p.get("from"))?;
    let to = time("to", p.get("to"))?;
    if to != 0 && from > to {
        return Err("from: the range starts after it ends (from > to)".into());
    }
    let limit = number::<usize>("limit", p.get("limit"))?.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(format!("limit: {limit} is outside 1..={MAX_PAGE}"));
    }
    Ok(Search {
        filter: filter(&p)?,
        from,
        to,
        before: match p.get("before") {
            Some(c) if c.starts_with("c1") => u64::MAX,
            b => number::<u64>("before", b)?.unwrap_or(u64::MAX),
        },
        cursor: p.get("before").filter(|c| c.starts_with("c1")).cloned(),
        limit,
    })
}

pub fn tail(raw: Option<&str>) -> Result<EventFilter, String> {
    filter(&parse(raw, &FILTER_KEYS)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_searches_parse() {
        let s = search(Some(
            "collector=process,flow&severity=warning&text=SSH&from=2026-11-26T12:00:00Z&to=1900000000000000000&limit=20&before=99",
        ))
        .unwrap();
        assert_eq!(s.filter.collectors, ["process", "flow"]);
        assert_eq!(s.filter.min_severity, 4);
        assert_eq!(s.filter.text, "ssh");
        assert_eq!(s.from, 1_795_694_400_000_000_000);
        assert_eq!(s.to, 1_900_000_000_000_000_000);
        assert_eq!((s.limit, s.before), (20, 99));
        let d = search(None).unwrap();
        assert_eq!(
            (d.limit, d.before, d.from, d.to),
            (DEFAULT_PAGE, u64::MAX, 0, 0)
        );
    }

    #[test]
    fn bad_parameters_are_named() {
        let cases = [
            ("colour=red", "unknown parameter \"colour\""),
            ("limit=1000000", "limit:"),
            ("limit=0", "limit:"),
            ("limit=-5", "limit:"),
            ("from=yesterday", "from:"),
            ("to=-1", "to:"),
            ("from=2026-11-27T00:00:00Z&to=2026-11-26T00:00:00Z", "from:"),
            ("severity=loud", "severity:"),
            ("before=x", "before:"),
            ("text=a&text=b", "more than once"),
        ];
        for (q, want) in cases {
            let e = search(Some(q)).unwrap_err();
            assert!(e.contains(want), "{q}: {e}");
        }
        let long = format!("text={}", "x".repeat(MAX_TEXT + 1));
        assert!(search(Some(&long)).unwrap_err().starts_with("text:"));
        assert!(
            tail(Some("from=1"))
                .unwrap_err()
                .contains("unknown parameter")
        );
    }
}
