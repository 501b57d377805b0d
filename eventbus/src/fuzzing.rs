//! Entry points for the cargo-fuzz targets in `fuzz/`, one per parser of
//! bytes the bus does not control: Publish messages (decode and batch
//! validation), the dashboard's query strings and filters, its config
//! file, and detection rule files.
//!
//! They live in the crate so that `fuzz/corpus_replay.rs` replays every
//! corpus and every crash found through exactly this code on each
//! `cargo test`, without a fuzzing toolchain. Each must return normally for
//! any input: a panic, an overflow or an endless loop is the bug.

use amoskys_proto::publish_request::Msg;
use amoskys_proto::{Event, Hello, PublishRequest};
use prost::Message;

use crate::dashboard::params;
use crate::filter::EventFilter;

/// The batch limit the bus applies by default (`maxGroupEvents`).
const MAX_EVENTS: usize = 4096;

/// One Publish message off the wire, decoded and validated as a stream
/// does after its Hello; every event that passes is matched against a
/// filter, as Tail does.
pub fn publish(data: &[u8]) {
    let Ok(req) = PublishRequest::decode(data) else {
        return;
    };
    let hello = Hello {
        agent_id: "fuzz".into(),
        node: "node".into(),
        incarnation: 7,
        ..Default::default()
    };
    match req.msg {
        Some(Msg::Batch(mut batch)) => {
            // What passes validation is what Tail and the dashboard see.
            let stored = match crate::service::validate_batch(&hello, &mut batch, MAX_EVENTS) {
                Ok(()) => batch.events,
                Err(_) => Vec::new(),
            };
            let f = EventFilter::from_wire(None).unwrap_or_default();
            for e in &stored {
                let _ = (f.matches(e), amoskys_client::render::summary(e));
            }
        }
        Some(Msg::Hello(h)) => {
            let _ = crate::service::validate_hello(&h);
        }
        _ => {}
    }
}

/// A dashboard query string: the first byte picks the endpoint's parser;
/// a filter that parses is applied to an event decoded from the rest.
pub fn dashboard_query(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let raw = String::from_utf8_lossy(rest);
    let filter = match which % 3 {
        0 => params::search(Some(&raw)).map(|s| s.filter),
        1 => params::tail(Some(&raw)),
        _ => params::parse(Some(&raw), &["limit", "before"])
            .and_then(|p| params::number::<u64>("limit", p.get("limit")))
            .map(|_| EventFilter::default()),
    };
    if let Ok(f) = filter {
        let e = Event::decode(rest).unwrap_or_default();
        let _ = f.matches(&e);
    }
}

/// The bus's config file, parsed and resolved as `amoskys bus` does.
pub fn bus_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = crate::config::parse_config(text) else {
        return;
    };
    let flags = crate::config::BusOverrides {
        data_dir: Some("/nonexistent/data".into()),
        tls_dir: Some("/nonexistent/tls".into()),
        ..Default::default()
    };
    let _ = crate::config::resolve(file, flags);
}

/// A detection rule file, as the detector and `amoskys rules test` read it:
/// parsed, each rule compiled and its inline tests run, and the rules that
/// compiled evaluated over a process and a flow event.
pub fn rule_file(data: &[u8]) {
    use amoskys_detect::{Engine, RuleSet, compile, parse_rule_file, run_tests};
    use amoskys_proto::event::Payload;
    use amoskys_proto::{FlowEvent, K8sIdentity, ProcessEvent};
    use std::sync::Arc;

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(docs) = parse_rule_file("fuzz.yaml", text) else {
        return;
    };
    let env = amoskys_detect::compile::env();
    let mut rules = Vec::new();
    for d in &docs {
        if let Ok(rule) = compile(d, &env) {
            let rule = Arc::new(rule);
            let _ = run_tests(d, &rule, &env);
            rules.push(rule);
        }
    }
    let mut engine = Engine::new(Arc::new(RuleSet::new(rules, env)), 0, Default::default());
    let k8s = Some(K8sIdentity {
        namespace: "shop".into(),
        pod: "web-1".into(),
        ..Default::default()
    });
    let events = [
        Event {
            agent_id: "n1".into(),
            node: "n1".into(),
            collector: "process".into(),
            offset: 1,
            stored_at: 1_700_000_000_000_000_000,
            k8s: k8s.clone(),
            payload: Some(Payload::Process(ProcessEvent {
                name: "sh".into(),
                exe: "/bin/sh".into(),
                container_id: "c0ffee".into(),
                ..Default::default()
            })),
            ..Default::default()
        },
        Event {
            agent_id: "n1".into(),
            collector: "flow".into(),
            offset: 2,
            stored_at: 1_700_000_001_000_000_000,
            k8s,
            payload: Some(Payload::Flow(FlowEvent {
                src_ip: "10.0.0.1".into(),
                dst_ip: "169.254.169.254".into(),
                dst_port: 80,
                ..Default::default()
            })),
            ..Default::default()
        },
    ];
    for e in &events {
        let _ = engine.evaluate(e);
    }
}
