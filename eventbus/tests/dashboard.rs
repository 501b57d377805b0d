#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The dashboard's HTTP API against a real bus: who may do what, the data it
//! returns, bad parameters, the live tail's rate cap, and sign-in with a
//! client certificate over HTTPS.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use amoskys_eventbus::RunningBus;
use amoskys_eventbus::config::BusConfig;
use amoskys_proto::event::Payload;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{Alert, Event, Heartbeat, Severity, control};
use common::*;
use serde_json::Value;

const ADMIN: &str = "admin-token-for-tests-0123456789";
const READER: &str = "reader-token-for-tests-0123456789";

fn with_tokens(env: &Env) -> BusConfig {
    let admin = env.tmp.path().join("admin-tokens");
    let reader = env.tmp.path().join("reader-tokens");
    std::fs::write(&admin, format!("{ADMIN}\n")).unwrap();
    std::fs::write(&reader, format!("{READER}\n")).unwrap();
    let mut c = env.config();
    c.dashboard.admin_token_file = Some(admin);
    c.dashboard.reader_token_file = Some(reader);
    c.dashboard.sample_interval = Duration::from_millis(200);
    c
}

struct Http {
    base: String,
    client: reqwest::Client,
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

impl Http {
    fn new(bus: &RunningBus) -> Self {
        Self {
            base: format!("http://{}", bus.http_addr),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Reply {
        let r = req.send().await.unwrap();
        Reply {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.text().await.unwrap(),
        }
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        self.send(req).await
    }

    async fn control(&self, token: &str, body: &str) -> Reply {
        let req = self
            .client
            .post(format!("{}/api/control", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string());
        self.send(req).await
    }
}

fn alert(agent: &str, seq: u64) -> Event {
    Event {
        severity: Severity::Error as i32,
        collector: "rules".into(),
        payload: Some(Payload::Alert(Alert {
            rule: "ssh-brute-force".into(),
            summary: "40 failed logins".into(),
            ..Default::default()
        })),
        ..event(agent, seq)
    }
}

fn heartbeat(agent: &str, seq: u64) -> Event {
    Event {
        collector: "agent".into(),
        payload: Some(Payload::Heartbeat(Heartbeat {
            version: "9.9.9".into(),
            spool_bytes: 1234,
            ..Default::default()
        })),
        ..event(agent, seq)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_roles_and_data() {
    let env = Env::new();
    let mut cfg = with_tokens(&env);
    let backups = tempfile::tempdir().unwrap();
    cfg.backup = Some(amoskys_eventbus::config::BackupConfig {
        dir: backups.path().to_path_buf(),
        interval: None,
        keep: 3,
    });
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let http = Http::new(&bus);
    let o = http.get("/api/overview", Some(ADMIN)).await.json();
    assert_eq!(o["backup"]["count"], 0);
    assert!(o["backup"]["newest_at"].is_null());

    let mut c = client(&bus, &env.pki("agent")).await;
    let mut a = c.publisher(hello("node-a"), 8).await.unwrap();
    let mut batch = events("node-a", 1..=100);
    batch.push(alert("node-a", 101));
    batch.push(heartbeat("node-a", 102));
    a.send(batch).await.unwrap();
    ack_until(&mut a, 102).await;
    let mut b = c.publisher(hello("node-b"), 8).await.unwrap();
    b.send(events("node-b", 1..=20)).await.unwrap();
    ack_until(&mut b, 20).await;

    // Nothing without credentials, and a wrong token is no better.
    for path in [
        "/api/overview",
        "/api/agents",
        "/api/agent?id=node-a",
        "/api/events",
        "/api/event?offset=1",
        "/api/tail",
    ] {
        let r = http.get(path, None).await;
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert!(r.json()["error"].as_str().unwrap().contains("sign in"));
        assert!(r.headers.contains_key("www-authenticate"));
        assert_eq!(
            http.get(path, Some("not-a-valid-token-at-all"))
                .await
                .status,
            401
        );
    }
    let page = http.get("/agents", None).await;
    assert_eq!(page.status, 401);
    assert!(page.body.contains("id=\"login\""), "the sign-in page");
    // Health and metrics stay open and hold no event data.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = http.get(path, None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(!r.body.contains("node-a") && !r.body.contains("ssh-brute-force"));
    }

    // A reader sees everything but may not control.
    let r = http.get("/api/agents", Some(READER)).await;
    assert_eq!(r.status, 200);
    let r = http
        .control(
            READER,
            r#"{"agent_id":"node-a","collector":"synthetic","action":"pause"}"#,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("control needs admin")
    );

    // The admin's data is what was published.
    let agents = http.get("/api/agents", Some(ADMIN)).await.json();
    let rows = agents["agents"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let row = |id: &str| rows.iter().find(|r| r["agent_id"] == id).unwrap().clone();
    assert_eq!(row("node-a")["events"], 102);
    assert_eq!(row("node-a")["phase"], "Running");
    assert_eq!(row("node-a")["version"], "9.9.9");
    assert_eq!(row("node-a")["spool_bytes"], 1234);
    assert_eq!(row("node-b")["events"], 20);
    assert_eq!(row("node-b")["phase"], "Pending", "no heartbeat yet");

    let page = http
        .get(
            "/api/events?agent=node-a&collector=synthetic&limit=30",
            Some(ADMIN),
        )
        .await
        .json();
    let evs = page["events"].as_array().unwrap();
    assert_eq!(evs.len(), 30);
    assert!(
        evs.iter()
            .all(|e| e["agent_id"] == "node-a" && e["collector"] == "synthetic")
    );
    assert_eq!(evs[0]["seq"], 100, "newest first");
    let next = page["next_before"].as_u64().unwrap();
    let older = http
        .get(
            &format!("/api/events?agent=node-a&collector=synthetic&limit=500&before={next}"),
            Some(ADMIN),
        )
        .await
        .json();
    assert_eq!(older["events"].as_array().unwrap().len(), 70);
    assert!(older["next_before"].is_null(), "the range is exhausted");

    let alerts = http
        .get("/api/events?severity=error", Some(ADMIN))
        .await
        .json();
    let alerts = alerts["events"].as_array().unwrap();
    assert_eq!(alerts.len(), 1);
    let offset = alerts[0]["offset"].as_u64().unwrap();
    let detail = http
        .get(&format!("/api/event?offset={offset}"), Some(ADMIN))
        .await
        .json();
    assert_eq!(detail["payload"]["alert"]["rule"], "ssh-brute-force");
    assert_eq!(
        http.get("/api/event?offset=999999", Some(ADMIN))
            .await
            .status,
        404
    );

    let overview = eventually(Duration::from_secs(10), || async {
        let o = http.get("/api/overview", Some(ADMIN)).await.json();
        (o["series"]["t"].as_array().unwrap().len() >= 2).then_some(o)
    })
    .await
    .expect("rates sampled");
    assert_eq!(overview["events_stored"], 122);
    assert_eq!(overview["agents_total"], 2);
    assert_eq!(overview["agents_by_phase"]["Running"], 1);
    assert_eq!(overview["agents_by_phase"]["Pending"], 1);
    assert_eq!(
        overview["recent_alerts"][0]["summary"],
        "ssh-brute-force: 40 failed logins"
    );
    assert!(overview["wal_bytes"].as_u64().unwrap() > 0);
    let mut admin = client(&bus, &env.pki("admin")).await;
    let made = admin
        .admin
        .backup(amoskys_proto::BackupRequest {})
        .await
        .unwrap()
        .into_inner();
    let o = http.get("/api/overview", Some(ADMIN)).await.json();
    assert_eq!(o["backup"]["count"], 1);
    assert_eq!(o["backup"]["running"], false);
    assert_eq!(o["backup"]["newest_at"], made.created_at * 1000);
    assert_eq!(o["backup"]["newest_bytes"], made.size_bytes);
    assert_eq!(o["backup"]["errors"], 0);
    assert!(
        overview["certificate"]["expires_in_seconds"]
            .as_i64()
            .unwrap()
            > 86_400
    );

    // Control reaches the agent's stream; the agent's answer shows up.
    let r = http
        .control(
            ADMIN,
            r#"{"agent_id":"node-a","collector":"synthetic","action":"set_interval","interval_ms":250}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = r.json();
    assert_eq!(sent["delivered"], true);
    let id = sent["control_id"].as_u64().unwrap();
    let got = loop {
        match a.next().await.unwrap() {
            Some(OutMsg::Control(c)) => break c,
            Some(_) => continue,
            None => panic!("stream ended"),
        }
    };
    assert_eq!(got.control_id, id);
    assert_eq!(got.action, control::Action::SetInterval as i32);
    assert_eq!(got.interval_ms, 250);
    a.send_raw(amoskys_proto::PublishRequest {
        msg: Some(amoskys_proto::publish_request::Msg::ControlResult(
            amoskys_proto::ControlResult {
                control_id: id,
                ok: true,
                message: "synthetic interval 250ms".into(),
            },
        )),
    })
    .await
    .unwrap();
    let confirmed = eventually(Duration::from_secs(5), || async {
        let a = http.get("/api/agent?id=node-a", Some(ADMIN)).await.json();
        (a["last_control"]["control_id"] == id).then_some(a)
    })
    .await
    .expect("the agent's confirmation is shown");
    assert_eq!(confirmed["last_control"]["ok"], true);
    assert!(!confirmed["series"]["t"].as_array().unwrap().is_empty());

    let r = http
        .control(
            ADMIN,
            r#"{"agent_id":"gone","collector":"synthetic","action":"pause"}"#,
        )
        .await;
    assert_eq!(r.json()["delivered"], false);

    // A browser signs in with a form and then carries a cookie.
    let r = http
        .send(
            http.client
                .post(format!("{}/login", http.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={READER}")),
        )
        .await;
    assert_eq!(r.status, 303);
    let cookie = r.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let session = cookie.split(';').next().unwrap().to_string();
    let page = http
        .send(
            http.client
                .get(format!("{}/agents", http.base))
                .header("cookie", &session),
        )
        .await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("/assets/app.js"));
    let bad = http
        .send(
            http.client
                .post(format!("{}/login", http.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("token=guess-guess-guess-guess"),
        )
        .await;
    assert_eq!(bad.status, 401);
    assert!(bad.body.contains("not valid"));
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_parameters_are_400_with_a_message() {
    let env = Env::new();
    let bus = amoskys_eventbus::start(with_tokens(&env)).await.unwrap();
    let http = Http::new(&bus);
    let cases = [
        ("/api/events?from=yesterday", "from:"),
        (
            "/api/events?from=2026-11-27T00:00:00Z&to=2026-11-26T00:00:00Z",
            "from:",
        ),
        ("/api/events?limit=99999999999999999999999", "limit:"),
        ("/api/events?limit=100000", "limit:"),
        ("/api/events?severity=apocalyptic", "severity:"),
        ("/api/events?colour=blue", "unknown parameter"),
        ("/api/events?before=-1", "before:"),
        ("/api/event", "offset:"),
        ("/api/event?offset=abc", "offset:"),
        ("/api/agent", "id:"),
        ("/api/agent?id=x&sort=y", "unknown parameter"),
        ("/api/tail?from=0", "unknown parameter"),
        ("/api/tail?severity=42", "severity:"),
    ];
    for (path, want) in cases {
        let r = http.get(path, Some(ADMIN)).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(msg.contains(want), "{path}: {msg}");
    }
    for body in [
        "{not json",
        r#"{"agent_id":"a","collector":"c","action":"explode"}"#,
        r#"{"agent_id":"a","collector":"c","action":"set_interval"}"#,
        r#"{"agent_id":"","collector":"c","action":"pause"}"#,
        r#"{"agent_id":"a","collector":"c","action":"pause","extra":1}"#,
    ] {
        let r = http.control(ADMIN, body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(!r.json()["error"].as_str().unwrap().is_empty());
    }
    assert_eq!(
        http.get("/healthz", None).await.status,
        200,
        "still serving"
    );
    bus.shutdown().await.unwrap();
}

/// Reads server-sent events until `done` says enough; returns (kind, data).
async fn read_sse(
    resp: &mut reqwest::Response,
    timeout: Duration,
    mut done: impl FnMut(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&out) {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("tail went quiet")
            .unwrap()
            .expect("tail ended");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let msg: String = buf.drain(..end + 2).collect();
            let mut kind = String::new();
            let mut data = String::new();
            for line in msg.lines() {
                if let Some(k) = line.strip_prefix("event:") {
                    kind = k.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim());
                }
            }
            if !kind.is_empty() {
                out.push((kind, serde_json::from_str(&data).unwrap()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tail_filters_and_caps_what_one_viewer_gets() {
    let env = Env::new();
    let mut cfg = with_tokens(&env);
    cfg.dashboard.tail_max_events_per_second = 50;
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let http = Http::new(&bus);
    let mut resp = http
        .client
        .get(format!("{}/api/tail?agent=node-a&severity=info", http.base))
        .bearer_auth(READER)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // Connected once the first status arrives.
    read_sse(&mut resp, Duration::from_secs(10), |m| !m.is_empty()).await;

    let mut c = client(&bus, &env.pki("agent")).await;
    let mut a = c.publisher(hello("node-a"), 8).await.unwrap();
    let mut b = c.publisher(hello("node-b"), 8).await.unwrap();
    b.send(events("node-b", 1..=50)).await.unwrap();
    let mut debug = events("node-a", 1..=10);
    for e in &mut debug {
        e.severity = Severity::Debug as i32;
    }
    a.send(debug).await.unwrap();
    a.send(events("node-a", 11..=400)).await.unwrap();
    ack_until(&mut a, 400).await;
    ack_until(&mut b, 50).await;

    let accounted = |v: &Value| {
        ["sent", "skipped_rate_cap", "skipped_slow_viewer"]
            .iter()
            .map(|k| v[*k].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    // Every matching event is either shown or counted as skipped.
    let msgs = read_sse(&mut resp, Duration::from_secs(15), |m| {
        m.iter().any(|(k, v)| k == "status" && accounted(v) == 390)
    })
    .await;
    let shown: Vec<&Value> = msgs
        .iter()
        .filter(|(k, _)| k == "events")
        .flat_map(|(_, v)| v.as_array().unwrap())
        .collect();
    assert!(!shown.is_empty());
    assert!(shown.len() <= 50, "cap of 50/s, got {}", shown.len());
    assert!(
        shown
            .iter()
            .all(|e| e["agent_id"] == "node-a" && e["severity"] == "info"),
        "only what the filter asks for"
    );
    let status = &msgs.iter().rev().find(|(k, _)| k == "status").unwrap().1;
    assert!(
        status["skipped_rate_cap"].as_u64().unwrap() >= 340,
        "{status}"
    );
    assert_eq!(status["sent"].as_u64().unwrap() as usize, shown.len());
    let m = http_get(bus.http_addr, "/metrics").await.1;
    assert_eq!(metric(&m, "amoskys_bus_dashboard_tail_viewers"), 1.0);
    assert!(metric(&m, "amoskys_bus_dashboard_tail_skipped_total") >= 340.0);
    drop(resp);
    bus.shutdown().await.unwrap();
}

/// One HTTP/1.1 request over TLS, presenting `client` when given.
async fn https(
    bus: &RunningBus,
    env: &Env,
    client_dir: Option<PathBuf>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = amoskys_client::tls::crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(env.pki("ca").join("tls.crt")).unwrap();
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client_dir {
        Some(dir) => {
            let certs = CertificateDer::pem_file_iter(dir.join("tls.crt"))
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            let key = PrivateKeyDer::from_pem_file(dir.join("tls.key")).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(bus.http_addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_certificate_signs_in_over_https() {
    let env = Env::new();
    let mut cfg = with_tokens(&env);
    cfg.http_tls = true;
    let bus = amoskys_eventbus::start(cfg).await.unwrap();

    let (status, body) = https(&bus, &env, Some(env.pki("admin")), "GET", "/api/agents", "").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"agents\""));
    let pause = r#"{"agent_id":"x","collector":"c","action":"pause"}"#;
    let (status, body) = https(
        &bus,
        &env,
        Some(env.pki("admin")),
        "POST",
        "/api/control",
        pause,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = https(
        &bus,
        &env,
        Some(env.pki("reader")),
        "POST",
        "/api/control",
        pause,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _) = https(&bus, &env, Some(env.pki("agent")), "GET", "/api/agents", "").await;
    assert_eq!(status, 403, "an agent certificate has no dashboard role");
    let (status, _) = https(&bus, &env, None, "GET", "/api/agents", "").await;
    assert_eq!(status, 401, "no certificate and no token");
    let (status, _) = https(&bus, &env, None, "GET", "/healthz", "").await;
    assert_eq!(status, 200);
    bus.shutdown().await.unwrap();
}
