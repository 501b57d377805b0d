#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Replays the hand-made seeds (`fuzz/seeds/<target>`), the fuzz corpora
//! (`fuzz/corpus/<target>`) and every crash the
//! fuzzers found (`fuzz/regressions/<target>`) through the same entry points
//! the cargo-fuzz targets call (`agents/src/fuzzing.rs`,
//! `eventbus/src/fuzzing.rs`), so a fixed crash stays fixed on every
//! `cargo test`. See `fuzz/README.md`.

use std::path::PathBuf;

use amoskys_agents::fuzzing as agent;
use amoskys_eventbus::fuzzing as bus;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for dir in ["seeds", "corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            out.push((path, data));
        }
    }
    out
}

/// A fuzz target's entry point.
type Entry = fn(&[u8]);

/// Every target of `fuzz/Cargo.toml`, with its entry point.
const TARGETS: [(&str, Entry); 10] = [
    ("flow", agent::flow),
    ("netlink", agent::netlink),
    ("procfs", agent::procfs),
    ("cgroup", agent::cgroup),
    ("snmp_response", agent::snmp_response),
    ("agent_config", agent::agent_config),
    ("publish", bus::publish),
    ("dashboard_query", bus::dashboard_query),
    ("bus_config", bus::bus_config),
    ("rule_file", bus::rule_file),
];

#[test]
fn every_corpus_and_regression_runs_clean() {
    for (target, f) in TARGETS {
        let all = inputs(target);
        assert!(!all.is_empty(), "no corpus for fuzz target {target}");
        for (path, data) in all {
            let done = std::panic::catch_unwind(|| f(&data));
            assert!(done.is_ok(), "{target}: {} panics", path.display());
        }
    }
}

#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|n| *n != "amoskys-fuzz")
        .collect();
    let replayed: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
    assert_eq!(declared, replayed);
}

/// The hand-made seeds are what they say, so the fuzzers start from inputs
/// that reach deep into each parser rather than stopping at its first check.
#[test]
fn seeds_reach_the_parsers() {
    use amoskys_agents::collectors::flow::decode;
    use amoskys_proto::PublishRequest;
    use amoskys_proto::publish_request::Msg;
    use prost::Message;
    let seed = |p: &str| std::fs::read(fuzz_dir().join("seeds").join(p)).unwrap();

    let eth = seed("flow/eth-ipv4-tcp");
    let p = decode::decode(decode::LINK_ETHERNET, &eth[3..]).unwrap();
    assert_eq!((p.key.dst_port, p.payload_bytes), (443, 5));
    let nl = seed("netlink/fork-exit");
    assert_eq!(
        amoskys_agents::collectors::process::netlink::parse(&nl).len(),
        2
    );

    let Some(Msg::Batch(mut batch)) = PublishRequest::decode(&seed("publish/batch")[..])
        .unwrap()
        .msg
    else {
        panic!("the publish seed is not a batch");
    };
    let hello = amoskys_proto::Hello {
        agent_id: "fuzz".into(),
        ..Default::default()
    };
    amoskys_eventbus::validate_batch(&hello, &mut batch, 10).unwrap();
    let cfg = String::from_utf8(seed("bus_config/full")).unwrap();
    amoskys_eventbus::config::parse_config(&cfg).unwrap();
}
