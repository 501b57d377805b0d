//! mTLS for the bus: server configs from the TLS material, hot reload, and
//! the accept loop that hands authenticated connections to tonic.
//!
//! The server keeps its `rustls::ServerConfig` behind a lock and rebuilds it
//! whenever `tls.crt`, `tls.key` or `ca.crt` change on disk. New handshakes
//! take the current config; established connections keep the one they were
//! made with, so streams in flight never notice a rotation.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tracing::{info, warn};

use crate::metrics::{BusMetrics, reason};
use amoskys_client::identity::PeerIdentity;
use amoskys_client::tls::{TlsError, TlsMaterial, crypto_provider};

/// A server config that requires a client certificate chaining to ca.crt.
pub fn server_config(m: &TlsMaterial) -> Result<ServerConfig, TlsError> {
    build_server_config(m, true, b"h2")
}

/// The HTTP side's config: a client certificate is asked for and checked
/// when offered (an admin certificate signs in to the dashboard) but a
/// browser without one may still connect and use a token.
pub fn http_server_config(m: &TlsMaterial) -> Result<ServerConfig, TlsError> {
    build_server_config(m, false, b"http/1.1")
}

fn build_server_config(
    m: &TlsMaterial,
    require_client: bool,
    alpn: &[u8],
) -> Result<ServerConfig, TlsError> {
    let provider = crypto_provider();
    let builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(m.roots()?), provider.clone());
    let builder = if require_client {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder.build().map_err(|e| TlsError::Verifier {
        dir: m.dir.clone(),
        message: e.to_string(),
    })?;
    let rustls_err = |source| TlsError::Rustls {
        dir: m.dir.clone(),
        source,
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(rustls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.certs()?, m.key()?)
        .map_err(rustls_err)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// The server's TLS config, rebuilt when its files change.
pub struct ReloadingTls {
    dir: PathBuf,
    current: RwLock<Arc<ServerConfig>>,
    http: RwLock<Arc<ServerConfig>>,
    not_after: std::sync::atomic::AtomicI64,
    fingerprint: Mutex<u64>,
    serial: RwLock<String>,
    metrics: Arc<BusMetrics>,
}

impl ReloadingTls {
    pub fn load(dir: &Path, metrics: Arc<BusMetrics>) -> Result<Arc<Self>, TlsError> {
        let m = TlsMaterial::read(dir)?;
        let cfg = server_config(&m)?;
        let http = http_server_config(&m)?;
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(cfg)),
            http: RwLock::new(Arc::new(http)),
            not_after: std::sync::atomic::AtomicI64::new(m.leaf_not_after().unwrap_or(0)),
            fingerprint: Mutex::new(m.fingerprint()),
            serial: RwLock::new(m.leaf_serial().unwrap_or_default()),
            metrics,
        }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The config for the HTTP side when it serves TLS.
    pub fn http_current(&self) -> Arc<ServerConfig> {
        self.http.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// When the server certificate now in use expires (unix seconds).
    pub fn not_after(&self) -> i64 {
        self.not_after.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Serial of the server certificate now in use.
    pub fn serial(&self) -> String {
        self.serial
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the files; swaps the config when they changed and are valid.
    /// A half-written or inconsistent set is refused and the old config kept
    /// (the next check tries again).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let m = TlsMaterial::read(&self.dir)?;
        let fp = m.fingerprint();
        let mut last = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        if *last == fp {
            return Ok(false);
        }
        let cfg = server_config(&m)?;
        let http = http_server_config(&m)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
        *self.http.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(http);
        self.not_after.store(
            m.leaf_not_after().unwrap_or(0),
            std::sync::atomic::Ordering::Relaxed,
        );
        *self.serial.write().unwrap_or_else(|p| p.into_inner()) =
            m.leaf_serial().unwrap_or_default();
        *last = fp;
        Ok(true)
    }

    /// Checks the files every `every` until `stop` fires.
    pub fn spawn_watcher(
        self: &Arc<Self>,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut last_err = String::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let me2 = me.clone();
                match tokio::task::spawn_blocking(move || me2.reload_if_changed()).await {
                    Ok(Ok(true)) => {
                        me.metrics.tls_reloads.inc();
                        last_err.clear();
                        info!(dir = %me.dir.display(), serial = %me.serial(), "reloaded TLS certificate, key and CA bundle");
                    }
                    Ok(Ok(false)) => last_err.clear(),
                    Ok(Err(e)) => {
                        let msg = e.to_string();
                        if msg != last_err {
                            me.metrics.tls_reload_errors.inc();
                            warn!(error = %msg, "TLS files changed but cannot be used yet; keeping the current ones");
                            last_err = msg;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

/// Connection info tonic attaches to each request on a TLS connection.
#[derive(Clone, Debug)]
pub struct TlsConnectInfo {
    pub peer: PeerIdentity,
    pub remote: SocketAddr,
}

/// An authenticated TLS connection.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;
    fn connect_info(&self) -> TlsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Why a handshake failed, as a metric label.
pub fn classify_handshake_error(e: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error as R};
    let Some(r) = e.get_ref().and_then(|inner| inner.downcast_ref::<R>()) else {
        return match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => "closed",
            io::ErrorKind::InvalidData => "protocol",
            _ => "io",
        };
    };
    match r {
        R::NoCertificatesPresented => "no_client_cert",
        R::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        R::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        R::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "not_yet_valid",
        R::InvalidCertificate(CertificateError::Revoked) => "revoked",
        R::InvalidCertificate(_) => "bad_certificate",
        R::AlertReceived(_) => "peer_alert",
        R::NoApplicationProtocol => "no_alpn",
        _ => "protocol",
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections, completes TLS handshakes concurrently, and
/// yields authenticated connections until `stop` fires.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    metrics: Arc<BusMetrics>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        let why = classify_handshake_error(&e);
                        metrics
                            .tls_handshake_failures
                            .get_or_create(&reason(why))
                            .inc();
                        tracing::debug!(%remote, reason = why, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics
                            .tls_handshake_failures
                            .get_or_create(&reason("timeout"))
                            .inc();
                        return;
                    }
                };
                let peer = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|der| PeerIdentity::from_der(der));
                let peer = match peer {
                    Some(Ok(p)) => p,
                    Some(Err(msg)) => {
                        metrics
                            .tls_handshake_failures
                            .get_or_create(&reason("bad_certificate"))
                            .inc();
                        warn!(%remote, error = %msg, "client certificate unreadable");
                        return;
                    }
                    None => {
                        metrics
                            .tls_handshake_failures
                            .get_or_create(&reason("no_client_cert"))
                            .inc();
                        return;
                    }
                };
                let _ = tx
                    .send(Ok(TlsConn {
                        inner: stream,
                        info: TlsConnectInfo { peer, remote },
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
