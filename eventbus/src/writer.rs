//! The group-commit writer: one thread owns all WAL writes.
//!
//! Publish streams hand it client batches through a bounded queue; it drains
//! whatever is waiting into one RocksDB write batch, writes it under the sync
//! policy, and only then answers each batch with its cumulative ack. When the
//! queue is full, publishers wait, and gRPC flow control slows the agents.
//!
//! A failed write is retried (reopening RocksDB, which refuses writes after a
//! WAL error) until it succeeds; nothing is acked meanwhile and the bus
//! reports itself unready.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use amoskys_proto::event::Payload;
use amoskys_proto::{AgentRecord, Event};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info};

use crate::alerts::RecentAlerts;
use crate::config::SyncPolicy;
use crate::metrics::BusMetrics;
use crate::registry::Registry;
use crate::store::{PreparedGroup, Store};

pub struct WriteRequest {
    pub agent_id: String,
    pub events: Vec<Event>,
    pub reply: oneshot::Sender<WriteOutcome>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Highest seq of the agent now durable (cumulative).
    pub acked_seq: u64,
    pub stored: usize,
    pub duplicates: usize,
}

pub enum WriterMsg {
    Write(WriteRequest),
    /// Finish what is queued, then exit.
    Stop,
}

pub type TailSender = broadcast::Sender<Arc<Vec<Event>>>;

pub struct Writer {
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<BusMetrics>,
    pub tail: TailSender,
    pub writable: Arc<AtomicBool>,
    pub sync: SyncPolicy,
    pub max_group_events: usize,
    pub alerts: Arc<RecentAlerts>,
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Dedupes and numbers the events of `reqs` against the registry's last
/// seqs; pure apart from reading the registry.
pub fn prepare(
    registry: &Registry,
    reqs: &[WriteRequest],
    next_offset: u64,
    stored_at: i64,
) -> (PreparedGroup, Vec<WriteOutcome>) {
    let mut group = PreparedGroup {
        next_offset,
        stored_at,
        ..Default::default()
    };
    let mut outcomes = Vec::with_capacity(reqs.len());
    for req in reqs {
        let rec = group.agents.entry(req.agent_id.clone()).or_insert_with(|| {
            registry
                .record(&req.agent_id)
                .unwrap_or_else(|| AgentRecord {
                    agent_id: req.agent_id.clone(),
                    first_seen: stored_at,
                    ..Default::default()
                })
        });
        let mut out = WriteOutcome {
            acked_seq: 0,
            stored: 0,
            duplicates: 0,
        };
        for e in &req.events {
            if e.seq <= rec.last_seq {
                out.duplicates += 1;
                continue;
            }
            let mut e = e.clone();
            e.offset = group.next_offset;
            e.stored_at = stored_at;
            group.next_offset += 1;
            rec.last_seq = e.seq;
            rec.events += 1;
            match &e.payload {
                Some(Payload::Heartbeat(hb)) => {
                    rec.last_heartbeat = Some(hb.clone());
                    rec.last_heartbeat_at = e.observed_at;
                    if !hb.version.is_empty() {
                        rec.version = hb.version.clone();
                    }
                }
                Some(Payload::Gap(g)) => rec.gaps_dropped += g.dropped,
                _ => {}
            }
            if !e.node.is_empty() {
                rec.node = e.node.clone();
            }
            out.stored += 1;
            group.batch_events.push(e);
        }
        rec.duplicates += out.duplicates as u64;
        rec.last_seen = stored_at;
        out.acked_seq = rec.last_seq;
        outcomes.push(out);
    }
    (group, outcomes)
}

impl Writer {
    /// Runs on its own thread until a Stop arrives or every sender is gone.
    pub fn run(self, mut rx: mpsc::Receiver<WriterMsg>) {
        self.metrics.writable.set(1);
        let mut stop = false;
        while !stop {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut reqs = Vec::new();
            let mut n = 0;
            match first {
                WriterMsg::Write(r) => {
                    n += r.events.len();
                    reqs.push(r);
                }
                WriterMsg::Stop => stop = true,
            }
            while n < self.max_group_events {
                match rx.try_recv() {
                    Ok(WriterMsg::Write(r)) => {
                        n += r.events.len();
                        reqs.push(r);
                    }
                    Ok(WriterMsg::Stop) => stop = true,
                    Err(_) => break,
                }
            }
            self.metrics.queue_depth.set(rx.len() as i64);
            if reqs.is_empty() {
                continue;
            }
            match self.sync {
                SyncPolicy::Always => {
                    for r in reqs {
                        self.commit(vec![r], true);
                    }
                }
                SyncPolicy::Batch => self.commit(reqs, true),
                SyncPolicy::Never => self.commit(reqs, false),
            }
        }
        // Drain anything that raced with Stop.
        while let Ok(WriterMsg::Write(r)) = rx.try_recv() {
            self.commit(vec![r], self.sync != SyncPolicy::Never);
        }
    }

