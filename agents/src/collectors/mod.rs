//! The collectors. Each runs as its own task (or thread, where it blocks on
//! a socket or a capture) and hands drafts to the runtime's sink.

pub mod context;
pub mod flow;
pub mod inventory;
pub mod process;
pub mod snmp;
pub(crate) mod sockets;
pub mod synthetic;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::collectors::context::Registry;
use crate::config::ResolvedCollectors;
use crate::metrics::AgentMetrics;
use crate::spool::Draft;

/// How every collector's `spawn(config, ctx)` ends: its task; `None` when
/// it has no mode it can run in here and says why in its status (flow
/// without capture privilege); or an error when it cannot start at all.
pub type Started = Result<Option<JoinHandle<()>>, StartError>;

/// A collector that cannot start at all; the agent reports it and exits.
#[derive(Debug, thiserror::Error)]
#[error("collector {collector}: {message}")]
pub struct StartError {
    /// The collector's name.
    pub collector: &'static str,
    /// Why it cannot start.
    pub message: String,
}

/// Starts every enabled collector. A collector that cannot start at all
/// (e.g. a pcap file that is not a capture) is an error; one that can run
/// in a lesser mode (process without netlink, flow without capture
/// privilege) starts in that mode and says so in its status.
pub async fn spawn_all(
    c: &ResolvedCollectors,
    reg: &Registry,
    tx: &mpsc::Sender<Draft>,
    metrics: &Arc<AgentMetrics>,
    stop: &CancellationToken,
) -> Result<Vec<JoinHandle<()>>, StartError> {
    let ctx =
        |name, interval| reg.register(name, interval, tx.clone(), metrics.clone(), stop.clone());
    let mut tasks = Vec::new();
    // The one list of collectors, each started the same way, in order; the
    // first that cannot start stops the rest from starting.
    let mut add = |s: Started| s.map(|t| tasks.extend(t));
    if let Some(p) = &c.process {
        add(process::spawn(
            p.clone(),
            ctx(process::NAME, Some(p.poll_interval)),
        ))?;
    }
    if let Some(i) = &c.inventory {
        add(inventory::spawn(
            i.clone(),
            ctx(inventory::NAME, Some(i.interval)),
        ))?;
    }
    if let Some(f) = &c.flow {
        add(flow::spawn(f.clone(), ctx(flow::NAME, None)))?;
    }
    if let Some(s) = &c.snmp {
        add(snmp::spawn(s.clone(), ctx(snmp::NAME, Some(s.interval))))?;
    }
    if let Some(s) = &c.synthetic {
        let every = std::time::Duration::from_secs_f64(1.0 / s.rate as f64);
        add(synthetic::spawn(
            s.clone(),
            ctx(synthetic::NAME, Some(every)),
        ))?;
    }
    Ok(tasks)
}
