//! Record blocks: the unit the store writes, reads, retains and backs up.
//!
//! A block holds consecutive events of one write group, all stored at the same
//! time. Its key is its first offset; an event's offset is that plus its index
//! in the block, and its stored time is the block's, so neither is repeated in
//! the events' bytes. One RocksDB key per block instead of one per event is
//! what lets the memtable keep up with the network (a 512-event batch is one
//! insert, not 512).
//!
//! Layout (v1), all integers big-endian:
//!
//! ```text
//! version u8 = 1 | stored_at i64 | count u32 | count × (varint length, Event)
//! ```
//!
//! Each event is the protobuf encoding of `Event` with `offset` and
//! `stored_at` left out. RocksDB compresses the block with LZ4 when it reaches
//! a table file.

use amoskys_proto::Event;
use prost::Message;
use prost::encoding::{decode_varint, encode_varint};

/// The only block layout this build writes and reads.
pub(crate) const VERSION: u8 = 1;
/// At most this many events in one block, so a read that wants one event
/// decodes a bounded amount around it.
pub(crate) const MAX_EVENTS: usize = 1024;
/// A block is closed once its events take this many bytes.
pub(crate) const MAX_BYTES: usize = 256 * 1024;
const HEADER_LEN: usize = 1 + 8 + 4;

/// Builds one block at a time from events appended in offset order.
pub(crate) struct Builder {
    buf: Vec<u8>,
    first: u64,
    stored_at: i64,
    count: u32,
}

impl Builder {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(64 * 1024),
            first: 0,
            stored_at: 0,
            count: 0,
        }
    }

    /// Appends `e` at `offset`, first handing the open block to `closed`
    /// when `e` cannot join it. True when a block was closed.
    pub(crate) fn add(
        &mut self,
        e: &mut Event,
        offset: u64,
        stored_at: i64,
        closed: impl FnOnce(u64, &[u8]),
    ) -> bool {
        let closing = !self.accepts(offset, stored_at);
        if closing && let Some((first, bytes)) = self.take() {
            closed(first, bytes);
        }
        self.push(e, offset, stored_at);
        closing
    }

    /// Whether `e` (stored at `stored_at`) can join the open block: it must
    /// follow the last event's offset, share its stored time, and fit.
    fn accepts(&self, offset: u64, stored_at: i64) -> bool {
        self.count == 0
            || (offset == self.first + u64::from(self.count)
                && stored_at == self.stored_at
                && (self.count as usize) < MAX_EVENTS
                && self.buf.len() < MAX_BYTES)
    }

    /// Appends `e` at `offset` to the open block, which must accept it.
    /// `e` comes back as it was.
    fn push(&mut self, e: &mut Event, offset: u64, stored_at: i64) {
        if self.count == 0 {
            self.first = offset;
            self.stored_at = stored_at;
            self.buf.clear();
            self.buf.push(VERSION);
            self.buf.extend_from_slice(&stored_at.to_be_bytes());
            self.buf.extend_from_slice(&0u32.to_be_bytes());
        }
        // Protobuf leaves zero fields out, so with its stamps zeroed the
        // event encodes without them, in place behind its length.
        let stamps = (
            std::mem::take(&mut e.offset),
            std::mem::take(&mut e.stored_at),
        );
        encode_varint(e.encoded_len() as u64, &mut self.buf);
        e.encode_raw(&mut self.buf);
        (e.offset, e.stored_at) = stamps;
        self.count += 1;
    }

    /// The open block's first offset and bytes; the builder is empty after.
    pub(crate) fn take(&mut self) -> Option<(u64, &[u8])> {
        if self.count == 0 {
            return None;
        }
        self.buf[9..HEADER_LEN].copy_from_slice(&self.count.to_be_bytes());
        self.count = 0;
        Some((self.first, &self.buf))
    }
}

/// One stored block, parsed lazily: the events' bytes are split on demand and
/// decoded only when asked for.
#[derive(Debug)]
pub(crate) struct Block<'a> {
    pub(crate) first: u64,
    pub(crate) stored_at: i64,
    pub(crate) count: u32,
    body: &'a [u8],
}

/// What is wrong with a block that does not parse.
pub(crate) type BlockError = String;

impl<'a> Block<'a> {
    /// Parses the header of the block stored under `first`.
    pub(crate) fn parse(first: u64, bytes: &'a [u8]) -> Result<Self, BlockError> {
        let header = bytes
            .get(..HEADER_LEN)
            .ok_or_else(|| format!("block of {} bytes has no header", bytes.len()))?;
        if header[0] != VERSION {
            return Err(format!(
                "block layout version {} (this build reads {VERSION})",
                header[0]
            ));
        }
        let mut at = [0u8; 8];
        at.copy_from_slice(&header[1..9]);
        let mut count = [0u8; 4];
        count.copy_from_slice(&header[9..HEADER_LEN]);
        Ok(Self {
            first,
            stored_at: i64::from_be_bytes(at),
            count: u32::from_be_bytes(count),
            body: &bytes[HEADER_LEN..],
        })
    }

    /// One past the last offset in the block.
    pub(crate) fn end(&self) -> u64 {
        self.first + u64::from(self.count)
    }

