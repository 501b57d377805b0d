//! The sender: moves events from the spool to the bus over one Publish
//! stream at a time, and removes them from the spool only when the bus acks
//! them. After any reconnect it resends everything still unacked; the bus
//! drops what it already holds, so delivery is at-least-once and storage
//! exactly-once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use amoskys_client::{BusClient, ClientError, ClientOptions};
use amoskys_proto::publish_request::Msg as InMsg;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{ControlResult, Hello, PublishRequest};
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::collectors::context::Registry;
use crate::metrics::{AgentMetrics, reason};
use crate::spool::{Spool, SpoolError};

/// How the sender talks to the bus.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// The bus and the TLS files.
    pub client: ClientOptions,
    /// What each session opens with (agent id, incarnation, node).
    pub hello: Hello,
    /// Events per batch at most.
    pub max_events: usize,
    /// Encoded bytes per batch at most (under the bus's message limit).
    pub max_bytes: usize,
    /// How long a partial batch waits for more.
    pub max_delay: Duration,
    /// Batches in flight, sent and not yet acked.
    pub window: usize,
    /// The first reconnect delay.
    pub backoff_min: Duration,
    /// The longest reconnect delay.
    pub backoff_max: Duration,
}

/// Counters the heartbeat and metrics read.
#[derive(Default)]
pub struct SendCounters {
    /// Events sent, resends included.
    pub sent: AtomicU64,
    /// Events the bus acked as durable.
    pub acked: AtomicU64,
    /// Sessions the bus welcomed.
    pub sessions: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

enum SessionEnd {
    /// Draining and the spool is empty: every event is acked.
    Drained,
    /// Stopped from outside.
    Stopped,
    /// The TLS files changed: reconnect with the new ones.
    Reconnect,
}

/// Streams the spool to the bus and drops what it acks; one session at a
/// time, reconnecting with backoff.
pub struct Sender {
    /// How it talks to the bus.
    pub cfg: SenderConfig,
    /// What it sends from.
    pub spool: Arc<Spool>,
    /// The collectors, for the controls the bus sends.
    pub collectors: Arc<Registry>,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
    /// Its counters, shared with the heartbeat.
    pub counters: Arc<SendCounters>,
    /// Notified when the TLS files changed.
    pub tls_changed: Arc<Notify>,
    /// Asks for a heartbeat now, so a control's effect (a paused collector)
    /// shows at the bus without waiting for the next interval.
    pub heartbeat_now: Arc<Notify>,
}

/// Exponential backoff with jitter: half fixed, half random, so a fleet that
/// lost the bus at once does not come back at once.
pub fn backoff(attempt: u32, min: Duration, max: Duration) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(16)).min(max);
    let half = exp / 2;
    half + Duration::from_secs_f64(rand::rng().random_range(0.0..=half.as_secs_f64()))
}

