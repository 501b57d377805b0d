//! What an `AgentSet` becomes: the agent config rendered from its
//! collectors, a ConfigMap, and a DaemonSet that has only the host
//! namespaces and capabilities its enabled collectors need.

use std::collections::{BTreeMap, BTreeSet};

use amoskys_agents::config::{
    Collectors, ConfigError, FlowSpec, SnmpSpec, SnmpTarget, SnmpVersion,
};
use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource,
    HostPathVolumeSource, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt;
use serde::Serialize;

use crate::build::eventbus::{InvalidSpec, invalid, is_quantity};
use crate::crd::{AgentSet, AgentSetCollectors, EventBus};
use crate::labels::{CONFIG_HASH, hash, labels, owned_meta, rendered, selector};

/// The `app.kubernetes.io/component` of agent objects.
pub const COMPONENT: &str = "agent";
/// Where the agent's ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/amoskys/config";
/// Where the agents' client certificate Secret is mounted.
pub const TLS_DIR: &str = "/etc/amoskys/tls";
/// Where SNMP credential Secrets are mounted, one directory per target.
pub const SNMP_DIR: &str = "/etc/amoskys/snmp";
/// The host directory holding each AgentSet's spools.
pub const SPOOL_ROOT: &str = "/var/lib/amoskys";
/// A label no node carries: a paused AgentSet's DaemonSet schedules nothing
/// while the DaemonSet, its history and the Agents' spools stay.
pub const PAUSED_NODE_LABEL: &str = "amoskys.io/paused-agentset";

/// The names of the objects an AgentSet owns.
pub struct Names {
    /// The DaemonSet.
    pub daemonset: String,
    /// The agent ConfigMap.
    pub config: String,
    /// The agents' client certificate Secret.
    pub tls_secret: String,
}

impl Names {
    /// The names for AgentSet `set`.
    pub fn of(set: &str) -> Self {
        Self {
            daemonset: format!("{set}-agent"),
            config: format!("{set}-agent-config"),
            tls_secret: format!("{set}-agent-tls"),
        }
    }
}

/// The host access a set of collectors needs (docs/security.md explains each).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Privileges {
    /// The host's PID namespace (process and inventory see host processes).
    pub host_pid: bool,
    /// The host's network namespace (flow capture, the proc connector).
    pub host_network: bool,
    /// Linux capabilities added to the container.
    pub capabilities: BTreeSet<&'static str>,
}

/// The least host access the enabled collectors need.
pub fn privileges(c: &AgentSetCollectors) -> Privileges {
    let mut p = Privileges::default();
    if c.process.enabled {
        // The proc connector only reports to the host network namespace and
        // needs NET_ADMIN; host PIDs and ptrace read every process's exe.
        p.host_pid = true;
        p.host_network = true;
        p.capabilities
            .extend(["NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"]);
    }
    if c.flow.enabled {
        p.host_network = true;
        p.capabilities.extend(["NET_RAW", "NET_ADMIN"]);
        if c.flow.owners {
            // The process behind each flow: every process's open files and
            // its network namespace's sockets.
            p.host_pid = true;
            p.capabilities.extend(["SYS_PTRACE", "DAC_READ_SEARCH"]);
        }
    }
    if c.inventory.enabled {
        // The node's sockets and ARP table, and the processes owning listeners.
        p.host_network = true;
        p.host_pid = true;
        p.capabilities.extend(["SYS_PTRACE", "DAC_READ_SEARCH"]);
    }
    p
}

