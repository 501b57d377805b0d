//! The last 15 minutes of rates: bus totals per collector and each agent's
//! counters, sampled on a fixed interval. Pure state; the sampler task lives
//! in the dashboard module. On a sharded bus each sample holds every shard's
//! counters, and a rate sums the shards present in both of its samples, so
//! a shard that missed one sample leaves a dip, never a spike.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use amoskys_proto::AgentRecord;
use serde::Serialize;

use amoskys_client::phase::SpoolSample;

pub const WINDOW: Duration = Duration::from_secs(15 * 60);

#[derive(Clone, Debug, Default)]
pub struct BusSample {
    pub at_ns: i64,
    /// Each shard's counters (one entry on a single bus).
    pub shards: BTreeMap<u32, ShardCounts>,
}

/// One shard's stored-event counters since its process started.
#[derive(Clone, Debug, Default)]
pub struct ShardCounts {
    pub stored: u64,
    pub by_collector: BTreeMap<String, u64>,
}

impl BusSample {
    /// A sample of one shard (a single bus).
    pub fn single(at_ns: i64, shard: u32, counts: ShardCounts) -> Self {
        Self {
            at_ns,
            shards: BTreeMap::from([(shard, counts)]),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct AgentSample {
    pub at_ns: i64,
    pub events: u64,
    pub spool_bytes: u64,
    pub dropped: u64,
}

/// Rates between consecutive samples, for a chart.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Series {
    /// Sample times, unix milliseconds.
    pub t: Vec<i64>,
    pub total: Vec<f64>,
    pub by_collector: BTreeMap<String, Vec<f64>>,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct AgentSeries {
    pub t: Vec<i64>,
    pub eps: Vec<f64>,
    pub events: Vec<u64>,
    pub spool_bytes: Vec<u64>,
    pub dropped: Vec<u64>,
}

pub struct History {
    capacity: usize,
    bus: VecDeque<BusSample>,
    agents: HashMap<String, VecDeque<AgentSample>>,
}

fn rate(a: u64, b: u64, dt_ns: i64) -> f64 {
    if dt_ns <= 0 {
        return 0.0;
    }
    b.saturating_sub(a) as f64 / (dt_ns as f64 / 1e9)
}

impl History {
    /// Keeps enough samples at `interval` to cover [`WINDOW`].
    pub fn new(interval: Duration) -> Self {
        let capacity = (WINDOW.as_millis() / interval.as_millis().max(1)).max(2) as usize + 1;
        Self {
            capacity,
            bus: VecDeque::with_capacity(capacity),
            agents: HashMap::new(),
        }
    }

    pub fn record(&mut self, bus: BusSample, agents: &[AgentRecord]) {
        let at = bus.at_ns;
        push(&mut self.bus, bus, self.capacity);
        for a in agents {
            let hb = a.last_heartbeat.as_ref();
            let sample = AgentSample {
                at_ns: at,
                events: a.events,
                spool_bytes: hb.map(|h| h.spool_bytes).unwrap_or(0),
                dropped: hb.map(|h| h.dropped).unwrap_or(0).max(a.gaps_dropped),
            };
            let ring = self.agents.entry(a.agent_id.clone()).or_default();
            push(ring, sample, self.capacity);
        }
        // Forget agents the registry no longer has.
        if self.agents.len() > agents.len() {
            let keep: std::collections::HashSet<&str> =
                agents.iter().map(|a| a.agent_id.as_str()).collect();
            self.agents.retain(|id, _| keep.contains(id.as_str()));
        }
    }

    pub fn series(&self) -> Series {
        let mut s = Series::default();
        let names: std::collections::BTreeSet<&String> = self
            .bus
            .iter()
            .flat_map(|b| b.shards.values().flat_map(|c| c.by_collector.keys()))
            .collect();
        for w in self.bus.iter().collect::<Vec<_>>().windows(2) {
            let (a, b) = (w[0], w[1]);
            let dt = b.at_ns - a.at_ns;
            let both: Vec<(&ShardCounts, &ShardCounts)> = b
                .shards
                .iter()
                .filter_map(|(i, y)| a.shards.get(i).map(|x| (x, y)))
                .collect();
            s.t.push(b.at_ns / 1_000_000);
            s.total
                .push(both.iter().map(|(x, y)| rate(x.stored, y.stored, dt)).sum());
            for name in &names {
                let count = |c: &ShardCounts| c.by_collector.get(*name).copied().unwrap_or(0);
                s.by_collector
                    .entry((*name).clone())
                    .or_default()
                    .push(both.iter().map(|(x, y)| rate(count(x), count(y), dt)).sum());
            }
        }
        s
    }

    /// The latest rates: total and per collector.
    pub fn current(&self) -> (f64, BTreeMap<String, f64>) {
        let s = self.series();
        let by = s
            .by_collector
            .into_iter()
            .map(|(k, v)| (k, v.last().copied().unwrap_or(0.0)))
            .collect();
        (s.total.last().copied().unwrap_or(0.0), by)
    }

    pub fn agent_series(&self, id: &str) -> AgentSeries {
        let mut s = AgentSeries::default();
        let Some(ring) = self.agents.get(id) else {
            return s;
        };
        let samples: Vec<&AgentSample> = ring.iter().collect();
        for (i, x) in samples.iter().enumerate() {
            s.t.push(x.at_ns / 1_000_000);
            s.eps.push(match i.checked_sub(1).map(|j| samples[j]) {
                Some(p) => rate(p.events, x.events, x.at_ns - p.at_ns),
                None => 0.0,
            });
            s.events.push(x.events);
            s.spool_bytes.push(x.spool_bytes);
            s.dropped.push(x.dropped);
        }
        s
    }

    /// Events per second the bus stored for `id` over the last interval.
    pub fn agent_eps(&self, id: &str) -> Option<f64> {
        let ring = self.agents.get(id)?;
        let n = ring.len();
        if n < 2 {
            return None;
        }
        let (a, b) = (&ring[n - 2], &ring[n - 1]);
        Some(rate(a.events, b.events, b.at_ns - a.at_ns))
    }

    /// The most recent spool observations, for the phase rules.
    pub fn spool_trend(&self, id: &str, n: usize) -> Vec<SpoolSample> {
        self.agents
            .get(id)
            .map(|ring| {
                ring.iter()
                    .skip(ring.len().saturating_sub(n))
                    .map(|s| SpoolSample {
                        at_ns: s.at_ns,
                        spool_bytes: s.spool_bytes,
                        dropped: s.dropped,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn push<T>(ring: &mut VecDeque<T>, v: T, capacity: usize) {
    if ring.len() == capacity {
        ring.pop_front();
    }
    ring.push_back(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::Heartbeat;

    const S: i64 = 1_000_000_000;

    fn counts(stored: u64, process: u64) -> ShardCounts {
        ShardCounts {
            stored,
            by_collector: [("process".to_string(), process)].into(),
        }
    }

    fn bus(t: i64, stored: u64, process: u64) -> BusSample {
        BusSample::single(t * S, 0, counts(stored, process))
    }

    fn agent(id: &str, events: u64, spool: u64) -> AgentRecord {
        AgentRecord {
            agent_id: id.into(),
            events,
            last_heartbeat: Some(Heartbeat {
                spool_bytes: spool,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rates_come_from_consecutive_samples() {
        let mut h = History::new(Duration::from_secs(5));
        h.record(bus(0, 0, 0), &[agent("a", 0, 10)]);
        h.record(bus(5, 500, 100), &[agent("a", 50, 20)]);
        h.record(bus(10, 1500, 100), &[agent("a", 150, 30), agent("b", 7, 0)]);
        let s = h.series();
        assert_eq!(s.t, [5_000, 10_000]);
        assert_eq!(s.total, [100.0, 200.0]);
        assert_eq!(s.by_collector["process"], [20.0, 0.0]);
        let (total, by) = h.current();
        assert_eq!((total, by["process"]), (200.0, 0.0));
        assert_eq!(h.agent_eps("a"), Some(20.0));
        assert_eq!(h.agent_eps("b"), None, "one sample is no rate");
        assert_eq!(h.agent_series("a").eps, [0.0, 10.0, 20.0]);
        let trend = h.spool_trend("a", 2);
        assert_eq!(
            trend.iter().map(|s| s.spool_bytes).collect::<Vec<_>>(),
            [20, 30]
        );
        // An agent the registry dropped is forgotten.
        h.record(bus(15, 1500, 100), &[agent("b", 7, 0)]);
        assert!(h.agent_series("a").t.is_empty());
    }

    #[test]
    fn shards_add_up_and_one_missing_from_a_sample_is_left_out_of_its_rates() {
        let mut h = History::new(Duration::from_secs(5));
        let sample = |t: i64, shards: &[(u32, u64)]| BusSample {
            at_ns: t * S,
            shards: shards.iter().map(|&(i, n)| (i, counts(n, n))).collect(),
        };
        h.record(sample(0, &[(0, 0), (1, 1000), (2, 50)]), &[]);
        h.record(sample(5, &[(0, 500), (1, 1500), (2, 550)]), &[]);
        // Shard 1 did not answer this time.
        h.record(sample(10, &[(0, 1000), (2, 1050)]), &[]);
        h.record(sample(15, &[(0, 1500), (1, 3000), (2, 1550)]), &[]);
        let s = h.series();
        assert_eq!(s.total, [300.0, 200.0, 200.0]);
        assert_eq!(s.by_collector["process"], [300.0, 200.0, 200.0]);
    }

    #[test]
    fn keeps_fifteen_minutes() {
        let mut h = History::new(Duration::from_secs(5));
        for i in 0..1000 {
            h.record(bus(i * 5, i as u64, 0), &[]);
        }
        let s = h.series();
        assert_eq!(s.t.len(), 180);
        assert_eq!(*s.t.last().unwrap() - s.t[0], (179 * 5 * 1000) as i64);
    }
}
