//! Detection rules in the cluster: what the operator makes of each one
//! (compiled against the event fields, inline tests run) and the rule set
//! it hands to the buses, which is only the rules that passed both.

use std::sync::Arc;

use amoskys_detect::rule::{API_VERSION, RuleMetadata};
use amoskys_detect::{RuleDocument, RuleSpec, compile, run_tests};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use time::OffsetDateTime;

use crate::controller::condition;
use crate::crd::{ClusterDetectionRule, DetectionRule, DetectionRuleStatus};

/// What checking one rule found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The compile error (field, line and column), if any.
    pub compile_error: Option<String>,
    /// Inline tests run (0 when it did not compile).
    pub tests: u32,
    /// The failed tests, each `name: why`.
    pub failures: Vec<String>,
}

impl Verdict {
    /// Whether the rule goes into the rule set.
    pub fn loadable(&self) -> bool {
        self.compile_error.is_none() && self.failures.is_empty()
    }
}

/// The rule document a resource stands for: what a rule file would hold.
pub fn document(kind: &str, meta: &ObjectMeta, spec: &RuleSpec) -> RuleDocument {
    RuleDocument {
        api_version: API_VERSION.into(),
        kind: kind.into(),
        metadata: RuleMetadata {
            name: meta.name.clone().unwrap_or_default(),
            namespace: meta.namespace.clone(),
            generation: meta.generation,
            labels: meta.labels.clone().unwrap_or_default(),
        },
        spec: spec.clone(),
    }
}

/// The documents of every rule resource, sorted by kind, namespace and
/// name so the rule set's text (and the ConfigMap) is stable.
pub fn documents(
    ns_rules: &[DetectionRule],
    cluster_rules: &[ClusterDetectionRule],
) -> Vec<RuleDocument> {
    let mut docs: Vec<RuleDocument> = cluster_rules
        .iter()
        .map(|r| document("ClusterDetectionRule", &r.metadata, &r.spec.rule))
        .chain(
            ns_rules
                .iter()
                .map(|r| document("DetectionRule", &r.metadata, &r.spec.rule)),
        )
        .collect();
    docs.sort_by(|a, b| {
        (&a.kind, &a.metadata.namespace, &a.metadata.name).cmp(&(
            &b.kind,
            &b.metadata.namespace,
            &b.metadata.name,
        ))
    });
    docs
}

/// Compiles a rule and runs its inline tests, as the bus will before it
/// loads it.
pub fn check(doc: &RuleDocument) -> Verdict {
    let env = amoskys_detect::compile::env();
    match compile(doc, &env) {
        Err(e) => Verdict {
            compile_error: Some(e.to_string()),
            tests: 0,
            failures: Vec::new(),
        },
        Ok(rule) => {
            let outcomes = run_tests(doc, &Arc::new(rule), &env);
            Verdict {
                compile_error: None,
                tests: outcomes.len() as u32,
                failures: outcomes
                    .iter()
                    .filter(|o| !o.passed)
                    .map(|o| format!("{}: {}", o.name, o.message))
                    .collect(),
            }
        }
    }
}

/// The rule set: every document that passed [`check`], as one multi-document
/// YAML file the bus reads from its rules directory.
pub fn rule_set_yaml(docs: &[RuleDocument]) -> Result<String, serde_saphyr::ser::Error> {
    let mut out = String::from(
        "# The cluster's detection rules that compiled and passed their tests, written by the operator.\n",
    );
    for d in docs.iter().filter(|d| check(d).loadable()) {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(d)?);
    }
    Ok(out)
}

/// What the bus pods reported about one rule (their Admin.Stats).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BusReport {
    /// Bus pods that reported their rules.
    pub pods: usize,
    /// Of those, the ones running the rule.
    pub loaded: usize,
    /// Why pods that have the rule did not load it.
    pub errors: Vec<String>,
    /// Matches in the last 24 hours, summed over the pods.
    pub matches_24h: u64,
    /// The newest match's stored time (unix ns), 0 for none.
    pub last_match: i64,
}

impl BusReport {
    /// Gathers what each pod said about the rule `name`.
    pub fn of<'a>(
        name: &str,
        pods: impl IntoIterator<Item = &'a [amoskys_proto::RuleState]>,
    ) -> Self {
        let mut r = BusReport::default();
        for rules in pods {
            r.pods += 1;
            if let Some(s) = rules.iter().find(|s| s.name == name) {
                if s.loaded {
                    r.loaded += 1;
                } else if !r.errors.contains(&s.error) {
                    r.errors.push(s.error.clone());
                }
                r.matches_24h += s.matches_24h;
                r.last_match = r.last_match.max(s.last_match);
            }
        }
        r
    }
}