    fn commit(&self, reqs: Vec<WriteRequest>, sync: bool) {
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            let (group, outcomes) =
                prepare(&self.registry, &reqs, self.store.next_offset(), now_ns());
            match self.store.commit(&group, sync) {
                Ok(()) => {
                    self.metrics
                        .fsync_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if attempt > 0 {
                        info!(attempts = attempt + 1, "WAL writable again; resuming acks");
                        self.writable.store(true, Ordering::SeqCst);
                        self.metrics.writable.set(1);
                    }
                    self.finish(reqs, group, outcomes);
                    return;
                }
                Err(e) => {
                    attempt += 1;
                    self.metrics.wal_write_errors.inc();
                    self.writable.store(false, Ordering::SeqCst);
                    self.metrics.writable.set(0);
                    if attempt == 1 || attempt.is_multiple_of(50) {
                        error!(error = %e, attempt, "WAL write failed; withholding acks and retrying");
                    }
                    std::thread::sleep(Duration::from_millis((50 * u64::from(attempt)).min(1000)));
                    if let Err(e) = self.store.reopen()
                        && attempt % 50 == 1
                    {
                        error!(error = %e, "reopening the WAL failed; will retry");
                    }
                }
            }
        }
    }

    fn finish(&self, reqs: Vec<WriteRequest>, group: PreparedGroup, outcomes: Vec<WriteOutcome>) {
        let stored = group.batch_events.len();
        let dups: usize = outcomes.iter().map(|o| o.duplicates).sum();
        self.metrics.events_stored.inc_by(stored as u64);
        self.metrics
            .count_stored(group.batch_events.iter().map(|e| e.collector.as_str()));
        self.alerts.observe(&group.batch_events);
        self.metrics.duplicates.inc_by(dups as u64);
        self.metrics.group_events.observe((stored + dups) as f64);
        self.registry.apply(group.agents);
        if stored > 0 && self.tail.receiver_count() > 0 {
            let _ = self.tail.send(Arc::new(group.batch_events));
        }
        for (req, out) in reqs.into_iter().zip(outcomes) {
            // A publisher that went away still had its events stored; the
            // ack it misses is re-derived from Welcome when it reconnects.
            let _ = req.reply.send(out);
        }
    }
}

/// Spawns the writer thread; returns its queue and join handle.
pub fn spawn(
    writer: Writer,
    queue_depth: usize,
) -> std::io::Result<(mpsc::Sender<WriterMsg>, std::thread::JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel(queue_depth);
    writer.metrics.queue_capacity.set(queue_depth as i64);
    let handle = std::thread::Builder::new()
        .name("amoskys-wal-writer".into())
        .spawn(move || writer.run(rx))?;
    Ok((tx, handle))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn req(agent: &str, seqs: &[u64]) -> (WriteRequest, oneshot::Receiver<WriteOutcome>) {
        let (tx, rx) = oneshot::channel();
        (
            WriteRequest {
                agent_id: agent.into(),
                events: seqs
                    .iter()
                    .map(|&s| Event {
                        agent_id: agent.into(),
                        seq: s,
                        ..Default::default()
                    })
                    .collect(),
                reply: tx,
            },
            rx,
        )
    }

    #[test]
    fn prepare_dedupes_within_and_across_requests() {
        let mut known = HashMap::new();
        known.insert(
            "a".to_string(),
            AgentRecord {
                agent_id: "a".into(),
                last_seq: 5,
                ..Default::default()
            },
        );
        let reg = Registry::with_records(known);
        let (r1, _) = req("a", &[4, 5, 6, 7]);
        let (r2, _) = req("a", &[7, 8]);
        let (r3, _) = req("b", &[1]);
        let (g, outs) = prepare(&reg, &[r1, r2, r3], 100, 42);
        assert_eq!(
            outs,
            vec![
                WriteOutcome {
                    acked_seq: 7,
                    stored: 2,
                    duplicates: 2
                },
                WriteOutcome {
                    acked_seq: 8,
                    stored: 1,
                    duplicates: 1
                },
                WriteOutcome {
                    acked_seq: 1,
                    stored: 1,
                    duplicates: 0
                },
            ]
        );
        let offsets: Vec<u64> = g.batch_events.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, vec![100, 101, 102, 103]);
        assert_eq!(g.next_offset, 104);
        assert_eq!(g.agents["a"].last_seq, 8);
        assert_eq!(g.agents["a"].events, 3);
        assert!(g.batch_events.iter().all(|e| e.stored_at == 42));
    }
}
