//! The flow table: unidirectional flows keyed by 5-tuple plus VLAN, with
//! NetFlow/IPFIX expiry: a flow is exported when idle for `idle`, when it
//! has been active for `active` (a long flow then continues as a new
//! record), when the table is full (oldest evicted, counted) and on shutdown.

use std::collections::HashMap;

use super::decode::{Decoded, FlowKey};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub packets: u64,
    pub bytes: u64,
    pub payload_bytes: u64,
    pub tcp_flags: u8,
    pub first_seen: i64,
    pub last_seen: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Idle,
    Active,
    Evicted,
    Shutdown,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::Active => "active",
            EndReason::Evicted => "evicted",
            EndReason::Shutdown => "shutdown",
        }
    }
}

pub type Export = (FlowKey, FlowStats, EndReason);

pub struct FlowTable {
    flows: HashMap<FlowKey, FlowStats>,
    max: usize,
    idle_ns: i64,
    active_ns: i64,
}

impl FlowTable {
    pub fn new(max: usize, idle: std::time::Duration, active: std::time::Duration) -> Self {
        Self {
            flows: HashMap::new(),
            max: max.max(1),
            idle_ns: idle.as_nanos() as i64,
            active_ns: active.as_nanos() as i64,
        }
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// Accounts one packet at `ts` (unix ns), pushing flows evicted to make
    /// room (if the table was full) to `out`. True when the packet started
    /// a new flow.
    pub fn add(&mut self, p: &Decoded, ts: i64, out: &mut Vec<Export>) -> bool {
        let new = !self.flows.contains_key(&p.key);
        if new && self.flows.len() >= self.max {
            self.evict_oldest(out);
        }
        let f = self.flows.entry(p.key).or_insert(FlowStats {
            first_seen: ts,
            last_seen: ts,
            ..Default::default()
        });
        f.packets += 1;
        f.bytes += p.ip_bytes;
        f.payload_bytes += p.payload_bytes;
        f.tcp_flags |= p.tcp_flags;
        f.last_seen = f.last_seen.max(ts);
        new
    }

    pub fn contains(&self, key: &FlowKey) -> bool {
        self.flows.contains_key(key)
    }

    /// Evicts the least recently seen sixteenth of the table at once, so a
    /// full table costs amortized O(1) per new flow rather than a scan each.
    fn evict_oldest(&mut self, out: &mut Vec<Export>) {
        let n = (self.max / 16).max(1);
        let mut by_age: Vec<(i64, FlowKey)> =
            self.flows.iter().map(|(k, f)| (f.last_seen, *k)).collect();
        let n = n.min(by_age.len());
        if n == 0 {
            return;
        }
        by_age.select_nth_unstable(n - 1);
        for (_, k) in by_age.into_iter().take(n) {
            if let Some(f) = self.flows.remove(&k) {
                out.push((k, f, EndReason::Evicted));
            }
        }
    }

    /// Exports flows idle or active too long as of `now` (unix ns).
    pub fn expire(&mut self, now: i64, out: &mut Vec<Export>) {
        let (idle, active) = (self.idle_ns, self.active_ns);
        self.flows.retain(|k, f| {
            let reason = if now - f.last_seen >= idle {
                Some(EndReason::Idle)
            } else if now - f.first_seen >= active {
                Some(EndReason::Active)
            } else {
                None
            };
            match reason {
                Some(r) => {
                    out.push((*k, *f, r));
                    false
                }
                None => true,
            }
        });
    }

    pub fn drain(&mut self, out: &mut Vec<Export>) {
        out.extend(self.flows.drain().map(|(k, f)| (k, f, EndReason::Shutdown)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pkt(port: u16, bytes: u64) -> Decoded {
        Decoded {
            key: FlowKey {
                src: "10.0.0.1".parse().unwrap(),
                dst: "10.0.0.2".parse().unwrap(),
                src_port: port,
                dst_port: 80,
                protocol: 6,
                vlan: 0,
            },
            ip_bytes: bytes,
            payload_bytes: bytes - 40,
            tcp_flags: 0x10,
        }
    }

    const S: i64 = 1_000_000_000;

    #[test]
    fn idle_and_active_timeouts() {
        let mut t = FlowTable::new(100, Duration::from_secs(15), Duration::from_secs(60));
        let mut out = Vec::new();
        for i in 0..70 {
            t.add(&pkt(1, 100), i * S, &mut out); // busy: active timeout
        }
        t.add(&pkt(2, 140), 0, &mut out); // quiet: idle timeout
        t.expire(14 * S, &mut out);
        assert!(out.is_empty());
        t.expire(16 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0.src_port, out[0].2), (2, EndReason::Idle));
        assert_eq!(out[0].1.bytes, 140);
        out.clear();
        t.expire(61 * S, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].2, EndReason::Active);
        assert_eq!(out[0].1.packets, 70);
        assert_eq!(out[0].1.bytes, 7000);
        assert_eq!(out[0].1.payload_bytes, 70 * 60);
        assert!(t.is_empty());
    }

    #[test]
    fn full_table_evicts_the_oldest_and_shutdown_drains() {
        let mut t = FlowTable::new(32, Duration::from_secs(15), Duration::from_secs(60));
        let mut out = Vec::new();
        for p in 0..32u16 {
            t.add(&pkt(p, 100), i64::from(p), &mut out);
        }
        assert!(out.is_empty());
        t.add(&pkt(999, 100), 100, &mut out);
        assert_eq!(out.len(), 2, "a sixteenth of 32");
        assert!(
            out.iter()
                .all(|e| e.2 == EndReason::Evicted && e.0.src_port < 2)
        );
        out.clear();
        t.drain(&mut out);
        assert_eq!(out.len(), 31);
        assert!(out.iter().all(|e| e.2 == EndReason::Shutdown));
    }
}
