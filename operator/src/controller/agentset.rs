//! The AgentSet reconciler: checks the EventBus and SNMP Secrets it refers
//! to, then applies the agent ConfigMap and DaemonSet and reports counts.
//! The client certificate is issued by the EventBus reconciler (the bus's
//! CA signs it); this one waits for it.

use std::sync::Arc;
use std::time::Duration;

use amoskys_agents::config::SnmpVersion;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use time::OffsetDateTime;

use super::{Context, Error, apply, condition, namespace, observed, report_invalid, write_status};
use crate::build::agentset::{Names, config_map, daemonset, validate};
use crate::build::eventbus::{InvalidSpec, invalid};
use crate::crd::{AgentSet, AgentSetStatus, EventBus};

const RESYNC: Duration = Duration::from_secs(300);
/// While a referenced object is missing or the certificate is not issued yet.
const WAIT: Duration = Duration::from_secs(10);

/// Brings an AgentSet's ConfigMap, certificate and DaemonSet to its spec
/// and writes its status.
pub async fn reconcile(set: Arc<AgentSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = set.namespace().unwrap_or_default();
    observed(
        &ctx,
        "agentset",
        &ns,
        &set.name_any(),
        reconcile_set(&set, &ctx),
    )
    .await
}

/// The keys an SNMP target's Secret must hold.
fn required_keys(t: &crate::crd::SnmpTargetSpec) -> Vec<&'static str> {
    match t.version {
        SnmpVersion::V3 => {
            // v3 always authenticates (sha1 when no protocol is named).
            let mut k = vec!["authPassword"];
            if !t.priv_protocol.is_empty() {
                k.push("privPassword");
            }
            k
        }
        _ => vec!["community"],
    }
}

/// Checks what the AgentSet refers to; the error names the field.
async fn check_references(
    set: &AgentSet,
    ctx: &Context,
    ns: &str,
) -> Result<Result<EventBus, InvalidSpec>, Error> {
    let buses: Api<EventBus> = Api::namespaced(ctx.client.clone(), ns);
    let Some(bus) = buses.get_opt(&set.spec.bus_ref.name).await? else {
        return Ok(Err(invalid(
            "spec.busRef.name",
            format!(
                "EventBus {:?} does not exist in namespace {ns}",
                set.spec.bus_ref.name
            ),
        )));
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let snmp = &set.spec.collectors.snmp;
    if snmp.enabled {
        for (i, t) in snmp.targets.iter().enumerate() {
            let field = format!("spec.collectors.snmp.targets[{i}].credentialsSecret");
            let Some(s) = secrets.get_opt(&t.credentials_secret).await? else {
                return Ok(Err(invalid(
                    field,
                    format!(
                        "Secret {:?} does not exist in namespace {ns}",
                        t.credentials_secret
                    ),
                )));
            };
            let keys = s.data.unwrap_or_default();
            let string_keys = s.string_data.unwrap_or_default();
            for key in required_keys(t) {
                if !keys.contains_key(key) && !string_keys.contains_key(key) {
                    return Ok(Err(invalid(
                        field,
                        format!("Secret {:?} has no key {key:?}", t.credentials_secret),
                    )));
                }
            }
        }
    }
    Ok(Ok(bus))
}

async fn reconcile_set(set: &AgentSet, ctx: &Context) -> Result<Action, Error> {
    let ns = namespace(set)?;
    let name = set.name_any();
    let now = ctx.now();
    let previous = set
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();

    let bus = match validate(set) {
        Err(inv) => Err(inv),
        Ok(()) => check_references(set, ctx, &ns).await?,
    };
    let bus = match bus {
        Ok(b) => b,
        Err(inv) => {
            report_invalid(ctx, set, &previous, &inv).await?;
            // A missing bus or Secret may be created later without the
            // AgentSet changing.
            return Ok(Action::requeue(WAIT));
        }
    };

    let n = Names::of(&name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    if secrets.get_opt(&n.tls_secret).await?.is_none() {
        let status = AgentSetStatus {
            conditions: vec![condition(
                &previous,
                "Ready",
                false,
                "WaitingForCertificate",
                format!(
                    "EventBus {} has not issued Secret {} yet",
                    bus.name_any(),
                    n.tls_secret
                ),
                set.metadata.generation,
                now,
            )],
            observed_generation: set.metadata.generation,
            ..set.status.clone().unwrap_or_default()
        };
        write_status(&ctx.client, set, set.status.as_ref(), &status).await?;
        return Ok(Action::requeue(WAIT));
    }

    apply(&ctx.client, &ns, &config_map(set)).await?;
    let ds = apply(
        &ctx.client,
        &ns,
        &daemonset(set, &bus, ctx.image.as_deref()),
    )
    .await?;
    let status = set_status(set, &ds, &previous, now);
    write_status(&ctx.client, set, set.status.as_ref(), &status).await?;
    Ok(Action::requeue(RESYNC))
}

fn set_status(
    set: &AgentSet,
    ds: &DaemonSet,
    previous: &[Condition],
    now: OffsetDateTime,
) -> AgentSetStatus {
    let g = set.metadata.generation;
    let st = ds.status.clone().unwrap_or_default();
    let desired = st.desired_number_scheduled;
    let ready = st.number_ready;
    let updated = st.updated_number_scheduled.unwrap_or(0);
    let rolling = st.observed_generation < ds.metadata.generation || updated < desired;
    let (is_ready, reason, message) = if set.spec.paused {
        (
            false,
            "Paused",
            "spec.paused: no agent pods are scheduled".to_string(),
        )
    } else if desired > 0 && ready >= desired {
        (true, "Ready", format!("{ready} of {desired} agents ready"))
    } else {
        (
            false,
            "AgentsNotReady",
            format!("{ready} of {desired} agents ready"),
        )
    };
    let conditions = vec![
        condition(previous, "Ready", is_ready, reason, message, g, now),
        condition(
            previous,
            "Progressing",
            rolling,
            if rolling { "RollingOut" } else { "Stable" },
            format!("{updated} of {desired} agent pods updated"),
            g,
            now,
        ),
    ];
    AgentSetStatus {
        conditions,
        desired,
        ready,
        observed_generation: g,
    }
}
