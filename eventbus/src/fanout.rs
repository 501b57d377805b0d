//! Query on a sharded bus: the shard a query reaches asks every shard (itself
//! from its store, the others with `local` over the peer identity), each
//! within the shard deadline, and merges what they return into one page.
//!
//! Order: by stored time, then shard, then offset. Events a move stored on two
//! shards (an old owner killed mid-move) are dropped by (agent_id,
//! incarnation, seq), keeping the first in that order. The cursor holds one
//! offset per shard, so the next page resumes each shard exactly where this
//! page stopped taking from it. Duplicates are dropped within a page; one
//! whose copies fall on two pages reaches the reader twice, and
//! `BusClient::query_all` drops it.

use std::collections::{BTreeMap, HashSet};

use amoskys_proto::{Event, QueryRequest, QueryResponse};
use tonic::Status;
use tracing::warn;

use crate::service::BusState;
use crate::store::QuerySpec;

const CURSOR_PREFIX: &str = "c1";

/// Per shard, the first offset the next page reads from.
pub type Cursor = BTreeMap<u32, u64>;

/// `c1.<shard>-<offset>...`; opaque to clients.
pub fn format_cursor(c: &Cursor) -> String {
    let mut s = CURSOR_PREFIX.to_string();
    for (shard, off) in c {
        s.push_str(&format!(".{shard}-{off}"));
    }
    s
}

/// Reads a cursor made by [`format_cursor`]; the error says what is wrong.
pub fn parse_cursor(s: &str) -> Result<Cursor, String> {
    let bad = || format!("cursor: {s:?} is not a cursor this bus returned");
    let mut parts = s.split('.');
    if parts.next() != Some(CURSOR_PREFIX) {
        return Err(bad());
    }
    let mut c = Cursor::new();
    for p in parts {
        let (shard, off) = p.split_once('-').ok_or_else(bad)?;
        let shard: u32 = shard.parse().map_err(|_| bad())?;
        let off: u64 = off.parse().map_err(|_| bad())?;
        c.insert(shard, off);
    }
    Ok(c)
}

/// One page merged from every shard's events (each in offset order, at most
/// `limit` of them): up to `limit` events, and the cursor after them.
pub fn merge(
    mut from: BTreeMap<u32, Vec<Event>>,
    limit: usize,
    cursor: &Cursor,
) -> (Vec<Event>, Cursor) {
    let mut all: Vec<Event> = Vec::new();
    for (shard, events) in from.iter_mut() {
        for e in events.iter_mut() {
            e.shard = *shard;
        }
        all.append(events);
    }
    all.sort_by_key(|e| (e.stored_at, e.shard, e.offset));
    let mut next = cursor.clone();
    let mut seen: HashSet<(String, u64, u64)> = HashSet::new();
    let mut out = Vec::new();
    for e in all {
        if out.len() == limit {
            break;
        }
        // Consumed either way: a duplicate is skipped, not read again.
        next.insert(e.shard, e.offset + 1);
        if e.seq > 0 && !seen.insert((e.agent_id.clone(), e.incarnation, e.seq)) {
            continue;
        }
        out.push(e);
    }
    (out, next)
}

impl BusState {
    /// A Query that covers every shard of the map in force.
    pub(crate) async fn fan_out_query(
        &self,
        q: QueryRequest,
        spec: QuerySpec,
    ) -> Result<Vec<QueryResponse>, Status> {
        let map = self.shards.map();
        let cursor = if q.cursor.is_empty() {
            Cursor::new()
        } else {
            parse_cursor(&q.cursor).map_err(Status::invalid_argument)?
        };
        let limit = spec.limit;
        let asks = (0..map.shards()).map(|shard| {
            let from = cursor.get(&shard).copied().unwrap_or(q.from_offset);
            let spec = QuerySpec {
                from_offset: from,
                filter: spec.filter.clone(),
                ..spec
            };
            let mut req = q.clone();
            req.from_offset = from;
            req.cursor.clear();
            req.local = true;
            req.limit = limit as u32;
            let map = map.clone();
            async move {
                let got = if shard == self.shards.index {
                    let store = self.store.clone();
                    tokio::task::spawn_blocking(move || store.query(&spec))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()))
                } else {
                    self.shards
                        .call(map.url(shard), |mut c| async move { c.query(req).await })
                        .await
                        .map_err(str::to_string)
                };
                (shard, got)
            }
        });
        let mut from = BTreeMap::new();
        let mut missing = Vec::new();
        let mut first_error = None;
        for (shard, got) in futures::future::join_all(asks).await {
            match got {
                Ok(events) => {
                    from.insert(shard, events);
                }
                Err(e) => {
                    warn!(shard, error = %e, "a shard did not answer a query");
                    self.metrics
                        .shard_peer_errors
                        .get_or_create(&crate::metrics::reason("query"))
                        .inc();
                    missing.push(shard);
                    first_error.get_or_insert((shard, e));
                }
            }
        }
        if let Some((shard, e)) = first_error
            && !q.allow_partial
        {
            return Err(Status::unavailable(format!(
                "Query: shard {shard} ({}) did not answer: {e}; set allow_partial for the other shards' events",
                map.url(shard).unwrap_or("no address")
            )));
        }
        let (events, next) = merge(from, limit, &cursor);
        let mut out: Vec<QueryResponse> = events
            .chunks(crate::service::QUERY_CHUNK)
            .map(|c| QueryResponse {
                events: c.to_vec(),
                ..Default::default()
            })
            .collect();
        if out.is_empty() {
            out.push(QueryResponse::default());
        }
        if let Some(last) = out.last_mut() {
            last.cursor = format_cursor(&next);
            last.missing_shards = missing;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(agent: &str, seq: u64, offset: u64, stored_at: i64) -> Event {
        Event {
            agent_id: agent.into(),
            seq,
            offset,
            stored_at,
            incarnation: 7,
            ..Default::default()
        }
    }

    #[test]
    fn pages_merge_by_stored_time_drop_move_duplicates_and_resume_per_shard() {
        let from = BTreeMap::from([
            (
                0,
                vec![ev("a", 1, 1, 10), ev("a", 2, 2, 20), ev("a", 3, 3, 30)],
            ),
            // b moved: seq 5 reached both shards.
            (
                1,
                vec![ev("b", 5, 9, 15), ev("a", 3, 10, 25), ev("b", 6, 11, 40)],
            ),
        ]);
        let (page, next) = merge(from, 4, &Cursor::new());
        let got: Vec<(u32, u64)> = page.iter().map(|e| (e.shard, e.offset)).collect();
        assert_eq!(got, [(0, 1), (1, 9), (0, 2), (1, 10)]);
        assert_eq!(next, Cursor::from([(0, 3), (1, 11)]));

        // The next page: shard 0 from offset 3, shard 1 from 11.
        let from = BTreeMap::from([(0, vec![ev("a", 3, 3, 30)]), (1, vec![ev("b", 6, 11, 40)])]);
        let (page, next) = merge(from, 4, &next);
        let got: Vec<(u32, u64)> = page.iter().map(|e| (e.shard, e.offset)).collect();
        // Duplicates are dropped within a page; a copy on the far side of a
        // page boundary is left to the reader (query_all drops it).
        assert_eq!(got, [(0, 3), (1, 11)]);
        assert_eq!(next, Cursor::from([(0, 4), (1, 12)]));
        assert_eq!(parse_cursor(&format_cursor(&next)).unwrap(), next);
        assert!(parse_cursor("x").unwrap_err().starts_with("cursor:"));
        assert!(parse_cursor("c1.0-x").is_err());
    }
}
