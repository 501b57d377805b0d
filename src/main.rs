//! `amoskys`: the one multi-call binary. It parses flags and calls the crates.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use amoskys_agents::AgentOverrides;
use amoskys_client::pki::{self, DevPkiOptions};
use amoskys_client::{BusClient, ClientOptions};
use amoskys_eventbus::bench::{self, BenchOptions};
use amoskys_eventbus::config::{self, BusOverrides};
use amoskys_proto::{Filter, QueryRequest, Severity, TailRequest};
use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

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
    Up(UpArgs),
    /// Run the EventBus.
    Bus(BusArgs),
    /// Run a node agent: collectors, spool, and the stream to the bus.
    Agent(AgentArgs),
    /// Certificates for local use.
    #[command(subcommand)]
    Pki(PkiCmd),
    /// Read events from a bus.
    #[command(subcommand)]
    Events(EventsCmd),
    /// Publish synthetic events and report durable throughput and ack latency.
    Bench(BenchArgs),
    /// Back up a bus's store, list backups, restore one.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Run the Kubernetes operator (in a cluster, or from a kubeconfig).
    Operator(OperatorArgs),
    /// Print the CustomResourceDefinitions (EventBus, AgentSet, Agent) as YAML.
    Crdgen {
        /// Write to these files instead of stdout.
        #[arg(long)]
        out: Vec<PathBuf>,
    },
}

#[derive(Args)]
struct OperatorArgs {
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "amoskys-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Image for bus and agent pods whose resource names none (the chart
    /// passes the operator's own image).
    #[arg(long, env = "AMOSKYS_IMAGE")]
    image: Option<String>,
    /// How often Agent statuses are refreshed from the bus registry.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    agents_interval: std::time::Duration,
}

#[derive(Args)]
struct UpArgs {
    /// Where the PKI and the WAL live (default: the user's data directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    #[arg(long, default_value = "127.0.0.1:9464")]
    http: String,
}

#[derive(Args)]
struct AgentArgs {
    /// YAML config file (its `collectors:` section is AgentSet.spec.collectors);
    /// flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, env = "AMOSKYS_BUS")]
    bus: Option<String>,
    /// Directory with tls.crt, tls.key and ca.crt (reloaded when they change).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Where unacked events wait (survives restarts).
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// HTTP address for /metrics and /healthz.
    #[arg(long)]
    http: Option<String>,
    /// Stable agent id (default: the node name).
    #[arg(long, env = "AMOSKYS_AGENT_ID")]
    agent_id: Option<String>,
    /// Node name (default: $NODE_NAME or the hostname).
    #[arg(long)]
    node: Option<String>,
    /// Read flows from this capture file instead of a live interface.
    #[arg(long)]
    pcap_file: Option<String>,
}

#[derive(Args)]
struct BusArgs {
    /// YAML config file; flags override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// gRPC (mTLS) address.
    #[arg(long)]
    listen: Option<String>,
    /// HTTP address for /metrics, /healthz, /readyz.
    #[arg(long)]
    http: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory with tls.crt, tls.key and ca.crt (reloaded when they change).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Keep events this long (e.g. 7d, 12h).
    #[arg(long)]
    retention: Option<String>,
    /// Cap on stored bytes (e.g. 20GiB); oldest events go first.
    #[arg(long)]
    max_bytes: Option<String>,
    /// always | batch | never: when writes are fsynced before acks.
    #[arg(long)]
    sync: Option<String>,
    /// Largest gRPC message accepted (e.g. 4MiB).
    #[arg(long)]
    max_message_bytes: Option<String>,
    /// Client batches that may wait for the writer.
    #[arg(long)]
    queue_depth: Option<usize>,
    /// Serve the HTTP address over TLS (bus certificate); an admin or reader
    /// client certificate then signs in to the dashboard without a token.
    #[arg(long)]
    http_tls: bool,
    /// File of dashboard admin tokens, one per line (re-read on change).
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// File of dashboard reader tokens (read-only: no control).
    #[arg(long)]
    reader_token_file: Option<PathBuf>,
    /// Take backups of the store into this directory (daily unless the
    /// config file's backup.interval says otherwise).
    #[arg(long)]
    backup_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Ask a running bus to take a backup now (needs an admin certificate).
    Now {
        #[command(flatten)]
        conn: Conn,
    },
    /// List the backups in a backup directory.
    List {
        #[arg(long)]
        dir: PathBuf,
        /// Also check every file of each backup against its recorded checksum.
        #[arg(long)]
        verify: bool,
    },
    /// Restore a backup into a missing or empty data directory; then start
    /// the bus on it.
    Restore {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Backup to restore (default: the newest).
        #[arg(long)]
        id: Option<u32>,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a CA and bus/agent/reader/admin certificates (cert-manager layout).
    Init {
        #[arg(long)]
        out: PathBuf,
        /// Extra DNS names for the bus certificate (localhost is always there).
        #[arg(long)]
        dns: Vec<String>,
        /// Extra IPs for the bus certificate (127.0.0.1 and ::1 are always there).
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Overwrite an existing PKI in --out.
        #[arg(long)]
        force: bool,
        /// Leaf certificate lifetime (e.g. 90d).
        #[arg(long, default_value = "90d")]
        validity: String,
    },
}

#[derive(Args, Clone)]
struct Conn {
    #[arg(long, default_value = "https://127.0.0.1:7443", env = "AMOSKYS_BUS")]
    bus: String,
    /// Directory with this client's tls.crt, tls.key and ca.crt.
    #[arg(long, env = "AMOSKYS_TLS_DIR")]
    tls_dir: PathBuf,
    /// Name to verify the bus certificate against (default: the URL's host).
    #[arg(long)]
    server_name: Option<String>,
}

impl Conn {
    fn options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(self.bus.clone(), self.tls_dir.clone());
        o.server_name = self.server_name.clone();
        o
    }
}

