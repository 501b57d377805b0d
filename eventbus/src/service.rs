//! The gRPC services: `EventBus` (Publish, Query, Tail) and `Admin`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use amoskys_client::shard::ShardMap;
use amoskys_proto::admin_server::Admin;
use amoskys_proto::event_bus_server::EventBus;
use amoskys_proto::publish_request::Msg as InMsg;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{
    Ack, BackupRequest, BackupResponse, Batch, ControlRequest, ControlResponse, EncodedEvents,
    Event, ExportStatus, Hello, ListAgentsRequest, ListAgentsResponse, PublishRequest,
    PublishResponse, QueryRequest, QueryResponse, Redirect, Severity, ShardAgentRequest,
    ShardAgentResponse, StatsRequest, StatsResponse, TailRequest, Welcome, control,
};
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::auth::{Permission, authorize, remote_of};
use crate::config::BusConfig;
use crate::filter::EventFilter;
use crate::metrics::{BusMetrics, reason};
use crate::registry::Registry;
use crate::registry::incarnation_hex;
use crate::shard::Shards;
use crate::store::{QuerySpec, Store, StoreError};
use crate::writer::{
    HeldElsewhere, SessionRequest, TailSender, WriteOutcome, WriteRequest, WriterMsg, now_ns,
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Batches one Publish stream may have waiting for acks before the bus stops
/// reading from it (and HTTP/2 flow control pushes back on the agent).
const MAX_PENDING_BATCHES: usize = 64;
const DEFAULT_QUERY_LIMIT: u32 = 1000;
pub(crate) const QUERY_CHUNK: usize = 512;
/// Events a query reads from the store at a time.
const QUERY_READ: usize = 8 * QUERY_CHUNK;
const TAIL_CHUNK: usize = 1024;

/// Everything the services share.
pub struct BusState {
    pub cfg: BusConfig,
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<BusMetrics>,
    pub writer: mpsc::Sender<WriterMsg>,
    pub tail: TailSender,
    pub writable: Arc<AtomicBool>,
    pub stop: CancellationToken,
    pub next_control_id: AtomicU64,
    pub alerts: Arc<crate::alerts::RecentAlerts>,
    pub tls: Arc<crate::tls::ReloadingTls>,
    /// Set when a backup directory is configured; one backup at a time.
    pub backups: Option<Arc<tokio::sync::Mutex<crate::backup::Backups>>>,
    /// The shard map this bus routes by and its peers.
    pub shards: Arc<Shards>,
    /// Why the export's last session ended (reason, message); None while it
    /// runs or when there is no export.
    pub export_error: std::sync::Mutex<Option<(String, String)>>,
    /// Each detection rule as last loaded (empty without detection).
    pub rule_statuses: std::sync::Mutex<Vec<amoskys_detect::RuleStatus>>,
    /// The rule set the operator handed over with Admin.SetRules: its
    /// text and digest.
    pub pushed_rules: std::sync::Mutex<Option<(String, String)>>,
    /// Digest of the rule set the detector runs (empty without detection).
    pub rules_digest: std::sync::Mutex<String>,
    /// What each rule matched, by rule name, for Stats.
    pub rule_activity:
        std::sync::Mutex<std::collections::HashMap<String, amoskys_detect::RuleActivity>>,
    /// Bumped each time the detector's alerts are durable: the alert sinks
    /// wake on it instead of finding them on their next look.
    pub alerts_written: tokio::sync::watch::Sender<u64>,
}

/// Where a Publish stream goes.
enum Route {
    /// This shard owns the agent; what other shards hold of it.
    Here(HeldElsewhere),
    /// Another shard owns it.
    Elsewhere(Redirect),
}

/// The redirect to `owner`, or FAILED_PRECONDITION when the map has no
/// address for it (a map written by hand without peers).
fn redirect(from: u32, map: &ShardMap, owner: u32) -> Result<Redirect, Status> {
    let url = map.url(owner).ok_or_else(|| {
        Status::failed_precondition(format!(
            "Publish: shard {owner} owns this agent, but the shard map (epoch {}) has no address for it",
            map.epoch
        ))
    })?;
    Ok(Redirect {
        shard: owner,
        url: url.to_string(),
        shard_epoch: map.epoch,
        from_shard: from,
    })
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable => Status::unavailable(e.to_string()),
        other => Status::internal(other.to_string()),
    }
}

#[derive(Clone)]
pub struct EventBusService(pub Arc<BusState>);

