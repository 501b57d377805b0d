//! Shared set-up for the agent's component tests: a real PKI, a real bus
//! in-process (RocksDB on a temp dir, mTLS on loopback), agents in-process,
//! and collector contexts whose events a test reads directly.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use amoskys_agents::collector::{Ctx, Registry};
use amoskys_agents::config::{self, AgentConfig, AgentConfigFile, AgentOverrides};
use amoskys_agents::metrics::AgentMetrics;
use amoskys_agents::spool::Draft;
use amoskys_client::pki::{self, DevPkiOptions};
use amoskys_client::{BusClient, ClientOptions};
use amoskys_eventbus::RunningBus;
use amoskys_eventbus::config::{BusConfig, SyncPolicy};
use amoskys_proto::{Event, Filter, QueryRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub struct Env {
    pub tmp: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        pki::init_dev_pki(&DevPkiOptions::new(tmp.path().join("pki"))).unwrap();
        Self { tmp }
    }

    pub fn pki(&self, who: &str) -> PathBuf {
        self.tmp.path().join("pki").join(who)
    }

    pub fn bus_config(&self, listen: SocketAddr) -> BusConfig {
        let mut c = BusConfig::defaults(self.tmp.path().join("bus"), self.pki("bus"));
        c.listen = listen;
        c.http = "127.0.0.1:0".parse().unwrap();
        c.sync = SyncPolicy::Batch;
        c.shutdown_grace = Duration::from_secs(5);
        c
    }

    /// Starts the bus on `listen` (the same address again after a restart).
    pub async fn start_bus(&self, listen: SocketAddr) -> RunningBus {
        amoskys_eventbus::start(self.bus_config(listen))
            .await
            .unwrap()
    }

    /// An agent config pointing at `bus`, with every collector off unless
    /// `edit` turns it on.
    pub fn agent_config(
        &self,
        bus: SocketAddr,
        edit: impl FnOnce(&mut AgentConfigFile),
    ) -> AgentConfig {
        let mut f = AgentConfigFile::default();
        f.collectors.process.enabled = false;
        f.collectors.inventory.enabled = false;
        f.heartbeat_interval = Some("500ms".into());
        f.batch.max_delay = Some("20ms".into());
        edit(&mut f);
        config::resolve(
            f,
            AgentOverrides {
                agent_id: Some("test-agent".into()),
                node: Some("node-a".into()),
                bus: Some(format!("https://{bus}")),
                tls_dir: Some(self.pki("agent")),
                spool_dir: Some(self.tmp.path().join("spool")),
                http: Some("127.0.0.1:0".into()),
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// An agent whose only collector is synthetic at `rate` events/s.
    pub async fn synthetic_agent(
        &self,
        bus: SocketAddr,
        rate: u64,
        edit: impl FnOnce(&mut AgentConfigFile),
    ) -> amoskys_agents::RunningAgent {
        amoskys_agents::start(self.agent_config(bus, |f| {
            f.collectors.synthetic.enabled = true;
            f.collectors.synthetic.rate = rate;
            edit(f);
        }))
        .await
        .unwrap()
    }

    /// The bus registry's record of the test agent, if it has one yet.
    pub async fn agent_record(&self, bus: SocketAddr) -> Option<amoskys_proto::AgentRecord> {
        let mut a = self.admin(bus).await;
        let list = a
            .admin
            .list_agents(amoskys_proto::ListAgentsRequest {})
            .await
            .ok()?
            .into_inner();
        list.agents.into_iter().find(|r| r.agent_id == "test-agent")
    }

    pub async fn reader(&self, bus: SocketAddr) -> BusClient {
        BusClient::connect(&ClientOptions::new(
            format!("https://{bus}"),
            self.pki("reader"),
        ))
        .await
        .unwrap()
    }

    pub async fn admin(&self, bus: SocketAddr) -> BusClient {
        BusClient::connect(&ClientOptions::new(
            format!("https://{bus}"),
            self.pki("admin"),
        ))
        .await
        .unwrap()
    }

    /// Every stored event of one collector.
    pub async fn stored(&self, bus: SocketAddr, collector: &str) -> Vec<Event> {
        self.reader(bus)
            .await
            .query_all(QueryRequest {
                filter: Some(Filter {
                    collectors: vec![collector.into()],
                    ..Default::default()
                }),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
    }
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of one metric line (name with labels, exactly as exposed).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A collector context whose events the test reads from the receiver.
pub struct Harness {
    pub rx: mpsc::Receiver<Draft>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<AgentMetrics>,
    pub stop: CancellationToken,
}

pub fn harness(name: &'static str, interval: Option<Duration>) -> (Ctx, Harness) {
    let (tx, rx) = mpsc::channel(100_000);
    let registry = Arc::new(Registry::default());
    let metrics = Arc::new(AgentMetrics::new());
    let stop = CancellationToken::new();
    let ctx = registry.register(name, interval, tx, metrics.clone(), stop.clone());
    (
        ctx,
        Harness {
            rx,
            registry,
            metrics,
            stop,
        },
    )
}

impl Drop for Harness {
    // A failed assertion must not leave a capture thread running, or the
    // test runtime waits for it forever.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Harness {
    /// Drafts received until `pred` has matched or `timeout` passed.
    pub async fn until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&[Draft]) -> bool,
    ) -> Vec<Draft> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut got = Vec::new();
        while !pred(&got) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(d)) => got.push(d),
                _ => break,
            }
        }
        got
    }
}

/// Pauses a collector of an in-process agent, as a control message would.
pub fn pause(agent: &amoskys_agents::RunningAgent, collector: &str) {
    agent
        .shared
        .collectors
        .apply(&amoskys_proto::Control {
            control_id: 1,
            collector: collector.into(),
            action: amoskys_proto::control::Action::Pause as i32,
            interval_ms: 0,
        })
        .unwrap();
}

/// What one collector of an in-process agent has produced so far.
pub fn produced(agent: &amoskys_agents::RunningAgent, collector: &str) -> u64 {
    agent
        .shared
        .collectors
        .statuses()
        .iter()
        .find(|s| s.name == collector)
        .map(|s| s.produced)
        .unwrap_or(0)
}
