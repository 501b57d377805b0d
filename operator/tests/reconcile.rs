#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The EventBus and AgentSet reconcilers against the in-memory API: the
//! objects the samples become, idempotency, invalid specs, WAL growth, CA
//! rotation through the Secrets, and cert-manager mode.

mod common;

use std::time::Duration;

use amoskys_operator::crd::{
    AgentSet, ClusterDetectionRule, ClusterDetectionRuleSpec, DetectionRule, DetectionRuleSpec,
    EventBus,
};
use amoskys_operator::rotation;
use common::{NS, World, in_ns, sample_bus, sample_set, world};
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::DynamicObject;
use serde_json::json;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

fn condition(
    conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    t: &str,
) -> (String, String, String) {
    let c = conds
        .iter()
        .find(|c| c.type_ == t)
        .unwrap_or_else(|| panic!("no {t} condition in {conds:?}"));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn secret_text(s: &Secret, key: &str) -> String {
    String::from_utf8(s.data.as_ref().unwrap()[key].0.clone()).unwrap()
}

/// The first certificate of a PEM text, as DER.
fn der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

fn events(w: &World) -> Vec<Event> {
    w.api.list::<Event>(Some(NS))
}

/// Writes since `before` other than Events and EventBus status.
fn object_writes(w: &World, before: usize) -> Vec<String> {
    w.changes_since(before)
        .into_iter()
        .filter(|c| !c.contains("events/") && !c.contains("eventbuses/"))
        .collect()
}

async fn started_world() -> World {
    let w = world();
    w.api.insert(&sample_bus());
    w.api.insert(&sample_set());
    w
}

#[tokio::test]
async fn eventbus_sample_becomes_its_objects_and_a_second_pass_changes_nothing() {
    let w = started_world().await;
    w.reconcile_bus("amoskys").await;

    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").expect("StatefulSet");
    let pod = sts.spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("example.org/amoskys:test"));
    assert_eq!(c.args.as_ref().unwrap()[0], "bus");
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    let claims = sts.spec.volume_claim_templates.as_ref().unwrap();
    assert_eq!(claims[0].metadata.name.as_deref(), Some("wal"));
    let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("EventBus", "amoskys")
    );

    let headless: Service = w
        .api
        .get(Some(NS), "amoskys-headless")
        .expect("headless Service");
    assert_eq!(headless.spec.unwrap().cluster_ip.as_deref(), Some("None"));
    let client: Service = w.api.get(Some(NS), "amoskys").expect("client Service");
    assert_eq!(client.spec.unwrap().ports.unwrap().len(), 2);
    let cm: ConfigMap = w.api.get(Some(NS), "amoskys-config").expect("ConfigMap");
    assert!(cm.data.unwrap()["bus.yaml"].contains("tlsDir: /etc/amoskys/tls"));
    let _: PodDisruptionBudget = w.api.get(Some(NS), "amoskys").expect("PDB");

    // Certificates: a CA, the server (SANs for both Services and every pod),
    // the operator's admin client, the AgentSet's agent client.
    let ca: Secret = w.api.get(Some(NS), "amoskys-ca").expect("CA Secret");
    let ca_pem = secret_text(&ca, "tls.crt");
    let ca_der = der(&ca_pem);
    let (_, ca_cert) = X509Certificate::from_der(&ca_der).unwrap();
    let server: Secret = w
        .api
        .get(Some(NS), "amoskys-server-tls")
        .expect("server Secret");
    assert_eq!(server.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(secret_text(&server, "ca.crt"), ca_pem);
    let server_der = der(&secret_text(&server, "tls.crt"));
    let (_, cert) = X509Certificate::from_der(&server_der).unwrap();
    cert.verify_signature(Some(ca_cert.public_key())).unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    for want in [
        "amoskys.security.svc",
        "amoskys-headless.security.svc.cluster.local",
        "amoskys-0.amoskys-headless.security.svc",
    ] {
        assert!(
            sans.contains(&want.to_string()),
            "{want} missing from {sans:?}"
        );
    }
    for (secret, role) in [("amoskys-admin-tls", "admin"), ("nodes-agent-tls", "agent")] {
        let s: Secret = w
            .api
            .get(Some(NS), secret)
            .unwrap_or_else(|| panic!("{secret}"));
        let d = der(&secret_text(&s, "tls.crt"));
        let (_, c) = X509Certificate::from_der(&d).unwrap();
        c.verify_signature(Some(ca_cert.public_key())).unwrap();
        let id = amoskys_client::identity::PeerIdentity::from_der(&d).unwrap();
        assert_eq!(id.role.map(|r| r.as_str()), Some(role), "{secret}");
    }
    // The agents' certificate goes away with their AgentSet.
    let agent_tls: Secret = w.api.get(Some(NS), "nodes-agent-tls").unwrap();
    assert_eq!(agent_tls.owner_references()[0].kind, "AgentSet");
    let token: Secret = w
        .api
        .get(Some(NS), "amoskys-dashboard")
        .expect("dashboard token");
    assert!(secret_text(&token, "token").len() >= 32);

    let bus = w.bus("amoskys");
    let st = bus.status.clone().expect("status written");
    assert_eq!(condition(&st.conditions, "CertificatesReady").0, "True");
    let ready = condition(&st.conditions, "Ready");
    assert_eq!(
        (ready.0.as_str(), ready.1.as_str()),
        ("False", "PodsNotReady")
    );
    assert_eq!(st.endpoint, "amoskys.security.svc:7443");
    assert!(st.certificates.server_not_after.is_some());
    assert_eq!(st.observed_generation, Some(1));
    assert!(
        events(&w)
            .iter()
            .any(|e| e.reason.as_deref() == Some("CACreated"))
    );

    let before = w.api.changes().len();
    w.reconcile_bus("amoskys").await;
    assert_eq!(
        w.changes_since(before),
        Vec::<String>::new(),
        "second pass wrote"
    );

    // The StatefulSet controller reports the pods ready: Ready=True, and the
    // pass after that is again a no-op.
    w.api.set_status::<StatefulSet>(
        Some(NS),
        "amoskys",
        json!({"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "observedGeneration": 1,
               "currentRevision": "r1", "updateRevision": "r1"}),
    );
    w.reconcile_bus("amoskys").await;
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_eq!(condition(&st.conditions, "Ready").0, "True");
    assert_eq!(condition(&st.conditions, "Progressing").0, "False");
    assert_eq!(st.ready_replicas, 1);
    let before = w.api.changes().len();
    w.reconcile_bus("amoskys").await;
    assert_eq!(w.changes_since(before), Vec::<String>::new());
}

