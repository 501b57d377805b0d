//! Detector throughput: the starter rules over a synthetic mix of stored
//! events shaped like a busy node's (mostly flows and process starts), on
//! one core. Prints events/s, mean and p99 cost per event, the share of
//! events that ran no CEL, and the alerts and suppressions made.
//!
//! `cargo run --release -p amoskys-detect --example throughput [EVENTS]`

use std::sync::Arc;
use std::time::Instant;

use amoskys_detect::compile::env;
use amoskys_detect::sample::NodeMix;
use amoskys_detect::starter::STARTER_RULES;
use amoskys_detect::{Decision, Engine, RuleSet, compile, parse_rule_file};
use amoskys_proto::Event;

fn mix(n: usize) -> Vec<Event> {
    let mut m = NodeMix::new(0);
    (0..n)
        .map(|i| {
            let (payload, r) = m.next_payload();
            Event {
                agent_id: format!("node-{}", r % 20),
                node: format!("node-{}", r % 20),
                collector: "x".into(),
                offset: i as u64 + 1,
                stored_at: 1_700_000_000_000_000_000 + i as i64 * 10_000,
                payload: Some(payload),
                ..Default::default()
            }
        })
        .collect()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let env = env();
    let mut rules = Vec::new();
    for (file, text) in STARTER_RULES {
        for doc in parse_rule_file(file, text).unwrap_or_default() {
            match compile(&doc, &env) {
                Ok(r) => rules.push(Arc::new(r)),
                Err(e) => eprintln!("{file}: {e}"),
            }
        }
    }
    let n_rules = rules.len();
    let events = mix(n);
    let mut engine = Engine::new(Arc::new(RuleSet::new(rules, env)), 0, Default::default());
    let (mut alerts, mut suppressed) = (0u64, 0u64);
    let mut costs = Vec::with_capacity(n);
    let t0 = Instant::now();
    for e in &events {
        let t = Instant::now();
        for d in engine.evaluate(e) {
            match d {
                Decision::Alert(_) => alerts += 1,
                Decision::Suppressed { .. } => suppressed += 1,
                _ => {}
            }
        }
        costs.push(t.elapsed().as_nanos() as u64);
    }
    let took = t0.elapsed();
    costs.sort_unstable();
    let mean = costs.iter().sum::<u64>() as f64 / n as f64;
    let p99 = costs[(n as f64 * 0.99) as usize - 1];
    println!(
        "detector: events={n} rules={n_rules} eps={:.0} mean_us={:.3} p99_us={:.3} no_cel_share={:.3} alerts={alerts} suppressed={suppressed}",
        n as f64 / took.as_secs_f64(),
        mean / 1000.0,
        p99 as f64 / 1000.0,
        engine.events_without_cel as f64 / engine.events_seen.max(1) as f64,
    );
}
