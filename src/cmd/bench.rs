//! `amoskys bench`: synthetic load against the bus (or, built with
//! `nats-anchor`, against NATS JetStream) and its report.

use std::path::PathBuf;

use amoskys_eventbus::bench::{self, BenchOptions};
use anyhow::{Result, bail};
use clap::Args;

use super::Conn;
#[cfg(feature = "nats-anchor")]
use crate::nats_anchor;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    #[arg(long, default_value_t = 200)]
    pub event_bytes: usize,
    #[arg(long, default_value_t = 4)]
    pub agents: usize,
    /// Total events per second, sent by each agent with exponential gaps as
    /// independent agents do (default: as fast as acks allow).
    #[arg(long)]
    pub rate: Option<u64>,
    /// Events per batch (with --nats: per message, one Batch each).
    #[arg(long, default_value_t = 512)]
    pub batch: usize,
    /// Unacked batches (with --nats: messages) allowed per agent.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    #[arg(long, default_value = "bench")]
    pub agent_prefix: String,
    /// A reader's TLS directory: also follow the run's events on a Tail
    /// stream and report the write → tail latency.
    #[arg(long)]
    pub tail_tls_dir: Option<PathBuf>,
    /// The events: `synthetic` (of --event-bytes, which no rule reads) or
    /// `node` (flows, process starts, listeners shaped like a busy node's,
    /// which the starter rules alert on).
    #[arg(long, value_enum, default_value_t = MixArg::Synthetic)]
    pub mix: MixArg,
    /// Run the same workload against NATS JetStream at this URL instead
    /// (the benchmark anchor; needs a build with `--features nats-anchor`).
    #[arg(long)]
    pub nats: Option<String>,
    /// Read every stored event back instead of publishing (--tls-dir a
    /// reader's): Query pages from the first offset, then a Tail replay.
    #[arg(long)]
    pub read: bool,
    /// Time every new alert the bus stored against the event that raised
    /// it (--tls-dir a reader's), instead of publishing.
    #[arg(long, conflicts_with_all = ["read", "nats"])]
    pub alert_latency: bool,
    /// Events per Query page with --read (the bus caps it at its
    /// max_query_limit).
    #[arg(long, default_value_t = 100_000)]
    pub query_limit: u32,
    /// Open the store in this data directory (its bus stopped) and decode
    /// every event in it; reports the time to open and the scan rate.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["read", "nats", "convert"])]
    pub scan_store: Option<PathBuf>,
    /// Write --events events as a store of the old one-key-per-event format
    /// into this new directory, in groups of --batch, and time its
    /// conversion when it is opened.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["read", "nats"])]
    pub convert: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum MixArg {
    Synthetic,
    Node,
}

pub async fn run(a: BenchArgs) -> Result<()> {
    if a.agents == 0 || a.batch == 0 || a.window == 0 {
        bail!("--agents, --batch and --window must be at least 1");
    }
    if let Some(dir) = a.scan_store {
        let report = tokio::task::spawn_blocking(move || bench::scan_store(&dir)).await?;
        println!("{}", report.map_err(anyhow::Error::msg)?.line());
        return Ok(());
    }
    if let Some(dir) = a.convert {
        if dir.exists() {
            bail!(
                "--convert {}: already exists; give a new directory",
                dir.display()
            );
        }
        let (events, bytes, batch) = (a.events, a.event_bytes, a.batch);
        let ms =
            tokio::task::spawn_blocking(move || bench::convert_legacy(&dir, events, bytes, batch))
                .await?
                .map_err(anyhow::Error::msg)?;
        println!("convert: events={events} event_bytes={bytes} convert_ms={ms:.0}");
        return Ok(());
    }
    if a.alert_latency {
        let report = bench::alert_latency(&a.conn.options()).await?;
        println!("{}", report.line());
        return Ok(());
    }
    if a.read {
        let report = bench::read(&a.conn.options(), a.query_limit).await?;
        println!("{}", report.line());
        return Ok(());
    }
    if let Some(url) = &a.nats {
        return nats_bench(&a, url).await;
    }
    let report = bench::run(BenchOptions {
        client: a.conn.options(),
        events: a.events,
        event_bytes: a.event_bytes,
        agents: a.agents,
        rate: a.rate,
        batch: a.batch,
        window: a.window,
        agent_prefix: a.agent_prefix,
        tail_tls_dir: a.tail_tls_dir,
        mix: match a.mix {
            MixArg::Synthetic => bench::Mix::Synthetic,
            MixArg::Node => bench::Mix::Node,
        },
    })
    .await;
    for e in &report.errors {
        println!("bench: error: {e}");
    }
    if report.acked < report.events {
        println!(
            "bench: the bus failed mid-run: {} of {} events were acked (durable) before it did",
            report.acked, report.events
        );
    }
    println!("{}", report.line());
    if report.acked == 0 && !report.errors.is_empty() {
        bail!("no event was acked");
    }
    Ok(())
}

#[cfg(feature = "nats-anchor")]
async fn nats_bench(a: &BenchArgs, url: &str) -> Result<()> {
    let report = nats_anchor::run(nats_anchor::NatsBench {
        url,
        tls_dir: &a.conn.tls_dir,
        events: a.events,
        event_bytes: a.event_bytes,
        agents: a.agents,
        rate: a.rate,
        batch: a.batch,
        in_flight: a.window,
    })
    .await?;
    for e in &report.errors {
        println!("bench: error: {e}");
    }
    println!("{}", report.line().replacen("bench:", "bench(nats):", 1));
    Ok(())
}

#[cfg(not(feature = "nats-anchor"))]
async fn nats_bench(_: &BenchArgs, _: &str) -> Result<()> {
    bail!("--nats: this build has no NATS client; rebuild with `--features nats-anchor`")
}
