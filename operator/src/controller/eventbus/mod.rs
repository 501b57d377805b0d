//! The EventBus reconciler: certificates first (the CA Secret before any
//! leaf), the dashboard token, then ConfigMap, Services, StatefulSet and
//! PodDisruptionBudget, WAL volume growth, and the status.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use amoskys_client::identity::Role;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PropagationPolicy,
};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::{
    Context, Error, apply, condition, namespace, observed, quantity_bytes, report_invalid, rfc3339,
    secret, secret_content, secret_current, write_status,
};
use crate::build::eventbus::{
    COMPONENT, InvalidSpec, Names, claim_kinds, config_map, endpoint, invalid, pdb,
    server_dns_names, services, statefulset, tls_lifetimes, validate,
};
use crate::crd::{AgentSet, CertificateStatus, EventBus, EventBusStatus, IssuerRef};
use crate::labels::{MANAGER, owned_meta, selector, selector_query};
use crate::rotation::{self, Change, LeafKind, LeafSpec, Phase, Policy};

/// Common name of the operator's own (admin) certificate.
pub const ADMIN_CN: &str = "amoskys-operator";
/// On the CA Secret: the value of the bus's rotate-ca annotation already acted on.
pub const ROTATE_HANDLED_ANNOTATION: &str = "amoskys.io/rotate-ca-handled";
/// How often a healthy bus is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(300);

pub async fn reconcile(bus: Arc<EventBus>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = bus.namespace().unwrap_or_default();
    observed(
        &ctx,
        "eventbus",
        &ns,
        &bus.name_any(),
        reconcile_bus(&bus, &ctx),
    )
    .await
}

/// The AgentSets in `ns` whose busRef names `bus`.
pub async fn agent_sets_of(ctx: &Context, ns: &str, bus: &str) -> Result<Vec<AgentSet>, Error> {
    let api: Api<AgentSet> = Api::namespaced(ctx.client.clone(), ns);
    let mut sets: Vec<AgentSet> = api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| s.spec.bus_ref.name == bus)
        .collect();
    sets.sort_by_key(|s| s.name_any());
    Ok(sets)
}

/// The certificates an EventBus's CA signs: the server, the operator's
/// admin client, and one agent client per AgentSet sending to it.
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

/// Volume claims of the bus's StatefulSet (WAL and backup).
async fn bus_claims(
    ctx: &Context,
    ns: &str,
    bus: &str,
) -> Result<Vec<PersistentVolumeClaim>, Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let sel = selector_query(&selector(COMPONENT, bus));
    Ok(api.list(&ListParams::default().labels(&sel)).await?.items)
}

