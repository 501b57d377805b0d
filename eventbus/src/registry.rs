//! The agent registry: what the bus knows about every agent that published.
//!
//! Durable fields (last seq, counts, first/last seen, last heartbeat) are
//! committed by the writer with the events themselves; connection state and
//! the control channel to each live stream are in memory only.
//!
//! One live Publish stream per agent id: a stream from another incarnation
//! (a second host with the same id) is refused while the first is live, so
//! two agents' seqs never interleave; a stream from the same incarnation (a
//! restarted agent whose old connection has not timed out yet) replaces it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use amoskys_proto::{AgentRecord, Control, ControlResult, Hello};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct LiveStream {
    conn_id: u64,
    control: mpsc::Sender<Control>,
    incarnation: u64,
    node: String,
    peer: String,
    replaced: CancellationToken,
}

/// An incarnation id as logs and messages show it.
pub fn incarnation_hex(i: u64) -> String {
    format!("{i:016x}")
}

#[derive(Default)]
pub struct Registry {
    records: RwLock<HashMap<String, AgentRecord>>,
    live: Mutex<HashMap<String, LiveStream>>,
    next_conn: AtomicU64,
}

/// Proof that a Publish stream is registered; dropping it unregisters.
pub struct Connection {
    registry: Arc<Registry>,
    agent_id: String,
    conn_id: u64,
    /// Cancelled when a newer stream of the same incarnation takes over.
    pub replaced: CancellationToken,
}

impl Drop for Connection {
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

    /// Registers a Publish stream from `peer`. Refused (the error is the
    /// message for the agent) when another incarnation of the agent id has a
    /// live stream; a stream of the same incarnation replaces the older one,
    /// whose `replaced` token is cancelled.
    pub fn connect(
        self: &Arc<Self>,
        hello: &Hello,
        peer: &str,
        control: mpsc::Sender<Control>,
        now_ns: i64,
    ) -> Result<Connection, String> {
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let replaced = CancellationToken::new();
        {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = live.get(&hello.agent_id) {
                if old.incarnation != hello.incarnation {
                    let msg = format!(
                        "agent id {:?} already has a live stream from incarnation {} (node {:?}, peer {}); \
                         refusing this one from incarnation {} (node {:?}, peer {}): two agents share one agent id, \
                         give each its own (flag --agent-id, config key agentId)",
                        hello.agent_id,
                        incarnation_hex(old.incarnation),
                        old.node,
                        old.peer,
                        incarnation_hex(hello.incarnation),
                        hello.node,
                        peer,
                    );
                    drop(live);
                    self.note_refusal(&hello.agent_id, &msg);
                    return Err(msg);
                }
                old.replaced.cancel();
            }
            live.insert(
                hello.agent_id.clone(),
                LiveStream {
                    conn_id,
                    control,
                    incarnation: hello.incarnation,
                    node: hello.node.clone(),
                    peer: peer.to_string(),
                    replaced: replaced.clone(),
                },
            );
        }
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
        Ok(Connection {
            registry: self.clone(),
            agent_id: hello.agent_id.clone(),
            conn_id,
            replaced,
        })
    }

    /// Counts a refused stream in the agent's record; the writer persists it
    /// with the agent's next commit.
    fn note_refusal(&self, agent_id: &str, msg: &str) {
        let mut records = self.records.write().unwrap_or_else(|p| p.into_inner());
        if let Some(rec) = records.get_mut(agent_id) {
            rec.refused_streams += 1;
            rec.last_refusal = msg.to_string();
        }
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
            // The writer never changes the last control result or the
            // refusal count; streams do, possibly after the writer read the
            // record, so the registry's own values are the current ones.
            let mut rec = rec;
            if let Some(now) = records.get(&id) {
                rec.last_control = now.last_control.clone();
                rec.refused_streams = now.refused_streams;
                rec.last_refusal = now.last_refusal.clone();
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

    /// True while the agent has a live Publish stream here.
    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(agent_id)
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
            // The bus's own writers (the detector) are not agents.
            .filter(|r| {
                !r.agent_id
                    .starts_with(amoskys_detect::RESERVED_AGENT_PREFIX)
            })
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
        let r = Arc::new(Registry::default());
        let hello = Hello {
            agent_id: "a".into(),
            ..Default::default()
        };
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let c1 = r.connect(&hello, "p1", tx1, 1).unwrap();
        let c2 = r.connect(&hello, "p2", tx2, 2).unwrap();
        assert!(
            c1.replaced.is_cancelled(),
            "the older stream is told to end"
        );
        assert!(!c2.replaced.is_cancelled());
        drop(c1);
        assert_eq!(r.connected_count(), 1, "the newer stream is still live");
        assert!(r.list()[0].connected);
        drop(c2);
        assert_eq!(r.connected_count(), 0);
        assert!(!r.list()[0].connected);
        assert_eq!(r.list()[0].first_seen, 1);
    }

    #[test]
    fn a_second_incarnation_is_refused_while_the_first_is_live() {
        let r = Arc::new(Registry::default());
        let first = Hello {
            agent_id: "a".into(),
            node: "host-1".into(),
            incarnation: 0x11,
            ..Default::default()
        };
        let clone = Hello {
            node: "host-2".into(),
            incarnation: 0x22,
            ..first.clone()
        };
        let (tx1, _rx1) = mpsc::channel(1);
        let (tx2, _rx2) = mpsc::channel(1);
        let (tx3, _rx3) = mpsc::channel(1);
        let c1 = r.connect(&first, "10.0.0.1:5000", tx1, 1).unwrap();
        let Err(msg) = r.connect(&clone, "10.0.0.2:6000", tx2, 2) else {
            panic!("the clone must be refused");
        };
        for part in [
            "\"a\"",
            "0000000000000011",
            "host-1",
            "10.0.0.1:5000",
            "0000000000000022",
            "host-2",
            "10.0.0.2:6000",
        ] {
            assert!(msg.contains(part), "{msg} should name {part}");
        }
        assert!(!c1.replaced.is_cancelled(), "the live stream keeps going");
        let rec = &r.list()[0];
        assert_eq!(
            (rec.refused_streams, rec.last_refusal.as_str()),
            (1, msg.as_str())
        );
        assert_eq!(rec.node, "host-1");
        drop(c1);
        // Alone now, the other incarnation gets in.
        r.connect(&clone, "10.0.0.2:6000", tx3, 3).unwrap();
    }
}
