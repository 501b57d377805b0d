//! Printing events for people (table) and programs (JSON lines).

use std::io::Write;

use amoskys_proto::Event;
use amoskys_proto::event::Payload;
use clap::ValueEnum;
use serde_json::{Value, json};

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub struct Printer {
    format: Format,
    header: bool,
}

fn ts(ns: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

fn severity(s: i32) -> String {
    amoskys_proto::Severity::try_from(s)
        .map(|v| {
            v.as_str_name()
                .trim_start_matches("SEVERITY_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| s.to_string())
}

/// A one-line human summary of the payload.
fn summary(e: &Event) -> String {
    match &e.payload {
        Some(Payload::Process(p)) => format!(
            "{:?} pid={} ppid={} {}",
            p.kind(),
            p.pid,
            p.ppid,
            p.cmdline.join(" ")
        ),
        Some(Payload::Flow(f)) => format!(
            "{}:{} -> {}:{} proto={} pkts={} bytes={}",
            f.src_ip, f.src_port, f.dst_ip, f.dst_port, f.protocol, f.packets, f.bytes
        ),
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
        None => String::new(),
    }
}

fn payload_json(e: &Event) -> Value {
    match &e.payload {
        // Synthetic filler bytes say nothing to a reader.
        Some(Payload::Synthetic(s)) => json!({"synthetic": {"n": s.n, "bytes": s.data.len()}}),
        Some(p) => serde_json::to_value(p).unwrap_or(Value::Null),
        None => Value::Null,
    }
}

impl Printer {
    pub fn new(format: Format) -> Self {
        Self {
            format,
            header: false,
        }
    }

    pub fn print(&mut self, e: &Event) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        match self.format {
            Format::Json => {
                let v = json!({
                    "offset": e.offset,
                    "agent_id": e.agent_id,
                    "seq": e.seq,
                    "node": e.node,
                    "collector": e.collector,
                    "observed_at": ts(e.observed_at),
                    "stored_at": ts(e.stored_at),
                    "severity": severity(e.severity),
                    "labels": e.labels,
                    "summary": summary(e),
                    "payload": payload_json(e),
                });
                writeln!(out, "{v}")
            }
            Format::Table => {
                if !self.header {
                    writeln!(
                        out,
                        "{:>10}  {:<24}  {:<20}  {:<10}  {:<8}  SUMMARY",
                        "OFFSET", "OBSERVED", "AGENT", "COLLECTOR", "SEVERITY"
                    )?;
                    self.header = true;
                }
                writeln!(
                    out,
                    "{:>10}  {:<24}  {:<20}  {:<10}  {:<8}  {}",
                    e.offset,
                    ts(e.observed_at),
                    e.agent_id,
                    e.collector,
                    severity(e.severity),
                    summary(e)
                )
            }
        }
    }
}
