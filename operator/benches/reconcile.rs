#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Reconcile latency against the in-memory API, and the time to bring
//! 1,000 Agents' statuses current from a registry of 1,000 agents. Prints
//! figures; asserts nothing about time.
//!
//! The in-memory API answers in microseconds, so these are the operator's
//! own costs (building objects, serialization, PKI checks, client
//! overhead); a real API server adds its round trips on top.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use amoskys_operator::controller::agents::{History, Registry, SyncReport, node_names, sync_set};
use amoskys_operator::crd::{AgentSet, EventBus};
use amoskys_proto::{AgentRecord, CollectorStatus, Heartbeat};
use common::{NS, World, sample_bus, sample_set, world, world_at};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut v: Vec<Duration>) {
    let n = v.len();
    let p50 = pct(&mut v, 0.50);
    let p99 = pct(&mut v, 0.99);
    println!(
        "{what:<44} n={n:<4} p50={:>8.3} ms  p99={:>8.3} ms",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3
    );
}

async fn reconcile_latency(rounds: usize) {
    let w = world();
    w.api.insert(&sample_bus());
    w.api.insert(&sample_set());
    let t = Instant::now();
    w.reconcile_bus("amoskys").await;
    println!(
        "{:<44} {:>8.3} ms (CA and 3 leaf keys generated)",
        "EventBus first reconcile",
        t.elapsed().as_secs_f64() * 1e3
    );
    w.reconcile_set("nodes").await;

    let mut bus = Vec::new();
    let mut set = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        w.reconcile_bus("amoskys").await;
        bus.push(t.elapsed());
        let t = Instant::now();
        w.reconcile_set("nodes").await;
        set.push(t.elapsed());
    }
    report("EventBus reconcile, nothing to change", bus);
    report("AgentSet reconcile, nothing to change", set);

    // A spec edit each round: the ConfigMap, StatefulSet and status change.
    let mut changed = Vec::new();
    for i in 0..rounds {
        w.api.patch::<EventBus>(
            Some(NS),
            "amoskys",
            json!({"spec": {"wal": {"retention": format!("{}d", 7 + i % 2)}}}),
        );
        let t = Instant::now();
        w.reconcile_bus("amoskys").await;
        changed.push(t.elapsed());
    }
    report("EventBus reconcile after a spec edit", changed);
    let mut changed = Vec::new();
    for i in 0..rounds {
        w.api.patch::<AgentSet>(
            Some(NS),
            "nodes",
            json!({"spec": {"spoolSize": format!("{}Mi", 256 + i % 2)}}),
        );
        let t = Instant::now();
        w.reconcile_set("nodes").await;
        changed.push(t.elapsed());
    }
    report("AgentSet reconcile after a spec edit", changed);
}

fn record(i: usize, now_ns: i64, events: u64) -> AgentRecord {
    AgentRecord {
        agent_id: format!("nodes/node-{i:04}"),
        node: format!("node-{i:04}"),
        version: "0.1.0".into(),
        first_seen: now_ns - 60_000_000_000,
        last_seen: now_ns,
        events,
        last_seq: events,
        connected: true,
        last_heartbeat_at: now_ns,
        last_heartbeat: Some(Heartbeat {
            version: "0.1.0".into(),
            produced: events,
            sent: events,
            acked: events,
            events_per_second: 12.5,
            cert_serial: "01:02".into(),
            collectors: vec![CollectorStatus {
                name: "process".into(),
                mode: "netlink".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One pass of the Agent sync for `set`, as `sync_all` makes it: the
/// cluster's nodes, then the set's pods, Agents and statuses.
async fn sync_pass(w: &World, set: &AgentSet, reg: &Registry, history: &History) -> SyncReport {
    let nodes = node_names(&w.ctx).await.unwrap();
    sync_set(&w.ctx, set, &nodes, Some(reg), history)
        .await
        .unwrap()
}

async fn thousand_agents(n: usize) {
    let now = time::OffsetDateTime::now_utc();
    let now_ns = now.unix_timestamp_nanos() as i64;
    let w = world_at(now);
    w.api.insert(&sample_set());
    for i in 0..n {
        let node = format!("node-{i:04}");
        w.api.insert(
            &serde_json::from_value::<Node>(
                json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
            )
            .unwrap(),
        );
        w.api.insert(
            &serde_json::from_value::<Pod>(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("nodes-agent-{i:04}"), "namespace": NS,
                             "labels": amoskys_operator::labels::selector("agent", "nodes")},
                "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
            }))
            .unwrap(),
        );
    }
    let set: AgentSet = w.api.get(Some(NS), "nodes").unwrap();
    let history = History::default();
    let mut reg = Registry::default();
    reg.add((0..n).map(|i| record(i, now_ns, 1_000)).collect());

    let before = w.api.requests();
    let t = Instant::now();
    let r = sync_pass(&w, &set, &reg, &history).await;
    let first = t.elapsed();
    println!(
        "{:<44} {:>8.1} ms  ({} created, {} statuses, {} API calls)",
        format!("{n} Agents: first sync (create + status)"),
        first.as_secs_f64() * 1e3,
        r.created,
        r.status_written,
        w.api.requests() - before
    );

    let mut reg = Registry::default();
    reg.add((0..n).map(|i| record(i, now_ns, 2_000)).collect());
    let t = Instant::now();
    let r = sync_pass(&w, &set, &reg, &history).await;
    println!(
        "{:<44} {:>8.1} ms  ({} statuses written)",
        format!("{n} Agents: every status changed"),
        t.elapsed().as_secs_f64() * 1e3,
        r.status_written
    );
    let t = Instant::now();
    let r = sync_pass(&w, &set, &reg, &history).await;
    println!(
        "{:<44} {:>8.1} ms  ({} statuses written)",
        format!("{n} Agents: nothing changed"),
        t.elapsed().as_secs_f64() * 1e3,
        r.status_written
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let agents: usize = std::env::var("AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    rt.block_on(async {
        reconcile_latency(rounds).await;
        thousand_agents(agents).await;
    });
}
