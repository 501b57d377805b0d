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
use amoskys_proto::{
    AgentRecord, Event, GapEvent, Hello, IncarnationEvent, PastIncarnation, Severity,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{error, info};

use crate::alerts::RecentAlerts;
use crate::config::SyncPolicy;
use crate::metrics::BusMetrics;
use crate::registry::Registry;
use crate::store::{PreparedGroup, Store};

pub struct WriteRequest {
    pub agent_id: String,
    /// The stream's incarnation: seqs are deduped per (agent_id, incarnation).
    pub incarnation: u64,
    pub events: Vec<Event>,
    pub reply: oneshot::Sender<WriteOutcome>,
}

/// A Publish stream's Hello: the writer settles which incarnation publishes
/// and what the bus holds of it, durably, before the stream gets its Welcome.
pub struct SessionRequest {
    pub hello: Hello,
    /// What the other shards store of this incarnation (an agent that moved
    /// here); the default for a single bus.
    pub elsewhere: HeldElsewhere,
    pub reply: oneshot::Sender<SessionOutcome>,
}

/// What other shards hold of an agent's incarnation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldElsewhere {
    /// The highest seq stored on any other shard.
    pub last_seq: u64,
    /// Every other shard answered; when one did not, a seq the agent saw
    /// acked above what is known is trusted, not reported as lost.
    pub complete: bool,
}

