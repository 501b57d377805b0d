//! The agent's on-disk spool: every event a collector produces is written here
//! first, with its `seq`, and leaves only when the bus has acked it.
//!
//! It is a RocksDB with a small memory budget (the library is in the binary
//! already for the bus). Events are in the default column family under `e` +
//! big-endian seq, so iteration is in seq order. The `meta` column family
//! holds the next seq, the lowest held seq, the drop total and the pending
//! gap, written in the same batch as the events they describe, so a kill -9
//! never leaves a seq reused or a drop uncounted.
//!
//! The spool is a queue, and is laid out so RocksDB never rewrites it: events
//! acked or dropped are not deleted key by key (range tombstones make every
//! flushed file overlap all the data held, so each compaction rewrote the
//! whole spool, and a full spool stalled its own writes). Moving `first` past
//! them is enough, as nothing reads below it; whole files below it are then
//! dropped (`DeleteFilesInRange`). With the meta keys elsewhere, flushed files
//! hold disjoint seq ranges and reach the lower levels by trivial moves.
//!
//! A spool is one *incarnation* of its agent: a random id made when the
//! spool is created, stored in it, and sent in every Hello. Seqs are numbered
//! per incarnation, so a wiped or new spool starts a seq space of its own that
//! the bus stores instead of dropping as duplicates. The highest acked seq is
//! kept too, so the bus can tell when it holds less than the agent saw acked.
//!
//! The spool is bounded in bytes. When an append would exceed the bound, the
//! oldest events are dropped and counted; the count becomes a gap event the
//! next time the sender connects, so loss is never silent.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;

use amoskys_proto::event::Payload;
use amoskys_proto::{Event, GapEvent, Severity};
use prost::Message;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions,
};

const EVENT: u8 = b'e';
const META_NEXT_SEQ: &[u8] = b"mnext_seq";
const META_DROPPED: &[u8] = b"mdropped";
const META_GAP: &[u8] = b"mgap";
const META_INCARNATION: &[u8] = b"mincarnation";
const META_ACKED: &[u8] = b"macked";
/// Lowest seq still held; events below it are dead, whatever the files hold.
const META_FIRST: &[u8] = b"mfirst";
/// Every meta key. Spools from before the `meta` column family kept them in
/// the default one; they move over once, at open.
const META_KEYS: [&[u8]; 6] = [
    META_NEXT_SEQ,
    META_DROPPED,
    META_GAP,
    META_INCARNATION,
    META_ACKED,
    META_FIRST,
];
const META_CF: &str = "meta";
/// Dead bytes below `first` after which whole files are dropped.
const RECLAIM_BYTES: u64 = 4 * 1024 * 1024;

/// Why the spool failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Its directory could not be opened.
    #[error("spool {path}: {source}")]
    Open {
        /// The spool's directory.
        path: String,
        /// RocksDB's reason.
        #[source]
        source: rocksdb::Error,
    },
    /// A write did not reach the disk.
    #[error("spool write: {0}")]
    Write(#[source] rocksdb::Error),
    /// A read failed.
    #[error("spool read: {0}")]
    Read(#[source] rocksdb::Error),
    /// A stored event does not decode.
    #[error("spool holds an undecodable event at seq {seq}: {message}")]
    Corrupt {
        /// The event's seq.
        seq: u64,
        /// The decoder's reason.
        message: String,
    },
}

/// What a collector hands to the runtime; the spool makes it an `Event`.
#[derive(Clone, Debug)]
pub struct Draft {
    /// The collector's name.
    pub collector: &'static str,
    /// When the collector saw it, Unix ns.
    pub observed_at: i64,
    /// How much it matters.
    pub severity: Severity,
    /// Free-form labels (`k8s.pod`, `k8s.namespace`, ...).
    pub labels: HashMap<String, String>,
    /// What was seen.
    pub payload: Payload,
    /// The pod it is about, added by the runtime where it knows the pod.
    pub k8s: Option<amoskys_proto::K8sIdentity>,
}

impl Draft {
    /// A draft observed now, with no labels.
    pub fn new(collector: &'static str, severity: Severity, payload: Payload) -> Self {
        Self {
            collector,
            observed_at: now_ns(),
            severity,
            labels: HashMap::new(),
            payload,
            k8s: None,
        }
    }
}

/// A random, non-zero incarnation id (0 means "from before incarnations").
fn new_incarnation() -> u64 {
    loop {
        let i: u64 = rand::random();
        if i != 0 {
            return i;
        }
    }
}

/// The wall clock, Unix ns (0 before 1970).
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Drops not yet reported to the bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingGap {
    /// Events dropped.
    pub dropped: u64,
    /// The first dropped seq.
    pub first_seq: u64,
    /// The last dropped seq.
    pub last_seq: u64,
}

impl PendingGap {
    fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.dropped.to_be_bytes());
        b[8..16].copy_from_slice(&self.first_seq.to_be_bytes());
        b[16..].copy_from_slice(&self.last_seq.to_be_bytes());
        b
    }
    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 24 {
            return None;
        }
        let u = |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().unwrap_or([0; 8]));
        Some(Self {
            dropped: u(0..8),
            first_seq: u(8..16),
            last_seq: u(16..24),
        })
    }
    fn add(&mut self, first: u64, last: u64, n: u64) {
        if self.dropped == 0 {
            self.first_seq = first;
        }
        self.first_seq = self.first_seq.min(first);
        self.last_seq = self.last_seq.max(last);
        self.dropped += n;
    }
}

