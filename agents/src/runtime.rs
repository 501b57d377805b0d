//! The agent runtime: opens the spool, starts the collectors, the spool
//! writer, the sender, heartbeats, TLS reload and the HTTP endpoint, and
//! stops them in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use amoskys_client::ClientOptions;
use amoskys_client::tls::TlsMaterial;
use amoskys_proto::event::Payload;
use amoskys_proto::{Heartbeat, Hello, Severity};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::collectors::context::Registry;
use crate::config::AgentConfig;
use crate::metrics::AgentMetrics;
use crate::pods::Pods;
use crate::sender::{SendCounters, Sender, SenderConfig};
use crate::spool::{Draft, Spool, SpoolError};

/// The agent's version, sent in its heartbeats.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The spool could not be opened.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// The TLS files are missing or unusable.
    #[error("TLS files in {dir}: {message}")]
    Tls {
        /// The TLS directory.
        dir: String,
        /// What is wrong with its files.
        message: String,
    },
    /// The metrics address could not be bound.
    #[error("binding the HTTP address {addr}: {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// A collector could not start.
    #[error(transparent)]
    Collector(#[from] crate::collectors::StartError),
}

/// State shared by the runtime's tasks.
pub struct Shared {
    /// The spool.
    pub spool: Arc<Spool>,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
    /// The running collectors.
    pub collectors: Arc<Registry>,
    /// The sender's counters.
    pub counters: Arc<SendCounters>,
    /// The serial of the client certificate in use, for heartbeats.
    pub cert_serial: std::sync::Mutex<String>,
    /// When the agent started.
    pub started: Instant,
}

impl Shared {
    /// Sets the spool gauges from the spool's figures now.
    pub fn refresh_gauges(&self) {
        let st = self.spool.stats();
        self.metrics.spool_bytes.set(st.bytes as i64);
        self.metrics.spool_events.set(st.events as i64);
        self.metrics.spool_max_bytes.set(st.max_bytes as i64);
    }

    fn heartbeat(&self, eps: f64) -> Heartbeat {
        let st = self.spool.stats();
        Heartbeat {
            version: VERSION.into(),
            produced: self.collectors.produced(),
            sent: self.counters.sent.load(Ordering::Relaxed),
            acked: self.counters.acked.load(Ordering::Relaxed),
            spool_bytes: st.bytes,
            spool_events: st.events,
            dropped: st.dropped_total,
            collectors: self.collectors.statuses(),
            cert_serial: self
                .cert_serial
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            events_per_second: eps,
            uptime_seconds: self.started.elapsed().as_secs(),
        }
    }
}

/// A started agent.
pub struct RunningAgent {
    /// Its agent id.
    pub agent_id: String,
    /// Its spool, collectors and counters.
    pub shared: Arc<Shared>,
    /// Where `/metrics` and `/healthz` are served, if anywhere.
    pub http_addr: Option<SocketAddr>,
    stop_collectors: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl RunningAgent {
    /// Stops the collectors, sends what the bus takes within the grace
    /// period, keeps the rest in the spool, and returns when all is closed.
    pub async fn shutdown(self) {
        self.stop_collectors.cancel();
        let _ = self.done.await;
    }

    /// Waits until the agent ends by itself (it does not, short of a stop).
    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

fn spool_writer(
    spool: Arc<Spool>,
    metrics: Arc<AgentMetrics>,
    mut rx: mpsc::Receiver<Draft>,
    started: Instant,
    give_up: Arc<std::sync::atomic::AtomicBool>,
    pods: Option<Arc<Pods>>,
) {
    let mut first = true;
    while let Some(d) = rx.blocking_recv() {
        let mut batch = vec![d];
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        if let Some(pods) = &pods {
            batch.iter_mut().for_each(|d| pods.enrich(d));
        }
        // The first collector event, not the start-up heartbeat: what a
        // user waits for.
        if first && batch.iter().any(|d| d.collector != "agent") {
            first = false;
            info!(
                after_ms = started.elapsed().as_millis() as u64,
                "first event produced"
            );
        }
        let mut attempt = 0u32;
        loop {
            match spool.append(batch.clone()) {
                Ok(dropped) => {
                    if dropped > 0 {
                        metrics.dropped.inc_by(dropped);
                        warn!(
                            dropped,
                            "spool full: dropped the oldest events (reported as a gap event)"
                        );
                    }
                    break;
                }
                Err(e) if give_up.load(std::sync::atomic::Ordering::SeqCst) => {
                    // Shutting down and the grace period is over: these were
                    // never spooled, so nothing acknowledged is lost.
                    error!(error = %e, events = batch.len(), "spool write failed during shutdown; giving up");
                    break;
                }
                Err(e) => {
                    // Holding the batch keeps the channel full, so collectors
                    // wait rather than lose events while the disk recovers.
                    metrics.spool_write_errors.inc();
                    error!(error = %e, "spool write failed; retrying");
                    attempt = attempt.saturating_add(1);
                    std::thread::sleep(Duration::from_millis(100 * u64::from(attempt.min(50))));
                }
            }
        }
    }
}

async fn metrics_handler(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    s.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

fn watch_tls(
    dir: std::path::PathBuf,
    every: Duration,
    shared: Arc<Shared>,
    changed: Arc<Notify>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let mut last = TlsMaterial::read(&dir).map(|m| m.fingerprint()).ok();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let Ok(m) = TlsMaterial::read(&dir) else {
                continue;
            };
            let fp = m.fingerprint();
            if Some(fp) == last {
                continue;
            }
            // Only a complete, parseable set replaces the old one; a rotation
            // caught half-written is picked up on the next poll.
            if m.certs().is_err() || m.key().is_err() || m.roots().is_err() {
                continue;
            }
            last = Some(fp);
            let serial = m.leaf_serial().unwrap_or_default();
            info!(serial = %serial, "TLS files changed");
            *shared.cert_serial.lock().unwrap_or_else(|p| p.into_inner()) = serial;
            shared.metrics.tls_reloads.inc();
            changed.notify_one();
        }
    });
}