#[tokio::test]
async fn agentset_sample_becomes_a_daemonset_and_a_second_pass_changes_nothing() {
    let w = started_world().await;
    // Before the bus has issued the agents' certificate, the set waits.
    w.reconcile_set("nodes").await;
    assert!(w.api.get::<DaemonSet>(Some(NS), "nodes-agent").is_none());
    let st = w.set("nodes").status.clone().unwrap();
    assert_eq!(
        condition(&st.conditions, "Ready").1,
        "WaitingForCertificate"
    );

    w.reconcile_bus("amoskys").await;
    w.reconcile_set("nodes").await;
    let ds: DaemonSet = w.api.get(Some(NS), "nodes-agent").expect("DaemonSet");
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let caps = pod.containers[0]
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .clone()
        .unwrap()
        .add
        .unwrap_or_default();
    // The sample enables flow capture: NET_RAW, and the host's network.
    assert!(caps.contains(&"NET_RAW".to_string()), "{caps:?}");
    assert_eq!(pod.host_network, Some(true));
    let cm: ConfigMap = w
        .api
        .get(Some(NS), "nodes-agent-config")
        .expect("agent ConfigMap");
    let agent_yaml = cm.data.unwrap()["agent.yaml"].clone();
    assert!(agent_yaml.contains("flow"));
    // The sample runs as the chart's agent account: a token, and the
    // agents watch their node's pods.
    assert_eq!(pod.service_account_name.as_deref(), Some("amoskys-agent"));
    assert_eq!(pod.automount_service_account_token, Some(true));
    assert!(
        agent_yaml.contains("kubernetes:\n  pods: true"),
        "{agent_yaml}"
    );

    let before = w.api.changes().len();
    w.reconcile_set("nodes").await;
    assert_eq!(w.changes_since(before), Vec::<String>::new());

    w.api.set_status::<DaemonSet>(
        Some(NS),
        "nodes-agent",
        json!({"desiredNumberScheduled": 3, "numberReady": 3, "updatedNumberScheduled": 3,
               "currentNumberScheduled": 3, "numberMisscheduled": 0, "observedGeneration": 1}),
    );
    w.reconcile_set("nodes").await;
    let st = w.set("nodes").status.clone().unwrap();
    assert_eq!((st.desired, st.ready), (3, 3));
    assert_eq!(condition(&st.conditions, "Ready").0, "True");

    // Paused: the pods go (a node selector no node has), nothing is deleted.
    w.api
        .patch::<AgentSet>(Some(NS), "nodes", json!({"spec": {"paused": true}}));
    w.reconcile_set("nodes").await;
    let ds: DaemonSet = w.api.get(Some(NS), "nodes-agent").unwrap();
    let sel = ds.spec.template.spec.unwrap().node_selector.unwrap();
    assert_eq!(
        sel.get(amoskys_operator::build::agentset::PAUSED_NODE_LABEL)
            .map(String::as_str),
        Some("true")
    );
    let st = w.set("nodes").status.clone().unwrap();
    assert_eq!(condition(&st.conditions, "Ready").1, "Paused");

    // Without an account: no token, no pods watch.
    w.api.patch::<AgentSet>(
        Some(NS),
        "nodes",
        json!({"spec": {"serviceAccountName": null}}),
    );
    w.reconcile_set("nodes").await;
    let ds: DaemonSet = w.api.get(Some(NS), "nodes-agent").unwrap();
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name, None);
    assert_eq!(pod.automount_service_account_token, Some(false));
    let cm: ConfigMap = w.api.get(Some(NS), "nodes-agent-config").unwrap();
    assert!(cm.data.unwrap()["agent.yaml"].contains("kubernetes:\n  pods: false"));
}

/// Reconciles an invalid resource and checks the condition, the event and
/// that nothing else was written.
async fn assert_invalid(w: &World, kind: &str, name: &str, field: &str) {
    let before: Vec<String> = w.api.names();
    match kind {
        "EventBus" => {
            w.reconcile_bus(name).await;
        }
        _ => {
            w.reconcile_set(name).await;
        }
    }
    let conds = match kind {
        "EventBus" => w.bus(name).status.clone().unwrap().conditions,
        _ => w.set(name).status.clone().unwrap().conditions,
    };
    let (status, reason, message) = condition(&conds, "Ready");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "InvalidSpec"),
        "{message}"
    );
    assert!(
        message.starts_with(field),
        "{message:?} does not name {field}"
    );
    let evs = events(w);
    assert!(
        evs.iter()
            .any(|e| e.reason.as_deref() == Some("InvalidSpec")
                && e.note.as_deref() == Some(message.as_str())
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)),
        "no InvalidSpec event for {name}"
    );
    let new: Vec<String> = w
        .api
        .names()
        .into_iter()
        .filter(|n| !before.contains(n) && !n.starts_with("events/"))
        .collect();
    assert_eq!(
        new,
        Vec::<String>::new(),
        "objects written for an invalid {kind}"
    );
    // Reporting again adds no second event and no write.
    let changes = w.api.changes().len();
    match kind {
        "EventBus" => {
            w.reconcile_bus(name).await;
        }
        _ => {
            w.reconcile_set(name).await;
        }
    }
    assert_eq!(w.changes_since(changes), Vec::<String>::new());
}

#[tokio::test]
async fn invalid_resources_get_invalid_spec_an_event_and_no_objects() {
    let w = world();
    let mut bus = sample_bus();
    bus.spec.wal.retention = "a week".into();
    w.api.insert(&bus);
    assert_invalid(&w, "EventBus", "amoskys", "spec.wal.retention").await;

    let mut tls = sample_bus();
    tls.metadata.name = Some("short-ca".into());
    tls.spec.tls.ca_validity = "30d".into();
    w.api.insert(&tls);
    assert_invalid(&w, "EventBus", "short-ca", "spec.tls.caValidity").await;

    let mut no_bus: AgentSet = sample_set();
    no_bus.metadata.name = Some("no-bus".into());
    no_bus.spec.bus_ref.name = String::new();
    w.api.insert(&no_bus);
    assert_invalid(&w, "AgentSet", "no-bus", "spec.busRef.name").await;

    let mut unknown: AgentSet = in_ns(
        serde_saphyr::from_str(
            "apiVersion: amoskys.io/v1alpha1\nkind: AgentSet\nmetadata: {name: unknown}\n\
         spec: {busRef: {name: amoskys}, collectors: {nfs: {enabled: true}}}\n",
        )
        .unwrap(),
    );
    unknown.metadata.uid = None;
    w.api.insert(&unknown);
    assert_invalid(&w, "AgentSet", "unknown", "spec.collectors.nfs").await;

    let mut missing_bus = sample_set();
    missing_bus.metadata.name = Some("elsewhere".into());
    missing_bus.spec.bus_ref.name = "nowhere".into();
    w.api.insert(&missing_bus);
    assert_invalid(&w, "AgentSet", "elsewhere", "spec.busRef.name").await;

    let mut snmp = sample_set();
    snmp.metadata.name = Some("switches".into());
    snmp.spec.bus_ref.name = "short-ca".into();
    snmp.spec.collectors.snmp.enabled = true;
    w.api.insert(&snmp);
    assert_invalid(
        &w,
        "AgentSet",
        "switches",
        "spec.collectors.snmp.targets[0].credentialsSecret",
    )
    .await;
}

