//! The bus's volume claims (WAL and backup): volumes only grow, and a
//! larger `spec.wal.size` grows the claims in place.

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};

use super::super::{Context, Error, quantity_bytes};
use crate::build::eventbus::{COMPONENT, InvalidSpec, claim_kinds, invalid};
use crate::crd::EventBus;
use crate::labels::{selector, selector_query};

/// Volume claims of the bus's StatefulSet (WAL and backup).
pub(super) async fn bus_claims(
    ctx: &Context,
    ns: &str,
    bus: &str,
) -> Result<Vec<PersistentVolumeClaim>, Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let sel = selector_query(&selector(COMPONENT, bus));
    Ok(api.list(&ListParams::default().labels(&sel)).await?.items)
}

pub(super) fn requested(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

pub(super) fn capacity(pvc: &PersistentVolumeClaim) -> Option<String> {
    pvc.status
        .as_ref()?
        .capacity
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

/// Volumes only grow: a size smaller than a claim already has is refused
/// before anything is written.
pub(super) fn check_claim_sizes(
    bus: &EventBus,
    claims: &[PersistentVolumeClaim],
) -> Result<(), InvalidSpec> {
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

/// Grows claims smaller than `spec.wal.size`; returns a progress message
/// while any claim's capacity is still below it.
pub(super) async fn expand_claims(
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