/// A rule's status from its verdict and what the bus pods report:
/// Compiled, TestsPassed and Loaded, each keeping its transition time while
/// its status holds, and the matches.
pub fn status(
    verdict: &Verdict,
    previous: Option<&DetectionRuleStatus>,
    generation: Option<i64>,
    buses: usize,
    report: &BusReport,
    now: OffsetDateTime,
) -> DetectionRuleStatus {
    let prev: &[Condition] = previous.map(|s| s.conditions.as_slice()).unwrap_or(&[]);
    let compiled = match &verdict.compile_error {
        None => condition(
            prev,
            "Compiled",
            true,
            "Compiled",
            "the condition type-checks against the event fields",
            generation,
            now,
        ),
        Some(e) => condition(
            prev,
            "Compiled",
            false,
            "CompileError",
            e.clone(),
            generation,
            now,
        ),
    };
    let tests = if verdict.compile_error.is_some() {
        condition(
            prev,
            "TestsPassed",
            false,
            "NotCompiled",
            "tests run once the rule compiles",
            generation,
            now,
        )
    } else if verdict.failures.is_empty() {
        condition(
            prev,
            "TestsPassed",
            true,
            "TestsPassed",
            format!("{} inline tests passed", verdict.tests),
            generation,
            now,
        )
    } else {
        condition(
            prev,
            "TestsPassed",
            false,
            "TestsFailed",
            verdict.failures.join("; "),
            generation,
            now,
        )
    };
    let loaded = if !verdict.loadable() {
        condition(
            prev,
            "Loaded",
            false,
            "NotLoaded",
            "left out of the rule set until it compiles and its tests pass; the other rules keep running",
            generation,
            now,
        )
    } else if buses == 0 {
        condition(
            prev,
            "Loaded",
            false,
            "NoEventBus",
            "no EventBus to run it",
            generation,
            now,
        )
    } else if !report.errors.is_empty() {
        condition(
            prev,
            "Loaded",
            false,
            "BusRefused",
            format!("a bus pod did not load it: {}", report.errors.join("; ")),
            generation,
            now,
        )
    } else if report.pods == 0 {
        condition(
            prev,
            "Loaded",
            true,
            "InRuleSet",
            format!(
                "in the rule set of {buses} EventBus(es) (ConfigMap <bus>-rules); no bus pod has reported its rules yet"
            ),
            generation,
            now,
        )
    } else if report.loaded < report.pods {
        condition(
            prev,
            "Loaded",
            false,
            "Propagating",
            format!(
                "running on {} of {} bus pods; kubelet updates the mounted rule set within about a minute",
                report.loaded, report.pods
            ),
            generation,
            now,
        )
    } else {
        condition(
            prev,
            "Loaded",
            true,
            "Running",
            format!("running on all {} bus pods", report.pods),
            generation,
            now,
        )
    };
    DetectionRuleStatus {
        conditions: vec![compiled, tests, loaded],
        observed_generation: generation,
        tests: verdict.tests,
        tests_passed: verdict.tests - verdict.failures.len() as u32,
        matches24h: (report.pods > 0).then_some(report.matches_24h),
        last_match: (report.last_match > 0)
            .then(|| crate::controller::rfc3339(report.last_match.div_euclid(1_000_000_000))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(condition: &str, expect_match: bool) -> RuleSpec {
        let yaml = format!(
            "match: {{event: process, kinds: [start]}}\ncondition: {condition:?}\nsummary: shell\ntests:\n  - name: sh\n    event: {{process: {{name: sh}}}}\n    expect: {}\n",
            if expect_match { "match" } else { "noMatch" }
        );
        serde_saphyr::from_str(&yaml).unwrap()
    }

    fn rule(name: &str, ns: &str, s: RuleSpec) -> DetectionRule {
        let mut r = DetectionRule::new(name, crate::crd::DetectionRuleSpec { rule: s });
        r.metadata.namespace = Some(ns.into());
        r.metadata.generation = Some(3);
        r
    }

    fn meta() -> ObjectMeta {
        ObjectMeta {
            name: Some("a".into()),
            namespace: Some("shop".into()),
            generation: Some(3),
            ..Default::default()
        }
    }

    #[test]
    fn verdicts_name_the_error_and_the_failed_test() {
        let now = OffsetDateTime::UNIX_EPOCH;
        let v = check(&document(
            "DetectionRule",
            &meta(),
            &spec("process.name == 'sh'", true),
        ));
        assert!(v.loadable(), "{v:?}");
        let st = status(&v, None, Some(3), 1, &BusReport::default(), now);
        assert!(st.conditions.iter().all(|c| c.status == "True"), "{st:?}");
        assert_eq!(
            (st.tests, st.tests_passed, st.observed_generation),
            (1, 1, Some(3))
        );
        let none = status(&v, None, Some(3), 0, &BusReport::default(), now);
        assert_eq!(none.conditions[2].reason, "NoEventBus");

        let typo = check(&document(
            "DetectionRule",
            &meta(),
            &spec("process.nme == 'sh'", true),
        ));
        let e = typo.compile_error.clone().unwrap();
        assert!(e.contains("spec.condition") && e.contains("line 1"), "{e}");
        let st = status(&typo, None, Some(3), 1, &BusReport::default(), now);
        assert_eq!(
            st.conditions
                .iter()
                .map(|c| (c.type_.as_str(), c.status.as_str()))
                .collect::<Vec<_>>(),
            vec![
                ("Compiled", "False"),
                ("TestsPassed", "False"),
                ("Loaded", "False")
            ]
        );
        assert!(st.conditions[0].message.contains("line 1"));

        let failing = check(&document(
            "DetectionRule",
            &meta(),
            &spec("process.name == 'sh'", false),
        ));
        assert_eq!(failing.compile_error, None);
        assert_eq!(failing.failures.len(), 1);
        assert!(
            failing.failures[0].starts_with("sh:"),
            "{:?}",
            failing.failures
        );
        let st = status(&failing, None, Some(3), 1, &BusReport::default(), now);
        assert_eq!(st.conditions[1].reason, "TestsFailed");
        assert_eq!(st.conditions[2].status, "False");
        assert_eq!(st.tests_passed, 0);
    }

    #[test]
    fn loaded_follows_what_the_bus_pods_report_and_matches_are_summed() {
        use amoskys_proto::RuleState;
        let now = OffsetDateTime::UNIX_EPOCH;
        let v = check(&document(
            "DetectionRule",
            &meta(),
            &spec("process.name == 'sh'", true),
        ));
        let state = |loaded: bool, matches: u64, last: i64| RuleState {
            name: "shop/a".into(),
            loaded,
            error: if loaded {
                String::new()
            } else {
                "spec.condition: nope".into()
            },
            matches_24h: matches,
            last_match: last,
            degraded: false,
        };
        let other = RuleState {
            name: "other".into(),
            loaded: true,
            ..Default::default()
        };
        let loaded = |pods: &[Vec<RuleState>]| {
            let r = BusReport::of("shop/a", pods.iter().map(Vec::as_slice));
            let st = status(&v, None, Some(3), 1, &r, now);
            let c = st.conditions[2].clone();
            (c.status, c.reason, st.matches24h, st.last_match)
        };
        assert_eq!(
            loaded(&[]),
            ("True".into(), "InRuleSet".into(), None, None),
            "no pod has reported"
        );
        assert_eq!(
            loaded(&[vec![state(true, 2, 0)], vec![other.clone()]]),
            ("False".into(), "Propagating".into(), Some(2), None),
            "one pod has not picked the rule up"
        );
        assert_eq!(
            loaded(&[
                vec![state(true, 2, 1_000_000_000)],
                vec![other.clone(), state(true, 5, 3_000_000_000)]
            ]),
            (
                "True".into(),
                "Running".into(),
                Some(7),
                Some("1970-01-01T00:00:03Z".into())
            )
        );
        let (status_, reason, ..) = loaded(&[vec![state(true, 0, 0)], vec![state(false, 0, 0)]]);
        assert_eq!((status_.as_str(), reason.as_str()), ("False", "BusRefused"));
        let r = BusReport::of(
            "shop/a",
            [vec![state(false, 0, 0)]].iter().map(Vec::as_slice),
        );
        let st = status(&v, None, Some(3), 1, &r, now);
        assert!(
            st.conditions[2].message.contains("spec.condition: nope"),
            "{st:?}"
        );
    }

    #[test]
    fn the_rule_set_holds_only_what_passed_and_the_bus_reads_it_back() {
        let ok = rule("ok", "shop", spec("process.name == 'sh'", true));
        let broken = rule("broken", "shop", spec("process.name ==", true));
        let docs = documents(&[broken, ok], &[]);
        assert_eq!(docs.len(), 2);
        let yaml = rule_set_yaml(&docs).unwrap();
        let back = amoskys_detect::parse_rule_file("rules.yaml", &yaml).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].qualified_name(), "shop/ok");
        assert_eq!(back[0].metadata.generation, Some(3));
        assert!(check(&back[0]).loadable());
    }
}
