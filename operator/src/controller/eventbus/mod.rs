//! The EventBus reconciler's apply loop: certificates first (the CA Secret
//! before any leaf, `certificates`), the dashboard token, then ConfigMap,
//! Services, StatefulSet and PodDisruptionBudget, WAL volume growth
//! (`claims`), and the status.

mod certificates;
mod claims;

use certificates::*;
pub use certificates::{certificate, certificate_resource, leaf_specs, policy};
use claims::*;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, ListParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::{
    Context, Error, apply, condition, namespace, observed, report_invalid, rfc3339, secret,
    write_status,
};
use crate::build::eventbus::{
    COMPONENT, InvalidSpec, Names, config_map, endpoint, invalid, pdb, removable_after,
    retained_pods, rules_config_map, secret_mounts, services, shard_map, shard_map_config,
    shard_map_of, statefulset, validate,
};
use crate::crd::{AgentSet, EventBus, EventBusStatus, ShardStatus};
use crate::labels::{owned_meta, selector, selector_query};
use crate::rotation::{self};
use amoskys_client::shard::ShardMap;

/// Common name of the operator's own (admin) certificate.
pub const ADMIN_CN: &str = "amoskys-operator";
/// On the CA Secret: the value of the bus's rotate-ca annotation already acted on.
pub const ROTATE_HANDLED_ANNOTATION: &str = "amoskys.io/rotate-ca-handled";
/// How often a healthy bus is looked at again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// How often a bus with retiring shards or an export is looked at again.
const SHARD_RESYNC: Duration = Duration::from_secs(30);

/// Brings an EventBus's certificates, config, Services, StatefulSet, PDB
/// and volume claims to its spec and writes its status.
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

fn template_names(sts: &StatefulSet) -> Vec<String> {
    sts.spec
        .volume_claim_templates
        .iter()
        .flatten()
        .filter_map(|c| c.metadata.name.clone())
        .collect()
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
    let secrets = check_secrets(bus, ctx, &ns).await?;
    let checked = validate(bus)
        .and(secrets)
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
    let rules = super::rules::rule_set(&ctx.client).await?;
    apply(&ctx.client, &ns, &rules_config_map(bus, rules)).await?;
    let maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let held_map = maps
        .get_opt(&Names::of(&name).shards)
        .await?
        .as_ref()
        .and_then(shard_map_of);
    let seen = ctx.shards_seen(&format!("{ns}/{name}"));
    let now_ns = (now.unix_timestamp_nanos()).clamp(0, i64::MAX as i128) as i64;
    let pods = retained_pods(bus, held_map.as_ref(), &seen, now_ns);
    let map = shard_map(bus, held_map.as_ref(), pods);
    if held_map.as_ref().is_some_and(|p| p.epoch != map.epoch) {
        tracing::info!(bus = %name, epoch = map.epoch, active = map.active, shards = map.shards(), "shard map changed");
        report_shard_changes(bus, ctx, held_map.as_ref(), &map, &seen).await;
    }
    apply(&ctx.client, &ns, &shard_map_config(bus, &map)).await?;
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
    desired.spec.replicas = Some(pods);
    let sts = apply(&ctx.client, &ns, &desired).await?;
    apply(&ctx.client, &ns, &pdb(bus)).await?;
    if let Some(np) = crate::build::network::network_policy(bus, &sets) {
        apply(&ctx.client, &ns, &np).await?;
    }

    let expanding = expand_claims(bus, &claims, ctx, &ns).await?;

    let shards = shard_statuses(bus, &map, &seen);
    let mut status = bus_status(bus, &sts, &certs, expanding.as_deref(), &previous, now);
    status.active_shards = map.active as i32;
    status.retiring_shards = map.shards() as i32 - map.active as i32;
    status.shards = shards;
    status.selector = selector_query(&selector(COMPONENT, &name));
    if bus
        .spec
        .export
        .as_ref()
        .and_then(|e| e.nats.as_ref())
        .is_some()
    {
        status.conditions.push(export_ready(
            &previous,
            &map,
            &seen,
            bus.metadata.generation,
            now,
        ));
    }
    write_status(&ctx.client, bus, bus.status.as_ref(), &status).await?;

    let mut wait = RESYNC;
    if let Some(deadline) = certs.deadline {
        let secs = (deadline - now.unix_timestamp()).max(1) as u64;
        wait = wait.min(Duration::from_secs(secs));
    }
    if expanding.is_some() {
        wait = wait.min(Duration::from_secs(15));
    }
    // Retiring shards age out and exports fail or recover without any
    // change to the resource: look again soon.
    if map.shards() > map.active || bus.spec.export.as_ref().is_some_and(|e| e.nats.is_some()) {
        wait = wait.min(SHARD_RESYNC);
    }
    Ok(Action::requeue(wait))
}

