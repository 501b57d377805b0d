//! The subcommands' behaviour, one module each; `main.rs` only parses flags
//! and dispatches here.

pub mod agent;
pub mod alerts;
pub mod backup;
pub mod bench;
pub mod bus;
pub mod events;
pub mod operator;
pub mod pki;
pub mod render;
pub mod rules;
pub mod shards;
pub mod up;

use std::path::PathBuf;

use amoskys_client::ClientOptions;
use anyhow::Result;
use clap::Args;

/// How a client subcommand reaches the bus.
#[derive(Args, Clone)]
pub struct Conn {
    #[arg(long, default_value = "https://127.0.0.1:7443", env = "AMOSKYS_BUS")]
    pub bus: String,
    /// Directory with this client's tls.crt, tls.key and ca.crt.
    #[arg(long, env = "AMOSKYS_TLS_DIR")]
    pub tls_dir: PathBuf,
    /// Name to verify the bus certificate against (default: the URL's host).
    #[arg(long)]
    pub server_name: Option<String>,
}

impl Conn {
    pub fn options(&self) -> ClientOptions {
        let mut o = ClientOptions::new(self.bus.clone(), self.tls_dir.clone());
        o.server_name = self.server_name.clone();
        o
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() -> Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        r = tokio::signal::ctrl_c() => { r?; tracing::info!("interrupt: draining"); }
    }
    Ok(())
}
