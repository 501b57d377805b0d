#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! `Agent` resources from a real bus registry: a bus in-process (RocksDB on
//! a temp dir, mTLS on loopback) fed by a real agent, read with the admin
//! certificate the way the operator does, written into the in-memory API.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use amoskys_client::Pems;
use amoskys_client::pki::{DevPkiOptions, init_dev_pki};
use amoskys_eventbus::config::{BusConfig, SyncPolicy};
use amoskys_operator::controller::agents::{
    History, Registry, RegistryReader, ReplicaUrl, node_names, sync_set,
};
use amoskys_operator::crd::{Agent, AgentSet};
use common::{NS, World, in_ns, sample_bus, sample_set, world_at};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use time::OffsetDateTime;

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
        .unwrap()
}

fn agent_pod(set: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{set}-agent-{node}"), "namespace": NS,
                     "labels": amoskys_operator::labels::selector("agent", set)},
        "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
    }))
    .unwrap()
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn pems(dir: &std::path::Path) -> Pems {
    let r = |f: &str| std::fs::read(dir.join(f)).unwrap();
    Pems {
        ca: r("ca.crt"),
        cert: r("tls.crt"),
        key: r("tls.key"),
    }
}

fn replica(bus: SocketAddr) -> ReplicaUrl {
    (format!("https://{bus}"), Some("localhost".into()))
}

async fn registry(bus: SocketAddr, admin: &Pems) -> Registry {
    let r = RegistryReader::default().read(&[replica(bus)], admin).await;
    assert!(r.complete(), "{:?}", r.unreachable);
    r
}

