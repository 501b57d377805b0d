//! The durable event store: RocksDB column families on one data directory.
//!
//! - `blocks`: first offset (u64 big-endian) -> a record block of consecutive
//!   events (see [`block`]); an event's offset is its block's key plus its
//!   index in the block
//! - `tindex`: stored_at ns ++ first offset of a group -> empty; maps time to offsets
//!   so time-range queries and age retention touch only the range they need
//! - `agents`: agent_id -> encoded `AgentRecord` (last durable seq lives here,
//!   written in the same atomic batch as the events: dedupe survives restarts)
//! - `meta`: `next_offset`, `first_offset`, `format`
//!
//! `format` is the store's layout version. A store of an older layout (one
//! key per event, format 1) is converted once when it is opened (see
//! [`legacy`]); a newer one is refused.
//!
//! Only the writer thread calls [`Store::commit`]; reads go straight to RocksDB.

mod block;
mod legacy;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use amoskys_proto::{AgentRecord, EncodedEvents, Event};
use prost::Message;
use rocksdb::{
    ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options, WriteBatch,
    WriteOptions,
};

use crate::filter::EventFilter;
use block::Block;
pub(crate) use legacy::write_format1;

const CF_BLOCKS: &str = "blocks";
const CF_TINDEX: &str = "tindex";
const CF_AGENTS: &str = "agents";
const CF_META: &str = "meta";
const KEY_NEXT: &[u8] = b"next_offset";
const KEY_FIRST: &[u8] = b"first_offset";
const KEY_FORMAT: &[u8] = b"format";
/// The next offset the NATS export has not had acked.
const KEY_EXPORT_NATS: &[u8] = b"export_cursor.nats";
const KEY_DETECT: &[u8] = b"detect.state";
/// The detector's windows, one key each after this prefix (see
/// [`Store::save_detect`]); sorts after `detect.state` and before any other
/// meta key that starts with `detect`.
const DETECT_WINDOWS: &[u8] = b"detect.w/";

/// A detector window as saved: its key and its encoded value.
pub type SavedWindow = (Vec<u8>, Vec<u8>);
/// The layout this build writes: record blocks.
const FORMAT: u64 = 2;

/// Events observed before they reach the bus can trail its clock; a time query
/// starts this far before its lower bound so such events are not missed.
const TIME_QUERY_SLACK_NS: i64 = 10 * 60 * 1_000_000_000;
/// How long after being observed an event may be stored and still be found
/// by a page whose time range ends before it was stored.
const PAGE_UPPER_SLACK_NS: i64 = 60 * 60 * 1_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb at {path}: {source}")]
    Rocks {
        path: PathBuf,
        #[source]
        source: rocksdb::Error,
    },
    #[error("stored record at offset {offset} is corrupt: {message}")]
    Corrupt { offset: u64, message: String },
    #[error(
        "the store at {path} has layout format {found}, newer than the {FORMAT} this bus reads; \
         run the bus version that wrote it"
    )]
    Newer { path: PathBuf, found: u64 },
    #[error("the store is closed while it recovers from a write failure")]
    Unavailable,
}

/// One client batch after dedupe, ready to be written.
#[derive(Debug, Default)]
pub struct PreparedGroup {
    pub batch_events: Vec<Event>,
    pub agents: HashMap<String, AgentRecord>,
    pub next_offset: u64,
    pub stored_at: i64,
}

/// Query bounds and filters, already validated.
#[derive(Clone, Debug, Default)]
pub struct QuerySpec {
    pub from_offset: u64,
    /// Inclusive; 0 = unbounded.
    pub to_offset: u64,
    pub from_time: i64,
    pub to_time: i64,
    pub filter: EventFilter,
    pub limit: usize,
}

impl QuerySpec {
    /// Whether the query returns `e` (within its offsets).
    fn keeps(&self, e: &Event) -> bool {
        (self.from_time == 0 || e.observed_at >= self.from_time)
            && (self.to_time == 0 || e.observed_at <= self.to_time)
            && self.filter.matches(e)
    }

    /// Whether it returns every stored event within its offsets.
    fn keeps_all(&self) -> bool {
        self.from_time == 0 && self.to_time == 0 && self.filter.matches_all()
    }
}

/// A query's events as `QueryResponse` bytes (see [`Store::query_encoded`]).
#[derive(Debug, Default)]
pub struct EncodedQuery {
    pub parts: Vec<EncodedEvents>,
    pub count: usize,
    /// The offset of the last event returned.
    pub last: Option<u64>,
}

/// A backwards page request (see [`Store::page_back`]).
#[derive(Clone, Debug)]
pub struct PageRequest {
    /// Exclusive upper offset; `u64::MAX` for "from the newest".
    pub before: u64,
    pub from_time: i64,
    pub to_time: i64,
    pub filter: EventFilter,
    pub limit: usize,
    pub max_scan: usize,
}

#[derive(Debug, Default)]
pub struct Page {
    /// Newest first.
    pub events: Vec<Event>,
    /// Where the next (older) page starts; None when the range is exhausted.
    pub next_before: Option<u64>,
    pub scanned: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted_by_age: u64,
    pub deleted_by_size: u64,
}

/// Default memtable size; the bus holds up to three per column family.
pub const DEFAULT_WRITE_BUFFER_BYTES: usize = 32 * 1024 * 1024;

/// Readers that hold age retention at their cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// The NATS export.
    Export = 0,
    /// The detector.
    Detect = 1,
    /// The Alertmanager alert sink.
    Alertmanager = 2,
    /// The webhook alert sink.
    Webhook = 3,
}

