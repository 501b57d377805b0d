#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The dashboard in a real headless Chromium (driven over WebDriver by
//! chromedriver) against real `amoskys bus` and `amoskys agent` processes.
//! Screenshots land in `<target dir>/dashboard-screenshots/` for a person.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, pki, start_agent, start_bus_with};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const AGENT: &str = "dash-agent";
const TOKEN: &str = "dashboard-e2e-token-0123456789abcdef";
const AGENT_CONFIG: &str = "heartbeatInterval: 1s\nbatch:\n  maxDelay: 20ms\ncollectors:\n  process:\n    enabled: false\n  inventory:\n    enabled: true\n    interval: 1h\n  synthetic:\n    enabled: true\n    rate: 20\n";
/// One alert per node, from the inventory's host snapshot at agent start.
const RULE: &str = "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: host-seen}\nspec:\n  match: {event: inventory}\n  condition: \"inventory.host.hostname != ''\"\n  summary: 'host {inventory.host.hostname} reported'\n  dedup: {by: [event.node], window: 1h}\n";

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn find_binary(names: &[&str]) -> PathBuf {
    for n in names {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let p = Path::new(dir).join(n);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "none of {names:?} is installed; scripts/setup.sh installs Debian's chromium and chromium-driver"
    );
}

fn start_driver(port: u16) -> Driver {
    let bin = find_binary(&["chromedriver"]);
    let child = Command::new(bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver(child)
}

async fn browser(driver_port: u16, profile: &Path) -> Client {
    let chromium = find_binary(&["chromium", "chromium-browser", "google-chrome"]);
    let caps = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless=new",
                // Root in a container has no user namespace for the sandbox.
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--window-size=1400,1000",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let caps = match caps {
        Value::Object(m) => m,
        _ => unreachable!(),
    };
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("chromium via chromedriver")
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, png).unwrap();
    println!("screenshot: {}", path.display());
}