#[derive(Clone)]
pub struct AdminService(pub Arc<BusState>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Checks a batch against its stream's Hello and fills defaults; the error
/// names the offending event and field.
pub fn validate_batch(hello: &Hello, batch: &mut Batch, max_events: usize) -> Result<(), String> {
    if batch.events.len() > max_events {
        return Err(format!(
            "batch.events: {} events exceed the limit of {max_events} per batch",
            batch.events.len()
        ));
    }
    let mut prev = 0u64;
    for (i, e) in batch.events.iter_mut().enumerate() {
        if e.agent_id.is_empty() {
            e.agent_id = hello.agent_id.clone();
        } else if e.agent_id != hello.agent_id {
            return Err(format!(
                "events[{i}].agent_id: {:?} does not match the stream's agent {:?}",
                e.agent_id, hello.agent_id
            ));
        }
        if e.seq == 0 {
            return Err(format!("events[{i}].seq: must be at least 1"));
        }
        if e.seq <= prev {
            return Err(format!(
                "events[{i}].seq: {} is not greater than the previous event's {prev}",
                e.seq
            ));
        }
        prev = e.seq;
        if e.collector.is_empty() {
            return Err(format!("events[{i}].collector: missing"));
        }
        if e.payload.is_none() {
            return Err(format!("events[{i}].payload: missing"));
        }
        if Severity::try_from(e.severity).is_err() {
            return Err(format!(
                "events[{i}].severity: {} is not a known severity",
                e.severity
            ));
        }
        if e.node.is_empty() {
            e.node = hello.node.clone();
        }
        if e.incarnation == 0 {
            e.incarnation = hello.incarnation;
        } else if e.incarnation != hello.incarnation {
            return Err(format!(
                "events[{i}].incarnation: {} does not match the stream's incarnation {}",
                incarnation_hex(e.incarnation),
                incarnation_hex(hello.incarnation)
            ));
        }
        e.offset = 0;
        e.stored_at = 0;
        e.shard = 0;
    }
    Ok(())
}

pub(crate) fn validate_hello(h: &Hello) -> Result<(), Status> {
    if h.agent_id.is_empty() {
        return Err(Status::invalid_argument("hello.agent_id: missing"));
    }
    if h.agent_id.len() > 253 || h.agent_id.chars().any(|c| c.is_control()) {
        return Err(Status::invalid_argument(
            "hello.agent_id: at most 253 printable characters",
        ));
    }
    if h.agent_id
        .starts_with(amoskys_detect::RESERVED_AGENT_PREFIX)
    {
        return Err(Status::invalid_argument(format!(
            "hello.agent_id: {:?}: ids starting with {:?} are the bus's own",
            h.agent_id,
            amoskys_detect::RESERVED_AGENT_PREFIX
        )));
    }
    Ok(())
}

impl BusState {
    /// Takes a backup of the store now. Backups run one at a time: a second
    /// caller waits for the first to finish, then takes its own. `by` is
    /// logged with the outcome.
    pub async fn backup(&self, by: &str) -> Result<BackupResponse, Status> {
        let Some(backups) = &self.backups else {
            return Err(Status::failed_precondition(
                "this bus has no backup directory (config key backup.dir or flag --backup-dir)",
            ));
        };
        let keep = self.cfg.backup.as_ref().map_or(1, |b| b.keep);
        let mut guard = backups.clone().lock_owned().await;
        let store = self.store.clone();
        let t0 = Instant::now();
        let done = tokio::task::spawn_blocking(move || {
            let made = guard.create(&store, keep)?;
            Ok::<_, crate::backup::BackupError>((
                made,
                guard.list().len(),
                guard.dir().display().to_string(),
            ))
        })
        .await
        .map_err(|e| Status::internal(format!("backup task: {e}")))?;
        let m = &self.metrics;
        match done {
            Ok((b, kept, dir)) => {
                let took = t0.elapsed();
                m.backups.inc();
                m.backup_seconds.observe(took.as_secs_f64());
                m.backup_last_success.set(b.created_at);
                m.backup_bytes.set(b.size_bytes as i64);
                info!(
                    by,
                    backup_id = b.id,
                    size_bytes = b.size_bytes,
                    files = b.files,
                    kept,
                    took_ms = took.as_millis() as u64,
                    "backup taken"
                );
                Ok(BackupResponse {
                    backup_id: b.id,
                    created_at: b.created_at,
                    size_bytes: b.size_bytes,
                    files: b.files,
                    backups_kept: kept as u32,
                    dir,
                })
            }
            Err(e) => {
                m.backup_errors.inc();
                warn!(by, error = %e, "backup failed");
                Err(match e {
                    crate::backup::BackupError::Store(StoreError::Unavailable) => {
                        Status::unavailable(e.to_string())
                    }
                    _ => Status::internal(e.to_string()),
                })
            }
        }
    }

    /// Decides whether this shard takes the agent's stream. A shard on an
    /// older map than the agent was routed under, or an owner whose agent
    /// still streams to its previous owner, answers UNAVAILABLE (the agent
    /// retries the same owner): routing on stale data could store events on
    /// two shards.
    async fn route(&self, hello: &Hello) -> Result<Route, Status> {
        let shards = &self.shards;
        let map = shards.map();
        if hello.shard_epoch > map.epoch {
            return Err(Status::unavailable(format!(
                "Publish: shard {} routes by shard map epoch {}, older than epoch {} that agent {:?} was sent here under; retry once this shard has the newer map",
                shards.index, map.epoch, hello.shard_epoch, hello.agent_id
            )));
        }
        let owner = map.owner(&hello.agent_id);
        if owner != shards.index {
            return redirect(shards.index, &map, owner).map(Route::Elsewhere);
        }
        if map.shards() <= 1 {
            return Ok(Route::Here(HeldElsewhere::default()));
        }
        let e = shards
            .elsewhere(&map, &hello.agent_id, hello.incarnation)
            .await;
        if let Some(s) = e.connected_on {
            return Err(Status::unavailable(format!(
                "Publish: agent {:?} still streams to shard {s}, which hands it over once it has shard map epoch {}; retry",
                hello.agent_id, map.epoch
            )));
        }
        if !e.unreachable.is_empty() {
            warn!(agent = %hello.agent_id, unreachable = ?e.unreachable, "taking an agent while peer shards cannot say what they hold of it");
        }
        Ok(Route::Here(HeldElsewhere {
            last_seq: e.last_seq,
            complete: e.unreachable.is_empty(),
        }))
    }

    /// Serves one Publish stream after its Hello until the agent closes it,
    /// it sends something invalid, the agent moves to another shard, or the
    /// bus stops. Returns the stream's last message (an error, or the
    /// redirect of an agent that moved), sent once the stream no longer
    /// counts as live here.
    async fn publish_session(
        self: Arc<Self>,
        hello: Hello,
        mut inbound: Streaming<PublishRequest>,
        out: &mpsc::Sender<Result<PublishResponse, Status>>,
        mut control_rx: mpsc::Receiver<amoskys_proto::Control>,
        replaced: CancellationToken,
    ) -> Option<Result<PublishResponse, Status>> {
        let metrics = &self.metrics;
        let mut pending: FuturesOrdered<_> = FuturesOrdered::new();
        let mut ending: Option<Status> = None;
        let mut moved: Option<Redirect> = None;
        let mut reading = true;
        let mut map_rx = self.shards.subscribe();
        map_rx.mark_unchanged();
        let mut map_open = true;
        loop {
            if !reading && pending.is_empty() {
                break;
            }
            tokio::select! {
                biased;
                Some((res, received)) = pending.next(), if !pending.is_empty() => {
                    let res: Result<WriteOutcome, oneshot::error::RecvError> = res;
                    let received: Instant = received;
                    let Ok(o) = res else {
                        // The writer is gone (bus stopping): nothing more is acked.
                        break;
                    };
                    let ack = PublishResponse { msg: Some(OutMsg::Ack(Ack { acked_seq: o.acked_seq, duplicates: o.duplicates as u64 })) };
                    if out.send(Ok(ack)).await.is_err() {
                        break;
                    }
                    metrics.ack_latency_seconds.observe(received.elapsed().as_secs_f64());
                }
                _ = self.stop.cancelled(), if reading => {
                    reading = false;
                }
                changed = map_rx.changed(), if reading && map_open => {
                    if changed.is_err() {
                        map_open = false;
                        continue;
                    }
                    let map = map_rx.borrow_and_update().clone();
                    let owner = map.owner(&hello.agent_id);
                    if owner != self.shards.index {
                        // Take nothing more, ack what was taken, then send
                        // the agent to its new owner.
                        reading = false;
                        metrics.shard_moved_out.inc();
                        info!(agent = %hello.agent_id, to_shard = owner, epoch = map.epoch, "agent moves to another shard");
                        match redirect(self.shards.index, &map, owner) {
                            Ok(r) => moved = Some(r),
                            Err(status) => ending = Some(status),
                        }
                    }
                }
                _ = replaced.cancelled(), if reading => {
                    // A restarted agent connected again before this stream
                    // timed out: one live stream per agent id.
                    ending = Some(Status::aborted(format!(
                        "Publish: replaced by a newer stream of agent {:?} (same incarnation)",
                        hello.agent_id
                    )));
                    reading = false;
                }
                Some(c) = control_rx.recv(), if reading => {
                    let msg = PublishResponse { msg: Some(OutMsg::Control(c)) };
                    if out.send(Ok(msg)).await.is_err() {
                        break;
                    }
                }
                msg = inbound.message(), if reading && pending.len() < MAX_PENDING_BATCHES => {
                    match msg {
                        Ok(Some(PublishRequest { msg: Some(InMsg::Batch(mut batch)) })) => {
                            metrics.events_received.inc_by(batch.events.len() as u64);
                            metrics.batch_events.observe(batch.events.len() as f64);
                            if let Err(m) = validate_batch(&hello, &mut batch, self.cfg.max_group_events) {
                                metrics.rejected.get_or_create(&reason("invalid_batch")).inc();
                                warn!(agent = %hello.agent_id, error = %m, "rejecting malformed batch");
                                ending = Some(Status::invalid_argument(format!("Publish: {m}")));
                                reading = false;
                                continue;
                            }
                            let (tx, rx) = oneshot::channel();
                            let received = Instant::now();
                            let req = WriteRequest { agent_id: hello.agent_id.clone(), incarnation: hello.incarnation, events: batch.events, reply: tx };
                            if self.writer.send(WriterMsg::Write(req)).await.is_err() {
                                ending = Some(Status::unavailable("Publish: the bus is shutting down"));
                                reading = false;
                                continue;
                            }
                            pending.push_back(async move { (rx.await, received) });
                        }
                        Ok(Some(PublishRequest { msg: Some(InMsg::ControlResult(r)) })) => {
                            info!(agent = %hello.agent_id, control_id = r.control_id, ok = r.ok, message = %r.message, "agent answered control");
                            self.registry.set_control_result(&hello.agent_id, r);
                        }
                        Ok(Some(PublishRequest { msg: Some(InMsg::Hello(_)) })) => {
                            metrics.rejected.get_or_create(&reason("invalid_batch")).inc();
                            ending = Some(Status::invalid_argument("Publish: a second Hello on one stream"));
                            reading = false;
                        }
                        Ok(Some(PublishRequest { msg: None })) => {
                            metrics.rejected.get_or_create(&reason("invalid_batch")).inc();
                            ending = Some(Status::invalid_argument("Publish: empty message (no hello, batch or control_result)"));
                            reading = false;
                        }
                        Ok(None) => reading = false,
                        Err(status) => {
                            let why = match status.code() {
                                Code::OutOfRange | Code::ResourceExhausted => "too_large",
                                Code::Internal | Code::InvalidArgument => "malformed",
                                _ => "stream_error",
                            };
                            metrics.rejected.get_or_create(&reason(why)).inc();
                            debug!(agent = %hello.agent_id, %status, "publish stream ended with an error");
                            if why == "too_large" {
                                ending = Some(Status::new(status.code(), format!(
                                    "Publish: message larger than the bus's max message size of {} bytes ({})",
                                    self.cfg.max_message_bytes, status.message())));
                            } else if why == "malformed" {
                                ending = Some(Status::invalid_argument(format!("Publish: undecodable message: {}", status.message())));
                            }
                            reading = false;
                        }
                    }
                }
            }
        }
        if let Some(status) = ending {
            return Some(Err(status));
        }
        moved.map(|r| {
            Ok(PublishResponse {
                msg: Some(OutMsg::Redirect(r)),
            })
        })
    }

    fn query_spec(&self, q: &QueryRequest) -> Result<QuerySpec, Status> {
        let limit = match q.limit {
            0 => DEFAULT_QUERY_LIMIT.min(self.cfg.max_query_limit),
            n if n > self.cfg.max_query_limit => {
                return Err(Status::invalid_argument(format!(
                    "limit: {n} exceeds the maximum of {}",
                    self.cfg.max_query_limit
                )));
            }
            n => n,
        };
        if q.to_offset != 0 && q.from_offset > q.to_offset {
            return Err(Status::invalid_argument(format!(
                "from_offset: {} is after to_offset {}",
                q.from_offset, q.to_offset
            )));
        }
        if q.from_time < 0 || q.to_time < 0 {
            return Err(Status::invalid_argument(
                "from_time/to_time: must not be negative",
            ));
        }
        if q.to_time != 0 && q.from_time > q.to_time {
            return Err(Status::invalid_argument(format!(
                "from_time: {} is after to_time {}",
                q.from_time, q.to_time
            )));
        }
        let filter = EventFilter::from_wire(q.filter.as_ref()).map_err(Status::invalid_argument)?;
        Ok(QuerySpec {
            from_offset: q.from_offset,
            to_offset: q.to_offset,
            from_time: q.from_time,
            to_time: q.to_time,
            filter,
            limit: limit as usize,
        })
    }
}

#[tonic::async_trait]
impl EventBus for EventBusService {
    type PublishStream = BoxStream<PublishResponse>;
    type QueryStream = BoxStream<QueryResponse>;
    type TailStream = BoxStream<QueryResponse>;

    async fn publish(
        &self,
        req: Request<Streaming<PublishRequest>>,
    ) -> Result<Response<Self::PublishStream>, Status> {
        let peer = authorize(&req, Permission::Publish, "Publish")?;
        let from = match remote_of(&req) {
            Some(addr) => format!("{addr}, cert {}", peer.common_name),
            None => format!("cert {}", peer.common_name),
        };
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(PublishRequest {
                msg: Some(InMsg::Hello(h)),
            }) => h,
            _ => {
                self.0
                    .metrics
                    .rejected
                    .get_or_create(&reason("no_hello"))
                    .inc();
                return Err(Status::invalid_argument(
                    "Publish: the first message must be a Hello",
                ));
            }
        };
        validate_hello(&hello)?;
        let state = self.0.clone();
        let elsewhere = match state.route(&hello).await? {
            Route::Here(e) => e,
            Route::Elsewhere(r) => {
                state.metrics.shard_redirects.inc();
                debug!(agent = %hello.agent_id, to_shard = r.shard, url = %r.url, "redirecting an agent to its owner shard");
                let msg = PublishResponse {
                    msg: Some(OutMsg::Redirect(r)),
                };
                return Ok(Response::new(Box::pin(tokio_stream::once(Ok(msg)))));
            }
        };
        let (out_tx, out_rx) = mpsc::channel(MAX_PENDING_BATCHES + 8);
        let (control_tx, control_rx) = mpsc::channel(16);
        let conn = match state.registry.connect(&hello, &from, control_tx, now_ns()) {
            Ok(c) => c,
            Err(msg) => {
                state.metrics.streams_refused.inc();
                warn!(agent = %hello.agent_id, error = %msg, "refusing a second live stream for one agent id");
                return Err(Status::already_exists(format!("Publish: {msg}")));
            }
        };
        state
            .metrics
            .connected_agents
            .set(state.registry.connected_count() as i64);
        // Which incarnation publishes, and what the bus holds of it, is made
        // durable before the Welcome tells the agent where to resume.
        let (tx, rx) = oneshot::channel();
        let session = WriterMsg::Session(SessionRequest {
            hello: hello.clone(),
            elsewhere,
            reply: tx,
        });
        let shutting_down = || Status::unavailable("Publish: the bus is shutting down");
        state
            .writer
            .send(session)
            .await
            .map_err(|_| shutting_down())?;
        let session = rx.await.map_err(|_| shutting_down())?;
        let inc = incarnation_hex(hello.incarnation);
        if session.new_incarnation {
            info!(agent = %hello.agent_id, incarnation = %inc, node = %hello.node, "agent started a new incarnation (a new or wiped spool)");
        }
        if let Some((first, last)) = session.lost {
            warn!(agent = %hello.agent_id, incarnation = %inc, first, last, "the bus no longer holds seqs the agent saw acked; recorded as a gap event");
        }
        let welcome = PublishResponse {
            msg: Some(OutMsg::Welcome(Welcome {
                acked_seq: session.acked_seq,
                bus_version: VERSION.into(),
                shard: state.shards.index,
                shard_epoch: state.shards.map().epoch,
            })),
        };
        let _ = out_tx.send(Ok(welcome)).await;
        info!(agent = %hello.agent_id, node = %hello.node, incarnation = %inc, peer = %from, "agent connected");
        tokio::spawn(async move {
            let agent = hello.agent_id.clone();
            let replaced = conn.replaced.clone();
            let last = state
                .clone()
                .publish_session(hello, inbound, &out_tx, control_rx, replaced)
                .await;
            // No longer live here before the agent hears where to go, so
            // its new owner finds it gone from this shard.
            drop(conn);
            state
                .metrics
                .connected_agents
                .set(state.registry.connected_count() as i64);
            if let Some(last) = last {
                let _ = out_tx.send(last).await;
            }
            info!(%agent, "agent stream closed");
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    async fn query(
        &self,
        req: Request<QueryRequest>,
    ) -> Result<Response<Self::QueryStream>, Status> {
        authorize(&req, Permission::Read, "Query")?;
        let mut spec = self.0.query_spec(req.get_ref())?;
        let q = req.into_inner();
        if q.newest_first {
            let out = self.0.newest_first_responses(&q, spec).await?;
            return Ok(Response::new(Box::pin(tokio_stream::iter(
                out.into_iter().map(Ok),
            ))));
        }
        if !q.local && self.0.shards.map().shards() > 1 {
            let page = self.0.fan_out_query(q, spec).await?;
            return Ok(Response::new(Box::pin(tokio_stream::iter(
                page.into_iter().map(Ok),
            ))));
        }
        if !q.cursor.is_empty() {
            return Err(Status::invalid_argument(
                "cursor: this bus has one shard; page with from_offset",
            ));
        }
        let store = self.0.store.clone();
        // The first read answers for the query (a store error fails the
        // call); the rest are read on a blocking thread while earlier
        // responses are sent, so a large query holds a few chunks in memory
        // and its reads overlap the network.
        let mut left = spec.limit;
        let (first, spec, left, store) = tokio::task::spawn_blocking(move || {
            let first = next_query_chunk(&store, &mut spec, &mut left);
            (first, spec, left, store)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let first = first.map_err(store_status)?;
        let (tx, rx) = mpsc::channel(QUERY_READ / QUERY_CHUNK * 2);
        let more = first.is_some() && left > 0;
        if let Some(parts) = first {
            send_parts(&tx, parts, |tx, r| tx.try_send(r).is_ok());
        }
        if more {
            let (mut spec, mut left) = (spec, left);
            tokio::task::spawn_blocking(move || {
                loop {
                    match next_query_chunk(&store, &mut spec, &mut left) {
                        Ok(Some(parts)) => {
                            if !send_parts(&tx, parts, |tx, r| tx.blocking_send(r).is_ok()) {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(store_status(e)));
                            return;
                        }
                    }
                }
            });
        }
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn tail(&self, req: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        authorize(&req, Permission::Read, "Tail")?;
        let t = req.into_inner();
        let filter = EventFilter::from_wire(t.filter.as_ref()).map_err(Status::invalid_argument)?;
        if !t.local && self.0.sharded() {
            let rx = self.0.fan_out_tail(t, filter).await?;
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx),
            )));
        }
        if !t.cursor.is_empty() {
            return Err(Status::invalid_argument(
                "cursor: this bus has one shard; resume with from_offset",
            ));
        }
        let start = (!t.from_now).then_some(t.from_offset);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(spawn_tail(self.0.clone(), start, filter)),
        )))
    }
}

