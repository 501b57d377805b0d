//! This bus as one shard of many: the shard map it routes by, how a new map
//! arrives, and the calls it makes to the other shards.
//!
//! The map comes from a file (the operator's ConfigMap, mounted) that is
//! re-read on an interval rather than pushed over an admin RPC: a mounted
//! file is level-based, so a pod that restarts, or misses an update while
//! down, reads the current map at start without the operator having to find
//! it and push again, and the operator never needs a client certificate for
//! every pod. Only maps with a higher epoch are installed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use amoskys_client::shard::ShardMap;
use amoskys_client::{BusClient, ClientOptions};
use amoskys_proto::ShardAgentRequest;
use futures::future::join_all;
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{ShardingConfig, check_shard_index, read_shard_map};
use crate::metrics::{BusMetrics, reason};

/// The shard map this bus routes by, and its clients to the other shards.
pub struct Shards {
    /// This bus's index.
    pub index: u32,
    map: watch::Sender<Arc<ShardMap>>,
    peer_tls_dir: Option<PathBuf>,
    peer_timeout: Duration,
    max_message_bytes: usize,
    peers: Mutex<HashMap<String, BusClient>>,
    metrics: Arc<BusMetrics>,
}

/// What the other shards hold of one agent's incarnation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Elsewhere {
    /// The highest seq any of them stores.
    pub last_seq: u64,
    /// A shard where the agent has a live stream now.
    pub connected_on: Option<u32>,
    /// Shards that did not answer (down, or past the deadline).
    pub unreachable: Vec<u32>,
}

impl Shards {
    pub fn new(
        cfg: &ShardingConfig,
        map: ShardMap,
        max_message_bytes: usize,
        metrics: Arc<BusMetrics>,
    ) -> Self {
        let gauges = map.clone();
        let (map, _) = watch::channel(Arc::new(map));
        let s = Self {
            index: cfg.index,
            map,
            peer_tls_dir: cfg.peer_tls_dir.clone(),
            peer_timeout: cfg.peer_timeout,
            max_message_bytes,
            peers: Mutex::new(HashMap::new()),
            metrics,
        };
        s.metrics.shard_index.set(i64::from(cfg.index));
        s.publish_gauges(&gauges);
        s
    }

    fn publish_gauges(&self, m: &ShardMap) {
        self.metrics.shard_epoch.set(m.epoch as i64);
        self.metrics.shard_active.set(i64::from(m.active));
        self.metrics
            .shard_retiring
            .set(i64::from(m.is_retiring(self.index)));
    }

    /// The map in force.
    pub fn map(&self) -> Arc<ShardMap> {
        self.map.borrow().clone()
    }

    /// Follows map changes (a Publish stream watches for its agent moving).
    pub fn subscribe(&self) -> watch::Receiver<Arc<ShardMap>> {
        self.map.subscribe()
    }

    /// Installs `m` when its epoch is newer than the one in force and it
    /// still has a place for this shard; true when it was installed.
    pub fn install(&self, m: ShardMap) -> Result<bool, String> {
        let current = self.map();
        if m.epoch <= current.epoch {
            return Ok(false);
        }
        check_shard_index(self.index, &m).map_err(|e| e.to_string())?;
        if m.shards() > 1 && self.peer_tls_dir.is_none() {
            return Err("a map with peers needs sharding.peerTlsDir".into());
        }
        info!(
            shard = self.index,
            epoch = m.epoch,
            active = m.active,
            shards = m.shards(),
            retiring = m.is_retiring(self.index),
            "shard map installed"
        );
        self.publish_gauges(&m);
        self.map.send_replace(Arc::new(m));
        Ok(true)
    }

