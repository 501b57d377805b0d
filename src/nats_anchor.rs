//! The benchmark anchor: the same workload as `amoskys bench`, published to
//! NATS JetStream (file storage, acked async publishes, mTLS), so the two can
//! be compared side by side in one run. Built only with `--features nats-anchor`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amoskys_eventbus::bench::{BenchReport, Workload};
use amoskys_proto::Batch;
use anyhow::{Context, Result};
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, stream};
use prost::Message;
use tokio::sync::mpsc;

pub struct NatsBench<'a> {
    pub url: &'a str,
    pub tls_dir: &'a Path,
    pub events: u64,
    pub event_bytes: usize,
    pub agents: usize,
    pub rate: Option<u64>,
    /// Events per message: each message is one `Batch`, as the bus bench
    /// sends it, so both stores make one durable write per batch.
    pub batch: usize,
    /// Unacked messages allowed per agent.
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
        // blocks publish() beyond that; the collector below keeps at most
        // in_flight acks, so the context's bound only has to be above that.
        let js = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(in_flight + 2)
            // Under fsync a deep window's acks take seconds; the default 5 s
            // would count them as failures the bus side never has.
            .timeout(Duration::from_secs(120))
            .ack_timeout(Duration::from_secs(120))
            .build(connect().await?);
        let acked = acked.clone();
        let rate = b.rate.map(|r| (r as f64 / b.agents.max(1) as f64).max(1.0));
        let mut work = Workload::new(&format!("nats-{i}"), 0, per, b.batch, b.event_bytes, rate);
        // Acks are awaited on their own task, as the bus bench reads acks
        // beside its producer: awaiting them in the publish loop would time an
        // ack when the loop gets round to it (a paced loop only does so when
        // the window is full), not when it arrived.
        let (pending, mut acks) =
            mpsc::channel::<(PublishAckFuture, Instant, u64)>(in_flight.saturating_sub(1).max(1));
        let collector = tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per as usize);
            while let Some((ack, sent, events)) = acks.recv().await {
                ack.await?;
                lat.push(sent.elapsed().as_secs_f64() * 1e3);
                acked.fetch_add(events, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(lat)
        });
        tasks.push(tokio::spawn(async move {
            let subject = format!("amoskys.bench.{i}");
            while work.due().await {
                let events = work.take();
                let k = events.len() as u64;
                let payload = Batch { events }.encode_to_vec();
                let sent = Instant::now();
                let ack = js.publish(subject.clone(), payload.into()).await?;
                if pending.send((ack, sent, k)).await.is_err() {
                    // The collector stopped on a failed ack; its error is the one to report.
                    break;
                }
            }
            drop(pending);
            collector.await?
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
