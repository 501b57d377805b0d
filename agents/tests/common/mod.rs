//! The agent tests' own helpers: agents in-process against the testkit's
//! bus, and collector contexts whose events a test reads directly.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use amoskys_agents::collectors::context::{Ctx, Registry};
use amoskys_agents::config::{self, AgentConfig, AgentConfigFile, AgentOverrides};
use amoskys_agents::metrics::AgentMetrics;
use amoskys_agents::spool::Draft;
use amoskys_client::BusClient;
use amoskys_proto::{Event, Filter, QueryRequest};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The shared test environment (dev PKI, in-process bus) plus the agent's
/// own helpers.
pub struct Env(pub amoskys_testkit::Env);

impl std::ops::Deref for Env {
    type Target = amoskys_testkit::Env;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Env {
    pub fn new() -> Self {
        Self(amoskys_testkit::Env::new())
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
            .list_agents(amoskys_proto::ListAgentsRequest::default())
            .await
            .ok()?
            .into_inner();
        list.agents.into_iter().find(|r| r.agent_id == "test-agent")
    }

    pub async fn reader(&self, bus: SocketAddr) -> BusClient {
        self.client(bus, "reader").await
    }

    pub async fn admin(&self, bus: SocketAddr) -> BusClient {
        self.client(bus, "admin").await
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

#[allow(unused_imports)] // not every test crate uses each
pub use amoskys_testkit::{eventually, free_addr, metric};

/// The body of a GET on the agent's (or bus's) plain HTTP side.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    amoskys_testkit::http_get(addr, path).await.1
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
