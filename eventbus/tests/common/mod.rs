//! Shared set-up for component tests: a real PKI on disk and a real bus
//! (RocksDB on a temp dir, mTLS on loopback) in-process.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use amoskys_client::identity::Role;
use amoskys_client::pki::{self, CertAuthority, DevPkiOptions, Validity};
use amoskys_client::{BusClient, ClientOptions};
use amoskys_eventbus::config::{BusConfig, SyncPolicy};
use amoskys_eventbus::{RunningBus, start};
use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Hello, Severity, SyntheticEvent};

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

    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }

    pub fn config(&self) -> BusConfig {
        let mut c = BusConfig::defaults(self.data_dir(), self.pki("bus"));
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.http = "127.0.0.1:0".parse().unwrap();
        c.sync = SyncPolicy::Batch;
        c.tls_reload_interval = Duration::from_millis(100);
        c.shutdown_grace = Duration::from_secs(5);
        c
    }

    pub async fn start(&self) -> RunningBus {
        start(self.config()).await.unwrap()
    }

    /// The dev CA, to issue more certificates in a test.
    pub fn ca(&self) -> CertAuthority {
        let dir = self.pki("ca");
        CertAuthority::from_pem(
            &std::fs::read_to_string(dir.join("tls.crt")).unwrap(),
            &std::fs::read_to_string(dir.join("tls.key")).unwrap(),
        )
        .unwrap()
    }

    /// A client certificate for `role` written to a new directory.
    pub fn issue_client(
        &self,
        name: &str,
        ca: &CertAuthority,
        role: Role,
        validity: Validity,
    ) -> PathBuf {
        let dir = self.tmp.path().join("extra").join(name);
        let mut c = ca.issue_client(name, role, validity).unwrap();
        // Trust the bus's real CA so only the client side is "wrong".
        c.ca_pem = std::fs::read_to_string(self.pki("ca").join("tls.crt")).unwrap();
        c.write_dir(&dir).unwrap();
        dir
    }
}

pub fn opts(bus: &RunningBus, tls_dir: &Path) -> ClientOptions {
    ClientOptions::new(format!("https://{}", bus.grpc_addr), tls_dir)
}

pub async fn client(bus: &RunningBus, tls_dir: &Path) -> BusClient {
    BusClient::connect(&opts(bus, tls_dir)).await.unwrap()
}

pub fn hello(agent: &str) -> Hello {
    Hello {
        agent_id: agent.into(),
        node: "node-1".into(),
        version: "test".into(),
        collectors: vec!["synthetic".into()],
        ..Default::default()
    }
}

pub fn event(agent: &str, seq: u64) -> Event {
    Event {
        agent_id: agent.into(),
        seq,
        collector: "synthetic".into(),
        observed_at: amoskys_eventbus::now_ns(),
        severity: Severity::Info as i32,
        payload: Some(Payload::Synthetic(SyntheticEvent {
            n: seq,
            data: vec![7; 100],
        })),
        ..Default::default()
    }
}

pub fn events(agent: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Event> {
    seqs.map(|s| event(agent, s)).collect()
}

/// GET on the bus's HTTP side: (status, body).
pub async fn http_get(bus: &RunningBus, path: &str) -> (u16, String) {
    let url = format!("http://{}{}", bus.http_addr, path);
    let r = reqwest::get(&url).await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// The value of one metric line (name with labels, exactly as exposed).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
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

/// Every stored event, read with the reader certificate.
pub async fn stored(bus: &RunningBus, env: &Env) -> Vec<Event> {
    let mut r = client(bus, &env.pki("reader")).await;
    r.query(amoskys_proto::QueryRequest {
        limit: 100_000,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Reads a Publish stream until `seq` is acked; returns duplicates reported.
pub async fn ack_until(p: &mut amoskys_client::Publisher, seq: u64) -> u64 {
    use amoskys_proto::publish_response::Msg as OutMsg;
    let mut dups = 0;
    loop {
        match p.next().await.unwrap() {
            Some(OutMsg::Ack(a)) => {
                dups += a.duplicates;
                if a.acked_seq >= seq {
                    return dups;
                }
            }
            Some(_) => {}
            None => panic!("stream ended before seq {seq} was acked"),
        }
    }
}
