//! Which shard of the bus owns an agent, and the map every shard shares.
//!
//! An agent's owner is a jump consistent hash of a 64-bit hash (xxh3) of its
//! agent id over the number of active shards. Jump hash moves the fewest
//! agents a change can: growing from n to m shards moves about (m-n)/m of
//! them, all to the new shards; shrinking moves only those of the removed
//! shards. The hash is pinned by a golden test, so every shard, agent and
//! tool agrees on it across versions.

use serde::{Deserialize, Serialize};

/// The most shards a bus may have (the EventBus CRD's replica limit).
pub const MAX_SHARDS: u32 = 16;

/// The 64-bit hash of an agent id that ownership is computed from.
pub fn agent_hash(agent_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(agent_id.as_bytes())
}

/// Lamping and Veach's jump consistent hash: the bucket in `0..buckets` for
/// `key` (0 when `buckets` is 0).
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as u32
}

/// The shard that owns `agent_id` when `active` shards take events.
pub fn owner_of(agent_id: &str, active: u32) -> u32 {
    jump_hash(agent_hash(agent_id), active.max(1))
}

/// What is wrong with a shard map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShardMapError {
    /// The YAML or JSON did not parse.
    #[error("shard map: {0}")]
    Parse(String),
    /// A field is out of range; the text names it.
    #[error("shard map: {0}")]
    Invalid(String),
}

/// The shards of one bus: how many take events, and where each one is.
///
/// Shards `0..active` own agents; shards `active..peers.len()` are
/// *retiring*: they take no new events but still answer reads until their
/// data ages out. A higher epoch replaces a lower one; shards ignore maps
/// older than the one they hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShardMap {
    /// Increases with every change of the map.
    pub epoch: u64,
    /// Shards that own agents.
    pub active: u32,
    /// Each shard's stable `https://host:port` address, by index; active
    /// ones first, then the retiring ones. Empty for a single bus that
    /// needs no peers.
    #[serde(default)]
    pub peers: Vec<String>,
}

impl ShardMap {
    /// A single bus: one active shard, no peers, epoch 0.
    pub fn single() -> Self {
        Self {
            epoch: 0,
            active: 1,
            peers: Vec::new(),
        }
    }

    /// Reads and checks a map from YAML (JSON is YAML too).
    pub fn parse(text: &str) -> Result<Self, ShardMapError> {
        let map: Self =
            serde_saphyr::from_str(text).map_err(|e| ShardMapError::Parse(e.to_string()))?;
        map.validate()?;
        Ok(map)
    }

    /// Checks the counts and the addresses.
    pub fn validate(&self) -> Result<(), ShardMapError> {
        let bad = |m: String| Err(ShardMapError::Invalid(m));
        if self.active == 0 || self.active > MAX_SHARDS {
            return bad(format!(
                "active: {} is not between 1 and {MAX_SHARDS}",
                self.active
            ));
        }
        if self.peers.len() > MAX_SHARDS as usize {
            return bad(format!(
                "peers: {} shards exceed the limit of {MAX_SHARDS}",
                self.peers.len()
            ));
        }
        if self.active > 1 && (self.peers.len() as u32) < self.active {
            return bad(format!(
                "peers: {} addresses for {} active shards (each shard needs one)",
                self.peers.len(),
                self.active
            ));
        }
        for (i, p) in self.peers.iter().enumerate() {
            if !p.starts_with("https://") {
                return bad(format!(
                    "peers[{i}]: {p:?} must be an https:// URL (shards speak mTLS)"
                ));
            }
        }
        Ok(())
    }

    /// Every shard that exists: the active ones and the retiring ones.
    pub fn shards(&self) -> u32 {
        self.active.max(self.peers.len() as u32)
    }

    /// The shard that owns `agent_id` under this map.
    pub fn owner(&self, agent_id: &str) -> u32 {
        owner_of(agent_id, self.active)
    }

    /// True for a shard that exists but takes no new events.
    pub fn is_retiring(&self, shard: u32) -> bool {
        shard >= self.active && shard < self.shards()
    }

