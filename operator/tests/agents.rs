#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! `Agent` resources from a real bus registry: a bus in-process (RocksDB on
//! a temp dir, mTLS on loopback) fed by a real agent, read with the admin
//! certificate the way the operator does, written into the in-memory API.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use amoskys_client::Pems;
use amoskys_client::pki::{DevPkiOptions, init_dev_pki};
use amoskys_eventbus::config::{BusConfig, SyncPolicy};
use amoskys_operator::controller::agents::{
    History, Registry, RegistryReader, ReplicaUrl, node_names, sync_set,
};
use amoskys_operator::crd::{Agent, AgentSet};
use common::{NS, World, in_ns, sample_bus, sample_set, world_at};
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use time::OffsetDateTime;

fn node(name: &str) -> Node {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}))
        .unwrap()
}

fn agent_pod(set: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{set}-agent-{node}"), "namespace": NS,
                     "labels": amoskys_operator::labels::selector("agent", set)},
        "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
    }))
    .unwrap()
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn pems(dir: &std::path::Path) -> Pems {
    let r = |f: &str| std::fs::read(dir.join(f)).unwrap();
    Pems {
        ca: r("ca.crt"),
        cert: r("tls.crt"),
        key: r("tls.key"),
    }
}

fn replica(bus: SocketAddr) -> ReplicaUrl {
    (format!("https://{bus}"), Some("localhost".into()))
}

async fn registry(bus: SocketAddr, admin: &Pems) -> Registry {
    let r = RegistryReader::default().read(&[replica(bus)], admin).await;
    assert!(r.complete(), "{:?}", r.unreachable);
    r
}

