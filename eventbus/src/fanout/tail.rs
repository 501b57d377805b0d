//! Tail on a sharded bus: one live stream merged from every shard's.
//!
//! Each shard is followed by its own task, from a position of its own; the
//! merged stream interleaves shards as their events arrive (each shard's in
//! offset order), stamps every event with its shard, and carries on every
//! response the cursor after it, so `tail --cursor` resumes each shard
//! exactly. A shard that stops answering is named in `missing_shards` while
//! it is away and followed again from where it stopped when it is back, so
//! a tail through a live shard skips nothing of it. A shard the map adds
//! while the tail runs is followed from its first event. Move duplicates
//! are dropped by (agent_id, incarnation, seq) among the last
//! [`RECENT_KEYS`] events.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use amoskys_proto::{Event, QueryResponse, StatsRequest, TailRequest};
use futures::StreamExt;
use futures::stream::BoxStream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

use super::query::{Cursor, format_cursor, parse_cursor};
use crate::filter::EventFilter;
use crate::service::{BusState, spawn_tail};

/// Keys of recent events kept to drop move duplicates.
const RECENT_KEYS: usize = 65_536;
/// Wait before following a shard that stopped answering again.
const RETRY: Duration = Duration::from_millis(250);

/// What a shard's follower hands the merge.
enum Part {
    Events(u32, Vec<Event>),
    Away(u32),
    Back(u32),
}

/// One shard's tail stream, opened from `from` (None: from now).
type ShardStream = BoxStream<'static, Result<QueryResponse, Status>>;

/// Opens shard `shard`'s stream. From now on a peer means from the next
/// offset it reports, so a follower that reconnects knows where it was.
async fn open(
    state: &Arc<BusState>,
    shard: u32,
    from: Option<u64>,
    t: &TailRequest,
    filter: &EventFilter,
) -> Result<(ShardStream, u64), String> {
    if shard == state.shards.index {
        let from = from.unwrap_or_else(|| state.store.next_offset());
        let rx = spawn_tail(state.clone(), Some(from), filter.clone());
        return Ok((
            tokio_stream::wrappers::ReceiverStream::new(rx).boxed(),
            from,
        ));
    }
    let map = state.shards.map();
    let wire = t.filter.clone();
    state
        .shards
        .call(map.url(shard), |mut c| async move {
            let from = match from {
                Some(f) => f,
                None => {
                    let s = c
                        .admin
                        .stats(StatsRequest {
                            local: true,
                            allow_partial: false,
                        })
                        .await?;
                    s.into_inner().next_offset
                }
            };
            let req = TailRequest {
                from_offset: from,
                filter: wire,
                local: true,
                ..Default::default()
            };
            Ok((c.tail(req).await?.boxed(), from))
        })
        .await
        .map_err(str::to_string)
}

/// What every shard's follower of one tail shares.
#[derive(Clone)]
struct Followers {
    state: Arc<BusState>,
    t: Arc<TailRequest>,
    filter: EventFilter,
    out: mpsc::Sender<Part>,
    done: CancellationToken,
}

impl Followers {
    /// Follows one shard until `done`, reopening its stream from the offset
    /// after the last event it gave whenever the shard stops answering.
    fn spawn(&self, shard: u32, from: Option<u64>, first: Option<ShardStream>) {
        let Followers {
            state,
            t,
            filter,
            out,
            done,
        } = self.clone();
        let mut from = from;
        tokio::spawn(async move {
            let mut stream = first;
            let mut away = false;
            loop {
                let mut s = match stream.take() {
                    Some(s) => s,
                    None => match open(&state, shard, from, &t, &filter).await {
                        Ok((s, at)) => {
                            from = Some(at);
                            if away && out.send(Part::Back(shard)).await.is_err() {
                                return;
                            }
                            s
                        }
                        Err(why) => {
                            if !away {
                                warn!(shard, error = %why, "a shard does not answer a tail; retrying");
                                if out.send(Part::Away(shard)).await.is_err() {
                                    return;
                                }
                            }
                            away = true;
                            tokio::select! {
                                _ = done.cancelled() => return,
                                _ = tokio::time::sleep(RETRY) => continue,
                            }
                        }
                    },
                };
                let why = loop {
                    let next = tokio::select! {
                        _ = done.cancelled() => return,
                        n = s.next() => n,
                    };
                    match next {
                        Some(Ok(r)) => {
                            let mut events = if r.encoded.count() > 0 {
                                // This shard's own events come encoded as stored.
                                match QueryResponse::decode(r.encode_to_vec().as_slice()) {
                                    Ok(d) => d.events,
                                    Err(e) => break format!("decoding its events: {e}"),
                                }
                            } else {
                                r.events
                            };
                            if let Some(last) = events.last() {
                                from = Some(last.offset + 1);
                            }
                            for e in &mut events {
                                e.shard = shard;
                            }
                            if !events.is_empty()
                                && out.send(Part::Events(shard, events)).await.is_err()
                            {
                                return;
                            }
                        }
                        Some(Err(e)) => break e.message().to_string(),
                        None => break "its stream ended".to_string(),
                    }
                };
                warn!(shard, error = %why, "a shard's tail stopped; following it again");
                if out.send(Part::Away(shard)).await.is_err() {
                    return;
                }
                away = true;
            }
        });
    }
}

