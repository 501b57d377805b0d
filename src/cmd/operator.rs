//! `amoskys operator` and `amoskys crdgen`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct OperatorArgs {
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    #[arg(long, default_value = "amoskys-operator")]
    pub lease_name: String,
    /// This replica's identity in the Lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Image for bus and agent pods whose resource names none (the chart
    /// passes the operator's own image).
    #[arg(long, env = "AMOSKYS_IMAGE")]
    pub image: Option<String>,
    /// How often Agent statuses are refreshed from the bus registry.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub agents_interval: std::time::Duration,
}

pub async fn run(a: OperatorArgs) -> Result<()> {
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

/// Prints the CRDs, or writes them to each of `out`.
pub fn crdgen(out: Vec<PathBuf>) -> Result<()> {
    let yaml = amoskys_operator::crd::yaml().context("rendering the CRDs")?;
    if out.is_empty() {
        print!("{yaml}");
    }
    for path in out {
        std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