#[derive(Args, Clone)]
struct FilterArgs {
    #[arg(long)]
    collector: Vec<String>,
    #[arg(long)]
    agent: Vec<String>,
    /// debug | info | notice | warning | error | critical: this and above.
    #[arg(long)]
    severity: Option<String>,
    /// Case-insensitive text to find in the event.
    #[arg(long)]
    text: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    output: output::Format,
}

impl FilterArgs {
    fn filter(&self) -> Result<Filter> {
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
enum EventsCmd {
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

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    #[arg(long, default_value_t = 200)]
    event_bytes: usize,
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Total events per second, sent by each agent with exponential gaps as
    /// independent agents do (default: as fast as acks allow).
    #[arg(long)]
    rate: Option<u64>,
    /// Events per batch (with --nats: per message, one Batch each).
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Unacked batches (with --nats: messages) allowed per agent.
    #[arg(long, default_value_t = 16)]
    window: usize,
    #[arg(long, default_value = "bench")]
    agent_prefix: String,
    /// A reader's TLS directory: also follow the run's events on a Tail
    /// stream and report the write → tail latency.
    #[arg(long)]
    tail_tls_dir: Option<PathBuf>,
    /// Run the same workload against NATS JetStream at this URL instead
    /// (the benchmark anchor; needs a build with `--features nats-anchor`).
    #[arg(long)]
    nats: Option<String>,
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

async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        r = tokio::signal::ctrl_c() => { r?; tracing::info!("interrupt: draining"); }
    }
    Ok(())
}

async fn run_bus(cfg: amoskys_eventbus::BusConfig) -> Result<()> {
    let bus = amoskys_eventbus::start(cfg).await?;
    let stop = bus.stop_token();
    tokio::spawn(async move {
        if let Err(e) = wait_for_signal().await {
            tracing::error!(error = %e, "signal handling failed; stopping");
        }
        stop.cancel();
    });
    bus.wait().await?;
    Ok(())
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(d).join("amoskys"));
    }
    let home = std::env::var_os("HOME")
        .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/amoskys"))
}

