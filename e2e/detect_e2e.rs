#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Detection with real processes: a real agent (process over netlink,
//! inventory, flows on `lo`) and a bus running the starter rules; and a bus
//! killed with SIGKILL after it wrote alerts but before it saved its cursor.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use amoskys_client::BusClient;
use amoskys_proto::event::Payload;
use amoskys_proto::{Alert, Event, Hello, ProcessEvent, QueryRequest, Severity, process_event};

mod common;
use common::{Bus, cli, free_port, metric, opts, pki, start_agent, start_bus_with};

fn starter_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules")
}

/// A bus running the starter rules, saving its detector cursor every `checkpoint`.
fn start_detecting_bus(root: &Path, ports: Option<(u16, u16)>, checkpoint: &str) -> Bus {
    let cfg = root.join("bus.yaml");
    std::fs::write(
        &cfg,
        format!(
            "detection:\n  rulesDir: {}\n  reloadInterval: 200ms\n  checkpointInterval: {checkpoint}\n",
            starter_rules().display()
        ),
    )
    .unwrap();
    start_bus_with(root, "batch", ports, &["--config", cfg.to_str().unwrap()])
}

async fn alerts(bus: &Bus, root: &Path) -> Vec<(Event, Alert)> {
    amoskys_testkit::alerts(
        &mut BusClient::connect(&opts(bus, root, "reader"))
            .await
            .unwrap(),
    )
    .await
}

