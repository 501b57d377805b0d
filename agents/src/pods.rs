//! Kubernetes identity for events: the pods on this node, learned from a
//! watch of the API (Pods with `spec.nodeName=<node>`, nothing else), found
//! by pod UID for process events (their cgroup names it) and by pod IP for
//! flows. Outside a cluster nothing here runs and events carry no identity.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use amoskys_proto::{K8sIdentity, event::Payload};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::AgentMetrics;
use crate::spool::Draft;

/// How long a deleted pod is still known: a container's last processes
/// exit, and its last flows end, after the API has already removed the pod.
pub const DELETED_POD_GRACE: Duration = Duration::from_secs(120);

/// What an event learns about the pod it is about.
#[derive(Debug, Clone, PartialEq, Default)]
struct PodInfo {
    identity: K8sIdentity,
    /// Container ID (without the runtime's `containerd://` prefix) to its
    /// name and image.
    containers: HashMap<String, (String, String)>,
    /// Pod IPs that are the pod's own (not the node's, for host-network pods).
    ips: Vec<String>,
}

impl PodInfo {
    fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let uid = meta.uid.clone()?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut containers = HashMap::new();
        if let Some(st) = status {
            let all = st
                .container_statuses
                .iter()
                .chain(st.init_container_statuses.iter())
                .chain(st.ephemeral_container_statuses.iter())
                .flatten();
            for c in all {
                if let Some(id) = c.container_id.as_deref() {
                    let id = id.split_once("://").map_or(id, |(_, id)| id);
                    containers.insert(id.to_string(), (c.name.clone(), c.image.clone()));
                }
            }
        }
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let ips = if host_network {
            Vec::new()
        } else {
            status
                .map(|st| {
                    st.pod_ips
                        .iter()
                        .flatten()
                        .map(|ip| ip.ip.clone())
                        .chain(st.pod_ip.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        Some(Self {
            identity: K8sIdentity {
                namespace: meta.namespace.clone().unwrap_or_default(),
                pod: meta.name.clone().unwrap_or_default(),
                pod_uid: uid,
                labels: meta
                    .labels
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_default(),
                container: String::new(),
                image: String::new(),
            },
            containers,
            ips,
        })
    }

    /// The identity for one of its containers (pod-level when unknown).
    fn identity(&self, container_id: &str) -> K8sIdentity {
        let mut id = self.identity.clone();
        if let Some((name, image)) = self.containers.get(container_id) {
            id.container = name.clone();
            id.image = image.clone();
        }
        id
    }
}

#[derive(Default)]
struct Index {
    by_uid: HashMap<String, Arc<PodInfo>>,
    by_ip: HashMap<String, String>,
    /// Deleted pods (uid) and when: dropped after the grace.
    gone: VecDeque<(Instant, String)>,
    /// Pods of a re-list under way, swapped in when it is complete.
    relisting: Option<Vec<Pod>>,
}

impl Index {
    fn insert(&mut self, info: PodInfo) {
        let uid = info.identity.pod_uid.clone();
        // A re-applied pod is no longer going away.
        self.gone.retain(|(_, u)| *u != uid);
        if let Some(old) = self.by_uid.get(&uid) {
            for ip in &old.ips {
                if self.by_ip.get(ip) == Some(&uid) {
                    self.by_ip.remove(ip);
                }
            }
        }
        for ip in &info.ips {
            self.by_ip.insert(ip.clone(), uid.clone());
        }
        self.by_uid.insert(uid, Arc::new(info));
    }

    fn forget(&mut self, uid: &str) {
        if let Some(old) = self.by_uid.remove(uid) {
            for ip in &old.ips {
                if self.by_ip.get(ip).map(String::as_str) == Some(uid) {
                    self.by_ip.remove(ip);
                }
            }
        }
    }

    fn expire(&mut self, now: Instant, grace: Duration) {
        while let Some((at, _)) = self.gone.front() {
            if now.duration_since(*at) < grace {
                break;
            }
            if let Some((_, uid)) = self.gone.pop_front() {
                self.forget(&uid);
            }
        }
    }
}

/// The pods on this node, shared by the watch that fills it and the spool
/// writer that reads it.
pub struct Pods {
    index: RwLock<Index>,
    grace: Duration,
}

impl Default for Pods {
    fn default() -> Self {
        Self::new(DELETED_POD_GRACE)
    }
}

impl Pods {
    /// Empty, keeping deleted pods for `grace`.
    pub fn new(grace: Duration) -> Self {
        Self {
            index: RwLock::new(Index::default()),
            grace,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one watch event.
    pub fn apply(&self, event: WatchEvent<Pod>) {
        let now = Instant::now();
        let mut ix = self.write();
        match event {
            WatchEvent::Apply(pod) => {
                if let Some(info) = PodInfo::from_pod(&pod) {
                    ix.insert(info);
                }
            }
            WatchEvent::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid {
                    ix.gone.push_back((now, uid));
                }
            }
            WatchEvent::Init => ix.relisting = Some(Vec::new()),
            WatchEvent::InitApply(pod) => ix.relisting.get_or_insert_with(Vec::new).push(pod),
            WatchEvent::InitDone => {
                let listed = ix.relisting.take().unwrap_or_default();
                let infos: Vec<PodInfo> = listed.iter().filter_map(PodInfo::from_pod).collect();
                // Pods missing from a re-list were deleted while the watch
                // was away: they get the same grace as a seen deletion.
                let missing: Vec<String> = ix
                    .by_uid
                    .keys()
                    .filter(|u| !infos.iter().any(|i| &i.identity.pod_uid == *u))
                    .filter(|u| !ix.gone.iter().any(|(_, g)| g == *u))
                    .cloned()
                    .collect();
                for uid in missing {
                    ix.gone.push_back((now, uid));
                }
                for info in infos {
                    ix.insert(info);
                }
            }
        }
        let grace = self.grace;
        ix.expire(now, grace);
    }

    /// Forgets the deleted pods whose grace is over.
    pub fn expire(&self) {
        let grace = self.grace;
        self.write().expire(Instant::now(), grace);
    }

    /// Pods known (deleted ones in their grace included).
    pub fn len(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_uid
            .len()
    }

    /// Whether no pod is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the identity of the pod `d` is about, if it is one of this
    /// node's: a process by its pod UID (and container ID); a flow by the
    /// pod of the process that owns its socket (which also covers pods in
    /// the host network), else its source IP, else its destination IP.
    pub fn enrich(&self, d: &mut Draft) {
        if d.k8s.is_some() {
            return;
        }
        let ix = self.index.read().unwrap_or_else(|p| p.into_inner());
        d.k8s = match &d.payload {
            Payload::Process(p) if !p.pod_uid.is_empty() => ix
                .by_uid
                .get(&p.pod_uid)
                .map(|info| info.identity(&p.container_id)),
            Payload::Flow(f) => match ix.by_uid.get(&f.pod_uid) {
                Some(info) => Some(info.identity(&f.container_id)),
                None => [&f.src_ip, &f.dst_ip]
                    .into_iter()
                    .find_map(|ip| ix.by_ip.get(ip.as_str()))
                    .and_then(|uid| ix.by_uid.get(uid))
                    .map(|info| info.identity.clone()),
            },
            _ => None,
        };
    }
}

/// Watches this node's pods into `pods` until `stop`; reconnects with
/// backoff, counting errors, and never ends the agent.
pub async fn watch(
    client: Client,
    node: String,
    pods: Arc<Pods>,
    metrics: Arc<AgentMetrics>,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut events = watcher::watcher(api, cfg).default_backoff().boxed();
    let mut ready = false;
    // Deleted pods expire on a clock too: a quiet node sends no events.
    let mut tick = tokio::time::interval((pods.grace / 2).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                pods.expire();
                metrics.pods_known.set(pods.len() as i64);
                continue;
            }
            next = events.next() => next,
        };
        match next {
            None => return,
            Some(Ok(e)) => {
                let done = matches!(e, WatchEvent::InitDone);
                pods.apply(e);
                metrics.pods_known.set(pods.len() as i64);
                if done && !ready {
                    ready = true;
                    info!(node = %node, pods = pods.len(), "pods on this node listed");
                }
            }
            Some(Err(e)) => {
                metrics.pod_watch_errors.inc();
                warn!(error = %e, node = %node, "watching this node's pods failed; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::{FlowEvent, ProcessEvent, Severity};
    use serde_json::json;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const CID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn pod(name: &str, uid: &str, ip: &str, host_network: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid,
                         "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "serviceAccountName": "web",
                     "hostNetwork": host_network,
                     "containers": [{"name": "nginx", "image": "nginx:1.27"}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}],
                       "containerStatuses": [{"name": "nginx", "image": "nginx:1.27",
                           "containerID": format!("containerd://{CID}"), "imageID": "",
                           "ready": true, "restartCount": 0}]}
        }))
        .unwrap()
    }

    fn process(uid: &str, cid: &str) -> Draft {
        Draft::new(
            "process",
            Severity::Info,
            Payload::Process(ProcessEvent {
                pod_uid: uid.into(),
                container_id: cid.into(),
                name: "sh".into(),
                ..Default::default()
            }),
        )
    }

    fn flow(src: &str, dst: &str) -> Draft {
        Draft::new(
            "flow",
            Severity::Info,
            Payload::Flow(FlowEvent {
                src_ip: src.into(),
                dst_ip: dst.into(),
                ..Default::default()
            }),
        )
    }

    fn enriched(pods: &Pods, mut d: Draft) -> Option<K8sIdentity> {
        pods.enrich(&mut d);
        d.k8s
    }

    #[test]
    fn processes_get_pod_and_container_identity_by_uid() {
        let pods = Pods::default();
        pods.apply(WatchEvent::Apply(pod("web-1", UID, "10.1.0.5", false)));
        let id = enriched(&pods, process(UID, CID)).unwrap();
        assert_eq!(
            (id.namespace.as_str(), id.pod.as_str(), id.pod_uid.as_str()),
            ("shop", "web-1", UID)
        );
        assert_eq!(id.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(id.service_account, "web");
        assert_eq!(
            (id.container.as_str(), id.image.as_str()),
            ("nginx", "nginx:1.27")
        );
        // A container the status does not list yet: the pod, without one.
        let id = enriched(&pods, process(UID, &"b".repeat(64))).unwrap();
        assert_eq!((id.pod.as_str(), id.container.as_str()), ("web-1", ""));
        // Host processes and other nodes' pods: nothing.
        assert_eq!(enriched(&pods, process("", "")), None);
        assert_eq!(enriched(&pods, process(&UID.replace('0', "9"), CID)), None);
    }

    #[test]
    fn flows_get_the_pod_that_owns_either_address_but_not_host_network_pods() {
        let pods = Pods::default();
        pods.apply(WatchEvent::Apply(pod("web-1", UID, "10.1.0.5", false)));
        let other = "11111111-2222-3333-4444-555555555555";
        pods.apply(WatchEvent::Apply(pod(
            "node-exporter",
            other,
            "192.168.1.10",
            true,
        )));
        let id = enriched(&pods, flow("10.1.0.5", "1.1.1.1")).unwrap();
        assert_eq!(id.pod, "web-1");
        assert_eq!(id.container, "", "a flow names no container");
        assert_eq!(
            enriched(&pods, flow("8.8.8.8", "10.1.0.5")).unwrap().pod,
            "web-1"
        );
        // The node's own address belongs to no pod.
        assert_eq!(enriched(&pods, flow("192.168.1.10", "1.1.1.1")), None);
        // ...but a flow whose socket a host-network pod's process owns is
        // that pod's, with the container; the owner wins over addresses.
        let mut owned = flow("192.168.1.10", "10.1.0.5");
        if let Payload::Flow(f) = &mut owned.payload {
            f.pod_uid = other.into();
            f.container_id = CID.into();
        }
        let id = enriched(&pods, owned).unwrap();
        assert_eq!(
            (id.pod.as_str(), id.container.as_str()),
            ("node-exporter", "nginx")
        );
    }

    #[test]
    fn deleted_pods_stay_known_for_the_grace_and_relists_replace_the_set() {
        let pods = Pods::new(Duration::from_millis(50));
        pods.apply(WatchEvent::Apply(pod("web-1", UID, "10.1.0.5", false)));
        pods.apply(WatchEvent::Delete(pod("web-1", UID, "10.1.0.5", false)));
        assert!(
            enriched(&pods, process(UID, CID)).is_some(),
            "within the grace"
        );
        std::thread::sleep(Duration::from_millis(60));
        pods.apply(WatchEvent::Init);
        pods.apply(WatchEvent::InitDone);
        assert_eq!(enriched(&pods, process(UID, CID)), None);
        assert_eq!(enriched(&pods, flow("10.1.0.5", "1.1.1.1")), None);

        // A pod the re-list no longer has goes the same way; a new one and
        // a new IP for an old one arrive with the re-list.
        let other = "11111111-2222-3333-4444-555555555555";
        pods.apply(WatchEvent::Apply(pod("old", other, "10.1.0.7", false)));
        pods.apply(WatchEvent::Init);
        pods.apply(WatchEvent::InitApply(pod("web-2", UID, "10.1.0.9", false)));
        assert_eq!(
            enriched(&pods, process(UID, CID)),
            None,
            "not before InitDone"
        );
        pods.apply(WatchEvent::InitDone);
        assert_eq!(enriched(&pods, flow("10.1.0.9", "x")).unwrap().pod, "web-2");
        assert_eq!(enriched(&pods, flow("10.1.0.7", "x")).unwrap().pod, "old");
        std::thread::sleep(Duration::from_millis(60));
        pods.apply(WatchEvent::Init);
        pods.apply(WatchEvent::InitApply(pod("web-2", UID, "10.1.0.9", false)));
        pods.apply(WatchEvent::InitDone);
        assert_eq!(enriched(&pods, flow("10.1.0.7", "x")), None);
        assert_eq!(pods.len(), 1);
    }
}