async fn up(a: UpArgs) -> Result<()> {
    let dir = match a.data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    let pki_dir = dir.join("pki");
    if pki::dev_pki_exists(&pki_dir) {
        tracing::info!(dir = %pki_dir.display(), "reusing dev PKI");
    } else {
        pki::init_dev_pki(&DevPkiOptions::new(&pki_dir))?;
        tracing::info!(dir = %pki_dir.display(), "created dev PKI");
    }
    let token_file = dir.join("dashboard-token");
    let token = amoskys_eventbus::ensure_token_file(&token_file)
        .with_context(|| format!("dashboard token {}", token_file.display()))?;
    let cfg = config::resolve(
        config::BusConfigFile::default(),
        BusOverrides {
            listen: Some(a.listen.clone()),
            http: Some(a.http.clone()),
            data_dir: Some(dir.join("bus")),
            tls_dir: Some(pki_dir.join("bus")),
            admin_token_file: Some(token_file.clone()),
            ..Default::default()
        },
    )?;
    let bus = amoskys_eventbus::start(cfg).await?;
    let agent = amoskys_agents::start(local_agent_config(
        &dir,
        &pki_dir,
        &bus.grpc_addr.to_string(),
    )?)
    .await?;
    let admin = pki_dir.join("admin");
    println!("AMOSKYS is up.");
    println!(
        "  dashboard:        http://{}/login?token={token}",
        bus.http_addr
    );
    println!(
        "                    (token in {}; API: curl -H 'Authorization: Bearer <token>' http://{}/api/overview)",
        token_file.display(),
        bus.http_addr
    );
    println!(
        "  agent:            {} (collectors: {}; metrics http://{}/metrics)",
        agent.agent_id,
        agent.shared.collectors.names().join(", "),
        agent.http_addr.map(|a| a.to_string()).unwrap_or_default()
    );
    println!("  bus (gRPC, mTLS): https://{}", bus.grpc_addr);
    println!("  metrics:          http://{}/metrics", bus.http_addr);
    println!("  readiness:        http://{}/readyz", bus.http_addr);
    println!(
        "  query events:     amoskys events query --bus https://{} --tls-dir {}",
        bus.grpc_addr,
        admin.display()
    );
    println!(
        "  follow events:    amoskys events tail --bus https://{} --tls-dir {}",
        bus.grpc_addr,
        admin.display()
    );
    println!(
        "  load test:        amoskys bench --bus https://{} --tls-dir {} --events 100000",
        bus.grpc_addr,
        pki_dir.join("agent").display()
    );
    println!("Ctrl-C stops everything.");
    let _ = wait_for_signal().await;
    // The agent first, so it can hand the bus what it still holds.
    agent.shutdown().await;
    bus.stop_token().cancel();
    bus.wait().await?;
    Ok(())
}

/// The agent `up` runs: process, inventory, flow on `lo` when capture is
/// permitted here, and a low-rate synthetic collector.
fn local_agent_config(
    dir: &std::path::Path,
    pki_dir: &std::path::Path,
    bus: &str,
) -> Result<amoskys_agents::AgentConfig> {
    let mut file = amoskys_agents::config::AgentConfigFile::default();
    let c = &mut file.collectors;
    c.synthetic.enabled = true;
    c.synthetic.rate = 1;
    c.flow.interface = "lo".into();
    let probe = amoskys_agents::config::resolve_collectors(
        &amoskys_agents::config::Collectors {
            flow: amoskys_agents::config::FlowSpec {
                enabled: true,
                interface: "lo".into(),
                ..Default::default()
            },
            ..Default::default()
        },
        None,
    )?;
    match probe
        .flow
        .as_ref()
        .map(amoskys_agents::collectors::flow::open_live)
    {
        Some(Ok(_)) => c.flow.enabled = true,
        Some(Err(e)) => tracing::warn!(
            "flow collector skipped: cannot capture on lo ({e}); it needs CAP_NET_RAW"
        ),
        None => {}
    }
    Ok(amoskys_agents::config::resolve(
        file,
        AgentOverrides {
            bus: Some(format!("https://{bus}")),
            tls_dir: Some(pki_dir.join("agent")),
            spool_dir: Some(dir.join("agent-spool")),
            http: Some("127.0.0.1:9465".into()),
            ..Default::default()
        },
    )?)
}

async fn run_agent(a: AgentArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => amoskys_agents::config::read_config_file(p)?,
        None => amoskys_agents::config::AgentConfigFile::default(),
    };
    let cfg = amoskys_agents::config::resolve(
        file,
        AgentOverrides {
            agent_id: a.agent_id,
            node: a.node,
            bus: a.bus,
            tls_dir: a.tls_dir,
            spool_dir: a.spool_dir,
            http: a.http,
            pcap_file: a.pcap_file,
        },
    )?;
    let agent = amoskys_agents::start(cfg).await?;
    tokio::select! {
        r = wait_for_signal() => r?,
    }
    agent.shutdown().await;
    Ok(())
}

