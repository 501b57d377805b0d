//! `amoskys agent`: run a node agent until SIGTERM.

use std::path::PathBuf;

use amoskys_agents::AgentOverrides;
use anyhow::Result;
use clap::Args;

use super::wait_for_signal;

#[derive(Args)]
pub struct AgentArgs {
    /// YAML config file (its `collectors:` section is AgentSet.spec.collectors);
    /// flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: AgentOverrides,
}

pub async fn run(a: AgentArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => amoskys_agents::config::read_config_file(p)?,
        None => amoskys_agents::config::AgentConfigFile::default(),
    };
    let cfg = amoskys_agents::config::resolve(file, a.flags)?;
    let agent = amoskys_agents::start(cfg).await?;
    tokio::select! {
        r = wait_for_signal() => r?,
    }
    agent.shutdown().await;
    Ok(())
}