#[tokio::test]
async fn snmp_credentials_must_exist_with_the_right_keys() {
    let w = started_world().await;
    w.api.patch::<AgentSet>(
        Some(NS),
        "nodes",
        json!({"spec": {"collectors": {"snmp": {"enabled": true}}}}),
    );
    let wrong_key = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("snmp-core-switch".into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some(
            [(
                "password".to_string(),
                k8s_openapi::ByteString(b"x".to_vec()),
            )]
            .into(),
        ),
        ..Default::default()
    };
    w.api.insert(&wrong_key);
    w.reconcile_set("nodes").await;
    let (_, reason, message) =
        condition(&w.set("nodes").status.clone().unwrap().conditions, "Ready");
    assert_eq!(reason, "InvalidSpec");
    assert!(message.contains("has no key \"community\""), "{message}");

    w.api.patch::<Secret>(
        Some(NS),
        "snmp-core-switch",
        json!({"data": {"community": "cHVibGlj"}}),
    );
    w.reconcile_bus("amoskys").await;
    w.reconcile_set("nodes").await;
    let ds: DaemonSet = w
        .api
        .get(Some(NS), "nodes-agent")
        .expect("DaemonSet once the Secret is right");
    let vols = ds.spec.template.spec.unwrap().volumes.unwrap();
    assert!(
        vols.iter()
            .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref())
                == Some("snmp-core-switch"))
    );
}

/// A Secret in the test namespace holding `key`.
fn secret(name: &str, key: &str) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        data: Some([(key.to_string(), k8s_openapi::ByteString(b"x".to_vec()))].into()),
        ..Default::default()
    }
}

/// The bus is refused naming `field` because its Secret lacks `key`.
async fn assert_missing_key(w: &World, field: &str, key: &str) {
    w.reconcile_bus("amoskys").await;
    let (_, reason, message) = condition(
        &w.bus("amoskys").status.clone().unwrap().conditions,
        "Ready",
    );
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.starts_with(field) && message.contains(&format!("has no key {key:?}")),
        "{message}"
    );
}

#[tokio::test]
async fn the_nats_export_needs_its_secrets_and_reaches_the_bus_config_and_pods() {
    let w = world();
    let mut bus = sample_bus();
    bus.spec.export = Some(amoskys_operator::crd::ExportSpec {
        nats: Some(amoskys_operator::crd::NatsExportSpec {
            url: "tls://nats.messaging:4222".into(),
            stream: "AMOSKYS".into(),
            tls_secret_name: "nats-client".into(),
            credentials_secret_name: "nats-user".into(),
            ..Default::default()
        }),
    });
    w.api.insert(&bus);
    assert_invalid(&w, "EventBus", "amoskys", "spec.export.nats.tlsSecretName").await;

    w.api.insert(&secret("nats-client", "ca.crt"));
    w.api.insert(&secret("nats-user", "password"));
    assert_missing_key(&w, "spec.export.nats.credentialsSecretName", "nats.creds").await;

    w.api.patch::<Secret>(
        Some(NS),
        "nats-user",
        json!({"data": {"nats.creds": "eA=="}}),
    );
    w.reconcile_bus("amoskys").await;
    // The bus reads the export section the operator wrote.
    let cm: ConfigMap = w.api.get(Some(NS), "amoskys-config").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("bus.yaml"), &cm.data.unwrap()["bus.yaml"]).unwrap();
    let file = amoskys_eventbus::config::read_config_file(&tmp.path().join("bus.yaml")).unwrap();
    let n = amoskys_eventbus::config::resolve(file, Default::default())
        .unwrap()
        .export_nats
        .expect("export config");
    use amoskys_operator::build::eventbus::{NATS_CREDS_DIR, NATS_TLS_DIR};
    assert_eq!(
        (
            n.url.as_str(),
            n.stream.as_str(),
            n.subject_prefix.as_str(),
            n.max_in_flight
        ),
        ("tls://nats.messaging:4222", "AMOSKYS", "amoskys", 256)
    );
    assert_eq!(
        n.tls_dir.as_deref(),
        Some(std::path::Path::new(NATS_TLS_DIR))
    );
    assert_eq!(
        n.credentials_file,
        Some(std::path::Path::new(NATS_CREDS_DIR).join("nats.creds"))
    );
    // The pods mount both Secrets where the config says.
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    let pod = sts.spec.template.spec.unwrap();
    for (vol, secret, dir) in [
        ("nats-tls", "nats-client", NATS_TLS_DIR),
        ("nats-creds", "nats-user", NATS_CREDS_DIR),
    ] {
        assert!(pod.volumes.as_ref().unwrap().iter().any(|v| v.name == vol
            && v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret)));
        assert!(
            pod.containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == vol && m.mount_path == dir && m.read_only == Some(true))
        );
    }
    // A bad field is named without a round trip to the API.
    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"export": {"nats": {"stream": "a.b"}}}}),
    );
    w.reconcile_bus("amoskys").await;
    let (_, reason, message) = condition(
        &w.bus("amoskys").status.clone().unwrap().conditions,
        "Ready",
    );
    assert_eq!(reason, "InvalidSpec");
    assert!(message.starts_with("spec.export.nats.stream"), "{message}");
}

#[tokio::test]
async fn alert_receivers_need_their_secrets_and_reach_the_bus_config_and_pods() {
    use amoskys_operator::build::eventbus::{AM_CA_DIR, WEBHOOK_TOKEN_DIR};
    use amoskys_operator::crd::{AlertReceiverSpec, AlertingSpec};
    let w = world();
    let mut bus = sample_bus();
    bus.spec.alerting = Some(AlertingSpec {
        external_url: "https://amoskys.example.com".into(),
        alertmanager: Some(AlertReceiverSpec {
            url: "https://alertmanager.monitoring:9093".into(),
            ca_secret_name: "am-ca".into(),
            ..Default::default()
        }),
        webhook: Some(AlertReceiverSpec {
            url: "https://hooks.example.com/amoskys".into(),
            token_secret_name: "hook-token".into(),
            max_batch: 10,
            ..Default::default()
        }),
    });
    w.api.insert(&bus);
    assert_invalid(
        &w,
        "EventBus",
        "amoskys",
        "spec.alerting.alertmanager.caSecretName",
    )
    .await;

    w.api.insert(&secret("am-ca", "ca.crt"));
    w.api.insert(&secret("hook-token", "password"));
    assert_missing_key(&w, "spec.alerting.webhook.tokenSecretName", "token").await;
    w.api
        .patch::<Secret>(Some(NS), "hook-token", json!({"data": {"token": "eA=="}}));
    w.reconcile_bus("amoskys").await;

    // The bus reads the alerting section the operator wrote.
    let cm: ConfigMap = w.api.get(Some(NS), "amoskys-config").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("bus.yaml"), &cm.data.unwrap()["bus.yaml"]).unwrap();
    let file = amoskys_eventbus::config::read_config_file(&tmp.path().join("bus.yaml")).unwrap();
    let c = amoskys_eventbus::config::resolve(file, Default::default()).unwrap();
    assert_eq!(
        c.alerting.external_url.as_deref(),
        Some("https://amoskys.example.com")
    );
    assert_eq!(c.alerting.sinks.len(), 2);
    let (am, hook) = (&c.alerting.sinks[0], &c.alerting.sinks[1]);
    assert_eq!(am.url, "https://alertmanager.monitoring:9093");
    assert_eq!(
        am.ca_file,
        Some(std::path::Path::new(AM_CA_DIR).join("ca.crt"))
    );
    assert_eq!(am.bearer_token_file, None);
    assert_eq!(
        (hook.max_batch, hook.timeout),
        (10, Duration::from_secs(10))
    );
    assert_eq!(
        hook.bearer_token_file,
        Some(std::path::Path::new(WEBHOOK_TOKEN_DIR).join("token"))
    );
    assert!(c.detection.is_some(), "every bus runs the cluster's rules");

    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    let pod = sts.spec.template.spec.unwrap();
    for (vol, secret) in [("am-ca", "am-ca"), ("webhook-token", "hook-token")] {
        assert!(pod.volumes.as_ref().unwrap().iter().any(|v| v.name == vol
            && v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret)));
        assert!(
            pod.containers[0]
                .volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.name == vol)
        );
    }

    // A bad address is named without a round trip to the API.
    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"alerting": {"webhook": {"url": "hooks.example.com"}}}}),
    );
    w.reconcile_bus("amoskys").await;
    let (_, reason, message) = condition(
        &w.bus("amoskys").status.clone().unwrap().conditions,
        "Ready",
    );
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.starts_with("spec.alerting.webhook.url"),
        "{message}"
    );
}

