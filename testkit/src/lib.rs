//! What the workspace's tests share: a temp dir holding a real dev PKI
//! (`amoskys pki init`'s layout), a real bus started in-process on it
//! (RocksDB in the temp dir, mTLS on loopback), and the polling, metrics and
//! HTTP helpers every test crate needs. Each crate's `tests/common` keeps only
//! what is its own.
//!
//! Test support: a failed setup panics, which fails the test that asked.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![warn(missing_docs)]

pub mod fakeapi;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use amoskys_client::identity::Role;
use amoskys_client::pki::{self, CertAuthority, DevPkiOptions, Validity};
use amoskys_client::{BusClient, ClientOptions};
use amoskys_eventbus::{BusConfig, RunningBus, SyncPolicy};

/// A temp dir with a dev PKI in `pki/` (`ca`, `bus`, `agent`, `reader`,
/// `admin`) and room for a bus's data in `bus/`.
pub struct Env {
    /// Removed, with everything in it, when the `Env` drops.
    pub tmp: tempfile::TempDir,
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// A new temp dir with a fresh dev PKI.
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        pki::init_dev_pki(&DevPkiOptions::new(tmp.path().join("pki"))).unwrap();
        Self { tmp }
    }

    /// The temp dir.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// The TLS directory of one identity of the dev PKI.
    pub fn pki(&self, who: &str) -> PathBuf {
        self.tmp.path().join("pki").join(who)
    }

    /// Where the bus keeps its store.
    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("bus")
    }

    /// A bus config on loopback with any free ports.
    pub fn config(&self) -> BusConfig {
        self.config_on("127.0.0.1:0".parse().unwrap())
    }

    /// A bus config whose gRPC side listens on `listen` (the same address
    /// again after a restart), HTTP on any free port, group-commit fsync,
    /// and TLS files re-read every 100 ms so rotations show quickly.
    pub fn config_on(&self, listen: SocketAddr) -> BusConfig {
        let mut c = BusConfig::defaults(self.data_dir(), self.pki("bus"));
        c.listen = listen;
        c.http = "127.0.0.1:0".parse().unwrap();
        c.sync = SyncPolicy::Batch;
        c.tls_reload_interval = Duration::from_millis(100);
        c.shutdown_grace = Duration::from_secs(5);
        c
    }

    /// A bus on [`Env::config`].
    pub async fn start(&self) -> RunningBus {
        amoskys_eventbus::start(self.config()).await.unwrap()
    }

    /// A bus on [`Env::config_on`].
    pub async fn start_on(&self, listen: SocketAddr) -> RunningBus {
        amoskys_eventbus::start(self.config_on(listen))
            .await
            .unwrap()
    }

    /// Client options for `addr` with one identity of the dev PKI.
    pub fn opts(&self, addr: SocketAddr, who: &str) -> ClientOptions {
        ClientOptions::new(format!("https://{addr}"), self.pki(who))
    }

    /// A connected client for `addr` with one identity of the dev PKI.
    pub async fn client(&self, addr: SocketAddr, who: &str) -> BusClient {
        BusClient::connect(&self.opts(addr, who)).await.unwrap()
    }

    /// The dev CA, to issue more certificates in a test.
    pub fn ca(&self) -> CertAuthority {
        let dir = self.pki("ca");
        CertAuthority::from_pem(
            &std::fs::read_to_string(dir.join("tls.crt")).unwrap(),
            &std::fs::read_to_string(dir.join("tls.key")).unwrap(),
        )
        .unwrap()
    }

    /// A client certificate for `role` from `ca`, written to a new directory
    /// with the dev CA as `ca.crt`, so only the client side can be "wrong".
    pub fn issue_client(
        &self,
        name: &str,
        ca: &CertAuthority,
        role: Role,
        validity: Validity,
    ) -> PathBuf {
        let dir = self.tmp.path().join("extra").join(name);
        let mut c = ca.issue_client(name, role, validity).unwrap();
        c.ca_pem = std::fs::read_to_string(self.pki("ca").join("tls.crt")).unwrap();
        c.write_dir(&dir).unwrap();
        dir
    }
}

/// A loopback address nobody listens on right now.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// Polls `f` every 50 ms until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A finished command's stdout followed by its stderr, for messages.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The value of one metric line (name with labels, exactly as exposed); 0
/// when the line is absent, as Prometheus reads a counter not yet created.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// GET over plain HTTP: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap())
}

/// Every alert the bus's detection rules wrote, in stored order, read with
/// `client` (a reader).
pub async fn alerts(client: &mut BusClient) -> Vec<(amoskys_proto::Event, amoskys_proto::Alert)> {
    use amoskys_proto::event::Payload;
    client
        .query(amoskys_proto::QueryRequest {
            limit: 10_000,
            filter: Some(amoskys_proto::Filter {
                collectors: vec!["detect".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.payload.clone() {
            Some(Payload::Alert(a)) => Some((e, a)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_the_exact_line() {
        let text = "a_total 3\na_total{x=\"1\"} 5\nab 7\n";
        assert_eq!(metric(text, "a_total"), 3.0);
        assert_eq!(metric(text, "a_total{x=\"1\"}"), 5.0);
        assert_eq!(metric(text, "a"), 0.0);
    }

    #[tokio::test]
    async fn eventually_gives_up_after_the_timeout() {
        let mut n = 0;
        let got = eventually(Duration::from_millis(120), || {
            n += 1;
            async { None::<()> }
        })
        .await;
        assert!(got.is_none());
        assert!(n >= 2, "polled {n} times");
        let mut m = 0;
        let got = eventually(Duration::from_secs(5), || {
            m += 1;
            let v = (m == 3).then_some(m);
            async move { v }
        })
        .await;
        assert_eq!(got, Some(3));
    }
}