impl Hold {
    /// The meta key of an alert sink's cursor.
    fn sink_key(self) -> Option<&'static [u8]> {
        match self {
            Hold::Alertmanager => Some(b"sink_cursor.alertmanager"),
            Hold::Webhook => Some(b"sink_cursor.webhook"),
            Hold::Export | Hold::Detect => None,
        }
    }
}

pub struct Store {
    path: PathBuf,
    write_buffer_bytes: usize,
    db: RwLock<Option<Arc<DB>>>,
    next_offset: AtomicU64,
    first_offset: AtomicU64,
    /// What the last committed group's write batch took per event.
    batch_bytes_per_event: AtomicUsize,
    /// Where each reader of the store that must see every event (the
    /// export, the detector, the alert sinks) is; age retention keeps
    /// everything from the lowest (0: no hold).
    retention_holds: [AtomicU64; 4],
}

fn db_options(write_buffer_bytes: usize, direct_io: bool) -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    // Bounded memory: the bus must stay small at full load.
    o.set_write_buffer_size(write_buffer_bytes);
    o.set_max_write_buffer_number(3);
    o.set_max_total_wal_size(256 * 1024 * 1024);
    o.set_max_background_jobs(2);
    o.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Levels 0 and 1 hold what was written in the last minutes and are
    // rewritten by the next compaction anyway: compressing them cost the
    // flush thread 15% of the bus's CPU at full load. LZ4 from level 2 on,
    // where data stays.
    {
        use rocksdb::DBCompressionType::{Lz4, None};
        o.set_compression_per_level(&[None, None, Lz4, Lz4, Lz4, Lz4, Lz4]);
    }
    // Open table files lazily and skip the per-file stats pass, so the time
    // to ready after a restart does not grow with the number of stored
    // events. 512 keeps well inside the usual 1024 descriptor limit.
    o.set_max_open_files(512);
    o.set_skip_stats_update_on_db_open(true);
    // Table files written by flushes and compactions bypass the page cache:
    // copying them into it cost the flush thread and the writer (whose log
    // writes then found no free cached pages) a fifth of the bus's CPU at
    // full load. Reads still go through the page cache.
    o.set_use_direct_io_for_flush_and_compaction(direct_io);
    o
}

/// Whether files in `dir` can be opened with O_DIRECT (tmpfs, for one,
/// refuses it, and RocksDB would only find out at its first flush).
fn supports_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join(".direct-io-probe");
    let ok = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(..8)?.try_into().ok()?))
}

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name).ok_or(StoreError::Unavailable)
}

