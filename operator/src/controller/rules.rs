//! The detection rules reconciler: checks each `DetectionRule` and
//! `ClusterDetectionRule` (compiled against the event fields, inline tests
//! run, as the bus does before it loads a rule) and writes what it found in
//! the rule's status. The rule set the buses run is written by the EventBus
//! reconciler ([`rule_set`]): only rules that passed both.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Client, ResourceExt};

use super::{Context, Error, observed, write_status};
use crate::build::rules::{BusReport, check, document, documents, rule_set_yaml, status};
use crate::crd::{ClusterDetectionRule, DetectionRule, DetectionRuleStatus, EventBus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// How often a rule is looked at again without a change: its Loaded
/// condition and matches follow what the bus pods report (read by the agent
/// sync, every 15 s by default).
const RECHECK: Duration = Duration::from_secs(30);

/// EventBuses in the cluster: each runs every rule.
async fn buses(client: &Client) -> Result<usize, Error> {
    let api: Api<EventBus> = Api::all(client.clone());
    Ok(api.list(&ListParams::default()).await?.items.len())
}

/// What every bus pod last reported (through the agent sync's Stats
/// reads) about the rule `name`.
fn report(ctx: &Context, name: &str) -> BusReport {
    let seen = ctx.shards_seen.lock().unwrap_or_else(|p| p.into_inner());
    BusReport::of(
        name,
        seen.values()
            .flat_map(|pods| pods.values())
            .map(|s| s.rules.as_slice()),
    )
}

/// A rule's status as it should be: checked as the bus would check it,
/// Loaded against the EventBuses there are now and what their pods report.
async fn checked(
    kind: &str,
    meta: &ObjectMeta,
    spec: &amoskys_detect::RuleSpec,
    previous: Option<&DetectionRuleStatus>,
    ctx: &Context,
) -> Result<DetectionRuleStatus, Error> {
    let doc = document(kind, meta, spec);
    let verdict = check(&doc);
    let n = buses(&ctx.client).await?;
    let report = report(ctx, &doc.qualified_name());
    Ok(status(
        &verdict,
        previous,
        meta.generation,
        n,
        &report,
        ctx.now(),
    ))
}

/// Reconciles one `DetectionRule`.
pub async fn reconcile_rule(rule: Arc<DetectionRule>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = rule.namespace().unwrap_or_default();
    observed(&ctx, "detectionrule", &ns, &rule.name_any(), async {
        let prev = rule.status.as_ref();
        let st = checked("DetectionRule", &rule.metadata, &rule.spec.rule, prev, &ctx).await?;
        write_status(&ctx.client, rule.as_ref(), prev, &st).await?;
        Ok(Action::requeue(RECHECK))
    })
    .await
}

/// Reconciles one `ClusterDetectionRule` (cluster-scoped, so its status is
/// written here rather than by the namespaced `write_status`).
pub async fn reconcile_cluster_rule(
    rule: Arc<ClusterDetectionRule>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    observed(&ctx, "clusterdetectionrule", "", &rule.name_any(), async {
        let prev = rule.status.as_ref();
        let st = checked(
            "ClusterDetectionRule",
            &rule.metadata,
            &rule.spec.rule,
            prev,
            &ctx,
        )
        .await?;
        if prev != Some(&st) {
            let api: Api<ClusterDetectionRule> = Api::all(ctx.client.clone());
            let body = serde_json::json!({ "status": st });
            api.patch_status(
                &rule.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&body),
            )
            .await?;
        }
        Ok(Action::requeue(RECHECK))
    })
    .await
}

/// The rule set every bus runs: the cluster's rules that compile and pass
/// their tests, as one YAML file.
pub async fn rule_set(client: &Client) -> Result<String, Error> {
    let ns_rules = Api::<DetectionRule>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let cluster_rules = Api::<ClusterDetectionRule>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    rule_set_yaml(&documents(&ns_rules, &cluster_rules)).map_err(|e| Error::Yaml {
        what: "the rule set",
        message: e.to_string(),
    })
}
