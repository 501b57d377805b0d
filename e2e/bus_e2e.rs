#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! End-to-end on loopback: real `amoskys` processes with mTLS, killed with
//! SIGKILL, stopped with SIGTERM, started with bad configuration.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amoskys_client::{BusClient, ClientOptions};
use amoskys_proto::event::Payload;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{Event, Filter, Hello, QueryRequest, Severity, SyntheticEvent};

mod common;

use common::{BIN, Bus, cli, metric, opts, pki, start_bus};

fn event(agent: &str, seq: u64) -> Event {
    Event {
        agent_id: agent.into(),
        seq,
        collector: "synthetic".into(),
        severity: Severity::Info as i32,
        observed_at: 1,
        payload: Some(Payload::Synthetic(SyntheticEvent {
            n: seq,
            data: vec![1; 150],
        })),
        ..Default::default()
    }
}

fn hello(agent: &str) -> Hello {
    Hello {
        agent_id: agent.into(),
        node: "e2e".into(),
        ..Default::default()
    }
}

async fn stored_seqs(bus: &Bus, root: &Path, agent: &str) -> Vec<u64> {
    let mut r = BusClient::connect(&opts(bus, root, "reader"))
        .await
        .unwrap();
    let mut seqs = Vec::new();
    let mut from = 0;
    loop {
        let page = r
            .query(QueryRequest {
                from_offset: from,
                limit: 50_000,
                filter: Some(Filter {
                    agent_ids: vec![agent.into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        from = last.offset + 1;
        seqs.extend(page.iter().map(|e| e.seq));
    }
    seqs
}

/// Publishes `agent`'s events from `from` on, as fast as acks allow, until
/// the stream breaks or `until` is reached; records the highest ack.
async fn publish_until_broken(
    o: ClientOptions,
    agent: String,
    from: u64,
    until: u64,
    acked: Arc<AtomicU64>,
) {
    let Ok(mut c) = BusClient::connect(&o).await else {
        return;
    };
    let Ok(mut p) = c.publisher(hello(&agent), 32).await else {
        return;
    };
    let sender = p.sender();
    let agent2 = agent.clone();
    let producer = tokio::spawn(async move {
        let mut seq = from;
        while seq <= until {
            let hi = (seq + 199).min(until);
            let batch = (seq..=hi).map(|s| event(&agent2, s)).collect();
            let req = amoskys_proto::PublishRequest {
                msg: Some(amoskys_proto::publish_request::Msg::Batch(
                    amoskys_proto::Batch { events: batch },
                )),
            };
            if sender.send(req).await.is_err() {
                return;
            }
            seq = hi + 1;
        }
    });
    while let Ok(Some(msg)) = p.next().await {
        if let OutMsg::Ack(a) = msg {
            acked.fetch_max(a.acked_seq, Ordering::SeqCst);
            if a.acked_seq >= until {
                break;
            }
        }
    }
    producer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_publishing_loses_nothing_acked_and_stores_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    for sync in ["batch", "never"] {
        let agent = format!("kill9-{sync}");
        let mut bus = start_bus(root, sync, None);
        let acked = Arc::new(AtomicU64::new(0));
        let total = 2_000_000u64;
        let pub_task = tokio::spawn(publish_until_broken(
            opts(&bus, root, "agent"),
            agent.clone(),
            1,
            total,
            acked.clone(),
        ));
        // Let a good amount be acked, then kill the bus mid-stream.
        let deadline = Instant::now() + Duration::from_secs(60);
        while acked.load(Ordering::SeqCst) < 20_000 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bus.child.kill().unwrap(); // SIGKILL
        bus.child.wait().unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(10), pub_task).await;
        let acked_before = acked.load(Ordering::SeqCst);
        assert!(
            acked_before >= 20_000,
            "publishing was under way ({acked_before} acked)"
        );

        let ports = (bus.grpc, bus.http);
        drop(bus);
        let bus = start_bus(root, sync, Some(ports));
        let stored = stored_seqs(&bus, root, &agent).await;
        assert!(
            stored.len() as u64 >= acked_before,
            "every acked event survived: {} < {acked_before}",
            stored.len()
        );
        assert_eq!(
            stored,
            (1..=stored.len() as u64).collect::<Vec<_>>(),
            "in order, no gaps, no duplicates"
        );

        // The client resends from what it knew was acked (some are duplicates).
        let resend_from = acked_before.saturating_sub(500).max(1);
        let end = stored.len() as u64 + 1000;
        let acked2 = Arc::new(AtomicU64::new(0));
        publish_until_broken(
            opts(&bus, root, "agent"),
            agent.clone(),
            resend_from,
            end,
            acked2.clone(),
        )
        .await;
        assert_eq!(acked2.load(Ordering::SeqCst), end);
        let stored = stored_seqs(&bus, root, &agent).await;
        assert_eq!(
            stored,
            (1..=end).collect::<Vec<_>>(),
            "resends were not stored twice"
        );
        eprintln!(
            "sync={sync}: acked before kill {acked_before}, stored after restart {end} exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_acks_and_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let mut bus = start_bus(root, "batch", None);
    let mut c = BusClient::connect(&opts(&bus, root, "agent"))
        .await
        .unwrap();
    let mut p = c.publisher(hello("term"), 64).await.unwrap();
    for i in 0..50u64 {
        p.send(
            (i * 100 + 1..=i * 100 + 100)
                .map(|s| event("term", s))
                .collect(),
        )
        .await
        .unwrap();
    }
    let pid = bus.child.id();
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    // Whatever the bus acked before closing the stream is durable.
    let mut acked = 0;
    while let Ok(Some(msg)) = p.next().await {
        if let OutMsg::Ack(a) = msg {
            acked = a.acked_seq;
        }
    }
    let status = bus.child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    let ports = (bus.grpc, bus.http);
    drop(bus);
    let bus = start_bus(root, "batch", Some(ports));
    let stored = stored_seqs(&bus, root, "term").await;
    assert!(
        stored.len() as u64 >= acked,
        "acked {acked}, stored {}",
        stored.len()
    );
    assert_eq!(stored, (1..=stored.len() as u64).collect::<Vec<_>>());
}

fn run_bus_expecting_failure(args: &[&str], root: &Path) -> String {
    let out = Command::new(BIN)
        .arg("bus")
        .arg("--data-dir")
        .arg(root.join("data"))
        .arg("--tls-dir")
        .arg(root.join("pki/bus"))
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} must fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_or_flag_exits_nonzero_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let cfg = |name: &str, body: &str| -> PathBuf {
        let p = root.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--sync".into(), "sometimes".into()], "sync"),
        (vec!["--retention".into(), "forever".into()], "retention"),
        (vec!["--max-bytes".into(), "12 parsecs".into()], "maxBytes"),
        (
            vec!["--max-message-bytes".into(), "1".into()],
            "maxMessageBytes",
        ),
        (
            vec![
                "--config".into(),
                cfg("typo.yaml", "retension: 7d\n").display().to_string(),
            ],
            "retension",
        ),
        (
            vec![
                "--config".into(),
                cfg("type.yaml", "queueDepth: lots\n").display().to_string(),
            ],
            "queueDepth",
        ),
        (
            vec![
                "--config".into(),
                cfg("val.yaml", "shutdownGrace: never\n")
                    .display()
                    .to_string(),
            ],
            "shutdownGrace",
        ),
        (
            vec![
                "--config".into(),
                cfg("backup.yaml", "backup:\n  keep: 0\n  dir: /b\n")
                    .display()
                    .to_string(),
            ],
            "backup.keep",
        ),
        // A backup directory that cannot be created stops the start.
        (
            vec!["--backup-dir".into(), "/proc/amoskys-backup".into()],
            "backup dir /proc/amoskys-backup",
        ),
    ];
    for (args, field) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = run_bus_expecting_failure(&args, root);
        assert!(
            err.contains(field),
            "{args:?}: error should name {field}: {err}"
        );
    }
    // And a missing TLS directory is named too.
    let out = Command::new(BIN)
        .args([
            "bus",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--tls-dir",
            "/nonexistent/tls",
        ])
        .arg("--data-dir")
        .arg(root.join("d2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tls/tls.crt"));
}

#[test]
fn pki_init_refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    pki(&dir);
    for d in ["ca", "bus", "agent", "reader", "admin", "peer"] {
        for f in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(dir.join(d).join(f).is_file(), "{d}/{f}");
        }
    }
    let before = std::fs::read(dir.join("ca/tls.crt")).unwrap();
    let out = Command::new(BIN)
        .args(["pki", "init", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(dir.join("ca/tls.crt")).unwrap(), before);
    let st = Command::new(BIN)
        .args(["pki", "init", "--force", "--out"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success());
    assert_ne!(std::fs::read(dir.join("ca/tls.crt")).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_query_prints_json_lines_with_offsets_and_bench_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let bus = start_bus(root, "batch", None);
    let url = format!("https://127.0.0.1:{}", bus.grpc);
    let out = Command::new(BIN)
        .args([
            "bench", "--bus", &url, "--events", "5000", "--agents", "2", "--batch", "100",
        ])
        .arg("--tls-dir")
        .arg(root.join("pki/agent"))
        .arg("--tail-tls-dir")
        .arg(root.join("pki/reader"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("bench: events=5000 acked=5000 eps="),
        "{last}"
    );
    assert!(last.contains("ack_p99_ms="));
    // The Tail subscriber saw every event of the run.
    assert!(last.contains(" tail_events=5000 tail_p50_ms="), "{last}");
    // A Tail as an agent is refused, and the bench says so.
    let out = Command::new(BIN)
        .args(["bench", "--bus", &url, "--events", "10", "--agents", "1"])
        .arg("--tls-dir")
        .arg(root.join("pki/agent"))
        .arg("--tail-tls-dir")
        .arg(root.join("pki/agent"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("bench: error: tail:") && stdout.contains("Tail"),
        "{stdout}"
    );

    let out = Command::new(BIN)
        .args([
            "events", "query", "--bus", &url, "--output", "json", "--limit", "3", "--agent",
            "bench-1",
        ])
        .arg("--tls-dir")
        .arg(root.join("pki/reader"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|v| v["offset"].as_u64().is_some_and(|o| o > 0) && v["agent_id"] == "bench-1")
    );

    // Tail from offset 1, stopping after 10 events.
    let out = Command::new(BIN)
        .args([
            "events",
            "tail",
            "--bus",
            &url,
            "--output",
            "json",
            "--from-offset",
            "1",
            "--limit",
            "10",
        ])
        .arg("--tls-dir")
        .arg(root.join("pki/reader"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let offsets: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_reports_what_was_acked_when_the_bus_dies_mid_run() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let mut bus = start_bus(root, "batch", None);
    let url = format!("https://127.0.0.1:{}", bus.grpc);
    let child = Command::new(BIN)
        .args([
            "bench", "--bus", &url, "--events", "50000000", "--agents", "2",
        ])
        .arg("--tls-dir")
        .arg(root.join("pki/agent"))
        .env("AMOSKYS_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the bus once the bench has had events stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut r = BusClient::connect(&opts(&bus, root, "reader"))
            .await
            .unwrap();
        let got = r
            .query(QueryRequest {
                limit: 1,
                from_offset: 5000,
                ..Default::default()
            })
            .await
            .unwrap();
        if !got.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bus.child.kill().unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("the bus failed mid-run"), "{stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    let acked: u64 = last
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("acked="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(last.starts_with("bench: events=50000000 acked="), "{last}");
    assert!(acked > 0 && acked < 50_000_000, "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_into_a_bus_that_holds_what_it_held() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    pki(&root.join("pki"));
    let (bus, backup_dir) = common::start_bus_with_backups(root, None);
    let url = format!("https://127.0.0.1:{}", bus.grpc);
    let bench = |prefix: &str| {
        cli(&[
            "bench",
            "--bus",
            &url,
            "--tls-dir",
            &s(&root.join("pki/agent")),
            "--events",
            "2000",
            "--agents",
            "2",
            "--batch",
            "50",
            "--agent-prefix",
            prefix,
        ])
    };
    let (ok, out) = bench("before");
    assert!(ok && out.contains("acked=2000"), "{out}");

    // Only an admin may ask for a backup.
    let now = |who: &str| common::backup_now(bus.grpc, &root.join("pki").join(who));
    let (ok, out) = now("reader");
    assert!(!ok && out.contains("Admin.Backup"), "{out}");
    // A bus without a backup directory says so.
    std::fs::create_dir(root.join("other")).unwrap();
    std::os::unix::fs::symlink(root.join("pki"), root.join("other/pki")).unwrap();
    let other = common::start_bus_with(&root.join("other"), "batch", None, &[]);
    let (ok, out) = common::backup_now(other.grpc, &root.join("pki/admin"));
    assert!(!ok && out.contains("no backup directory"), "{out}");
    drop(other);
    let (ok, out) = now("admin");
    assert!(ok && out.starts_with("backup 1 taken at "), "{out}");
    assert!(out.contains("1 backups kept in"), "{out}");
    assert_eq!(metric(bus.http, "amoskys_bus_backups_total"), 1.0);

    // Writes after the backup are not in it; the bus dies without a clean close.
    let (ok, out) = bench("after");
    assert!(ok && out.contains("acked=2000"), "{out}");
    drop(bus);

    let (ok, out) = cli(&["backup", "list", "--dir", &s(&backup_dir), "--verify"]);
    assert!(ok, "{out}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(
        rows[0].trim_start().starts_with("1 ") && rows[0].ends_with("ok"),
        "{out}"
    );

    let (ok, out) = cli(&[
        "backup",
        "restore",
        "--dir",
        &s(&backup_dir),
        "--data-dir",
        &s(&root.join("data")),
    ]);
    assert!(!ok && out.contains("is not empty"), "{out}");
    let (ok, out) = cli(&[
        "backup",
        "restore",
        "--dir",
        &s(&backup_dir),
        "--data-dir",
        &s(&root.join("second/data")),
        "--id",
        "7",
    ]);
    assert!(
        !ok && out.contains("no backup with id 7 (ids held: 1)"),
        "{out}"
    );

    // The restored bus runs in its own root, sharing the PKI, and backs up
    // on a schedule into a directory of its own.
    let second = root.join("second");
    let (ok, out) = cli(&[
        "backup",
        "restore",
        "--dir",
        &s(&backup_dir),
        "--data-dir",
        &s(&second.join("data")),
    ]);
    assert!(ok && out.starts_with("restored backup 1 "), "{out}");
    std::os::unix::fs::symlink(root.join("pki"), second.join("pki")).unwrap();
    let cfg2 = root.join("bus2.yaml");
    let backup2 = root.join("backup2");
    std::fs::write(
        &cfg2,
        format!(
            "backup:\n  dir: {}\n  interval: 1s\n  keep: 2\n",
            s(&backup2)
        ),
    )
    .unwrap();
    let bus2 = common::start_bus_with(&second, "batch", None, &["--config", &s(&cfg2)]);
    for agent in ["before-0", "before-1"] {
        assert_eq!(
            stored_seqs(&bus2, root, agent).await,
            (1..=1000).collect::<Vec<_>>(),
            "{agent}"
        );
    }
    assert_eq!(stored_seqs(&bus2, root, "after-0").await, Vec::<u64>::new());

    // The registry came back with the events: the agent is told where it
    // stands, and what it resends from before that is dropped as a duplicate.
    let o = opts(&bus2, root, "agent");
    let mut c = BusClient::connect(&o).await.unwrap();
    let p = c.publisher(hello("before-0"), 8).await.unwrap();
    assert_eq!(p.welcome_acked_seq, 1000);
    drop(p);
    let acked = Arc::new(AtomicU64::new(0));
    publish_until_broken(o, "before-0".into(), 991, 1010, acked.clone()).await;
    assert_eq!(acked.load(Ordering::SeqCst), 1010);
    assert_eq!(
        stored_seqs(&bus2, root, "before-0").await,
        (1..=1010).collect::<Vec<_>>()
    );

    // Scheduled backups, the oldest removed past `keep`.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(bus2.http, "amoskys_bus_backups_total") < 3.0 {
        assert!(Instant::now() < deadline, "no third scheduled backup");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        metric(
            bus2.http,
            "amoskys_bus_backup_last_success_timestamp_seconds"
        ) > 1.7e9
    );
    assert_eq!(metric(bus2.http, "amoskys_bus_backup_errors_total"), 0.0);
    let (ok, out) = cli(&["backup", "list", "--dir", &s(&backup2)]);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 1 + 2, "{out}");
}
