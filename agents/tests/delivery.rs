#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Agent → bus delivery against a real bus: outages, a full spool, control.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use amoskys_proto::event::Payload;
use amoskys_proto::{ControlRequest, control};
use common::{Env, eventually, free_addr, http_get, metric, pause, produced};

fn synthetic_n(e: &amoskys_proto::Event) -> u64 {
    match &e.payload {
        Some(Payload::Synthetic(s)) => s.n,
        other => panic!("synthetic payload expected, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bus_outage_of_30s_loses_nothing_and_stores_nothing_twice() {
    let env = Env::new();
    let addr = free_addr();
    let bus = env.start_on(addr).await;
    let agent = env.synthetic_agent(addr, 200, |_| {}).await;
    let http = agent.http_addr.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    bus.shutdown().await.unwrap();

    // 30 s without a bus: the agent keeps producing into its spool.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let spooled = agent.shared.spool.stats().events;
    assert!(
        spooled > 3000,
        "the spool should hold the outage's events, holds {spooled}"
    );
    assert_eq!(
        metric(&http_get(http, "/metrics").await, "amoskys_agent_connected"),
        0.0
    );

    let bus = env.start_on(addr).await;
    eventually(Duration::from_secs(30), || async {
        (metric(&http_get(http, "/metrics").await, "amoskys_agent_connected") == 1.0).then_some(())
    })
    .await
    .expect("the agent reconnects");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Stop producing and hand the bus the rest.
    pause(&agent, "synthetic");
    let produced = produced(&agent, "synthetic");
    let shared = agent.shared.clone();
    agent.shutdown().await;
    assert_eq!(
        shared.spool.stats().events,
        0,
        "shutdown with the bus up drains the spool"
    );

    let stored = env.stored(addr, "synthetic").await;
    assert_eq!(
        stored.len() as u64,
        produced,
        "every produced event is stored exactly once"
    );
    let ns: BTreeSet<u64> = stored.iter().map(synthetic_n).collect();
    assert_eq!(ns.len() as u64, produced, "no duplicates");
    assert_eq!(
        ns.iter().copied().collect::<Vec<_>>(),
        (1..=produced).collect::<Vec<_>>()
    );
    let seqs: BTreeSet<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seqs.len(), stored.len());
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_spool_drops_the_oldest_and_says_so_everywhere() {
    let env = Env::new();
    let addr = free_addr();
    // No bus yet: everything goes to a 64 KiB spool.
    let agent = env
        .synthetic_agent(addr, 2000, |f| {
            f.spool.max_bytes = Some("64KiB".into());
        })
        .await;
    let http = agent.http_addr.unwrap();
    let dropped = eventually(Duration::from_secs(20), || async {
        let m = metric(
            &http_get(http, "/metrics").await,
            "amoskys_agent_events_dropped_total",
        );
        (m > 500.0).then_some(m)
    })
    .await
    .expect("the agent counts drops");
    let st = agent.shared.spool.stats();
    assert!(st.bytes <= 64 * 1024, "spool stays bounded: {st:?}");
    assert!(
        metric(
            &http_get(http, "/metrics").await,
            "amoskys_agent_spool_max_bytes"
        ) == 65536.0
    );

    pause(&agent, "synthetic");
    let bus = env.start_on(addr).await;
    eventually(Duration::from_secs(30), || async {
        let s = &agent.shared.spool;
        (s.stats().events == 0 && s.pending_gap().dropped == 0).then_some(())
    })
    .await
    .expect("the spool drains once the bus is back, gap events included");
    let total_dropped = agent.shared.spool.stats().dropped_total;
    assert!(total_dropped as f64 >= dropped);

    // The gap event carries every drop.
    let gaps = env.stored(addr, "agent").await;
    let gap_sum: u64 = gaps
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::Gap(g)) => Some(g.dropped),
            _ => None,
        })
        .sum();
    assert_eq!(
        gap_sum, total_dropped,
        "gap events account for every dropped event"
    );
    // The stored synthetic events plus the drops are everything produced.
    let produced = produced(&agent, "synthetic");
    let stored = env.stored(addr, "synthetic").await.len() as u64;
    let hb_dropped = |h: &amoskys_proto::Event| match &h.payload {
        Some(Payload::Heartbeat(h)) => Some(h.dropped),
        Some(Payload::Gap(_)) => None,
        _ => None,
    };
    // Heartbeats were spooled too, so some of the drops may be heartbeats.
    assert!(
        stored <= produced && stored + total_dropped >= produced,
        "stored {stored} + dropped {total_dropped} vs produced {produced}"
    );

    // The bus registry shows the drops, from the gap events and the heartbeat.
    let rec = eventually(Duration::from_secs(10), || async {
        let r = env.agent_record(addr).await?;
        let hb = r.last_heartbeat.as_ref()?;
        (hb.dropped == total_dropped).then_some(r)
    })
    .await
    .expect("a heartbeat with the final drop count reaches the registry");
    assert_eq!(rec.gaps_dropped, total_dropped);
    // Read again: that heartbeat may have been stored after `gaps` was read.
    let stored_now = env.stored(addr, "agent").await;
    assert!(stored_now.iter().filter_map(hb_dropped).any(|d| d > 0));
    agent.shutdown().await;
    bus.shutdown().await.unwrap();
}

