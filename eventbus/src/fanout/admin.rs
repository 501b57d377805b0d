//! Admin reads on a sharded bus: the agent registry and the stats of every
//! shard as one, and controls routed to the agent's owner.

use std::collections::BTreeMap;

use amoskys_proto::{
    AgentRecord, ControlRequest, ControlResponse, ListAgentsRequest, ListAgentsResponse,
    StatsRequest, StatsResponse,
};
use tonic::Status;

use crate::service::BusState;

/// One record per agent from every shard's records of it: the shard it is
/// connected to, else the one that saw it last, describes it; what it
/// stored is summed over the shards that stored it (a move leaves a
/// record on the old owner too).
pub fn merge_agents(by_shard: BTreeMap<u32, Vec<AgentRecord>>) -> Vec<AgentRecord> {
    let mut merged: BTreeMap<String, (AgentRecord, AgentRecord)> = BTreeMap::new();
    for (shard, records) in by_shard {
        for mut r in records {
            r.shard = shard;
            match merged.get_mut(&r.agent_id) {
                None => {
                    merged.insert(r.agent_id.clone(), (r.clone(), r));
                }
                Some((best, sum)) => {
                    sum.events += r.events;
                    sum.duplicates += r.duplicates;
                    sum.gaps_dropped += r.gaps_dropped;
                    sum.refused_streams += r.refused_streams;
                    sum.bus_lost += r.bus_lost;
                    sum.first_seen = sum.first_seen.min(r.first_seen);
                    sum.last_seq = sum.last_seq.max(r.last_seq);
                    if (r.connected, r.last_seen) > (best.connected, best.last_seen) {
                        *best = r;
                    }
                }
            }
        }
    }
    merged
        .into_values()
        .map(|(mut best, sum)| {
            best.events = sum.events;
            best.duplicates = sum.duplicates;
            best.gaps_dropped = sum.gaps_dropped;
            best.refused_streams = sum.refused_streams;
            best.bus_lost = sum.bus_lost;
            best.first_seen = sum.first_seen;
            best.last_seq = sum.last_seq;
            best
        })
        .collect()
}

/// Every shard's stats as one: counters summed, `writable` only if every
/// shard is, stored times over all of them; offsets, certificate and shard
/// fields stay those of `mine` (offsets are per shard), and each shard's
/// own figures are in `shards`.
pub fn merge_stats(mine: &StatsResponse, by_shard: BTreeMap<u32, StatsResponse>) -> StatsResponse {
    let mut out = mine.clone();
    out.events_stored = 0;
    out.wal_bytes = 0;
    out.connected_agents = 0;
    out.events_received = 0;
    out.duplicates = 0;
    out.rejected = 0;
    out.writable = true;
    out.stored_by_collector.clear();
    let nonzero = |v: i64| (v != 0).then_some(v);
    out.oldest_stored_at = by_shard
        .values()
        .filter_map(|s| nonzero(s.oldest_stored_at))
        .min()
        .unwrap_or(0);
    out.newest_stored_at = by_shard
        .values()
        .map(|s| s.newest_stored_at)
        .max()
        .unwrap_or(0);
    for s in by_shard.values() {
        out.events_stored += s.events_stored;
        out.wal_bytes += s.wal_bytes;
        out.connected_agents += s.connected_agents;
        out.events_received += s.events_received;
        out.duplicates += s.duplicates;
        out.rejected += s.rejected;
        out.writable &= s.writable;
        for (c, n) in &s.stored_by_collector {
            *out.stored_by_collector.entry(c.clone()).or_default() += n;
        }
    }
    out.shards = by_shard.into_values().collect();
    out
}

impl BusState {
    /// The registry of every shard (this one's alone with `local`).
    pub(crate) async fn agents(
        &self,
        req: ListAgentsRequest,
    ) -> Result<ListAgentsResponse, Status> {
        if req.local || !self.sharded() {
            let mut agents = self.registry.list();
            for a in &mut agents {
                a.shard = self.shards.index;
            }
            return Ok(ListAgentsResponse {
                agents,
                missing_shards: Vec::new(),
            });
        }
        let map = self.shards.map();
        let local = async { Ok(self.registry.list()) };
        let remote = |_, mut c: amoskys_client::BusClient| async move {
            let r = c
                .admin
                .list_agents(ListAgentsRequest {
                    local: true,
                    allow_partial: false,
                })
                .await?;
            Ok(r.into_inner().agents)
        };
        let got = self.gather(&map, "Admin.ListAgents", local, remote).await;
        let missing_shards = got.missing_or_fail("Admin.ListAgents", &map, req.allow_partial)?;
        Ok(ListAgentsResponse {
            agents: merge_agents(got.answers),
            missing_shards,
        })
    }

