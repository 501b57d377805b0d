#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The agent's watch of its node's pods against the in-memory Kubernetes
//! API: only this node's pods are learned, changes and deletions arrive
//! through the watch, and events are given the identity of their pod.

use std::sync::Arc;
use std::time::Duration;

use amoskys_agents::metrics::AgentMetrics;
use amoskys_agents::pods::{self, Pods};
use amoskys_agents::spool::Draft;
use amoskys_proto::event::Payload;
use amoskys_proto::{FlowEvent, K8sIdentity, ProcessEvent, Severity};
use amoskys_testkit::fakeapi::FakeApi;
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn pod(name: &str, node: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": "shop",
                 "containers": [{"name": "main", "image": format!("{name}:1")}]},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}],
                   "containerStatuses": [{"name": "main", "image": format!("{name}:1"),
                       "containerID": format!("cri-o://{}", "c".repeat(64)), "imageID": "",
                       "ready": true, "restartCount": 0}]}
    }))
    .unwrap()
}

fn identity_of_flow(pods: &Pods, src: &str) -> Option<K8sIdentity> {
    let mut d = Draft::new(
        "flow",
        Severity::Info,
        Payload::Flow(FlowEvent {
            src_ip: src.into(),
            dst_ip: "203.0.113.9".into(),
            ..Default::default()
        }),
    );
    pods.enrich(&mut d);
    d.k8s
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_watch_learns_only_this_nodes_pods_and_follows_changes() {
    let (client, api) = FakeApi::client();
    api.insert(&pod("web", "node-a", "10.1.0.5"));
    // The API server gives each pod its UID.
    let uid_a = api
        .get::<Pod>(Some("shop"), "web")
        .unwrap()
        .metadata
        .uid
        .unwrap();
    api.insert(&pod("db", "node-b", "10.1.1.5"));

    let pods = Arc::new(Pods::new(Duration::from_millis(100)));
    let metrics = Arc::new(AgentMetrics::new());
    let stop = CancellationToken::new();
    let task = tokio::spawn(pods::watch(
        client,
        "node-a".into(),
        pods.clone(),
        metrics.clone(),
        stop.clone(),
    ));

    until("node-a's pod", || pods.len() == 1).await;
    let id = identity_of_flow(&pods, "10.1.0.5").unwrap();
    assert_eq!((id.namespace.as_str(), id.pod.as_str()), ("shop", "web"));
    assert_eq!(id.service_account, "shop");
    assert_eq!(identity_of_flow(&pods, "10.1.1.5"), None, "node-b's pod");

    // A process in the pod's container: pod and container identity.
    let mut d = Draft::new(
        "process",
        Severity::Info,
        Payload::Process(ProcessEvent {
            pod_uid: uid_a.clone(),
            container_id: "c".repeat(64),
            ..Default::default()
        }),
    );
    pods.enrich(&mut d);
    let id = d.k8s.unwrap();
    assert_eq!(
        (id.container.as_str(), id.image.as_str()),
        ("main", "web:1")
    );
    assert_eq!(id.labels.get("app").map(String::as_str), Some("web"));

    // A pod scheduled later arrives through the watch; one on another
    // node does not.
    api.insert(&pod("cache", "node-a", "10.1.0.6"));
    api.insert(&pod("queue", "node-b", "10.1.1.6"));
    until("the new pod", || {
        identity_of_flow(&pods, "10.1.0.6").is_some()
    })
    .await;
    assert_eq!(identity_of_flow(&pods, "10.1.1.6"), None);

    // A deleted pod goes after its grace, with no other change on the
    // node to push it out.
    api.delete::<Pod>(Some("shop"), "web");
    until("the deleted pod to go", || {
        identity_of_flow(&pods, "10.1.0.5").is_none()
    })
    .await;
    assert_eq!(pods.len(), 1);
    until("the gauge", || metrics.pods_known.get() == 1).await;
    assert_eq!(metrics.pod_watch_errors.get(), 0);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
