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
    /// A redirect that cannot be followed: a loop, no address, a stale epoch.
    #[error("{0}")]
    Route(String),
}

enum SessionEnd {
    /// Draining and the spool is empty: every event is acked.
    Drained,
    /// Stopped from outside.
    Stopped,
    /// The TLS files changed: reconnect with the new ones.
    Reconnect,
    /// A shard sent the agent to its owner: connect there now.
    Redirected,
}

/// Redirects followed in a row without a Welcome before it is a loop.
const MAX_REDIRECT_HOPS: u32 = 4;
/// Failed connections in a row to a remembered owner before the agent asks
/// the bootstrap address again (the map may have changed while it was down).
const OWNER_RETRIES: u32 = 5;
/// The longest wait after a shard said it is handing the agent over: that
/// clears within a map reload, so the usual backoff would only delay it.
const HANDOVER_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Which shard the agent publishes to. It starts at the bootstrap address
/// (the bus's client Service) and, once redirected, stays with its owner:
/// while the owner is down the agent spools and retries it, and never
/// publishes to another shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routing {
    /// The owner's address once a shard named it.
    pub owner: Option<String>,
    /// The newest shard map epoch the agent was routed under.
    pub epoch: u64,
    /// Redirects since the last Welcome.
    pub hops: u32,
    /// Failed connections to the owner since the last Welcome.
    pub failures: u32,
}

impl Routing {
    /// Where to connect: the owner, or the bootstrap address.
    pub fn url<'a>(&'a self, bootstrap: &'a str) -> &'a str {
        self.owner.as_deref().unwrap_or(bootstrap)
    }

    /// Follows a redirect, or says why it cannot be followed.
    pub fn follow(&mut self, r: &amoskys_proto::Redirect) -> Result<(), String> {
        if r.url.is_empty() {
            return Err(format!(
                "shard {} redirected to shard {} without an address",
                r.from_shard, r.shard
            ));
        }
        if r.shard_epoch < self.epoch {
            return Err(format!(
                "shard {} redirected to shard {} under shard map epoch {}, older than epoch {} this agent was routed under",
                r.from_shard, r.shard, r.shard_epoch, self.epoch
            ));
        }
        self.hops += 1;
        if self.hops > MAX_REDIRECT_HOPS {
            let hops = self.hops;
            self.reset();
            return Err(format!(
                "redirect loop: {hops} redirects without a Welcome, the last from shard {} to shard {} at {:?} (epoch {}); asking the bootstrap address again",
                r.from_shard, r.shard, r.url, r.shard_epoch
            ));
        }
        self.epoch = r.shard_epoch;
        self.owner = Some(r.url.clone());
        Ok(())
    }

    /// A shard welcomed the agent.
    pub fn welcomed(&mut self, shard_epoch: u64) {
        self.hops = 0;
        self.failures = 0;
        self.epoch = self.epoch.max(shard_epoch);
    }

    /// The owner could not be reached; after [`OWNER_RETRIES`] in a row the
    /// bootstrap address routes the agent afresh.
    pub fn unreachable(&mut self) {
        if self.owner.is_none() {
            return;
        }
        self.failures += 1;
        if self.failures >= OWNER_RETRIES {
            self.reset();
        }
    }