impl Default for HeldElsewhere {
    fn default() -> Self {
        Self {
            last_seq: 0,
            complete: true,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOutcome {
    /// For the Welcome: the highest seq of the incarnation the bus holds.
    pub acked_seq: u64,
    /// A never-seen incarnation replaced an older one (an event announces it).
    pub new_incarnation: bool,
    /// Seqs the agent saw acked that the bus no longer holds (a gap event
    /// names them).
    pub lost: Option<(u64, u64)>,
    /// The agent saw seqs acked that no shard that answered holds, and a
    /// shard did not answer: resumed after them unverified.
    pub unverified: bool,
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
    Session(SessionRequest),
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

/// The wall clock, Unix ns (0 before 1970): what `stored_at` is.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Past incarnations whose dedupe state an agent record keeps.
pub const MAX_PAST_INCARNATIONS: usize = 16;

/// One unit of a write group, in arrival order.
pub enum Item {
    Write(WriteRequest),
    Session(SessionRequest),
}

impl Item {
    /// None for Stop.
    fn from_msg(msg: WriterMsg) -> Option<Self> {
        match msg {
            WriterMsg::Write(r) => Some(Self::Write(r)),
            WriterMsg::Session(s) => Some(Self::Session(s)),
            WriterMsg::Stop => None,
        }
    }

    fn events(&self) -> usize {
        match self {
            Self::Write(r) => r.events.len(),
            Self::Session(_) => 0,
        }
    }
}

pub enum Outcome {
    Write(WriteOutcome),
    Session(SessionOutcome),
}

/// Dedupes and stamps what `items` carry into one group. The events are
/// moved out of the write requests, not copied: the group is prepared once
/// and committed, however many attempts the commit takes.
fn prepare_items(
    registry: &Registry,
    items: &mut [Item],
    next_offset: u64,
    stored_at: i64,
) -> (PreparedGroup, Vec<Outcome>) {
    let mut group = PreparedGroup {
        next_offset,
        stored_at,
        batch_events: Vec::with_capacity(items.iter().map(Item::events).sum()),
        ..Default::default()
    };
    let outcomes = items
        .iter_mut()
        .map(|item| match item {
            Item::Write(r) => Outcome::Write(prepare_write(registry, &mut group, r)),
            Item::Session(s) => {
                Outcome::Session(prepare_session(registry, &mut group, &s.hello, s.elsewhere))
            }
        })
        .collect();
    (group, outcomes)
}

/// The agent's record as this group has it so far.
fn record_in<'g>(
    registry: &Registry,
    group: &'g mut PreparedGroup,
    agent_id: &str,
) -> &'g mut AgentRecord {
    let stored_at = group.stored_at;
    group.agents.entry(agent_id.to_string()).or_insert_with(|| {
        registry.record(agent_id).unwrap_or_else(|| AgentRecord {
            agent_id: agent_id.to_string(),
            first_seen: stored_at,
            ..Default::default()
        })
    })
}

/// The last stored seq of `incarnation` in `rec`: the current one's, or a
/// past one's (two clones taking turns).
pub(crate) fn last_seq_of(rec: &AgentRecord, incarnation: u64) -> u64 {
    if rec.incarnation == incarnation {
        return rec.last_seq;
    }
    rec.past_incarnations
        .iter()
        .find(|p| p.incarnation == incarnation)
        .map_or(0, |p| p.last_seq)
}

fn set_last_seq(rec: &mut AgentRecord, incarnation: u64, seq: u64) {
    if rec.incarnation == incarnation {
        rec.last_seq = seq;
    } else if let Some(p) = rec
        .past_incarnations
        .iter_mut()
        .find(|p| p.incarnation == incarnation)
    {
        p.last_seq = seq;
    }
}

fn prepare_write(
    registry: &Registry,
    group: &mut PreparedGroup,
    req: &mut WriteRequest,
) -> WriteOutcome {
    let stored_at = group.stored_at;
    let mut next_offset = group.next_offset;
    // Out of the group while the agent's record (in the group) is borrowed.
    let mut batch = std::mem::take(&mut group.batch_events);
    let rec = record_in(registry, group, &req.agent_id);
    let current = rec.incarnation == req.incarnation;
    let mut last = last_seq_of(rec, req.incarnation);
    let mut out = WriteOutcome {
        acked_seq: 0,
        stored: 0,
        duplicates: 0,
    };
    // Stamped and deduped where they are, then moved over in one piece:
    // moving each event on its own cost the writer more than encoding it.
    req.events.retain_mut(|e| {
        if e.seq <= last {
            out.duplicates += 1;
            return false;
        }
        e.offset = next_offset;
        e.stored_at = stored_at;
        next_offset += 1;
        last = e.seq;
        rec.events += 1;
        match &e.payload {
            // A late batch of an incarnation that has been replaced does
            // not speak for the agent as it is now.
            Some(Payload::Heartbeat(hb)) if current => {
                rec.last_heartbeat = Some(hb.clone());
                rec.last_heartbeat_at = e.observed_at;
                rec.last_heartbeat_seq = e.seq;
                if !hb.version.is_empty() {
                    rec.version = hb.version.clone();
                }
            }
            Some(Payload::Gap(g)) => rec.gaps_dropped += g.dropped,
            _ => {}
        }
        if current && !e.node.is_empty() && e.node != rec.node {
            rec.node.clone_from(&e.node);
        }
        true
    });
    out.stored = req.events.len();
    batch.append(&mut req.events);
    set_last_seq(rec, req.incarnation, last);
    rec.duplicates += out.duplicates as u64;
    rec.last_seen = stored_at;
    out.acked_seq = last;
    group.next_offset = next_offset;
    group.batch_events = batch;
    out
}

/// An event the bus writes about an agent (seq 0: not one of the agent's).
fn bus_event(hello: &Hello, severity: Severity, at: i64, payload: Payload) -> Event {
    Event {
        agent_id: hello.agent_id.clone(),
        seq: 0,
        node: hello.node.clone(),
        collector: "bus".into(),
        observed_at: at,
        severity: severity as i32,
        incarnation: hello.incarnation,
        payload: Some(payload),
        ..Default::default()
    }
}

/// Makes `hello`'s incarnation the agent's current one and checks what the
/// bus holds of it against what the agent saw acked.
fn prepare_session(
    registry: &Registry,
    group: &mut PreparedGroup,
    hello: &Hello,
    elsewhere: HeldElsewhere,
) -> SessionOutcome {
    let at = group.stored_at;
    let rec = record_in(registry, group, &hello.agent_id);
    let mut out = SessionOutcome::default();
    let mut events = Vec::new();
    if rec.incarnations == 0 && rec.events == 0 {
        // The agent's first stream: nothing older to replace.
        rec.incarnation = hello.incarnation;
        rec.incarnation_started = at;
        rec.incarnations = 1;
    } else if rec.incarnation != hello.incarnation {
        let previous = PastIncarnation {
            incarnation: rec.incarnation,
            last_seq: rec.last_seq,
            started: rec.incarnation_started,
        };
        let returning = rec
            .past_incarnations
            .iter()
            .position(|p| p.incarnation == hello.incarnation)
            .map(|i| rec.past_incarnations.remove(i));
        rec.past_incarnations.push(previous);
        if rec.past_incarnations.len() > MAX_PAST_INCARNATIONS {
            rec.past_incarnations.remove(0);
        }
        rec.incarnation = hello.incarnation;
        match returning {
            Some(p) => {
                rec.last_seq = p.last_seq;
                rec.incarnation_started = p.started;
            }
            None => {
                // What the old spool still held at its last heartbeat, less
                // what arrived after that heartbeat, was lost with it.
                let stored_after = previous.last_seq.saturating_sub(rec.last_heartbeat_seq);
                let unacked = rec
                    .last_heartbeat
                    .as_ref()
                    .map_or(0, |hb| hb.spool_events.saturating_sub(stored_after));
                rec.last_seq = 0;
                rec.incarnation_started = at;
                rec.incarnations = rec.incarnations.max(1) + 1;
                rec.previous_incarnation = previous.incarnation;
                rec.previous_last_seq = previous.last_seq;
                rec.previous_unacked = unacked;
                out.new_incarnation = true;
                events.push(bus_event(
                    hello,
                    Severity::Notice,
                    at,
                    Payload::IncarnationStarted(IncarnationEvent {
                        incarnation: hello.incarnation,
                        previous_incarnation: previous.incarnation,
                        previous_last_seq: previous.last_seq,
                        previous_unacked: unacked,
                        node: hello.node.clone(),
                    }),
                ));
            }
        }
    }
    rec.incarnations = rec.incarnations.max(1);
    // An agent that moved here resumes after what its previous owner
    // stored, so nothing stored there is stored again here.
    rec.last_seq = rec.last_seq.max(elsewhere.last_seq);
    if hello.acked_seq > rec.last_seq && !elsewhere.complete {
        // Most likely held by the shard that did not answer (its old owner,
        // down): trusting the agent can store an in-flight batch twice
        // (counted), while a gap event would report a loss that is not one.
        rec.last_seq = hello.acked_seq;
        out.unverified = true;
    } else if hello.acked_seq > rec.last_seq {
        let (first, last) = (rec.last_seq + 1, hello.acked_seq);
        let n = last - first + 1;
        rec.bus_lost += n;
        rec.last_seq = last;
        out.lost = Some((first, last));
        events.push(bus_event(
            hello,
            Severity::Error,
            at,
            Payload::Gap(GapEvent {
                dropped: n,
                first_seq: first,
                last_seq: last,
                reason: format!(
                    "the bus no longer holds seqs {first}..={last} of incarnation {} that the agent saw acked \
                     (restored from an older backup, or a lost volume)",
                    crate::registry::incarnation_hex(hello.incarnation)
                ),
            }),
        ));
    }
    rec.last_seen = at;
    out.acked_seq = rec.last_seq;
    for mut e in events {
        e.offset = group.next_offset;
        e.stored_at = at;
        group.next_offset += 1;
        group.batch_events.push(e);
    }
    out
}

impl Writer {
    /// Runs on its own thread until a Stop arrives or every sender is gone.
    pub fn run(self, mut rx: mpsc::Receiver<WriterMsg>) {
        self.metrics.writable.set(1);
        let reclaim = Reclaim::start();
        let mut stop = false;
        while !stop {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut reqs = Vec::new();
            let mut n = 0;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match Item::from_msg(msg) {
                    Some(item) => {
                        n += item.events();
                        reqs.push(item);
                    }
                    None => stop = true,
                }
                if n < self.max_group_events {
                    next = rx.try_recv().ok();
                }
            }
            self.metrics.queue_depth.set(rx.len() as i64);
            if reqs.is_empty() {
                continue;
            }
            match self.sync {
                SyncPolicy::Always => {
                    for r in reqs {
                        self.commit(vec![r], true, &reclaim);
                    }
                }
                SyncPolicy::Batch => self.commit(reqs, true, &reclaim),
                SyncPolicy::Never => self.commit(reqs, false, &reclaim),
            }
        }
        // Drain anything that raced with Stop.
        while let Ok(msg) = rx.try_recv() {
            if let Some(item) = Item::from_msg(msg) {
                self.commit(vec![item], self.sync != SyncPolicy::Never, &reclaim);
            }
        }
    }

    fn commit(&self, mut reqs: Vec<Item>, sync: bool, reclaim: &Reclaim) {
        let mut attempt = 0u32;
        // A failed write changes nothing, so the retry writes the same group
        // (same offsets, same stored time) rather than preparing it again.
        let (mut group, outcomes) = prepare_items(
            &self.registry,
            &mut reqs,
            self.store.next_offset(),
            now_ns(),
        );
        loop {
            let started = Instant::now();
            match self.store.commit(&mut group, sync) {
                Ok(()) => {
                    self.metrics
                        .fsync_seconds
                        .observe(started.elapsed().as_secs_f64());
                    if attempt > 0 {
                        info!(attempts = attempt + 1, "WAL writable again; resuming acks");
                        self.writable.store(true, Ordering::SeqCst);
                        self.metrics.writable.set(1);
                    }
                    self.finish(reqs, group, outcomes, reclaim);
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

    fn finish(
        &self,
        reqs: Vec<Item>,
        group: PreparedGroup,
        outcomes: Vec<Outcome>,
        reclaim: &Reclaim,
    ) {
        let stored = group.batch_events.len();
        let dups: usize = outcomes
            .iter()
            .map(|o| match o {
                Outcome::Write(w) => w.duplicates,
                Outcome::Session(_) => 0,
            })
            .sum();
        // The next group's dedupe reads the registry: applied before
        // anything else, on this thread.
        self.registry.apply(group.agents);
        let (owned, shared) = if stored > 0 && self.tail.receiver_count() > 0 {
            let shared = Arc::new(group.batch_events);
            let _ = self.tail.send(shared.clone());
            (Vec::new(), Some(shared))
        } else {
            (group.batch_events, None)
        };
        // Acks before the bookkeeping below: the agents' next batches are
        // what the writer waits for.
        for (req, out) in reqs.into_iter().zip(outcomes) {
            // A publisher that went away still had its events stored; the
            // ack it misses is re-derived from Welcome when it reconnects.
            match (req, out) {
                (Item::Write(r), Outcome::Write(o)) => {
                    let _ = r.reply.send(o);
                }
                (Item::Session(r), Outcome::Session(o)) => {
                    if o.new_incarnation {
                        self.metrics.incarnations.inc();
                    }
                    if let Some((first, last)) = o.lost {
                        self.metrics.bus_lost.inc_by(last - first + 1);
                    }
                    if o.unverified {
                        self.metrics.shard_move_unverified.inc();
                    }
                    let _ = r.reply.send(o);
                }
                _ => {}
            }
        }
        let events: &[Event] = shared.as_deref().map_or(&owned, |v| v);
        self.metrics.events_stored.inc_by(stored as u64);
        self.metrics
            .count_stored(events.iter().map(|e| e.collector.as_str()));
        self.alerts.observe(events);
        self.metrics.duplicates.inc_by(dups as u64);
        self.metrics.group_events.observe((stored + dups) as f64);
        reclaim.free(owned);
    }
}

/// Frees stored events on a thread of their own: a group's events are
/// tens of thousands of small allocations, and freeing them took the
/// writer a share of every group's time. Inline when that thread is busy
/// or could not be started.
struct Reclaim {
    tx: Option<std::sync::mpsc::SyncSender<Vec<Event>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reclaim {
    fn start() -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Event>>(4);
        match std::thread::Builder::new()
            .name("amoskys-reclaim".into())
            .spawn(move || rx.into_iter().for_each(drop))
        {
            Ok(thread) => Self {
                tx: Some(tx),
                thread: Some(thread),
            },
            Err(e) => {
                error!(error = %e, "could not start the reclaim thread; the writer frees events itself");
                Self {
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    fn free(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx
            && let Err(
                std::sync::mpsc::TrySendError::Full(events)
                | std::sync::mpsc::TrySendError::Disconnected(events),
            ) = tx.try_send(events)
        {
            drop(events);
        }
    }
}

impl Drop for Reclaim {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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

    /// `prepare_items` for write requests only.
    fn prepare(
        registry: &Registry,
        reqs: Vec<WriteRequest>,
        next_offset: u64,
        stored_at: i64,
    ) -> (PreparedGroup, Vec<WriteOutcome>) {
        let mut items: Vec<Item> = reqs.into_iter().map(Item::Write).collect();
        let (group, outcomes) = prepare_items(registry, &mut items, next_offset, stored_at);
        let writes = outcomes
            .into_iter()
            .map(|o| match o {
                Outcome::Write(w) => w,
                Outcome::Session(_) => unreachable!("only writes were prepared"),
            })
            .collect();
        (group, writes)
    }

    fn req(agent: &str, seqs: &[u64]) -> (WriteRequest, oneshot::Receiver<WriteOutcome>) {
        let (tx, rx) = oneshot::channel();
        (
            WriteRequest {
                agent_id: agent.into(),
                incarnation: 0,
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
        let (g, outs) = prepare(&reg, vec![r1, r2, r3], 100, 42);
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

    fn session(
        registry: &Registry,
        hello: &Hello,
        next_offset: u64,
    ) -> (PreparedGroup, SessionOutcome) {
        session_with(registry, hello, HeldElsewhere::default(), next_offset)
    }

    fn session_with(
        registry: &Registry,
        hello: &Hello,
        elsewhere: HeldElsewhere,
        next_offset: u64,
    ) -> (PreparedGroup, SessionOutcome) {
        let (tx, _rx) = oneshot::channel();
        let item = Item::Session(SessionRequest {
            hello: hello.clone(),
            elsewhere,
            reply: tx,
        });
        let (g, mut outs) = prepare_items(registry, &mut [item], next_offset, 77);
        match outs.pop() {
            Some(Outcome::Session(o)) => (g, o),
            _ => panic!("no session outcome"),
        }
    }

    fn write(
        registry: &Registry,
        agent: &str,
        incarnation: u64,
        seqs: &[u64],
    ) -> (PreparedGroup, WriteOutcome) {
        let (mut r, _) = req(agent, seqs);
        r.incarnation = incarnation;
        let (g, mut outs) = prepare(registry, vec![r], 1, 77);
        (g, outs.pop().unwrap())
    }

    fn hello(incarnation: u64, acked_seq: u64) -> Hello {
        Hello {
            agent_id: "a".into(),
            node: "n".into(),
            incarnation,
            acked_seq,
            ..Default::default()
        }
    }

    #[test]
    fn a_new_incarnation_starts_a_fresh_seq_space_and_is_announced() {
        let reg = Registry::default();
        // The first stream of an agent: nothing to announce.
        let (g, o) = session(&reg, &hello(0xa, 0), 1);
        assert_eq!(o, SessionOutcome::default());
        assert!(g.batch_events.is_empty());
        reg.apply(g.agents);
        let (g, w) = write(&reg, "a", 0xa, &[1, 2, 3]);
        assert_eq!(w.acked_seq, 3);
        let mut rec = g.agents["a"].clone();
        rec.last_heartbeat = Some(amoskys_proto::Heartbeat {
            spool_events: 5,
            ..Default::default()
        });
        rec.last_heartbeat_seq = 2;
        reg.apply([("a".to_string(), rec)]);

        // A wiped spool: seq 1 again, under a new incarnation.
        let (g, o) = session(&reg, &hello(0xb, 0), 10);
        assert!(o.new_incarnation);
        assert_eq!((o.acked_seq, o.lost), (0, None));
        let rec = &g.agents["a"];
        assert_eq!(
            (rec.incarnation, rec.incarnations, rec.last_seq),
            (0xb, 2, 0)
        );
        assert_eq!((rec.previous_incarnation, rec.previous_last_seq), (0xa, 3));
        // 5 unacked at the heartbeat (seq 2), one of them (seq 3) arrived later.
        assert_eq!(rec.previous_unacked, 4);
        assert_eq!(g.batch_events.len(), 1);
        let ev = &g.batch_events[0];
        assert_eq!(
            (ev.seq, ev.offset, ev.collector.as_str(), ev.incarnation),
            (0, 10, "bus", 0xb)
        );
        match &ev.payload {
            Some(Payload::IncarnationStarted(i)) => {
                assert_eq!(
                    (
                        i.previous_incarnation,
                        i.previous_last_seq,
                        i.previous_unacked
                    ),
                    (0xa, 3, 4)
                );
            }
            other => panic!("not an incarnation event: {other:?}"),
        }
        reg.apply(g.agents);
        let (_, w) = write(&reg, "a", 0xb, &[1, 2]);
        assert_eq!(
            (w.stored, w.duplicates),
            (2, 0),
            "seqs 1 and 2 of the new life are stored"
        );
    }

    #[test]
    fn incarnations_taking_turns_keep_their_own_dedupe_state() {
        let reg = Registry::default();
        let (g, _) = session(&reg, &hello(0xa, 0), 1);
        reg.apply(g.agents);
        let (g, _) = write(&reg, "a", 0xa, &[1, 2, 3]);
        reg.apply(g.agents);
        let (g, o) = session(&reg, &hello(0xb, 0), 1);
        assert!(o.new_incarnation);
        reg.apply(g.agents);
        let (g, _) = write(&reg, "a", 0xb, &[1]);
        reg.apply(g.agents);
        // Back to the first: it resumes above 3, announced only once.
        let (g, o) = session(&reg, &hello(0xa, 3), 1);
        assert_eq!((o.acked_seq, o.new_incarnation, o.lost), (3, false, None));
        assert!(g.batch_events.is_empty());
        reg.apply(g.agents);
        let (_, w) = write(&reg, "a", 0xa, &[3, 4]);
        assert_eq!((w.stored, w.duplicates), (1, 1));
        // A late batch of the other incarnation is deduped against its own seqs.
        let (_, w) = write(&reg, "a", 0xb, &[1, 2]);
        assert_eq!((w.stored, w.duplicates, w.acked_seq), (1, 1, 2));
    }

    #[test]
    fn holding_less_than_the_agent_saw_acked_records_a_gap() {
        let reg = Registry::default();
        let (g, _) = session(&reg, &hello(0xa, 0), 1);
        reg.apply(g.agents);
        let (g, _) = write(&reg, "a", 0xa, &[1, 2, 3]);
        reg.apply(g.agents);
        // Restored from a backup taken at seq 3; the agent saw 9 acked.
        let (g, o) = session(&reg, &hello(0xa, 9), 20);
        assert_eq!(
            (o.acked_seq, o.lost, o.new_incarnation),
            (9, Some((4, 9)), false)
        );
        assert_eq!(g.agents["a"].bus_lost, 6);
        let ev = &g.batch_events[0];
        assert_eq!((ev.seq, ev.offset), (0, 20));
        match &ev.payload {
            Some(Payload::Gap(gap)) => {
                assert_eq!((gap.first_seq, gap.last_seq, gap.dropped), (4, 9, 6));
                assert!(
                    gap.reason.contains("no longer holds seqs 4..=9"),
                    "{}",
                    gap.reason
                );
            }
            other => panic!("not a gap: {other:?}"),
        }
        reg.apply(g.agents);
        // Reported once: the next Hello with the same acked seq is clean.
        let (g, o) = session(&reg, &hello(0xa, 9), 21);
        assert_eq!((o.acked_seq, o.lost), (9, None));
        assert!(g.batch_events.is_empty());
    }

    #[test]
    fn an_agent_that_moved_here_resumes_after_what_its_old_shard_stored() {
        let reg = Registry::default();
        // Seqs 1..=40 went to the old owner; this shard never saw the agent.
        let held = HeldElsewhere {
            last_seq: 40,
            complete: true,
        };
        let (g, o) = session_with(&reg, &hello(0xa, 40), held, 1);
        assert_eq!((o.acked_seq, o.lost, o.unverified), (40, None, false));
        assert!(g.batch_events.is_empty(), "no gap event for a move");
        reg.apply(g.agents);
        let (_, w) = write(&reg, "a", 0xa, &[39, 40, 41]);
        assert_eq!((w.stored, w.duplicates, w.acked_seq), (1, 2, 41));

        // The old owner is down: the agent's word is taken, no loss recorded.
        let reg = Registry::default();
        let down = HeldElsewhere {
            last_seq: 0,
            complete: false,
        };
        let (g, o) = session_with(&reg, &hello(0xa, 40), down, 1);
        assert_eq!((o.acked_seq, o.lost, o.unverified), (40, None, true));
        assert!(g.batch_events.is_empty());
        assert_eq!(g.agents["a"].bus_lost, 0);

        // Every shard answered and none holds 30..=40: that is a loss.
        let reg = Registry::default();
        let short = HeldElsewhere {
            last_seq: 29,
            complete: true,
        };
        let (_, o) = session_with(&reg, &hello(0xa, 40), short, 1);
        assert_eq!((o.acked_seq, o.lost), (40, Some((30, 40))));
    }
}
