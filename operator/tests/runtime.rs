#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! `amoskys operator`'s runtime against the in-memory API: it takes the
//! Lease, its controllers reconcile the samples, it serves metrics and
//! health, and on stop it releases the Lease and returns.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use amoskys_operator::run::{Options, run_until};
use common::fakeapi::FakeApi;
use common::{NS, sample_bus, sample_set};
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_leads_reconciles_serves_metrics_and_stops_cleanly() {
    let (client, api) = FakeApi::client();
    api.insert(&sample_bus());
    api.insert(&sample_set());
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let stop = CancellationToken::new();
    let s = stop.clone();
    let operator = run_until(
        client,
        Options {
            metrics_addr: addr,
            lease_namespace: NS.into(),
            lease_name: "amoskys-operator".into(),
            identity: "operator-0".into(),
            image: Some("example.org/amoskys:test".into()),
            agents_interval: Duration::from_secs(1),
        },
        async move { s.cancelled().await },
    );
    // Driven beside the checks rather than spawned: the controllers'
    // futures are not `Send` for every lifetime tokio::spawn asks for.
    let checks = async {
        let holder = until("the Lease", || {
            api.get::<Lease>(Some(NS), "amoskys-operator")
                .and_then(|l| l.spec?.holder_identity)
        })
        .await;
        assert_eq!(holder, "operator-0");
        until("the bus StatefulSet", || {
            api.get::<StatefulSet>(Some(NS), "amoskys")
        })
        .await;
        // The AgentSet waits for its certificate, then gets its DaemonSet.
        let ds = until("the agents' DaemonSet", || {
            api.get::<DaemonSet>(Some(NS), "nodes-agent")
        })
        .await;
        let image = ds.spec.template.spec.unwrap().containers[0].image.clone();
        assert_eq!(image.as_deref(), Some("example.org/amoskys:test"));

        let ready = get(addr, "/readyz").await.unwrap();
        assert!(
            ready.starts_with("HTTP/1.0 200") || ready.starts_with("HTTP/1.1 200"),
            "{ready}"
        );
        let metrics = get(addr, "/metrics").await.unwrap();
        for want in [
            "amoskys_operator_reconciles_total{controller=\"eventbus\"}",
            "amoskys_operator_reconciles_total{controller=\"agentset\"}",
            "amoskys_operator_reconcile_duration_seconds_bucket{",
            "amoskys_operator_certificate_not_after_seconds{namespace=\"security\",secret=\"amoskys-server-tls\"}",
            "amoskys_operator_leader 1",
        ] {
            assert!(metrics.contains(want), "{want} missing from\n{metrics}");
        }

        stop.cancel();
    };
    let (result, ()) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(operator, checks)
    })
    .await
    .expect("the operator stops");
    result.unwrap();
    let lease = api.get::<Lease>(Some(NS), "amoskys-operator").unwrap();
    let holder = lease.spec.and_then(|s| s.holder_identity);
    assert!(
        holder.as_deref().is_none_or(str::is_empty),
        "lease still held by {holder:?}"
    );
    assert!(
        get(addr, "/healthz").await.is_none(),
        "still serving after stop"
    );
}