impl Sender {
    /// Runs until `stop`, or until `draining` is set and the spool is empty.
    pub async fn run(self, draining: CancellationToken, stop: CancellationToken) {
        let mut attempt = 0u32;
        loop {
            if stop.is_cancelled() {
                return;
            }
            match self.session(&draining, &stop).await {
                Ok(SessionEnd::Drained) => {
                    info!("spool drained: every event is acked by the bus");
                    return;
                }
                Ok(SessionEnd::Stopped) => return,
                Ok(SessionEnd::Reconnect) => {
                    attempt = 0;
                    continue;
                }
                Err((e, was_connected)) => {
                    self.metrics.connected.set(0);
                    let why = match &e {
                        SessionError::Client(ClientError::Connect { .. }) => "connect",
                        // Another agent with this agent id holds the stream.
                        SessionError::Client(ClientError::Rpc(s))
                            if s.code() == tonic::Code::AlreadyExists =>
                        {
                            "refused"
                        }
                        SessionError::Client(ClientError::Rpc(_)) => "rpc",
                        SessionError::Client(ClientError::Read { .. }) => "tls_files",
                        SessionError::Client(_) => "stream",
                        SessionError::Spool(_) => "spool",
                    };
                    self.metrics
                        .connect_errors
                        .get_or_create(&reason(why))
                        .inc();
                    if was_connected {
                        attempt = 0;
                    }
                    let wait = backoff(attempt, self.cfg.backoff_min, self.cfg.backoff_max);
                    attempt = attempt.saturating_add(1);
                    warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "bus connection failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.tls_changed.notified() => {}
                    }
                }
            }
        }
    }

    fn ack(&self, seq: u64) -> Result<(), SpoolError> {
        let n = self.spool.ack(seq)?;
        self.counters.acked.fetch_add(n, Ordering::Relaxed);
        self.metrics.acked.inc_by(n);
        Ok(())
    }

    async fn session(
        &self,
        draining: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<SessionEnd, (SessionError, bool)> {
        let mut client = BusClient::connect(&self.cfg.client)
            .await
            .map_err(|e| (e.into(), false))?;
        let spooled = self.spool.stats();
        let hello = Hello {
            incarnation: self.spool.incarnation(),
            acked_seq: spooled.acked_seq,
            ..self.cfg.hello.clone()
        };
        let mut publisher = client
            .publisher(hello, self.cfg.window + 4)
            .await
            .map_err(|e| (e.into(), false))?;
        if publisher.welcome_acked_seq >= spooled.next_seq {
            // Cannot happen while incarnations are unique; if it does, the
            // bus's claim would delete events it never received, so say so.
            warn!(
                bus_held_seq = publisher.welcome_acked_seq,
                spool_next_seq = spooled.next_seq,
                incarnation = format!("{:016x}", self.spool.incarnation()),
                "the bus claims seqs this spool never produced"
            );
        }
        let n = self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        if n > 0 {
            self.metrics.reconnects.inc();
        }
        self.metrics.connected.set(1);
        let fail = |e: SessionError| (e, true);
        self.ack(publisher.welcome_acked_seq)
            .map_err(|e| fail(e.into()))?;
        if self.spool.flush_gap().map_err(|e| fail(e.into()))? {
            info!("reporting events dropped while the bus was unreachable as a gap event");
        }
        let tx = publisher.sender();
        let mut cursor = self.spool.stats().first_seq;
        info!(bus = %self.cfg.client.url, resume_from_seq = cursor, bus_held_seq = publisher.welcome_acked_seq, "connected to the bus");
        // (last seq of the batch) for each batch sent and not yet acked.
        let mut inflight: VecDeque<u64> = VecDeque::new();
        loop {
            if draining.is_cancelled() && self.spool.stats().events == 0 {
                self.metrics.connected.set(0);
                return Ok(SessionEnd::Drained);
            }
            let can_send = inflight.len() < self.cfg.window;
            tokio::select! {
                biased;
                _ = stop.cancelled() => {
                    self.metrics.connected.set(0);
                    return Ok(SessionEnd::Stopped);
                }
                _ = self.tls_changed.notified() => {
                    info!("TLS files changed: reconnecting with the new certificate");
                    self.metrics.connected.set(0);
                    return Ok(SessionEnd::Reconnect);
                }
                msg = publisher.next() => match msg.map_err(|e| fail(e.into()))? {
                    Some(OutMsg::Ack(a)) => {
                        while inflight.front().is_some_and(|&last| last <= a.acked_seq) {
                            inflight.pop_front();
                        }
                        self.ack(a.acked_seq).map_err(|e| fail(e.into()))?;
                    }
                    Some(OutMsg::Control(c)) => {
                        let r = self.collectors.apply(&c);
                        self.heartbeat_now.notify_one();
                        info!(control_id = c.control_id, collector = %c.collector, result = ?r, "control from the bus");
                        let (ok, message) = match r { Ok(m) => (true, m), Err(m) => (false, m) };
                        let _ = tx.send(PublishRequest { msg: Some(InMsg::ControlResult(ControlResult {
                            control_id: c.control_id, ok, message,
                        }))}).await;
                    }
                    Some(OutMsg::Welcome(_)) => debug!("unexpected second welcome"),
                    None => return Err(fail(ClientError::Closed("by the bus".into()).into())),
                },
                _ = draining.cancelled(), if !draining.is_cancelled() => {}
                _ = ready(&self.spool, cursor, inflight.is_empty(), self.cfg.max_events, self.cfg.max_delay), if can_send => {
                    // Drops while connected (a burst that outran the bus)
                    // are reported now, not at the next reconnect.
                    if self.spool.pending_gap().dropped > 0 {
                        self.spool.flush_gap().map_err(|e| fail(e.into()))?;
                    }
                    let events = self.spool
                        .read(cursor, self.cfg.max_events, self.cfg.max_bytes)
                        .map_err(|e| fail(e.into()))?;
                    let Some(last) = events.last().map(|e| e.seq) else {
                        // Acked or dropped under us: start after what is held.
                        cursor = cursor.max(self.spool.stats().first_seq);
                        continue;
                    };
                    let n = events.len() as u64;
                    cursor = last + 1;
                    inflight.push_back(last);
                    self.counters.sent.fetch_add(n, Ordering::Relaxed);
                    self.metrics.sent.inc_by(n);
                    publisher.send(events).await.map_err(|e| fail(e.into()))?;
                }
            }
        }
    }
}

/// Resolves when there is something worth sending from `cursor`: a full
/// batch, or anything at all when nothing is in flight, or anything once
/// `max_delay` has passed.
async fn ready(spool: &Spool, cursor: u64, idle: bool, max_events: usize, max_delay: Duration) {
    loop {
        let st = spool.stats();
        let avail = st.next_seq.saturating_sub(cursor.max(st.first_seq));
        if avail as usize >= max_events || (avail > 0 && idle) {
            return;
        }
        if avail > 0 {
            tokio::time::sleep(max_delay).await;
            return;
        }
        spool.appended.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_capped() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(5);
        for a in 0..20 {
            let d = backoff(a, min, max);
            let cap = min.saturating_mul(1 << a.min(16)).min(max);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {a}: {d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
        let samples: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(5, min, max).as_micros()).collect();
        assert!(samples.len() > 1, "no jitter");
    }
}
