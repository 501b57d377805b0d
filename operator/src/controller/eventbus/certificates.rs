//! An EventBus's certificates: which leaves its CA signs, one step of the
//! renewal and CA rotation schedule written to the Secrets (the CA Secret
//! first), or the cert-manager `Certificate`s when an issuer is named, and
//! the events that say what changed.

use std::collections::BTreeMap;
use std::time::Duration;

use amoskys_client::identity::Role;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::super::{
    Context, Error, apply, namespace, rfc3339, secret, secret_content, secret_current,
};
use crate::build::eventbus::{COMPONENT, InvalidSpec, Names, server_dns_names, tls_lifetimes};
use crate::crd::{AgentSet, CertificateStatus, EventBus, IssuerRef};
use crate::labels::{MANAGER, owned_meta};
use crate::rotation::{self, Change, LeafKind, LeafSpec, Phase, Policy};

use super::{ADMIN_CN, ROTATE_HANDLED_ANNOTATION};

/// The certificates an EventBus's CA signs: the server, the operator's
/// admin client, the shards' peer client, and one agent client per AgentSet
/// sending to it.
pub fn leaf_specs(bus: &EventBus, sets: &[AgentSet]) -> Vec<LeafSpec> {
    let n = Names::of(&bus.name_any());
    let mut specs = vec![
        LeafSpec {
            secret: n.server_secret,
            common_name: bus.name_any(),
            kind: LeafKind::Server(server_dns_names(bus)),
        },
        LeafSpec {
            secret: n.admin_secret,
            common_name: ADMIN_CN.into(),
            kind: LeafKind::Client(Role::Admin),
        },
        // What the bus's shards call each other with; issued whatever the
        // replica count, so scaling up needs no new certificate.
        LeafSpec {
            secret: n.peer_secret,
            common_name: format!("{}-peer", bus.name_any()),
            kind: LeafKind::Client(Role::Peer),
        },
    ];
    for set in sets {
        specs.push(LeafSpec {
            secret: crate::build::agentset::Names::of(&set.name_any()).tls_secret,
            common_name: set.name_any(),
            kind: LeafKind::Client(Role::Agent),
        });
    }
    specs
}

/// The certificate schedule from the bus's `spec.tls`; the CA is renewed a
/// third of its life before it expires.
pub fn policy(bus: &EventBus, propagation: Duration) -> Result<Policy, InvalidSpec> {
    let (leaf_validity, leaf_renew_before, ca_validity) = tls_lifetimes(bus)?;
    Ok(Policy {
        bus: bus.name_any(),
        leaf_validity,
        leaf_renew_before,
        ca_validity,
        ca_renew_before: ca_validity / 3,
        propagation,
    })
}

/// What the certificates look like after this pass, for the status.
pub(super) struct CertReport {
    pub ready: bool,
    pub message: String,
    pub status: CertificateStatus,
    /// When the PKI next needs the reconciler (unix seconds).
    pub deadline: Option<i64>,
}