    /// Re-reads `path` every `every` (when its modification time or size
    /// changed) until `stop`. A map that does not parse, or has no place for
    /// this shard, is counted and logged; the previous map stays in force.
    pub fn spawn_file_watch(
        self: &Arc<Self>,
        path: PathBuf,
        every: Duration,
        stop: CancellationToken,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            let stamp = |p: &PathBuf| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
            };
            let mut seen = stamp(&path);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                let read = read_shard_map(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|m| me.install(m));
                if let Err(e) = read {
                    me.metrics.shard_map_errors.inc();
                    warn!(file = %path.display(), error = %e, "shard map refused; keeping the one in force");
                }
            }
        });
    }

    async fn peer(&self, url: &str) -> Result<BusClient, &'static str> {
        if let Some(c) = self.peers.lock().await.get(url) {
            return Ok(c.clone());
        }
        let dir = self.peer_tls_dir.as_ref().ok_or("connect")?;
        let mut opts = ClientOptions::new(url, dir);
        opts.max_message_bytes = self.max_message_bytes;
        let c = BusClient::connect(&opts).await.map_err(|e| {
            warn!(peer = url, error = %e, "cannot reach a peer shard");
            "connect"
        })?;
        self.peers.lock().await.insert(url.to_string(), c.clone());
        Ok(c)
    }

    /// One call to the shard at `url` (None: the map has no address for
    /// it), connecting included, within the peer deadline. A failure is
    /// counted by reason (`connect`, `rpc`, `timeout`), which it returns.
    pub(crate) async fn call<T, Fut>(
        &self,
        url: Option<&str>,
        f: impl FnOnce(BusClient) -> Fut,
    ) -> Result<T, &'static str>
    where
        Fut: std::future::Future<Output = Result<T, amoskys_client::ClientError>>,
    {
        let r = match url {
            None => Err("connect"),
            Some(url) => {
                let attempt = async {
                    let c = self.peer(url).await?;
                    match f(c).await {
                        Ok(v) => Ok(v),
                        Err(e) => {
                            warn!(peer = url, error = %e, "a peer shard refused a call");
                            // A broken channel is rebuilt on the next call.
                            self.peers.lock().await.remove(url);
                            Err("rpc")
                        }
                    }
                };
                tokio::time::timeout(self.peer_timeout, attempt)
                    .await
                    .unwrap_or(Err("timeout"))
            }
        };
        if let Err(why) = r {
            self.metrics
                .shard_peer_errors
                .get_or_create(&reason(why))
                .inc();
        }
        r
    }

    /// Asks every other shard of `map`, in parallel and each within the
    /// peer deadline, what it holds of the agent's incarnation.
    pub async fn elsewhere(&self, map: &ShardMap, agent_id: &str, incarnation: u64) -> Elsewhere {
        let asks = (0..map.shards())
            .filter(|&s| s != self.index)
            .map(|s| async move {
                let req = ShardAgentRequest {
                    agent_id: agent_id.to_string(),
                    incarnation,
                };
                let r = self
                    .call(map.url(s), |mut c| async move {
                        Ok(c.admin.shard_agent(req).await?.into_inner())
                    })
                    .await;
                (s, r)
            });
        let mut out = Elsewhere::default();
        for (shard, r) in join_all(asks).await {
            match r {
                Ok(r) => {
                    out.last_seq = out.last_seq.max(r.last_seq);
                    if r.connected {
                        out.connected_on = Some(shard);
                    }
                }
                Err(_) => {
                    out.unreachable.push(shard);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(epoch: u64, active: u32, shards: usize) -> ShardMap {
        ShardMap {
            epoch,
            active,
            peers: (0..shards).map(|i| format!("https://s{i}:7443")).collect(),
        }
    }

    #[test]
    fn only_newer_maps_with_a_place_for_this_shard_are_installed() {
        let cfg = ShardingConfig {
            index: 2,
            map: map(3, 3, 3),
            peer_tls_dir: Some("/p".into()),
            ..ShardingConfig::default()
        };
        let m = Arc::new(BusMetrics::new());
        let s = Shards::new(&cfg, cfg.map.clone(), 1 << 20, m.clone());
        assert_eq!(s.install(map(3, 5, 5)), Ok(false));
        assert_eq!(s.install(map(2, 5, 5)), Ok(false));
        assert!(
            s.install(map(4, 2, 2))
                .unwrap_err()
                .contains("sharding.index")
        );
        assert_eq!(s.map().active, 3);
        assert_eq!(s.install(map(5, 2, 3)), Ok(true));
        assert_eq!((s.map().epoch, s.map().active), (5, 2));
        assert_eq!(m.shard_retiring.get(), 1);
        assert_eq!(m.shard_epoch.get(), 5);
    }
}
