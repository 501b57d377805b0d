//! `amoskys bus`: run the EventBus until SIGTERM.

use std::path::PathBuf;

use amoskys_eventbus::config::{self, BusOverrides};
use anyhow::Result;
use clap::Args;

use super::wait_for_signal;

#[derive(Args)]
pub struct BusArgs {
    /// YAML config file; flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: BusOverrides,
}

pub async fn run(a: BusArgs) -> Result<()> {
    let file = match &a.config {
        Some(p) => config::read_config_file(p)?,
        None => config::BusConfigFile::default(),
    };
    serve(config::resolve(file, a.flags)?).await
}

/// Runs a bus with this config until SIGTERM or Ctrl-C, then drains it.
pub async fn serve(cfg: amoskys_eventbus::BusConfig) -> Result<()> {
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