/// Runs one PKI step and writes what changed: the CA Secret first, so a
/// crash before the leaves leaves a state the next pass continues from.
pub(super) async fn issue_certificates(
    bus: &EventBus,
    sets: &[AgentSet],
    specs: &[LeafSpec],
    policy: &Policy,
    ctx: &Context,
    now: OffsetDateTime,
) -> Result<CertReport, Error> {
    let ns = namespace(bus)?;
    let n = Names::of(&bus.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let ca_have = api.get_opt(&n.ca_secret).await?.map(|s| secret_content(&s));
    let mut leaves_have = BTreeMap::new();
    for spec in specs {
        if let Some(s) = api.get_opt(&spec.secret).await? {
            leaves_have.insert(spec.secret.clone(), secret_content(&s));
        }
    }
    let mut state = rotation::state_from_secrets(ca_have.as_ref(), &leaves_have, specs);

    let request = bus
        .annotations()
        .get(rotation::ROTATE_REQUEST_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let handled = ca_have
        .as_ref()
        .and_then(|c| c.annotations.get(ROTATE_HANDLED_ANNOTATION).cloned())
        .unwrap_or_default();
    let rotate = !request.is_empty() && request != handled;
    let key = format!("{ns}/{}", bus.name_any());
    let loaded = ctx.loaded(&key);
    let changes = rotation::step(&mut state, specs, now, policy, loaded.as_deref(), rotate)?;

    let mut ca_want = rotation::ca_secret_data(&state);
    let handled_now = if rotate { &request } else { &handled };
    if !handled_now.is_empty() {
        ca_want
            .annotations
            .insert(ROTATE_HANDLED_ANNOTATION.into(), handled_now.clone());
    }
    if !secret_current(ca_have.as_ref(), &ca_want) {
        let meta = owned_meta(bus, COMPONENT, &n.ca_secret);
        apply(&ctx.client, &ns, &secret(meta, "Opaque", &ca_want)).await?;
    }
    for spec in specs {
        let Some(leaf) = state.leaves.get(&spec.secret) else {
            continue;
        };
        let want = rotation::leaf_secret_data(leaf);
        if secret_current(leaves_have.get(&spec.secret), &want) {
            continue;
        }
        let meta = leaf_meta(bus, sets, spec);
        apply(&ctx.client, &ns, &secret(meta, "kubernetes.io/tls", &want)).await?;
    }
    for change in &changes {
        announce(bus, ctx, change).await;
    }

    for (secret_name, leaf) in &state.leaves {
        ctx.metrics.certificate(&ns, secret_name, leaf.not_after);
    }
    if let Some(ca) = &state.current {
        ctx.metrics.certificate(&ns, &n.ca_secret, ca.not_after);
    }
    let not_after = |s: &str| state.leaves.get(s).map(|l| rfc3339(l.not_after));
    let status = CertificateStatus {
        ca_not_after: state.current.as_ref().map(|c| rfc3339(c.not_after)),
        server_not_after: not_after(&n.server_secret),
        admin_not_after: not_after(&n.admin_secret),
        rotation: (state.phase != Phase::Stable).then(|| state.phase.as_str().to_string()),
    };
    let soonest = state.leaves.values().map(|l| l.not_after).min();
    let message = match (state.phase, soonest) {
        (Phase::Stable, Some(t)) => format!(
            "{} certificates issued; the first expires {}",
            state.leaves.len(),
            rfc3339(t)
        ),
        (Phase::Stable, None) => "no certificates issued".into(),
        (phase, _) => format!("CA rotation in progress: {}", phase.as_str()),
    };
    Ok(CertReport {
        ready: state.leaves.len() == specs.len(),
        message,
        status,
        deadline: state.next_deadline(policy),
    })
}

/// Metadata of a leaf's Secret (or Certificate): an AgentSet's certificate
/// is owned by the AgentSet, so it goes when the AgentSet does; the rest by
/// the bus.
pub(super) fn leaf_meta(
    bus: &EventBus,
    sets: &[AgentSet],
    spec: &LeafSpec,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
    match sets
        .iter()
        .find(|s| crate::build::agentset::Names::of(&s.name_any()).tls_secret == spec.secret)
    {
        Some(set) => owned_meta(set, crate::build::agentset::COMPONENT, &spec.secret),
        None => owned_meta(bus, COMPONENT, &spec.secret),
    }
}

/// Logs and records as an event what a PKI step changed.
pub(super) async fn announce(bus: &EventBus, ctx: &Context, change: &Change) {
    let (reason, note) = match change {
        Change::CaCreated { serial } => ("CACreated", format!("issued CA {serial}")),
        Change::RotationStarted { new_serial } => (
            "CARotationStarted",
            format!("new CA {new_serial} published beside the current one"),
        ),
        // One reason per phase: events with the same reason are folded into
        // one series, which would hide the later phases.
        Change::PhaseChanged(p) => (
            match p {
                Phase::BundlePublished => "CABundlePublished",
                Phase::LeavesReissued => "CALeavesReissued",
                Phase::Stable => "CARotationCompleted",
            },
            format!("CA rotation phase {}", p.as_str()),
        ),
        Change::LeafIssued {
            secret,
            serial,
            reason,
        } => (
            "CertificateIssued",
            format!("{secret}: issued {serial} ({reason})"),
        ),
        // A bundle update is a step of a rotation already announced.
        Change::BundleUpdated { secret } => {
            tracing::info!(bus = %bus.name_any(), %secret, "trust bundle updated");
            return;
        }
    };
    tracing::info!(bus = %bus.name_any(), reason, %note, "certificates");
    ctx.event(bus, false, reason, "IssueCertificates", note)
        .await;
}

/// With `spec.tls.issuerRef`, cert-manager issues: one `Certificate` per
/// Secret, with the same names and identities the operator would use.
pub(super) async fn cert_manager_certificates(
    bus: &EventBus,
    sets: &[AgentSet],
    specs: &[LeafSpec],
    issuer: &IssuerRef,
    policy: &Policy,
    ctx: &Context,
) -> Result<CertReport, Error> {
    let ns = namespace(bus)?;
    let ar = certificate_resource();
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), &ns, &ar);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut present = 0;
    let mut status = CertificateStatus::default();
    for spec in specs {
        let cert = certificate(leaf_meta(bus, sets, spec), spec, issuer, policy, &ar);
        api.patch(
            &spec.secret,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&cert),
        )
        .await?;
        if let Some(s) = secrets.get_opt(&spec.secret).await? {
            let c = secret_content(&s);
            if let Some((_, not_after)) =
                c.data.get("tls.crt").and_then(|p| rotation::cert_facts(p))
            {
                present += 1;
                ctx.metrics.certificate(&ns, &spec.secret, not_after);
                let n = Names::of(&bus.name_any());
                if spec.secret == n.server_secret {
                    status.server_not_after = Some(rfc3339(not_after));
                } else if spec.secret == n.admin_secret {
                    status.admin_not_after = Some(rfc3339(not_after));
                }
            }
        }
    }
    let ready = present == specs.len();
    Ok(CertReport {
        ready,
        message: format!(
            "cert-manager {} {}: {present} of {} Secrets issued",
            issuer.kind,
            issuer.name,
            specs.len()
        ),
        status,
        deadline: (!ready).then(|| ctx.now().unix_timestamp() + 10),
    })
}

