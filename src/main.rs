//! `amoskys`: the one multi-call binary. This file is the flags and the
//! dispatch; each subcommand's behaviour is in `cmd/`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

mod cmd;
#[cfg(feature = "nats-anchor")]
mod nats_anchor;
mod output;

#[derive(Parser)]
#[command(
    name = "amoskys",
    version,
    about = "AMOSKYS security telemetry platform"
)]
struct Cli {
    /// Log format: text for terminals, json for clusters (default: json when
    /// running in Kubernetes, text otherwise).
    #[arg(long, global = true, value_enum, env = "AMOSKYS_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run everything locally: a dev PKI, the bus and one agent.
    Up(cmd::up::UpArgs),
    /// Run the EventBus.
    Bus(cmd::bus::BusArgs),
    /// Run a node agent: collectors, spool, and the stream to the bus.
    Agent(cmd::agent::AgentArgs),
    /// Certificates for local use.
    #[command(subcommand)]
    Pki(cmd::pki::PkiCmd),
    /// Read events from a bus.
    #[command(subcommand)]
    Events(cmd::events::EventsCmd),
    /// Publish synthetic events and report durable throughput and ack latency.
    Bench(cmd::bench::BenchArgs),
    /// Back up a bus's store, list backups, restore one.
    #[command(subcommand)]
    Backup(cmd::backup::BackupCmd),
    /// Run the Kubernetes operator (in a cluster, or from a kubeconfig).
    Operator(cmd::operator::OperatorArgs),
    /// Detection rules: compile, test, backtest.
    #[command(subcommand)]
    Rules(cmd::rules::RulesCmd),
    /// Alerts the detection rules wrote.
    #[command(subcommand)]
    Alerts(cmd::alerts::AlertsCmd),
    /// Shard ownership: which shard of a sharded bus owns an agent.
    #[command(subcommand)]
    Shards(cmd::shards::ShardsCmd),
    /// Print every object the operator would create for EventBus, AgentSet
    /// and detection rule files, as `helm template` does for a chart.
    Render(cmd::render::RenderArgs),
    /// Print the CustomResourceDefinitions (EventBus, AgentSet, Agent) as YAML.
    Crdgen {
        /// Write to these files instead of stdout.
        #[arg(long)]
        out: Vec<PathBuf>,
    },
}

fn init_logging(fmt: Option<LogFormat>) {
    let json = match fmt {
        Some(LogFormat::Json) => true,
        Some(LogFormat::Text) => false,
        None => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("AMOSKYS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Up(a) => cmd::up::run(a).await,
        Cmd::Bus(a) => cmd::bus::run(a).await,
        Cmd::Agent(a) => cmd::agent::run(a).await,
        Cmd::Pki(c) => cmd::pki::run(c),
        Cmd::Events(c) => cmd::events::run(c).await,
        Cmd::Bench(a) => cmd::bench::run(a).await,
        Cmd::Backup(c) => cmd::backup::run(c).await,
        Cmd::Operator(a) => cmd::operator::run(a).await,
        Cmd::Shards(c) => cmd::shards::run(c),
        Cmd::Rules(c) => cmd::rules::run(c).await,
        Cmd::Alerts(c) => cmd::alerts::run(c).await,
        Cmd::Crdgen { out } => cmd::operator::crdgen(out),
        Cmd::Render(a) => cmd::render::run(a),
    }
}