    /// The address of `shard`, if the map has one.
    pub fn url(&self, shard: u32) -> Option<&str> {
        self.peers.get(shard as usize).map(String::as_str)
    }
}

const CURSOR_PREFIX: &str = "c1";

/// A position in a sharded bus's reads: per shard, the first offset the
/// next page (or a resumed tail) reads from.
pub type Cursor = std::collections::BTreeMap<u32, u64>;

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed independently (Python's `xxhash` package and the published
    /// jump hash); a change here re-homes agents, so it must never change.
    #[test]
    fn golden_owners_for_1_to_16_shards() {
        assert_eq!(agent_hash("agent-0"), 0x847e_8fac_66eb_c9ef);
        let table: [[u32; 8]; 16] = [
            [0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0, 1, 1],
            [2, 1, 2, 0, 0, 0, 2, 1],
            [2, 1, 2, 3, 0, 0, 2, 1],
            [2, 1, 2, 3, 4, 0, 2, 1],
            [2, 5, 2, 5, 4, 0, 2, 1],
            [2, 5, 2, 5, 4, 0, 2, 1],
            [2, 5, 7, 5, 4, 0, 2, 1],
            [2, 5, 7, 5, 8, 0, 2, 1],
            [2, 9, 9, 5, 8, 9, 2, 1],
            [2, 9, 10, 10, 8, 9, 2, 1],
            [2, 9, 10, 10, 8, 9, 2, 1],
            [12, 12, 10, 10, 8, 9, 2, 1],
            [12, 13, 10, 10, 8, 9, 13, 1],
            [12, 13, 10, 10, 8, 9, 13, 1],
            [12, 13, 10, 15, 8, 9, 15, 1],
        ];
        for (n, row) in table.iter().enumerate() {
            let got: Vec<u32> = (0..8)
                .map(|i| owner_of(&format!("agent-{i}"), n as u32 + 1))
                .collect();
            assert_eq!(got, row, "{} shards", n + 1);
        }
    }

    #[test]
    fn growing_moves_agents_only_to_new_shards_and_shrinking_only_from_removed_ones() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("node-{i}")).collect();
        let moved = |from: u32, to: u32| {
            let mut n = 0;
            for id in &ids {
                let (a, b) = (owner_of(id, from), owner_of(id, to));
                if a != b {
                    n += 1;
                    if to > from {
                        assert!(b >= from, "{id}: {from}->{to} moved to old shard {b}");
                    } else {
                        assert!(a >= to, "{id}: {from}->{to} moved off kept shard {a}");
                    }
                }
            }
            n as f64 / ids.len() as f64
        };
        let up = moved(3, 5);
        assert!((0.35..0.45).contains(&up), "3->5 moved {up}");
        let down = moved(5, 3);
        assert!((down - up).abs() < 1e-9, "5->3 moved {down}, 3->5 {up}");
    }

    #[test]
    fn maps_parse_and_name_what_is_wrong() {
        let m = ShardMap::parse(
            "epoch: 7\nactive: 2\npeers: [\"https://a:7443\", \"https://b:7443\", \"https://c:7443\"]\n",
        )
        .unwrap();
        assert_eq!((m.epoch, m.active, m.shards()), (7, 2, 3));
        assert!(m.is_retiring(2) && !m.is_retiring(1) && !m.is_retiring(3));
        assert_eq!(m.url(1), Some("https://b:7443"));
        let err = |t: &str| ShardMap::parse(t).unwrap_err().to_string();
        assert!(err("epoch: 1\nactive: 0\n").contains("active: 0"));
        assert!(err("epoch: 1\nactive: 2\npeers: [\"https://a:1\"]\n").contains("peers: 1"));
        assert!(err("epoch: 1\nactive: 1\npeers: [\"http://a:1\"]\n").contains("peers[0]"));
        assert!(err("epoch: 1\nactive: 1\nshards: 3\n").contains("shards"));
        assert_eq!(ShardMap::single().owner("anything"), 0);
    }
}
