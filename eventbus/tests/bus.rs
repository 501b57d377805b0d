#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Component tests: a real bus in-process (RocksDB on a temp dir, mTLS on
//! loopback) driven through the client library.

mod common;

use std::time::Duration;

use amoskys_client::identity::Role;
use amoskys_client::pki::Validity;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{Filter, ListAgentsRequest, QueryRequest, StatsRequest, TailRequest};
use common::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_query_tail_and_registry() {
    let env = Env::new();
    let bus = env.start().await;
    let mut agent = client(&bus, &env.pki("agent")).await;
    let mut reader = client(&bus, &env.pki("reader")).await;

    // A tail that starts before anything is stored sees everything live.
    let mut tail = reader
        .tail(TailRequest {
            from_now: true,
            filter: Some(Filter {
                agent_ids: vec!["b".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut pa = agent.publisher(hello("a"), 8).await.unwrap();
    let mut pb = agent.publisher(hello("b"), 8).await.unwrap();
    assert_eq!(pa.welcome_acked_seq, 0);
    for chunk in 0..10u64 {
        pa.send(events("a", chunk * 100 + 1..=chunk * 100 + 100))
            .await
            .unwrap();
    }
    pb.send(events("b", 1..=50)).await.unwrap();
    assert_eq!(ack_until(&mut pa, 1000).await, 0);
    ack_until(&mut pb, 50).await;

    let all = reader
        .query(QueryRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1050);
    let offsets: Vec<u64> = all.iter().map(|e| e.offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "offsets are contiguous and increasing"
    );
    assert!(all.iter().all(|e| e.stored_at > 0 && e.node == "node-1"));

    let only_b = reader
        .query(QueryRequest {
            filter: Some(Filter {
                agent_ids: vec!["b".into()],
                ..Default::default()
            }),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(only_b.len(), 50);
    let limited = reader
        .query(QueryRequest {
            from_offset: all[10].offset,
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        limited.iter().map(|e| e.offset).collect::<Vec<_>>(),
        offsets[10..15].to_vec()
    );

    let mut tailed = Vec::new();
    while tailed.len() < 50 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), tail.message())
            .await
            .expect("tail delivers")
            .unwrap()
            .unwrap();
        tailed.extend(chunk.events);
    }
    assert!(tailed.iter().all(|e| e.agent_id == "b"));
    assert_eq!(tailed.len(), 50);

    // A tail from an offset replays history then continues live.
    let mut replay = reader
        .tail(TailRequest {
            from_offset: offsets[1040],
            ..Default::default()
        })
        .await
        .unwrap();
    pb.send(events("b", 51..=60)).await.unwrap();
    ack_until(&mut pb, 60).await;
    let mut got = Vec::new();
    while got.len() < 20 {
        let chunk = tokio::time::timeout(Duration::from_secs(10), replay.message())
            .await
            .expect("replay delivers")
            .unwrap()
            .unwrap();
        got.extend(chunk.events);
    }
    assert_eq!(got.first().map(|e| e.offset), Some(offsets[1040]));
    assert_eq!(got.last().map(|e| e.seq), Some(60));

    let mut admin = client(&bus, &env.pki("admin")).await;
    let agents = admin
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents;
    let a = agents.iter().find(|r| r.agent_id == "a").unwrap();
    assert_eq!((a.events, a.last_seq, a.connected), (1000, 1000, true));
    let stats = admin
        .admin
        .stats(StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.events_stored, 1060);
    assert!(stats.writable);

    let (code, text) = http_get(bus.http_addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(metric(&text, "amoskys_bus_events_stored_total"), 1060.0);
    assert_eq!(metric(&text, "amoskys_bus_connected_agents"), 2.0);
    assert_eq!(http_get(bus.http_addr, "/readyz").await.0, 200);
    assert_eq!(http_get(bus.http_addr, "/healthz").await.0, 200);
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_dropped_across_restarts() {
    let env = Env::new();
    let bus = env.start().await;
    let mut c = client(&bus, &env.pki("agent")).await;
    let mut p = c.publisher(hello("a"), 8).await.unwrap();
    p.send(events("a", 1..=100)).await.unwrap();
    ack_until(&mut p, 100).await;
    drop(p);
    drop(c);
    bus.shutdown().await.unwrap();

    let bus = env.start().await;
    let mut c = client(&bus, &env.pki("agent")).await;
    let mut p = c.publisher(hello("a"), 8).await.unwrap();
    assert_eq!(p.welcome_acked_seq, 100, "the bus remembers what it holds");
    p.send(events("a", 50..=150)).await.unwrap();
    assert_eq!(
        ack_until(&mut p, 150).await,
        51,
        "seq 50..=100 were resends"
    );

    let stored = stored(&bus, &env).await;
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=150).collect::<Vec<_>>(),
        "each event exactly once"
    );
    let (_, text) = http_get(bus.http_addr, "/metrics").await;
    assert_eq!(metric(&text, "amoskys_bus_duplicates_total"), 51.0);
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_are_enforced_per_rpc() {
    let env = Env::new();
    let bus = env.start().await;
    let mut agent = client(&bus, &env.pki("agent")).await;
    let mut reader = client(&bus, &env.pki("reader")).await;

    let e = agent.bus.query(QueryRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("agent"), "{e}");
    let e = agent.bus.tail(TailRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = agent
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = agent
        .admin
        .stats(StatsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = reader
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    match reader.publisher(hello("r"), 1).await {
        Err(amoskys_client::ClientError::Rpc(s)) => {
            assert_eq!(s.code(), Code::PermissionDenied)
        }
        Err(other) => panic!("expected PERMISSION_DENIED, got {other}"),
        Ok(_) => panic!("a reader may not publish"),
    }
    // A peer shard may read one shard's own registry and stats and forward
    // a control, and nothing of the whole bus's admin.
    use amoskys_proto::{Control, ControlRequest, control};
    let mut peer = client(&bus, &env.pki("peer")).await;
    let e = peer
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = peer.admin.stats(StatsRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let local = ListAgentsRequest {
        local: true,
        allow_partial: false,
    };
    peer.admin.list_agents(local).await.unwrap();
    let own = peer
        .admin
        .stats(StatsRequest {
            local: true,
            allow_partial: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((own.shard, own.retiring), (0, false));
    let control = |requested_by: &str| ControlRequest {
        requested_by: requested_by.into(),
        agent_id: "nobody".into(),
        control: Some(Control {
            collector: "synthetic".into(),
            action: control::Action::Pause as i32,
            ..Default::default()
        }),
    };
    let e = peer.admin.control(control("")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let r = peer
        .admin
        .control(control("cert:ops"))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !r.delivered && r.message.contains("not connected"),
        "{}",
        r.message
    );
    let e = reader.admin.control(control("cert:ops")).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // And what they may do works.
    reader.query(QueryRequest::default()).await.unwrap();
    agent.publisher(hello("a"), 1).await.unwrap();
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_fail_the_handshake_and_are_counted() {
    let env = Env::new();
    let bus = env.start().await;
    let day = Duration::from_secs(86_400);

    // Another CA's admin certificate.
    let other =
        amoskys_client::pki::CertAuthority::generate("rogue", Validity::from_now(day)).unwrap();
    let rogue = env.issue_client("rogue", &other, Role::Admin, Validity::from_now(day));
    // An expired admin certificate from the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired_validity = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let expired = env.issue_client("expired", &env.ca(), Role::Admin, expired_validity);
    // No client certificate at all: only the CA.
    let anon = env.tmp.path().join("anon");
    std::fs::create_dir_all(&anon).unwrap();
    std::fs::copy(env.pki("ca").join("tls.crt"), anon.join("ca.crt")).unwrap();

    for dir in [&rogue, &expired] {
        let res = async {
            let mut c = amoskys_client::BusClient::connect(&opts(&bus, dir)).await?;
            c.query(QueryRequest::default()).await
        }
        .await;
        assert!(res.is_err(), "{} must not get through", dir.display());
    }
    // Without identity files the client library refuses; speak raw TLS instead.
    let no_cert = raw_tls_without_client_cert(&bus, &anon).await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate must not get through"
    );

    let (_, text) = http_get(bus.http_addr, "/metrics").await;
    let failures = |r: &str| {
        metric(
            &text,
            &format!("amoskys_bus_tls_handshake_failures_total{{reason=\"{r}\"}}"),
        )
    };
    assert!(failures("unknown_ca") >= 1.0, "{text}");
    assert!(failures("expired") >= 1.0, "{text}");
    assert!(failures("no_client_cert") >= 1.0, "{text}");
    bus.shutdown().await.unwrap();
}

/// A TLS 1.3 client with no certificate; the server's refusal arrives with
/// the first read after the handshake.
async fn raw_tls_without_client_cert(
    bus: &amoskys_eventbus::RunningBus,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in amoskys_client::tls::pem_certs(&std::fs::read(dir.join("ca.crt"))?).unwrap() {
        roots.add(c).unwrap();
    }
    let mut cfg =
        rustls::ClientConfig::builder_with_provider(amoskys_client::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(bus.grpc_addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let mut buf = [0u8; 64];
    let n = tls.read(&mut buf).await?;
    if n == 0 {
        return Err(std::io::Error::other("closed"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_batches_get_clear_errors_while_others_flow() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg.max_message_bytes = 64 * 1024;
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let mut c = client(&bus, &env.pki("agent")).await;

    let mut good = c.publisher(hello("good"), 8).await.unwrap();
    good.send(events("good", 1..=10)).await.unwrap();
    ack_until(&mut good, 10).await;

    // ~100 KiB in one message.
    let mut big = c.publisher(hello("big"), 8).await.unwrap();
    big.send(events("big", 1..=1000)).await.unwrap();
    let err = loop {
        match big.next().await {
            Err(amoskys_client::ClientError::Rpc(s)) => break s,
            Ok(Some(_)) => continue,
            other => panic!("expected an error status, got {other:?}"),
        }
    };
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );
    assert!(
        err.message().contains("max message size"),
        "{}",
        err.message()
    );

    let mut bad = c.publisher(hello("bad"), 8).await.unwrap();
    let mut evs = events("bad", 1..=3);
    evs[2].seq = 1;
    bad.send(evs).await.unwrap();
    let err = loop {
        match bad.next().await {
            Err(amoskys_client::ClientError::Rpc(s)) => break s,
            Ok(Some(_)) => continue,
            other => panic!("expected an error status, got {other:?}"),
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("events[2].seq"), "{}", err.message());

    // The well-behaved stream is unaffected.
    good.send(events("good", 11..=20)).await.unwrap();
    ack_until(&mut good, 20).await;
    let (_, text) = http_get(bus.http_addr, "/metrics").await;
    assert_eq!(
        metric(&text, "amoskys_bus_rejected_total{reason=\"too_large\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "amoskys_bus_rejected_total{reason=\"invalid_batch\"}"
        ),
        1.0
    );
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_by_age_runs_in_the_bus() {
    let env = Env::new();
    let mut cfg = env.config();
    cfg.retention = Duration::from_secs(2);
    cfg.retention_check_interval = Duration::from_millis(200);
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let mut c = client(&bus, &env.pki("agent")).await;
    let mut p = c.publisher(hello("a"), 8).await.unwrap();
    p.send(events("a", 1..=100)).await.unwrap();
    ack_until(&mut p, 100).await;
    let mut r = client(&bus, &env.pki("reader")).await;
    assert_eq!(
        r.query(QueryRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .len(),
        100
    );
    let gone = eventually(Duration::from_secs(15), || {
        let mut r = r.clone();
        async move {
            let n = r
                .query(QueryRequest {
                    limit: 1000,
                    ..Default::default()
                })
                .await
                .ok()?
                .len();
            (n == 0).then_some(())
        }
    })
    .await;
    assert!(gone.is_some(), "events past retention are removed");
    // Dedupe state outlives the events: a resend is still recognised.
    p.send(events("a", 100..=101)).await.unwrap();
    assert_eq!(ack_until(&mut p, 101).await, 1);
    let (_, text) = http_get(bus.http_addr, "/metrics").await;
    assert_eq!(
        metric(&text, "amoskys_bus_retention_deleted_total{reason=\"age\"}"),
        100.0
    );
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_reaches_the_agent_stream() {
    use amoskys_proto::{
        Control, ControlRequest, ControlResult, PublishRequest, control, publish_request,
    };
    let env = Env::new();
    let bus = env.start().await;
    let mut c = client(&bus, &env.pki("agent")).await;
    let mut p = c.publisher(hello("a"), 8).await.unwrap();
    let mut admin = client(&bus, &env.pki("admin")).await;
    let resp = admin
        .admin
        .control(ControlRequest {
            requested_by: String::new(),
            agent_id: "a".into(),
            control: Some(Control {
                collector: "synthetic".into(),
                action: control::Action::Pause as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(resp.delivered);
    let got = loop {
        if let Some(OutMsg::Control(c)) = p.next().await.unwrap() {
            break c;
        }
    };
    assert_eq!(
        (got.collector.as_str(), got.control_id),
        ("synthetic", resp.control_id)
    );
    p.send_raw(PublishRequest {
        msg: Some(publish_request::Msg::ControlResult(ControlResult {
            control_id: got.control_id,
            ok: true,
            message: "paused".into(),
        })),
    })
    .await
    .unwrap();
    let seen = eventually(Duration::from_secs(5), || {
        let mut admin = admin.clone();
        async move {
            let agents = admin
                .admin
                .list_agents(ListAgentsRequest::default())
                .await
                .ok()?
                .into_inner()
                .agents;
            agents
                .into_iter()
                .find_map(|a| a.last_control.filter(|c| c.ok))
        }
    })
    .await;
    assert_eq!(seen.map(|c| c.control_id), Some(resp.control_id));
    let missing = admin
        .admin
        .control(ControlRequest {
            requested_by: String::new(),
            agent_id: "nobody".into(),
            control: Some(Control {
                collector: "synthetic".into(),
                action: control::Action::Resume as i32,
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!missing.delivered);
    let bad = admin
        .admin
        .control(ControlRequest {
            requested_by: String::new(),
            agent_id: "a".into(),
            control: Some(Control {
                collector: "synthetic".into(),
                action: control::Action::SetInterval as i32,
                interval_ms: 0,
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert!(bad.message().contains("interval_ms"));
    bus.shutdown().await.unwrap();
}