/// Reads the registry until `ok` holds for the agent's record.
async fn registry_until(
    bus: SocketAddr,
    admin: &Pems,
    ok: impl Fn(&amoskys_proto::AgentRecord) -> bool,
) -> Registry {
    for _ in 0..100 {
        let r = registry(bus, admin).await;
        if r.agents.get("nodes/node-a").is_some_and(&ok) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the registry never showed the expected record");
}

fn agent(w: &World, name: &str) -> Option<Agent> {
    w.api.get(Some(NS), name)
}

async fn sync(w: &World, reg: Option<&Registry>, history: &History) {
    let set: AgentSet = w.api.get(Some(NS), "nodes").unwrap();
    let nodes = node_names(&w.ctx).await.unwrap();
    sync_set(&w.ctx, &set, &nodes, reg, history).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_resources_follow_the_bus_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    init_dev_pki(&DevPkiOptions::new(&pki)).unwrap();
    let mut cfg = BusConfig::defaults(tmp.path().join("bus"), pki.join("bus"));
    cfg.listen = free_addr();
    cfg.http = "127.0.0.1:0".parse().unwrap();
    cfg.sync = SyncPolicy::Batch;
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let addr = bus.grpc_addr;

    let mut f = amoskys_agents::config::AgentConfigFile::default();
    f.collectors.process.enabled = false;
    f.collectors.inventory.enabled = false;
    f.collectors.synthetic.enabled = true;
    f.collectors.synthetic.rate = 50;
    f.heartbeat_interval = Some("200ms".into());
    let agent_cfg = amoskys_agents::config::resolve(
        f,
        amoskys_agents::config::AgentOverrides {
            // What the DaemonSet passes: `<agentset>/<node>`.
            agent_id: Some("nodes/node-a".into()),
            node: Some("node-a".into()),
            bus: Some(format!("https://{addr}")),
            tls_dir: Some(pki.join("agent")),
            spool_dir: Some(tmp.path().join("spool")),
            http: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let running = amoskys_agents::start(agent_cfg).await.unwrap();

    let w = world_at(OffsetDateTime::now_utc());
    w.api.insert(&sample_bus());
    w.api.insert(&sample_set());
    for n in ["node-a", "node-b", "node-c"] {
        w.api.insert(&node(n));
    }
    // The DaemonSet runs on a and b; c is excluded by its node selector.
    w.api.insert(&in_ns(agent_pod("nodes", "node-a")));
    w.api.insert(&in_ns(agent_pod("nodes", "node-b")));

    let admin = pems(&pki.join("admin"));
    let reg = registry_until(addr, &admin, |r| {
        r.events > 0 && r.last_heartbeat.as_ref().is_some_and(|h| h.acked > 0)
    })
    .await;
    // The bus's own certificate and the agent's count as loaded.
    let agent_serial = amoskys_operator::rotation::cert_facts(
        &std::fs::read_to_string(pki.join("agent/tls.crt")).unwrap(),
    )
    .unwrap()
    .0;
    assert!(
        reg.loaded_serials.contains(&agent_serial),
        "{:?}",
        reg.loaded_serials
    );
    assert_eq!(reg.loaded_serials.len(), 2);
    // Each replica's own stats, which retiring shards are removed by.
    let own = &reg.shards[&0];
    assert!(own.events_stored > 0 && own.newest_stored_at > 0, "{own:?}");
    assert!(!own.retiring && own.shards.is_empty());

    let history = History::default();
    sync(&w, Some(&reg), &history).await;
    let a = agent(&w, "nodes-node-a").expect("an Agent for node-a");
    assert_eq!(a.spec.agent_id, "nodes/node-a");
    assert_eq!(
        a.metadata.owner_references.as_ref().unwrap()[0].kind,
        "AgentSet"
    );
    let st = a.status.unwrap();
    assert_eq!(st.phase, "Running", "{}", st.reason);
    let rec = &reg.agents["nodes/node-a"];
    assert_eq!(st.events_total, rec.events);
    assert!(st.events_total > 0);
    assert!(st.last_seen.is_some());
    assert_eq!(st.cert_serial, agent_serial);
    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert!(
        st.collectors
            .iter()
            .any(|c| c.name == "synthetic" && c.mode == "rate"),
        "{:?}",
        st.collectors
    );
    let b = agent(&w, "nodes-node-b").expect("an Agent for node-b");
    assert_eq!(b.status.unwrap().phase, "Pending");
    assert!(agent(&w, "nodes-node-c").is_none(), "no pod on node-c");

    // Connections are kept from one read to the next, and dialled again
    // when the credentials change or a read fails.
    let reader = RegistryReader::default();
    for _ in 0..3 {
        assert!(reader.read(&[replica(addr)], &admin).await.complete());
    }
    assert_eq!(reader.connects(), 1);
    let denied = reader
        .read(&[replica(addr)], &pems(&pki.join("reader")))
        .await;
    assert_eq!(reader.connects(), 2);
    assert!(
        denied.unreachable[0]
            .1
            .to_lowercase()
            .contains("permission"),
        "{:?}",
        denied.unreachable
    );

    // One replica of two does not answer: the other's records are read,
    // and rotation is given no loaded serials to go on.
    let dead = replica(free_addr());
    let partial = reader.read(&[replica(addr), dead.clone()], &admin).await;
    assert_eq!(
        reader.connects(),
        3,
        "the failed connection is dialled again"
    );
    assert!(partial.agents.contains_key("nodes/node-a"));
    assert_eq!(partial.unreachable.len(), 1);
    assert_eq!(partial.unreachable[0].0, dead.0);
    assert!(partial.loaded_for_rotation().is_none());
    assert_eq!(
        reg.loaded_for_rotation(),
        Some(reg.loaded_serials.as_slice())
    );
    reader.retain(&[replica(addr)].into());
    reader.read(&[replica(addr)], &admin).await;
    assert_eq!(reader.connects(), 3);
    reader.retain(&Default::default());
    reader.read(&[replica(addr)], &admin).await;
    assert_eq!(
        reader.connects(),
        4,
        "a dropped replica's connection is closed"
    );

    // An agent whose record a partial registry lacks keeps its status; a
    // complete registry without it means the bus has never heard of it.
    let lacking = Registry {
        unreachable: vec![(dead.0.clone(), "refused".into())],
        ..Default::default()
    };
    sync(&w, Some(&lacking), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Running");
    sync(&w, Some(&Registry::default()), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Pending");

    // Heartbeats stop arriving (the clock moves past the missed-heartbeat
    // window while the registry still says connected).
    w.clock.advance(Duration::from_secs(31));
    sync(&w, Some(&reg), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Disconnected");
    assert!(st.reason.contains("no heartbeat"), "{}", st.reason);

    // The agent goes away: its stream closes and the bus says so.
    running.shutdown().await;
    let reg = registry_until(addr, &admin, |r| !r.connected).await;
    sync(&w, Some(&reg), &history).await;
    let st = agent(&w, "nodes-node-a").unwrap().status.unwrap();
    assert_eq!(st.phase, "Disconnected");
    assert_eq!(st.reason, "no stream to the bus");

    // The node is removed: its Agent goes. The pod is removed: its Agent goes.
    w.api.delete::<Node>(None, "node-b");
    sync(&w, Some(&reg), &history).await;
    assert!(agent(&w, "nodes-node-b").is_none());
    w.api.delete::<Pod>(Some(NS), "nodes-agent-node-a");
    sync(&w, Some(&reg), &history).await;
    assert!(agent(&w, "nodes-node-a").is_none());
    assert!(w.api.list::<Agent>(Some(NS)).is_empty());

    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_status_shows_what_a_real_bus_loaded_and_matched() {
    use amoskys_operator::build::rules::{documents, rule_set_yaml};
    use amoskys_operator::controller::rules::reconcile_rule;
    use amoskys_operator::crd::{DetectionRule, DetectionRuleSpec};
    use amoskys_proto::event::Payload;
    use amoskys_proto::publish_response::Msg;
    use amoskys_proto::{Event, Hello, K8sIdentity, ProcessEvent, process_event};

    let spec: amoskys_detect::RuleSpec = serde_saphyr::from_str(
        "match: {event: process, kinds: [start]}\ncondition: \"process.name == 'sh'\"\nsummary: 'shell {process.name}'\ntests:\n  - {name: sh, event: {process: {name: sh}}, expect: match}\n",
    )
    .unwrap();
    let mut rule = DetectionRule::new("shell", DetectionRuleSpec { rule: spec });
    rule.metadata.namespace = Some(NS.into());
    rule.metadata.generation = Some(1);

    // The bus runs the rule set the operator writes for it.
    let env = amoskys_testkit::Env::new();
    let rules = env.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    std::fs::write(
        rules.join("rules.yaml"),
        rule_set_yaml(&documents(std::slice::from_ref(&rule), &[])).unwrap(),
    )
    .unwrap();
    let mut cfg = env.config();
    cfg.detection = Some(amoskys_eventbus::config::DetectionConfig {
        rules_dir: rules,
        reload_interval: Duration::from_millis(100),
        rule_budget: Duration::from_millis(1),
        checkpoint_interval: Duration::from_millis(200),
    });
    let bus = amoskys_eventbus::start(cfg).await.unwrap();

    let w = world_at(OffsetDateTime::now_utc());
    w.api.insert(&sample_bus());
    w.api.insert(&rule);
    let admin = pems(&env.pki("admin"));
    let reconcile = || async {
        let r: DetectionRule = w.api.get(Some(NS), "shell").unwrap();
        reconcile_rule(std::sync::Arc::new(r), w.ctx.clone())
            .await
            .unwrap();
        w.api
            .get::<DetectionRule>(Some(NS), "shell")
            .unwrap()
            .status
            .unwrap()
    };
    let loaded = |st: &amoskys_operator::crd::DetectionRuleStatus| {
        let c = st.conditions.iter().find(|c| c.type_ == "Loaded").unwrap();
        (c.status.clone(), c.reason.clone())
    };
    // Before any pod reported: handed over, not confirmed.
    let st = reconcile().await;
    assert_eq!(loaded(&st), ("True".into(), "InRuleSet".into()));
    assert_eq!(st.matches24h, None);

    // Two shells in the rule's namespace, one elsewhere.
    let mut c = env.client(bus.grpc_addr, "agent").await;
    let mut p = c
        .publisher(
            Hello {
                agent_id: "nodes/node-a".into(),
                node: "node-a".into(),
                version: "test".into(),
                ..Default::default()
            },
            8,
        )
        .await
        .unwrap();
    let shell = |seq: u64, ns: &str| Event {
        agent_id: "nodes/node-a".into(),
        seq,
        collector: "process".into(),
        observed_at: amoskys_eventbus::now_ns(),
        k8s: Some(K8sIdentity {
            namespace: ns.into(),
            pod: "web".into(),
            ..Default::default()
        }),
        payload: Some(Payload::Process(ProcessEvent {
            kind: process_event::Kind::Start as i32,
            name: "sh".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    p.send(vec![shell(1, NS), shell(2, "other"), shell(3, NS)])
        .await
        .unwrap();
    loop {
        if let Some(Msg::Ack(a)) = p.next().await.unwrap()
            && a.acked_seq >= 3
        {
            break;
        }
    }

    // What the agent sync reads from each pod is what the rule's status
    // is made of.
    let mut st = None;
    for _ in 0..100 {
        let reg = registry(bus.grpc_addr, &admin).await;
        w.ctx
            .shards_seen
            .lock()
            .unwrap()
            .insert(format!("{NS}/amoskys"), reg.shards.clone());
        let s = reconcile().await;
        if s.matches24h == Some(2) {
            st = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = st.expect("two matches in the status");
    assert_eq!(loaded(&st), ("True".into(), "Running".into()));
    let last = st.last_match.clone().unwrap();
    let last =
        time::OffsetDateTime::parse(&last, &time::format_description::well_known::Rfc3339).unwrap();
    assert!(
        (OffsetDateTime::now_utc() - last).whole_seconds().abs() < 60,
        "{last}"
    );

    // A second bus pod that has not picked the rule up yet.
    let mut two = w.ctx.shards_seen.lock().unwrap()[&format!("{NS}/amoskys")].clone();
    let mut stale = two[&0].clone();
    stale.rules.clear();
    two.insert(1, stale);
    w.ctx
        .shards_seen
        .lock()
        .unwrap()
        .insert(format!("{NS}/amoskys"), two);
    let st = reconcile().await;
    assert_eq!(loaded(&st), ("False".into(), "Propagating".into()));
    assert!(
        st.conditions
            .iter()
            .any(|c| c.message.contains("running on 1 of 2 bus pods")),
        "{st:?}"
    );
    bus.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_rule_set_is_handed_to_bus_pods_that_run_another() {
    use amoskys_operator::build::rules::{documents, rule_set_yaml};
    use amoskys_operator::controller::agents::push_rules;
    use amoskys_operator::crd::{DetectionRule, DetectionRuleSpec};

    let rule = |name: &str| {
        let spec: amoskys_detect::RuleSpec = serde_saphyr::from_str(&format!(
            "match: {{event: process}}\ncondition: \"process.name == '{name}'\"\nsummary: '{name}'\n"
        ))
        .unwrap();
        let mut r = DetectionRule::new(name, DetectionRuleSpec { rule: spec });
        r.metadata.namespace = Some(NS.into());
        r.metadata.generation = Some(1);
        r
    };
    // The pod's mounted rules directory still holds the old set.
    let env = amoskys_testkit::Env::new();
    let dir = env.path().join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    let old = rule_set_yaml(&documents(&[rule("curl")], &[])).unwrap();
    std::fs::write(dir.join("rules.yaml"), &old).unwrap();
    let mut cfg = env.config();
    cfg.detection = Some(amoskys_eventbus::config::DetectionConfig {
        rules_dir: dir,
        reload_interval: Duration::from_millis(100),
        rule_budget: Duration::from_millis(1),
        checkpoint_interval: Duration::from_millis(200),
    });
    let bus = amoskys_eventbus::start(cfg).await.unwrap();
    let admin = pems(&env.pki("admin"));
    let w = world_at(OffsetDateTime::now_utc());
    let eventbus = sample_bus();

    let new = rule_set_yaml(&documents(&[rule("curl"), rule("wget")], &[])).unwrap();
    let digest = amoskys_detect::rule_set_digest([new.as_str()]);
    let urls = [replica(bus.grpc_addr)];
    let reg = registry(bus.grpc_addr, &admin).await;
    assert_eq!(
        reg.shards[&0].rules_digest,
        amoskys_detect::rule_set_digest([old.as_str()])
    );
    push_rules(&w.ctx, &eventbus, &urls, &admin, &reg, &new, &digest).await;
    let mut names = Vec::new();
    for _ in 0..100 {
        let reg = registry(bus.grpc_addr, &admin).await;
        if reg.shards[&0].rules_digest == digest {
            names = reg.shards[&0]
                .rules
                .iter()
                .map(|r| r.name.clone())
                .collect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(names, [format!("{NS}/curl"), format!("{NS}/wget")]);
    // A pod that runs the set already gets nothing.
    let reg = registry(bus.grpc_addr, &admin).await;
    push_rules(&w.ctx, &eventbus, &urls, &admin, &reg, &new, &digest).await;
    let text = w.ctx.metrics.encode();
    assert!(
        text.contains("amoskys_operator_rule_set_pushes_total{result=\"ok\"} 1"),
        "{text}"
    );
    bus.shutdown().await.unwrap();
}
