//! The rule documents: the same YAML a user applies to a cluster as a
//! `DetectionRule` (namespaced) or `ClusterDetectionRule`, read from files
//! by a bus without a cluster and by `amoskys rules test`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group and version rules are written in.
pub const API_VERSION: &str = "amoskys.io/v1alpha1";

/// One rule as a document: `apiVersion`, `kind`, `metadata`, `spec`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleDocument {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// `DetectionRule` or `ClusterDetectionRule`.
    pub kind: String,
    /// Name, namespace (DetectionRule only) and generation.
    pub metadata: RuleMetadata,
    /// What the rule matches and what it makes of a match.
    pub spec: RuleSpec,
}

/// The metadata a rule document carries; anything else in it is ignored,
/// as a cluster adds fields of its own.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuleMetadata {
    /// The rule's name, unique per kind and namespace.
    pub name: String,
    /// A `DetectionRule`'s namespace: it sees only events of pods there.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The spec's generation (set by the API server; 0 from a file).
    #[serde(default)]
    pub generation: Option<i64>,
    /// Labels, as any object has them.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Which rules a document's scope gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// `DetectionRule`: events of pods in the rule's namespace only.
    Namespaced,
    /// `ClusterDetectionRule`: any event, narrowed by its selectors.
    Cluster,
}

/// A rule's spec: the same for both kinds, except the selectors that only a
/// `ClusterDetectionRule` may use.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// What the rule looks for, for people.
    #[serde(default)]
    pub description: String,
    /// Which events the rule sees at all (cheap: no CEL runs for others).
    #[serde(rename = "match")]
    pub selects: EventMatch,
    /// A CEL expression over the event's fields (see docs/detection.md)
    /// that is true for a match.
    pub condition: String,
    /// Named lists of strings the condition reads as `lists.NAME`.
    #[serde(default)]
    pub lists: BTreeMap<String, Vec<String>>,
    /// Matches to leave out, as data: an event whose `fields` equal one of
    /// `values` is not a match.
    #[serde(default)]
    pub exceptions: Vec<Exception>,
    /// The alert's severity: info, notice, warning (default), error or critical.
    #[serde(default)]
    pub severity: RuleSeverity,
    /// The alert's one-line summary; `{field.path}` is replaced by the event's value.
    pub summary: String,
    /// Labels every alert carries, e.g. `mitre: T1059`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Repeats within a window update one alert's count instead of making new alerts.
    #[serde(default)]
    pub dedup: Option<Dedup>,
    /// Fires only when matches by a key reach a count within a window.
    #[serde(default)]
    pub threshold: Option<Threshold>,
    /// `alert` (default) writes alerts; `dryRun` only counts matches.
    #[serde(default)]
    pub mode: Mode,
    /// Events the rule must and must not match, checked before it loads.
    #[serde(default)]
    pub tests: Vec<RuleTest>,
    /// ClusterDetectionRule only: pods in these namespaces only (empty: any).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Pods whose labels include all of these only (empty: any pod).
    #[serde(default)]
    pub pod_selector: BTreeMap<String, String>,
    /// ClusterDetectionRule only: whether events of no pod (the node's own
    /// processes, flows, SNMP, inventory) are seen too. Default true.
    #[serde(default)]
    pub node_events: Option<bool>,
}

/// Which events a rule sees.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EventMatch {
    /// The kind of payload: process, flow, snmp, inventory, gap or incarnation.
    pub event: String,
    /// The payload's kinds (process: start, exit, snapshot; snmp: poll,
    /// device_down, device_up; inventory: snapshot, listener_added,
    /// listener_removed, neighbor_added, neighbor_removed, discovered); empty: any.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Collector names (empty: any).
    #[serde(default)]
    pub collectors: Vec<String>,
}

/// Tuples of field values that are not matches.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Exception {
    /// Why, for people.
    pub name: String,
    /// Field paths, e.g. `process.parent.name`.
    pub fields: Vec<String>,
    /// Each entry one value per field.
    pub values: Vec<Vec<String>>,
}

/// An alert's severity.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[allow(missing_docs)]
pub enum RuleSeverity {
    Info,
    Notice,
    #[default]
    Warning,
    Error,
    Critical,
}

impl RuleSeverity {
    /// The event severity it becomes.
    pub fn to_proto(self) -> amoskys_proto::Severity {
        use amoskys_proto::Severity as S;
        match self {
            Self::Info => S::Info,
            Self::Notice => S::Notice,
            Self::Warning => S::Warning,
            Self::Error => S::Error,
            Self::Critical => S::Critical,
        }
    }

    /// Its name in YAML and in labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Info => "info",
            Self::Notice => "notice",
            Self::Warning => "warning",
            Self::Error => "error",
            Self::Critical => "critical",
        }
    }
}

/// Whether matches become alerts.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Matches become alerts.
    #[default]
    Alert,
    /// Matches are counted (metrics, status) and nothing is written.
    DryRun,
}

