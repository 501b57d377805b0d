//! `amoskys bench`: publishes synthetic events at a bus over mTLS and reports
//! durable throughput and ack latency.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use amoskys_proto::event::Payload;
use amoskys_proto::publish_response::Msg as OutMsg;
use amoskys_proto::{Event, Filter, Hello, Severity, SyntheticEvent, TailRequest};
use prost::Message;
use tokio::sync::Mutex;

use amoskys_client::{BusClient, ClientError, ClientOptions};

/// One benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// The bus and the agents' TLS files.
    pub client: ClientOptions,
    /// Events in total, split across the agents.
    pub events: u64,
    /// Encoded bytes per event, about.
    pub event_bytes: usize,
    /// Agents publishing at once, each on its own connection.
    pub agents: usize,
    /// Total events per second across agents; None = as fast as acks allow.
    pub rate: Option<u64>,
    /// Events per batch.
    pub batch: usize,
    /// Batches in flight per agent.
    pub window: usize,
    /// Agent ids are this with `-<n>` after it.
    pub agent_prefix: String,
    /// A reader's TLS directory: when set, the run's events are also
    /// followed on a Tail stream and the write → tail latency reported.
    pub tail_tls_dir: Option<PathBuf>,
    /// What the events are.
    pub mix: Mix,
}

/// What a benchmark's events are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mix {
    /// Synthetic events of `event_bytes`, which no rule reads.
    #[default]
    Synthetic,
    /// Flows, process starts and exits, heartbeats and listeners shaped
    /// like a busy node's (`amoskys_detect::sample`), which the starter
    /// rules alert on; `event_bytes` does not apply.
    Node,
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    /// Events offered.
    pub events: u64,
    /// Events acked as durable.
    pub acked: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Acked events per second.
    pub eps: f64,
    /// Median time from sending a batch to its ack.
    pub ack_p50_ms: f64,
    /// 99th percentile of the same.
    pub ack_p99_ms: f64,
    /// The slowest ack.
    pub ack_max_ms: f64,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
    /// What a Tail subscriber saw, when one was asked for.
    pub tail: Option<TailReport>,
    /// Median time from an agent's connect to its Welcome, redirects to its
    /// owner shard included.
    pub welcome_p50_ms: f64,
    /// 99th percentile of the same.
    pub welcome_p99_ms: f64,
    /// Agents a shard redirected to their owner before the Welcome.
    pub redirected: u64,
}

/// What a Tail subscriber saw of the run: how many of its events arrived,
/// and the time from each event's creation (its `observed_at`, just before
/// the bench sends it) to its arrival on the stream.
#[derive(Clone, Debug, Default)]
pub struct TailReport {
    /// The run's events that arrived on the stream.
    pub events: u64,
    /// Median write → tail latency.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
}

impl BenchReport {
    /// Summarises a run from its per-batch (or per-message) ack latencies in ms.
    pub fn from_latencies(
        events: u64,
        acked: u64,
        seconds: f64,
        mut lat: Vec<f64>,
        errors: Vec<String>,
    ) -> Self {
        lat.sort_by(|a, b| a.total_cmp(b));
        Self {
            events,
            acked,
            seconds,
            eps: acked as f64 / seconds.max(1e-9),
            ack_p50_ms: percentile(&lat, 0.50),
            ack_p99_ms: percentile(&lat, 0.99),
            ack_max_ms: lat.last().copied().unwrap_or(0.0),
            errors,
            ..Default::default()
        }
    }

    /// The report as one `key=value` line, as the scripts parse it.
    pub fn line(&self) -> String {
        let mut line = format!(
            "bench: events={} acked={} eps={:.0} ack_p50_ms={:.3} ack_p99_ms={:.3}",
            self.events, self.acked, self.eps, self.ack_p50_ms, self.ack_p99_ms
        );
        if let Some(t) = &self.tail {
            line += &format!(
                " tail_events={} tail_p50_ms={:.3} tail_p99_ms={:.3}",
                t.events, t.p50_ms, t.p99_ms
            );
        }
        if self.welcome_p99_ms > 0.0 {
            line += &format!(
                " welcome_p50_ms={:.3} welcome_p99_ms={:.3} redirected={}",
                self.welcome_p50_ms, self.welcome_p99_ms, self.redirected
            );
        }
        line
    }
}

