//! Starting, running and stopping a bus: wires the store, writer, TLS
//! listener, gRPC services, HTTP endpoints and retention together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use amoskys_proto::admin_server::AdminServer;
use amoskys_proto::event_bus_server::EventBusServer;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::alerts::RecentAlerts;
use crate::backup::Backups;
use crate::config::BusConfig;
use crate::dashboard::Dashboard;
use crate::http::{self, Health};
use crate::metrics::{BusMetrics, reason};
use crate::registry::Registry;
use crate::service::{AdminService, BusState, EventBusService};
use crate::shard::Shards;
use crate::store::{Store, StoreError};
use crate::tls::ReloadingTls;
use crate::writer::{self, Writer, WriterMsg, now_ns};
use amoskys_client::tls::TlsError;

/// Why a bus could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The TLS files are missing or unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store could not be opened or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An address could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener: `grpc` or `http`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS's reason.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The backup directory could not be opened.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// Anything else, with its text.
    #[error("{0}")]
    Other(String),
}

/// A bus that is running; `shutdown` stops it cleanly.
pub struct RunningBus {
    /// The gRPC address it listens on (the port is known once bound).
    pub grpc_addr: SocketAddr,
    /// The HTTP address it listens on.
    pub http_addr: SocketAddr,
    /// Its metrics, for in-process readers (tests, `amoskys up`).
    pub metrics: Arc<BusMetrics>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<Result<(), BusError>>,
}

impl RunningBus {
    /// Stops accepting, drains in-flight batches, acks what became durable,
    /// closes RocksDB. Returns once the bus is fully down.
    pub async fn shutdown(self) -> Result<(), BusError> {
        self.stop.cancel();
        self.wait().await
    }

    /// Waits until the bus stops (after `stop_token().cancel()` or a fatal error).
    pub async fn wait(self) -> Result<(), BusError> {
        self.done
            .await
            .map_err(|e| BusError::Other(format!("bus task failed: {e}")))?
    }