#[derive(Debug)]
struct State {
    /// Lowest seq still held (== next when empty).
    first: u64,
    next: u64,
    bytes: u64,
    events: u64,
    dropped_total: u64,
    gap: PendingGap,
    /// The highest seq the bus acked.
    acked: u64,
    /// Encoded size of each held event, seq `first` at the front (held seqs
    /// are contiguous), so acks and drops account bytes without reading
    /// values back from disk. 4 bytes an event.
    sizes: VecDeque<u32>,
    /// Bytes acked or dropped since dead files were last dropped.
    dead_bytes: u64,
}

/// A point-in-time view for metrics and heartbeats.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpoolStats {
    /// The oldest seq held.
    pub first_seq: u64,
    /// The seq the next event gets.
    pub next_seq: u64,
    /// Bytes held.
    pub bytes: u64,
    /// Events held.
    pub events: u64,
    /// Events dropped since the spool was made, because it was full.
    pub dropped_total: u64,
    /// The cap on `bytes`.
    pub max_bytes: u64,
    /// The highest seq the bus has acked (0: none, or a spool from before
    /// this was recorded).
    pub acked_seq: u64,
}

/// Events between a collector and the bus's ack: seq-numbered, durable,
/// bounded by bytes, the oldest dropped (and reported as a gap) when full.
pub struct Spool {
    db: DB,
    state: Mutex<State>,
    max_bytes: u64,
    agent_id: String,
    node: String,
    incarnation: u64,
    /// Woken on every append, so the sender need not poll.
    pub appended: tokio::sync::Notify,
}

fn key(seq: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8]) -> Option<u64> {
    (k.len() == 9 && k[0] == EVENT).then(|| u64::from_be_bytes(k[1..].try_into().unwrap_or([0; 8])))
}

fn meta_cf(db: &DB) -> Result<&ColumnFamily, SpoolError> {
    db.cf_handle(META_CF).ok_or_else(|| SpoolError::Corrupt {
        seq: 0,
        message: format!("column family {META_CF:?} missing"),
    })
}

fn u64_meta(db: &DB, k: &[u8]) -> Result<Option<u64>, SpoolError> {
    Ok(db
        .get_cf(meta_cf(db)?, k)
        .map_err(SpoolError::Read)?
        .and_then(|v| v.as_slice().try_into().ok().map(u64::from_be_bytes)))
}

/// Moves meta keys a spool from before the `meta` column family kept among
/// its events, in one batch. Such a spool deleted acked events with range
/// tombstones, so its first held event is found by reading from seq 0.
fn migrate_meta(db: &DB) -> Result<(), SpoolError> {
    let meta = meta_cf(db)?;
    let mut batch = WriteBatch::default();
    for k in META_KEYS {
        if let Some(v) = db.get(k).map_err(SpoolError::Read)? {
            if db.get_cf(meta, k).map_err(SpoolError::Read)?.is_none() {
                batch.put_cf(meta, k, v);
            }
            batch.delete(k);
        }
    }
    if !batch.is_empty() {
        db.write(batch).map_err(SpoolError::Write)?;
    }
    Ok(())
}

