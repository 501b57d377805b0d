//! Reads on a sharded bus: whichever shard a read reaches asks every shard
//! of the map in force (itself directly, the others with `local` set over
//! the peer identity, each within the peer deadline) and merges what they
//! answer, so readers see one bus.
//!
//! A shard that does not answer fails the read with UNAVAILABLE naming it,
//! or, where the request allows partial results, is listed in
//! `missing_shards` beside the others' answers.

mod admin;
mod query;
mod tail;

use std::collections::BTreeMap;
use std::future::Future;

use amoskys_client::shard::ShardMap;
use amoskys_client::{BusClient, ClientError};
use futures::future::join_all;
use tonic::Status;
use tracing::warn;

use crate::service::BusState;

/// What each shard answered, and the shards that did not, with why.
pub(crate) struct Gathered<T> {
    pub answers: BTreeMap<u32, T>,
    pub missing: Vec<(u32, String)>,
}

impl<T> Gathered<T> {
    /// The shards that did not answer, or, unless `allow_partial`, an
    /// UNAVAILABLE naming the first of them and its address.
    pub fn missing_or_fail(
        &self,
        rpc: &str,
        map: &ShardMap,
        allow_partial: bool,
    ) -> Result<Vec<u32>, Status> {
        match self.missing.first() {
            Some((shard, why)) if !allow_partial => Err(unavailable(rpc, map, *shard, why)),
            _ => Ok(self.missing.iter().map(|(s, _)| *s).collect()),
        }
    }
}

/// UNAVAILABLE for a read that needed `shard`.
pub(crate) fn unavailable(rpc: &str, map: &ShardMap, shard: u32, why: &str) -> Status {
    Status::unavailable(format!(
        "{rpc}: shard {shard} ({}) did not answer: {why}; set allow_partial for the other shards' answers",
        map.url(shard).unwrap_or("no address")
    ))
}

impl BusState {
    /// Whether reads must cover other shards than this one.
    pub(crate) fn sharded(&self) -> bool {
        self.shards.map().shards() > 1
    }

    /// Asks every shard of `map` at once: this one through `local`, the
    /// others through `remote(shard, client)` within the peer deadline.
    pub(crate) async fn gather<T, L, R, RF>(
        &self,
        map: &ShardMap,
        rpc: &'static str,
        local: L,
        remote: R,
    ) -> Gathered<T>
    where
        L: Future<Output = Result<T, String>>,
        R: Fn(u32, BusClient) -> RF,
        RF: Future<Output = Result<T, ClientError>>,
    {
        let me = self.shards.index;
        let remote = &remote;
        let others = (0..map.shards()).filter(|&s| s != me).map(|s| async move {
            let r = self
                .shards
                .call(map.url(s), |c| remote(s, c))
                .await
                .map_err(str::to_string);
            (s, r)
        });
        let (mine, others) = tokio::join!(local, join_all(others));
        let mut g = Gathered {
            answers: BTreeMap::new(),
            missing: Vec::new(),
        };
        for (shard, r) in std::iter::once((me, mine)).chain(others) {
            match r {
                Ok(v) => {
                    g.answers.insert(shard, v);
                }
                Err(why) => {
                    warn!(shard, rpc, error = %why, "a shard did not answer a read");
                    g.missing.push((shard, why));
                }
            }
        }
        g.missing.sort_by_key(|(s, _)| *s);
        g
    }
}