async fn wait_alerts(
    bus: &Bus,
    root: &Path,
    what: &str,
    done: impl Fn(&[(Event, Alert)]) -> bool,
) -> Vec<(Event, Alert)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = alerts(bus, root).await;
        if done(&a) {
            return a;
        }
        assert!(Instant::now() < deadline, "{what}: got {a:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rules_of(a: &[(Event, Alert)]) -> Vec<String> {
    let mut r: Vec<String> = a
        .iter()
        .filter(|(_, x)| x.updates_seq == 0)
        .map(|(_, x)| x.rule.clone())
        .collect();
    r.sort();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_s_activity_raises_exactly_the_starter_rules_alerts() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let bus = start_detecting_bus(root, None, "1s");
    let _agent = start_agent(
        root,
        bus.grpc,
        "detect-e2e",
        "heartbeatInterval: 1s\nbatch:\n  maxDelay: 20ms\ncollectors:\n  process:\n    enabled: true\n  inventory:\n    enabled: true\n    interval: 1s\n  flow:\n    enabled: true\n    interface: lo\n    idleTimeout: 1s\n",
    );
    // Let the collectors take their first snapshot: what runs already is
    // not new.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // A shell on the node: no starter rule speaks of shells outside containers.
    let st = Command::new("sh").args(["-c", "true"]).status().unwrap();
    assert!(st.success());

    // A program run from /dev/shm, twice: one alert, counted twice.
    let shm = PathBuf::from(format!("/dev/shm/amoskys-e2e-{}", std::process::id()));
    std::fs::copy("/bin/sleep", &shm).unwrap();
    for _ in 0..2 {
        let st = Command::new(&shm).arg("1.5").status().unwrap();
        assert!(st.success());
    }
    let _ = std::fs::remove_file(&shm);

    // A new listener on the node.
    let port = free_port();
    let listener = Command::new("python3")
        .args([
            "-c",
            &format!("import socket,time\ns=socket.socket()\ns.bind(('127.0.0.1',{port}))\ns.listen()\ntime.sleep(60)"),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // Connections to 30 closed ports within a second: a scan.
    let closed: Vec<u16> = (0..30).map(|_| free_port()).collect();
    for p in &closed {
        let _ = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], *p)),
            Duration::from_millis(200),
        );
    }

    // Other tests' buses open listeners too: wait for ours by its port.
    wait_alerts(&bus, root, "the starter rules' alerts", |a| {
        let r = rules_of(a);
        ["exec-from-shm-or-tmp", "port-scan"]
            .iter()
            .all(|want| r.iter().any(|x| x == want))
            && a.iter().any(|(_, x)| {
                x.rule == "new-listener-on-node" && x.summary.contains(&format!("port={port}"))
            })
    })
    .await;
    let mut listener = listener;
    let _ = listener.kill();
    let _ = listener.wait();
    // Late duplicates would show by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = alerts(&bus, root).await;
    // Other tests running beside this one open listeners on this host too:
    // those are new listeners as well, with keys of their own.
    let ours: Vec<(Event, Alert)> = got
        .iter()
        .filter(|(_, a)| {
            a.rule != "new-listener-on-node" || a.summary.contains(&format!("port={port}"))
        })
        .cloned()
        .collect();
    assert_eq!(
        rules_of(&ours),
        vec!["exec-from-shm-or-tmp", "new-listener-on-node", "port-scan"],
        "{got:#?}"
    );
    assert!(
        rules_of(&got).iter().all(|r| [
            "exec-from-shm-or-tmp",
            "new-listener-on-node",
            "port-scan"
        ]
        .contains(&r.as_str())),
        "{got:#?}"
    );
    let got = ours;
    let reader_all = BusClient::connect(&opts(&bus, root, "reader"))
        .await
        .unwrap()
        .query(QueryRequest {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap();
    for (e, a) in &got {
        assert_eq!(e.agent_id, "amoskys:detect/0");
        if a.updates_seq != 0 {
            continue;
        }
        let src = reader_all
            .iter()
            .find(|s| s.offset == a.source_offset)
            .expect("the source event is stored");
        assert_eq!(src.agent_id, "detect-e2e");
        match a.rule.as_str() {
            "exec-from-shm-or-tmp" => {
                let Some(Payload::Process(p)) = &src.payload else {
                    panic!("{src:?}")
                };
                assert_eq!(p.exe, shm.display().to_string());
                assert_eq!(p.kind, process_event::Kind::Start as i32);
            }
            "new-listener-on-node" => {
                assert!(a.summary.contains(&format!("port={port}")), "{}", a.summary);
            }
            "port-scan" => assert_eq!(a.kind, "threshold"),
            other => panic!("{other}"),
        }
    }
    // The second run of the same program raised the count, not a new alert.
    assert!(
        metric(
            bus.http,
            "amoskys_bus_detect_suppressed_total{rule=\"exec-from-shm-or-tmp\",reason=\"dedup\"}"
        ) >= 1.0
    );
    assert_eq!(metric(bus.http, "amoskys_bus_detect_rules_failed"), 0.0);
}

fn hello(agent: &str) -> Hello {
    Hello {
        agent_id: agent.into(),
        node: "node-1".into(),
        version: "e2e".into(),
        incarnation: 7,
        ..Default::default()
    }
}

fn process(seq: u64, name: &str, exe: &str, container: &str) -> Event {
    Event {
        agent_id: "n1".into(),
        seq,
        collector: "process".into(),
        observed_at: amoskys_eventbus::now_ns(),
        severity: Severity::Info as i32,
        payload: Some(Payload::Process(ProcessEvent {
            kind: process_event::Kind::Start as i32,
            name: name.into(),
            exe: exe.into(),
            container_id: container.into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

async fn publish(bus: &Bus, root: &Path, events: Vec<Event>) {
    let mut c = BusClient::connect(&opts(bus, root, "agent")).await.unwrap();
    let mut p = c.publisher(hello("n1"), 8).await.unwrap();
    let last = events.last().unwrap().seq;
    p.send(events).await.unwrap();
    loop {
        match p.next().await.unwrap() {
            Some(amoskys_proto::publish_response::Msg::Ack(a)) if a.acked_seq >= last => break,
            Some(_) => {}
            None => panic!("stream ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_alerts_before_the_cursor_is_saved_leaves_one_copy_of_each() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let ports = (free_port(), free_port());
    // The cursor is saved when the detector starts, then not for an hour:
    // everything after the start is evaluated again after the kill.
    let mut bus = start_detecting_bus(root, Some(ports), "1h");
    publish(
        &bus,
        root,
        vec![
            process(1, "bash", "/bin/bash", "c0ffee"),
            process(2, "ls", "/bin/ls", ""),
            process(3, "x", "/dev/shm/x", ""),
            process(4, "xmrig", "/tmp/xmrig", ""),
        ],
    )
    .await;
    let before = wait_alerts(&bus, root, "three alerts", |a| a.len() >= 3).await;
    assert_eq!(
        rules_of(&before),
        vec![
            "crypto-miner-process",
            "exec-from-shm-or-tmp",
            "shell-in-container"
        ]
    );
    bus.child.kill().unwrap();
    bus.child.wait().unwrap();

    let bus = start_detecting_bus(root, Some(ports), "1h");
    // Something new after the restart, so we know the detector has gone
    // past everything the old one saw.
    publish(&bus, root, vec![process(5, "zsh", "/bin/zsh", "beef")]).await;
    let after = wait_alerts(&bus, root, "the new shell's alert", |a| a.len() >= 4).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_all = alerts(&bus, root).await;
    assert_eq!(after_all.len(), 4, "{after_all:#?}");
    assert_eq!(after.len(), 4);
    let mut keys: Vec<(String, u64)> = after_all
        .iter()
        .map(|(e, _)| (e.agent_id.clone(), e.seq))
        .collect();
    keys.dedup();
    assert_eq!(keys.len(), 4, "each alert stored once");
    // They were evaluated again, and the writer dropped the second copies.
    assert!(
        metric(bus.http, "amoskys_bus_duplicates_total") >= 3.0,
        "re-evaluated alerts dropped as duplicates"
    );

    // A backtest over what is stored names the same matches and writes nothing.
    let (ok, out) = cli(&[
        "rules",
        "test",
        starter_rules().to_str().unwrap(),
        "--bus",
        &format!("https://127.0.0.1:{}", bus.grpc),
        "--tls-dir",
        root.join("pki/reader").to_str().unwrap(),
        "--since",
        "1h",
    ]);
    assert!(ok, "{out}");
    for rule in [
        "shell-in-container",
        "exec-from-shm-or-tmp",
        "crypto-miner-process",
    ] {
        assert!(out.contains(&format!("would alert  {rule}")), "{out}");
    }
    assert!(out.contains("4 alerts would be written"), "{out}");
    assert_eq!(
        alerts(&bus, root).await.len(),
        4,
        "a backtest writes nothing"
    );
    let (_, listed) = cli(&[
        "alerts",
        "list",
        "--bus",
        &format!("https://127.0.0.1:{}", bus.grpc),
        "--tls-dir",
        root.join("pki/reader").to_str().unwrap(),
    ]);
    assert_eq!(
        listed
            .lines()
            .filter(|l| l.contains("shell-in-container"))
            .count(),
        2,
        "{listed}"
    );
}

#[test]
fn rules_test_names_what_fails_and_where() {
    let (ok, out) = cli(&["rules", "test", starter_rules().to_str().unwrap()]);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        13,
        "{out}"
    );
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: bad}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'sh' && process.argz == ''\"\n  summary: s\n---\napiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: wrong}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'sh'\"\n  summary: s\n  tests:\n  - {name: bash, event: {process: {name: bash}}, expect: match}\n",
    )
    .unwrap();
    let (ok, out) = cli(&["rules", "test", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        out.contains("FAIL  bad") && out.contains("(line 1, column 25): process.argz"),
        "{out}"
    );
    assert!(
        out.contains("FAIL  wrong / bash: expected a match"),
        "{out}"
    );
}

/// A webhook receiver: answers 503 while `up` is false, and keeps every
/// alert id it accepted (in order) when up.
#[derive(Default)]
struct Receiver {
    up: std::sync::atomic::AtomicBool,
    refused: std::sync::atomic::AtomicU64,
    accepted: std::sync::Mutex<Vec<serde_json::Value>>,
}

async fn start_receiver() -> (std::sync::Arc<Receiver>, u16) {
    use axum::http::StatusCode;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    let r = Arc::new(Receiver::default());
    let state = r.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let r = state.clone();
            async move {
                if !r.up.load(Ordering::SeqCst) {
                    r.refused.fetch_add(1, Ordering::SeqCst);
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                r.accepted
                    .lock()
                    .unwrap()
                    .extend(v["alerts"].as_array().unwrap().iter().cloned());
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (r, port)
}

/// A real Alertmanager (Debian's prometheus-alertmanager, which the set-up
/// installs) on loopback, routing to nowhere: the test reads its API.
struct Alertmanager {
    child: std::process::Child,
    port: u16,
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_alertmanager(root: &Path) -> Alertmanager {
    let bin = std::env::var("AMOSKYS_ALERTMANAGER")
        .unwrap_or_else(|_| "/usr/bin/prometheus-alertmanager".into());
    assert!(
        Path::new(&bin).exists(),
        "Alertmanager not found at {bin}: run scripts/setup.sh (it installs prometheus-alertmanager) or set AMOSKYS_ALERTMANAGER"
    );
    let dir = root.join("alertmanager");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("am.yml"),
        "route:\n  receiver: none\nreceivers:\n  - name: none\n",
    )
    .unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", dir.join("am.yml").display()))
        .arg(format!("--storage.path={}", dir.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let am = Alertmanager { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::http_get(port, "/-/ready", None).0 != 200 {
        assert!(Instant::now() < deadline, "Alertmanager did not get ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    am
}

fn accepted_ids(r: &Receiver) -> Vec<String> {
    r.accepted
        .lock()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_alertmanager_and_a_webhook_once_across_an_outage_and_a_sigkill() {
    use std::sync::atomic::Ordering;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let (hook, hook_port) = start_receiver().await;
    let am = start_alertmanager(root);
    let ports = (free_port(), free_port());
    let cfg = root.join("bus.yaml");
    std::fs::write(
        &cfg,
        format!(
            "detection:\n  rulesDir: {}\n  reloadInterval: 200ms\n  checkpointInterval: 1h\n\
             alerting:\n  externalUrl: https://dash.example\n  alertmanager:\n    url: http://127.0.0.1:{}\n  \
             webhook:\n    url: http://127.0.0.1:{hook_port}/hook\n    maxBatch: 2\n    timeout: 2s\n",
            starter_rules().display(),
            am.port,
        ),
    )
    .unwrap();
    let start = || {
        start_bus_with(
            root,
            "batch",
            Some(ports),
            &["--config", cfg.to_str().unwrap()],
        )
    };
    let mut bus = start();

    // The webhook is down; three alerts are stored and wait.
    let down_since = Instant::now();
    publish(
        &bus,
        root,
        vec![
            process(1, "bash", "/bin/bash", "c0ffee"),
            process(2, "x", "/dev/shm/x", ""),
            process(3, "xmrig", "/tmp/xmrig", ""),
        ],
    )
    .await;
    wait_alerts(&bus, root, "three alerts", |a| a.len() >= 3).await;
    wait_for("the webhook's refusals", 30, || {
        hook.refused.load(Ordering::SeqCst) >= 2
    })
    .await;
    assert!(accepted_ids(&hook).is_empty());
    assert!(
        metric(
            bus.http,
            "amoskys_bus_alert_sink_errors_total{sink=\"webhook\",reason=\"status\"}"
        ) >= 1.0
    );

    // Killed between the match and its delivery to the webhook.
    bus.child.kill().unwrap();
    bus.child.wait().unwrap();
    let bus = start();
    // The receiver stays down for 30 s in all, across the restart.
    let outage = Duration::from_secs(30);
    tokio::time::sleep(outage.saturating_sub(down_since.elapsed())).await;
    hook.up.store(true, Ordering::SeqCst);
    wait_for("three alerts at the webhook", 60, || {
        accepted_ids(&hook).len() >= 3
    })
    .await;

    // One more alert after the outage; then each alert was received once.
    publish(&bus, root, vec![process(4, "zsh", "/bin/zsh", "beef")]).await;
    wait_for("the fourth alert at the webhook", 60, || {
        accepted_ids(&hook).len() >= 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stored = alerts(&bus, root).await;
    assert_eq!(stored.len(), 4, "{stored:#?}");
    let mut ids = accepted_ids(&hook);
    assert_eq!(ids.len(), 4, "each alert once: {ids:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "each alert once");
    let rules: Vec<String> = hook
        .accepted
        .lock()
        .unwrap()
        .iter()
        .map(|a| {
            a["event"]["payload"]["alert"]["rule"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert!(
        rules.contains(&"crypto-miner-process".to_string()),
        "{rules:?}"
    );
    for a in hook.accepted.lock().unwrap().iter() {
        assert!(
            a["link"]
                .as_str()
                .unwrap()
                .starts_with("https://dash.example/events?shard=0&offset="),
            "{a}"
        );
    }

    // Alertmanager took the same alerts, with their stable labels.
    let mut names = Vec::new();
    wait_for("four alerts in Alertmanager", 30, || {
        let (status, body) = common::http_get(am.port, "/api/v2/alerts", None);
        if status != 200 {
            return false;
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        let list = v.as_array().cloned().unwrap_or_default();
        names = list
            .iter()
            .map(|a| a["labels"]["alertname"].as_str().unwrap_or("").to_string())
            .collect();
        list.len() >= 4
            && list.iter().all(|a| {
                a["labels"]["severity"].is_string()
                    && a["labels"]["node"] == "node-1"
                    && a["generatorURL"]
                        .as_str()
                        .is_some_and(|u| u.starts_with("https://dash.example/events?"))
            })
    })
    .await;
    names.sort();
    assert_eq!(
        names,
        vec![
            "crypto-miner-process",
            "exec-from-shm-or-tmp",
            "shell-in-container",
            "shell-in-container"
        ]
    );
    assert_eq!(
        metric(
            bus.http,
            "amoskys_bus_alert_sink_sent_total{sink=\"webhook\"}"
        ),
        4.0
    );
    // Alertmanager was up throughout: the first bus delivered its three
    // before the kill (unless the kill beat it), this one the rest.
    let am_sent = metric(
        bus.http,
        "amoskys_bus_alert_sink_sent_total{sink=\"alertmanager\"}",
    );
    assert!(am_sent == 1.0 || am_sent == 4.0, "{am_sent}");
}
