//! Inline tests: each test's events fed to the rule alone on a fresh
//! engine, and whether it fired as the test expects.

use std::sync::Arc;

use cel::{Env, Value};

use crate::compile::{CompiledRule, RuleSet};
use crate::engine::{Decision, Engine};
use crate::rule::{Expect, RuleDocument, Scope};
use crate::view::View;

/// One inline test's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// The test's name.
    pub name: String,
    /// Whether the rule did what the test expects.
    pub passed: bool,
    /// What went wrong, for a failed test.
    pub message: String,
}

/// A DetectionRule sees only events of pods in its namespace: a test event
/// of one that names no namespace is an event of a pod there.
fn in_rule_namespace(doc: &RuleDocument, e: &serde_json::Value) -> serde_json::Value {
    let mut e = e.clone();
    if let (Some(Scope::Namespaced), Some(ns), Some(obj)) = (
        doc.scope(),
        doc.metadata.namespace.as_ref(),
        e.as_object_mut(),
    ) {
        let k8s = obj.entry("k8s").or_insert_with(|| serde_json::json!({}));
        if let Some(k8s) = k8s.as_object_mut()
            && k8s
                .get("namespace")
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .is_empty()
        {
            k8s.insert("namespace".into(), serde_json::json!(ns));
        }
    }
    e
}

/// Runs a compiled rule's inline tests (from `doc`): each on a fresh
/// engine holding only this rule, in alert mode. Test events without
/// `event.storedAt` are stored one second apart; without `event.kind`
/// they have the first of the rule's `match.kinds`; a DetectionRule's
/// events without `k8s.namespace` are in the rule's namespace.
pub fn run_tests(doc: &RuleDocument, rule: &Arc<CompiledRule>, env: &Arc<Env>) -> Vec<TestOutcome> {
    crate::compile::on_rule_stack(|| run_tests_here(doc, rule, env)).unwrap_or_else(|e| {
        vec![TestOutcome {
            name: "spec.tests".into(),
            passed: false,
            message: format!("not run: {e}"),
        }]
    })
}

fn run_tests_here(
    doc: &RuleDocument,
    rule: &Arc<CompiledRule>,
    env: &Arc<Env>,
) -> Vec<TestOutcome> {
    doc.spec
        .tests
        .iter()
        .enumerate()
        .map(|(n, t)| {
            let name = if t.name.is_empty() {
                format!("tests[{n}]")
            } else {
                t.name.clone()
            };
            let fail = |message: String| TestOutcome {
                name: name.clone(),
                passed: false,
                message,
            };
            let events: Vec<&serde_json::Value> = t.event.iter().chain(t.events.iter()).collect();
            if events.is_empty() {
                return fail(format!("spec.tests[{n}]: give event or events"));
            }
            let mut views = Vec::new();
            for (m, e) in events.iter().enumerate() {
                let e = in_rule_namespace(doc, e);
                match View::from_json(rule.payload, &e) {
                    Ok(v) => views.push(v),
                    Err(e) => return fail(format!("spec.tests[{n}] event {m}: {e}")),
                }
            }
            let set = Arc::new(RuleSet::new(vec![rule.clone()], env.clone()));
            let mut engine = Engine::new(set, 0, Default::default());
            engine.force_alert_mode();
            let mut fired = false;
            let mut errors = 0;
            const T0: i64 = 1_700_000_000_000_000_000;
            for (m, mut v) in views.into_iter().enumerate() {
                if v.stored_at() == 0 {
                    v.set_stored_at(T0 + m as i64 * 1_000_000_000);
                }
                if let (Some(Value::String(k)), Some(first)) = (v.get("event.kind"), rule.kinds.first())
                    && k.is_empty()
                {
                    let first = first.clone();
                    v.set_kind(&first);
                }
                for d in engine.evaluate_view(&v, m as u64 + 1) {
                    match d {
                        Decision::Alert(_) | Decision::Suppressed { .. } => fired = true,
                        Decision::Error { .. } => errors += 1,
                        Decision::DryRun { .. } => {}
                    }
                }
            }
            let want = t.expect == Expect::Match;
            if fired == want {
                TestOutcome {
                    name,
                    passed: true,
                    message: String::new(),
                }
            } else if errors > 0 {
                fail(format!(
                    "the condition failed to evaluate on {errors} event(s) (a missing map key or a type mismatch)"
                ))
            } else if want {
                fail("expected a match, got none".into())
            } else {
                fail("expected no match, but the rule fired".into())
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile, env};
    use crate::rule::parse_rule_file;

    #[test]
    fn the_starter_rules_compile_and_pass_their_tests() {
        // Every file in config/rules is built in, and nothing else.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/rules");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut built_in: Vec<String> = crate::starter::STARTER_RULES
            .iter()
            .map(|(f, _)| f.to_string())
            .collect();
        built_in.sort();
        assert_eq!(built_in, on_disk);
        let env = env();
        let mut names = Vec::new();
        for (file, text) in crate::starter::STARTER_RULES {
            for doc in parse_rule_file(file, text).unwrap() {
                let rule = Arc::new(
                    compile(&doc, &env).unwrap_or_else(|e| panic!("{}: {e}", doc.metadata.name)),
                );
                assert!(!doc.spec.tests.is_empty(), "{} has no tests", rule.name);
                assert!(
                    doc.spec.labels.contains_key("mitre"),
                    "{} has no MITRE tag",
                    rule.name
                );
                for t in run_tests(&doc, &rule, &env) {
                    assert!(t.passed, "{} / {}: {}", rule.name, t.name, t.message);
                }
                names.push(rule.name.clone());
            }
        }
        assert_eq!(names.len(), 13, "{names:?}");
    }
}
