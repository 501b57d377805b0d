//! `amoskys up`: everything locally — a dev PKI, the bus, one agent and the
//! dashboard — until Ctrl-C.

use std::path::PathBuf;

use amoskys_agents::AgentOverrides;
use amoskys_client::pki::{self, DevPkiOptions};
use amoskys_eventbus::config::{self, BusOverrides};
use anyhow::{Context, Result};
use clap::Args;

use super::wait_for_signal;

#[derive(Args)]
pub struct UpArgs {
    /// Where the PKI and the WAL live (default: the user's data directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub listen: String,
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub http: String,
}

fn default_data_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return Ok(PathBuf::from(d).join("amoskys"));
    }
    let home = std::env::var_os("HOME")
        .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/amoskys"))
}

/// Puts the starter rules in `dir` the first time; after that the
/// directory is the user's, and edits and removals stay.
fn write_starter_rules(dir: &std::path::Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in amoskys_detect::starter::STARTER_RULES {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub async fn run(a: UpArgs) -> Result<()> {
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
    let rules_dir = dir.join("rules");
    write_starter_rules(&rules_dir)?;
    let cfg = config::resolve(
        config::BusConfigFile::default(),
        BusOverrides {
            rules_dir: Some(rules_dir.clone()),
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
    println!(
        "  alerts:           amoskys alerts tail --bus https://{} --tls-dir {}   (rules in {}, re-read on change)",
        bus.grpc_addr,
        admin.display(),
        rules_dir.display()
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