/// The agent's own `collectors:` section: SNMP credentials become files
/// under the mounted Secrets.
pub fn agent_collectors(c: &AgentSetCollectors) -> Collectors {
    let f = &c.flow;
    Collectors {
        process: c.process.clone(),
        flow: FlowSpec {
            enabled: f.enabled,
            interface: f.interface.clone(),
            bpf_filter: f.bpf_filter.clone(),
            pcap_file: String::new(),
            idle_timeout: f.idle_timeout.clone(),
            active_timeout: f.active_timeout.clone(),
            max_flows: f.max_flows,
            snaplen: f.snaplen,
            owners: f.owners,
            owner_interval: f.owner_interval.clone(),
        },
        snmp: SnmpSpec {
            enabled: c.snmp.enabled,
            interval: c.snmp.interval.clone(),
            timeout: c.snmp.timeout.clone(),
            retries: c.snmp.retries,
            targets: c
                .snmp
                .targets
                .iter()
                .map(|t| {
                    let file = |key: &str| {
                        Some(format!("{SNMP_DIR}/{}/{key}", t.credentials_secret).into())
                    };
                    let v3 = t.version == SnmpVersion::V3;
                    SnmpTarget {
                        name: t.name.clone(),
                        address: t.address.clone(),
                        version: t.version,
                        community_file: if v3 { None } else { file("community") },
                        user: t.user.clone(),
                        auth_protocol: t.auth_protocol.clone(),
                        auth_password_file: if v3 { file("authPassword") } else { None },
                        priv_protocol: t.priv_protocol.clone(),
                        priv_password_file: if v3 && !t.priv_protocol.is_empty() {
                            file("privPassword")
                        } else {
                            None
                        },
                    }
                })
                .collect(),
        },
        inventory: c.inventory.clone(),
        synthetic: c.synthetic.clone(),
    }
}

/// Secrets the SNMP targets reference, each mounted once.
pub fn snmp_secrets(set: &AgentSet) -> BTreeSet<String> {
    if !set.spec.collectors.snmp.enabled {
        return BTreeSet::new();
    }
    set.spec
        .collectors
        .snmp
        .targets
        .iter()
        .map(|t| t.credentials_secret.clone())
        .collect()
}

/// Checks the spec as the agent itself would, naming the field; references
/// to other objects (the bus, Secrets) are checked by the reconciler.
pub fn validate(set: &AgentSet) -> Result<(), InvalidSpec> {
    let s = &set.spec;
    if s.bus_ref.name.trim().is_empty() {
        return Err(invalid(
            "spec.busRef.name",
            "missing: name the EventBus the agents send to",
        ));
    }
    if let Some(name) = s.collectors.unknown.keys().next() {
        return Err(invalid(
            format!("spec.collectors.{name}"),
            format!(
                "unknown collector; known: {}",
                crate::crd::COLLECTORS.join(", ")
            ),
        ));
    }
    if !is_quantity(&s.spool_size) {
        return Err(invalid(
            "spec.spoolSize",
            format!("{:?} is not a quantity like 256Mi", s.spool_size),
        ));
    }
    for (i, t) in s.collectors.snmp.targets.iter().enumerate() {
        if s.collectors.snmp.enabled && t.credentials_secret.trim().is_empty() {
            return Err(invalid(
                format!("spec.collectors.snmp.targets[{i}].credentialsSecret"),
                "missing: the Secret holding this target's community or passwords",
            ));
        }
    }
    // The agent's own rules; SNMP credential files exist only inside the
    // pod, so only their naming is checked here.
    let c = agent_collectors(&s.collectors);
    amoskys_agents::config::resolve_collectors_with(
        &c,
        None,
        amoskys_agents::config::Secrets::NamedOnly,
    )
    .map_err(|e| match e {
        ConfigError::Invalid { key, message } => invalid(format!("spec.{key}"), message),
        other => invalid("spec.collectors", other.to_string()),
    })?;
    Ok(())
}

/// The keys of the agent's own config file that the operator sets.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AgentFile {
    spool: amoskys_agents::config::SpoolFile,
    kubernetes: amoskys_agents::config::KubernetesFile,
    collectors: Collectors,
}

/// The agent's config file (`agent.yaml`) for the set.
pub fn agent_config(set: &AgentSet) -> String {
    let f = AgentFile {
        spool: amoskys_agents::config::SpoolFile {
            max_bytes: Some(set.spec.spool_size.clone()),
        },
        kubernetes: amoskys_agents::config::KubernetesFile {
            pods: watches_pods(set),
        },
        collectors: agent_collectors(&set.spec.collectors),
    };
    rendered(set, &f)
}