/// A synthetic event whose encoded size is close to `bytes`.
pub fn synthetic_event(agent: &str, seq: u64, bytes: usize) -> Event {
    let mut e = Event {
        agent_id: agent.into(),
        seq,
        node: "bench".into(),
        collector: "synthetic".into(),
        observed_at: crate::writer::now_ns(),
        severity: Severity::Info as i32,
        payload: Some(Payload::Synthetic(SyntheticEvent {
            n: seq,
            data: Vec::new(),
        })),
        ..Default::default()
    };
    let overhead = e.encoded_len() + 3;
    let fill = bytes.saturating_sub(overhead);
    if let Some(Payload::Synthetic(s)) = &mut e.payload {
        s.data = (0..fill).map(|i| (i as u64 ^ seq) as u8).collect();
    }
    e
}

/// Paces one agent at a mean rate with exponential gaps between sends
/// (Poisson arrivals), as independent agents produce. A fixed schedule would
/// start every agent's sends in the same instant, and the latency measured
/// would be that of their collisions.
struct Pacer {
    next: Instant,
    per_second: f64,
}

impl Pacer {
    fn new(per_second: f64) -> Self {
        Self {
            next: Instant::now(),
            per_second: per_second.max(f64::MIN_POSITIVE),
        }
    }

    /// Waits until the next send is due; `events` is its size, which sets
    /// the mean gap to the one after it.
    async fn wait(&mut self, events: u64) {
        tokio::time::sleep_until(self.next.into()).await;
        let mean = events as f64 / self.per_second;
        self.next += Duration::from_secs_f64(exponential_gap(mean, rand::random()));
    }
}

/// An exponentially distributed gap with the given mean, from a uniform
/// sample `u` in [0, 1).
pub fn exponential_gap(mean: f64, u: f64) -> f64 {
    -(1.0 - u.clamp(0.0, 1.0 - f64::EPSILON)).ln() * mean
}

/// One agent's synthetic events: `n` of them numbered after `base`, in
/// batches of `batch`, paced at `rate` events/s when given. The bus bench and
/// the NATS anchor both draw from it, so both send the same workload.
pub struct Workload {
    agent: String,
    bytes: usize,
    batch: u64,
    /// Last seq handed out, and the last to hand out.
    seq: u64,
    end: u64,
    pacer: Option<Pacer>,
    node: Option<amoskys_detect::sample::NodeMix>,
}

impl Workload {
    /// `n` events of `bytes` for `agent`, seqs after `base`, in batches of
    /// `batch`, at `rate` events/s (None: as fast as taken).
    pub fn new(
        agent: &str,
        base: u64,
        n: u64,
        batch: usize,
        bytes: usize,
        rate: Option<f64>,
    ) -> Self {
        Self {
            agent: agent.to_string(),
            bytes,
            batch: batch.max(1) as u64,
            seq: base,
            end: base + n,
            pacer: rate.map(Pacer::new),
            node: None,
        }
    }

    /// The same workload with node-like events instead of synthetic ones,
    /// drawn from `seed`.
    pub fn with_mix(mut self, mix: Mix, seed: u64) -> Self {
        self.node = (mix == Mix::Node).then(|| amoskys_detect::sample::NodeMix::new(seed));
        self
    }

    fn next_len(&self) -> u64 {
        self.batch.min(self.end - self.seq)
    }

    /// Waits until the next batch is due; false once every event was taken.
    pub async fn due(&mut self) -> bool {
        let k = self.next_len();
        if k == 0 {
            return false;
        }
        if let Some(p) = &mut self.pacer {
            p.wait(k).await;
        }
        true
    }

    /// The next batch, its events stamped now.
    pub fn take(&mut self) -> Vec<Event> {
        let (from, k) = (self.seq, self.next_len());
        self.seq += k;
        match &mut self.node {
            None => (1..=k)
                .map(|j| synthetic_event(&self.agent, from + j, self.bytes))
                .collect(),
            Some(mix) => (1..=k)
                .map(|j| {
                    let (payload, _) = mix.next_payload();
                    Event {
                        agent_id: self.agent.clone(),
                        seq: from + j,
                        node: self.agent.clone(),
                        collector: amoskys_detect::sample::collector_of(&payload).into(),
                        observed_at: crate::writer::now_ns(),
                        severity: Severity::Info as i32,
                        payload: Some(payload),
                        ..Default::default()
                    }
                })
                .collect(),
        }
    }