fn requested(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

fn capacity(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.status
        .as_ref()?
        .capacity
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

/// Volumes only grow: a size smaller than a claim already has is refused
/// before anything is written.
fn check_claim_sizes(bus: &EventBus, claims: &[PersistentVolumeClaim]) -> Result<(), InvalidSpec> {
    let name = bus.name_any();
    for kind in claim_kinds(bus) {
        let want = quantity_bytes(&kind.size).unwrap_or(0);
        for c in claims.iter().filter(|c| kind.owns(&name, &c.name_any())) {
            if let Some(have) = requested(c)
                && quantity_bytes(&have).is_some_and(|h| h > want)
            {
                return Err(invalid(
                    kind.size_field,
                    format!(
                        "{} is smaller than claim {} ({have}); volumes can grow but not shrink",
                        kind.size,
                        c.name_any()
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn template_names(sts: &StatefulSet) -> Vec<String> {
    sts.spec
        .volume_claim_templates
        .iter()
        .flatten()
        .filter_map(|c| c.metadata.name.clone())
        .collect()
}

/// What the certificates look like after this pass, for the status.
struct CertReport {
    ready: bool,
    message: String,
    status: CertificateStatus,
    /// When the PKI next needs the reconciler (unix seconds).
    deadline: Option<i64>,
}

async fn reconcile_bus(bus: &EventBus, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace(bus)?;
    let name = bus.name_any();
    let now = ctx.now();
    let previous = bus
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();

    let claims = bus_claims(ctx, &ns, &name).await?;
    let checked = validate(bus)
        .and_then(|_| check_claim_sizes(bus, &claims))
        .and_then(|_| policy(bus, ctx.propagation));
    let policy = match checked {
        Ok(p) => p,
        Err(inv) => {
            report_invalid(ctx, bus, &previous, &inv).await?;
            return Ok(Action::await_change());
        }
    };

    let sets = agent_sets_of(ctx, &ns, &name).await?;
    let specs = leaf_specs(bus, &sets);
    let certs = match &bus.spec.tls.issuer_ref {
        Some(issuer) => cert_manager_certificates(bus, &sets, &specs, issuer, &policy, ctx).await?,
        None => issue_certificates(bus, &sets, &specs, &policy, ctx, now).await?,
    };
    ensure_dashboard_token(bus, ctx, &ns).await?;

    let image = ctx.image.as_deref();
    apply(&ctx.client, &ns, &config_map(bus)).await?;
    let (client_svc, headless) = services(bus);
    apply(&ctx.client, &ns, &headless).await?;
    apply(&ctx.client, &ns, &client_svc).await?;
    let mut desired = statefulset(bus, image);
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(existing) = sts_api.get_opt(&name).await? {
        if existing.metadata.deletion_timestamp.is_some() {
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        let (have, want) = (template_names(&existing), template_names(&desired));
        if have != want {
            // Claim templates are immutable, so a volume added (or dropped)
            // needs a new StatefulSet. Orphaning the pods keeps them serving;
            // the new StatefulSet adopts them and rolls them onto the new
            // template. Claims of a dropped volume stay, as they always do.
            sts_api
                .delete(
                    &name,
                    &DeleteParams {
                        propagation_policy: Some(PropagationPolicy::Orphan),
                        ..Default::default()
                    },
                )
                .await?;
            ctx.event(
                bus,
                false,
                "RecreatingStatefulSet",
                "Recreate",
                format!(
                    "volume claim templates {have:?} -> {want:?}: recreating the StatefulSet, keeping its pods"
                ),
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(2)));
        }
        // A grown size reaches the claims below instead.
        desired.spec.volume_claim_templates = existing.spec.volume_claim_templates.clone();
    }
    let sts = apply(&ctx.client, &ns, &desired).await?;
    apply(&ctx.client, &ns, &pdb(bus)).await?;

    let expanding = expand_claims(bus, &claims, ctx, &ns).await?;

    let status = bus_status(bus, &sts, &certs, expanding.as_deref(), &previous, now);
    write_status(&ctx.client, bus, bus.status.as_ref(), &status).await?;

    let mut wait = RESYNC;
    if let Some(deadline) = certs.deadline {
        let secs = (deadline - now.unix_timestamp()).max(1) as u64;
        wait = wait.min(Duration::from_secs(secs));
    }
    if expanding.is_some() {
        wait = wait.min(Duration::from_secs(15));
    }
    Ok(Action::requeue(wait))
}

/// Runs one PKI step and writes what changed: the CA Secret first, so a
/// crash before the leaves leaves a state the next pass continues from.
async fn issue_certificates(
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
fn leaf_meta(
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
async fn announce(bus: &EventBus, ctx: &Context, change: &Change) {
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
async fn cert_manager_certificates(
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

/// The dashboard's admin token: generated once, never overwritten.
async fn ensure_dashboard_token(bus: &EventBus, ctx: &Context, ns: &str) -> Result<(), Error> {
    let n = Names::of(&bus.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if api.get_opt(&n.dashboard_secret).await?.is_some() {
        return Ok(());
    }
    let content = rotation::SecretContent {
        data: BTreeMap::from([("token".to_string(), amoskys_client::token::generate_token())]),
        annotations: BTreeMap::new(),
    };
    let s = secret(
        owned_meta(bus, COMPONENT, &n.dashboard_secret),
        "Opaque",
        &content,
    );
    api.create(&Default::default(), &s).await?;
    ctx.event(
        bus,
        false,
        "DashboardTokenCreated",
        "CreateToken",
        format!("dashboard admin token in Secret {}", n.dashboard_secret),
    )
    .await;
    Ok(())
}

/// Grows claims smaller than `spec.wal.size`; returns a progress message
/// while any claim's capacity is still below it.
async fn expand_claims(
    bus: &EventBus,
    claims: &[PersistentVolumeClaim],
    ctx: &Context,
    ns: &str,
) -> Result<Option<String>, Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let bus_name = bus.name_any();
    let mut pending = Vec::new();
    for kind in claim_kinds(bus) {
        let want_q = &kind.size;
        let want = quantity_bytes(want_q).unwrap_or(0);
        for c in claims
            .iter()
            .filter(|c| kind.owns(&bus_name, &c.name_any()))
        {
            let name = c.name_any();
            if requested(c).and_then(|q| quantity_bytes(&q)).unwrap_or(0) < want {
                let body =
                    serde_json::json!({"spec": {"resources": {"requests": {"storage": want_q}}}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
                    .await?;
                ctx.event(
                    bus,
                    false,
                    "ExpandingVolume",
                    "ExpandVolume",
                    format!("{name}: requested {want_q}"),
                )
                .await;
            }
            let cap = capacity(c).unwrap_or_default();
            if quantity_bytes(&cap).unwrap_or(0) < want {
                pending.push(format!(
                    "{name}: {} of {want_q}",
                    if cap.is_empty() { "?" } else { &cap }
                ));
            }
        }
    }
    Ok((!pending.is_empty()).then(|| format!("expanding volumes: {}", pending.join(", "))))
}

fn bus_status(
    bus: &EventBus,
    sts: &StatefulSet,
    certs: &CertReport,
    expanding: Option<&str>,
    previous: &[Condition],
    now: OffsetDateTime,
) -> EventBusStatus {
    let g = bus.metadata.generation;
    let want = bus.spec.replicas;
    let st = sts.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    let rolling = st.observed_generation < sts.metadata.generation
        || st.updated_replicas.unwrap_or(0) < want
        || st.update_revision.is_some() && st.current_revision != st.update_revision;
    let rotation = certs.status.rotation.clone();
    let (progressing, p_reason, p_message) = if let Some(m) = expanding {
        (true, "ExpandingVolumes", m.to_string())
    } else if rolling {
        (
            true,
            "RollingOut",
            format!(
                "{} of {want} pods updated",
                st.updated_replicas.unwrap_or(0)
            ),
        )
    } else if let Some(phase) = &rotation {
        (true, "RotatingCA", format!("CA rotation phase {phase}"))
    } else {
        (false, "Stable", "nothing in progress".to_string())
    };
    let all_ready = ready >= want && certs.ready;
    let (r_reason, r_message) = if !certs.ready {
        ("CertificatesPending", certs.message.clone())
    } else if ready < want {
        ("PodsNotReady", format!("{ready} of {want} bus pods ready"))
    } else {
        ("Ready", format!("{ready} of {want} bus pods ready"))
    };
    let degraded = ready < want && !rolling;
    let conditions = vec![
        condition(previous, "Ready", all_ready, r_reason, r_message, g, now),
        condition(
            previous,
            "CertificatesReady",
            certs.ready,
            if certs.ready { "Issued" } else { "Pending" },
            certs.message.clone(),
            g,
            now,
        ),
        condition(
            previous,
            "Progressing",
            progressing,
            p_reason,
            p_message,
            g,
            now,
        ),
        condition(
            previous,
            "Degraded",
            degraded,
            if degraded {
                "PodsUnavailable"
            } else {
                "AsExpected"
            },
            if degraded {
                format!("{} of {want} bus pods unavailable", want - ready)
            } else {
                "all bus pods available or rolling out".to_string()
            },
            g,
            now,
        ),
    ];
    EventBusStatus {
        conditions,
        ready_replicas: ready,
        endpoint: endpoint(bus),
        certificates: certs.status.clone(),
        observed_generation: g,
    }
}
