//! `amoskys pki init`: a dev CA and certificates in cert-manager's layout.

use std::net::IpAddr;
use std::path::PathBuf;

use amoskys_client::pki::{self, DevPkiOptions};
use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum PkiCmd {
    /// Create a CA and bus/agent/reader/admin/peer certificates (cert-manager layout).
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

pub fn run(cmd: PkiCmd) -> Result<()> {
    let PkiCmd::Init {
        out,
        dns,
        ip,
        force,
        validity,
    } = cmd;
    let mut o = DevPkiOptions::new(out);
    o.dns = dns;
    o.ips = ip;
    o.force = force;
    o.leaf_validity = amoskys_client::parse::parse_duration("--validity", &validity)?;
    pki::init_dev_pki(&o)?;
    println!(
        "wrote a CA and bus, agent, reader, admin, peer certificates under {}",
        o.out.display()
    );
    Ok(())
}
