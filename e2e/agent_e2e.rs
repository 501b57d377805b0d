#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! End-to-end on loopback: real `amoskys bus` and `amoskys agent`
//! processes; the agent killed with SIGKILL, started with bad configuration;
//! and `amoskys up`, the local all-in-one the README starts with.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amoskys_client::{BusClient, ClientOptions};
use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Filter, QueryRequest};
use common::{Agent, BIN, Bus, free_port, http_get, metric, opts, pki, start_bus};

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

/// A running `amoskys up` and what it printed until it said it was up.
struct Up {
    child: Agent,
    lines: Vec<String>,
}

impl Up {
    fn start(data: &Path, grpc: u16, http: u16) -> Up {
        let mut child = Command::new(BIN)
            .arg("up")
            .arg("--data-dir")
            .arg(data)
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .env("AMOSKYS_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let child = Agent(child);
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("`amoskys up` never said it was up ({e}): {lines:?}"));
            let done = line.starts_with("Ctrl-C stops everything");
            lines.push(line);
            if done {
                return Up { child, lines };
            }
        }
    }

    /// The value printed after `label` (its first word).
    fn printed(&self, label: &str) -> String {
        self.lines
            .iter()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {label:?} line in {:?}", self.lines))
            .to_string()
    }

    /// Ctrl-C, and the exit status within 30 s.
    fn interrupt(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.0.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "`amoskys up` did not stop on Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The seqs of `agent`'s synthetic events stored on the bus at `grpc`, once
/// there are more than `more_than`.
async fn synthetic_seqs(grpc: u16, data: &Path, agent: &str, more_than: usize) -> BTreeSet<u64> {
    let opts = ClientOptions::new(format!("https://127.0.0.1:{grpc}"), data.join("pki/reader"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seqs: BTreeSet<u64> = BusClient::connect(&opts)
            .await
            .unwrap()
            .query_all(QueryRequest {
                filter: Some(Filter {
                    agent_ids: vec![agent.into()],
                    ..Default::default()
                }),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_iter()
            .filter(|e| matches!(e.payload, Some(Payload::Synthetic(_))))
            .map(|e| e.seq)
            .collect();
        if seqs.len() > more_than {
            return seqs;
        }
        assert!(
            Instant::now() < deadline,
            "only {} synthetic events from {agent}",
            seqs.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_bus_agent_and_dashboard_stops_on_ctrl_c_and_keeps_its_state() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("amoskys");
    let (grpc, http) = (free_port(), free_port());

    let up = Up::start(&data, grpc, http);
    let token = up.printed("dashboard:");
    let token = token.split("login?token=").nth(1).unwrap().to_string();
    let on_disk = std::fs::read_to_string(data.join("dashboard-token")).unwrap();
    assert_eq!(
        token,
        on_disk.trim(),
        "the printed link carries the saved token"
    );
    let agent = up.printed("agent:");
    let ca = std::fs::read(data.join("pki/ca/tls.crt")).unwrap();

    // The agent's events reach the bus, and the dashboard shows the agent.
    let first = synthetic_seqs(grpc, &data, &agent, 2).await;
    let (status, body) = http_get(http, "/api/agents", Some(&token));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&agent), "{body}");
    assert_eq!(http_get(http, "/api/agents", None).0, 401);
    // The starter rules run, from files the user may now edit.
    assert_eq!(metric(http, "amoskys_bus_detect_rules_loaded"), 13.0);
    assert!(data.join("rules/container-shell.yaml").exists());
    assert!(
        up.lines
            .iter()
            .any(|l| l.contains("alerts:") && l.contains("amoskys alerts tail")),
        "{:?}",
        up.lines
    );

    let st = up.interrupt();
    assert!(st.success(), "Ctrl-C exits 0: {st:?}");

    // A second `up` reuses the PKI, the token and what was stored, and the
    // agent goes on from its last seq (a restart from 1 would be dropped as
    // duplicates).
    let up = Up::start(&data, grpc, http);
    assert_eq!(std::fs::read(data.join("pki/ca/tls.crt")).unwrap(), ca);
    assert!(up.printed("dashboard:").ends_with(&token));
    let again = synthetic_seqs(grpc, &data, &agent, first.len() + 2).await;
    assert!(
        first.is_subset(&again),
        "events stored before the stop are kept"
    );
    assert!(again.last() > first.last(), "new events after the restart");
    let st = up.interrupt();
    assert!(st.success(), "Ctrl-C exits 0: {st:?}");
}