/// Runs `script` (a function body returning a value) until `ok` holds.
async fn until(c: &Client, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = c.execute(script, vec![]).await.unwrap_or(Value::Null);
        if ok(&v) {
            return v;
        }
        if Instant::now() > deadline {
            shot(c, "failure").await;
            panic!("timed out waiting for {what}; last value {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn click(c: &Client, css: &str) {
    c.find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
        .click()
        .await
        .unwrap();
}

const TAIL_ROWS: &str = "return [...document.querySelectorAll('#tail tbody tr')].map(r => ({offset: Number(r.dataset.offset), collector: r.dataset.collector}));";

async fn apply_tail_filter(c: &Client, collector: &str) {
    let input = c.find(Locator::Css("#f-collector")).await.unwrap();
    input.clear().await.unwrap();
    input.send_keys(collector).await.unwrap();
    click(c, "#apply").await;
}

async fn control(c: &Client, base: &str, button: &str) {
    c.goto(&format!("{base}/agent?id={AGENT}")).await.unwrap();
    let sel = format!("tr[data-collector='synthetic'] button.{button}");
    until(
        c,
        "the collector's controls",
        &format!("return !!document.querySelector(\"{sel}\");"),
        |v| v == &json!(true),
    )
    .await;
    click(c, &sel).await;
    let result = until(
        c,
        "the agent to confirm",
        "return document.getElementById('control-result').textContent;",
        |v| v.as_str().is_some_and(|s| s.contains("agent confirmed")),
    )
    .await;
    assert!(result.as_str().unwrap().contains("applied"), "{result}");
}

/// Rows the live tail shows over `window` with the synthetic filter applied.
async fn synthetic_rows_over(c: &Client, base: &str, window: Duration) -> usize {
    c.goto(&format!("{base}/events")).await.unwrap();
    until(
        c,
        "the tail to connect",
        "return document.getElementById('tail-status').textContent;",
        |v| v.as_str().is_some_and(|s| s.starts_with("live")),
    )
    .await;
    apply_tail_filter(c, "synthetic").await;
    tokio::time::sleep(window).await;
    let rows = c.execute(TAIL_ROWS, vec![]).await.unwrap();
    rows.as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_in_a_real_browser() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let token_file = root.join("admin-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let ports = (free_port(), free_port());
    // With a backup dir and no backup in it yet, the bus takes one at start.
    let backup_dir = root.join("backup");
    let rules_dir = root.join("rules");
    std::fs::create_dir_all(&rules_dir).unwrap();
    std::fs::write(rules_dir.join("host.yaml"), RULE).unwrap();
    let _bus = start_bus_with(
        root,
        "batch",
        Some(ports),
        &[
            "--admin-token-file",
            token_file.to_str().unwrap(),
            "--backup-dir",
            backup_dir.to_str().unwrap(),
            "--rules-dir",
            rules_dir.to_str().unwrap(),
        ],
    );
    let _agent = start_agent(root, ports.0, AGENT, AGENT_CONFIG);
    let base = format!("http://127.0.0.1:{}", ports.1);

    let driver_port = free_port();
    let _driver = start_driver(driver_port);
    let c = browser(driver_port, &root.join("chromium-profile")).await;

    // Without the token: the sign-in page, not the data.
    c.goto(&format!("{base}/events")).await.unwrap();
    let msg = c
        .find(Locator::Css("#login-message"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(msg.contains("sign in"), "{msg}");
    assert!(c.find(Locator::Css("#tail")).await.is_err());
    shot(&c, "01-sign-in").await;

    c.find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    click(&c, "#sign-in").await;
    until(&c, "the overview", "return document.getElementById('stored') && document.getElementById('stored').textContent;", |v| {
        v.as_str().is_some_and(|s| s != "–" && s != "0")
    })
    .await;
    assert_eq!(c.current_url().await.unwrap().path(), "/");
    let backup = until(
        &c,
        "the backup card",
        "const v = document.getElementById('backup'); return v ? v.parentElement.innerText : null;",
        |v| {
            v.as_str()
                .is_some_and(|s| s.contains("ago") && s.contains("1 kept"))
        },
    )
    .await;
    println!("backup card: {backup}");
    shot(&c, "02-overview").await;

    // The agent's row appears and turns Running with its heartbeats.
    c.goto(&format!("{base}/agents")).await.unwrap();
    let row = until(
        &c,
        "the agent's row",
        &format!("const r = document.querySelector(\"tr[data-agent='{AGENT}']\"); return r ? r.innerText : null;"),
        |v| v.as_str().is_some_and(|s| s.contains("Running") && s.contains("synthetic: rate")),
    )
    .await;
    println!("agent row: {row}");
    shot(&c, "03-agents").await;

    // Live events stream in; a filter narrows them.
    c.goto(&format!("{base}/events")).await.unwrap();
    let all = until(
        &c,
        "heartbeats and synthetic events in the tail",
        TAIL_ROWS,
        |v| {
            let rows = v.as_array().cloned().unwrap_or_default();
            rows.iter().any(|r| r["collector"] == "agent")
                && rows.iter().any(|r| r["collector"] == "synthetic")
        },
    )
    .await;
    println!(
        "tail rows before filtering: {}",
        all.as_array().unwrap().len()
    );
    apply_tail_filter(&c, "synthetic").await;
    let filtered = until(&c, "filtered rows", TAIL_ROWS, |v| {
        v.as_array().is_some_and(|rows| rows.len() >= 10)
    })
    .await;
    assert!(
        filtered
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["collector"] == "synthetic"),
        "only synthetic events after the filter: {filtered}"
    );
    // Pausing the view holds the rows still; resuming lets them flow again.
    click(&c, "#tail-toggle").await;
    let held = c.execute(TAIL_ROWS, vec![]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        c.execute(TAIL_ROWS, vec![]).await.unwrap(),
        held,
        "paused view"
    );
    let status = c
        .find(Locator::Css("#tail-status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(status.contains("paused"), "{status}");
    click(&c, "#tail-toggle").await;
    let newest = held[0]["offset"].as_u64().unwrap();
    until(&c, "rows after resuming the view", TAIL_ROWS, |v| {
        v[0]["offset"].as_u64().is_some_and(|o| o > newest)
    })
    .await;
    // Search finds stored events; a row opens its detail.
    // Clicked in the page: rows streaming into the tail above move these
    // while a pointer click is on its way.
    c.execute("document.getElementById('search').click();", vec![])
        .await
        .unwrap();
    until(
        &c,
        "search results",
        "return document.querySelectorAll('#results tbody tr').length;",
        |v| v.as_u64().is_some_and(|n| n > 0),
    )
    .await;
    c.execute(
        "document.querySelector('#results tbody tr').click();",
        vec![],
    )
    .await
    .unwrap();
    until(
        &c,
        "event detail",
        "return document.getElementById('event-detail').textContent;",
        |v| v.as_str().is_some_and(|s| s.contains("\"payload\"")),
    )
    .await;
    shot(&c, "04-events").await;
    // Summaries take one line in tables (whole on hover and in the detail).
    let one_line = c
        .execute(
            "return [...document.querySelectorAll('#results td.summary')].map(td => [getComputedStyle(td).whiteSpace, getComputedStyle(td).textOverflow, td.title === td.textContent]);",
            vec![],
        )
        .await
        .unwrap();
    let cells = one_line.as_array().unwrap();
    assert!(!cells.is_empty());
    assert!(
        cells
            .iter()
            .all(|c| c == &json!(["nowrap", "ellipsis", true])),
        "{one_line}"
    );
    // An alert's link opens its event: /events?offset=N (Alertmanager's
    // generatorURL, the webhook's link).
    c.goto(&format!("{base}/events?offset=1")).await.unwrap();
    until(
        &c,
        "the linked event's detail",
        "return document.getElementById('event-detail').textContent;",
        |v| v.as_str().is_some_and(|s| s.contains("\"offset\": 1,")),
    )
    .await;

    // The Alerts page: the rule's alert, its facets, and a link to what the
    // agent sent around it.
    c.goto(&format!("{base}/alerts")).await.unwrap();
    let row = until(
        &c,
        "the host-seen alert",
        "const r = document.querySelector(\"#alerts-table tr[data-rule='host-seen']\"); return r ? r.innerText : null;",
        |v| v.as_str().is_some_and(|s| s.contains("host") && s.contains("reported")),
    )
    .await;
    println!("alert row: {row}");
    let chips = c
        .execute(
            "return [...document.querySelectorAll('#a-facets .chip')].map(b => b.dataset.facet + '=' + b.dataset.value);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        chips,
        json!(["severity=warning", "rule=host-seen", "namespace="]),
        "facets"
    );
    // Choosing a rule's chip keeps its alert and puts the choice in the URL.
    c.execute(
        "document.querySelector(\"#a-facets .chip[data-value='host-seen']\").click();",
        vec![],
    )
    .await
    .unwrap();
    until(
        &c,
        "the chosen rule",
        "const on = document.querySelector('#a-facets .chip.on'); return on && location.search.includes('rule=host-seen') ? document.querySelectorAll('#alerts-table tbody tr').length : null;",
        |v| v == &json!(1),
    )
    .await;
    shot(&c, "05-alerts").await;
    // A severity the alert is below empties the table; clearing it brings
    // the row back.
    c.goto(&format!("{base}/alerts?severity=critical"))
        .await
        .unwrap();
    until(
        &c,
        "an empty table at critical",
        "return document.getElementById('a-info').textContent.startsWith('0 alerts') ? document.querySelectorAll('#alerts-table tbody tr').length : null;",
        |v| v == &json!(0),
    )
    .await;
    c.goto(&format!("{base}/alerts")).await.unwrap();
    until(
        &c,
        "the neighbours link",
        "const a = document.querySelector('#alerts-table a.neighbours'); return a ? a.href : null;",
        |v| v.as_str().is_some_and(|s| s.contains("agent=")),
    )
    .await;
    c.execute(
        "document.querySelector('#alerts-table a.neighbours').click();",
        vec![],
    )
    .await
    .unwrap();
    let around = until(
        &c,
        "the agent's events around the alert",
        "const rows = [...document.querySelectorAll('#results tbody tr')]; return rows.length ? rows.map(r => r.dataset.agent) : null;",
        |v| v.as_array().is_some_and(|a| !a.is_empty()),
    )
    .await;
    assert!(
        around.as_array().unwrap().iter().all(|a| a == AGENT),
        "only the alert's agent: {around}"
    );
    let agent_filter = c
        .execute("return document.getElementById('f-agent').value;", vec![])
        .await
        .unwrap();
    assert_eq!(agent_filter, json!(AGENT));

    // Pausing the synthetic collector stops its events; resuming restarts them.
    control(&c, &base, "pause").await;
    shot(&c, "06-agent-paused").await;
    // Let what was produced before the pause drain to the bus first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let while_paused = synthetic_rows_over(&c, &base, Duration::from_secs(3)).await;
    assert_eq!(while_paused, 0, "no synthetic events while paused");
    control(&c, &base, "resume").await;
    let resumed = synthetic_rows_over(&c, &base, Duration::from_secs(3)).await;
    assert!(
        resumed >= 10,
        "synthetic events flow again after resume: {resumed}"
    );
    shot(&c, "07-events-after-resume").await;

    // Signing out returns to the sign-in page.
    c.goto(&format!("{base}/")).await.unwrap();
    click(&c, "header form button").await;
    until(
        &c,
        "the sign-in page",
        "return !!document.getElementById('login');",
        |v| v == &json!(true),
    )
    .await;
    c.goto(&format!("{base}/agents")).await.unwrap();
    assert!(
        c.find(Locator::Css("#login")).await.is_ok(),
        "the cookie is gone"
    );
    c.close().await.unwrap();
}