/// Follows this shard's store from `from` (None: from now): history first,
/// then live groups, until the receiver is dropped or the bus stops.
pub(crate) fn spawn_tail(
    state: Arc<BusState>,
    from: Option<u64>,
    filter: EventFilter,
) -> mpsc::Receiver<Result<QueryResponse, Status>> {
    // Subscribe before reading history so nothing falls in between.
    let live = state.tail.subscribe();
    let start = match from {
        None => state.store.next_offset(),
        Some(o) => o.max(state.store.first_offset()),
    };
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        state.metrics.tail_subscribers.inc();
        tail_loop(&state, live, start, &filter, &tx).await;
        state.metrics.tail_subscribers.dec();
    });
    rx
}

/// Reads the next part of a query: up to [`QUERY_READ`] of the `left`
/// events it still wants, after what the last part returned, as responses
/// of at most [`QUERY_CHUNK`] events. None once it is done.
fn next_query_chunk(
    store: &Store,
    spec: &mut QuerySpec,
    left: &mut usize,
) -> Result<Option<Vec<EncodedEvents>>, StoreError> {
    if *left == 0 {
        return Ok(None);
    }
    spec.limit = (*left).min(QUERY_READ);
    let read = store.query_encoded(spec, QUERY_CHUNK)?;
    *left = if read.count < spec.limit {
        0
    } else {
        *left - read.count
    };
    Ok(read.last.map(|last| {
        spec.from_offset = last + 1;
        read.parts
    }))
}

