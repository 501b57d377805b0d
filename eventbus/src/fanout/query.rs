//! Query on a sharded bus: one page merged from every shard's events.
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

pub use amoskys_client::shard::{Cursor, format_cursor, parse_cursor};

use crate::service::BusState;
use crate::store::{Page, PageRequest, QuerySpec};

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

/// A newest-first page: events, where the next older page starts (None:
/// exhausted), and how many events this shard decoded for it.
#[derive(Debug, Default)]
pub struct NewestPage {
    pub events: Vec<Event>,
    pub next: Option<Cursor>,
    pub scanned: usize,
    pub missing_shards: Vec<u32>,
}

/// One newest-first page from every shard's (each newest first, with the
/// exclusive upper offset of its next page, None once it is exhausted):
/// up to `limit` events by stored time descending, then shard and offset
/// descending, move duplicates dropped, and the positions after them. A
/// shard whose events were all taken moves to its own next position; one
/// cut short resumes at the oldest event taken from it; one with nothing
/// taken stays just above the newest event it returned.
pub fn merge_newest(
    from: BTreeMap<u32, (Vec<Event>, Option<u64>)>,
    limit: usize,
) -> (Vec<Event>, Option<Cursor>) {
    let mut all: Vec<Event> = Vec::new();
    let mut sizes = BTreeMap::new();
    let mut newest = BTreeMap::new();
    for (shard, (events, _)) in &from {
        sizes.insert(*shard, events.len());
        if let Some(e) = events.first() {
            newest.insert(*shard, e.offset + 1);
        }
        all.extend(events.iter().cloned().map(|mut e| {
            e.shard = *shard;
            e
        }));
    }
    all.sort_by_key(|e| std::cmp::Reverse((e.stored_at, e.shard, e.offset)));
    let mut taken: BTreeMap<u32, (usize, u64)> = BTreeMap::new();
    let mut seen: HashSet<(String, u64, u64)> = HashSet::new();
    let mut out = Vec::new();
    for e in all {
        if out.len() == limit {
            break;
        }
        let t = taken.entry(e.shard).or_insert((0, u64::MAX));
        t.0 += 1;
        t.1 = t.1.min(e.offset);
        if e.seq > 0 && !seen.insert((e.agent_id.clone(), e.incarnation, e.seq)) {
            continue;
        }
        out.push(e);
    }
    let mut next = Cursor::new();
    for (shard, (_, after)) in from {
        let pos = match taken.get(&shard) {
            Some(&(n, _)) if n == sizes[&shard] => after,
            Some(&(_, oldest)) => Some(oldest),
            None if sizes[&shard] == 0 => after,
            // Nothing taken: stay above what it returned. Not at `at`,
            // which may be "the newest", read again later and then
            // newer than this page.
            None => newest.get(&shard).copied(),
        };
        if let Some(p) = pos {
            next.insert(shard, p);
        }
    }
    (out, (!next.is_empty()).then_some(next))
}

/// A merged page as responses of at most `QUERY_CHUNK` events, the last
/// (there is always one) carrying the cursor and the missing shards.
fn page_responses(events: Vec<Event>, cursor: String, missing: Vec<u32>) -> Vec<QueryResponse> {
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
        last.cursor = cursor;
        last.missing_shards = missing;
    }
    out
}

/// Events one newest-first read decodes on a shard before it returns a
/// cursor, so a rare filter over a long history answers in bounded time.
pub const NEWEST_FIRST_SCAN: usize = 5_000;

impl BusState {
    /// [`BusState::newest_first`] as the responses of a Query.
    pub(crate) async fn newest_first_responses(
        &self,
        q: &QueryRequest,
        spec: QuerySpec,
    ) -> Result<Vec<QueryResponse>, Status> {
        let page = self.newest_first(q, spec).await?;
        let cursor = page.next.as_ref().map(format_cursor).unwrap_or_default();
        Ok(page_responses(page.events, cursor, page.missing_shards))
    }

    /// A newest-first page over this shard (with `local`, or on a single
    /// bus) or over every shard.
    pub(crate) async fn newest_first(
        &self,
        q: &QueryRequest,
        spec: QuerySpec,
    ) -> Result<NewestPage, Status> {
        let me = self.shards.index;
        let map = self.shards.map();
        let newest = if q.to_offset == 0 {
            u64::MAX
        } else {
            q.to_offset.saturating_add(1)
        };
        let everywhere = !q.local && self.sharded();
        let at: Cursor = if !q.cursor.is_empty() {
            parse_cursor(&q.cursor).map_err(Status::invalid_argument)?
        } else if everywhere {
            (0..map.shards()).map(|s| (s, newest)).collect()
        } else {
            Cursor::from([(me, newest)])
        };
        let page_req = |before: u64| PageRequest {
            before,
            from_time: q.from_time,
            to_time: q.to_time,
            filter: spec.filter.clone(),
            limit: spec.limit,
            max_scan: NEWEST_FIRST_SCAN,
        };
        let local = {
            let store = self.store.clone();
            let req = at.get(&me).map(|&b| page_req(b));
            async move {
                let Some(req) = req else {
                    return Ok((Page::default(), None));
                };
                let page = tokio::task::spawn_blocking(move || store.page_back(&req))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let next = page.next_before;
                Ok((page, next))
            }
        };
        if !everywhere {
            let (page, next) = local.await.map_err(Status::internal)?;
            return Ok(NewestPage {
                next: next.map(|b| Cursor::from([(me, b)])),
                events: page.events,
                scanned: page.scanned,
                missing_shards: Vec::new(),
            });
        }
        let remote = |shard: u32, mut c: amoskys_client::BusClient| {
            let mut req = q.clone();
            req.local = true;
            req.cursor = format_cursor(
                &at.get(&shard)
                    .map(|&b| Cursor::from([(shard, b)]))
                    .unwrap_or_default(),
            );
            async move {
                let page = c.query_page(req).await?;
                let next = parse_cursor(&page.cursor)
                    .ok()
                    .and_then(|c| c.get(&shard).copied());
                Ok((
                    Page {
                        events: page.events,
                        next_before: next,
                        scanned: 0,
                    },
                    next,
                ))
            }
        };
        let got = self.gather(&map, "Query", local, remote).await;
        let missing_shards = got.missing_or_fail("Query", &map, q.allow_partial)?;
        let scanned = got.answers.get(&me).map_or(0, |(p, _)| p.scanned);
        let from = got
            .answers
            .into_iter()
            .map(|(s, (p, next))| (s, (p.events, next)))
            .collect();
        let (events, next) = merge_newest(from, spec.limit);
        Ok(NewestPage {
            events,
            next,
            scanned,
            missing_shards,
        })
    }