/// Starts the watch of this node's pods. Without in-cluster credentials
/// the agent still runs: events then carry no pod identity, and the
/// error is logged and counted.
async fn watch_pods(
    node: &str,
    metrics: &Arc<AgentMetrics>,
    stop: &CancellationToken,
) -> Arc<Pods> {
    let pods = Arc::new(Pods::default());
    match kube::Client::try_default().await {
        Ok(client) => {
            tokio::spawn(crate::pods::watch(
                client,
                node.to_string(),
                pods.clone(),
                metrics.clone(),
                stop.clone(),
            ));
        }
        Err(e) => {
            metrics.pod_watch_errors.inc();
            error!(error = %e, "kubernetes.pods is on but there are no Kubernetes credentials; events carry no pod identity");
        }
    }
    pods
}

/// Starts the agent. Errors here are configuration or environment problems
/// the caller should report and exit on.
pub async fn start(cfg: AgentConfig) -> Result<RunningAgent, AgentError> {
    let started = Instant::now();
    let tls = TlsMaterial::read(&cfg.tls_dir).map_err(|e| AgentError::Tls {
        dir: cfg.tls_dir.display().to_string(),
        message: e.to_string(),
    })?;
    tls.certs()
        .and_then(|_| tls.key())
        .and_then(|_| tls.roots())
        .map_err(|e| AgentError::Tls {
            dir: cfg.tls_dir.display().to_string(),
            message: e.to_string(),
        })?;
    std::fs::create_dir_all(&cfg.spool_dir).map_err(|e| {
        AgentError::Spool(SpoolError::Corrupt {
            seq: 0,
            message: format!("creating {}: {e}", cfg.spool_dir.display()),
        })
    })?;
    let spool = {
        let (dir, max, id, node) = (
            cfg.spool_dir.clone(),
            cfg.spool_max_bytes,
            cfg.agent_id.clone(),
            cfg.node.clone(),
        );
        tokio::task::spawn_blocking(move || Spool::open(&dir, max, &id, &node))
            .await
            .map_err(|e| {
                AgentError::Spool(SpoolError::Corrupt {
                    seq: 0,
                    message: e.to_string(),
                })
            })??
    };
    let spool = Arc::new(spool);
    let st = spool.stats();
    info!(agent_id = %cfg.agent_id, spool_events = st.events, next_seq = st.next_seq, "spool open");

    let metrics = Arc::new(AgentMetrics::new());
    let shared = Arc::new(Shared {
        spool: spool.clone(),
        metrics: metrics.clone(),
        collectors: Arc::new(Registry::default()),
        counters: Arc::new(SendCounters::default()),
        cert_serial: std::sync::Mutex::new(tls.leaf_serial().unwrap_or_default()),
        started,
    });
    shared.refresh_gauges();

    let stop_collectors = CancellationToken::new();
    let draining = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    let (tx, rx) = mpsc::channel::<Draft>(8192);

    let pods = if cfg.watch_pods {
        Some(watch_pods(&cfg.node, &metrics, &hard_stop).await)
    } else {
        None
    };
    let writer_give_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (spool, metrics, give_up) = (spool.clone(), metrics.clone(), writer_give_up.clone());
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || spool_writer(spool, metrics, rx, started, give_up, pods))
            .map_err(|e| {
                AgentError::Spool(SpoolError::Corrupt {
                    seq: 0,
                    message: format!("starting the spool writer: {e}"),
                })
            })?
    };

    let mut tasks = crate::collectors::spawn_all(
        &cfg.collectors,
        &shared.collectors,
        &tx,
        &metrics,
        &stop_collectors,
    )
    .await?;

    // Heartbeats ride the spool like any event, so the bus registry gets
    // them in order and after outages too.
    let heartbeat_now = Arc::new(Notify::new());
    {
        let (shared, tx, stop, every, heartbeat_now) = (
            shared.clone(),
            tx.clone(),
            stop_collectors.clone(),
            cfg.heartbeat_interval,
            heartbeat_now.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // The first heartbeat has no interval to measure a rate over
            // (the start-up snapshot would read as millions per second).
            let mut last: Option<(Instant, u64)> = None;
            loop {
                let produced = shared.collectors.produced();
                let eps = match last {
                    Some((at, n)) if at.elapsed().as_secs_f64() > 0.0 => {
                        produced.saturating_sub(n) as f64 / at.elapsed().as_secs_f64()
                    }
                    _ => 0.0,
                };
                last = Some((Instant::now(), produced));
                let hb = shared.heartbeat(eps);
                if tx
                    .send(Draft::new("agent", Severity::Debug, Payload::Heartbeat(hb)))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                    _ = heartbeat_now.notified() => {}
                }
            }
        }));
    }
    drop(tx);

    let tls_changed = Arc::new(Notify::new());
    watch_tls(
        cfg.tls_dir.clone(),
        cfg.tls_reload_interval,
        shared.clone(),
        tls_changed.clone(),
        hard_stop.clone(),
    );

    let mut client = ClientOptions::new(cfg.bus.clone(), cfg.tls_dir.clone());
    client.server_name = cfg.bus_server_name.clone();
    let sender = Sender {
        heartbeat_now,
        cfg: SenderConfig {
            client,
            hello: Hello {
                agent_id: cfg.agent_id.clone(),
                node: cfg.node.clone(),
                version: VERSION.into(),
                collectors: shared.collectors.names(),
                // Incarnation and acked seq are the spool's, read at each connect.
                ..Default::default()
            },
            max_events: cfg.batch_max_events,
            max_bytes: 4 * 1024 * 1024,
            max_delay: cfg.batch_max_delay,
            window: cfg.window,
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        },
        spool: spool.clone(),
        collectors: shared.collectors.clone(),
        metrics: metrics.clone(),
        counters: shared.counters.clone(),
        tls_changed,
    };
    let sender_task = tokio::spawn(sender.run(draining.clone(), hard_stop.clone()));

    let http_addr = match cfg.http {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Http { addr, source })?;
            let local = listener.local_addr().ok();
            let app = Router::new()
                .route("/metrics", get(metrics_handler))
                .route("/healthz", get(healthz))
                .with_state(shared.clone());
            let stop = hard_stop.clone();
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                {
                    error!(error = %e, "HTTP server failed");
                }
            });
            local
        }
        None => None,
    };

    let done = {
        let (stop_collectors, grace, spool) =
            (stop_collectors.clone(), cfg.shutdown_grace, spool.clone());
        tokio::spawn(async move {
            stop_collectors.cancelled().await;
            info!(
                "stopping: collectors first, then sending what the bus takes within the grace period"
            );
            for t in tasks {
                let _ = t.await;
            }
            // A spool that cannot be written must not hold the exit forever.
            let mut writer = tokio::task::spawn_blocking(move || writer.join());
            if tokio::time::timeout(grace, &mut writer).await.is_err() {
                writer_give_up.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = writer.await;
            }
            draining.cancel();
            let mut sender_task = sender_task;
            if tokio::time::timeout(grace, &mut sender_task).await.is_err() {
                let left = spool.stats().events;
                warn!(
                    unacked = left,
                    "grace period over: the rest stays in the spool for the next start"
                );
                hard_stop.cancel();
                let _ = sender_task.await;
            }
            hard_stop.cancel();
            if let Err(e) = spool.flush() {
                error!(error = %e, "flushing the spool");
            }
            info!("agent stopped");
        })
    };

    Ok(RunningAgent {
        agent_id: cfg.agent_id.clone(),
        shared,
        http_addr,
        stop_collectors,
        done,
    })
}
