//! `QueryResponse` (`repeated Event events = 1`), written by hand so a
//! server can send events it already holds encoded without decoding and
//! encoding each of them again. On the wire it is the message bus.proto
//! declares; a client decodes every event into `events`.

use bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, encode_varint, encoded_len_varint, message};
use prost::{DecodeError, Message};

use crate::v1::Event;

/// Protobuf keys of `QueryResponse.events` (field 1, length-delimited) and of
/// `Event.offset` (8) and `Event.stored_at` (9), both varints.
const EVENTS_KEY: u8 = (1 << 3) | 2;
const OFFSET_KEY: u8 = 8 << 3;
const STORED_AT_KEY: u8 = 9 << 3;

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct QueryResponse {
    pub events: Vec<Event>,
    /// On the last response of a sharded query: the next page's cursor.
    pub cursor: String,
    /// On the last response of a partial sharded query: the shards left out.
    pub missing_shards: Vec<u32>,
    /// More events, already encoded as entries of `events`; sent after
    /// those in `events`. Empty on a decoded response.
    #[serde(skip)]
    pub encoded: EncodedEvents,
}

impl QueryResponse {
    /// How many events the response carries.
    pub fn len(&self) -> usize {
        self.events.len() + self.encoded.count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Events encoded one after another as entries of `QueryResponse.events`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EncodedEvents {
    bytes: Vec<u8>,
    count: usize,
}

impl EncodedEvents {
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            count: 0,
        }
    }

    /// Appends an event from `stored`, an `Event` encoding that leaves out
    /// its offset and stored time, followed by those two. Protobuf takes
    /// fields in any order, and the last of a repeated scalar wins, so this
    /// decodes as the event with `offset` and `stored_at` set.
    pub fn push_stored(&mut self, stored: &[u8], offset: u64, stored_at: i64) {
        let stamps = stamp_len(offset) + stamp_len(stored_at as u64);
        let len = stored.len() + stamps;
        self.bytes.push(EVENTS_KEY);
        encode_varint(len as u64, &mut self.bytes);
        self.bytes.extend_from_slice(stored);
        push_stamp(&mut self.bytes, OFFSET_KEY, offset);
        push_stamp(&mut self.bytes, STORED_AT_KEY, stored_at as u64);
        self.count += 1;
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }
}

/// A varint field left out at zero, as protobuf encodes defaults.
fn stamp_len(v: u64) -> usize {
    if v == 0 { 0 } else { 1 + encoded_len_varint(v) }
}

fn push_stamp(buf: &mut Vec<u8>, key: u8, v: u64) {
    if v != 0 {
        buf.push(key);
        encode_varint(v, buf);
    }
}

impl Message for QueryResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        for e in &self.events {
            message::encode(1, e, buf);
        }
        buf.put_slice(&self.encoded.bytes);
        if !self.cursor.is_empty() {
            prost::encoding::string::encode(2, &self.cursor, buf);
        }
        prost::encoding::uint32::encode_packed(3, &self.missing_shards, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag == 1 {
            message::merge_repeated(wire_type, &mut self.events, buf, ctx).map_err(|mut e| {
                e.push("QueryResponse", "events");
                e
            })
        } else if tag == 2 {
            prost::encoding::string::merge(wire_type, &mut self.cursor, buf, ctx).map_err(
                |mut e| {
                    e.push("QueryResponse", "cursor");
                    e
                },
            )
        } else if tag == 3 {
            prost::encoding::uint32::merge_repeated(wire_type, &mut self.missing_shards, buf, ctx)
                .map_err(|mut e| {
                    e.push("QueryResponse", "missing_shards");
                    e
                })
        } else {
            prost::encoding::skip_field(wire_type, tag, buf, ctx)
        }
    }

    fn encoded_len(&self) -> usize {
        message::encoded_len_repeated(1, &self.events)
            + self.encoded.bytes.len()
            + if self.cursor.is_empty() {
                0
            } else {
                prost::encoding::string::encoded_len(2, &self.cursor)
            }
            + prost::encoding::uint32::encoded_len_packed(3, &self.missing_shards)
    }

    fn clear(&mut self) {
        self.events.clear();
        self.cursor.clear();
        self.missing_shards.clear();
        self.encoded = EncodedEvents::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{SyntheticEvent, event::Payload};

    fn event(n: u64) -> Event {
        Event {
            agent_id: "a".into(),
            seq: n,
            collector: "synthetic".into(),
            labels: [("k".to_string(), "v".to_string())].into(),
            incarnation: 7,
            payload: Some(Payload::Synthetic(SyntheticEvent {
                n,
                data: vec![n as u8; 30],
            })),
            ..Default::default()
        }
    }

    #[test]
    fn stored_events_decode_with_their_stamps_after_decoded_ones() {
        let first = Event {
            offset: 1,
            stored_at: 5,
            ..event(1)
        };
        let mut encoded = EncodedEvents::default();
        for n in [2, 3] {
            encoded.push_stored(&event(n).encode_to_vec(), n, 5);
        }
        let r = QueryResponse {
            events: vec![first.clone()],
            encoded,
            cursor: "c1.0-4.2-9".into(),
            missing_shards: vec![1, 3],
        };
        assert_eq!(r.len(), 3);
        let bytes = r.encode_to_vec();
        assert_eq!(bytes.len(), r.encoded_len());
        let back = QueryResponse::decode(&*bytes).unwrap();
        let mut want = vec![first];
        want.extend([2, 3].map(|n| Event {
            offset: n,
            stored_at: 5,
            ..event(n)
        }));
        assert_eq!(back.events, want);
        assert_eq!(
            (back.cursor.as_str(), back.missing_shards.as_slice()),
            ("c1.0-4.2-9", &[1, 3][..])
        );
        assert!(back.encoded.bytes.is_empty());
    }

    #[test]
    fn stamps_already_in_the_stored_bytes_give_way_to_the_appended_ones() {
        // Blocks an earlier build wrote could keep an event's whole encoding.
        let old = Event {
            offset: 99,
            stored_at: 1,
            ..event(4)
        };
        let mut encoded = EncodedEvents::default();
        encoded.push_stored(&old.encode_to_vec(), 4, 6);
        let r = QueryResponse {
            encoded,
            ..Default::default()
        };
        let back = QueryResponse::decode(&*r.encode_to_vec()).unwrap();
        assert_eq!((back.events[0].offset, back.events[0].stored_at), (4, 6));
    }

    #[test]
    fn decodes_what_the_generated_message_would_encode() {
        // The generated shape: `repeated Event events = 1` and nothing else.
        #[derive(Clone, PartialEq, prost::Message)]
        struct Generated {
            #[prost(message, repeated, tag = "1")]
            events: Vec<Event>,
        }
        let g = Generated {
            events: vec![event(1), event(2)],
        };
        let back = QueryResponse::decode(&*g.encode_to_vec()).unwrap();
        assert_eq!(back.events, g.events);
        let again = Generated::decode(&*back.encode_to_vec()).unwrap();
        assert_eq!(again, g);
    }
}