async fn events(cmd: EventsCmd) -> Result<()> {
    match cmd {
        EventsCmd::Query {
            conn,
            filter,
            from_offset,
            to_offset,
            since,
            until,
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
            };
            let mut client = BusClient::connect(&conn.options()).await?;
            let events = client.query(req).await?;
            let mut out = output::Printer::new(filter.output);
            for e in &events {
                out.print(e)?;
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

fn unix_time(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn backup_cmd(cmd: BackupCmd) -> Result<()> {
    use amoskys_eventbus::backup::Backups;
    let existing = |dir: &Path| -> Result<Backups> {
        anyhow::ensure!(dir.is_dir(), "backup dir {} does not exist", dir.display());
        Ok(Backups::open(dir)?)
    };
    match cmd {
        BackupCmd::Now { conn } => {
            let mut client = BusClient::connect(&conn.options()).await?;
            let b = client
                .admin
                .backup(amoskys_proto::BackupRequest {})
                .await
                .map_err(amoskys_client::ClientError::from)?
                .into_inner();
            println!(
                "backup {} taken at {}: {} bytes in {} files; {} backups kept in {}",
                b.backup_id,
                unix_time(b.created_at),
                b.size_bytes,
                b.files,
                b.backups_kept,
                b.dir
            );
        }
        BackupCmd::List { dir, verify } => {
            let backups = existing(&dir)?;
            let mut failed = 0;
            println!(
                "{:>6}  {:<20}  {:>14}  {:>6}{}",
                "ID",
                "CREATED",
                "BYTES",
                "FILES",
                if verify { "  VERIFIED" } else { "" }
            );
            for b in backups.list() {
                let check = if verify {
                    match backups.verify(b.id) {
                        Ok(()) => "  ok".to_string(),
                        Err(e) => {
                            failed += 1;
                            format!("  FAILED: {e}")
                        }
                    }
                } else {
                    String::new()
                };
                println!(
                    "{:>6}  {:<20}  {:>14}  {:>6}{check}",
                    b.id,
                    unix_time(b.created_at),
                    b.size_bytes,
                    b.files
                );
            }
            anyhow::ensure!(failed == 0, "{failed} backup(s) failed verification");
        }
        BackupCmd::Restore { dir, data_dir, id } => {
            let mut backups = existing(&dir)?;
            let target = data_dir.clone();
            let b = tokio::task::spawn_blocking(move || backups.restore(id, &target)).await??;
            println!(
                "restored backup {} (taken at {}) into {}; start the bus with --data-dir {}",
                b.id,
                unix_time(b.created_at),
                data_dir.display(),
                data_dir.display()
            );
        }
    }
    Ok(())
}

async fn bench_cmd(a: BenchArgs) -> Result<()> {
    if a.agents == 0 || a.batch == 0 || a.window == 0 {
        bail!("--agents, --batch and --window must be at least 1");
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.cmd {
        Cmd::Up(a) => up(a).await,
        Cmd::Bus(a) => {
            let file = match &a.config {
                Some(p) => config::read_config_file(p)?,
                None => config::BusConfigFile::default(),
            };
            let cfg = config::resolve(
                file,
                BusOverrides {
                    listen: a.listen,
                    http: a.http,
                    data_dir: a.data_dir,
                    tls_dir: a.tls_dir,
                    retention: a.retention,
                    max_bytes: a.max_bytes,
                    sync: a.sync,
                    max_message_bytes: a.max_message_bytes,
                    queue_depth: a.queue_depth,
                    http_tls: a.http_tls,
                    admin_token_file: a.admin_token_file,
                    reader_token_file: a.reader_token_file,
                    backup_dir: a.backup_dir,
                },
            )?;
            run_bus(cfg).await
        }
        Cmd::Agent(a) => run_agent(a).await,
        Cmd::Pki(PkiCmd::Init {
            out,
            dns,
            ip,
            force,
            validity,
        }) => {
            let mut o = DevPkiOptions::new(out);
            o.dns = dns;
            o.ips = ip;
            o.force = force;
            o.leaf_validity = amoskys_client::parse::parse_duration("--validity", &validity)?;
            pki::init_dev_pki(&o)?;
            println!(
                "wrote a CA and bus, agent, reader, admin certificates under {}",
                o.out.display()
            );
            Ok(())
        }
        Cmd::Events(cmd) => events(cmd).await,
        Cmd::Bench(a) => bench_cmd(a).await,
        Cmd::Backup(cmd) => backup_cmd(cmd).await,
        Cmd::Operator(a) => {
            let client = amoskys_operator::run::client()
                .await
                .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
            let identity = a.identity.unwrap_or_else(|| {
                format!(
                    "{}-{}",
                    std::env::var("HOSTNAME").unwrap_or_else(|_| "amoskys-operator".into()),
                    std::process::id()
                )
            });
            amoskys_operator::run::run(
                client,
                amoskys_operator::run::Options {
                    metrics_addr: a.metrics_addr,
                    lease_namespace: a.lease_namespace,
                    lease_name: a.lease_name,
                    identity,
                    image: a.image,
                    agents_interval: a.agents_interval,
                },
            )
            .await
            .context("operator")
        }
        Cmd::Crdgen { out } => {
            let yaml = amoskys_operator::crd::yaml().context("rendering the CRDs")?;
            if out.is_empty() {
                print!("{yaml}");
            }
            for path in out {
                std::fs::write(&path, &yaml)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(())
        }
    }
}