impl BusState {
    /// A Tail that covers every shard: fails naming a shard that does not
    /// answer at the start, unless the request allows partial results.
    pub(crate) async fn fan_out_tail(
        self: &Arc<Self>,
        t: TailRequest,
        filter: EventFilter,
    ) -> Result<mpsc::Receiver<Result<QueryResponse, Status>>, Status> {
        fan_out_tail(self.clone(), t, filter).await
    }
}

async fn fan_out_tail(
    state: Arc<BusState>,
    t: TailRequest,
    filter: EventFilter,
) -> Result<mpsc::Receiver<Result<QueryResponse, Status>>, Status> {
    let map = state.shards.map();
    let mut cursor = if t.cursor.is_empty() {
        Cursor::new()
    } else {
        parse_cursor(&t.cursor).map_err(Status::invalid_argument)?
    };
    let (from_now, from_offset) = (t.from_now, t.from_offset);
    let start = move |shard: u32, cursor: &Cursor| match cursor.get(&shard) {
        Some(&o) => Some(o),
        None if from_now => None,
        None => Some(from_offset),
    };
    let t = Arc::new(t);
    let opened = futures::future::join_all(
        (0..map.shards()).map(|s| open(&state, s, start(s, &cursor), &t, &filter)),
    )
    .await;
    let mut firsts = Vec::new();
    let mut missing = BTreeSet::new();
    for (shard, r) in (0..map.shards()).zip(opened) {
        match r {
            Ok((s, at)) => {
                cursor.insert(shard, at);
                firsts.push((shard, Some(s)));
            }
            Err(why) if t.allow_partial => {
                warn!(shard, error = %why, "a shard did not answer a tail; following the others");
                missing.insert(shard);
                firsts.push((shard, None));
            }
            Err(why) => return Err(super::unavailable("Tail", &map, shard, &why)),
        }
    }
    let done = state.stop.child_token();
    let (parts_tx, mut parts) = mpsc::channel::<Part>(64);
    let followers = Followers {
        state: state.clone(),
        t: t.clone(),
        filter,
        out: parts_tx,
        done: done.clone(),
    };
    let mut following = map.shards();
    for (shard, first) in firsts {
        followers.spawn(shard, start(shard, &cursor), first);
    }
    let (tx, rx) = mpsc::channel(16);
    let mut maps = state.shards.subscribe();
    tokio::spawn(async move {
        let _stop_followers = done.clone().drop_guard();
        let mut recent = Recent::default();
        // Tell a reader who started partial which shards it lacks.
        let mut changed = !missing.is_empty();
        loop {
            if changed {
                changed = false;
                let r = QueryResponse {
                    cursor: format_cursor(&cursor),
                    missing_shards: missing.iter().copied().collect(),
                    ..Default::default()
                };
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            let part = tokio::select! {
                _ = tx.closed() => return,
                _ = done.cancelled() => return,
                m = maps.changed() => {
                    if m.is_err() {
                        continue;
                    }
                    let n = maps.borrow_and_update().shards();
                    for shard in following..n {
                        info!(shard, "the shard map grew; the tail follows the new shard");
                        cursor.insert(shard, 0);
                        followers.spawn(shard, Some(0), None);
                    }
                    following = following.max(n);
                    continue;
                }
                p = parts.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
            };
            match part {
                Part::Away(shard) => changed |= missing.insert(shard),
                Part::Back(shard) => changed |= missing.remove(&shard),
                Part::Events(shard, events) => {
                    if let Some(last) = events.last() {
                        cursor.insert(shard, last.offset + 1);
                    }
                    let events: Vec<Event> =
                        events.into_iter().filter(|e| recent.first(e)).collect();
                    if events.is_empty() {
                        continue;
                    }
                    let r = QueryResponse {
                        events,
                        cursor: format_cursor(&cursor),
                        missing_shards: missing.iter().copied().collect(),
                        ..Default::default()
                    };
                    if tx.send(Ok(r)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

/// The (agent_id, incarnation, seq) of the last [`RECENT_KEYS`] events.
#[derive(Default)]
struct Recent {
    keys: HashSet<(String, u64, u64)>,
    order: VecDeque<(String, u64, u64)>,
}

impl Recent {
    /// False for an event whose key was seen recently (a move duplicate).
    fn first(&mut self, e: &Event) -> bool {
        if e.seq == 0 {
            return true;
        }
        let key = (e.agent_id.clone(), e.incarnation, e.seq);
        if !self.keys.insert(key.clone()) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > RECENT_KEYS
            && let Some(old) = self.order.pop_front()
        {
            self.keys.remove(&old);
        }
        true
    }
}