    /// This shard's stats, or with more than one shard the sum over all.
    pub(crate) async fn all_stats(&self, req: StatsRequest) -> Result<StatsResponse, Status> {
        let mine = self.local_stats().await?;
        if req.local || !self.sharded() {
            return Ok(mine);
        }
        let map = self.shards.map();
        let local = {
            let mine = mine.clone();
            async move { Ok(mine) }
        };
        let remote = |_, mut c: amoskys_client::BusClient| async move {
            let r = c
                .admin
                .stats(StatsRequest {
                    local: true,
                    allow_partial: false,
                })
                .await?;
            Ok(r.into_inner())
        };
        let got = self.gather(&map, "Admin.Stats", local, remote).await;
        let missing = got.missing_or_fail("Admin.Stats", &map, req.allow_partial)?;
        let mut out = merge_stats(&mine, got.answers);
        out.missing_shards = missing;
        Ok(out)
    }

    /// A control for an agent another shard owns goes to that shard, which
    /// holds the agent's stream; `who` asked for it.
    pub(crate) async fn route_control(
        &self,
        req: ControlRequest,
        who: &str,
    ) -> Result<ControlResponse, Status> {
        let map = self.shards.map();
        let owner = if req.agent_id.is_empty() || !self.sharded() {
            self.shards.index
        } else {
            map.owner(&req.agent_id)
        };
        // A forwarded request is served here whatever the map says, so two
        // shards whose maps differ cannot pass it back and forth.
        if owner == self.shards.index || !req.requested_by.is_empty() {
            return self
                .control(&req.agent_id, req.control, who)
                .await
                .map_err(Status::invalid_argument);
        }
        let fwd = ControlRequest {
            requested_by: who.to_string(),
            ..req
        };
        let got = self
            .shards
            .call(map.url(owner), |mut c| async move {
                Ok(c.admin.control(fwd).await?.into_inner())
            })
            .await;
        got.map_err(|why| super::unavailable("Admin.Control", &map, owner, why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, connected: bool, last_seen: i64, events: u64) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            connected,
            last_seen,
            first_seen: last_seen - 10,
            events,
            last_seq: events,
            ..Default::default()
        }
    }

    #[test]
    fn an_agent_that_moved_is_one_record_described_by_its_live_shard() {
        let by_shard = BTreeMap::from([
            (0, vec![rec("a", false, 50, 7), rec("b", true, 40, 3)]),
            // a moved to shard 2 and is live there; its old record on 0 is newer
            // by last_seen (the old owner saw its last batch late) but not live.
            (2, vec![rec("a", true, 45, 5)]),
        ]);
        let got = merge_agents(by_shard);
        assert_eq!(got.len(), 2);
        let a = &got[0];
        assert_eq!((a.agent_id.as_str(), a.shard, a.connected), ("a", 2, true));
        assert_eq!((a.events, a.last_seq, a.first_seen), (12, 7, 35));
        assert_eq!((got[1].agent_id.as_str(), got[1].shard), ("b", 0));
    }

    #[test]
    fn stats_sum_over_shards_and_are_writable_only_if_all_are() {
        let s = |stored, oldest, newest, writable| StatsResponse {
            events_stored: stored,
            oldest_stored_at: oldest,
            newest_stored_at: newest,
            writable,
            connected_agents: 2,
            ..Default::default()
        };
        let mine = StatsResponse {
            shard: 1,
            ..s(5, 0, 0, true)
        };
        let by = |n: u64| [("flow".to_string(), n)].into_iter().collect();
        let all = BTreeMap::from([
            (
                0,
                StatsResponse {
                    stored_by_collector: by(7),
                    ..s(10, 100, 900, true)
                },
            ),
            (1, s(5, 0, 0, true)),
            (
                2,
                StatsResponse {
                    stored_by_collector: by(2),
                    ..s(1, 50, 500, false)
                },
            ),
        ]);
        let got = merge_stats(&mine, all);
        assert_eq!(got.stored_by_collector, by(9));
        assert_eq!((got.events_stored, got.connected_agents), (16, 6));
        assert_eq!((got.oldest_stored_at, got.newest_stored_at), (50, 900));
        assert!(!got.writable);
        assert_eq!((got.shard, got.shards.len()), (1, 3));
    }
}
