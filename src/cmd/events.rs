//! `amoskys events query|tail`: read events from a bus.

use amoskys_client::BusClient;
use amoskys_client::shard::{Cursor, format_cursor, parse_cursor};
use amoskys_proto::{Filter, QueryRequest, Severity, TailRequest};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};

use super::Conn;
use crate::output;

#[derive(Args, Clone)]
pub struct FilterArgs {
    #[arg(long)]
    pub collector: Vec<String>,
    #[arg(long)]
    pub agent: Vec<String>,
    /// debug | info | notice | warning | error | critical: this and above.
    #[arg(long)]
    pub severity: Option<String>,
    /// Case-insensitive text to find in the event.
    #[arg(long)]
    pub text: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub output: output::Format,
}

impl FilterArgs {
    pub fn filter(&self) -> Result<Filter> {
        let min_severity = match &self.severity {
            None => Severity::Unspecified,
            Some(s) => Severity::from_str_name(&format!("SEVERITY_{}", s.to_ascii_uppercase()))
                .with_context(|| format!("--severity: {s:?} is not one of debug, info, notice, warning, error, critical"))?,
        };
        Ok(Filter {
            collectors: self.collector.clone(),
            agent_ids: self.agent.clone(),
            min_severity: min_severity as i32,
            text: self.text.clone().unwrap_or_default(),
        })
    }
}

#[derive(Subcommand)]
pub enum EventsCmd {
    /// Stored events by offset or time range.
    Query {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        filter: FilterArgs,
        #[arg(long, default_value_t = 0)]
        from_offset: u64,
        #[arg(long, default_value_t = 0)]
        to_offset: u64,
        /// RFC 3339 time or a duration ago (e.g. 15m).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// A sharded bus: resume where a previous page stopped (printed
        /// after a full page).
        #[arg(long)]
        cursor: Option<String>,
        /// A sharded bus: fail instead of printing the other shards' events
        /// when a shard does not answer.
        #[arg(long)]
        all_shards: bool,
        /// A sharded bus: only the shard reached (no fan-out).
        #[arg(long, conflicts_with = "cursor")]
        local: bool,
        /// Newest first, back from --to-offset (or the newest event); the
        /// cursor printed after a page continues further back.
        #[arg(long)]
        newest_first: bool,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Follow events as they are stored.
    Tail {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        filter: FilterArgs,
        /// Start at this offset instead of now (on a sharded bus, on
        /// every shard).
        #[arg(long)]
        from_offset: Option<u64>,
        /// A sharded bus: resume exactly where an earlier tail stopped (it
        /// prints its cursor when it ends).
        #[arg(long, conflicts_with = "from_offset")]
        cursor: Option<String>,
        /// A sharded bus: fail instead of following the other shards when a
        /// shard does not answer.
        #[arg(long)]
        all_shards: bool,
        /// Stop after this many events (0 = never).
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
}

pub fn parse_time(flag: &str, s: &str) -> Result<i64> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64);
    }
    let ago = humantime::parse_duration(s).with_context(|| {
        format!("{flag}: {s:?} is neither an RFC 3339 time nor a duration like 15m")
    })?;
    let t = std::time::SystemTime::now() - ago;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64)
}

pub async fn run(cmd: EventsCmd) -> Result<()> {
    match cmd {
        EventsCmd::Query {
            conn,
            filter,
            from_offset,
            to_offset,
            since,
            until,
            cursor,
            all_shards,
            local,
            newest_first,
            limit,
        } => {
            let req = QueryRequest {
                newest_first,
                from_offset,
                to_offset,
                from_time: since
                    .as_deref()
                    .map(|s| parse_time("--since", s))
                    .transpose()?
                    .unwrap_or(0),
                to_time: until
                    .as_deref()
                    .map(|s| parse_time("--until", s))
                    .transpose()?
                    .unwrap_or(0),
                filter: Some(filter.filter()?),
                limit,
                cursor: cursor.unwrap_or_default(),
                allow_partial: !all_shards,
                local,
            };
            let mut client = BusClient::connect(&conn.options()).await?;
            let page = client.query_page(req).await?;
            let mut out = output::Printer::new(filter.output);
            for e in &page.events {
                out.print(e)?;
            }
            if !page.missing_shards.is_empty() {
                eprintln!(
                    "warning: partial result: shards {:?} did not answer; their events are missing",
                    page.missing_shards
                );
            }
            // Newest first, a page may stop short at the scan budget with
            // more behind it; its cursor is empty only once the range is done.
            let full = limit > 0 && page.events.len() >= limit as usize;
            if !page.cursor.is_empty() && (newest_first || full) {
                eprintln!("more events: --cursor {}", page.cursor);
            }
        }
        EventsCmd::Tail {
            conn,
            filter,
            from_offset,
            cursor,
            all_shards,
            limit,
        } => {
            let req = TailRequest {
                from_offset: from_offset.unwrap_or(0),
                from_now: from_offset.is_none() && cursor.is_none(),
                filter: Some(filter.filter()?),
                cursor: cursor.unwrap_or_default(),
                allow_partial: !all_shards,
                local: false,
            };
            let mut client = BusClient::connect(&conn.options()).await?;
            let mut stream = client.tail(req).await?;
            let mut out = output::Printer::new(filter.output);
            let mut seen = 0u64;
            let mut missing: Vec<u32> = Vec::new();
            // Where the events printed so far end, per shard (a sharded bus
            // names each event's shard); printed on exit to resume from.
            let mut at: Option<Cursor> = None;
            'stream: while let Some(chunk) = stream.message().await? {
                if chunk.missing_shards != missing {
                    missing = chunk.missing_shards.clone();
                    if missing.is_empty() {
                        eprintln!("every shard answers again; the tail is complete");
                    } else {
                        eprintln!(
                            "warning: shards {missing:?} do not answer; their events follow when they are back"
                        );
                    }
                }
                if at.is_none() && !chunk.cursor.is_empty() {
                    // The cursor is the one after this response; start each
                    // shard at its first event here, then move it per event.
                    let mut c = parse_cursor(&chunk.cursor).map_err(anyhow::Error::msg)?;
                    for e in chunk.events.iter().rev() {
                        c.insert(e.shard, e.offset);
                    }
                    at = Some(c);
                }
                for e in &chunk.events {
                    out.print(e)?;
                    if let Some(c) = at.as_mut() {
                        c.insert(e.shard, e.offset + 1);
                    }
                    seen += 1;
                    if limit > 0 && seen >= limit {
                        break 'stream;
                    }
                }
            }
            if let Some(c) = at {
                eprintln!("resume with: --cursor {}", format_cursor(&c));
            }
        }
    }
    Ok(())
}