    fn reset(&mut self) {
        // The epoch stays: a shard on an older map must still not take us.
        self.owner = None;
        self.hops = 0;
        self.failures = 0;
    }
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
        let mut routing = Routing::default();
        loop {
            if stop.is_cancelled() {
                return;
            }
            match self.session(&mut routing, &draining, &stop).await {
                Ok(SessionEnd::Drained) => {
                    info!("spool drained: every event is acked by the bus");
                    return;
                }
                Ok(SessionEnd::Stopped) => return,
                Ok(SessionEnd::Reconnect) => {
                    attempt = 0;
                    continue;
                }
                Ok(SessionEnd::Redirected) => {
                    self.metrics.redirects.inc();
                    continue;
                }
                Err((e, was_connected)) => {
                    self.metrics.connected.set(0);
                    let mut max = self.cfg.backoff_max;
                    let why = match &e {
                        SessionError::Client(ClientError::Connect { .. }) => {
                            routing.unreachable();
                            "connect"
                        }
                        SessionError::Client(ClientError::Rpc(s))
                            if s.code() == tonic::Code::Unavailable && !was_connected =>
                        {
                            max = max.min(HANDOVER_BACKOFF_MAX);
                            "unavailable"
                        }
                        SessionError::Route(_) => "redirect",
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
                    let wait = backoff(attempt, self.cfg.backoff_min, max);
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
        routing: &mut Routing,
        draining: &CancellationToken,
        stop: &CancellationToken,
    ) -> Result<SessionEnd, (SessionError, bool)> {
        let url = routing.url(&self.cfg.client.url).to_string();
        let opts = ClientOptions {
            url: url.clone(),
            ..self.cfg.client.clone()
        };
        let mut client = BusClient::connect(&opts)
            .await
            .map_err(|e| (e.into(), false))?;
        let spooled = self.spool.stats();
        let hello = Hello {
            incarnation: self.spool.incarnation(),
            acked_seq: spooled.acked_seq,
            shard_epoch: routing.epoch,
            ..self.cfg.hello.clone()
        };
        let mut publisher = match client.publisher(hello, self.cfg.window + 4).await {
            Ok(p) => p,
            Err(ClientError::Redirected(r)) => {
                return match routing.follow(&r) {
                    Ok(()) => {
                        debug!(from_shard = r.from_shard, to_shard = r.shard, url = %r.url, epoch = r.shard_epoch, "redirected to the owner shard");
                        Ok(SessionEnd::Redirected)
                    }
                    Err(m) => Err((SessionError::Route(m), false)),
                };
            }
            Err(e) => return Err((e.into(), false)),
        };
        routing.welcomed(publisher.welcome.shard_epoch);
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
        info!(bus = %url, shard = publisher.welcome.shard, shard_epoch = publisher.welcome.shard_epoch, resume_from_seq = cursor, bus_held_seq = publisher.welcome_acked_seq, "connected to the bus");
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
                    Some(OutMsg::Redirect(r)) => {
                        // The shard acked every batch it took before this;
                        // the rest is resent to the new owner.
                        self.metrics.connected.set(0);
                        info!(to_shard = r.shard, url = %r.url, epoch = r.shard_epoch, "this agent moved to another shard");
                        return match routing.follow(&r) {
                            Ok(()) => Ok(SessionEnd::Redirected),
                            Err(m) => Err(fail(SessionError::Route(m))),
                        };
                    }
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

    fn redirect(from: u32, to: u32, epoch: u64) -> amoskys_proto::Redirect {
        amoskys_proto::Redirect {
            shard: to,
            url: format!("https://s{to}:7443"),
            shard_epoch: epoch,
            from_shard: from,
        }
    }

    #[test]
    fn routing_follows_redirects_and_names_loops_and_stale_epochs() {
        let mut r = Routing::default();
        assert_eq!(r.url("https://boot:7443"), "https://boot:7443");
        r.follow(&redirect(0, 2, 3)).unwrap();
        assert_eq!(r.url("https://boot:7443"), "https://s2:7443");
        r.welcomed(3);
        assert_eq!((r.hops, r.epoch), (0, 3));

        let stale = r.follow(&redirect(2, 1, 2)).unwrap_err();
        assert!(
            stale.contains("epoch 2") && stale.contains("epoch 3"),
            "{stale}"
        );
        let mut no_url = redirect(2, 1, 3);
        no_url.url.clear();
        assert!(
            r.follow(&no_url)
                .unwrap_err()
                .contains("without an address")
        );

        for i in 0..MAX_REDIRECT_HOPS {
            r.follow(&redirect(i % 2, (i + 1) % 2, 3)).unwrap();
        }
        let looped = r.follow(&redirect(0, 1, 3)).unwrap_err();
        assert!(looped.contains("redirect loop"), "{looped}");
        assert_eq!(r.url("https://boot:7443"), "https://boot:7443");
        assert_eq!(r.epoch, 3, "the epoch survives a reset");

        // An owner that stays down: the bootstrap address routes afresh.
        r.follow(&redirect(0, 1, 3)).unwrap();
        for _ in 0..OWNER_RETRIES - 1 {
            r.unreachable();
            assert_eq!(r.url("b"), "https://s1:7443");
        }
        r.unreachable();
        assert_eq!(r.url("b"), "b");
    }

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
