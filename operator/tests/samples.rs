#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The checked-in CRDs match the Rust types, the samples parse into them,
//! and the samples build the objects a user would expect.

mod common;

use amoskys_operator::build::{agentset, eventbus};
use amoskys_operator::crd;
use amoskys_operator::crd::{AgentSet, EventBus};
use common::{repo, sample};
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use kube::ResourceExt;

fn with_ns<K: kube::Resource>(mut k: K) -> K {
    k.meta_mut().namespace = Some("security".into());
    k.meta_mut().uid = Some("0f0f0f0f-0000-0000-0000-000000000001".into());
    k
}

fn samples() -> (EventBus, AgentSet) {
    (
        with_ns(sample("config/eventbus.yaml")),
        with_ns(sample("config/agentset.yaml")),
    )
}

#[test]
fn checked_in_crds_are_current() {
    let want = crd::yaml().unwrap();
    for path in [
        "crds/amoskys.io.yaml",
        "charts/amoskys/crds/amoskys.io.yaml",
    ] {
        let have = std::fs::read_to_string(repo(path)).unwrap_or_default();
        assert!(
            have == want,
            "{path} is stale: run `cargo run -- crdgen --out crds/amoskys.io.yaml --out charts/amoskys/crds/amoskys.io.yaml`"
        );
    }
}

#[test]
fn crds_carry_names_columns_status_and_rules() {
    let text = crd::yaml().unwrap();
    for needle in [
        "- ebus",
        "- aset",
        "- ag",
        "- amoskys",
        "x-kubernetes-validations",
        "sync must be always, batch or never",
        "Cert Expires",
        "Last Seen",
        "subresources",
    ] {
        assert!(text.contains(needle), "CRDs lack {needle:?}");
    }
}

fn config_hash(s: &StatefulSet) -> String {
    s.spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[amoskys_operator::labels::CONFIG_HASH]
        .clone()
}

#[test]
fn samples_parse_validate_and_render_configs_the_binaries_accept() {
    let (bus, set) = samples();
    eventbus::validate(&bus).unwrap();
    agentset::validate(&set).unwrap();
    assert_eq!(bus.spec.wal.size, "20Gi");
    assert_eq!(set.spec.bus_ref.name, "amoskys");
    assert_eq!(
        set.spec.collectors.snmp.targets[0].credentials_secret,
        "snmp-core-switch"
    );

    let cfg = eventbus::bus_config(&bus);
    let file: amoskys_eventbus::config::BusConfigFile = serde_saphyr::from_str(&cfg).unwrap();
    let resolved = amoskys_eventbus::config::resolve(file, Default::default()).unwrap();
    assert_eq!(resolved.listen.port(), 7443);
    assert_eq!(resolved.retention.as_secs(), 7 * 86_400);
    assert!(resolved.dashboard.admin_token_file.is_some());

    let agent_cfg = agentset::agent_config(&set);
    let file: amoskys_agents::config::AgentConfigFile = serde_saphyr::from_str(&agent_cfg).unwrap();
    assert!(file.collectors.flow.enabled);
    assert_eq!(file.spool.max_bytes.as_deref(), Some("256Mi"));
}

#[test]
fn the_bus_statefulset_services_and_pdb() {
    let (bus, _) = samples();
    let sts = eventbus::statefulset(&bus, None);
    let spec = &sts.spec;
    assert_eq!(spec.service_name.as_deref(), Some("amoskys-headless"));
    let pod = spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .clone()
            .unwrap()
    };
    assert_eq!(probe_path(&c.readiness_probe), "/readyz");
    assert_eq!(probe_path(&c.liveness_probe), "/healthz");
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    assert!(
        pod.termination_grace_period_seconds.unwrap() > 20,
        "longer than the bus's drain"
    );
    assert!(pod.topology_spread_constraints.is_some());
    let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
    assert_eq!(common::claim_storage(claim), "20Gi");
    assert_eq!(sts.owner_references()[0].kind, "EventBus");

    // A config change rolls the pods; the same spec keeps the same hash.
    let mut changed = bus.clone();
    changed.spec.wal.retention = "1d".into();
    assert_eq!(
        config_hash(&sts),
        config_hash(&eventbus::statefulset(&bus, None))
    );
    assert_ne!(
        config_hash(&sts),
        config_hash(&eventbus::statefulset(&changed, None))
    );

    let (client, headless) = eventbus::services(&bus);
    assert_eq!(
        headless.spec.as_ref().unwrap().cluster_ip.as_deref(),
        Some("None")
    );
    assert_eq!(
        client.spec.as_ref().unwrap().ports.as_ref().unwrap().len(),
        2
    );
    let sans = eventbus::server_dns_names(&bus);
    assert!(sans.contains(&"amoskys.security.svc".to_string()));
    assert!(sans.contains(&"amoskys-0.amoskys-headless.security.svc.cluster.local".to_string()));
    assert_eq!(eventbus::endpoint(&bus), "amoskys.security.svc:7443");
    assert!(eventbus::pdb(&bus).spec.unwrap().max_unavailable.is_some());
}

fn added_caps(ds: &DaemonSet) -> Vec<String> {
    ds.spec.template.spec.as_ref().unwrap().containers[0]
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
}