    /// The seq of the last event taken.
    pub fn last_seq(&self) -> u64 {
        self.seq
    }
}

/// The `p` quantile (0..=1) of sorted values; 0 when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn agent_id(prefix: &str, i: usize) -> String {
    format!("{prefix}-{i}")
}

/// Latencies (ms) of the events a Tail subscriber has received so far.
type TailLatencies = Arc<std::sync::Mutex<Vec<f64>>>;

/// Opens a Tail stream from now for `agents` as the reader in `tls_dir`;
/// once it is open, a task records each arriving event's latency.
async fn follow(
    opts: &BenchOptions,
    tls_dir: PathBuf,
    agents: Vec<String>,
) -> Result<(tokio::task::JoinHandle<()>, TailLatencies), amoskys_client::ClientError> {
    let mut reader = opts.client.clone();
    reader.tls_dir = tls_dir;
    let mut client = BusClient::connect(&reader).await?;
    let mut stream = client
        .tail(TailRequest {
            from_now: true,
            filter: Some(Filter {
                agent_ids: agents,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let lat = TailLatencies::default();
    let seen = lat.clone();
    let task = tokio::spawn(async move {
        // Held while the stream is read, so its connection stays open.
        let _client = client;
        while let Ok(Some(chunk)) = stream.message().await {
            let now = crate::writer::now_ns();
            if let Ok(mut l) = seen.lock() {
                l.extend(
                    chunk
                        .events
                        .iter()
                        .map(|e| (now - e.observed_at) as f64 / 1e6),
                );
            }
        }
    });
    Ok((task, lat))
}

/// Waits until the subscriber has `expected` events, or nothing more came
/// for 5 s, and summarises what it saw.
async fn tail_report(
    task: tokio::task::JoinHandle<()>,
    lat: TailLatencies,
    expected: u64,
) -> TailReport {
    let count = || lat.lock().map_or(0, |l| l.len() as u64);
    let (mut last, mut since) = (count(), Instant::now());
    while count() < expected && since.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if count() != last {
            (last, since) = (count(), Instant::now());
        }
    }
    task.abort();
    let mut l = lat.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_by(|a, b| a.total_cmp(b));
    TailReport {
        events: l.len() as u64,
        p50_ms: percentile(&l, 0.50),
        p99_ms: percentile(&l, 0.99),
    }
}

/// Runs the benchmark. A bus failure mid-run ends the affected agents; the
/// report still counts what was acked before it.
pub async fn run(opts: BenchOptions) -> BenchReport {
    let agents = opts.agents.max(1);
    let tail = match opts.tail_tls_dir.clone() {
        None => None,
        Some(dir) => {
            let ids = (0..agents)
                .map(|i| agent_id(&opts.agent_prefix, i))
                .collect();
            match follow(&opts, dir, ids).await {
                Ok(t) => Some(t),
                Err(e) => {
                    return BenchReport {
                        events: opts.events,
                        errors: vec![format!("tail: {e}")],
                        ..Default::default()
                    };
                }
            }
        }
    };
    let acked = Arc::new(AtomicU64::new(0));
    let welcomes = Arc::new(Welcomes::default());
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let per_agent = opts.events / agents as u64;
    let extra = opts.events % agents as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..agents {
        let n = per_agent + u64::from((i as u64) < extra);
        let opts = opts.clone();
        let acked = acked.clone();
        let welcomes = welcomes.clone();
        let latencies = latencies.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let agent = agent_id(&opts.agent_prefix, i);
            let rate = opts
                .rate
                .map(|r| (r as f64 / opts.agents.max(1) as f64).max(1.0));
            match run_agent(&opts, &agent, n, rate, &acked, &welcomes).await {
                Ok(mut lat) => latencies.lock().await.append(&mut lat),
                Err((mut lat, e)) => {
                    latencies.lock().await.append(&mut lat);
                    errors.lock().await.push(format!("{agent}: {e}"));
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let lat = std::mem::take(&mut *latencies.lock().await);
    let errors = std::mem::take(&mut *errors.lock().await);
    let acked = acked.load(Ordering::SeqCst);
    let mut report = BenchReport::from_latencies(opts.events, acked, seconds, lat, errors);
    let mut w = std::mem::take(&mut *welcomes.ms.lock().await);
    w.sort_by(|a, b| a.total_cmp(b));
    report.welcome_p50_ms = percentile(&w, 0.50);
    report.welcome_p99_ms = percentile(&w, 0.99);
    report.redirected = welcomes.redirected.load(Ordering::SeqCst);
    if let Some((task, lat)) = tail {
        report.tail = Some(tail_report(task, lat, acked).await);
    }
    report
}

type AgentResult = Result<Vec<f64>, (Vec<f64>, String)>;

/// Each agent's connect-to-Welcome time, and how many were redirected.
#[derive(Default)]
struct Welcomes {
    ms: Mutex<Vec<f64>>,
    redirected: AtomicU64,
}

async fn run_agent(
    opts: &BenchOptions,
    agent: &str,
    n: u64,
    rate: Option<f64>,
    acked: &AtomicU64,
    welcomes: &Welcomes,
) -> AgentResult {
    let t0 = Instant::now();
    let mut hello = Hello {
        agent_id: agent.into(),
        node: "bench".into(),
        version: crate::service::VERSION.into(),
        collectors: vec!["synthetic".into()],
        ..Default::default()
    };
    // A sharded bus sends an agent it does not own to its owner, as it
    // does a real agent; a few hops at most.
    let mut to = opts.client.clone();
    let mut hops = 0;
    let mut publisher = loop {
        let mut client = BusClient::connect(&to)
            .await
            .map_err(|e| (Vec::new(), e.to_string()))?;
        match client.publisher(hello.clone(), opts.window).await {
            Ok(p) => break p,
            Err(ClientError::Redirected(r)) if hops < 4 => {
                hops += 1;
                to.url = r.url;
                hello.shard_epoch = r.shard_epoch;
            }
            Err(e) => return Err((Vec::new(), e.to_string())),
        }
    };
    welcomes
        .ms
        .lock()
        .await
        .push(t0.elapsed().as_secs_f64() * 1e3);
    if hops > 0 {
        welcomes.redirected.fetch_add(1, Ordering::SeqCst);
    }
    // Continue after what an earlier run of the same agent left durable.
    let base = publisher.welcome_acked_seq;
    let sender = publisher.sender();
    let sent_at: Arc<Mutex<std::collections::VecDeque<(u64, Instant)>>> = Arc::default();
    let window = Arc::new(tokio::sync::Semaphore::new(opts.window.max(1)));
    let producer = {
        let sent_at = sent_at.clone();
        let window = window.clone();
        let mut work = Workload::new(agent, base, n, opts.batch, opts.event_bytes, rate)
            // Each agent its own draws, the same in every run.
            .with_mix(opts.mix, amoskys_client::shard::agent_hash(agent));
        tokio::spawn(async move {
            while work.due().await {
                let Ok(permit) = window.acquire().await else {
                    return;
                };
                permit.forget();
                let events = work.take();
                sent_at
                    .lock()
                    .await
                    .push_back((work.last_seq(), Instant::now()));
                let req = amoskys_proto::PublishRequest {
                    msg: Some(amoskys_proto::publish_request::Msg::Batch(
                        amoskys_proto::Batch { events },
                    )),
                };
                if sender.send(req).await.is_err() {
                    return;
                }
            }
        })
    };
    let mut lat = Vec::new();
    let target = base + n;
    let mut last = base;
    while last < target {
        match publisher.next().await {
            Ok(Some(OutMsg::Ack(a))) => {
                let now = Instant::now();
                let mut q = sent_at.lock().await;
                while let Some(&(seq, at)) = q.front() {
                    if seq > a.acked_seq {
                        break;
                    }
                    lat.push(now.duration_since(at).as_secs_f64() * 1e3);
                    q.pop_front();
                    window.add_permits(1);
                }
                acked.fetch_add(a.acked_seq.saturating_sub(last), Ordering::SeqCst);
                last = last.max(a.acked_seq);
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                producer.abort();
                return Err((
                    lat,
                    format!("bus ended the stream after acking {}", last - base),
                ));
            }
            Err(e) => {
                producer.abort();
                return Err((lat, e.to_string()));
            }
        }
    }
    producer.abort();
    Ok(lat)
}

/// What reading a bus's events back measured over gRPC.
#[derive(Clone, Debug, Default)]
pub struct ReadReport {
    /// Events read by Query, page after page from the first offset.
    pub query_events: u64,
    /// Their rate.
    pub query_eps: f64,
    /// Events replayed by one Tail stream from the first offset.
    pub tail_events: u64,
    /// Their rate.
    pub tail_eps: f64,
}

impl ReadReport {
    /// The report as one `key=value` line, as the scripts parse it.
    pub fn line(&self) -> String {
        format!(
            "read: query_events={} query_eps={:.0} tail_events={} tail_eps={:.0}",
            self.query_events, self.query_eps, self.tail_events, self.tail_eps
        )
    }
}

/// Reads every stored event back as a reader would: Query pages of `limit`
/// from the first offset until one comes back empty, then one Tail stream
/// from the first offset until it has replayed as many.
pub async fn read(client: &ClientOptions, limit: u32) -> Result<ReadReport, ClientError> {
    let mut bus = BusClient::connect(client).await?;
    let mut report = ReadReport::default();
    let started = Instant::now();
    let mut from = 0;
    // Each page is handled as it streams in, as an exporter would.
    loop {
        let mut stream = bus
            .query_stream(amoskys_proto::QueryRequest {
                from_offset: from,
                limit,
                ..Default::default()
            })
            .await?;
        let mut last = None;
        while let Some(chunk) = stream.message().await? {
            report.query_events += chunk.events.len() as u64;
            last = chunk.events.last().map(|e| e.offset).or(last);
        }
        let Some(last) = last else { break };
        from = last + 1;
    }
    report.query_eps = report.query_events as f64 / started.elapsed().as_secs_f64().max(1e-9);

    let started = Instant::now();
    let mut stream = bus.tail(TailRequest::default()).await?;
    while report.tail_events < report.query_events {
        let Some(chunk) = stream.message().await? else {
            break;
        };
        report.tail_events += chunk.events.len() as u64;
    }
    report.tail_eps = report.tail_events as f64 / started.elapsed().as_secs_f64().max(1e-9);
    Ok(report)
}

/// How long the detector took to store its alerts: for each new alert, its
/// own stored time minus that of the event that raised it (both the bus's
/// clock, in ns).
#[derive(Clone, Debug, Default)]
pub struct AlertLatencyReport {
    /// New alerts read.
    pub alerts: u64,
    /// Count updates of alerts (written when a dedup window closes, so not
    /// timed).
    pub updates: u64,
    /// Median event stored → alert stored, ms.
    pub p50_ms: f64,
    /// 99th percentile of the same.
    pub p99_ms: f64,
    /// The slowest.
    pub max_ms: f64,
}

impl AlertLatencyReport {
    /// The report as one `key=value` line, as the scripts parse it.
    pub fn line(&self) -> String {
        format!(
            "alerts: new={} updates={} stored_p50_ms={:.3} stored_p99_ms={:.3} stored_max_ms={:.3}",
            self.alerts, self.updates, self.p50_ms, self.p99_ms, self.max_ms
        )
    }
}

/// Reads every alert the bus stored (as a reader) and times each new one
/// against its source event.
pub async fn alert_latency(client: &ClientOptions) -> Result<AlertLatencyReport, ClientError> {
    let mut bus = BusClient::connect(client).await?;
    let mut report = AlertLatencyReport::default();
    let mut ms = Vec::new();
    let mut from = 0;
    loop {
        let page = bus
            .query_page(amoskys_proto::QueryRequest {
                from_offset: from,
                limit: 10_000,
                filter: Some(Filter {
                    collectors: vec![amoskys_detect::DETECT_COLLECTOR.into()],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await?;
        let Some(last) = page.events.last().map(|e| e.offset) else {
            break;
        };
        for e in &page.events {
            if let Some(Payload::Alert(a)) = &e.payload {
                if a.updates_seq != 0 {
                    report.updates += 1;
                } else {
                    report.alerts += 1;
                    ms.push((e.stored_at - a.last_seen) as f64 / 1e6);
                }
            }
        }
        from = last + 1;
    }
    ms.sort_by(f64::total_cmp);
    report.p50_ms = percentile(&ms, 0.5);
    report.p99_ms = percentile(&ms, 0.99);
    report.max_ms = ms.last().copied().unwrap_or_default();
    Ok(report)
}

/// What a full scan of a store measured, in process, with the bus stopped:
/// what export and detection will do.
#[derive(Clone, Debug, Default)]
pub struct ScanReport {
    /// Milliseconds to open the store.
    pub open_ms: f64,
    /// Events read, every one decoded.
    pub events: u64,
    /// Their rate.
    pub eps: f64,
}

impl ScanReport {
    /// The report as one `key=value` line, as the scripts parse it.
    pub fn line(&self) -> String {
        format!(
            "scan: open_ms={:.0} events={} eps={:.0}",
            self.open_ms, self.events, self.eps
        )
    }
}

/// Opens the store in `dir` and decodes every event in it, in offset order.
pub fn scan_store(dir: &std::path::Path) -> Result<ScanReport, String> {
    let opened = Instant::now();
    let store = crate::store::Store::open(dir).map_err(|e| e.to_string())?;
    let open_ms = opened.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let (mut from, mut events) = (store.first_offset(), 0u64);
    loop {
        let chunk = store.read_from(from, 65_536).map_err(|e| e.to_string())?;
        let Some(last) = chunk.last() else { break };
        from = last.offset + 1;
        events += chunk.len() as u64;
    }
    Ok(ScanReport {
        open_ms,
        events,
        eps: events as f64 / started.elapsed().as_secs_f64().max(1e-9),
    })
}

/// Writes `events` synthetic events of `event_bytes` into `dir` as a format 1
/// store (one key per event) in groups of `batch`, then opens it, which
/// converts it to blocks. Returns the milliseconds the conversion took.
pub fn convert_legacy(
    dir: &std::path::Path,
    events: u64,
    event_bytes: usize,
    batch: usize,
) -> Result<f64, String> {
    let batch = batch.max(1) as u64;
    let mut offset = 1;
    // Written a slice of groups at a time, so memory stays flat.
    let mut groups = Vec::new();
    let write = |groups: &mut Vec<Vec<Event>>| -> Result<(), String> {
        crate::store::write_format1(dir, groups).map_err(|e| e.to_string())?;
        groups.clear();
        Ok(())
    };
    while offset <= events {
        let stored_at = crate::writer::now_ns();
        let n = batch.min(events - offset + 1);
        groups.push(
            (offset..offset + n)
                .map(|o| {
                    let mut e = synthetic_event("bench-0", o, event_bytes);
                    (e.offset, e.stored_at) = (o, stored_at);
                    e
                })
                .collect(),
        );
        offset += n;
        if groups.len() >= 256 {
            write(&mut groups)?;
        }
    }
    write(&mut groups)?;
    let started = Instant::now();
    crate::store::Store::open(dir).map_err(|e| e.to_string())?;
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_gaps_have_the_mean_and_spread_of_poisson_arrivals() {
        assert_eq!(exponential_gap(4.0, 0.0), 0.0);
        let n = 200_000;
        let mut gaps: Vec<f64> = (0..n)
            .map(|_| exponential_gap(4.0, rand::random()))
            .collect();
        let mean = gaps.iter().sum::<f64>() / n as f64;
        assert!((mean - 4.0).abs() < 0.1, "mean gap {mean}");
        gaps.sort_by(|a, b| a.total_cmp(b));
        // Exponential: median = mean * ln 2, p99 = mean * ln 100.
        let median = percentile(&gaps, 0.5);
        let p99 = percentile(&gaps, 0.99);
        assert!((median - 4.0 * 2f64.ln()).abs() < 0.1, "median {median}");
        assert!((p99 - 4.0 * 100f64.ln()).abs() < 0.5, "p99 {p99}");
    }

    #[test]
    fn a_node_mix_workload_numbers_real_payloads_like_the_synthetic_one() {
        let mut w = Workload::new("a-1", 10, 5, 3, 200, None).with_mix(Mix::Node, 1);
        let mut got = w.take();
        got.extend(w.take());
        assert_eq!(
            got.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [11, 12, 13, 14, 15]
        );
        assert!(got.iter().all(|e| e.agent_id == "a-1"
            && !matches!(e.payload, Some(Payload::Synthetic(_)))
            && amoskys_detect::view::payload_kind(e).is_some()));
        let collectors: std::collections::BTreeSet<_> =
            got.iter().map(|e| e.collector.as_str()).collect();
        assert!(!collectors.contains("synthetic"), "{collectors:?}");
    }
}
