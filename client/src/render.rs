//! Events for people: one-line summaries, severity names and JSON, shared by
//! the CLI and the dashboard so both describe an event the same way.

use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Severity};
use serde_json::{Value, json};

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// "info", "warning", ...; the number when it is not a known severity.
pub fn severity_name(s: i32) -> String {
    Severity::try_from(s)
        .map(|v| {
            v.as_str_name()
                .trim_start_matches("SEVERITY_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| s.to_string())
}

/// The severity named like [`severity_name`] prints it.
pub fn parse_severity(name: &str) -> Option<Severity> {
    Severity::from_str_name(&format!("SEVERITY_{}", name.to_ascii_uppercase()))
}

/// The payload kind: "process", "flow", "alert", ...
pub fn payload_kind(e: &Event) -> &'static str {
    match &e.payload {
        Some(Payload::Process(_)) => "process",
        Some(Payload::Flow(_)) => "flow",
        Some(Payload::Snmp(_)) => "snmp",
        Some(Payload::Inventory(_)) => "inventory",
        Some(Payload::Heartbeat(_)) => "heartbeat",
        Some(Payload::Alert(_)) => "alert",
        Some(Payload::Gap(_)) => "gap",
        Some(Payload::Synthetic(_)) => "synthetic",
        Some(Payload::IncarnationStarted(_)) => "incarnation",
        None => "none",
    }
}

/// A one-line human summary of the payload.
pub fn summary(e: &Event) -> String {
    match &e.payload {
        Some(Payload::Process(p)) => format!(
            "{:?} pid={} ppid={} {}",
            p.kind(),
            p.pid,
            p.ppid,
            p.cmdline.join(" ")
        ),
        Some(Payload::Flow(f)) => {
            let mut s = format!(
                "{}:{} -> {}:{} proto={} pkts={} bytes={}",
                f.src_ip, f.src_port, f.dst_ip, f.dst_port, f.protocol, f.packets, f.bytes
            );
            if f.pid != 0 {
                s.push_str(&format!(" {} pid={}", f.process, f.pid));
            }
            s
        }
        Some(Payload::Snmp(s)) => format!("{:?} {} {}", s.kind(), s.target, s.sys_name),
        Some(Payload::Inventory(i)) => format!("{:?}", i.kind()),
        Some(Payload::Heartbeat(h)) => format!(
            "heartbeat produced={} spool={}B dropped={}",
            h.produced, h.spool_bytes, h.dropped
        ),
        Some(Payload::Alert(a)) => format!("{}: {}", a.rule, a.summary),
        Some(Payload::Gap(g)) => format!(
            "gap dropped={} seq {}..{} ({})",
            g.dropped, g.first_seq, g.last_seq, g.reason
        ),
        Some(Payload::Synthetic(s)) => format!("synthetic n={} {}B", s.n, s.data.len()),
        Some(Payload::IncarnationStarted(i)) => format!(
            "new incarnation {:016x} on {} (previous {:016x}: last stored seq {}, {} unacked at its last heartbeat lost)",
            i.incarnation, i.node, i.previous_incarnation, i.previous_last_seq, i.previous_unacked
        ),
        None => String::new(),
    }
}

fn payload_json(e: &Event) -> Value {
    match &e.payload {
        // Synthetic filler bytes say nothing to a reader.
        Some(Payload::Synthetic(s)) => json!({"synthetic": {"n": s.n, "bytes": s.data.len()}}),
        // serde names the variant ("Alert"); use the same lower-case kind
        // as everywhere else.
        Some(p) => match serde_json::to_value(p) {
            Ok(Value::Object(m)) => match m.into_iter().next() {
                Some((_, inner)) => json!({ payload_kind(e): inner }),
                None => Value::Null,
            },
            _ => Value::Null,
        },
        None => Value::Null,
    }
}

/// The fields every listing shows, without the payload.
pub fn event_line(e: &Event) -> Value {
    json!({
        "offset": e.offset,
        "shard": e.shard,
        "agent_id": e.agent_id,
        "seq": e.seq,
        "incarnation": format!("{:016x}", e.incarnation),
        "node": e.node,
        "collector": e.collector,
        "kind": payload_kind(e),
        "observed_at": timestamp(e.observed_at),
        "stored_at": timestamp(e.stored_at),
        "severity": severity_name(e.severity),
        "summary": summary(e),
    })
}

/// Everything about one event, payload included.
pub fn event_json(e: &Event) -> Value {
    let mut v = event_line(e);
    if let Value::Object(m) = &mut v {
        m.insert("labels".into(), json!(e.labels));
        m.insert("payload".into(), payload_json(e));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::Alert;

    #[test]
    fn severities_round_trip_by_name() {
        for s in 0..=6 {
            let name = severity_name(s);
            assert_eq!(parse_severity(&name).map(|v| v as i32), Some(s), "{name}");
        }
        assert_eq!(severity_name(42), "42");
        assert!(parse_severity("loud").is_none());
    }

    #[test]
    fn json_carries_offset_summary_and_payload() {
        let e = Event {
            offset: 7,
            agent_id: "a".into(),
            collector: "rules".into(),
            severity: Severity::Warning as i32,
            payload: Some(Payload::Alert(Alert {
                rule: "r1".into(),
                summary: "odd login".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let v = event_json(&e);
        assert_eq!(v["offset"], 7);
        assert_eq!(v["kind"], "alert");
        assert_eq!(v["severity"], "warning");
        assert_eq!(v["summary"], "r1: odd login");
        assert_eq!(v["payload"]["alert"]["rule"], "r1");
        assert!(event_line(&e).get("payload").is_none());
    }
}