/// cert-manager's `Certificate`, for the dynamic API (no cert-manager types
/// are compiled in).
pub fn certificate_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// A cert-manager `Certificate` for one leaf.
pub fn certificate(
    meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    spec: &LeafSpec,
    issuer: &IssuerRef,
    policy: &Policy,
    ar: &ApiResource,
) -> DynamicObject {
    let mut body = serde_json::json!({
        "secretName": spec.secret,
        "commonName": spec.common_name,
        "duration": format!("{}s", policy.leaf_validity.as_secs()),
        "renewBefore": format!("{}s", policy.leaf_renew_before.as_secs()),
        "privateKey": { "algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always" },
        "issuerRef": { "name": issuer.name, "kind": issuer.kind, "group": issuer.group },
    });
    match &spec.kind {
        LeafKind::Server(dns) => {
            body["dnsNames"] = serde_json::json!(dns);
            body["usages"] = serde_json::json!(["digital signature", "server auth"]);
        }
        LeafKind::Client(role) => {
            // The bus reads the role from this URI SAN, as from its own PKI.
            body["uris"] = serde_json::json!([role.uri()]);
            body["usages"] = serde_json::json!(["digital signature", "client auth"]);
        }
    }
    let mut obj = DynamicObject::new(&spec.secret, ar).data(serde_json::json!({ "spec": body }));
    obj.metadata = meta;
    obj
}
