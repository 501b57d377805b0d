#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The detector in a real bus (RocksDB on a temp dir, mTLS on loopback):
//! the starter rules on published events, alerts that point at their
//! source, dedup counts, a rule set swapped while the bus runs, and a rule
//! that does not compile left out while the others work.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use amoskys_eventbus::config::DetectionConfig;
use amoskys_proto::event::Payload;
use amoskys_proto::{
    Alert, Event, FlowEvent, K8sIdentity, ListAgentsRequest, ProcessEvent, Severity, process_event,
};
use common::*;

fn starter_rules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/rules")
}

fn start_process(
    agent: &str,
    seq: u64,
    name: &str,
    exe: &str,
    container: &str,
    args: &[&str],
) -> Event {
    Event {
        agent_id: agent.into(),
        seq,
        collector: "process".into(),
        observed_at: amoskys_eventbus::now_ns(),
        severity: Severity::Info as i32,
        payload: Some(Payload::Process(ProcessEvent {
            kind: process_event::Kind::Start as i32,
            pid: 1000 + seq as u32,
            name: name.into(),
            exe: exe.into(),
            container_id: container.into(),
            cmdline: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn flow(agent: &str, seq: u64, dst_port: u32) -> Event {
    Event {
        agent_id: agent.into(),
        seq,
        collector: "flow".into(),
        observed_at: amoskys_eventbus::now_ns(),
        severity: Severity::Info as i32,
        payload: Some(Payload::Flow(FlowEvent {
            src_ip: "10.9.9.9".into(),
            dst_ip: "10.0.0.1".into(),
            src_port: 40000 + dst_port,
            dst_port,
            protocol: 6,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Every alert the detector wrote, oldest first.
async fn alerts(bus: &amoskys_eventbus::RunningBus, env: &Env) -> Vec<(Event, Alert)> {
    amoskys_testkit::alerts(&mut client(bus, &env.pki("reader")).await).await
}

/// The alerts once there are at least `n`, read again after `settle` so
/// that a late duplicate would show.
async fn settled_alerts(
    bus: &amoskys_eventbus::RunningBus,
    env: &Env,
    n: usize,
    settle: Duration,
) -> Vec<(Event, Alert)> {
    eventually(Duration::from_secs(10), || async {
        let a = alerts(bus, env).await;
        (a.len() >= n).then_some(a)
    })
    .await
    .unwrap_or_else(|| panic!("{n} alerts within 10 s"));
    tokio::time::sleep(settle).await;
    alerts(bus, env).await
}

async fn publish(bus: &amoskys_eventbus::RunningBus, env: &Env, agent: &str, events: Vec<Event>) {
    let mut c = client(bus, &env.pki("agent")).await;
    let mut p = c.publisher(hello(agent), 8).await.unwrap();
    let last = events.last().unwrap().seq;
    p.send(events).await.unwrap();
    ack_until(&mut p, last).await;
}

/// A rules directory in `env` holding `files` (name, text).
fn rules_dir(env: &Env, files: &[(&str, &str)]) -> PathBuf {
    let dir = env.path().join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// This shard's own Stats, read as an admin.
async fn local_stats(addr: std::net::SocketAddr, env: &Env) -> amoskys_proto::StatsResponse {
    env.client(addr, "admin")
        .await
        .admin
        .stats(amoskys_proto::StatsRequest {
            local: true,
            allow_partial: false,
        })
        .await
        .unwrap()
        .into_inner()
}

fn config(env: &Env, rules: &Path) -> amoskys_eventbus::BusConfig {
    let mut c = env.config();
    c.detection = Some(DetectionConfig {
        rules_dir: rules.to_path_buf(),
        reload_interval: Duration::from_millis(100),
        rule_budget: Duration::from_millis(1),
        checkpoint_interval: Duration::from_secs(1),
    });
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starter_rules_alert_once_with_the_source_and_count_repeats() {
    let env = Env::new();
    let bus = amoskys_eventbus::start(config(&env, &starter_rules()))
        .await
        .unwrap();

    let mut events = vec![
        start_process("n1", 1, "bash", "/bin/bash", "c0ffee", &["bash", "-i"]),
        // Same shell in the same container: a repeat, not a new alert.
        start_process("n1", 2, "bash", "/bin/bash", "c0ffee", &["bash", "-i"]),
        start_process("n1", 3, "bash", "/bin/bash", "c0ffee", &["bash"]),
        // Not a container: no shell alert.
        start_process("n1", 4, "sh", "/bin/sh", "", &["sh"]),
        start_process(
            "n1",
            5,
            "payload",
            "/dev/shm/payload",
            "",
            &["/dev/shm/payload"],
        ),
        start_process(
            "n1",
            6,
            "nc",
            "/bin/nc",
            "",
            &["nc", "-l", "-p", "4444", "-e", "/bin/sh"],
        ),
        start_process("n1", 7, "ls", "/bin/ls", "c0ffee", &["ls"]),
    ];
    let mut seq = 7;
    for port in 1..=30 {
        seq += 1;
        events.push(flow("n1", seq, port));
    }
    publish(&bus, &env, "n1", events).await;

    let got = settled_alerts(&bus, &env, 4, Duration::from_millis(500)).await;
    let mut rules: Vec<&str> = got.iter().map(|(_, a)| a.rule.as_str()).collect();
    rules.sort();
    assert_eq!(
        rules,
        vec![
            "exec-from-shm-or-tmp",
            "netcat-remote-exec",
            "port-scan",
            "shell-in-container"
        ],
        "{got:#?}"
    );

    // Each alert names the event that caused it: shard + offset.
    let stored = stored(&bus, &env).await;
    for (e, a) in &got {
        assert_eq!(e.agent_id, "amoskys:detect/0");
        let src = stored.iter().find(|s| s.offset == a.source_offset).unwrap();
        assert_eq!(src.agent_id, "n1");
        assert_eq!(a.source_agent, "n1");
        assert_eq!(a.count, if a.rule == "port-scan" { 30 } else { 1 });
        match a.rule.as_str() {
            "shell-in-container" => {
                assert_eq!(src.seq, 1);
                assert_eq!(e.labels["mitre"], "T1059.004");
                assert!(
                    a.summary
                        .starts_with("shell /bin/bash in container c0ffee on node-1"),
                    "{}",
                    a.summary
                );
            }
            "exec-from-shm-or-tmp" => assert_eq!(src.seq, 5),
            "netcat-remote-exec" => assert_eq!(e.severity, Severity::Critical as i32),
            "port-scan" => {
                assert_eq!(a.kind, "threshold");
                assert_eq!(src.seq, 37, "the flow that crossed the threshold");
            }
            other => panic!("{other}"),
        }
    }
    let text = http_get(bus.http_addr, "/metrics").await.1;
    assert_eq!(
        metric(
            &text,
            "amoskys_bus_detect_suppressed_total{rule=\"shell-in-container\",reason=\"dedup\"}"
        ),
        2.0
    );
    assert_eq!(metric(&text, "amoskys_bus_detect_rules_loaded"), 13.0);
    assert_eq!(metric(&text, "amoskys_bus_detect_rules_failed"), 0.0);
    assert!(metric(&text, "amoskys_bus_detect_events_total") >= 37.0);
    assert!(metric(&text, "amoskys_bus_detect_events_without_cel_total") > 0.0);
    // Every new alert's time from its source stored to itself durable.
    assert_eq!(
        metric(&text, "amoskys_bus_detect_alert_seconds_count"),
        got.len() as f64
    );

    // The detector is not an agent.
    let mut admin = client(&bus, &env.pki("admin")).await;
    let agents = admin
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let ids: Vec<&str> = agents.iter().map(|a| a.agent_id.as_str()).collect();
    assert_eq!(ids, vec!["n1"]);
    // And no agent may pose as it.
    let mut c = client(&bus, &env.pki("agent")).await;
    let err = c
        .publisher(hello("amoskys:detect/0"), 8)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("the bus's own"), "{err}");

    bus.shutdown().await.unwrap();

    // After a restart nothing is evaluated twice and nothing is lost:
    // the cursor resumes, and a new shell after it alerts; the open dedup
    // windows came back too, so the same shell again is a repeat.
    let bus = amoskys_eventbus::start(config(&env, &starter_rules()))
        .await
        .unwrap();
    publish(
        &bus,
        &env,
        "n1",
        vec![start_process(
            "n1",
            100,
            "bash",
            "/bin/bash",
            "c0ffee",
            &["bash"],
        )],
    )
    .await;
    publish(
        &bus,
        &env,
        "n2",
        vec![start_process("n2", 1, "zsh", "/bin/zsh", "beef", &["zsh"])],
    )
    .await;
    let after = settled_alerts(&bus, &env, 5, Duration::from_millis(300)).await;
    assert_eq!(after.len(), 5, "{after:#?}");
    assert_eq!(after[4].1.source_agent, "n2");
    let text = http_get(bus.http_addr, "/metrics").await.1;
    assert_eq!(
        metric(
            &text,
            "amoskys_bus_detect_suppressed_total{rule=\"shell-in-container\",reason=\"dedup\"}"
        ),
        1.0,
        "the repeat after the restart is counted in the window saved before it"
    );
    // Saving the cursor and windows is timed and sized.
    let text = eventually(Duration::from_secs(5), || async {
        let text = http_get(bus.http_addr, "/metrics").await.1;
        (metric(&text, "amoskys_bus_detect_checkpoint_seconds_count") >= 1.0).then_some(text)
    })
    .await
    .expect("a checkpoint within its interval");
    assert!(metric(&text, "amoskys_bus_detect_checkpoint_bytes") > 0.0);
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_is_left_out_and_a_changed_rule_set_is_live_without_a_restart() {
    let env = Env::new();
    let dir = env.path().join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    let rule = |name: &str, cond: &str| {
        format!(
            "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {{name: {name}}}\nspec:\n  match: {{event: process}}\n  condition: {cond:?}\n  summary: '{name} {{process.name}}'\n"
        )
    };
    std::fs::write(dir.join("a.yaml"), rule("curl", "process.name == 'curl'")).unwrap();
    std::fs::write(dir.join("b.yaml"), rule("broken", "process.nmae == 'wget'")).unwrap();
    let bus = amoskys_eventbus::start(config(&env, &dir)).await.unwrap();
    let text = http_get(bus.http_addr, "/metrics").await.1;
    assert_eq!(metric(&text, "amoskys_bus_detect_rules_loaded"), 1.0);
    assert_eq!(metric(&text, "amoskys_bus_detect_rules_failed"), 1.0);

    publish(
        &bus,
        &env,
        "n1",
        vec![
            start_process("n1", 1, "curl", "/usr/bin/curl", "", &["curl"]),
            start_process("n1", 2, "wget", "/usr/bin/wget", "", &["wget"]),
        ],
    )
    .await;
    let a = eventually(Duration::from_secs(10), || async {
        let a = alerts(&bus, &env).await;
        (!a.is_empty()).then_some(a)
    })
    .await
    .unwrap();
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1.summary, "curl curl");

    // Fix the broken rule in place: it loads, the other keeps working.
    std::fs::write(dir.join("b.yaml"), rule("wget", "process.name == 'wget'")).unwrap();
    eventually(Duration::from_secs(10), || async {
        let text = http_get(bus.http_addr, "/metrics").await.1;
        (metric(&text, "amoskys_bus_detect_rules_loaded") == 2.0).then_some(())
    })
    .await
    .expect("the fixed rule loads");
    publish(
        &bus,
        &env,
        "n1",
        vec![
            start_process("n1", 3, "wget", "/usr/bin/wget", "", &["wget"]),
            start_process("n1", 4, "curl", "/usr/bin/curl", "", &["curl"]),
        ],
    )
    .await;
    let a = eventually(Duration::from_secs(10), || async {
        let a = alerts(&bus, &env).await;
        (a.len() >= 3).then_some(a)
    })
    .await
    .unwrap();
    let summaries: Vec<&str> = a.iter().map(|(_, x)| x.summary.as_str()).collect();
    assert_eq!(summaries, vec!["curl curl", "wget wget", "curl curl"]);
    let text = http_get(bus.http_addr, "/metrics").await.1;
    assert_eq!(metric(&text, "amoskys_bus_detect_rules_failed"), 0.0);
    assert!(metric(&text, "amoskys_bus_detect_rule_reloads_total") >= 1.0);
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_rules_never_see_other_namespaces() {
    let env = Env::new();
    let dir = rules_dir(
        &env,
        &[(
            "shop.yaml",
            "apiVersion: amoskys.io/v1alpha1\nkind: DetectionRule\nmetadata: {name: curl, namespace: shop}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'curl'\"\n  summary: 'curl in {k8s.namespace}/{k8s.pod}'\n",
        )],
    );
    let bus = amoskys_eventbus::start(config(&env, &dir)).await.unwrap();
    let in_pod = |seq, ns: &str| Event {
        k8s: Some(K8sIdentity {
            namespace: ns.into(),
            pod: format!("{ns}-web"),
            ..Default::default()
        }),
        ..start_process("n1", seq, "curl", "/usr/bin/curl", "c1", &["curl"])
    };
    publish(
        &bus,
        &env,
        "n1",
        vec![in_pod(1, "bank"), in_pod(2, "shop"), in_pod(3, "bank")],
    )
    .await;
    let a = settled_alerts(&bus, &env, 1, Duration::from_millis(300)).await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1.rule, "shop/curl");
    assert_eq!(a[0].1.summary, "curl in shop/shop-web");
    assert_eq!(a[0].0.k8s.as_ref().unwrap().namespace, "shop");
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_page_folds_repeats_and_filters_by_facet() {
    let env = Env::new();
    let dir = rules_dir(
        &env,
        &[(
            "rules.yaml",
            "apiVersion: amoskys.io/v1alpha1\nkind: DetectionRule\nmetadata: {name: curl, namespace: shop}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'curl'\"\n  summary: 'curl in {k8s.namespace}/{k8s.pod}'\n  dedup: {by: [k8s.pod], window: 1s}\n---\napiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: wget}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'wget'\"\n  severity: critical\n  summary: 'wget on {event.node}'\n",
        )],
    );
    let tokens = env.path().join("reader-tokens");
    let token = "reader-token-for-the-alerts-page-0123";
    std::fs::write(&tokens, format!("{token}\n")).unwrap();
    let mut cfg = config(&env, &dir);
    cfg.dashboard.reader_token_file = Some(tokens);
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let in_pod = |seq, ns: &str, name: &str| Event {
        k8s: Some(K8sIdentity {
            namespace: ns.into(),
            pod: format!("{ns}-web"),
            ..Default::default()
        }),
        ..start_process("n1", seq, name, "/usr/bin/x", "c1", &[name])
    };
    // Three curls in one window: one alert counting 3; wget elsewhere.
    publish(
        &bus,
        &env,
        "n1",
        vec![
            in_pod(1, "shop", "curl"),
            in_pod(2, "shop", "curl"),
            in_pod(3, "bank", "wget"),
            in_pod(4, "shop", "curl"),
        ],
    )
    .await;
    // A curl after the window closes it (the update with the total) and
    // opens a new alert.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    publish(&bus, &env, "n1", vec![in_pod(5, "shop", "curl")]).await;

    let http = reqwest::Client::new();
    let get = |path: String| {
        let http = http.clone();
        let url = format!("http://{}{path}", bus.http_addr);
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_str::<serde_json::Value>(&r.text().await.unwrap())
                    .unwrap_or_default(),
            )
        }
    };
    let page = eventually(Duration::from_secs(10), || async {
        let (_, v) = get("/api/alerts".into()).await;
        let rows = v["alerts"].as_array().cloned().unwrap_or_default();
        (rows.len() == 3 && rows.iter().any(|r| r["count"] == 3)).then_some(v)
    })
    .await
    .expect("three alerts, one counting three curls");
    let rows = page["alerts"].as_array().unwrap();
    // Newest first: the second curl alert, then wget, then the first curl.
    let summary: Vec<(String, u64, String)> = rows
        .iter()
        .map(|r| {
            (
                r["rule"].as_str().unwrap().to_string(),
                r["count"].as_u64().unwrap(),
                r["namespace"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("shop/curl".to_string(), 1, "shop".to_string()),
            ("wget".to_string(), 1, "bank".to_string()),
            ("shop/curl".to_string(), 3, "shop".to_string()),
        ]
    );
    let first = &rows[2];
    assert_eq!(first["pod"], "shop-web");
    assert_eq!(first["node"], "node-1");
    assert_eq!(first["open"], true);
    // The three curls were stored in one group, at one time.
    assert!(first["last_seen"].as_i64() >= first["first_seen"].as_i64());
    // The source is the first curl, by address.
    let stored = stored(&bus, &env).await;
    let src = stored
        .iter()
        .find(|e| e.offset == first["source"]["offset"].as_u64().unwrap())
        .unwrap();
    assert_eq!((src.agent_id.as_str(), src.seq), ("n1", 1));
    assert_eq!(first["source"]["agent"], "n1");
    assert_eq!(
        page["facets"],
        serde_json::json!({
            "severity": {"critical": 1, "warning": 2},
            "rule": {"shop/curl": 2, "wget": 1},
            "namespace": {"bank": 1, "shop": 2},
        })
    );

    // Filters narrow the rows; the facets still count the whole range.
    for (query, want) in [
        ("namespace=bank", vec!["wget"]),
        ("rule=shop/curl", vec!["shop/curl", "shop/curl"]),
        ("severity=critical", vec!["wget"]),
        ("open=true&since=1h", vec!["shop/curl", "wget", "shop/curl"]),
    ] {
        let (status, v) = get(format!("/api/alerts?{query}")).await;
        assert_eq!(status, 200, "{query}: {v}");
        let rules: Vec<&str> = v["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["rule"].as_str().unwrap())
            .collect();
        assert_eq!(rules, want, "{query}");
        assert_eq!(v["facets"], page["facets"], "{query}");
    }
    for (query, names) in [
        ("since=yesterday", "since:"),
        ("open=maybe", "open:"),
        ("colour=red", "unknown parameter"),
    ] {
        let (status, v) = get(format!("/api/alerts?{query}")).await;
        assert_eq!(status, 400, "{query}");
        assert!(v["error"].as_str().unwrap().contains(names), "{query}: {v}");
    }
    // The page itself, behind the same sign-in.
    let r = http
        .get(format!("http://{}/alerts", bus.http_addr))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("href=\"/alerts\""));
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_set_handed_over_runs_until_the_directory_holds_it() {
    use amoskys_proto::SetRulesRequest;
    let env = Env::new();
    let rule = |name: &str| {
        format!(
            "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {{name: {name}}}\nspec:\n  match: {{event: process}}\n  condition: \"process.name == '{name}'\"\n  summary: '{name} ran'\n"
        )
    };
    let dir = rules_dir(&env, &[("rules.yaml", &rule("curl"))]);
    let bus = amoskys_eventbus::start(config(&env, &dir)).await.unwrap();
    let mut admin = client(&bus, &env.pki("admin")).await;
    let (addr, env_ref) = (bus.grpc_addr, &env);
    let stats = move || async move {
        let s = local_stats(addr, env_ref).await;
        let names: Vec<String> = s.rules.iter().map(|r| r.name.clone()).collect();
        (names, s.rules_digest)
    };
    let (names, from_dir) = stats().await;
    assert_eq!(names, ["curl"]);
    assert_eq!(
        from_dir,
        amoskys_detect::rule_set_digest([rule("curl").as_str()])
    );

    // Only an admin may hand rules over.
    let mut reader = client(&bus, &env.pki("reader")).await;
    let denied = reader
        .admin
        .set_rules(SetRulesRequest {
            rules_yaml: rule("wget"),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied}");

    // Handed over: live at the next reload, the directory unchanged.
    let digest = admin
        .admin
        .set_rules(SetRulesRequest {
            rules_yaml: rule("wget"),
        })
        .await
        .unwrap()
        .into_inner()
        .digest;
    let (names, running) = eventually(Duration::from_secs(10), || {
        let digest = digest.clone();
        async move {
            let (names, running) = stats().await;
            (running == digest).then_some((names, running))
        }
    })
    .await
    .expect("the handed-over set runs");
    assert_eq!((names, running), (vec!["wget".to_string()], digest.clone()));
    publish(
        &bus,
        &env,
        "n1",
        vec![
            start_process("n1", 1, "curl", "/usr/bin/curl", "", &["curl"]),
            start_process("n1", 2, "wget", "/usr/bin/wget", "", &["wget"]),
        ],
    )
    .await;
    let a = settled_alerts(&bus, &env, 1, Duration::from_millis(300)).await;
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].1.rule, "wget");

    // The directory catches up (kubelet's update of the ConfigMap); the
    // same set keeps running, and from then on the directory alone counts.
    std::fs::write(dir.join("rules.yaml"), rule("wget")).unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(stats().await.1, digest);
    std::fs::write(dir.join("rules.yaml"), rule("ls")).unwrap();
    let want = amoskys_detect::rule_set_digest([rule("ls").as_str()]);
    let (names, _) = eventually(Duration::from_secs(10), || {
        let want = want.clone();
        async move {
            let (names, running) = stats().await;
            (running == want).then_some((names, running))
        }
    })
    .await
    .expect("the directory's new set runs");
    assert_eq!(names, ["ls"]);
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_matches_of_the_last_day_survive_a_restart() {
    let env = Env::new();
    let dir = rules_dir(
        &env,
        &[(
            "curl.yaml",
            "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: curl}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'curl'\"\n  summary: curl\n",
        )],
    );
    let matches = |bus: &amoskys_eventbus::RunningBus| {
        let addr = bus.grpc_addr;
        let env = &env;
        async move {
            let s = local_stats(addr, env).await;
            let r = s.rules.iter().find(|r| r.name == "curl").unwrap().clone();
            (r.matches_24h, r.last_match)
        }
    };
    let bus = amoskys_eventbus::start(config(&env, &dir)).await.unwrap();
    let curl = |seq| start_process("n1", seq, "curl", "/usr/bin/curl", "", &["curl"]);
    publish(&bus, &env, "n1", vec![curl(1), curl(2)]).await;
    let (n, last) = eventually(Duration::from_secs(10), || async {
        let (n, last) = matches(&bus).await;
        (n == 2).then_some((n, last))
    })
    .await
    .expect("two matches counted");
    assert!(last > 0);
    bus.shutdown().await.unwrap();

    // Restarted: the day's count and the last match are still there, and
    // the events evaluated before the stop are not counted twice.
    let bus = amoskys_eventbus::start(config(&env, &dir)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(matches(&bus).await, (n, last));
    publish(&bus, &env, "n1", vec![curl(3)]).await;
    eventually(Duration::from_secs(10), || async {
        (matches(&bus).await.0 == 3).then_some(())
    })
    .await
    .expect("a third match after the restart");
    bus.shutdown().await.unwrap();
}