/// The agent's answer to control `id`, as the bus registry records it.
async fn control_result(
    env: &Env,
    bus: std::net::SocketAddr,
    id: u64,
) -> amoskys_proto::ControlResult {
    eventually(Duration::from_secs(10), || async move {
        let c = env.agent_record(bus).await?.last_control?;
        (c.control_id == id).then_some(c)
    })
    .await
    .expect("the agent answers the control")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn control_from_the_bus_pauses_and_resumes_a_collector() {
    let env = Env::new();
    let addr = free_addr();
    let bus = env.start_on(addr).await;
    let agent = env.synthetic_agent(addr, 100, |_| {}).await;
    eventually(Duration::from_secs(10), || async {
        (env.stored(addr, "synthetic").await.len() > 20).then_some(())
    })
    .await
    .expect("events flow");
    let mut admin = env.admin(addr).await;
    let send = |action: control::Action, ms: u64| ControlRequest {
        requested_by: String::new(),
        agent_id: "test-agent".into(),
        control: Some(amoskys_proto::Control {
            control_id: 0,
            collector: "synthetic".into(),
            action: action as i32,
            interval_ms: ms,
        }),
    };
    let r = admin
        .admin
        .control(send(control::Action::Pause, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(r.delivered);
    let confirmed = control_result(&env, addr, r.control_id).await;
    assert!(confirmed.ok, "{}", confirmed.message);
    assert!(confirmed.message.contains("paused"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paused_at = env.stored(addr, "synthetic").await.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.stored(addr, "synthetic").await.len(),
        paused_at,
        "no events while paused"
    );

    admin
        .admin
        .control(send(control::Action::Resume, 0))
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        (env.stored(addr, "synthetic").await.len() > paused_at + 20).then_some(())
    })
    .await
    .expect("events flow again after resume");

    // A refused control comes back with the reason.
    let r = admin
        .admin
        .control(ControlRequest {
            requested_by: String::new(),
            agent_id: "test-agent".into(),
            control: Some(amoskys_proto::Control {
                control_id: 0,
                collector: "kernel".into(),
                action: control::Action::Pause as i32,
                interval_ms: 0,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let refused = control_result(&env, addr, r.control_id).await;
    assert!(!refused.ok);
    assert!(
        refused.message.contains("no collector \"kernel\""),
        "{}",
        refused.message
    );
    agent.shutdown().await;
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_agent_certificate_is_picked_up_without_a_restart() {
    use amoskys_client::identity::Role;
    use amoskys_client::pki::{CertAuthority, Validity};

    let env = Env::new();
    let addr = free_addr();
    let bus = env.start_on(addr).await;
    let agent = env
        .synthetic_agent(addr, 100, |f| f.tls_reload_interval = Some("200ms".into()))
        .await;
    let serial_of = |hb: &amoskys_proto::AgentRecord| {
        hb.last_heartbeat
            .as_ref()
            .map(|h| h.cert_serial.clone())
            .unwrap_or_default()
    };
    let registry_serial = || async { Some(serial_of(&env.agent_record(addr).await?)) };
    let first = eventually(Duration::from_secs(10), || async {
        registry_serial().await.filter(|s| !s.is_empty())
    })
    .await
    .expect("the heartbeat carries the certificate serial");

    // Rotate: a new certificate from the same CA, written the way a
    // mounted Secret changes (all three files replaced at once).
    let ca_dir = env.pki("ca");
    let ca = CertAuthority::from_pem(
        &std::fs::read_to_string(ca_dir.join("tls.crt")).unwrap(),
        &std::fs::read_to_string(ca_dir.join("tls.key")).unwrap(),
    )
    .unwrap();
    let mut c = ca
        .issue_client(
            "agent",
            Role::Agent,
            Validity::from_now(Duration::from_secs(3600)),
        )
        .unwrap();
    c.ca_pem = std::fs::read_to_string(ca_dir.join("tls.crt")).unwrap();
    c.write_dir(&env.pki("agent")).unwrap();

    let second = eventually(Duration::from_secs(20), || async {
        registry_serial().await.filter(|s| *s != first)
    })
    .await
    .expect("the new serial reaches the registry");
    assert_ne!(second, first);
    assert!(
        metric(
            &http_get(agent.http_addr.unwrap(), "/metrics").await,
            "amoskys_agent_tls_reloads_total"
        ) >= 1.0
    );
    // Events keep flowing over the new connection.
    let before = env.stored(addr, "synthetic").await.len();
    eventually(Duration::from_secs(10), || async {
        (env.stored(addr, "synthetic").await.len() > before + 20).then_some(())
    })
    .await
    .expect("events flow after the rotation");
    pause(&agent, "synthetic");
    let produced = produced(&agent, "synthetic");
    agent.shutdown().await;
    let stored = env.stored(addr, "synthetic").await;
    let unique: BTreeSet<u64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(
        unique.len(),
        stored.len(),
        "resends after the reconnect are not stored twice"
    );
    assert_eq!(stored.len() as u64, produced);
    bus.shutdown().await.unwrap();
}