fn wal_claim(name: &str, size: &str) -> PersistentVolumeClaim {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS, "labels": amoskys_operator::labels::labels("bus", "amoskys")},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
        "status": {"capacity": {"storage": size}},
    }))
    .unwrap()
}

#[tokio::test]
async fn growing_the_wal_expands_claims_and_reports_progress_and_shrinking_is_refused() {
    let w = started_world().await;
    w.reconcile_bus("amoskys").await;
    let size = sample_bus().spec.wal.size;
    w.api.insert(&wal_claim("wal-amoskys-0", &size));
    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"wal": {"size": "40Gi"}}}),
    );
    w.reconcile_bus("amoskys").await;

    let pvc: PersistentVolumeClaim = w.api.get(Some(NS), "wal-amoskys-0").unwrap();
    assert_eq!(common::claim_storage(&pvc), "40Gi");
    // The template is immutable and stays as created.
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    let tmpl = &sts.spec.volume_claim_templates.unwrap()[0];
    assert_eq!(common::claim_storage(tmpl), size);
    let st = w.bus("amoskys").status.clone().unwrap();
    let (status, reason, message) = condition(&st.conditions, "Progressing");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "ExpandingVolumes")
    );
    assert!(message.contains("wal-amoskys-0"), "{message}");
    assert!(
        events(&w)
            .iter()
            .any(|e| e.reason.as_deref() == Some("ExpandingVolume"))
    );

    // The storage driver finishes.
    w.api.set_status::<PersistentVolumeClaim>(
        Some(NS),
        "wal-amoskys-0",
        json!({"capacity": {"storage": "40Gi"}}),
    );
    w.reconcile_bus("amoskys").await;
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_ne!(
        condition(&st.conditions, "Progressing").1,
        "ExpandingVolumes"
    );

    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"wal": {"size": "20Gi"}}}),
    );
    let before = w.api.changes().len();
    w.reconcile_bus("amoskys").await;
    let st = w.bus("amoskys").status.clone().unwrap();
    let (_, reason, message) = condition(&st.conditions, "Ready");
    assert_eq!(reason, "InvalidSpec");
    assert!(
        message.starts_with("spec.wal.size") && message.contains("not shrink"),
        "{message}"
    );
    assert_eq!(object_writes(&w, before), Vec::<String>::new());
}

#[tokio::test]
async fn backups_add_a_volume_by_recreating_the_statefulset_and_keep_its_pods() {
    let w = started_world().await;
    w.reconcile_bus("amoskys").await;
    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"backup": {"interval": "6h", "size": "5Gi"}}}),
    );

    // Claim templates are immutable: the StatefulSet goes, orphaning (not
    // deleting) its pods, and comes back with the backup volume.
    let before = w.api.changes().len();
    w.reconcile_bus("amoskys").await;
    assert!(
        w.changes_since(before)
            .contains(&"DELETE statefulsets/amoskys propagationPolicy=Orphan".to_string()),
        "{:?}",
        w.changes_since(before)
    );
    assert!(
        events(&w)
            .iter()
            .any(|e| e.reason.as_deref() == Some("RecreatingStatefulSet"))
    );
    w.reconcile_bus("amoskys").await;
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").expect("StatefulSet again");
    let claims = sts.spec.volume_claim_templates.as_ref().unwrap();
    let names: Vec<_> = claims
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["wal", "backup"]);
    assert_eq!(common::claim_storage(&claims[1]), "5Gi");
    let c = &sts.spec.template.spec.as_ref().unwrap().containers[0];
    assert!(c.volume_mounts.as_ref().unwrap().iter().any(
        |m| m.name == "backup" && m.mount_path == amoskys_operator::build::eventbus::BACKUP_DIR
    ));

    // The bus reads the config the operator wrote, backup section included.
    let cm: ConfigMap = w.api.get(Some(NS), "amoskys-config").unwrap();
    let yaml = cm.data.unwrap()["bus.yaml"].clone();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("bus.yaml"), yaml).unwrap();
    let file = amoskys_eventbus::config::read_config_file(&tmp.path().join("bus.yaml")).unwrap();
    let cfg = amoskys_eventbus::config::resolve(file, Default::default()).unwrap();
    let b = cfg.backup.expect("backup config");
    assert_eq!(
        b.dir.to_str(),
        Some(amoskys_operator::build::eventbus::BACKUP_DIR)
    );
    assert_eq!(
        (b.interval, b.keep),
        (Some(Duration::from_secs(6 * 3600)), 7)
    );

    // Settled: a further pass writes nothing but status.
    let before = w.api.changes().len();
    w.reconcile_bus("amoskys").await;
    assert_eq!(object_writes(&w, before), Vec::<String>::new());

    // Backup volumes grow like WAL volumes and refuse to shrink.
    let wal_size = sample_bus().spec.wal.size;
    w.api.insert(&wal_claim("wal-amoskys-0", &wal_size));
    w.api.insert(&wal_claim("backup-amoskys-0", "5Gi"));
    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"backup": {"size": "8Gi"}}}),
    );
    w.reconcile_bus("amoskys").await;
    let pvc: PersistentVolumeClaim = w.api.get(Some(NS), "backup-amoskys-0").unwrap();
    assert_eq!(common::claim_storage(&pvc), "8Gi");
    let wal: PersistentVolumeClaim = w.api.get(Some(NS), "wal-amoskys-0").unwrap();
    assert_eq!(
        common::claim_storage(&wal),
        wal_size,
        "the WAL claim is left alone"
    );
    let st = w.bus("amoskys").status.clone().unwrap();
    let (_, reason, message) = condition(&st.conditions, "Progressing");
    assert_eq!(reason, "ExpandingVolumes");
    assert!(
        message.contains("backup-amoskys-0: 5Gi of 8Gi"),
        "{message}"
    );

    for (patch, field) in [
        (json!({"size": "1Gi"}), "spec.backup.size"),
        (
            json!({"size": "8Gi", "interval": "hourly"}),
            "spec.backup.interval",
        ),
        (json!({"interval": "10ms"}), "spec.backup.interval"),
        (json!({"interval": "0s", "keep": 0}), "spec.backup.keep"),
    ] {
        w.api
            .patch::<EventBus>(Some(NS), "amoskys", json!({"spec": {"backup": patch}}));
        w.reconcile_bus("amoskys").await;
        let st = w.bus("amoskys").status.clone().unwrap();
        let (_, reason, message) = condition(&st.conditions, "Ready");
        assert_eq!(reason, "InvalidSpec", "{patch}");
        assert!(message.starts_with(field), "{patch}: {message}");
    }
}

