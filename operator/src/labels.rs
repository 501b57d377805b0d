//! Names, labels and small helpers every builder shares.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

/// The field manager of every server-side apply.
pub const MANAGER: &str = "amoskys-operator";
/// Pod-template annotation holding the hash of the rendered config, so a
/// config change rolls the pods.
pub const CONFIG_HASH: &str = "amoskys.io/config-hash";
/// The image used when a resource names none.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/amoskys/amoskys:", env!("CARGO_PKG_VERSION"));

/// The image a pod runs: the resource's own, else the operator's, else the default.
pub fn image(spec_image: &str, operator_image: Option<&str>) -> String {
    if spec_image.is_empty() {
        operator_image.unwrap_or(DEFAULT_IMAGE).to_string()
    } else {
        spec_image.to_string()
    }
}

/// `k=v,k=v`, a label selector for LIST calls.
pub fn selector_query(m: &BTreeMap<String, String>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The recommended `app.kubernetes.io/*` labels of an owned object.
pub fn labels(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "amoskys".to_string()),
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            instance.to_string(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            MANAGER.to_string(),
        ),
    ])
}

/// The subset of [`labels`] that selects pods (stable across upgrades).
pub fn selector(component: &str, instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/component".to_string(),
            component.to_string(),
        ),
        (
            "app.kubernetes.io/instance".to_string(),
            instance.to_string(),
        ),
    ])
}

/// A controller owner reference to `owner`, for garbage collection.
pub fn owner<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.controller_owner_ref(&())
}

/// Hex SHA-256 of `parts`, for the config-hash annotation.
pub fn hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Metadata of an object `owner` owns: name, namespace, labels, owner reference.
pub fn owned_meta<K: Resource<DynamicType = ()>>(
    owner_obj: &K,
    component: &str,
    name: &str,
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: owner_obj.namespace(),
        labels: Some(labels(component, &owner_obj.name_any())),
        owner_references: owner(owner_obj).map(|o| vec![o]),
        ..Default::default()
    }
}

/// A config file rendered from `owner`'s spec, headed by where it came from.
pub fn rendered<K: Resource<DynamicType = ()>>(
    owner_obj: &K,
    body: &impl serde::Serialize,
) -> String {
    let yaml = serde_saphyr::to_string(body)
        // Plain strings and numbers always serialize; should that ever fail,
        // the binary refuses the file with this line rather than run on defaults.
        .unwrap_or_else(|e| format!("renderError: {e:?}\n"));
    format!(
        "# Rendered by the AMOSKYS operator from {} {}; edits are overwritten.\n{yaml}",
        K::kind(&()),
        owner_obj.name_any()
    )
}

/// A ConfigMap holding one rendered file.
pub fn config_map<K: Resource<DynamicType = ()>>(
    owner_obj: &K,
    component: &str,
    name: &str,
    file: &str,
    body: String,
) -> ConfigMap {
    ConfigMap {
        metadata: owned_meta(owner_obj, component, name),
        data: Some(BTreeMap::from([(file.to_string(), body)])),
        ..Default::default()
    }
}