#[test]
fn the_agent_daemonset() {
    let (bus, set) = samples();
    let ds = agentset::daemonset(&set, &bus, Some("registry.local/amoskys:test"));
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("registry.local/amoskys:test"));
    let args = c.args.as_ref().unwrap().join(" ");
    assert!(
        args.contains("--bus https://amoskys.security.svc:7443"),
        "{args}"
    );
    assert!(args.contains("--agent-id nodes/$(NODE_NAME)"), "{args}");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    let caps = added_caps(&ds);
    assert!(
        caps.contains(&"NET_RAW".to_string()),
        "flow needs NET_RAW: {caps:?}"
    );
    let spool = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "spool")
        .unwrap();
    assert_eq!(
        spool.host_path.as_ref().unwrap().path,
        "/var/lib/amoskys/security-nodes"
    );
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["kubernetes.io/os"],
        "linux"
    );
    assert_eq!(pod.tolerations.as_ref().unwrap().len(), 1);
    assert_eq!(ds.owner_references()[0].name, set.name_any());
}

#[test]
fn collectors_get_only_the_privileges_they_need() {
    let (bus, mut set) = samples();
    set.spec.collectors.flow.enabled = false;
    let caps = added_caps(&agentset::daemonset(&set, &bus, None));
    assert!(
        !caps.contains(&"NET_RAW".to_string()),
        "no flow, no NET_RAW: {caps:?}"
    );

    // Flow alone: capture, plus the host's processes to name each flow's
    // owner; without owners, capture only.
    let mut flow_only = set.clone();
    flow_only.spec.collectors.process.enabled = false;
    flow_only.spec.collectors.inventory.enabled = false;
    flow_only.spec.collectors.flow.enabled = true;
    let ds = agentset::daemonset(&flow_only, &bus, None);
    assert_eq!(
        added_caps(&ds),
        ["DAC_READ_SEARCH", "NET_ADMIN", "NET_RAW", "SYS_PTRACE"]
    );
    assert_eq!(ds.spec.template.spec.as_ref().unwrap().host_pid, Some(true));
    flow_only.spec.collectors.flow.owners = false;
    let ds = agentset::daemonset(&flow_only, &bus, None);
    assert_eq!(added_caps(&ds), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(ds.spec.template.spec.as_ref().unwrap().host_pid, None);
    assert!(agentset::agent_config(&flow_only).contains("owners: false"));

    set.spec.collectors.process.enabled = false;
    set.spec.collectors.inventory.enabled = false;
    set.spec.collectors.synthetic.enabled = true;
    let ds = agentset::daemonset(&set, &bus, None);
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert!(added_caps(&ds).is_empty());
    assert_eq!(pod.host_network, None);
    assert_eq!(pod.host_pid, None);

    // SNMP credentials are mounted from the referenced Secret, as files.
    set.spec.collectors.snmp.enabled = true;
    let ds = agentset::daemonset(&set, &bus, None);
    let pod = ds.spec.template.spec.as_ref().unwrap();
    let vol = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "snmp-0")
        .unwrap();
    assert_eq!(
        vol.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("snmp-core-switch")
    );
    let cfg = agentset::agent_config(&set);
    assert!(
        cfg.contains("/etc/amoskys/snmp/snmp-core-switch/community"),
        "{cfg}"
    );

    // Paused: no node matches, nothing is deleted.
    set.spec.paused = true;
    let ds = agentset::daemonset(&set, &bus, None);
    let sel = ds.spec.template.spec.unwrap().node_selector.unwrap();
    assert!(sel.contains_key(agentset::PAUSED_NODE_LABEL));
}

#[test]
fn invalid_specs_name_the_field() {
    let (bus, set) = samples();
    let bad_bus = |f: &dyn Fn(&mut EventBus)| {
        let mut b = bus.clone();
        f(&mut b);
        eventbus::validate(&b).unwrap_err().field
    };
    assert_eq!(
        bad_bus(&|b| b.spec.wal.retention = "forever".into()),
        "spec.wal.retention"
    );
    assert_eq!(
        bad_bus(&|b| b.spec.wal.max_bytes = "lots".into()),
        "spec.wal.maxBytes"
    );
    assert_eq!(
        bad_bus(&|b| b.spec.wal.sync = "sometimes".into()),
        "spec.wal.sync"
    );
    assert_eq!(
        bad_bus(&|b| b.spec.wal.size = "big".into()),
        "spec.wal.size"
    );
    assert_eq!(
        bad_bus(&|b| b.spec.tls.renew_before = "100d".into()),
        "spec.tls.renewBefore"
    );
    assert_eq!(bad_bus(&|b| b.spec.replicas = 0), "spec.replicas");

    let bad_set = |f: &dyn Fn(&mut AgentSet)| {
        let mut s = set.clone();
        f(&mut s);
        agentset::validate(&s).unwrap_err()
    };
    assert_eq!(
        bad_set(&|s| s.spec.bus_ref.name = String::new()).field,
        "spec.busRef.name"
    );
    let e = bad_set(&|s| s.spec.collectors.flow.idle_timeout = "soon".into());
    assert_eq!(e.field, "spec.collectors.flow.idleTimeout", "{e}");
    let e = bad_set(&|s| {
        s.spec.collectors.snmp.enabled = true;
        s.spec.collectors.snmp.targets[0].credentials_secret = String::new();
    });
    assert_eq!(e.field, "spec.collectors.snmp.targets[0].credentialsSecret");
    // An unknown collector is kept when the resource is read, and named.
    let text = std::fs::read_to_string(repo("config/agentset.yaml"))
        .unwrap()
        .replace(
            "    synthetic:\n",
            "    keylogger:\n      enabled: true\n    synthetic:\n",
        );
    let set: AgentSet = serde_saphyr::from_str(&text).unwrap();
    let e = agentset::validate(&set).unwrap_err();
    assert_eq!(e.field, "spec.collectors.keylogger", "{e}");
    assert!(
        e.message
            .contains("process, flow, snmp, inventory, synthetic"),
        "{e}"
    );
}