/// The Secrets the spec names (NATS export, alert receivers) must exist
/// with the keys the bus reads, or the pods would not start.
async fn check_secrets(
    bus: &EventBus,
    ctx: &Context,
    ns: &str,
) -> Result<Result<(), InvalidSpec>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    for m in secret_mounts(bus) {
        let (field, name, key) = (m.field, m.secret, m.key);
        let Some(secret) = api.get_opt(&name).await? else {
            return Ok(Err(invalid(
                field,
                format!("Secret {name:?} does not exist in namespace {ns:?}"),
            )));
        };
        let has = |k: &str| {
            secret.data.as_ref().is_some_and(|d| d.contains_key(k))
                || secret
                    .string_data
                    .as_ref()
                    .is_some_and(|d| d.contains_key(k))
        };
        if !has(key) {
            return Ok(Err(invalid(
                field,
                format!("Secret {name:?} has no key {key:?}"),
            )));
        }
    }
    Ok(Ok(()))
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

/// Events for shards a map change retires, brings back, releases or
/// discards.
async fn report_shard_changes(
    bus: &EventBus,
    ctx: &Context,
    old: Option<&ShardMap>,
    new: &ShardMap,
    seen: &BTreeMap<u32, amoskys_proto::StatsResponse>,
) {
    let Some(old) = old else { return };
    let (old_n, new_n) = (old.shards(), new.shards());
    if new.active < old.active {
        ctx.event(
            bus,
            false,
            "RetiringShards",
            "Scale",
            format!(
                "shards {}..{} retire: they take no new events and serve reads until their data ages out",
                new.active,
                old.active - 1
            ),
        )
        .await;
    }
    if new_n < old_n {
        let gone: Vec<u32> = (new_n..old_n).collect();
        let events: u64 = gone
            .iter()
            .filter_map(|i| seen.get(i))
            .map(|s| s.events_stored)
            .sum();
        if bus.spec.discard_retiring_shards {
            ctx.event(
                bus,
                true,
                "DiscardingShards",
                "Scale",
                format!(
                    "discardRetiringShards: removing shards {gone:?} with the {events} events they hold"
                ),
            )
            .await;
        } else {
            ctx.event(
                bus,
                false,
                "RetiredShards",
                "Scale",
                format!(
                    "shards {gone:?} hold nothing younger than the retention; removing their pods"
                ),
            )
            .await;
        }
    }
}

/// Each shard's entry in the status.
fn shard_statuses(
    bus: &EventBus,
    map: &ShardMap,
    seen: &BTreeMap<u32, amoskys_proto::StatsResponse>,
) -> Vec<ShardStatus> {
    let retention = crate::build::eventbus::retention(bus);
    let rfc = |ns: i64| Some(rfc3339(ns / 1_000_000_000));
    (0..map.shards())
        .map(|i| {
            let s = seen.get(&i);
            let retiring = map.is_retiring(i);
            ShardStatus {
                index: i as i32,
                state: if retiring { "retiring" } else { "active" }.into(),
                newest_event_time: s
                    .filter(|s| s.newest_stored_at > 0)
                    .and_then(|s| rfc(s.newest_stored_at)),
                events_stored: s.map_or(0, |s| s.events_stored),
                removable_after: s
                    .filter(|_| retiring)
                    .zip(retention)
                    .and_then(|(s, r)| removable_after(s, r))
                    .and_then(rfc),
            }
        })
        .collect()
}

/// ExportReady: true when every shard reports its export publishing; else
/// the first shard that does not, and why (its last error's reason).
fn export_ready(
    previous: &[Condition],
    map: &ShardMap,
    seen: &BTreeMap<u32, amoskys_proto::StatsResponse>,
    generation: Option<i64>,
    now: OffsetDateTime,
) -> Condition {
    let mut lag = 0u64;
    let mut failing = None;
    for i in 0..map.shards() {
        match seen.get(&i).and_then(|s| s.export.as_ref()) {
            Some(e) if e.ready => lag += e.lag_events,
            Some(e) => {
                failing.get_or_insert((i, e.last_error_reason.clone(), e.last_error.clone()));
            }
            None => {
                failing.get_or_insert((i, String::new(), "has not reported its export yet".into()));
            }
        }
    }
    match failing {
        None => condition(
            previous,
            "ExportReady",
            true,
            "Exporting",
            format!("every shard publishes to NATS; {lag} events behind"),
            generation,
            now,
        ),
        Some((shard, reason, message)) => condition(
            previous,
            "ExportReady",
            false,
            &export_reason(&reason),
            format!("shard {shard}: {message}"),
            generation,
            now,
        ),
    }
}

/// `stream_missing` -> `StreamMissing`; empty -> `NotReported`.
fn export_reason(r: &str) -> String {
    if r.is_empty() {
        return "NotReported".into();
    }
    r.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
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
        ..Default::default()
    }
}
