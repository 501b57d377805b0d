//! Printing events for people (table) and programs (JSON lines).

use std::io::Write;

use amoskys_client::render::{event_json, severity_name, summary, timestamp};
use amoskys_proto::Event;
use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub struct Printer {
    format: Format,
    header: bool,
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
            Format::Json => writeln!(out, "{}", event_json(e)),
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
                    timestamp(e.observed_at),
                    e.agent_id,
                    e.collector,
                    severity_name(e.severity),
                    summary(e)
                )
            }
        }
    }
}