/// Names the store's directory in a RocksDB error.
fn rocks_at(path: &Path) -> impl Fn(rocksdb::Error) -> StoreError + '_ {
    move |source| StoreError::Rocks {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(offset: u64) -> impl FnOnce(String) -> StoreError {
    move |message| StoreError::Corrupt { offset, message }
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, DEFAULT_WRITE_BUFFER_BYTES)
    }

    /// Opens with a memtable of `write_buffer_bytes` (RocksDB's log file is
    /// preallocated to about that size too).
    pub fn open_with(path: &Path, write_buffer_bytes: usize) -> Result<Self, StoreError> {
        let s = Self {
            path: path.to_path_buf(),
            write_buffer_bytes,
            db: RwLock::new(None),
            next_offset: AtomicU64::new(1),
            first_offset: AtomicU64::new(1),
            batch_bytes_per_event: AtomicUsize::new(256),
            retention_holds: Default::default(),
        };
        s.reopen()?;
        Ok(s)
    }

    fn rocks(&self, source: rocksdb::Error) -> StoreError {
        rocks_at(&self.path)(source)
    }

    /// Closes and opens the database again. RocksDB refuses writes after a
    /// failed WAL write until it is reopened; reopening replays its WAL.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = guard.take() {
            // Readers hold clones only for the length of one call.
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(again) => {
                        old = again;
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        }
        let direct_io = supports_direct_io(&self.path);
        let opts = db_options(self.write_buffer_bytes, direct_io);
        // A directory that is not a database yet has no families to list.
        let existing = DB::list_cf(&opts, &self.path).unwrap_or_default();
        let has_legacy = existing.iter().any(|n| n == legacy::CF_EVENTS);
        let mut names = vec![CF_BLOCKS, CF_TINDEX, CF_AGENTS, CF_META];
        if has_legacy {
            names.push(legacy::CF_EVENTS);
        }
        let cfs = names.into_iter().map(|n| {
            ColumnFamilyDescriptor::new(n, db_options(self.write_buffer_bytes, direct_io))
        });
        let mut db = DB::open_cf_descriptors(&opts, &self.path, cfs).map_err(|e| self.rocks(e))?;
        let meta = cf(&db, CF_META)?;
        let get = |key: &[u8]| -> Result<Option<u64>, StoreError> {
            Ok(db
                .get_cf(meta, key)
                .map_err(|e| self.rocks(e))?
                .and_then(|v| read_u64(&v)))
        };
        let format = get(KEY_FORMAT)?;
        match format {
            Some(found) if found > FORMAT => {
                return Err(StoreError::Newer {
                    path: self.path.clone(),
                    found,
                });
            }
            Some(_) => {}
            // Format 1 stores had no format key and kept events one per key.
            None if has_legacy => legacy::convert(&db, &self.path)?,
            None => {
                let mut wo = WriteOptions::default();
                wo.set_sync(true);
                db.put_cf_opt(meta, KEY_FORMAT, be(FORMAT), &wo)
                    .map_err(|e| self.rocks(e))?;
            }
        }
        let next = get(KEY_NEXT)?.unwrap_or(1);
        let first = get(KEY_FIRST)?.unwrap_or(1);
        if has_legacy {
            // Only once the converted blocks and the format are durable (a
            // crash before this converts again from the start).
            db.drop_cf(legacy::CF_EVENTS).map_err(|e| self.rocks(e))?;
        }
        self.next_offset.store(next, Ordering::SeqCst);
        self.first_offset.store(first.min(next), Ordering::SeqCst);
        *guard = Some(Arc::new(db));
        Ok(())
    }

    fn db(&self) -> Result<Arc<DB>, StoreError> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::SeqCst)
    }

    pub fn first_offset(&self) -> u64 {
        self.first_offset.load(Ordering::SeqCst)
    }

    pub fn event_count(&self) -> u64 {
        self.next_offset().saturating_sub(self.first_offset())
    }

    /// Every agent record, as last committed.
    pub fn load_agents(&self) -> Result<HashMap<String, AgentRecord>, StoreError> {
        let db = self.db()?;
        let cf = cf(&db, CF_AGENTS)?;
        let mut out = HashMap::new();
        for item in db.iterator_cf(cf, IteratorMode::Start) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let rec = AgentRecord::decode(&*v).map_err(|e| StoreError::Corrupt {
                offset: 0,
                message: format!("agent record {:?}: {e}", String::from_utf8_lossy(&k)),
            })?;
            out.insert(rec.agent_id.clone(), rec);
        }
        Ok(out)
    }

    /// Writes one group atomically. Offsets in `group.batch_events` must run
    /// from the current next offset up to `group.next_offset - 1`. The events
    /// go into as few blocks as their limits allow: a new block starts only
    /// where offsets or stored times do not follow on.
    pub fn commit(&self, group: &mut PreparedGroup, sync: bool) -> Result<(), StoreError> {
        let db = self.db()?;
        let (bl, ti, ag, meta) = (
            cf(&db, CF_BLOCKS)?,
            cf(&db, CF_TINDEX)?,
            cf(&db, CF_AGENTS)?,
            cf(&db, CF_META)?,
        );
        // Sized from the last group's bytes per event: growing a batch of
        // megabytes by doubling copied it again each time.
        let per_event = self.batch_bytes_per_event.load(Ordering::Relaxed);
        let mut wb = WriteBatch::with_capacity_bytes(
            group.batch_events.len().saturating_mul(per_event) + 4096,
        );
        if let Some(first) = group.batch_events.first() {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&be(group.stored_at as u64));
            key[8..].copy_from_slice(&be(first.offset));
            wb.put_cf(ti, key, b"");
        }
        let mut builder = block::Builder::new();
        for e in &mut group.batch_events {
            let (offset, stored_at) = (e.offset, e.stored_at);
            builder.add(e, offset, stored_at, |first, bytes| {
                wb.put_cf(bl, be(first), bytes)
            });
        }
        if !group.batch_events.is_empty() {
            let per_event = wb.size_in_bytes().div_ceil(group.batch_events.len());
            self.batch_bytes_per_event
                .store(per_event, Ordering::Relaxed);
        }
        if let Some((first, bytes)) = builder.take() {
            wb.put_cf(bl, be(first), bytes);
        }
        for (id, rec) in &group.agents {
            wb.put_cf(ag, id.as_bytes(), rec.encode_to_vec());
        }
        wb.put_cf(meta, KEY_NEXT, be(group.next_offset));
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        db.write_opt(wb, &wo).map_err(|e| self.rocks(e))?;
        self.next_offset.store(group.next_offset, Ordering::SeqCst);
        Ok(())
    }

    /// Events from `from` on (offset order), at most `max`.
    pub fn read_from(&self, from: u64, max: usize) -> Result<Vec<Event>, StoreError> {
        self.scan(from, u64::MAX, max, |_| true)
    }

    /// The first offset and the end of the block that holds `offset`, if
    /// one does.
    fn block_around(&self, db: &DB, offset: u64) -> Result<Option<(u64, u64)>, StoreError> {
        let cf = cf(db, CF_BLOCKS)?;
        let mut it = db.iterator_cf(cf, IteratorMode::From(&be(offset), Direction::Reverse));
        let Some(item) = it.next() else {
            return Ok(None);
        };
        let (k, v) = item.map_err(|e| self.rocks(e))?;
        let first = read_u64(&k).unwrap_or(0);
        let end = Block::parse(first, &v).map_err(corrupt(first))?.end();
        Ok((end > offset).then_some((first, end)))
    }

    /// The first offset of the block holding `offset` (`offset` itself when
    /// none does): cutting there splits no block.
    fn block_start(&self, offset: u64) -> Result<u64, StoreError> {
        let db = self.db()?;
        Ok(self
            .block_around(&db, offset)?
            .map_or(offset, |(first, _)| first))
    }

    /// One past the block holding `offset`, or `offset` when it starts a
    /// block or none holds it.
    fn block_end(&self, offset: u64) -> Result<u64, StoreError> {
        let db = self.db()?;
        Ok(match self.block_around(&db, offset)? {
            Some((first, end)) if first < offset => end,
            _ => offset,
        })
    }

    fn scan(
        &self,
        from: u64,
        to_inclusive: u64,
        max: usize,
        mut keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        self.scan_raw(from, to_inclusive, |block, off, bytes| {
            let e = block.decode(off, bytes).map_err(corrupt(off))?;
            if keep(&e) {
                out.push(e);
            }
            Ok(out.len() < max)
        })?;
        Ok(out)
    }

    /// Hands `visit` each stored event from `from` to `to_inclusive` in
    /// offset order, as its block and its bytes, until it returns false.
    fn scan_raw(
        &self,
        from: u64,
        to_inclusive: u64,
        mut visit: impl FnMut(&Block, u64, &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let cf = cf(&db, CF_BLOCKS)?;
        let from = from.max(self.first_offset());
        let start = self
            .block_around(&db, from)?
            .map_or(from, |(first, _)| first);
        for item in db.iterator_cf(cf, IteratorMode::From(&be(start), Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let first = read_u64(&k).unwrap_or(0);
            if first > to_inclusive {
                break;
            }
            let block = Block::parse(first, &v).map_err(corrupt(first))?;
            for raw in block.raw() {
                let (off, bytes) = raw.map_err(corrupt(first))?;
                if off < from {
                    continue;
                }
                if off > to_inclusive || !visit(&block, off, bytes)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// First offset of the first group stored at or after `t` (ns).
    fn offset_at_time(&self, t: i64) -> Result<u64, StoreError> {
        let db = self.db()?;
        let cf = cf(&db, CF_TINDEX)?;
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&be(t.max(0) as u64));
        let mut it = db.iterator_cf(cf, IteratorMode::From(&key, Direction::Forward));
        match it.next() {
            Some(item) => {
                let (k, _) = item.map_err(|e| self.rocks(e))?;
                Ok(k.get(8..)
                    .and_then(read_u64)
                    .unwrap_or_else(|| self.next_offset()))
            }
            None => Ok(self.next_offset()),
        }
    }

    /// One page of events, newest first, from just below `before` down to
    /// the first event that can fall in the time range. Scans at most
    /// `max_scan` events, so a filter that matches little costs bounded time;
    /// `next_before` continues where the scan stopped.
    ///
    /// Events are found through the time index by when they were stored, so
    /// the upper bound allows for events stored up to an hour after they were
    /// observed (an agent draining its spool); older backlogs are still
    /// reachable by paging with `before`.
    pub fn page_back(&self, req: &PageRequest) -> Result<Page, StoreError> {
        let db = self.db()?;
        let cf = cf(&db, CF_BLOCKS)?;
        let lower = if req.from_time > 0 {
            self.offset_at_time(req.from_time.saturating_sub(TIME_QUERY_SLACK_NS))?
        } else {
            0
        }
        .max(self.first_offset());
        let mut upper = req.before.min(self.next_offset());
        if req.to_time > 0 {
            upper =
                upper.min(self.offset_at_time(req.to_time.saturating_add(PAGE_UPPER_SLACK_NS))?);
        }
        let mut page = Page::default();
        if upper <= lower {
            return Ok(page);
        }
        let start = be(upper - 1);
        for item in db.iterator_cf(cf, IteratorMode::From(&start, Direction::Reverse)) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let first = read_u64(&k).unwrap_or(0);
            let block = Block::parse(first, &v).map_err(corrupt(first))?;
            // Blocks are read forwards; splitting one is cheap, decoding
            // is what the budget bounds.
            let mut raws = Vec::with_capacity(block.count as usize);
            for raw in block.raw() {
                raws.push(raw.map_err(corrupt(first))?);
            }
            for &(off, bytes) in raws.iter().rev() {
                if off >= upper {
                    continue;
                }
                if off < lower {
                    return Ok(page);
                }
                if page.events.len() >= req.limit || page.scanned >= req.max_scan {
                    page.next_before = Some(off + 1);
                    return Ok(page);
                }
                page.scanned += 1;
                let e = block.decode(off, bytes).map_err(corrupt(off))?;
                if (req.from_time == 0 || e.observed_at >= req.from_time)
                    && (req.to_time == 0 || e.observed_at <= req.to_time)
                    && req.filter.matches(&e)
                {
                    page.events.push(e);
                }
            }
            if first <= lower {
                return Ok(page);
            }
        }
        Ok(page)
    }

    /// The event stored at `offset`, if it is still held.
    pub fn get(&self, offset: u64) -> Result<Option<Event>, StoreError> {
        Ok(self
            .scan(offset, offset, 1, |_| true)?
            .into_iter()
            .find(|e| e.offset == offset))
    }

    pub fn query(&self, q: &QuerySpec) -> Result<Vec<Event>, StoreError> {
        let (from, to) = self.query_bounds(q)?;
        self.scan(from, to, q.limit, |e| q.keeps(e))
    }

    /// What [`Store::query`] returns, as the bytes a `QueryResponse` sends,
    /// in parts of at most `part` events: stored events are sent as the
    /// store holds them, and decoded only when the query's filter or time
    /// range has to look into them.
    pub fn query_encoded(&self, q: &QuerySpec, part: usize) -> Result<EncodedQuery, StoreError> {
        let mut out = EncodedQuery::default();
        if q.limit == 0 {
            return Ok(out);
        }
        let part = part.max(1);
        let (from, to) = self.query_bounds(q)?;
        let decode = !q.keeps_all();
        let mut open = EncodedEvents::default();
        self.scan_raw(from, to, |block, off, bytes| {
            if decode && !q.keeps(&block.decode(off, bytes).map_err(corrupt(off))?) {
                return Ok(true);
            }
            if open.count() == part {
                out.parts.push(std::mem::take(&mut open));
            }
            if open.count() == 0 {
                open = EncodedEvents::with_capacity((part * (bytes.len() + 24)).min(1 << 20));
            }
            open.push_stored(bytes, off, block.stored_at);
            out.count += 1;
            out.last = Some(off);
            Ok(out.count < q.limit)
        })?;
        if open.count() > 0 {
            out.parts.push(open);
        }
        Ok(out)
    }

    /// The offsets a query can find events between (the upper inclusive).
    fn query_bounds(&self, q: &QuerySpec) -> Result<(u64, u64), StoreError> {
        let mut from = q.from_offset;
        if q.from_time > 0 {
            from = from.max(self.offset_at_time(q.from_time.saturating_sub(TIME_QUERY_SLACK_NS))?);
        }
        let to = if q.to_offset == 0 {
            u64::MAX
        } else {
            q.to_offset
        };
        Ok((from, to))
    }

    /// Bytes on disk for stored events: SST files plus memtables (whose
    /// contents sit in RocksDB's own log until flushed).
    pub fn wal_bytes(&self) -> u64 {
        let Ok(db) = self.db() else { return 0 };
        let Ok(cf) = cf(&db, CF_BLOCKS) else {
            return 0;
        };
        let sst = db
            .property_int_value_cf(cf, rocksdb::properties::TOTAL_SST_FILES_SIZE)
            .ok()
            .flatten()
            .unwrap_or(0);
        let mem = db
            .property_int_value_cf(cf, rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES)
            .ok()
            .flatten()
            .unwrap_or(0);
        sst + mem
    }

    /// stored_at of the oldest event still held, if any.
    pub fn oldest_stored_at(&self) -> Option<i64> {
        self.read_from(self.first_offset(), 1)
            .ok()?
            .first()
            .map(|e| e.stored_at)
    }

    /// stored_at of the newest event held, if any.
    pub fn newest_stored_at(&self) -> Option<i64> {
        let next = self.next_offset();
        if next <= self.first_offset() {
            return None;
        }
        self.get(next - 1).ok()?.map(|e| e.stored_at)
    }

    /// Drops events stored before `now - max_age`, then, while the store is
    /// over `max_bytes` (0 = no cap), the oldest ones. Deletes whole blocks
    /// with range tombstones and compacts them away, so the cost does not
    /// depend on how many events go. An age cut inside a block keeps the
    /// block (never drop what is young); a size cut drops it.
    pub fn enforce_retention(
        &self,
        now_ns: i64,
        max_age: std::time::Duration,
        max_bytes: u64,
    ) -> Result<RetentionReport, StoreError> {
        let mut report = RetentionReport::default();
        let cutoff = now_ns.saturating_sub(max_age.as_nanos().min(i64::MAX as u128) as i64);
        let mut age_cut = self.block_start(self.offset_at_time(cutoff)?)?;
        let hold = self
            .retention_holds
            .iter()
            .map(|h| h.load(Ordering::SeqCst))
            .filter(|&h| h > 0)
            .min()
            .unwrap_or(0);
        if hold > 0 {
            // What the export has not had acked, or the detector not
            // evaluated, stays, however old; only the size cap may cut into it.
            age_cut = age_cut.min(self.block_start(hold)?);
        }
        let first = self.first_offset();
        if age_cut > first {
            self.drop_before(age_cut, cutoff)?;
            report.deleted_by_age = age_cut - first;
        }
        if max_bytes > 0 {
            // Each pass removes the share of events that puts the store ~10%
            // under the cap; a few passes absorb estimation error.
            for _ in 0..8 {
                let size = self.wal_bytes();
                let count = self.event_count();
                if size <= max_bytes || count == 0 {
                    break;
                }
                let target = max_bytes - max_bytes / 10;
                let excess = size - target.min(size);
                let per_event = (size / count).max(1);
                let n = (excess / per_event).clamp(1, count);
                let first = self.first_offset();
                let cut = self.block_end(first + n)?.min(self.next_offset());
                let cut_time = self
                    .read_from(cut, 1)?
                    .first()
                    .map(|e| e.stored_at)
                    .unwrap_or(now_ns);
                self.drop_before(cut, cut_time)?;
                report.deleted_by_size += cut - first;
                self.flush()?;
            }
        }
        Ok(report)
    }

    /// Deletes every block below `cut`, which must start a block (or be the
    /// next offset), and the time index below `time_cut`.
    fn drop_before(&self, cut: u64, time_cut: i64) -> Result<(), StoreError> {
        let db = self.db()?;
        let (bl, ti, meta) = (cf(&db, CF_BLOCKS)?, cf(&db, CF_TINDEX)?, cf(&db, CF_META)?);
        let mut wb = WriteBatch::default();
        wb.delete_range_cf(bl, be(0), be(cut));
        let mut tcut = [0u8; 16];
        tcut[..8].copy_from_slice(&be(time_cut.max(0) as u64));
        wb.delete_range_cf(ti, [0u8; 16], tcut);
        wb.put_cf(meta, KEY_FIRST, be(cut));
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(wb, &wo).map_err(|e| self.rocks(e))?;
        self.first_offset.store(cut, Ordering::SeqCst);
        db.compact_range_cf(bl, None::<&[u8]>, Some(&be(cut)[..]));
        Ok(())
    }

    /// Flushes memtables to SST files (fast restart, accurate sizes).
    /// Where the NATS export resumes: the first offset it has not had
    /// acked. None before its first ack.
    pub fn export_cursor(&self) -> Result<Option<u64>, StoreError> {
        self.meta_u64(KEY_EXPORT_NATS)
    }

    fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        Ok(db
            .get_cf(meta, key)
            .map_err(|e| self.rocks(e))?
            .and_then(|v| read_u64(&v)))
    }

    /// Where an alert sink (`who`) resumes: the first offset it has not
    /// delivered. None before its first save.
    pub fn sink_cursor(&self, who: Hold) -> Result<Option<u64>, StoreError> {
        match who.sink_key() {
            Some(key) => self.meta_u64(key),
            None => Ok(None),
        }
    }

    /// Records an alert sink's cursor and holds age retention there. Not
    /// synced, as the export's: a cursor lost with the machine makes the
    /// sink deliver again what its receiver then sees twice (Alertmanager
    /// merges an alert it already has).
    pub fn set_sink_cursor(&self, who: Hold, next: u64) -> Result<(), StoreError> {
        let Some(key) = who.sink_key() else {
            return Ok(());
        };
        self.hold_retention(who, next);
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        db.put_cf(meta, key, be(next)).map_err(|e| self.rocks(e))
    }

    /// Records the export's cursor and holds age retention there. Not
    /// synced: a cursor lost in a crash only makes the export send again
    /// what the stream's duplicate window drops.
    pub fn set_export_cursor(&self, next: u64) -> Result<(), StoreError> {
        self.hold_retention(Hold::Export, next);
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        db.put_cf(meta, KEY_EXPORT_NATS, be(next))
            .map_err(|e| self.rocks(e))
    }

    /// Keeps `from` and everything after it from age retention, for `who`.
    pub fn hold_retention(&self, who: Hold, from: u64) {
        self.retention_holds[who as usize].store(from.max(1), Ordering::SeqCst);
    }

    /// The detector's saved state (its cursor inside); None before its first save.
    pub fn detect_state(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        db.get_cf(meta, KEY_DETECT).map_err(|e| self.rocks(e))
    }

    /// The detector's saved windows: (key after the prefix, value).
    pub fn detect_windows(&self) -> Result<Vec<SavedWindow>, StoreError> {
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        let mut out = Vec::new();
        for item in db.iterator_cf(meta, IteratorMode::From(DETECT_WINDOWS, Direction::Forward)) {
            let (k, v) = item.map_err(|e| self.rocks(e))?;
            let Some(key) = k.strip_prefix(DETECT_WINDOWS) else {
                break;
            };
            out.push((key.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// Saves the detector's head (cursor, counts) and the windows that
    /// changed since the last save (`None`: closed), in one atomic write,
    /// and holds age retention at `cursor`. Not synced: a save lost in a
    /// crash makes the detector evaluate again events whose alerts the
    /// writer then drops as already stored.
    pub fn save_detect(
        &self,
        cursor: u64,
        head: &[u8],
        windows: &[(Vec<u8>, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        self.hold_retention(Hold::Detect, cursor);
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        let mut wb = WriteBatch::default();
        let mut key = Vec::new();
        for (k, v) in windows {
            key.clear();
            key.extend_from_slice(DETECT_WINDOWS);
            key.extend_from_slice(k);
            match v {
                Some(v) => wb.put_cf(meta, &key, v),
                None => wb.delete_cf(meta, &key),
            }
        }
        wb.put_cf(meta, KEY_DETECT, head);
        db.write(wb).map_err(|e| self.rocks(e))
    }

    /// Saves a detector head as checkpoints before windows had their own
    /// keys were saved (tests of reading them).
    #[cfg(test)]
    pub fn set_detect_state(&self, cursor: u64, state: &[u8]) -> Result<(), StoreError> {
        self.hold_retention(Hold::Detect, cursor);
        let db = self.db()?;
        let meta = cf(&db, CF_META)?;
        db.put_cf(meta, KEY_DETECT, state)
            .map_err(|e| self.rocks(e))
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        db.flush_wal(true).map_err(|e| self.rocks(e))?;
        // Every column family's memtable, not only the default one: what is
        // left unflushed is replayed from the WAL at the next open, which
        // made restarts slow in proportion to recent writes.
        for name in [CF_BLOCKS, CF_TINDEX, CF_AGENTS, CF_META] {
            db.flush_cf(cf(&db, name)?).map_err(|e| self.rocks(e))?;
        }
        Ok(())
    }

    /// Takes a backup through `engine` while writes go on. The WAL is copied
    /// with the table files (no flush first), so the backup holds every write
    /// that completed before it started without forcing a memtable flush.
    pub fn backup_into(
        &self,
        engine: &mut rocksdb::backup::BackupEngine,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        engine
            .create_new_backup_flush(&*db, false)
            .map_err(|e| self.rocks(e))
    }

    /// Closes the database after flushing; later calls get `Unavailable`.
    pub fn close(&self) -> Result<(), StoreError> {
        let flushed = self.flush();
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = guard.take() {
            let mut db = db;
            while let Err(again) = Arc::try_unwrap(db) {
                db = again;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        flushed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::SyntheticEvent;
    use amoskys_proto::event::Payload;

    fn ev(agent: &str, seq: u64, offset: u64, stored_at: i64, size: usize) -> Event {
        Event {
            agent_id: agent.into(),
            seq,
            offset,
            stored_at,
            observed_at: stored_at,
            collector: "synthetic".into(),
            payload: Some(Payload::Synthetic(SyntheticEvent {
                n: seq,
                // Incompressible (xorshift), so size tests measure real bytes
                // once LZ4 compresses flushed tables. Seeded by seq and offset
                // apart: `write` gives both the same value, and a seed of
                // their xor gave every event the same bytes, which LZ4 over
                // a block of them shrinks a hundredfold.
                data: {
                    let mut x = (seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ offset) | 1;
                    (0..size)
                        .map(|_| {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        })
                        .collect()
                },
            })),
            ..Default::default()
        }
    }

    fn write(store: &Store, n: u64, stored_at: i64, size: usize) {
        let start = store.next_offset();
        let events: Vec<Event> = (0..n)
            .map(|i| ev("a", start + i, start + i, stored_at, size))
            .collect();
        store
            .commit(
                &mut PreparedGroup {
                    batch_events: events,
                    agents: HashMap::new(),
                    next_offset: start + n,
                    stored_at,
                },
                false,
            )
            .unwrap();
    }

    #[test]
    fn offsets_survive_reopen_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        write(&s, 10, 1_000, 10);
        assert_eq!(s.next_offset(), 11);
        s.enforce_retention(
            2_000 + 60_000_000_000,
            std::time::Duration::from_secs(60),
            0,
        )
        .unwrap();
        assert_eq!(s.first_offset(), 11, "everything was older than the limit");
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!((s.first_offset(), s.next_offset()), (11, 11));
        write(&s, 1, 5_000, 10);
        assert_eq!(
            s.read_from(0, 10).unwrap()[0].offset,
            11,
            "offsets never reused"
        );
    }

    #[test]
    fn age_retention_keeps_what_the_export_holds_and_the_size_cap_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let sec = 1_000_000_000i64;
        write(&s, 5, 100 * sec, 10); // 1..=5
        write(&s, 5, 200 * sec, 10); // 6..=10
        write(&s, 5, 300 * sec, 10); // 11..=15
        assert_eq!(s.export_cursor().unwrap(), None);
        s.set_export_cursor(8).unwrap();
        assert_eq!(s.export_cursor().unwrap(), Some(8));
        let r = s
            .enforce_retention(1_000 * sec, std::time::Duration::from_secs(10), 0)
            .unwrap();
        // All are past their age; the block holding 8 (6..=10) and after stay.
        assert_eq!((r.deleted_by_age, s.first_offset()), (5, 6));
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(
            s.export_cursor().unwrap(),
            Some(8),
            "the cursor survives a restart"
        );
        s.hold_retention(Hold::Export, 8);
        let r = s
            .enforce_retention(1_000 * sec, std::time::Duration::from_secs(10), 1)
            .unwrap();
        assert_eq!(r.deleted_by_size, 10, "the size cap cuts into what is held");
    }

    #[test]
    fn age_retention_keeps_what_is_young() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let sec = 1_000_000_000i64;
        write(&s, 5, 100 * sec, 10);
        write(&s, 5, 200 * sec, 10);
        write(&s, 5, 300 * sec, 10);
        let r = s
            .enforce_retention(320 * sec, std::time::Duration::from_secs(150), 0)
            .unwrap();
        assert_eq!(r.deleted_by_age, 5);
        let left = s.read_from(0, 100).unwrap();
        assert_eq!(left.len(), 10);
        assert!(left.iter().all(|e| e.stored_at >= 200 * sec));
    }

    #[test]
    fn size_cap_drops_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let now = 1_000_000_000_000i64;
        for _ in 0..20 {
            write(&s, 500, now, 1000);
        }
        s.flush().unwrap();
        let before = s.wal_bytes();
        // LZ4 shrinks what reaches the tables; the cap is relative to it.
        assert!(before > 1_000_000, "wrote ~10MB, store holds {before}");
        let cap = before / 4;
        let r = s
            .enforce_retention(now, std::time::Duration::from_secs(3600), cap)
            .unwrap();
        assert!(r.deleted_by_size > 0);
        assert!(
            s.wal_bytes() <= cap,
            "store at {} over cap {cap}",
            s.wal_bytes()
        );
        let left = s.read_from(0, usize::MAX).unwrap();
        assert_eq!(left.last().map(|e| e.offset), Some(10_000), "newest kept");
        assert_eq!(left.first().map(|e| e.offset), Some(s.first_offset()));
        assert_eq!(left.len() as u64, s.event_count());
    }

    #[test]
    fn an_encoded_query_sends_what_a_decoded_one_returns() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        write(&s, 700, 1_000, 30); // offsets 1..=700, blocks of 1024 events at most
        write(&s, 40, 2_000, 30); // 701..=740, another block
        let decoded = |encoded: EncodedQuery| -> Vec<Event> {
            let mut out = Vec::new();
            for part in encoded.parts {
                let r = amoskys_proto::QueryResponse {
                    encoded: part,
                    ..Default::default()
                };
                out.extend(
                    amoskys_proto::QueryResponse::decode(&*r.encode_to_vec())
                        .unwrap()
                        .events,
                );
            }
            out
        };
        let all = QuerySpec {
            limit: usize::MAX,
            ..Default::default()
        };
        let specs = [
            all.clone(),
            QuerySpec {
                from_offset: 650,
                to_offset: 720,
                ..all.clone()
            },
            QuerySpec {
                from_offset: 5,
                limit: 300,
                ..all.clone()
            },
            QuerySpec {
                from_time: 1_500,
                ..all.clone()
            },
            QuerySpec {
                to_time: 1_000,
                limit: 90,
                ..all.clone()
            },
            QuerySpec {
                filter: EventFilter {
                    text: "no such text".into(),
                    ..Default::default()
                },
                ..all.clone()
            },
            QuerySpec {
                limit: 0,
                ..all.clone()
            },
        ];
        for spec in specs {
            let want = s.query(&spec).unwrap();
            let got = s.query_encoded(&spec, 64).unwrap();
            assert_eq!(got.count, want.len(), "{spec:?}");
            assert_eq!(got.last, want.last().map(|e| e.offset), "{spec:?}");
            assert!(got.parts.iter().all(|p| p.count() <= 64 && p.count() > 0));
            assert_eq!(decoded(got), want, "{spec:?}");
        }
    }

    #[test]
    fn pages_go_backwards_within_the_scan_budget() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let hour = 3600 * 1_000_000_000i64;
        write(&s, 100, 10 * hour, 10); // offsets 1..=100
        write(&s, 100, 20 * hour, 10); // 101..=200
        let req = PageRequest {
            before: u64::MAX,
            from_time: 0,
            to_time: 0,
            filter: EventFilter::default(),
            limit: 30,
            max_scan: 1000,
        };
        let mut seen = Vec::new();
        let mut before = u64::MAX;
        loop {
            let p = s
                .page_back(&PageRequest {
                    before,
                    ..req.clone()
                })
                .unwrap();
            assert!(p.events.windows(2).all(|w| w[0].offset > w[1].offset));
            seen.extend(p.events.iter().map(|e| e.offset));
            match p.next_before {
                Some(b) => before = b,
                None => break,
            }
        }
        assert_eq!(
            seen,
            (1..=200).rev().collect::<Vec<u64>>(),
            "every event once"
        );

        // A time range reaches only its part of the store.
        let p = s
            .page_back(&PageRequest {
                from_time: 9 * hour,
                to_time: 11 * hour,
                limit: 500,
                ..req.clone()
            })
            .unwrap();
        assert_eq!(p.events.len(), 100);
        assert!(p.events.iter().all(|e| e.offset <= 100));

        // A filter that matches nothing stops at the budget with a cursor.
        let p = s
            .page_back(&PageRequest {
                filter: EventFilter {
                    text: "no such text".into(),
                    ..Default::default()
                },
                max_scan: 50,
                ..req.clone()
            })
            .unwrap();
        assert!(p.events.is_empty());
        assert_eq!(p.scanned, 50);
        assert_eq!(p.next_before, Some(151));
        assert_eq!(s.get(42).unwrap().map(|e| e.offset), Some(42));
        assert!(s.get(4242).unwrap().is_none());
    }

    #[test]
    fn time_query_filters_on_observed_at() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let sec = 1_000_000_000i64;
        for t in [100, 200, 300] {
            write(&s, 3, t * sec, 5);
        }
        let got = s
            .query(&QuerySpec {
                from_time: 150 * sec,
                to_time: 250 * sec,
                limit: 100,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.len(), 3);
        assert!(got.iter().all(|e| e.observed_at == 200 * sec));
    }

    #[test]
    fn reads_start_and_stop_inside_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let sec = 1_000_000_000i64;
        // 3000 events in one group: three blocks (1024 + 1024 + 952).
        write(&s, 3000, 100 * sec, 10);
        let got = s
            .query(&QuerySpec {
                from_offset: 1000,
                to_offset: 1100,
                limit: 1000,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            got.iter().map(|e| e.offset).collect::<Vec<_>>(),
            (1000..=1100).collect::<Vec<u64>>()
        );
        assert!(
            got.iter()
                .all(|e| e.stored_at == 100 * sec && e.seq == e.offset)
        );
        assert_eq!(s.read_from(2048, 3).unwrap()[0].offset, 2048);
        assert_eq!(s.get(1025).unwrap().map(|e| e.seq), Some(1025));
        assert_eq!(s.get(3000).unwrap().map(|e| e.seq), Some(3000));
        assert!(s.get(3001).unwrap().is_none());

        let p = s
            .page_back(&PageRequest {
                before: 1030,
                from_time: 0,
                to_time: 0,
                filter: EventFilter::default(),
                limit: 10,
                max_scan: 1000,
            })
            .unwrap();
        assert_eq!(
            p.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
            (1020..1030).rev().collect::<Vec<u64>>()
        );
        assert_eq!(p.next_before, Some(1020));
    }

    #[test]
    fn size_retention_drops_whole_blocks_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let now = 1_000_000_000_000i64;
        for _ in 0..8 {
            write(&s, 1000, now, 1000);
        }
        s.flush().unwrap();
        let cap = s.wal_bytes() / 2;
        let r = s
            .enforce_retention(now, std::time::Duration::from_secs(3600), cap)
            .unwrap();
        let first = s.first_offset();
        assert_eq!(r.deleted_by_size, first - 1);
        // Every block start is where a cut can fall: its first event is whole.
        let left = s.read_from(0, usize::MAX).unwrap();
        assert_eq!(left.first().map(|e| e.offset), Some(first));
        assert_eq!(left.len() as u64, 8000 - r.deleted_by_size);
        assert_eq!(s.block_start(first).unwrap(), first);
    }

    fn legacy_groups(groups: u64, per: u64) -> Vec<Vec<Event>> {
        (0..groups)
            .map(|g| {
                (0..per)
                    .map(|i| {
                        let off = g * per + i + 1;
                        ev("a", off, off, (g as i64 + 1) * 1_000_000_000, 20)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn a_format_1_store_is_converted_once_and_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let groups = legacy_groups(5, 700);
        legacy::write_format1(dir.path(), &groups).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!((s.first_offset(), s.next_offset()), (1, 3501));
        let all = s.read_from(0, usize::MAX).unwrap();
        let want: Vec<Event> = groups.into_iter().flatten().collect();
        assert_eq!(all, want, "every event, with its offset and stored time");
        // The time index still finds each group.
        let got = s
            .query(&QuerySpec {
                from_time: 3_000_000_000,
                to_time: 3_000_000_000,
                limit: 10_000,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(got.len(), 700);
        assert!(got.iter().all(|e| e.stored_at == 3_000_000_000));
        write(&s, 1, 9_000_000_000, 5);
        drop(s);

        let names = DB::list_cf(&Options::default(), dir.path()).unwrap();
        assert!(!names.iter().any(|n| n == legacy::CF_EVENTS), "{names:?}");
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.read_from(0, usize::MAX).unwrap().len(), 3501);
        assert_eq!(
            s.get(3501).unwrap().map(|e| e.stored_at),
            Some(9_000_000_000)
        );
    }

    #[test]
    fn a_store_of_a_newer_format_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        write(&s, 3, 1, 5);
        drop(s);
        {
            let db = DB::open_cf(
                &Options::default(),
                dir.path(),
                [CF_BLOCKS, CF_TINDEX, CF_AGENTS, CF_META],
            )
            .unwrap();
            db.put_cf(db.cf_handle(CF_META).unwrap(), KEY_FORMAT, be(FORMAT + 1))
                .unwrap();
        }
        match Store::open(dir.path()) {
            Err(e @ StoreError::Newer { found, .. }) => {
                assert_eq!(found, FORMAT + 1);
                assert!(e.to_string().contains("layout format 3"), "{e}");
            }
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a newer store was opened"),
        }
    }
}