/// Counts bytes that went below `first`; every few MB of them, the `first`
/// below which whole files can be dropped.
fn note_dead(s: &mut State, freed: u64) -> Option<u64> {
    s.dead_bytes += freed;
    if s.dead_bytes < RECLAIM_BYTES {
        return None;
    }
    s.dead_bytes = 0;
    Some(s.first)
}

impl Spool {
    /// Opens (or creates) the spool in `dir` for this agent, capped at
    /// `max_bytes`; a new incarnation starts when the directory is new.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        agent_id: &str,
        node: &str,
    ) -> Result<Self, SpoolError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // A small memory budget: the agent's whole RSS target is 25 MB.
        opts.set_write_buffer_size(2 * 1024 * 1024);
        opts.set_max_write_buffer_number(2);
        opts.set_max_open_files(64);
        opts.set_keep_log_file_num(2);
        opts.set_max_total_wal_size(8 * 1024 * 1024);
        opts.set_max_background_jobs(1);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&rocksdb::Cache::new_lru_cache(1024 * 1024));
        opts.set_block_based_table_factory(&table);
        opts.create_missing_column_families(true);
        let mut meta_opts = Options::default();
        meta_opts.set_write_buffer_size(256 * 1024);
        let cfs = vec![
            ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, opts.clone()),
            ColumnFamilyDescriptor::new(META_CF, meta_opts),
        ];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|source| SpoolError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        migrate_meta(&db)?;

        let next_stored = u64_meta(&db, META_NEXT_SEQ)?;
        let next_meta = next_stored.unwrap_or(1);
        let dropped_total = u64_meta(&db, META_DROPPED)?.unwrap_or(0);
        let gap = db
            .get_cf(meta_cf(&db)?, META_GAP)
            .map_err(SpoolError::Read)?
            .and_then(|v| PendingGap::decode(&v))
            .unwrap_or_default();
        let mut first = None;
        let mut last = 0;
        let mut bytes = 0u64;
        let mut events = 0u64;
        let mut sizes = VecDeque::new();
        let start = u64_meta(&db, META_FIRST)?.unwrap_or(0);
        for item in db.iterator(IteratorMode::From(&key(start), Direction::Forward)) {
            let (k, v) = item.map_err(SpoolError::Read)?;
            let Some(seq) = seq_of(&k) else { break };
            first.get_or_insert(seq);
            last = seq;
            bytes += v.len() as u64;
            events += 1;
            sizes.push_back(v.len() as u32);
        }
        // The meta key and the events are written together, but take the
        // larger in case the file was copied or restored by hand.
        let next = next_meta.max(last + 1);
        let incarnation = match u64_meta(&db, META_INCARNATION)? {
            Some(i) => i,
            // A spool that already numbered events before incarnations
            // existed keeps incarnation 0, which is what the bus recorded for
            // it: its seqs go on in the seq space the bus knows.
            None if next_stored.is_some() || first.is_some() => 0,
            None => {
                let fresh = new_incarnation();
                db.put_cf(meta_cf(&db)?, META_INCARNATION, fresh.to_be_bytes())
                    .map_err(SpoolError::Write)?;
                fresh
            }
        };
        let acked = u64_meta(&db, META_ACKED)?.unwrap_or(0);
        Ok(Self {
            db,
            state: Mutex::new(State {
                first: first.unwrap_or(next),
                next,
                bytes,
                events,
                dropped_total,
                gap,
                acked,
                sizes,
                dead_bytes: 0,
            }),
            max_bytes,
            agent_id: agent_id.to_string(),
            node: node.to_string(),
            incarnation,
            appended: tokio::sync::Notify::new(),
        })
    }

    /// This spool's incarnation (see the module docs).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its figures now.
    pub fn stats(&self) -> SpoolStats {
        let s = self.lock();
        SpoolStats {
            first_seq: s.first,
            next_seq: s.next,
            bytes: s.bytes,
            events: s.events,
            dropped_total: s.dropped_total,
            max_bytes: self.max_bytes,
            acked_seq: s.acked,
        }
    }

    /// Drops the bus has not been told of yet.
    pub fn pending_gap(&self) -> PendingGap {
        self.lock().gap
    }

    fn event(&self, seq: u64, d: Draft) -> Event {
        Event {
            agent_id: self.agent_id.clone(),
            seq,
            node: self.node.clone(),
            collector: d.collector.to_string(),
            observed_at: d.observed_at,
            severity: d.severity as i32,
            labels: d.labels,
            offset: 0,
            stored_at: 0,
            incarnation: self.incarnation,
            shard: 0,
            k8s: d.k8s,
            payload: Some(d.payload),
        }
    }

    /// Gives each draft the next seq and writes them in one batch. Returns the
    /// number of events dropped to stay within the byte bound.
    pub fn append(&self, drafts: Vec<Draft>) -> Result<u64, SpoolError> {
        if drafts.is_empty() {
            return Ok(0);
        }
        let mut s = self.lock();
        let encoded: Vec<(u64, Vec<u8>)> = (s.next..)
            .zip(drafts)
            .map(|(seq, d)| (seq, self.event(seq, d).encode_to_vec()))
            .collect();
        let (dropped, reclaim) = self.write_locked(&mut s, encoded, None)?;
        drop(s);
        self.drop_dead_files(reclaim);
        Ok(dropped)
    }

    /// Appends a gap event for the pending drops (if any) and clears them in
    /// the same batch. Called when the sender connects.
    pub fn flush_gap(&self) -> Result<bool, SpoolError> {
        let mut s = self.lock();
        if s.gap.dropped == 0 {
            return Ok(false);
        }
        let g = s.gap;
        let seq = s.next;
        let ev = self.event(
            seq,
            Draft::new(
                "agent",
                Severity::Warning,
                Payload::Gap(GapEvent {
                    dropped: g.dropped,
                    first_seq: g.first_seq,
                    last_seq: g.last_seq,
                    reason: "spool full while the bus was unreachable".into(),
                }),
            ),
        );
        let (_, reclaim) = self.write_locked(
            &mut s,
            vec![(seq, ev.encode_to_vec())],
            Some(PendingGap::default()),
        )?;
        drop(s);
        self.drop_dead_files(reclaim);
        Ok(true)
    }

    fn write_locked(
        &self,
        s: &mut State,
        mut new: Vec<(u64, Vec<u8>)>,
        gap_override: Option<PendingGap>,
    ) -> Result<(u64, Option<u64>), SpoolError> {
        let mut batch = WriteBatch::default();
        // Every seq handed out stays used, even when its event is dropped below.
        let next = s.next + new.len() as u64;
        let incoming: u64 = new.iter().map(|(_, v)| v.len() as u64).sum();
        let mut gap = gap_override.unwrap_or(s.gap);
        let mut dropped = 0u64;
        let mut stored_dropped = 0usize;
        let mut freed_stored = 0u64;
        let mut first = s.first;
        let mut bytes = s.bytes;
        let mut events = s.events;
        if bytes + incoming > self.max_bytes {
            // Free the oldest stored events first.
            let need = bytes + incoming - self.max_bytes;
            let mut freed = 0u64;
            let mut last_dropped = None;
            for item in self
                .db
                .iterator(IteratorMode::From(&key(first), Direction::Forward))
            {
                if freed >= need {
                    break;
                }
                let (k, v) = item.map_err(SpoolError::Read)?;
                let Some(seq) = seq_of(&k) else { break };
                freed += v.len() as u64;
                last_dropped = Some(seq);
                dropped += 1;
                // A dropped gap event carries drops of its own: keep them.
                if let Ok(Event {
                    payload: Some(Payload::Gap(g)),
                    ..
                }) = Event::decode(v.as_ref())
                {
                    gap.add(g.first_seq, g.last_seq, g.dropped);
                }
            }
            if let Some(last) = last_dropped {
                stored_dropped = dropped as usize;
                freed_stored = freed;
                gap.add(first, last, dropped);
                first = last + 1;
                bytes -= freed;
                events -= dropped;
            }
            // Still over: the new events alone exceed the bound; keep the newest.
            let mut over = (bytes + new.iter().map(|(_, v)| v.len() as u64).sum::<u64>())
                .saturating_sub(self.max_bytes);
            let mut skip = 0;
            while over > 0 && skip < new.len() {
                over = over.saturating_sub(new[skip].1.len() as u64);
                skip += 1;
            }
            if skip > 0 {
                gap.add(new[0].0, new[skip - 1].0, skip as u64);
                dropped += skip as u64;
                new.drain(..skip);
            }
        }
        if events == 0 {
            // Nothing older is left: the spool starts at the first new event kept.
            first = new.first().map(|(q, _)| *q).unwrap_or(next);
        }
        for (seq, v) in &new {
            bytes += v.len() as u64;
            events += 1;
            batch.put(key(*seq), v);
        }
        let meta = meta_cf(&self.db)?;
        batch.put_cf(meta, META_NEXT_SEQ, next.to_be_bytes());
        batch.put_cf(meta, META_FIRST, first.to_be_bytes());
        batch.put_cf(
            meta,
            META_DROPPED,
            (s.dropped_total + dropped).to_be_bytes(),
        );
        batch.put_cf(meta, META_GAP, gap.encode());
        self.db
            .write_opt(batch, &WriteOptions::default())
            .map_err(SpoolError::Write)?;
        // Only now that the write succeeded does the in-memory view change.
        let held = s.sizes.len();
        s.sizes.drain(..stored_dropped.min(held));
        s.sizes.extend(new.iter().map(|(_, v)| v.len() as u32));
        s.first = first;
        s.next = next;
        s.bytes = bytes;
        s.events = events;
        s.dropped_total += dropped;
        s.gap = gap;
        let reclaim = note_dead(s, freed_stored);
        self.appended.notify_one();
        Ok((dropped, reclaim))
    }

    /// Drops the files that hold only events below `first` (from
    /// [`note_dead`]). Called with the state unlocked: deleting files is I/O
    /// the sender and the spool writer need not wait for. Files still holding
    /// a live event stay; what is dead in them is never read and goes with
    /// them.
    fn drop_dead_files(&self, first: Option<u64>) {
        let Some(first) = first.filter(|&f| f > 0) else {
            return;
        };
        // Best effort: a failure leaves dead files on disk, never a live
        // event lost, so it is logged and retried after the next few MB.
        if let Err(e) = self.db.delete_file_in_range(key(0), key(first - 1)) {
            tracing::warn!(error = %e, "spool: dropping files of acked events failed");
        }
    }

    /// Up to `max_events` events from `from` on, in seq order.
    pub fn read(
        &self,
        from: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<Event>, SpoolError> {
        let from = from.max(self.lock().first);
        let mut out = Vec::new();
        let mut size = 0usize;
        for item in self
            .db
            .iterator(IteratorMode::From(&key(from), Direction::Forward))
        {
            let (k, v) = item.map_err(SpoolError::Read)?;
            let Some(seq) = seq_of(&k) else { break };
            if !out.is_empty() && size + v.len() > max_bytes {
                break;
            }
            size += v.len();
            let ev = Event::decode(v.as_ref()).map_err(|e| SpoolError::Corrupt {
                seq,
                message: e.to_string(),
            })?;
            out.push(ev);
            if out.len() >= max_events {
                break;
            }
        }
        Ok(out)
    }

    /// The bus holds everything up to `seq`: remove it.
    pub fn ack(&self, seq: u64) -> Result<u64, SpoolError> {
        let mut s = self.lock();
        let upto = seq.min(s.next.saturating_sub(1));
        let n = if upto >= s.first {
            (upto + 1 - s.first).min(s.sizes.len() as u64)
        } else {
            0
        };
        if n == 0 && upto <= s.acked {
            return Ok(0);
        }
        let freed: u64 = s.sizes.iter().take(n as usize).map(|&l| u64::from(l)).sum();
        let first = if n > 0 { upto + 1 } else { s.first };
        let meta = meta_cf(&self.db)?;
        let mut batch = WriteBatch::default();
        let acked = s.acked.max(upto);
        batch.put_cf(meta, META_ACKED, acked.to_be_bytes());
        batch.put_cf(meta, META_FIRST, first.to_be_bytes());
        self.db.write(batch).map_err(SpoolError::Write)?;
        s.acked = acked;
        if n == 0 {
            return Ok(0);
        }
        s.sizes.drain(..n as usize);
        s.first = first;
        s.bytes -= freed.min(s.bytes);
        s.events -= n.min(s.events);
        let reclaim = note_dead(&mut s, freed);
        drop(s);
        self.drop_dead_files(reclaim);
        Ok(n)
    }

    /// Flushes memtables and closes; used on clean shutdown.
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.db.flush_wal(true).map_err(SpoolError::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::SyntheticEvent;

    fn draft(n: u64, size: usize) -> Draft {
        Draft::new(
            "synthetic",
            Severity::Info,
            Payload::Synthetic(SyntheticEvent {
                n,
                data: vec![7u8; size],
            }),
        )
    }

    #[test]
    fn seq_survives_reopen_and_ack_removes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
            s.append((0..10).map(|i| draft(i, 10)).collect()).unwrap();
            assert_eq!(s.ack(4).unwrap(), 4);
            let st = s.stats();
            assert_eq!((st.first_seq, st.next_seq, st.events), (5, 11, 6));
        }
        let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
        let st = s.stats();
        assert_eq!((st.first_seq, st.next_seq, st.events), (5, 11, 6));
        let evs = s.read(0, 100, 1 << 20).unwrap();
        assert_eq!(evs.first().unwrap().seq, 5);
        assert_eq!(evs.last().unwrap().seq, 10);
        s.ack(10).unwrap();
        assert_eq!(s.stats().events, 0);
        assert_eq!(s.stats().bytes, 0);
        drop(s);
        let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
        s.append(vec![draft(0, 1)]).unwrap();
        assert_eq!(s.read(0, 10, 1 << 20).unwrap()[0].seq, 11);
    }

    #[test]
    fn a_spool_with_meta_among_its_events_is_moved_over_once() {
        // The layout before the meta column family: meta keys beside the
        // events, acked events removed with a range tombstone.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut opts = Options::default();
            opts.create_if_missing(true);
            let db = DB::open(&opts, dir.path()).unwrap();
            for seq in 1..=10u64 {
                let e = Event {
                    agent_id: "a".into(),
                    seq,
                    incarnation: 0x1234,
                    ..Default::default()
                };
                db.put(key(seq), e.encode_to_vec()).unwrap();
            }
            let mut acked = WriteBatch::default();
            acked.delete_range(key(1), key(4));
            db.write(acked).unwrap();
            db.put(META_NEXT_SEQ, 11u64.to_be_bytes()).unwrap();
            db.put(META_INCARNATION, 0x1234u64.to_be_bytes()).unwrap();
            db.put(META_ACKED, 3u64.to_be_bytes()).unwrap();
        }
        for _ in 0..2 {
            let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
            let st = s.stats();
            assert_eq!(
                (st.first_seq, st.next_seq, st.events, st.acked_seq),
                (4, 11, 7, 3)
            );
            assert_eq!(s.incarnation(), 0x1234);
            let seqs: Vec<u64> = s
                .read(0, 100, 1 << 20)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            assert_eq!(seqs, (4..=10).collect::<Vec<_>>());
            for k in META_KEYS {
                assert!(
                    s.db.get(k).unwrap().is_none(),
                    "{k:?} left among the events"
                );
            }
        }
    }

    #[test]
    fn files_of_acked_events_are_dropped_without_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 30, "a", "n").unwrap();
        let sst = |s: &Spool| {
            s.db.property_int_value("rocksdb.total-sst-files-size")
                .unwrap()
                .unwrap()
        };
        // Incompressible payloads, so the files are as large as the events.
        let noisy = |n: u64| {
            let mut d = draft(n, 0);
            if let Payload::Synthetic(p) = &mut d.payload {
                p.data = (0..1000).map(|_| rand::random::<u8>()).collect();
            }
            d
        };
        for i in 0..20u64 {
            s.append((0..1000).map(|n| noisy(i * 1000 + n)).collect())
                .unwrap();
            s.db.flush().unwrap();
        }
        // Flushed files move below L0 (where whole files can be dropped).
        s.db.compact_range(None::<&[u8]>, None::<&[u8]>);
        let before = sst(&s);
        assert!(before > 15_000_000, "{before}");
        s.ack(19_000).unwrap();
        let after = sst(&s);
        assert!(after < before / 4, "acked files stay: {before} -> {after}");
        // The last thousand are still there, and only they.
        let held: Vec<u64> = s
            .read(0, 5000, 1 << 30)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(held, (19_001..=20_000).collect::<Vec<_>>());
        drop(s);
        let s = Spool::open(dir.path(), 1 << 30, "a", "n").unwrap();
        assert_eq!((s.stats().first_seq, s.stats().events), (19_001, 1000));
    }

    #[test]
    fn incarnation_is_made_once_per_spool_and_acked_seq_survives() {
        let dir = tempfile::tempdir().unwrap();
        let inc = {
            let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
            assert_ne!(s.incarnation(), 0);
            s.append((0..5).map(|i| draft(i, 10)).collect()).unwrap();
            assert!(
                s.read(0, 10, 1 << 20)
                    .unwrap()
                    .iter()
                    .all(|e| e.incarnation == s.incarnation())
            );
            s.ack(3).unwrap();
            // An ack below what is held still records nothing new.
            assert_eq!(s.ack(2).unwrap(), 0);
            assert_eq!(s.stats().acked_seq, 3);
            s.incarnation()
        };
        let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
        assert_eq!(
            s.incarnation(),
            inc,
            "a reopened spool is the same incarnation"
        );
        assert_eq!(s.stats().acked_seq, 3);
        s.ack(5).unwrap();
        assert_eq!(s.stats().acked_seq, 5);
        drop(s);
        // A wiped spool is a new incarnation and starts its seqs again.
        let other = tempfile::tempdir().unwrap();
        let s = Spool::open(other.path(), 1 << 20, "a", "n").unwrap();
        assert_ne!(s.incarnation(), inc);
        assert_eq!((s.stats().next_seq, s.stats().acked_seq), (1, 0));
    }

    #[test]
    fn a_spool_from_before_incarnations_keeps_incarnation_zero() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
            s.append((0..3).map(|i| draft(i, 10)).collect()).unwrap();
            // What an older agent left: no incarnation key.
            s.db.delete_cf(meta_cf(&s.db).unwrap(), META_INCARNATION)
                .unwrap();
        }
        let s = Spool::open(dir.path(), 1 << 20, "a", "n").unwrap();
        assert_eq!(s.incarnation(), 0);
        assert_eq!(s.stats().next_seq, 4);
    }

    #[test]
    fn full_spool_drops_oldest_and_reports_a_gap() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 10_000, "a", "n").unwrap();
        for i in 0..100 {
            s.append(vec![draft(i, 400)]).unwrap();
        }
        let st = s.stats();
        assert!(st.bytes <= 10_000, "{st:?}");
        assert!(st.dropped_total > 70, "{st:?}");
        assert_eq!(st.next_seq, 101);
        let held = s.read(0, 1000, 1 << 20).unwrap();
        assert_eq!(held.last().unwrap().seq, 100, "the newest are kept");
        assert_eq!(held.len() as u64 + st.dropped_total, 100);
        let gap = s.pending_gap();
        assert_eq!(gap.dropped, st.dropped_total);
        assert_eq!(gap.first_seq, 1);
        assert_eq!(gap.last_seq, held[0].seq - 1);
        assert!(s.flush_gap().unwrap());
        assert_eq!(s.pending_gap().dropped, 0);
        let last = s.read(0, 1000, 1 << 20).unwrap().pop().unwrap();
        match last.payload {
            Some(Payload::Gap(g)) => assert_eq!(g.dropped, st.dropped_total),
            other => panic!("gap expected, got {other:?}"),
        }
        assert!(!s.flush_gap().unwrap());
    }

    #[test]
    fn dropped_gap_events_keep_their_count() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 5_000, "a", "n").unwrap();
        for i in 0..30 {
            s.append(vec![draft(i, 400)]).unwrap();
        }
        let first_drops = s.stats().dropped_total;
        s.flush_gap().unwrap();
        for i in 0..30 {
            s.append(vec![draft(i, 400)]).unwrap();
        }
        // Every event ever dropped is accounted for in the pending gap plus
        // the gap events still held.
        let held_gaps: u64 = s
            .read(0, 1000, 1 << 20)
            .unwrap()
            .iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Gap(g)) => Some(g.dropped),
                _ => None,
            })
            .sum();
        let total = s.stats().dropped_total;
        assert!(total > first_drops);
        // A dropped gap event hands its count back to the pending gap, and
        // counts as one dropped event itself.
        assert_eq!(s.pending_gap().dropped + held_gaps, total);
    }

    #[test]
    fn a_batch_larger_than_the_spool_keeps_its_newest() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 5_000, "a", "n").unwrap();
        s.append((0..40).map(|i| draft(i, 400)).collect()).unwrap();
        let st = s.stats();
        assert!(st.bytes <= 5_000);
        assert_eq!(st.next_seq, 41);
        let held = s.read(0, 100, 1 << 20).unwrap();
        assert_eq!(held.last().unwrap().seq, 40);
        assert_eq!(held.len() as u64 + st.dropped_total, 40);
        assert_eq!(st.first_seq, held[0].seq);
    }
}
