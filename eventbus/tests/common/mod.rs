//! The bus tests' own helpers: clients for any TLS directory, Hello and
//! events to publish, and reading back. The PKI, the in-process bus and the
//! polling helpers are `amoskys-testkit`'s.
#![allow(dead_code)]

use std::path::Path;

use amoskys_client::{BusClient, ClientOptions};
use amoskys_eventbus::RunningBus;
use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Hello, Severity, SyntheticEvent};
#[allow(unused_imports)] // not every test crate uses each
pub use amoskys_testkit::{Env, eventually, http_get, metric};

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