fn ca_phase(w: &World) -> (String, String) {
    let ca: Secret = w.api.get(Some(NS), "amoskys-ca").unwrap();
    let phase = ca.annotations()[rotation::PHASE_ANNOTATION].clone();
    let issuer = w
        .api
        .get::<Secret>(Some(NS), "amoskys-server-tls")
        .unwrap()
        .annotations()[rotation::ISSUER_ANNOTATION]
        .clone();
    (phase, issuer)
}

#[tokio::test]
async fn ca_rotation_on_request_goes_through_its_phases_via_the_secrets() {
    let w = started_world().await;
    w.reconcile_bus("amoskys").await;
    let (phase, first_issuer) = ca_phase(&w);
    assert_eq!(phase, "Stable");

    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"metadata": {"annotations": {rotation::ROTATE_REQUEST_ANNOTATION: "now"}}}),
    );
    w.reconcile_bus("amoskys").await;
    let (phase, issuer) = ca_phase(&w);
    assert_eq!(
        (phase.as_str(), issuer.as_str()),
        ("BundlePublished", first_issuer.as_str())
    );
    // Every Secret now trusts both CAs.
    let agent: Secret = w.api.get(Some(NS), "nodes-agent-tls").unwrap();
    assert_eq!(
        secret_text(&agent, "ca.crt")
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_eq!(st.certificates.rotation.as_deref(), Some("BundlePublished"));

    // Nothing moves before the bundle has had time to reach the pods.
    w.reconcile_bus("amoskys").await;
    assert_eq!(ca_phase(&w).0, "BundlePublished");
    w.clock.advance(w.ctx.propagation + Duration::from_secs(1));
    w.reconcile_bus("amoskys").await;
    let (phase, issuer) = ca_phase(&w);
    assert_eq!(phase, "LeavesReissued");
    assert_ne!(issuer, first_issuer, "leaves re-signed by the new CA");

    // The old CA stays until what is loaded no longer needs it: the bus
    // still reports the old server certificate.
    let old_serials = vec!["00:old".to_string()];
    w.ctx
        .loaded
        .lock()
        .unwrap()
        .insert(format!("{NS}/amoskys"), old_serials);
    w.clock.advance(w.ctx.propagation * 3);
    w.reconcile_bus("amoskys").await;
    assert_eq!(ca_phase(&w).0, "LeavesReissued");

    let now_loaded: Vec<String> = ["amoskys-server-tls", "amoskys-admin-tls", "nodes-agent-tls"]
        .iter()
        .map(|s| {
            let sec: Secret = w.api.get(Some(NS), s).unwrap();
            rotation::cert_facts(&secret_text(&sec, "tls.crt"))
                .unwrap()
                .0
        })
        .collect();
    w.ctx
        .loaded
        .lock()
        .unwrap()
        .insert(format!("{NS}/amoskys"), now_loaded);
    w.reconcile_bus("amoskys").await;
    assert_eq!(ca_phase(&w).0, "Stable");
    let agent: Secret = w.api.get(Some(NS), "nodes-agent-tls").unwrap();
    assert_eq!(
        secret_text(&agent, "ca.crt")
            .matches("BEGIN CERTIFICATE")
            .count(),
        1
    );
    let phases: Vec<String> = events(&w)
        .iter()
        .filter(|e| {
            matches!(
                e.reason.as_deref(),
                Some("CABundlePublished" | "CALeavesReissued" | "CARotationCompleted")
            )
        })
        .filter_map(|e| e.note.clone())
        .collect();
    assert_eq!(
        phases,
        [
            "CA rotation phase BundlePublished",
            "CA rotation phase LeavesReissued",
            "CA rotation phase Stable"
        ]
    );
    // The request is remembered: later passes do not rotate again.
    w.reconcile_bus("amoskys").await;
    assert_eq!(ca_phase(&w).0, "Stable");
}

#[tokio::test]
async fn expired_certificates_are_recovered_without_deleting_anything() {
    let w = started_world().await;
    w.reconcile_bus("amoskys").await;
    let old: Secret = w.api.get(Some(NS), "amoskys-server-tls").unwrap();
    // Long past both the leaves' and the CA's lifetime (the sample: 90d, 3650d).
    w.clock.advance(Duration::from_secs(3651 * 86_400));
    w.reconcile_bus("amoskys").await;
    let new: Secret = w.api.get(Some(NS), "amoskys-server-tls").unwrap();
    let (_, not_after) = rotation::cert_facts(&secret_text(&new, "tls.crt")).unwrap();
    assert!(not_after > w.clock.now().unix_timestamp());
    assert_ne!(secret_text(&old, "ca.crt"), secret_text(&new, "ca.crt"));
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_eq!(condition(&st.conditions, "CertificatesReady").0, "True");
}

#[tokio::test]
async fn leaf_renewal_requeues_at_the_deadline() {
    let w = started_world().await;
    let action = w.reconcile_bus("amoskys").await;
    let s = format!("{action:?}");
    assert!(s.contains("requeue_after: Some"), "{s}");
    let old: Secret = w.api.get(Some(NS), "amoskys-server-tls").unwrap();
    // Renewal is due at two thirds of the 90-day life.
    w.clock.advance(Duration::from_secs(61 * 86_400));
    w.reconcile_bus("amoskys").await;
    let new: Secret = w.api.get(Some(NS), "amoskys-server-tls").unwrap();
    assert_ne!(secret_text(&old, "tls.crt"), secret_text(&new, "tls.crt"));
    assert_eq!(secret_text(&old, "ca.crt"), secret_text(&new, "ca.crt"));
}