    /// A token that stops the bus when cancelled (a signal handler's).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// Starts a bus with `cfg`; returns once both listeners are bound and the
/// store is open.
pub async fn start(cfg: BusConfig) -> Result<RunningBus, BusError> {
    let metrics = Arc::new(BusMetrics::new());
    metrics.max_message_bytes.set(cfg.max_message_bytes as i64);
    let stop = CancellationToken::new();
    let health = Arc::new(Health::default());
    health.recovering.store(true, Ordering::SeqCst);

    let tls = ReloadingTls::load(&cfg.tls_dir, metrics.clone())?;
    tls.spawn_watcher(cfg.tls_reload_interval, stop.clone());

    let (http_listener, http_addr) = bind("http", cfg.http).await?;
    let (grpc_listener, grpc_addr) = bind("grpc", cfg.listen).await?;

    let writable = Arc::new(AtomicBool::new(true));
    // /readyz answers (false) while RocksDB replays its log.
    let http_state = Arc::new(http::HttpState {
        metrics: metrics.clone(),
        health: health.clone(),
        writable: writable.clone(),
        store: std::sync::OnceLock::new(),
        registry: std::sync::OnceLock::new(),
        dashboard: std::sync::OnceLock::new(),
        data_dir: cfg.data_dir.clone(),
    });
    let http_task = tokio::spawn(http::serve(
        http_listener,
        http_state.clone(),
        cfg.http_tls.then(|| tls.clone()),
        stop.clone(),
    ));

    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| BusError::Other(format!("data dir {}: {e}", cfg.data_dir.display())))?;
    let data_dir = cfg.data_dir.clone();
    let write_buffer = cfg.write_buffer_bytes;
    let opened = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
        let store = Store::open_with(&data_dir, write_buffer)?;
        let agents = store.load_agents()?;
        Ok((store, agents))
    })
    .await
    .map_err(|e| BusError::Other(format!("opening the store: {e}")))?;
    let (store, agents) = match opened {
        Ok(v) => v,
        Err(e) => {
            stop.cancel();
            let _ = http_task.await;
            return Err(e.into());
        }
    };
    let backups = match open_backups(&cfg).await {
        Ok(b) => b,
        Err(e) => {
            stop.cancel();
            let _ = http_task.await;
            return Err(e);
        }
    };
    let store = Arc::new(store);
    let registry = Arc::new(Registry::with_records(agents));
    let _ = http_state.store.set(store.clone());
    let _ = http_state.registry.set(registry.clone());
    info!(
        data_dir = %cfg.data_dir.display(),
        first_offset = store.first_offset(),
        next_offset = store.next_offset(),
        agents = registry.list().len(),
        "store open"
    );

    let (tail_tx, _) = broadcast::channel(1024);
    let alerts = Arc::new(RecentAlerts::default());
    backfill_alerts(store.clone(), alerts.clone());
    let (writer_tx, writer_thread) = writer::spawn(
        Writer {
            store: store.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            tail: tail_tx.clone(),
            writable: writable.clone(),
            sync: cfg.sync,
            max_group_events: cfg.max_group_events,
            alerts: alerts.clone(),
        },
        cfg.queue_depth,
    )
    .map_err(|e| BusError::Other(format!("starting the WAL writer: {e}")))?;

    let shard_map = match crate::config::load_shard_map(&cfg.sharding) {
        Ok(m) => m,
        Err(e) => {
            stop.cancel();
            let _ = http_task.await;
            return Err(BusError::Other(e.to_string()));
        }
    };
    let shards = Arc::new(Shards::new(
        &cfg.sharding,
        shard_map,
        cfg.max_message_bytes,
        metrics.clone(),
    ));
    if let Some(path) = &cfg.sharding.map_file {
        shards.spawn_file_watch(path.clone(), cfg.sharding.map_reload_interval, stop.clone());
    }
    let state = Arc::new(BusState {
        cfg: cfg.clone(),
        store: store.clone(),
        registry,
        metrics: metrics.clone(),
        writer: writer_tx.clone(),
        tail: tail_tx,
        writable,
        stop: stop.clone(),
        next_control_id: AtomicU64::new(0),
        alerts,
        tls: tls.clone(),
        backups: backups.as_ref().map(|(b, _)| b.clone()),
        shards: shards.clone(),
        export_error: std::sync::Mutex::new(None),
        rule_statuses: std::sync::Mutex::new(Vec::new()),
        rule_activity: std::sync::Mutex::new(Default::default()),
        pushed_rules: std::sync::Mutex::new(None),
        rules_digest: std::sync::Mutex::new(String::new()),
        alerts_written: tokio::sync::watch::Sender::new(0),
    });

    let dash = Dashboard::new(state.clone(), tls.clone());
    dash.spawn_sampler();
    let _ = http_state.dashboard.set(crate::dashboard::router(dash));

    if let Some(export) = state.cfg.export_nats.clone() {
        // Held before retention first runs, whether or not NATS is up.
        let from = state
            .store
            .export_cursor()?
            .unwrap_or_else(|| state.store.first_offset());
        state.store.hold_retention(crate::store::Hold::Export, from);
        crate::export::spawn(state.clone(), export);
    }
    let detector = match state.cfg.detection.clone() {
        Some(detection) => Some(
            crate::detect::spawn(state.clone(), detection)
                .map_err(|e| BusError::Other(format!("starting the detector: {e}")))?,
        ),
        None => None,
    };
    let base_url = state.cfg.alerting.external_url.clone().unwrap_or_else(|| {
        let scheme = if cfg.http_tls { "https" } else { "http" };
        format!("{scheme}://{http_addr}")
    });
    for sink in state.cfg.alerting.sinks.clone() {
        // Saved before retention first runs, whether or not the receiver is up.
        let from = crate::sinks::start_cursor(&state, sink.kind)?;
        crate::sinks::spawn(state.clone(), sink, base_url.clone(), from);
    }
    spawn_retention(state.clone());
    if let (Some((_, newest)), Some(every)) =
        (&backups, cfg.backup.as_ref().and_then(|b| b.interval))
    {
        spawn_backups(state.clone(), every, *newest);
    }

    let incoming = crate::tls::incoming(grpc_listener, tls, metrics.clone(), stop.clone());
    let max = cfg.max_message_bytes;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            EventBusServer::new(EventBusService(state.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max.max(16 * 1024 * 1024)),
        )
        .add_service(AdminServer::new(AdminService(state.clone())).max_decoding_message_size(max));

    health.recovering.store(false, Ordering::SeqCst);
    health.serving.store(true, Ordering::SeqCst);
    info!(grpc = %grpc_addr, http = %http_addr, sync = cfg.sync.as_str(), "bus serving");

    let grace = cfg.shutdown_grace;
    let stop2 = stop.clone();
    let done = tokio::spawn(async move {
        let serve = router.serve_with_incoming_shutdown(incoming, stop2.clone().cancelled_owned());
        let served = tokio::select! {
            r = serve => r.map_err(BusError::from),
            // Past the grace period, streams still open are cut.
            _ = async { stop2.cancelled().await; tokio::time::sleep(grace).await } => {
                warn!(?grace, "shutdown grace elapsed; closing remaining connections");
                Ok(())
            }
        };
        health.serving.store(false, Ordering::SeqCst);
        // The detector saves its cursor, and may wait on the writer for its
        // last alerts: it stops before the writer and the store.
        if let Some(d) = detector {
            let joined = tokio::task::spawn_blocking(move || d.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                error!("the detector thread did not exit cleanly");
            }
        }
        drop(state);
        let _ = writer_tx.send(WriterMsg::Stop).await;
        drop(writer_tx);
        let joined = tokio::task::spawn_blocking(move || writer_thread.join()).await;
        if !matches!(joined, Ok(Ok(()))) {
            error!("the WAL writer thread did not exit cleanly");
        }
        let closed = tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(|e| BusError::Other(format!("closing the store: {e}")))?;
        let _ = http_task.await;
        info!("bus stopped");
        served?;
        closed.map_err(BusError::from)
    });

    Ok(RunningBus {
        grpc_addr,
        http_addr,
        metrics,
        stop,
        done,
    })
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), BusError> {
    let err = |source| BusError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}