    /// The event at `offset` of `shard`: from this store, or asked of the
    /// shard that holds it.
    pub(crate) async fn event_at(&self, shard: u32, offset: u64) -> Result<Option<Event>, Status> {
        if shard == self.shards.index {
            let store = self.store.clone();
            let mut e = tokio::task::spawn_blocking(move || store.get(offset))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
            if let Some(e) = e.as_mut() {
                e.shard = shard;
            }
            return Ok(e);
        }
        let map = self.shards.map();
        if shard >= map.shards() {
            return Err(Status::invalid_argument(format!(
                "shard: {shard} is not a shard of this bus ({} shards)",
                map.shards()
            )));
        }
        let req = QueryRequest {
            from_offset: offset,
            to_offset: offset,
            limit: 1,
            local: true,
            ..Default::default()
        };
        let got = self
            .shards
            .call(map.url(shard), |mut c| async move { c.query(req).await })
            .await
            .map_err(|why| super::unavailable("event", &map, shard, why))?;
        Ok(got.into_iter().find(|e| e.offset == offset).map(|mut e| {
            e.shard = shard;
            e
        }))
    }

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
        let from = |shard: u32| cursor.get(&shard).copied().unwrap_or(q.from_offset);
        let local = {
            let spec = QuerySpec {
                from_offset: from(self.shards.index),
                filter: spec.filter.clone(),
                ..spec
            };
            let store = self.store.clone();
            async move {
                tokio::task::spawn_blocking(move || store.query(&spec))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
            }
        };
        let remote = |shard: u32, mut c: amoskys_client::BusClient| {
            let mut req = q.clone();
            req.from_offset = from(shard);
            req.cursor.clear();
            req.local = true;
            req.limit = limit as u32;
            async move { c.query(req).await }
        };
        let got = self.gather(&map, "Query", local, remote).await;
        let missing = got.missing_or_fail("Query", &map, q.allow_partial)?;
        let (events, next) = merge(got.answers, limit, &cursor);
        Ok(page_responses(events, format_cursor(&next), missing))
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

    #[test]
    fn newest_first_pages_merge_back_in_time_and_resume_each_shard() {
        // Shard 0 newest first: offsets 3, 2 (more below 2); shard 1: 10, 9, exhausted.
        let from = BTreeMap::from([
            (0, (vec![ev("a", 3, 3, 30), ev("a", 2, 2, 20)], Some(2))),
            (1, (vec![ev("b", 6, 10, 25), ev("a", 2, 9, 15)], None)),
        ]);
        let (page, next) = merge_newest(from, 3);
        let got: Vec<(u32, u64)> = page.iter().map(|e| (e.shard, e.offset)).collect();
        assert_eq!(got, [(0, 3), (1, 10), (0, 2)]);
        // Shard 0 was read whole (resumes below 2); shard 1 resumes at the
        // oldest taken, 10 (9 is still to come).
        assert_eq!(next, Some(Cursor::from([(0, 2), (1, 10)])));

        let from = BTreeMap::from([
            (0, (vec![], None)),
            // a/2 again (a move duplicate of shard 0's offset 2): dropped.
            (1, (vec![ev("a", 2, 9, 15)], None)),
        ]);
        let (page, next) = merge_newest(from, 3);
        // Within one page only: a copy on an earlier page is the reader's to drop.
        assert_eq!(page.len(), 1);
        assert_eq!(next, None, "both shards exhausted");

        // A busy shard fills the page: the idle one stays just above what it
        // returned, not at "the newest", which would later be newer still.
        let from = BTreeMap::from([
            (0, (vec![ev("a", 9, 9, 90), ev("a", 8, 8, 80)], Some(8))),
            (1, (vec![ev("b", 4, 4, 10)], Some(4))),
        ]);
        let (page, next) = merge_newest(from, 2);
        assert_eq!(page.len(), 2);
        assert_eq!(next, Some(Cursor::from([(0, 8), (1, 5)])));
    }
}
