#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Certificate files replaced while the bus is under load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use amoskys_client::identity::{PeerIdentity, Role};
use amoskys_client::pki::{CertAuthority, Validity};
use amoskys_client::tls::TlsMaterial;
use amoskys_proto::QueryRequest;
use amoskys_proto::publish_response::Msg as OutMsg;
use common::*;

/// Serial of the certificate the bus presents to a new connection.
async fn served_serial(bus: &amoskys_eventbus::RunningBus, client_dir: &std::path::Path) -> String {
    let m = TlsMaterial::read(client_dir).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(amoskys_client::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(m.roots().unwrap())
        .with_client_auth_cert(m.certs().unwrap(), m.key().unwrap())
        .unwrap();
    let tcp = tokio::net::TcpStream::connect(bus.grpc_addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    PeerIdentity::from_der(&der).unwrap().serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_files_serve_new_connections_and_streams_in_flight_continue() {
    let env = Env::new();
    let bus = env.start().await;
    let admin_dir = env.pki("admin");
    let before = served_serial(&bus, &admin_dir).await;

    // A publisher that keeps going through the rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut c = client(&bus, &env.pki("agent")).await;
    let mut p = c.publisher(hello("steady"), 16).await.unwrap();
    let sender = p.sender();
    let producer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut seq = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let batch = events("steady", seq + 1..=seq + 50);
                seq += 50;
                let req = amoskys_proto::PublishRequest {
                    msg: Some(amoskys_proto::publish_request::Msg::Batch(
                        amoskys_proto::Batch { events: batch },
                    )),
                };
                sender.send(req).await.expect("stream in flight stays open");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seq
        })
    };
    let acker = {
        let acked = acked.clone();
        tokio::spawn(async move {
            loop {
                match p.next().await {
                    Ok(Some(OutMsg::Ack(a))) => acked.store(a.acked_seq, Ordering::SeqCst),
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Same CA, new server certificate.
    let ca = env.ca();
    let dns = vec!["localhost".to_string()];
    let ips = vec!["127.0.0.1".parse().unwrap()];
    ca.issue_server(
        "amoskys-bus",
        &dns,
        &ips,
        Validity::from_now(Duration::from_secs(86_400)),
    )
    .unwrap()
    .write_dir(&env.pki("bus"))
    .unwrap();
    let rotated = eventually(Duration::from_secs(10), || {
        let bus = &bus;
        let admin_dir = admin_dir.clone();
        let before = before.clone();
        async move {
            let now = served_serial(bus, &admin_dir).await;
            (now != before).then_some(now)
        }
    })
    .await;
    assert!(rotated.is_some(), "new connections get the new certificate");
    // Admin.Stats reports the certificate now served (the operator's CA
    // rotation reads it).
    let stats = client(&bus, &admin_dir)
        .await
        .admin
        .stats(amoskys_proto::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Some(stats.server_cert_serial), rotated);
    assert!(stats.server_cert_not_after > amoskys_eventbus::now_ns() / 1_000_000_000);

    // A CA rotation's first step: the bundle trusts old and new CA, so a
    // client issued by the new CA gets in while old clients keep working.
    let new_ca = CertAuthority::generate(
        "amoskys-ca-2",
        Validity::from_now(Duration::from_secs(86_400)),
    )
    .unwrap();
    let bus_dir = env.pki("bus");
    let mut bundle = std::fs::read_to_string(env.pki("ca").join("tls.crt")).unwrap();
    bundle.push_str(&new_ca.cert_pem);
    let m = TlsMaterial::read(&bus_dir).unwrap();
    amoskys_client::pki::write_secret_dir(
        &bus_dir,
        std::str::from_utf8(&m.cert_pem).unwrap(),
        std::str::from_utf8(&m.key_pem).unwrap(),
        &bundle,
    )
    .unwrap();
    let new_reader = env.issue_client(
        "reader-2",
        &new_ca,
        Role::Reader,
        Validity::from_now(Duration::from_secs(3600)),
    );
    let got_in = eventually(Duration::from_secs(10), || {
        let o = opts(&bus, &new_reader);
        async move {
            let mut c = amoskys_client::BusClient::connect(&o).await.ok()?;
            c.query(QueryRequest {
                limit: 1,
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    assert!(
        got_in.is_some(),
        "a client of the new CA is accepted once the bundle holds it"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = producer.await.unwrap();
    let all_acked = eventually(Duration::from_secs(10), || {
        let acked = acked.clone();
        async move { (acked.load(Ordering::SeqCst) == sent).then_some(()) }
    })
    .await;
    assert!(
        all_acked.is_some(),
        "acked {} of {sent}",
        acked.load(Ordering::SeqCst)
    );
    assert!(!acker.is_finished(), "the stream in flight never failed");

    let stored = stored(&bus, &env).await;
    assert_eq!(stored.len() as u64, sent);
    let (_, text) = http_get(bus.http_addr, "/metrics").await;
    assert!(
        metric(&text, "amoskys_bus_tls_reloads_total") >= 2.0,
        "{text}"
    );
    drop(acker);
    bus.shutdown().await.unwrap();
}