/// Fills the recent-alerts list from the newest part of the store, so a
/// restarted bus still shows them; runs beside serving.
fn backfill_alerts(store: Arc<Store>, alerts: Arc<RecentAlerts>) {
    const SCAN: u64 = 100_000;
    tokio::task::spawn_blocking(move || {
        let from = store.next_offset().saturating_sub(SCAN);
        match store.read_from(from, SCAN as usize) {
            Ok(events) => alerts.observe(&events),
            Err(e) => warn!(error = %e, "could not read recent alerts from the store"),
        }
    });
}

type SharedBackups = Arc<tokio::sync::Mutex<Backups>>;

/// Opens the backup directory, if one is configured, with the time of the
/// newest backup it holds (Unix seconds).
async fn open_backups(cfg: &BusConfig) -> Result<Option<(SharedBackups, Option<i64>)>, BusError> {
    let Some(b) = &cfg.backup else {
        return Ok(None);
    };
    let dir = b.dir.clone();
    let opened = tokio::task::spawn_blocking(move || Backups::open(&dir))
        .await
        .map_err(|e| BusError::Other(format!("opening the backup dir: {e}")))??;
    let held = opened.list();
    let newest = held.last().map(|i| i.created_at);
    if same_filesystem(&b.dir, &cfg.data_dir) {
        warn!(
            dir = %b.dir.display(),
            data_dir = %cfg.data_dir.display(),
            "backup.dir is on the same filesystem as dataDir: backups will not survive losing that disk, \
             and while one runs it slows the WAL's fsyncs (docs/operations.md, Backups and restore)"
        );
    }
    info!(dir = %b.dir.display(), backups = held.len(), interval = ?b.interval, keep = b.keep, "backups enabled");
    Ok(Some((Arc::new(tokio::sync::Mutex::new(opened)), newest)))
}

fn same_filesystem(a: &std::path::Path, b: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    }
}

/// Takes a backup every `every`, the first one `every` after the newest
/// already in the directory (now, when there is none), so that restarts
/// neither postpone backups nor add extra ones. A failed backup is retried
/// within a minute.
fn spawn_backups(state: Arc<BusState>, every: Duration, newest: Option<i64>) {
    tokio::spawn(async move {
        let now = now_ns() / 1_000_000_000;
        let mut wait = newest.map_or(Duration::ZERO, |t| {
            Duration::from_secs(u64::try_from(t + every.as_secs() as i64 - now).unwrap_or(0))
        });
        loop {
            tokio::select! {
                _ = state.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = match state.backup("schedule").await {
                Ok(_) => every,
                Err(_) => every.min(Duration::from_secs(60)),
            };
        }
    });
}

fn spawn_retention(state: Arc<BusState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(state.cfg.retention_check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = state.stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let s = state.clone();
            let res = tokio::task::spawn_blocking(move || {
                s.store
                    .enforce_retention(now_ns(), s.cfg.retention, s.cfg.max_bytes)
            })
            .await;
            match res {
                Ok(Ok(r)) => {
                    let m = &state.metrics;
                    if r.deleted_by_age > 0 {
                        m.retention_deleted
                            .get_or_create(&reason("age"))
                            .inc_by(r.deleted_by_age);
                        info!(
                            events = r.deleted_by_age,
                            "retention: dropped events past their age"
                        );
                    }
                    if r.deleted_by_size > 0 {
                        m.retention_deleted
                            .get_or_create(&reason("size"))
                            .inc_by(r.deleted_by_size);
                        info!(
                            events = r.deleted_by_size,
                            "retention: dropped oldest events over the size cap"
                        );
                    }
                }
                Ok(Err(StoreError::Unavailable)) => {}
                Ok(Err(e)) => warn!(error = %e, "retention pass failed"),
                Err(_) => return,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_filesystem_compares_devices() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        assert!(super::same_filesystem(&a, &b));
        assert!(!super::same_filesystem(&a, std::path::Path::new("/proc")));
        assert!(!super::same_filesystem(&a, &tmp.path().join("missing")));
    }
}
