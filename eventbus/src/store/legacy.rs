//! Format 1 stores: one RocksDB key per event in the `events` family.
//!
//! A bus of this build converts such a store once, when it opens it: the
//! events are read in offset order and written again as blocks (the same
//! grouping a live write makes: consecutive offsets with one stored time),
//! then the format key is written with a synced write. Only after that does
//! the caller drop the old family. A crash part way leaves format 1 in place
//! and the next open converts again from the start, writing the same blocks
//! under the same keys. The time index, agent records and offsets are shared
//! by both formats and stay as they are.

use std::path::Path;
use std::time::Instant;

use amoskys_proto::Event;
use prost::Message;
use rocksdb::{DB, IteratorMode, WriteBatch, WriteOptions};
use tracing::info;

use super::block::Builder;
use super::{CF_BLOCKS, CF_META, FORMAT, KEY_FORMAT, StoreError, be, cf, read_u64, rocks_at};

/// The family format 1 kept its events in.
pub(super) const CF_EVENTS: &str = "events";
/// Converted blocks are written in batches of about this many bytes, so the
/// conversion's memory does not grow with the store.
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// Rewrites every event of the `events` family as blocks and marks the store
/// as of this build's format.
pub(super) fn convert(db: &DB, path: &Path) -> Result<(), StoreError> {
    let started = Instant::now();
    let (events, blocks, meta) = (cf(db, CF_EVENTS)?, cf(db, CF_BLOCKS)?, cf(db, CF_META)?);
    let mut builder = Builder::new();
    let mut wb = WriteBatch::default();
    let mut converted = 0u64;
    for item in db.iterator_cf(events, IteratorMode::Start) {
        let (k, v) = item.map_err(rocks_at(path))?;
        let offset = read_u64(&k).unwrap_or(0);
        let mut e = Event::decode(&*v).map_err(|err| StoreError::Corrupt {
            offset,
            message: format!("format 1 event: {err}"),
        })?;
        let stored_at = e.stored_at;
        let closed = builder.add(&mut e, offset, stored_at, |first, bytes| {
            wb.put_cf(blocks, be(first), bytes)
        });
        if closed && wb.size_in_bytes() >= BATCH_BYTES {
            db.write(std::mem::take(&mut wb)).map_err(rocks_at(path))?;
        }
        converted += 1;
    }
    if let Some((first, bytes)) = builder.take() {
        wb.put_cf(blocks, be(first), bytes);
    }
    wb.put_cf(meta, KEY_FORMAT, be(FORMAT));
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    db.write_opt(wb, &wo).map_err(rocks_at(path))?;
    info!(
        path = %path.display(),
        events = converted,
        took_ms = started.elapsed().as_millis() as u64,
        "converted a format 1 store (one key per event) to record blocks"
    );
    Ok(())
}

/// Writes `groups` as a format 1 store would hold them, each group's events
/// with the offsets and stored time they carry, for tests and for timing the
/// conversion.
pub(crate) fn write_format1(path: &Path, groups: &[Vec<Event>]) -> Result<(), StoreError> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let db = DB::open_cf(&opts, path, [CF_EVENTS, "tindex", "agents", CF_META])
        .map_err(rocks_at(path))?;
    let (events, tindex, meta) = (cf(&db, CF_EVENTS)?, cf(&db, "tindex")?, cf(&db, CF_META)?);
    let mut next = 1;
    for group in groups {
        let mut wb = WriteBatch::default();
        if let Some(first) = group.first() {
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&be(first.stored_at as u64));
            key[8..].copy_from_slice(&be(first.offset));
            wb.put_cf(tindex, key, b"");
        }
        for e in group {
            wb.put_cf(events, be(e.offset), e.encode_to_vec());
            next = e.offset + 1;
        }
        wb.put_cf(meta, b"next_offset", be(next));
        db.write(wb).map_err(rocks_at(path))?;
    }
    db.flush_cf(events).map_err(rocks_at(path))?;
    Ok(())
}
