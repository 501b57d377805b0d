//! `amoskys render`: what the operator would create for some EventBus,
//! AgentSet and detection rule resources, without a cluster. The same
//! builders the reconcilers apply produce every object; Secrets come with
//! their names, type and labels only, since their keys are issued in the
//! cluster. For review and for GitOps diffs, as `helm template` is for the
//! chart.

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::Serialize;
use serde_json::Value;

use crate::build::{agentset, eventbus, rules};
use crate::crd::{AgentSet, ClusterDetectionRule, DetectionRule, EventBus};

/// Why a set of resources cannot be rendered; names the resource and field.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A document is not a resource this renders, or does not parse as one.
    #[error("document {index}: {message}")]
    Document {
        /// Its position in the input, from 1.
        index: usize,
        /// What is wrong.
        message: String,
    },
    /// A resource the operator would refuse.
    #[error("{kind} {name}: {message}")]
    Invalid {
        /// EventBus or AgentSet.
        kind: &'static str,
        /// namespace/name.
        name: String,
        /// The field and what is wrong with it.
        message: String,
    },
}

/// The resources of the input, by kind.
#[derive(Default)]
pub struct Input {
    buses: Vec<EventBus>,
    sets: Vec<AgentSet>,
    rules: Vec<DetectionRule>,
    cluster_rules: Vec<ClusterDetectionRule>,
}

impl Input {
    /// Sorts `docs` (parsed YAML documents) by kind; resources without a
    /// namespace get `namespace`. Other kinds are an error naming them.
    pub fn from_documents(docs: Vec<Value>, namespace: &str) -> Result<Self, RenderError> {
        let mut input = Input::default();
        for (n, doc) in docs.into_iter().enumerate() {
            let index = n + 1;
            if doc.is_null() {
                continue;
            }
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let parse_error = |e: serde_json::Error| RenderError::Document {
                index,
                message: format!("{kind}: {e}"),
            };
            match kind.as_str() {
                "EventBus" => {
                    let mut b: EventBus = serde_json::from_value(doc).map_err(parse_error)?;
                    in_namespace(&mut b.metadata, namespace);
                    input.buses.push(b);
                }
                "AgentSet" => {
                    let mut s: AgentSet = serde_json::from_value(doc).map_err(parse_error)?;
                    in_namespace(&mut s.metadata, namespace);
                    input.sets.push(s);
                }
                "DetectionRule" => {
                    let mut r: DetectionRule = serde_json::from_value(doc).map_err(parse_error)?;
                    in_namespace(&mut r.metadata, namespace);
                    input.rules.push(r);
                }
                "ClusterDetectionRule" => {
                    input
                        .cluster_rules
                        .push(serde_json::from_value(doc).map_err(parse_error)?);
                }
                other => {
                    return Err(RenderError::Document {
                        index,
                        message: format!(
                            "kind {other:?}: render takes EventBus, AgentSet, DetectionRule and ClusterDetectionRule"
                        ),
                    });
                }
            }
        }
        Ok(input)
    }
}

fn in_namespace(meta: &mut ObjectMeta, namespace: &str) {
    if meta.namespace.as_deref().unwrap_or_default().is_empty() {
        meta.namespace = Some(namespace.to_string());
    }
}

fn id<K: ResourceExt>(k: &K) -> String {
    format!("{}/{}", k.namespace().unwrap_or_default(), k.name_any())
}

fn value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A Secret the operator issues, without its keys.
fn secret(owner_meta: ObjectMeta, type_: &str) -> Value {
    value(&Secret {
        metadata: owner_meta,
        type_: Some(type_.to_string()),
        ..Default::default()
    })
}

/// Every object the operator would create for `input`, in the order it
/// applies them; `image` is the operator's own (what pods run when a
/// resource names none).
pub fn render(input: &Input, image: Option<&str>) -> Result<Vec<Value>, RenderError> {
    let rule_set = rules::rule_set_yaml(&rules::documents(&input.rules, &input.cluster_rules))
        .map_err(|e| RenderError::Document {
            index: 0,
            message: format!("the rule set: {e}"),
        })?;
    let mut out = Vec::new();
    for bus in &input.buses {
        eventbus::validate(bus).map_err(|e| RenderError::Invalid {
            kind: "EventBus",
            name: id(bus),
            message: e.to_string(),
        })?;
        let names = eventbus::Names::of(&bus.name_any());
        let meta = |name: &str| crate::labels::owned_meta(bus, eventbus::COMPONENT, name);
        for s in [
            &names.ca_secret,
            &names.server_secret,
            &names.admin_secret,
            &names.peer_secret,
        ] {
            out.push(secret(meta(s), "kubernetes.io/tls"));
        }
        out.push(secret(meta(&names.dashboard_secret), "Opaque"));
        for set in input.sets.iter().filter(|s| sends_to(s, bus)) {
            let tls = agentset::Names::of(&set.name_any()).tls_secret;
            out.push(secret(meta(&tls), "kubernetes.io/tls"));
        }
        out.push(value(&eventbus::config_map(bus)));
        out.push(value(&eventbus::rules_config_map(bus, rule_set.clone())));
        let pods = eventbus::pods_kept(bus);
        let map = eventbus::shard_map(bus, None, pods);
        out.push(value(&eventbus::shard_map_config(bus, &map)));
        let (client, headless) = eventbus::services(bus);
        out.push(value(&headless));
        out.push(value(&client));
        let mut sts = eventbus::statefulset(bus, image);
        sts.spec.replicas = Some(pods);
        out.push(value(&sts));
        out.push(value(&eventbus::pdb(bus)));
        let sets: Vec<AgentSet> = input
            .sets
            .iter()
            .filter(|s| sends_to(s, bus))
            .cloned()
            .collect();
        if let Some(np) = crate::build::network::network_policy(bus, &sets) {
            out.push(value(&np));
        }
    }
    for set in &input.sets {
        agentset::validate(set).map_err(|e| RenderError::Invalid {
            kind: "AgentSet",
            name: id(set),
            message: e.to_string(),
        })?;
        let bus = input
            .buses
            .iter()
            .find(|b| sends_to(set, b))
            .ok_or_else(|| RenderError::Invalid {
                kind: "AgentSet",
                name: id(set),
                message: format!(
                    "spec.busRef.name: EventBus {:?} in namespace {:?} is not in the input (its DaemonSet dials the bus's address)",
                    set.spec.bus_ref.name,
                    set.namespace().unwrap_or_default()
                ),
            })?;
        out.push(value(&agentset::config_map(set)));
        out.push(value(&agentset::daemonset(set, bus, image)));
    }
    Ok(out)
}