/// Whether the agents run as a ServiceAccount, and so watch their node's pods.
fn watches_pods(set: &AgentSet) -> bool {
    set.spec
        .service_account_name
        .as_deref()
        .is_some_and(|s| !s.is_empty())
}

fn meta(set: &AgentSet, name: &str) -> ObjectMeta {
    owned_meta(set, COMPONENT, name)
}

/// The ConfigMap holding the agent's config file.
pub fn config_map(set: &AgentSet) -> ConfigMap {
    let name = Names::of(&set.name_any()).config;
    crate::labels::config_map(set, COMPONENT, &name, "agent.yaml", agent_config(set))
}

/// The agents' DaemonSet, sending to `bus`; the operator's image when the
/// set names none.
pub fn daemonset(set: &AgentSet, bus: &EventBus, operator_image: Option<&str>) -> DaemonSet {
    let name = set.name_any();
    let n = Names::of(&name);
    let s = &set.spec;
    let config = agent_config(set);
    let p = privileges(&s.collectors);
    let image = crate::labels::image(&s.image, operator_image);
    let ns = set.namespace().unwrap_or_else(|| "default".into());
    let spool = format!("{SPOOL_ROOT}/{ns}-{name}");
    let mut mounts = vec![
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: "spool".into(),
            mount_path: spool.clone(),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: n.config.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(n.tls_secret.clone()),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "spool".into(),
            // On the node, so a restarted agent pod finds what it had not sent.
            host_path: Some(HostPathVolumeSource {
                path: spool.clone(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        },
    ];
    for (i, secret) in snmp_secrets(set).iter().enumerate() {
        let vol = format!("snmp-{i}");
        mounts.push(VolumeMount {
            name: vol.clone(),
            mount_path: format!("{SNMP_DIR}/{secret}"),
            read_only: Some(true),
            ..Default::default()
        });
        volumes.push(Volume {
            name: vol,
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let env = |k: &str, path: &str| EnvVar {
        name: k.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let bus_url = format!("https://{}", crate::build::eventbus::endpoint(bus));
    let container = Container {
        name: "agent".into(),
        image: Some(image),
        args: Some(vec![
            "agent".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/agent.yaml"),
            "--bus".into(),
            bus_url,
            "--tls-dir".into(),
            TLS_DIR.into(),
            "--spool-dir".into(),
            spool,
            "--agent-id".into(),
            format!("{name}/$(NODE_NAME)"),
            "--node".into(),
            "$(NODE_NAME)".into(),
            "--http".into(),
            "127.0.0.1:9465".into(),
        ]),
        env: Some(vec![env("NODE_NAME", "spec.nodeName")]),
        resources: s.resources.clone(),
        security_context: Some(SecurityContext {
            // Root inside the pod only for the capabilities below; nothing else.
            run_as_user: Some(0),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: (!p.capabilities.is_empty())
                    .then(|| p.capabilities.iter().map(|c| c.to_string()).collect()),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let mut node_selector = s.node_selector.clone();
    if s.paused {
        node_selector.insert(PAUSED_NODE_LABEL.into(), "true".into());
    }
    let sel = selector(COMPONENT, &name);
    let mut pod_labels = labels(COMPONENT, &name);
    pod_labels.extend(sel.clone());
    DaemonSet {
        metadata: meta(set, &n.daemonset),
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(sel),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH.to_string(),
                        hash(&[&config]),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    host_pid: p.host_pid.then_some(true),
                    host_network: p.host_network.then_some(true),
                    dns_policy: p.host_network.then(|| "ClusterFirstWithHostNet".into()),
                    node_selector: (!node_selector.is_empty()).then_some(node_selector),
                    tolerations: (!s.tolerations.is_empty()).then(|| s.tolerations.clone()),
                    // The container's own context says more; this sets the
                    // pod's default for anything added to it.
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    // A token only for the pods watch; none otherwise.
                    service_account_name: s
                        .service_account_name
                        .clone()
                        .filter(|_| watches_pods(set)),
                    automount_service_account_token: Some(watches_pods(set)),
                    // The agent drains its spool to the bus on SIGTERM.
                    termination_grace_period_seconds: Some(30),
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}
