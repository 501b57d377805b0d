#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! `amoskys render` as a user runs it: sample files in, every object the
//! operator would create out, as YAML; bad input named, with a failing exit.

use std::io::Write;
use std::process::{Command, Stdio};

mod common;
use common::cli;

#[test]
fn render_prints_what_the_operator_would_create_and_names_what_is_wrong() {
    let root = env!("CARGO_MANIFEST_DIR");
    let bus = format!("{root}/config/eventbus.yaml");
    let set = format!("{root}/config/agentset.yaml");
    let rules = format!("{root}/config/rules");
    let (ok, out) = cli(&[
        "render", "-f", &bus, "-f", &set, "-f", &rules, "-n", "security",
    ]);
    assert!(ok, "{out}");
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&out).unwrap();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for k in [
        "StatefulSet",
        "DaemonSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
        "Secret",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert!(
        docs.iter()
            .all(|d| d["metadata"]["namespace"] == "security")
    );
    // The starter rules, read from their directory, are the buses' rule set.
    let rule_set = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "amoskys-rules")
        .unwrap()["data"]["rules.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(rule_set.contains("name: shell-in-container"), "{rule_set}");

    // From stdin, and an AgentSet without its EventBus is an error naming it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_amoskys"))
        .args(["render", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(std::fs::read(&set).unwrap().as_slice())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("AgentSet default/nodes: spec.busRef.name"),
        "{err}"
    );
}