fn sends_to(set: &AgentSet, bus: &EventBus) -> bool {
    set.spec.bus_ref.name == bus.name_any() && set.namespace() == bus.namespace()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<Value> {
        serde_saphyr::from_multiple(yaml).unwrap()
    }

    const BUS: &str = "apiVersion: amoskys.io/v1alpha1\nkind: EventBus\nmetadata: {name: amoskys}\nspec: {replicas: 3}\n";
    const SET: &str = "apiVersion: amoskys.io/v1alpha1\nkind: AgentSet\nmetadata: {name: nodes}\nspec: {busRef: {name: amoskys}}\n";

    fn kinds_and_names(objects: &[Value]) -> Vec<String> {
        objects
            .iter()
            .map(|o| {
                format!(
                    "{} {}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["namespace"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn a_bus_and_its_agents_become_every_object_the_operator_applies() {
        let input = Input::from_documents(docs(&format!("{BUS}---\n{SET}")), "security").unwrap();
        let objects = render(&input, Some("example/amoskys:1")).unwrap();
        assert_eq!(
            kinds_and_names(&objects),
            [
                "Secret security/amoskys-ca",
                "Secret security/amoskys-server-tls",
                "Secret security/amoskys-admin-tls",
                "Secret security/amoskys-peer-tls",
                "Secret security/amoskys-dashboard",
                "Secret security/nodes-agent-tls",
                "ConfigMap security/amoskys-config",
                "ConfigMap security/amoskys-rules",
                "ConfigMap security/amoskys-shards",
                "Service security/amoskys-headless",
                "Service security/amoskys",
                "StatefulSet security/amoskys",
                "PodDisruptionBudget security/amoskys",
                "NetworkPolicy security/amoskys",
                "ConfigMap security/nodes-agent-config",
                "DaemonSet security/nodes-agent",
            ]
        );
        // No key material: the Secrets are names and types.
        for s in objects.iter().filter(|o| o["kind"] == "Secret") {
            assert!(
                s.get("data").is_none() && s.get("stringData").is_none(),
                "{s}"
            );
        }
        let sts = &objects[11];
        assert_eq!(sts["spec"]["replicas"], 3);
        assert_eq!(
            sts["spec"]["template"]["spec"]["containers"][0]["image"],
            "example/amoskys:1"
        );
        // Exactly what the reconciler builds.
        let bus: EventBus = serde_saphyr::from_str(BUS).unwrap();
        let mut bus = bus;
        bus.metadata.namespace = Some("security".into());
        assert_eq!(objects[6], value(&eventbus::config_map(&bus)));
    }

    #[test]
    fn bad_input_is_named() {
        let e = render(&Input::from_documents(docs(SET), "default").unwrap(), None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("AgentSet default/nodes: spec.busRef.name: EventBus \"amoskys\""),
            "{e}"
        );
        let e = Input::from_documents(docs("kind: Pod\nmetadata: {name: x}\n"), "default")
            .err()
            .unwrap();
        assert!(e.to_string().starts_with("document 1: kind \"Pod\""), "{e}");
        let bad = BUS.replace("{replicas: 3}", "{replicas: 3, wal: {size: lots}}");
        let e = render(&Input::from_documents(docs(&bad), "default").unwrap(), None).unwrap_err();
        assert!(e.to_string().contains("spec.wal.size"), "{e}");
        // Rules are checked as the operator checks them: only good ones go
        // into the buses' rule set.
        let rules = "kind: DetectionRule\napiVersion: amoskys.io/v1alpha1\nmetadata: {name: shell, namespace: shop}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'sh'\"\n  summary: s\n---\nkind: DetectionRule\napiVersion: amoskys.io/v1alpha1\nmetadata: {name: typo, namespace: shop}\nspec:\n  match: {event: process}\n  condition: \"process.nmae == 'sh'\"\n  summary: s\n";
        let input = Input::from_documents(docs(&format!("{BUS}---\n{rules}")), "default").unwrap();
        let objects = render(&input, None).unwrap();
        let set = objects
            .iter()
            .find(|o| o["metadata"]["name"] == "amoskys-rules")
            .unwrap()["data"]["rules.yaml"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            set.contains("name: shell") && !set.contains("name: typo"),
            "{set}"
        );
    }
}
