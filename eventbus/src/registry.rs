//! The agent registry: what the bus knows about every agent that published.
//!
//! Durable fields (last seq, counts, first/last seen, last heartbeat) are
//! committed by the writer with the events themselves; connection state and
//! the control channel to each live stream are in memory only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use amoskys_proto::{AgentRecord, Control, ControlResult, Hello};
use tokio::sync::mpsc;

struct LiveStream {
    conn_id: u64,
    control: mpsc::Sender<Control>,
}

#[derive(Default)]
pub struct Registry {
    records: RwLock<HashMap<String, AgentRecord>>,
    live: Mutex<HashMap<String, LiveStream>>,
    next_conn: AtomicU64,
}

/// Proof that a Publish stream is registered; dropping it unregisters.
pub struct Connection<'a> {
    registry: &'a Registry,
    agent_id: String,
    conn_id: u64,
}

impl Drop for Connection<'_> {
    fn drop(&mut self) {
        let mut live = self.registry.live.lock().unwrap_or_else(|p| p.into_inner());
        // A reconnect may already have replaced this stream; leave that one.
        if live
            .get(&self.agent_id)
            .is_some_and(|l| l.conn_id == self.conn_id)
        {
            live.remove(&self.agent_id);
        }
    }
}

impl Registry {
    pub fn with_records(records: HashMap<String, AgentRecord>) -> Self {
        Self {
            records: RwLock::new(records),
            ..Default::default()
        }
    }

    /// Registers a Publish stream; the newest stream of an agent wins.
    pub fn connect(
        &self,
        hello: &Hello,
        control: mpsc::Sender<Control>,
        now_ns: i64,
    ) -> Connection<'_> {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hello.agent_id.clone(), LiveStream { conn_id, control });
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        let rec = records
            .entry(hello.agent_id.clone())
            .or_insert_with(|| AgentRecord {
                agent_id: hello.agent_id.clone(),
                first_seen: now_ns,
                ..Default::default()
            });
        rec.node = hello.node.clone();
        rec.version = hello.version.clone();
        rec.collectors = hello.collectors.clone();
        rec.last_seen = now_ns;
        Connection {
            registry: self,
            agent_id: hello.agent_id.clone(),
            conn_id,
        }
    }

    pub fn last_seq(&self, agent_id: &str) -> u64 {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent_id)
            .map_or(0, |r| r.last_seq)
    }

    /// The record as it stands, for the writer to build on.
    pub fn record(&self, agent_id: &str) -> Option<AgentRecord> {
        self.records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent_id)
            .cloned()
    }

    /// Installs records the writer just made durable.
    pub fn apply(&self, updated: impl IntoIterator<Item = (String, AgentRecord)>) {
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        for (id, rec) in updated {
            // Keep in-memory-only fields that changed since the writer read them.
            let last_control = records.get(&id).and_then(|r| r.last_control.clone());
            let mut rec = rec;
            if rec.last_control.is_none() {
                rec.last_control = last_control;
            }
            records.insert(id, rec);
        }
    }

    pub fn set_control_result(&self, agent_id: &str, result: ControlResult) {
        if let Some(r) = self
            .records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(agent_id)
        {
            r.last_control = Some(result);
        }
    }

    pub fn control_sender(&self, agent_id: &str) -> Option<mpsc::Sender<Control>> {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(agent_id)
            .map(|l| l.control.clone())
    }

    pub fn connected_count(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every known agent, sorted by id, with its live connection state.
    pub fn list(&self) -> Vec<AgentRecord> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<AgentRecord> = self
            .records
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|r| AgentRecord {
                connected: live.contains_key(&r.agent_id),
                ..r.clone()
            })
            .collect();
        out.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_stream_wins_and_old_drop_keeps_it() {
        let r = Registry::default();
        let hello = Hello {
            agent_id: "a".into(),
            ..Default::default()
        };
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let c1 = r.connect(&hello, tx1, 1);
        let c2 = r.connect(&hello, tx2, 2);
        drop(c1);
        assert_eq!(r.connected_count(), 1, "the newer stream is still live");
        assert!(r.list()[0].connected);
        drop(c2);
        assert_eq!(r.connected_count(), 0);
        assert!(!r.list()[0].connected);
        assert_eq!(r.list()[0].first_seen, 1);
    }
}
