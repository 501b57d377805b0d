#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The shipped alerting rules in a real Prometheus (Debian's package, which
//! scripts/setup.sh installs) scraping real `amoskys bus` and `amoskys
//! agent` processes: the agent is killed, AmoskysAgentDown goes pending and
//! then fires, as Prometheus's HTTP API reports it; the agent comes back
//! and the alert resolves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;
use common::{free_port, http_get, pki, start_agent, start_bus};

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn prometheus_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("prometheus");
        if p.is_file() {
            return p;
        }
    }
    panic!("prometheus is not installed: run scripts/setup.sh (it installs Debian's prometheus)");
}

/// `s` with what a query string cannot hold escaped.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn api(port: u16, path: &str) -> Value {
    let (status, body) = http_get(port, path, None);
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// The state of `alert` in Prometheus's /api/v1/alerts (None: not active).
fn alert_state(port: u16, alert: &str) -> Option<String> {
    let v = api(port, "/api/v1/alerts");
    v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == alert)
        .map(|a| a["state"].as_str().unwrap().to_string())
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

#[test]
fn an_agent_that_stops_fires_agent_down_in_a_real_prometheus_and_resolves_when_back() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let bus = start_bus(root, "batch", None);
    let agent_http = free_port();
    let agent_config = format!(
        "http: 127.0.0.1:{agent_http}\nheartbeatInterval: 1s\ncollectors:\n  process:\n    enabled: false\n  inventory:\n    enabled: false\n  synthetic:\n    enabled: true\n    rate: 5\n"
    );
    let agent = start_agent(root, bus.grpc, "prom-agent", &agent_config);

    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prometheus/amoskys-rules.yaml");
    let config = root.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: amoskys-bus\n    static_configs: [{{targets: ['127.0.0.1:{}']}}]\n  - job_name: amoskys-agent\n    static_configs: [{{targets: ['127.0.0.1:{agent_http}']}}]\n",
            rules.display(),
            bus.http
        ),
    )
    .unwrap();
    let port = free_port();
    let _prometheus = Prometheus(
        Command::new(prometheus_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                root.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_for("Prometheus ready", Duration::from_secs(60), || {
        (http_get(port, "/-/ready", None).0 == 200).then_some(())
    });
    // Every shipped rule loaded.
    let groups = api(port, "/api/v1/rules");
    let loaded: usize = groups["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum();
    assert_eq!(loaded, 15, "{groups}");

    // Both targets up, and the agent connected to the bus.
    let query = |q: &str| api(port, &format!("/api/v1/query?query={}", encode(q)));
    wait_for(
        "the agent scraped and connected",
        Duration::from_secs(60),
        || {
            let up = query("up{job=\"amoskys-agent\"} == 1");
            let connected = query("amoskys_agent_connected == 1");
            let bus_up = query("up{job=\"amoskys-bus\"} == 1");
            [up, connected, bus_up]
                .iter()
                .all(|v| !v["data"]["result"].as_array().unwrap().is_empty())
                .then_some(())
        },
    );
    assert_eq!(alert_state(port, "AmoskysAgentDown"), None);

    // The agent is killed: pending at once, firing after the rule's minute.
    drop(agent);
    let killed = Instant::now();
    wait_for("AmoskysAgentDown pending", Duration::from_secs(30), || {
        (alert_state(port, "AmoskysAgentDown").as_deref() == Some("pending")).then_some(())
    });
    wait_for("AmoskysAgentDown firing", Duration::from_secs(120), || {
        (alert_state(port, "AmoskysAgentDown").as_deref() == Some("firing")).then_some(())
    });
    let fired_after = killed.elapsed();
    assert!(
        fired_after >= Duration::from_secs(60),
        "fired after {fired_after:?}, before the rule's `for: 1m`"
    );
    let v = api(port, "/api/v1/alerts");
    let firing = v["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["alertname"] == "AmoskysAgentDown")
        .unwrap()
        .clone();
    assert_eq!(firing["labels"]["severity"], "warning");
    assert_eq!(
        firing["labels"]["instance"],
        format!("127.0.0.1:{agent_http}")
    );
    assert!(
        firing["annotations"]["runbook_url"]
            .as_str()
            .unwrap()
            .ends_with("docs/alerts.md#amoskysagentdown")
    );
    println!("AmoskysAgentDown fired {fired_after:?} after the agent was killed");

    // Back again: the alert resolves.
    let _agent = start_agent(root, bus.grpc, "prom-agent", &agent_config);
    let back = Instant::now();
    wait_for("AmoskysAgentDown resolved", Duration::from_secs(60), || {
        alert_state(port, "AmoskysAgentDown")
            .is_none()
            .then_some(())
    });
    println!(
        "AmoskysAgentDown resolved {:?} after the agent started again",
        back.elapsed()
    );
    // The bus wrote throughout. (Whether its volume alert is active
    // depends on this machine's disk, so it is not asserted.)
    assert_eq!(alert_state(port, "AmoskysBusNotWritable"), None);
}
