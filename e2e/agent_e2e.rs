//! End-to-end on loopback: real `amoskys bus` and `amoskys agent`
//! processes; the agent killed with SIGKILL, started with bad configuration.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use amoskys_eventbus::client::BusClient;
use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Filter, QueryRequest};
use common::{Agent, BIN, Bus, free_port, opts, pki, start_bus};

const AGENT_CONFIG: &str = "heartbeatInterval: 1s\nbatch:\n  maxDelay: 20ms\ncollectors:\n  process:\n    enabled: false\n  inventory:\n    enabled: false\n  synthetic:\n    enabled: true\n    rate: 500\n";

fn start_agent(root: &Path, bus_port: u16) -> Agent {
    common::start_agent(root, bus_port, "e2e-agent", AGENT_CONFIG)
}

/// Every stored event of the agent (synthetic events and heartbeats).
async fn stored(bus: &Bus, root: &Path) -> Vec<Event> {
    BusClient::connect(&opts(bus, root, "reader"))
        .await
        .unwrap()
        .query_all(QueryRequest {
            filter: Some(Filter {
                agent_ids: vec!["e2e-agent".into()],
                ..Default::default()
            }),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap()
}

fn sigterm(child: &Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_continues_seq_resends_unacked_and_stores_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let ports = (free_port(), free_port());
    let mut bus = start_bus(root, "batch", Some(ports));
    let mut agent = start_agent(root, ports.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before_outage = stored(&bus, root).await.len();
    assert!(before_outage > 500, "events flow: {before_outage}");

    // Bus away: the agent spools what it cannot deliver, then dies hard.
    sigterm(&bus.child);
    let _ = bus.child.wait();
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    drop(bus);

    let bus = start_bus(root, "batch", Some(ports));
    let held = stored(&bus, root).await;
    let max_before = held.iter().map(|e| e.seq).max().unwrap();
    let restart_at = amoskys_agents::spool::now_ns();
    let mut agent = start_agent(root, ports.0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    sigterm(&agent.0);
    let st = agent.0.wait().unwrap();
    assert!(st.success(), "SIGTERM exits 0: {st:?}");

    let all = stored(&bus, root).await;
    let seqs: Vec<u64> = all.iter().map(|e| e.seq).collect();
    let unique: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(unique.len(), seqs.len(), "nothing stored twice");
    let max = *unique.last().unwrap();
    assert_eq!(
        unique.len() as u64,
        max,
        "seqs 1..={max} all present: the spooled, unacked ones were resent"
    );
    assert!(max > max_before + 1000, "the outage's events arrived");
    // Events produced after the restart got seqs after everything before it.
    let after: Vec<u64> = all
        .iter()
        .filter(|e| e.observed_at > restart_at)
        .map(|e| e.seq)
        .collect();
    let before_kill_max = all
        .iter()
        .filter(|e| e.observed_at < restart_at)
        .map(|e| e.seq)
        .max()
        .unwrap();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|&s| s > before_kill_max),
        "seq continues across kill -9"
    );
    // The restarted agent's synthetic counter started again at 1, yet both
    // lives' events are all there.
    let ones = all
        .iter()
        .filter(|e| matches!(&e.payload, Some(Payload::Synthetic(s)) if s.n == 1))
        .count();
    assert_eq!(ones, 2);
}

fn agent_fails(root: &Path, yaml: &str) -> String {
    let cfg = root.join("bad.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = Command::new(BIN)
        .arg("agent")
        .arg("--config")
        .arg(&cfg)
        .arg("--tls-dir")
        .arg(root.join("pki/agent"))
        .arg("--spool-dir")
        .arg(root.join("spool"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{yaml:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_agent_config_exits_nonzero_naming_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let e = agent_fails(root, "collectors:\n  kernelprobe:\n    enabled: true\n");
    assert!(e.contains("kernelprobe"), "{e}");
    let e = agent_fails(root, "spoool:\n  maxBytes: 1MiB\n");
    assert!(e.contains("spoool"), "{e}");
    let e = agent_fails(root, "collectors:\n  inventory:\n    interval: often\n");
    assert!(e.contains("collectors.inventory.interval"), "{e}");
    let e = agent_fails(
        root,
        "collectors:\n  snmp:\n    enabled: true\n    targets:\n    - address: 127.0.0.1\n      version: v3\n      user: x\n      authPasswordFile: /nonexistent/auth\n",
    );
    assert!(
        e.contains("collectors.snmp.targets[0].authPasswordFile"),
        "{e}"
    );
}
