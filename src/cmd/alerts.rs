//! `amoskys alerts list|tail`: the alerts detection rules wrote, with
//! repeats folded into each alert's count.

use amoskys_client::BusClient;
use amoskys_client::alerts::alert_of;
use amoskys_client::render::{severity_name, timestamp};
use amoskys_proto::{Alert, Event, Filter, QueryRequest, TailRequest};
use anyhow::Result;
use clap::Subcommand;

use super::Conn;
use crate::output;

#[derive(Subcommand)]
pub enum AlertsCmd {
    /// Alerts stored in a time range, newest last, with their counts.
    List {
        #[command(flatten)]
        conn: Conn,
        /// From this long ago, or this RFC 3339 time.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only these rules.
        #[arg(long)]
        rule: Vec<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: output::Format,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Follow alerts as they are written (window updates included).
    Tail {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        rule: Vec<String>,
        #[arg(long, value_enum, default_value = "table")]
        output: output::Format,
    },
}

fn detect_filter() -> Filter {
    Filter {
        collectors: vec![amoskys_detect::DETECT_COLLECTOR.into()],
        ..Default::default()
    }
}

fn print(e: &Event, a: &Alert, format: output::Format, header: &mut bool) {
    match format {
        output::Format::Json => println!("{}", amoskys_client::render::event_json(e)),
        output::Format::Table => {
            if !*header {
                println!(
                    "{:<24}  {:<8}  {:<30}  {:>6}  {:<14}  SUMMARY",
                    "FIRST SEEN", "SEVERITY", "RULE", "COUNT", "SOURCE"
                );
                *header = true;
            }
            // One line per alert, however long the summary.
            let summary: String = a
                .summary
                .replace(['\n', '\r'], " ")
                .chars()
                .take(160)
                .collect();
            println!(
                "{:<24}  {:<8}  {:<30}  {:>6}  {:<14}  {}",
                timestamp(a.first_seen),
                severity_name(e.severity),
                a.rule,
                a.count,
                format!("{}:{}", a.source_shard, a.source_offset),
                summary
            );
        }
    }
}

pub async fn run(cmd: AlertsCmd) -> Result<()> {
    match cmd {
        AlertsCmd::List {
            conn,
            since,
            rule,
            output,
            limit,
        } => {
            let mut client = BusClient::connect(&conn.options()).await?;
            let page = client
                .query_page(QueryRequest {
                    from_time: super::events::parse_time("--since", &since)?,
                    filter: Some(detect_filter()),
                    limit,
                    allow_partial: true,
                    ..Default::default()
                })
                .await?;
            if !page.missing_shards.is_empty() {
                eprintln!(
                    "warning: partial result: shards {:?} did not answer; their alerts are missing",
                    page.missing_shards
                );
            }
            let mut header = false;
            for (e, a) in amoskys_client::alerts::fold(&page.events) {
                if rule.is_empty() || rule.contains(&a.rule) {
                    print(e, &a, output, &mut header);
                }
            }
        }
        AlertsCmd::Tail { conn, rule, output } => {
            let mut client = BusClient::connect(&conn.options()).await?;
            let mut stream = client
                .tail(TailRequest {
                    from_now: true,
                    filter: Some(detect_filter()),
                    allow_partial: true,
                    ..Default::default()
                })
                .await?;
            let mut header = false;
            while let Some(chunk) = stream.message().await? {
                for e in &chunk.events {
                    let Some(a) = alert_of(e) else { continue };
                    if rule.is_empty() || rule.contains(&a.rule) {
                        print(e, a, output, &mut header);
                    }
                }
            }
        }
    }
    Ok(())
}
