//! `amoskys events query|tail`: read events from a bus.

use amoskys_client::BusClient;
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
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Follow events as they are stored.
    Tail {
        #[command(flatten)]
        conn: Conn,
        #[command(flatten)]
        filter: FilterArgs,
        /// Start at this offset instead of now.
        #[arg(long)]
        from_offset: Option<u64>,
        /// Stop after this many events (0 = never).
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
}

fn parse_time(flag: &str, s: &str) -> Result<i64> {
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
            limit,
        } => {
            let req = QueryRequest {
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
                local: false,
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
            if !page.cursor.is_empty() && limit > 0 && page.events.len() >= limit as usize {
                eprintln!("more events: --cursor {}", page.cursor);
            }
        }
        EventsCmd::Tail {
            conn,
            filter,
            from_offset,
            limit,
        } => {
            let req = TailRequest {
                from_offset: from_offset.unwrap_or(0),
                from_now: from_offset.is_none(),
                filter: Some(filter.filter()?),
            };
            let mut client = BusClient::connect(&conn.options()).await?;
            let mut stream = client.tail(req).await?;
            let mut out = output::Printer::new(filter.output);
            let mut seen = 0u64;
            while let Some(chunk) = stream.message().await? {
                for e in &chunk.events {
                    out.print(e)?;
                    seen += 1;
                    if limit > 0 && seen >= limit {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}
