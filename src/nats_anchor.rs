//! The benchmark anchor: the same workload as `amoskys bench`, published to
//! NATS JetStream (file storage, acked async publishes, mTLS), so the two can
//! be compared side by side in one run. Built only with `--features nats-anchor`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amoskys_eventbus::bench::{BenchReport, Pacer, synthetic_event};
use anyhow::{Context, Result};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use prost::Message;

pub struct NatsBench<'a> {
    pub url: &'a str,
    pub tls_dir: &'a Path,
    pub events: u64,
    pub event_bytes: usize,
    pub agents: usize,
    pub rate: Option<u64>,
    /// Unacked publishes allowed per agent (batch x window of the bus bench).
    pub in_flight: usize,
}

pub async fn run(b: NatsBench<'_>) -> Result<BenchReport> {
    let connect = || async {
        async_nats::ConnectOptions::new()
            .require_tls(true)
            // Acks for a deep window under fsync can take seconds; a timeout
            // would count as a failure the bus side never has.
            .request_timeout(Some(Duration::from_secs(120)))
            .add_root_certificates(b.tls_dir.join("ca.crt"))
            .add_client_certificate(b.tls_dir.join("tls.crt"), b.tls_dir.join("tls.key"))
            .connect(b.url)
            .await
            .with_context(|| format!("connecting to NATS at {}", b.url))
    };
    let admin = jetstream::new(connect().await?);
    let _ = admin.delete_stream("AMOSKYS_BENCH").await;
    admin
        .create_stream(stream::Config {
            name: "AMOSKYS_BENCH".into(),
            subjects: vec!["amoskys.bench.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the JetStream stream")?;

    let acked = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per = b.events / b.agents.max(1) as u64;
    for i in 0..b.agents.max(1) {
        // One connection per agent, as each bus agent has its own.
        let in_flight = b.in_flight.max(1);
        // The context bounds unacked publishes itself (5,000 by default) and
        // blocks publish() beyond that; while this loop holds the ack futures
        // that would deadlock, so its bound must be above the bench window.
        let js = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(in_flight + 1)
            // Under fsync a deep window's acks take seconds; the default 5 s
            // would count them as failures the bus side never has.
            .timeout(Duration::from_secs(120))
            .ack_timeout(Duration::from_secs(120))
            .build(connect().await?);
        let acked = acked.clone();
        let bytes = b.event_bytes;
        let rate = b.rate.map(|r| (r as f64 / b.agents.max(1) as f64).max(1.0));
        tasks.push(tokio::spawn(async move {
            let subject = format!("amoskys.bench.{i}");
            let agent = format!("nats-{i}");
            let mut pending = FuturesOrdered::new();
            let mut lat = Vec::with_capacity(per as usize);
            let mut pacer = rate.map(Pacer::new);
            for seq in 1..=per {
                if let Some(p) = &mut pacer {
                    p.wait(1).await;
                }
                let payload = synthetic_event(&agent, seq, bytes).encode_to_vec();
                let sent = Instant::now();
                let ack = js.publish(subject.clone(), payload.into()).await?;
                pending.push_back(async move { (ack.await, sent) });
                while pending.len() >= in_flight {
                    if let Some((r, sent)) = pending.next().await {
                        r?;
                        lat.push(sent.elapsed().as_secs_f64() * 1e3);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            while let Some((r, sent)) = pending.next().await {
                r?;
                lat.push(sent.elapsed().as_secs_f64() * 1e3);
                acked.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(mut l)) => lat.append(&mut l),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(BenchReport::from_latencies(
        per * b.agents.max(1) as u64,
        acked.load(Ordering::SeqCst),
        seconds,
        lat,
        errors,
    ))
}