/// Repeats of a match by the same key within a window.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Dedup {
    /// Field paths whose values make the key (empty: the summary).
    #[serde(default)]
    pub by: Vec<String>,
    /// How long after the first match repeats only raise its count, e.g. `10m`.
    pub window: String,
}

/// A count of matches, or of distinct values, by key within a window.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Threshold {
    /// Field paths whose values make the key, e.g. `flow.srcIp`.
    #[serde(default)]
    pub by: Vec<String>,
    /// Count distinct values of this field instead of matches, e.g. `flow.dstPort`.
    #[serde(default)]
    pub distinct: Option<String>,
    /// The count that fires the rule.
    pub count: u32,
    /// The window, e.g. `10s`.
    pub window: String,
}

/// One inline test: events fed to the rule alone, and whether it must fire.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleTest {
    /// What the test shows.
    pub name: String,
    /// One event, in the fields conditions read (`event`, `process`, `k8s`, …).
    #[serde(default)]
    #[schemars(schema_with = "any_object")]
    pub event: Option<serde_json::Value>,
    /// Several events in order (threshold rules), `stored` seconds apart
    /// unless an event sets `event.storedAt`.
    #[serde(default)]
    #[schemars(schema_with = "any_object_list")]
    pub events: Vec<serde_json::Value>,
    /// `match` or `noMatch`.
    pub expect: Expect,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn any_object_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// What an inline test expects.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum Expect {
    /// The rule fires.
    #[default]
    Match,
    /// The rule does not fire.
    NoMatch,
}

/// A rule file that could not be read as rule documents.
#[derive(Debug, thiserror::Error)]
pub enum RuleFileError {
    /// Not YAML of rule documents; the message names the line and field.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// What is wrong, with its position.
        message: String,
    },
    /// A document that is not a rule of this API.
    #[error("{file}: document {index} ({name}): {message}")]
    Document {
        /// The file.
        file: String,
        /// The document's place in the file, from 1.
        index: usize,
        /// Its name, where it has one.
        name: String,
        /// What is wrong.
        message: String,
    },
}

impl RuleDocument {
    /// The document's scope, from its kind.
    pub fn scope(&self) -> Option<Scope> {
        match self.kind.as_str() {
            "DetectionRule" => Some(Scope::Namespaced),
            "ClusterDetectionRule" => Some(Scope::Cluster),
            _ => None,
        }
    }

    /// The name alerts and metrics use: `NAMESPACE/NAME` for a
    /// DetectionRule, `NAME` for a ClusterDetectionRule.
    pub fn qualified_name(&self) -> String {
        match (&self.metadata.namespace, self.scope()) {
            (Some(ns), Some(Scope::Namespaced)) => format!("{ns}/{}", self.metadata.name),
            _ => self.metadata.name.clone(),
        }
    }
}

/// Reads every rule document in `text` (YAML, documents separated by
/// `---`). `file` names the source in errors.
pub fn parse_rule_file(file: &str, text: &str) -> Result<Vec<RuleDocument>, RuleFileError> {
    let docs: Vec<RuleDocument> =
        serde_saphyr::from_multiple(text).map_err(|e| RuleFileError::Parse {
            file: file.to_string(),
            message: e.to_string(),
        })?;
    for (i, d) in docs.iter().enumerate() {
        let bad = |message: String| RuleFileError::Document {
            file: file.to_string(),
            index: i + 1,
            name: d.metadata.name.clone(),
            message,
        };
        if d.api_version != API_VERSION {
            return Err(bad(format!(
                "apiVersion: {:?} is not {API_VERSION}",
                d.api_version
            )));
        }
        if d.scope().is_none() {
            return Err(bad(format!(
                "kind: {:?} is neither DetectionRule nor ClusterDetectionRule",
                d.kind
            )));
        }
        if d.metadata.name.is_empty() {
            return Err(bad("metadata.name: missing".into()));
        }
    }
    Ok(docs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_hold_several_documents_and_errors_name_the_document() {
        let text = "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: a}\nspec:\n  match: {event: process}\n  condition: 'true'\n  summary: s\n---\napiVersion: amoskys.io/v1alpha1\nkind: DetectionRule\nmetadata: {name: b, namespace: shop}\nspec:\n  match: {event: flow}\n  condition: 'true'\n  summary: s\n";
        let docs = parse_rule_file("r.yaml", text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].qualified_name(), "shop/b");
        assert_eq!(docs[0].scope(), Some(Scope::Cluster));

        let wrong = text.replace("kind: DetectionRule", "kind: Rule");
        let e = parse_rule_file("r.yaml", &wrong).unwrap_err().to_string();
        assert!(e.contains("document 2 (b)") && e.contains("kind:"), "{e}");

        let typo = text.replace(
            "condition: 'true'\n  summary: s\n---",
            "conditon: 'true'\n  summary: s\n---",
        );
        let e = parse_rule_file("r.yaml", &typo).unwrap_err().to_string();
        assert!(e.contains("conditon"), "{e}");
    }
}