/// Reads the registry until `ok` holds for the agent's record.
async fn registry_until(
    bus: SocketAddr,
    admin: &Pems,
    ok: impl Fn(&amoskys_proto::AgentRecord) -> bool,
) -> Registry {
    for _ in 0..100 {
        let r = registry(bus, admin).await;
        if r.agents.get("nodes/node-a").is_some_and(&ok) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the registry never showed the expected record");
}

fn agent(w: &World, name: &str) -> Option<Agent> {
    w.api.get(Some(NS), name)
}

async fn sync(w: &World, reg: Option<&Registry>, history: &History) {
    let set: AgentSet = w.api.get(Some(NS), "nodes").unwrap();
    let nodes = node_names(&w.ctx).await.unwrap();
    sync_set(&w.ctx, &set, &nodes, reg, history).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_resources_follow_the_bus_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    init_dev_pki(&DevPkiOptions::new(&pki)).unwrap();
    let mut cfg = BusConfig::defaults(tmp.path().join("bus"), pki.join("bus"));
    cfg.listen = free_addr();
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.sync = SyncPolicy::Batch;
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let addr = bus.grpc_addr;

    let mut f = amoskys_agents::config::AgentConfigFile::default();
    f.collectors.process.enabled = false;
    f.collectors.inventory.enabled = false;
    f.collectors.synthetic.enabled = true;
    f.collectors.synthetic.rate = 50;
    f.heartbeat_interval = Some("200ms".into());
    let agent_cfg = amoskys_agents::config::resolve(
        f,
        amoskys_agents::config::AgentOverrides {
            // What the DaemonSet passes: `<agentset>/<node>`.
            agent_id: Some("nodes/node-a".into()),
            node: Some("node-a".into()),
            bus: Some(format!("https://{addr}")),
            tls_dir: Some(pki.join("agent")),
            spool_dir: Some(tmp.path().join("spool")),
            http: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let running = amoskys_agents::start(agent_cfg).await.unwrap();

    let w = world_at(OffsetDateTime::now_utc());
    w.api.insert(&sample_bus());
    w.api.insert(&sample_set());
    for n in ["node-a", "node-b", "node-c"] {
        w.api.insert(&node(n));
    }
    // The DaemonSet runs on a and b; c is excluded by its node selector.
    w.api.insert(&in_ns(agent_pod("nodes", "node-a")));
    w.api.insert(&in_ns(agent_pod("nodes", "node-b")));

    let admin = pems(&pki.join("admin"));
    let reg = registry_until(addr, &admin, |r| {
        r.events > 0 && r.last_heartbeat.as_ref().is_some_and(|h| h.acked > 0)
    })
    .await;
    // The bus's own certificate and the agent's count as loaded.
    let agent_serial = amoskys_operator::rotation::cert_facts(
        &std::fs::read_to_string(pki.join("agent/tls.crt")).unwrap(),
    )
    .unwrap()
    .0;
    assert!(
        reg.loaded_serials.contains(&agent_serial),
        "{:?}",
        reg.loaded_serials
    );
    assert_eq!(reg.loaded_serials.len(), 2);
    // Each replica's own stats, which retiring shards are removed by.
    let own = &reg.shards[&0];
    assert!(own.events_stored > 0 && own.newest_stored_at > 0, "{own:?}");
    assert!(!own.retiring && own.shards.is_empty());

    let history = History::default();
    sync(&w, Some(&reg), &history).await;
    let a = agent(&w, "nodes-node-a").expect("an Agent for node-a");
    assert_eq!(a.spec.agent_id, "nodes/node-a");
    assert_eq!(
        a.metadata.owner_references.as_ref().unwrap()[0].kind,
        "AgentSet"
    );
    let st = a.status.unwrap();
    assert_eq!(st.phase, "Running", "{}", st.reason);
    let rec = &reg.agents["nodes/node-a"];
    assert_eq!(st.events_total, rec.events);
    assert!(st.events_total > 0);
    assert!(st.last_seen.is_some());
    assert_eq!(st.cert_serial, agent_serial);
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert!(
        st.collectors
            .iter()
            .any(|c| c.name == "synthetic" && c.mode == "rate"),
        "{:?}",
        st.collectors
    );
    let b = agent(&w, "nodes-node-b").expect("an Agent for node-b");
    assert_eq!(b.status.unwrap().phase, "Pending");
    assert!(agent(&w, "nodes-node-c").is_none(), "no pod on node-c");

    // Connections are kept from one read to the next, and dialled again
    // when the credentials change or a read fails.
    let reader = RegistryReader::default();
    for _ in 0..3 {
        assert!(reader.read(&[replica(addr)], &admin).await.complete());
    }
    assert_eq!(reader.connects(), 1);
    let denied = reader
        .read(&[replica(addr)], &pems(&pki.join("reader")))
        .await;
    assert_eq!(reader.connects(), 2);
    assert!(
        denied.unreachable[0]
            .1
            .to_lowercase()
            .contains("permission"),
        "{:?}",
        denied.unreachable
    );

    // One replica of two does not answer: the other's records are read,
    // and rotation is given no loaded serials to go on.
    let dead = replica(free_addr());
    let partial = reader.read(&[replica(addr), dead.clone()], &admin).await;
    assert_eq!(
        reader.connects(),
        3,
        "the failed connection is dialled again"
    );
    assert!(partial.agents.contains_key("nodes/node-a"));
    assert_eq!(partial.unreachable.len(), 1);
    assert_eq!(partial.unreachable[0].0, dead.0);
    assert!(partial.loaded_for_rotation().is_none());
    assert_eq!(
        reg.loaded_for_rotation(),
        Some(reg.loaded_serials.as_slice())
    );
    reader.retain(&[replica(addr)].into());
    reader.read(&[replica(addr)], &admin).await;
    assert_eq!(reader.connects(), 3);
    reader.retain(&Default::default());
    reader.read(&[replica(addr)], &admin).await;
    assert_eq!(
        reader.connects(),
        4,
        "a dropped replica's connection is closed"
    );

    // An agent whose record a partial registry lacks keeps its status; a
    // complete registry without it means the bus has never heard of it.
    let lacking = Registry {
        unreachable: vec![(dead.0.clone(), "refused".into())],
        ..Default::default()
    };
    sync(&w, Some(&lacking), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Running");
    sync(&w, Some(&Registry::default()), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Pending");

    // Heartbeats stop arriving (the clock moves past the missed-heartbeat
    // window while the registry still says connected).
    w.clock.advance(Duration::from_secs(31));
    sync(&w, Some(&reg), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Disconnected");
    assert!(st.reason.contains("no heartbeat"), "{}", st.reason);

    // The agent goes away: its stream closes and the bus says so.
    running.shutdown().await;
    let reg = registry_until(addr, &admin, |r| !r.connected).await;
    sync(&w, Some(&reg), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Disconnected");
    assert_eq!(st.reason, "no stream to the bus");

    // The node is removed: its Agent goes. The pod is removed: its Agent goes.
    w.api.delete::<Node>(None, "node-b");
    sync(&w, Some(&reg), &history).await;
    assert!(agent(&w, "nodes-node-b").is_none());
    w.api.delete::<Pod>(Some(NS), "nodes-agent-node-a");
    sync(&w, Some(&reg), &history).await;
    assert!(agent(&w, "nodes-node-a").is_none());
    assert!(w.api.list::<Agent>(Some(NS)).is_empty());

    bus.shutdown().await.unwrap();
}