/// Sends each part as a response; false once the receiver is gone.
fn send_parts(
    tx: &mpsc::Sender<Result<QueryResponse, Status>>,
    parts: Vec<EncodedEvents>,
    send: impl Fn(&mpsc::Sender<Result<QueryResponse, Status>>, Result<QueryResponse, Status>) -> bool,
) -> bool {
    parts.into_iter().all(|encoded| {
        send(
            tx,
            Ok(QueryResponse {
                encoded,
                ..Default::default()
            }),
        )
    })
}

/// Serves history from the store, then live groups from the writer; falls
/// back to the store whenever the subscriber lags or sees a gap.
async fn tail_loop(
    state: &Arc<BusState>,
    mut live: broadcast::Receiver<Arc<Vec<Event>>>,
    mut cursor: u64,
    filter: &EventFilter,
    tx: &mpsc::Sender<Result<QueryResponse, Status>>,
) {
    let send = |events: Vec<Event>| async move {
        if events.is_empty() {
            return true;
        }
        tx.send(Ok(QueryResponse {
            events,
            ..Default::default()
        }))
        .await
        .is_ok()
    };
    loop {
        // Catch up from the store, TAIL_CHUNK offsets at a time, sending
        // stored events as the store holds them.
        loop {
            let store = state.store.clone();
            let spec = QuerySpec {
                filter: filter.clone(),
                limit: usize::MAX,
                ..Default::default()
            };
            let read = tokio::task::spawn_blocking(move || {
                // Everything below the next offset is durable and readable.
                let upto = store.next_offset();
                let from = cursor.max(store.first_offset());
                let to = upto.min(from.saturating_add(TAIL_CHUNK as u64));
                if from >= to {
                    return Ok((to.max(from), Vec::new(), false));
                }
                let spec = QuerySpec {
                    from_offset: from,
                    to_offset: to - 1,
                    ..spec
                };
                let read = store.query_encoded(&spec, TAIL_CHUNK)?;
                Ok((to, read.parts, to < upto))
            });
            let (next, parts, more) = match read.await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    let _ = tx.send(Err(store_status(e))).await;
                    return;
                }
                Err(_) => return,
            };
            cursor = next;
            for encoded in parts {
                let r = QueryResponse {
                    encoded,
                    ..Default::default()
                };
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
            }
            if !more {
                break;
            }
        }
        // Live.
        loop {
            tokio::select! {
                _ = state.stop.cancelled() => return,
                _ = tx.closed() => return,
                r = live.recv() => match r {
                    Ok(group) => {
                        let Some(first) = group.first() else { continue };
                        if first.offset > cursor {
                            break; // missed a group: read it from the store
                        }
                        let events: Vec<Event> = group
                            .iter()
                            .filter(|e| e.offset >= cursor && filter.matches(e))
                            .cloned()
                            .collect();
                        if let Some(last) = group.last() {
                            cursor = cursor.max(last.offset + 1);
                        }
                        if !send(events).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        state.metrics.tail_lagged.inc();
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_agents(
        &self,
        req: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        authorize(
            &req,
            read_permission(req.get_ref().local),
            "Admin.ListAgents",
        )?;
        self.0.agents(req.into_inner()).await.map(Response::new)
    }

    async fn stats(&self, req: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        authorize(&req, read_permission(req.get_ref().local), "Admin.Stats")?;
        self.0.all_stats(req.into_inner()).await.map(Response::new)
    }

    async fn control(
        &self,
        req: Request<ControlRequest>,
    ) -> Result<Response<ControlResponse>, Status> {
        // A shard forwards a control to the agent's owner as a peer; the
        // admin who asked was authorized where the request arrived.
        let forwarded = !req.get_ref().requested_by.is_empty();
        let needed = if forwarded {
            Permission::Peer
        } else {
            Permission::Admin
        };
        let peer = authorize(&req, needed, "Admin.Control")?;
        let r = req.into_inner();
        let who = if forwarded {
            format!("{} via shard cert:{}", r.requested_by, peer.common_name)
        } else {
            format!("cert:{}", peer.common_name)
        };
        self.0.route_control(r, &who).await.map(Response::new)
    }

    async fn backup(
        &self,
        req: Request<BackupRequest>,
    ) -> Result<Response<BackupResponse>, Status> {
        let peer = authorize(&req, Permission::Admin, "Admin.Backup")?;
        self.0
            .backup(&format!("cert:{}", peer.common_name))
            .await
            .map(Response::new)
    }

    async fn set_rules(
        &self,
        req: Request<amoskys_proto::SetRulesRequest>,
    ) -> Result<Response<amoskys_proto::SetRulesResponse>, Status> {
        let peer = authorize(&req, Permission::Admin, "Admin.SetRules")?;
        if self.0.cfg.detection.is_none() {
            return Err(Status::failed_precondition(
                "detection is off on this bus (no detection.rulesDir)",
            ));
        }
        let text = req.into_inner().rules_yaml;
        let digest = amoskys_detect::rule_set_digest([text.as_str()]);
        tracing::info!(by = %format!("cert:{}", peer.common_name), digest = %digest, bytes = text.len(), "detection rule set handed over");
        *self
            .0
            .pushed_rules
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((text, digest.clone()));
        Ok(Response::new(amoskys_proto::SetRulesResponse { digest }))
    }

    async fn shard_agent(
        &self,
        req: Request<ShardAgentRequest>,
    ) -> Result<Response<ShardAgentResponse>, Status> {
        authorize(&req, Permission::Peer, "Admin.ShardAgent")?;
        let r = req.into_inner();
        let s = &self.0;
        let last_seq = s
            .registry
            .record(&r.agent_id)
            .map_or(0, |rec| crate::writer::last_seq_of(&rec, r.incarnation));
        Ok(Response::new(ShardAgentResponse {
            last_seq,
            connected: s.registry.is_connected(&r.agent_id),
            shard: s.shards.index,
            shard_epoch: s.shards.map().epoch,
        }))
    }
}

/// What an admin read needs: a shard asking another for its own part
/// (`local`) may be a peer; a read of the whole bus takes an admin.
fn read_permission(local: bool) -> Permission {
    if local {
        Permission::Peer
    } else {
        Permission::Admin
    }
}

impl BusState {
    /// The rules this shard's detector was given, with what they matched.
    fn rule_states(&self) -> Vec<amoskys_proto::RuleState> {
        let statuses = self
            .rule_statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut activity = self.rule_activity.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::writer::now_ns();
        statuses
            .into_iter()
            .map(|s| {
                let a = activity.entry(s.name.clone()).or_default();
                amoskys_proto::RuleState {
                    matches_24h: a.last_24h(now),
                    last_match: a.last_match,
                    degraded: a.degraded,
                    name: s.name,
                    loaded: s.loaded,
                    error: s.error,
                }
            })
            .collect()
    }

    /// This shard's own figures.
    pub(crate) async fn local_stats(&self) -> Result<StatsResponse, Status> {
        let store = self.store.clone();
        let (wal_bytes, oldest, newest) = tokio::task::spawn_blocking(move || {
            (
                store.wal_bytes(),
                store.oldest_stored_at(),
                store.newest_stored_at(),
            )
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let rejected: u64 = [
            "invalid_batch",
            "too_large",
            "malformed",
            "no_hello",
            "stream_error",
        ]
        .iter()
        .map(|r| self.metrics.rejected.get_or_create(&reason(r)).get())
        .sum();
        let map = self.shards.map();
        Ok(StatsResponse {
            events_stored: self.store.event_count(),
            first_offset: self.store.first_offset(),
            next_offset: self.store.next_offset(),
            wal_bytes,
            connected_agents: self.registry.connected_count() as u32,
            events_received: self.metrics.events_received.get(),
            duplicates: self.metrics.duplicates.get(),
            rejected,
            writable: self.writable.load(Ordering::SeqCst),
            sync_policy: self.cfg.sync.as_str().into(),
            oldest_stored_at: oldest.unwrap_or(0),
            version: VERSION.into(),
            server_cert_serial: self.tls.serial(),
            server_cert_not_after: self.tls.not_after(),
            shard: self.shards.index,
            shard_epoch: map.epoch,
            retiring: map.is_retiring(self.shards.index),
            newest_stored_at: newest.unwrap_or(0),
            shards: Vec::new(),
            missing_shards: Vec::new(),
            rules: self.rule_states(),
            stored_by_collector: self.metrics.collector_totals().into_iter().collect(),
            rules_digest: self
                .rules_digest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            export: self.cfg.export_nats.as_ref().map(|_| {
                let (last_error_reason, last_error) = self
                    .export_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_default();
                ExportStatus {
                    ready: self.metrics.export_ready.get() == 1,
                    lag_events: self.metrics.export_lag_events.get().max(0) as u64,
                    lag_seconds: self.metrics.export_lag_seconds.get(),
                    last_error_reason,
                    last_error,
                }
            }),
        })
    }

    /// Checks a control request, numbers it and hands it to the agent's
    /// stream; the agent's ControlResult later lands in the registry. `who`
    /// is logged with the request. An invalid request is an error naming the
    /// field; an agent that is not connected is not an error (delivered=false).
    pub async fn control(
        &self,
        agent_id: &str,
        control: Option<amoskys_proto::Control>,
        who: &str,
    ) -> Result<ControlResponse, String> {
        if agent_id.is_empty() {
            return Err("agent_id: missing".into());
        }
        let Some(mut c) = control else {
            return Err("control: missing".into());
        };
        match control::Action::try_from(c.action) {
            Ok(control::Action::Pause | control::Action::Resume) => {}
            Ok(control::Action::SetInterval) if c.interval_ms > 0 => {}
            Ok(control::Action::SetInterval) => {
                return Err("control.interval_ms: must be greater than 0".into());
            }
            _ => {
                return Err(format!(
                    "control.action: {} is not a known action",
                    c.action
                ));
            }
        }
        if c.collector.is_empty() {
            return Err("control.collector: missing".into());
        }
        c.control_id = self.next_control_id.fetch_add(1, Ordering::Relaxed) + 1;
        let id = c.control_id;
        info!(agent = %agent_id, by = %who, collector = %c.collector, action = c.action, interval_ms = c.interval_ms, control_id = id, "control requested");
        let delivered = match self.registry.control_sender(agent_id) {
            Some(tx) => tx.send(c).await.is_ok(),
            None => false,
        };
        Ok(ControlResponse {
            shard: self.shards.index,
            delivered,
            control_id: id,
            message: if delivered {
                "delivered to the agent's stream".into()
            } else {
                format!("agent {agent_id:?} is not connected")
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::SyntheticEvent;
    use amoskys_proto::event::Payload;
    use prost::Message;

    fn ev(seq: u64) -> Event {
        Event {
            seq,
            collector: "synthetic".into(),
            payload: Some(Payload::Synthetic(SyntheticEvent::default())),
            ..Default::default()
        }
    }

    #[test]
    fn batch_validation_names_the_field() {
        let hello = Hello {
            agent_id: "a".into(),
            node: "n".into(),
            ..Default::default()
        };
        let mut ok = Batch {
            events: vec![ev(1), ev(2)],
        };
        validate_batch(&hello, &mut ok, 10).unwrap();
        assert_eq!(ok.events[0].agent_id, "a");
        assert_eq!(ok.events[0].node, "n");

        let cases: Vec<(Batch, &str)> = vec![
            (
                Batch {
                    events: vec![ev(2), ev(2)],
                },
                "events[1].seq",
            ),
            (
                Batch {
                    events: vec![ev(0)],
                },
                "events[0].seq",
            ),
            (
                Batch {
                    events: vec![Event {
                        payload: None,
                        ..ev(1)
                    }],
                },
                "events[0].payload",
            ),
            (
                Batch {
                    events: vec![Event {
                        collector: String::new(),
                        ..ev(1)
                    }],
                },
                "events[0].collector",
            ),
            (
                Batch {
                    events: vec![Event {
                        agent_id: "b".into(),
                        ..ev(1)
                    }],
                },
                "events[0].agent_id",
            ),
            (
                Batch {
                    events: vec![Event {
                        severity: 99,
                        ..ev(1)
                    }],
                },
                "events[0].severity",
            ),
            (
                Batch {
                    events: (1..=11).map(ev).collect(),
                },
                "batch.events",
            ),
        ];
        for (mut b, field) in cases {
            let e = validate_batch(&hello, &mut b, 10).unwrap_err();
            assert!(e.starts_with(field), "{e} should name {field}");
        }
    }

    #[test]
    fn a_query_read_in_parts_returns_its_limit_in_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let n = 3 * QUERY_READ as u64 + 7;
        let events = (1..=n)
            .map(|i| Event {
                offset: i,
                stored_at: 5,
                agent_id: if i % 3 == 0 { "b" } else { "a" }.into(),
                ..ev(i)
            })
            .collect();
        store
            .commit(
                &mut crate::store::PreparedGroup {
                    batch_events: events,
                    next_offset: n + 1,
                    stored_at: 5,
                    ..Default::default()
                },
                false,
            )
            .unwrap();
        let read = |spec: QuerySpec| {
            let (mut spec, mut left) = (spec.clone(), spec.limit);
            let mut parts = Vec::new();
            while let Some(part) = next_query_chunk(&store, &mut spec, &mut left).unwrap() {
                assert!(part.iter().map(EncodedEvents::count).sum::<usize>() <= QUERY_READ);
                for encoded in part {
                    assert!(encoded.count() <= QUERY_CHUNK);
                    let bytes = QueryResponse {
                        encoded,
                        ..Default::default()
                    }
                    .encode_to_vec();
                    parts.extend(QueryResponse::decode(&*bytes).unwrap().events);
                }
            }
            for e in &parts {
                assert_eq!((e.offset, e.stored_at), (e.seq, 5), "stamps come back");
            }
            parts.into_iter().map(|e| e.seq).collect::<Vec<_>>()
        };
        let limit = 2 * QUERY_READ + 5;
        let spec = QuerySpec {
            from_offset: 3,
            limit,
            ..Default::default()
        };
        assert_eq!(
            read(spec.clone()),
            (3..3 + limit as u64).collect::<Vec<_>>()
        );
        assert_eq!(
            read(QuerySpec {
                limit: usize::MAX,
                ..spec.clone()
            }),
            (3..=n).collect::<Vec<_>>()
        );
        let only_b = read(QuerySpec {
            filter: EventFilter {
                agent_ids: vec!["b".into()],
                ..Default::default()
            },
            limit: QUERY_READ + 1,
            ..spec
        });
        assert_eq!(only_b.len(), QUERY_READ + 1);
        assert!(only_b.iter().all(|s| s % 3 == 0));
    }
}