    /// Each event's offset and undecoded bytes, in order.
    pub(crate) fn raw(&self) -> RawEvents<'a> {
        RawEvents {
            rest: self.body,
            offset: self.first,
            left: self.count,
        }
    }

    /// Decodes the event at `offset` from its bytes, with the stamps the
    /// block holds for it.
    pub(crate) fn decode(&self, offset: u64, bytes: &[u8]) -> Result<Event, BlockError> {
        let mut e = Event::decode(bytes).map_err(|e| e.to_string())?;
        e.offset = offset;
        e.stored_at = self.stored_at;
        Ok(e)
    }
}

/// Iterator over a block's events as (offset, bytes).
pub(crate) struct RawEvents<'a> {
    rest: &'a [u8],
    offset: u64,
    left: u32,
}

impl<'a> Iterator for RawEvents<'a> {
    type Item = Result<(u64, &'a [u8]), BlockError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let offset = self.offset;
        self.offset += 1;
        let item = decode_varint(&mut self.rest)
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .and_then(|n| {
                let bytes = self.rest.get(..n)?;
                self.rest = &self.rest[n..];
                Some(bytes)
            })
            .map(|bytes| (offset, bytes))
            .ok_or_else(|| format!("event {offset} runs past the end of its block"));
        if item.is_err() {
            self.left = 0;
        }
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::SyntheticEvent;
    use amoskys_proto::event::Payload;

    fn event(seq: u64) -> Event {
        Event {
            agent_id: "a".into(),
            seq,
            node: "n".into(),
            collector: "synthetic".into(),
            observed_at: 7,
            labels: [("k".to_string(), "v".to_string())].into(),
            offset: 100 + seq,
            stored_at: 42,
            incarnation: 9,
            payload: Some(Payload::Synthetic(SyntheticEvent {
                n: seq,
                data: vec![seq as u8; 40],
            })),
            ..Default::default()
        }
    }

    fn build(events: &[Event]) -> (u64, Vec<u8>) {
        let mut b = Builder::new();
        for e in &mut events.to_vec() {
            assert!(b.accepts(e.offset, e.stored_at));
            b.push(e, e.offset, e.stored_at);
        }
        let (first, bytes) = b.take().unwrap();
        (first, bytes.to_vec())
    }

    #[test]
    fn events_come_back_with_their_offsets_and_stored_time() {
        let events: Vec<Event> = (1..=5).map(event).collect();
        let (first, bytes) = build(&events);
        let block = Block::parse(first, &bytes).unwrap();
        assert_eq!((block.first, block.count, block.stored_at), (101, 5, 42));
        assert_eq!(block.end(), 106);
        let back: Vec<Event> = block
            .raw()
            .map(|r| {
                let (off, raw) = r.unwrap();
                block.decode(off, raw).unwrap()
            })
            .collect();
        assert_eq!(back, events);
    }

    #[test]
    fn stamps_are_not_stored_per_event() {
        let e = event(1);
        let (first, bytes) = build(std::slice::from_ref(&e));
        let block = Block::parse(first, &bytes).unwrap();
        let (_, raw) = block.raw().next().unwrap().unwrap();
        let plain = Event::decode(raw).unwrap();
        assert_eq!((plain.offset, plain.stored_at), (0, 0));
        assert_eq!(plain.incarnation, 9, "the fields after them are kept");
        // Each stamp was a one-byte key and a one-byte varint.
        assert_eq!(raw.len(), e.encoded_len() - 4);
    }

    #[test]
    fn a_block_closes_at_a_gap_a_new_stored_time_or_its_limits() {
        let mut b = Builder::new();
        let mut e = event(1);
        b.push(&mut e, 10, 5);
        assert!(b.accepts(11, 5));
        assert!(!b.accepts(12, 5), "offsets must follow on");
        assert!(!b.accepts(11, 6), "one stored time per block");
        for off in 11..10 + MAX_EVENTS as u64 {
            b.push(&mut e, off, 5);
        }
        assert!(!b.accepts(10 + MAX_EVENTS as u64, 5), "full");
        let (first, bytes) = b.take().unwrap();
        let block = Block::parse(first, bytes).unwrap();
        assert_eq!(block.count as usize, MAX_EVENTS);
        assert!(b.take().is_none(), "taking empties the builder");

        let mut big = Event {
            payload: Some(Payload::Synthetic(SyntheticEvent {
                n: 0,
                data: vec![1; MAX_BYTES],
            })),
            ..Default::default()
        };
        b.push(&mut big, 1, 5);
        assert!(!b.accepts(2, 5), "over the byte limit after one event");
    }

    #[test]
    fn damaged_blocks_are_reported_not_misread() {
        let (first, bytes) = build(&[event(1), event(2)]);
        assert!(Block::parse(first, &bytes[..5]).is_err());
        let mut newer = bytes.clone();
        newer[0] = 2;
        assert!(
            Block::parse(first, &newer)
                .unwrap_err()
                .contains("version 2")
        );
        let cut = &bytes[..bytes.len() - 3];
        let block = Block::parse(first, cut).unwrap();
        let results: Vec<_> = block.raw().collect();
        assert_eq!(results.len(), 2);
        assert!(results[0].is_ok());
        assert!(results[1].as_ref().unwrap_err().contains("event 102"));
    }
}