#[tokio::test]
async fn cert_manager_issues_when_an_issuer_is_named() {
    let w = world();
    let mut bus: EventBus = sample_bus();
    bus.spec.tls.issuer_ref =
        Some(serde_json::from_value(json!({"name": "corp-ca", "kind": "ClusterIssuer"})).unwrap());
    w.api.insert(&bus);
    w.api.insert(&sample_set());
    w.reconcile_bus("amoskys").await;

    assert!(
        w.api.get::<Secret>(Some(NS), "amoskys-ca").is_none(),
        "no CA of our own"
    );
    let ar = amoskys_operator::controller::eventbus::certificate_resource();
    let certs: Vec<DynamicObject> = {
        let api: kube::Api<DynamicObject> =
            kube::Api::namespaced_with(w.ctx.client.clone(), NS, &ar);
        api.list(&Default::default()).await.unwrap().items
    };
    let names: Vec<String> = certs.iter().map(|c| c.name_any()).collect();
    assert_eq!(
        names,
        [
            "amoskys-admin-tls",
            "amoskys-peer-tls",
            "amoskys-server-tls",
            "nodes-agent-tls"
        ]
    );
    let server = certs
        .iter()
        .find(|c| c.name_any() == "amoskys-server-tls")
        .unwrap();
    assert_eq!(server.data["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    assert_eq!(server.data["spec"]["secretName"], "amoskys-server-tls");
    assert!(
        server.data["spec"]["dnsNames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d == "amoskys.security.svc")
    );
    let agent = certs
        .iter()
        .find(|c| c.name_any() == "nodes-agent-tls")
        .unwrap();
    assert_eq!(
        agent.data["spec"]["uris"][0],
        amoskys_client::identity::Role::Agent.uri()
    );
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_eq!(condition(&st.conditions, "CertificatesReady").0, "False");
}

#[tokio::test]
async fn the_shard_map_reaches_the_pods_and_its_epoch_moves_only_when_replicas_change() {
    let w = world();
    let mut bus = sample_bus();
    bus.spec.replicas = 3;
    w.api.insert(&bus);
    w.api.insert(&sample_set());
    w.reconcile_bus("amoskys").await;

    let map_of = |w: &World| {
        let cm: ConfigMap = w.api.get(Some(NS), "amoskys-shards").expect("shard map");
        let text = cm.data.unwrap()["map.yaml"].clone();
        amoskys_client::shard::ShardMap::parse(&text).unwrap()
    };
    let m = map_of(&w);
    assert_eq!((m.epoch, m.active), (1, 3));
    assert_eq!(
        m.peers[2],
        format!("https://amoskys-2.amoskys-headless.{NS}.svc:7443")
    );
    w.reconcile_bus("amoskys").await;
    assert_eq!(map_of(&w).epoch, 1, "an unchanged map keeps its epoch");

    // What the pods need to act as shards: their index, the map, the peer
    // certificate, and a config that points at them.
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    let pod = sts.spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let env = &c.env.as_ref().unwrap()[0];
    assert_eq!(env.name, "AMOSKYS_SHARD_INDEX");
    assert_eq!(
        env.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "metadata.labels['apps.kubernetes.io/pod-index']"
    );
    let mounts: Vec<(&str, &str)> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.name.as_str(), m.mount_path.as_str()))
        .collect();
    assert!(
        mounts.contains(&("shards", "/etc/amoskys/shards")),
        "{mounts:?}"
    );
    assert!(
        mounts.contains(&("peer", "/etc/amoskys/peer")),
        "{mounts:?}"
    );
    let vols = pod.volumes.as_ref().unwrap();
    let peer_vol = vols.iter().find(|v| v.name == "peer").unwrap();
    assert_eq!(
        peer_vol.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("amoskys-peer-tls")
    );
    let shards_vol = vols.iter().find(|v| v.name == "shards").unwrap();
    assert_eq!(
        shards_vol.config_map.as_ref().unwrap().name,
        "amoskys-shards"
    );
    let cm: ConfigMap = w.api.get(Some(NS), "amoskys-config").unwrap();
    let file: amoskys_eventbus::config::BusConfigFile =
        serde_saphyr::from_str(&cm.data.unwrap()["bus.yaml"]).unwrap();
    let cfg = amoskys_eventbus::config::resolve(file, Default::default()).unwrap();
    assert_eq!(
        cfg.sharding.map_file.as_deref(),
        Some(std::path::Path::new("/etc/amoskys/shards/map.yaml"))
    );
    let peer: Secret = w
        .api
        .get(Some(NS), "amoskys-peer-tls")
        .expect("peer Secret");
    let id = amoskys_client::identity::PeerIdentity::from_der(&der(&secret_text(&peer, "tls.crt")))
        .unwrap();
    assert_eq!(id.role, Some(amoskys_client::identity::Role::Peer));
    let before = sts
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone();

    // Scaling: a new map with the next epoch; the pod template, config hash
    // included, does not change, so no pod restarts for it.
    let mut bus = (*w.bus("amoskys")).clone();
    bus.spec.replicas = 5;
    w.api.insert(&bus);
    w.reconcile_bus("amoskys").await;
    let m = map_of(&w);
    assert_eq!((m.epoch, m.active, m.peers.len()), (2, 5, 5));
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    assert_eq!(sts.spec.replicas, Some(5));
    assert_eq!(sts.spec.template.metadata.unwrap().annotations, before);
    w.reconcile_bus("amoskys").await;
    assert_eq!(map_of(&w).epoch, 2);
}

/// What the agent sync would have read from each pod's Admin.Stats.
fn report_shards(w: &World, shards: &[(u32, bool, i64, u64)]) {
    let mut seen = w.ctx.shards_seen.lock().unwrap();
    let held = seen.entry(format!("{NS}/amoskys")).or_default();
    for &(i, retiring, newest, lag) in shards {
        held.insert(
            i,
            amoskys_proto::StatsResponse {
                shard: i,
                retiring,
                newest_stored_at: newest,
                events_stored: 100,
                export: (lag > 0).then(|| amoskys_proto::ExportStatus {
                    ready: true,
                    lag_events: lag,
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
    }
}

fn shard_counts(w: &World) -> (i32, usize, i32, i32) {
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    let cm: ConfigMap = w.api.get(Some(NS), "amoskys-shards").unwrap();
    let map = amoskys_client::shard::ShardMap::parse(&cm.data.unwrap()["map.yaml"]).unwrap();
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_eq!(map.active as i32, st.active_shards);
    assert_eq!(st.shards.len(), map.peers.len());
    (
        sts.spec.replicas.unwrap(),
        map.peers.len(),
        st.active_shards,
        st.retiring_shards,
    )
}

#[tokio::test]
async fn retiring_shards_keep_their_pods_until_their_data_ages_out() {
    let w = world();
    let mut bus = sample_bus();
    bus.spec.replicas = 5;
    bus.spec.wal.retention = "7d".into();
    w.api.insert(&bus);
    w.reconcile_bus("amoskys").await;
    assert_eq!(shard_counts(&w), (5, 5, 5, 0));
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_eq!(
        st.selector,
        "app.kubernetes.io/component=bus,app.kubernetes.io/instance=amoskys"
    );

    // 5 -> 3 (as `kubectl scale ebus amoskys --replicas 3` would write it):
    // shards 3 and 4 retire but keep their pods, and are still peers.
    let mut bus = (*w.bus("amoskys")).clone();
    bus.spec.replicas = 3;
    w.api.insert(&bus);
    w.reconcile_bus("amoskys").await;
    assert_eq!(shard_counts(&w), (5, 5, 3, 2));
    assert!(
        events(&w)
            .iter()
            .any(|e| e.reason.as_deref() == Some("RetiringShards"))
    );
    let st = w.bus("amoskys").status.clone().unwrap();
    assert_eq!(
        st.shards
            .iter()
            .map(|s| s.state.as_str())
            .collect::<Vec<_>>(),
        ["active", "active", "active", "retiring", "retiring"]
    );
    // The server certificate still names the retiring pods.
    let tls: Secret = w.api.get(Some(NS), "amoskys-server-tls").unwrap();
    let der = der(&secret_text(&tls, "tls.crt"));
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let sans = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(sans.contains("amoskys-4.amoskys-headless"), "{sans}");

    // Until the pods report, nothing goes. Then: shard 4's newest event is
    // 8 days old, shard 3's an hour: only pod 4 goes (the StatefulSet
    // removes the highest first).
    w.reconcile_bus("amoskys").await;
    assert_eq!(shard_counts(&w).0, 5);
    let now = w.clock.now().unix_timestamp_nanos() as i64;
    let day = 86_400 * 1_000_000_000i64;
    report_shards(
        &w,
        &[(3, true, now - day / 24, 0), (4, true, now - 8 * day, 0)],
    );
    w.reconcile_bus("amoskys").await;
    assert_eq!(shard_counts(&w), (4, 4, 3, 1));
    assert!(
        events(&w)
            .iter()
            .any(|e| e.reason.as_deref() == Some("RetiredShards"))
    );
    let st = w.bus("amoskys").status.clone().unwrap();
    assert!(st.shards[3].removable_after.is_some(), "{:?}", st.shards[3]);
    assert!(st.shards[3].newest_event_time.is_some());

    // Shard 3 ages out, but its export still has events to send: it stays.
    report_shards(&w, &[(3, true, now - 8 * day, 12)]);
    w.reconcile_bus("amoskys").await;
    assert_eq!(shard_counts(&w), (4, 4, 3, 1));
    report_shards(&w, &[(3, true, now - 8 * day, 0)]);
    w.reconcile_bus("amoskys").await;
    assert_eq!(shard_counts(&w), (3, 3, 3, 0));
}

#[tokio::test]
async fn discarding_retiring_shards_is_an_opt_in_with_a_warning() {
    let w = world();
    let mut bus = sample_bus();
    bus.spec.replicas = 4;
    w.api.insert(&bus);
    w.reconcile_bus("amoskys").await;
    let mut bus = (*w.bus("amoskys")).clone();
    bus.spec.replicas = 2;
    bus.spec.discard_retiring_shards = true;
    w.api.insert(&bus);
    w.reconcile_bus("amoskys").await;
    assert_eq!(shard_counts(&w), (2, 2, 2, 0));
    let warned = events(&w)
        .into_iter()
        .find(|e| e.reason.as_deref() == Some("DiscardingShards"))
        .expect("a Warning event");
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    assert!(warned.note.unwrap().contains("[2, 3]"));
}

#[tokio::test]
async fn export_ready_follows_what_every_shard_reports() {
    let w = world();
    let mut bus = sample_bus();
    bus.spec.replicas = 2;
    bus.spec.export = Some(amoskys_operator::crd::ExportSpec {
        nats: Some(amoskys_operator::crd::NatsExportSpec {
            url: "nats://nats.messaging:4222".into(),
            stream: "AMOSKYS".into(),
            ..Default::default()
        }),
    });
    w.api.insert(&bus);
    w.reconcile_bus("amoskys").await;
    let conds = |w: &World| w.bus("amoskys").status.clone().unwrap().conditions;
    let (status, reason, _) = condition(&conds(&w), "ExportReady");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NotReported"));

    let stats = |ready: bool, why: &str| amoskys_proto::StatsResponse {
        export: Some(amoskys_proto::ExportStatus {
            ready,
            lag_events: 5,
            last_error_reason: why.into(),
            last_error: if why.is_empty() {
                String::new()
            } else {
                "stream \"AMOSKYS\" not found".into()
            },
            ..Default::default()
        }),
        ..Default::default()
    };
    w.ctx.shards_seen.lock().unwrap().insert(
        format!("{NS}/amoskys"),
        [(0, stats(true, "")), (1, stats(false, "stream_missing"))].into(),
    );
    w.reconcile_bus("amoskys").await;
    let (status, reason, message) = condition(&conds(&w), "ExportReady");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "StreamMissing")
    );
    assert!(
        message.starts_with("shard 1:") && message.contains("AMOSKYS"),
        "{message}"
    );

    w.ctx.shards_seen.lock().unwrap().insert(
        format!("{NS}/amoskys"),
        [(0, stats(true, "")), (1, stats(true, ""))].into(),
    );
    w.reconcile_bus("amoskys").await;
    let (status, reason, message) = condition(&conds(&w), "ExportReady");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Exporting"));
    assert!(message.contains("10 events behind"), "{message}");
}

fn detection_rule(ns: &str, name: &str, condition: &str, expect: &str) -> DetectionRule {
    let spec: amoskys_detect::RuleSpec = serde_saphyr::from_str(&format!(
        "match: {{event: process, kinds: [start]}}\ncondition: {condition:?}\nsummary: 'shell {{process.name}}'\nseverity: error\ntests:\n  - name: sh starts\n    event: {{process: {{name: sh}}}}\n    expect: {expect}\n"
    ))
    .unwrap();
    let mut r = DetectionRule::new(name, DetectionRuleSpec { rule: spec });
    r.metadata.namespace = Some(ns.into());
    r.metadata.generation = Some(1);
    r
}

#[tokio::test]
async fn detection_rules_get_their_status_and_only_good_ones_reach_every_bus() {
    use amoskys_operator::controller::rules::{reconcile_cluster_rule, reconcile_rule};
    let w = started_world().await;
    w.api.insert(&detection_rule(
        NS,
        "shell",
        "process.name == 'sh'",
        "match",
    ));
    w.api.insert(&detection_rule(
        "shop",
        "shell",
        "process.name in ['sh', 'bash']",
        "match",
    ));
    w.api
        .insert(&detection_rule(NS, "syntax", "process.name == ", "match"));
    w.api.insert(&detection_rule(
        NS,
        "unknown-field",
        "process.nmae == 'sh'",
        "match",
    ));
    w.api.insert(&detection_rule(
        NS,
        "failing",
        "process.name == 'bash'",
        "match",
    ));
    w.api.insert(&ClusterDetectionRule::new(
        "miner",
        ClusterDetectionRuleSpec {
            rule: detection_rule(NS, "x", "process.name == 'sh'", "match")
                .spec
                .rule,
        },
    ));

    for (ns, name) in [
        (NS, "shell"),
        ("shop", "shell"),
        (NS, "syntax"),
        (NS, "unknown-field"),
        (NS, "failing"),
    ] {
        let r: DetectionRule = w.api.get(Some(ns), name).unwrap();
        reconcile_rule(std::sync::Arc::new(r), w.ctx.clone())
            .await
            .unwrap();
    }
    let c: ClusterDetectionRule = w.api.get(None, "miner").unwrap();
    reconcile_cluster_rule(std::sync::Arc::new(c), w.ctx.clone())
        .await
        .unwrap();

    let status = |ns: &str, name: &str| {
        let r: DetectionRule = w.api.get(Some(ns), name).unwrap();
        r.status.unwrap()
    };
    let good = status(NS, "shell");
    for t in ["Compiled", "TestsPassed", "Loaded"] {
        assert_eq!(condition(&good.conditions, t).0, "True", "{t}: {good:?}");
    }
    assert_eq!((good.tests, good.tests_passed), (1, 1));
    assert_eq!(good.observed_generation, Some(1));

    let syntax = status(NS, "syntax");
    let (st, reason, msg) = condition(&syntax.conditions, "Compiled");
    assert_eq!((st.as_str(), reason.as_str()), ("False", "CompileError"));
    assert!(
        msg.contains("spec.condition") && msg.contains("line 1, column"),
        "{msg}"
    );
    assert_eq!(condition(&syntax.conditions, "Loaded").0, "False");

    let unknown = status(NS, "unknown-field");
    let (st, _, msg) = condition(&unknown.conditions, "Compiled");
    assert_eq!(st, "False");
    assert!(msg.contains("nmae"), "{msg}");

    let failing = status(NS, "failing");
    assert_eq!(condition(&failing.conditions, "Compiled").0, "True");
    let (st, reason, msg) = condition(&failing.conditions, "TestsPassed");
    assert_eq!((st.as_str(), reason.as_str()), ("False", "TestsFailed"));
    assert!(msg.contains("sh starts"), "{msg}");
    assert_eq!(condition(&failing.conditions, "Loaded").0, "False");

    let miner: ClusterDetectionRule = w.api.get(None, "miner").unwrap();
    let generation = miner.metadata.generation;
    let miner = miner.status.unwrap();
    assert_eq!(condition(&miner.conditions, "Loaded").0, "True");
    assert_eq!(miner.observed_generation, generation);

    // The bus gets the rules that passed, mounted where its config reads them.
    w.reconcile_bus("amoskys").await;
    let cm: ConfigMap = w
        .api
        .get(Some(NS), "amoskys-rules")
        .expect("rules ConfigMap");
    let yaml = cm.data.unwrap()["rules.yaml"].clone();
    let loaded = amoskys_detect::parse_rule_file("rules.yaml", &yaml).unwrap();
    let names: Vec<String> = loaded.iter().map(|d| d.qualified_name()).collect();
    assert_eq!(
        names,
        vec![
            "miner".to_string(),
            format!("{NS}/shell"),
            "shop/shell".to_string()
        ]
    );
    let bus_yaml: ConfigMap = w.api.get(Some(NS), "amoskys-config").unwrap();
    assert!(bus_yaml.data.unwrap()["bus.yaml"].contains("rulesDir: /etc/amoskys/rules"));
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    let pod = sts.spec.template.spec.unwrap();
    let vol = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "rules")
        .expect("rules volume");
    assert_eq!(vol.config_map.unwrap().name, "amoskys-rules");

    // Nothing changed: a second pass writes nothing.
    let before = w.api.changes().len();
    let r: DetectionRule = w.api.get(Some(NS), "syntax").unwrap();
    reconcile_rule(std::sync::Arc::new(r), w.ctx.clone())
        .await
        .unwrap();
    w.reconcile_bus("amoskys").await;
    assert_eq!(object_writes(&w, before), Vec::<String>::new());

    // A fixed rule joins the rule set.
    w.api.patch::<DetectionRule>(
        Some(NS),
        "syntax",
        json!({"spec": {"condition": "process.name == 'sh'"}, "metadata": {"generation": 2}}),
    );
    let r: DetectionRule = w.api.get(Some(NS), "syntax").unwrap();
    reconcile_rule(std::sync::Arc::new(r), w.ctx.clone())
        .await
        .unwrap();
    assert_eq!(
        condition(&status(NS, "syntax").conditions, "Loaded").0,
        "True"
    );
    w.reconcile_bus("amoskys").await;
    let cm: ConfigMap = w.api.get(Some(NS), "amoskys-rules").unwrap();
    assert!(cm.data.unwrap()["rules.yaml"].contains("name: syntax"));
}

#[tokio::test]
async fn each_bus_gets_a_network_policy_whose_selectors_match_the_pods_the_builders_make() {
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let w = started_world().await;
    w.reconcile_bus("amoskys").await;
    w.reconcile_set("nodes").await;
    let sts: StatefulSet = w.api.get(Some(NS), "amoskys").unwrap();
    let bus_pod = sts.spec.template.metadata.unwrap().labels.unwrap();
    let np: NetworkPolicy = w.api.get(Some(NS), "amoskys").expect("NetworkPolicy");
    let spec = np.spec.unwrap();
    let selects = |sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
                   labels: &std::collections::BTreeMap<String, String>| {
        sel.match_labels
            .as_ref()
            .unwrap()
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    };
    assert!(selects(spec.pod_selector.as_ref().unwrap(), &bus_pod));
    let ingress = spec.ingress.unwrap();
    assert_eq!(
        ingress[0].ports.as_ref().unwrap()[0].port,
        Some(IntOrString::Int(7443))
    );
    // The sample's agents capture flows in the host's network, where no pod
    // selector reaches them; without the nodes' ranges gRPC stays open.
    assert_eq!(ingress[0].from, None);

    // With the nodes' ranges: the agents' pods, the bus's own, the operator
    // and the ranges, nothing else.
    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"networkPolicy": {"agentCIDRs": ["10.0.0.0/16"], "httpNamespaces": ["monitoring"]}}}),
    );
    w.reconcile_bus("amoskys").await;
    let np: NetworkPolicy = w.api.get(Some(NS), "amoskys").unwrap();
    let ingress = np.spec.unwrap().ingress.unwrap();
    let from = ingress[0].from.clone().unwrap();
    let ds: DaemonSet = w.api.get(Some(NS), "nodes-agent").unwrap();
    let agent_pod = ds.spec.template.metadata.unwrap().labels.unwrap();
    let peers: Vec<&k8s_openapi::api::networking::v1::NetworkPolicyPeer> = from.iter().collect();
    assert!(
        peers.iter().any(|p| p.namespace_selector.is_none()
            && p.pod_selector
                .as_ref()
                .is_some_and(|s| selects(s, &agent_pod))),
        "the agents' pods: {from:?}"
    );
    assert!(
        peers.iter().any(|p| p.namespace_selector.is_none()
            && p.pod_selector
                .as_ref()
                .is_some_and(|s| selects(s, &bus_pod))),
        "the bus's own pods: {from:?}"
    );
    // The operator's pods as the chart labels them, in any namespace.
    let operator_pod = std::collections::BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "amoskys".to_string()),
        (
            "app.kubernetes.io/instance".to_string(),
            "amoskys".to_string(),
        ),
        (
            "app.kubernetes.io/component".to_string(),
            "operator".to_string(),
        ),
    ]);
    assert!(
        peers.iter().any(|p| p.namespace_selector.is_some()
            && p.pod_selector
                .as_ref()
                .is_some_and(|s| selects(s, &operator_pod))),
        "the operator: {from:?}"
    );
    assert!(
        peers
            .iter()
            .any(|p| p.ip_block.as_ref().is_some_and(|b| b.cidr == "10.0.0.0/16"))
    );
    assert_eq!(peers.len(), 4, "{from:?}");
    let http_from = ingress[1].from.clone().unwrap();
    assert_eq!(http_from.len(), 2, "{http_from:?}");
    assert_eq!(
        http_from[1]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["kubernetes.io/metadata.name"],
        "monitoring"
    );

    // A bad range is named; turning the policy off stops managing it.
    w.api.patch::<EventBus>(
        Some(NS),
        "amoskys",
        json!({"spec": {"networkPolicy": {"agentCIDRs": ["10.0.0.0/33"]}}}),
    );
    assert_invalid(
        &w,
        "EventBus",
        "amoskys",
        "spec.networkPolicy.agentCIDRs[0]",
    )
    .await;
}
