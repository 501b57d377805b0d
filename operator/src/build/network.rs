//! The NetworkPolicy of an EventBus's pods (`EventBus.spec.networkPolicy`):
//! gRPC from the agents that send to it, its own pods, the operator and the
//! namespaces the user names; HTTP from its namespace and the ones named.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec as K8sNetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use crate::build::{agentset, eventbus};
use crate::crd::{AgentSet, EventBus};
use crate::labels::{owned_meta, selector};

/// The labels of the operator's pods (the chart's `amoskys.selector`,
/// without the release's instance, which the bus does not know).
pub fn operator_pod_labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "amoskys".to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            "operator".to_string(),
        ),
    ])
}

fn pods(labels: BTreeMap<String, String>) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(labels),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn namespace(name: &str) -> NetworkPolicyPeer {
    NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                name.to_string(),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn port(p: i32) -> Option<Vec<NetworkPolicyPort>> {
    Some(vec![NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }])
}

/// Whether the gRPC port must stay open to every source: the Service is
/// exposed outside the cluster, or agents on the host network have no
/// address range to be admitted by.
pub fn grpc_open(bus: &EventBus, sets: &[AgentSet]) -> bool {
    let exposed = bus.spec.service.r#type != "ClusterIP";
    let host_agents = sets
        .iter()
        .any(|s| agentset::privileges(&s.spec.collectors).host_network);
    exposed || (host_agents && bus.spec.network_policy.agent_cidrs.is_empty())
}

/// The policy for `bus`, whose AgentSets are `sets` (those sending to it);
/// None when the spec turns it off.
pub fn network_policy(bus: &EventBus, sets: &[AgentSet]) -> Option<NetworkPolicy> {
    let np = &bus.spec.network_policy;
    if !np.enabled {
        return None;
    }
    let name = bus.name_any();
    let grpc_from = (!grpc_open(bus, sets)).then(|| {
        let mut from: Vec<NetworkPolicyPeer> = sets
            .iter()
            .map(|s| pods(selector(agentset::COMPONENT, &s.name_any())))
            .collect();
        from.push(pods(selector(eventbus::COMPONENT, &name)));
        from.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector::default()),
            ..pods(operator_pod_labels())
        });
        from.extend(np.client_namespaces.iter().map(|n| namespace(n)));
        from.extend(np.agent_cidrs.iter().map(|c| NetworkPolicyPeer {
            ip_block: Some(IPBlock {
                cidr: c.clone(),
                except: None,
            }),
            ..Default::default()
        }));
        from
    });
    let mut http_from = vec![pods(BTreeMap::new())];
    http_from.extend(np.http_namespaces.iter().map(|n| namespace(n)));
    Some(NetworkPolicy {
        metadata: owned_meta(bus, eventbus::COMPONENT, &name),
        spec: Some(K8sNetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector(eventbus::COMPONENT, &name)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: grpc_from,
                    ports: port(bus.spec.service.grpc_port),
                },
                NetworkPolicyIngressRule {
                    from: Some(http_from),
                    ports: port(bus.spec.service.http_port),
                },
            ]),
            ..Default::default()
        }),
    })
}
