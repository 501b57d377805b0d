#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The Prometheus alerting rules of `config/prometheus/` and the Grafana
//! dashboards of `config/grafana/`: Prometheus's own `promtool` checks the
//! rules and every panel's query and runs the rules' unit tests (Debian's
//! `prometheus` package, which scripts/setup.sh installs), and every metric
//! they name is one a real bus, a real agent or the operator exports.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::repo;

fn promtool() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("promtool");
        if p.is_file() {
            return p;
        }
    }
    panic!("promtool is not installed: run scripts/setup.sh (it installs Debian's prometheus)");
}

fn run_promtool(args: &[&str]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .current_dir(repo("config/prometheus"))
        .output()
        .unwrap();
    let text = amoskys_testkit::output_text(&out);
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let checked = run_promtool(&["check", "rules", "amoskys-rules.yaml"]);
    assert!(checked.contains("SUCCESS: 15 rules found"), "{checked}");
    let tested = run_promtool(&["test", "rules", "amoskys-rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_has_a_runbook_section() {
    let rules = std::fs::read_to_string(repo("config/prometheus/amoskys-rules.yaml")).unwrap();
    let doc = std::fs::read_to_string(repo("docs/alerts.md")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert_eq!(alerts.len(), 15);
    for a in alerts {
        assert!(
            doc.contains(&format!("\n## {a}\n")),
            "docs/alerts.md has no section for {a}"
        );
        assert!(
            rules.contains(&format!("docs/alerts.md#{}\"", a.to_lowercase())),
            "{a}'s runbook_url does not point at its section"
        );
    }
}

/// Every panel query of the dashboards in config/grafana.
fn dashboard_queries() -> Vec<String> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("config/grafana"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 3, "{files:?}");
    for f in files {
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                out.push(t["expr"].as_str().unwrap().to_string());
            }
        }
    }
    out
}

#[test]
fn promtool_parses_every_dashboard_query() {
    // Each query as a recording rule: promtool checks its PromQL.
    let queries = dashboard_queries();
    let mut rules = String::from("groups:\n  - name: dashboards\n    rules:\n");
    for (n, expr) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: amoskys:dashboard_query:{n}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboards.yaml");
    std::fs::write(&file, rules).unwrap();
    let out = run_promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}

/// `amoskys_*` names in the rules' expressions and the dashboards' queries.
fn names_in_rules() -> BTreeSet<String> {
    let rules = std::fs::read_to_string(repo("config/prometheus/amoskys-rules.yaml")).unwrap();
    let mut names = BTreeSet::new();
    let exprs: Vec<String> = rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
        .map(String::from)
        .chain(dashboard_queries())
        .collect();
    for line in &exprs {
        let mut rest = line.as_str();
        while let Some(i) = rest.find("amoskys_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

/// Whether `name` is in an OpenMetrics exposition: as a sample, or by the
/// TYPE line of the metric it is a sample name of (`_total`, `_bucket`, …).
fn exported(text: &str, name: &str) -> bool {
    let sample = text
        .lines()
        .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
    let family = ["", "_total", "_bucket", "_count", "_sum"]
        .iter()
        .any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|base| text.contains(&format!("# TYPE {base} ")))
        });
    sample || family
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_name_is_exported() {
    // A bus with what the rules watch switched on: detection (the starter
    // rules) and an alert sink whose receiver is not there. Labelled
    // families show in /metrics once they have a sample.
    let env = amoskys_testkit::Env::new();
    let mut cfg = env.config();
    cfg.detection = Some(amoskys_eventbus::config::DetectionConfig {
        rules_dir: repo("config/rules"),
        reload_interval: std::time::Duration::from_secs(2),
        rule_budget: std::time::Duration::from_millis(1),
        checkpoint_interval: std::time::Duration::from_secs(1),
    });
    cfg.alerting.sinks = vec![amoskys_eventbus::config::AlertSinkConfig {
        kind: amoskys_eventbus::config::SinkKind::Webhook,
        url: format!("http://{}/alerts", amoskys_testkit::free_addr()),
        ca_file: None,
        bearer_token_file: None,
        timeout: std::time::Duration::from_secs(1),
        max_batch: 10,
        resolve_after: std::time::Duration::from_secs(3600),
    }];
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    // A shell in a container: a starter rule's alert for the sink to fail on.
    let mut c = env.client(bus.grpc_addr, "agent").await;
    let p = c
        .publisher(
            amoskys_proto::Hello {
                agent_id: "node-a".into(),
                node: "node-a".into(),
                version: "test".into(),
                ..Default::default()
            },
            8,
        )
        .await
        .unwrap();
    p.send(vec![amoskys_proto::Event {
        agent_id: "node-a".into(),
        seq: 1,
        collector: "process".into(),
        observed_at: amoskys_eventbus::now_ns(),
        payload: Some(amoskys_proto::event::Payload::Process(
            amoskys_proto::ProcessEvent {
                kind: amoskys_proto::process_event::Kind::Start as i32,
                name: "bash".into(),
                exe: "/bin/bash".into(),
                container_id: "c0ffee".into(),
                ..Default::default()
            },
        )),
        ..Default::default()
    }])
    .await
    .unwrap();
    let bus_text = amoskys_testkit::eventually(std::time::Duration::from_secs(20), || async {
        let text = amoskys_testkit::http_get(bus.http_addr, "/metrics").await.1;
        (text.contains("amoskys_bus_alert_sink_errors_total{")
            && text.contains("amoskys_bus_detect_matches_total{"))
        .then_some(text)
    })
    .await
    .expect("the sink's failed deliveries are counted");

    let mut f = amoskys_agents::config::AgentConfigFile::default();
    f.collectors.process.enabled = false;
    f.collectors.inventory.enabled = false;
    let cfg = amoskys_agents::config::resolve(
        f,
        amoskys_agents::config::AgentOverrides {
            bus: Some(format!("https://{}", bus.grpc_addr)),
            tls_dir: Some(env.pki("agent")),
            spool_dir: Some(env.path().join("spool")),
            http: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let agent = amoskys_agents::start(cfg).await.unwrap();
    let agent_text = amoskys_testkit::http_get(agent.http_addr.unwrap(), "/metrics")
        .await
        .1;
    // The operator's labelled families, recorded the way its controllers
    // record them.
    let operator = amoskys_operator::controller::metrics::Metrics::default();
    operator.observe(
        "eventbus",
        std::time::Duration::from_millis(3),
        Some("forbidden"),
    );
    operator.certificate("security", "amoskys-tls", 1_900_000_000);
    operator
        .agents_by_phase
        .get_or_create(&amoskys_operator::controller::metrics::PhaseLabel {
            phase: "Running".into(),
        })
        .set(3);
    operator
        .rule_set_pushes
        .get_or_create(&amoskys_operator::controller::metrics::ResultLabel {
            result: "ok".into(),
        })
        .inc();
    let operator_text = operator.encode();

    let names = names_in_rules();
    assert!(names.len() >= 15, "{names:?}");
    for name in &names {
        let text = match name.split('_').nth(1) {
            Some("bus") => &bus_text,
            Some("agent") => &agent_text,
            Some("operator") => &operator_text,
            _ => panic!("{name}: not a bus, agent or operator metric"),
        };
        assert!(exported(text, name), "{name} is not exported");
    }
    agent.shutdown().await;
    bus.shutdown().await.unwrap();
}
