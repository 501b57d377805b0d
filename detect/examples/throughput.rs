//! Detector throughput: the starter rules over a synthetic mix of stored
//! events shaped like a busy node's (mostly flows and process starts), on
//! one core. Prints events/s, mean and p99 cost per event, the share of
//! events that ran no CEL, and the alerts and suppressions made.
//!
//! `cargo run --release -p amoskys-detect --example throughput [EVENTS]`

use std::sync::Arc;
use std::time::Instant;

use amoskys_detect::compile::env;
use amoskys_detect::starter::STARTER_RULES;
use amoskys_detect::{Decision, Engine, RuleSet, compile, parse_rule_file};
use amoskys_proto::event::Payload;
use amoskys_proto::*;

fn mix(n: usize) -> Vec<Event> {
    let names = [
        "nginx", "python3", "java", "node", "ls", "cat", "curl", "bash", "sh", "git",
    ];
    let mut out = Vec::with_capacity(n);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..n {
        let r = next();
        let payload = match r % 100 {
            0..=59 => Payload::Flow(FlowEvent {
                src_ip: format!("10.0.{}.{}", r % 7, (r >> 8) % 250),
                dst_ip: format!("10.1.{}.{}", (r >> 16) % 5, (r >> 24) % 250),
                src_port: 30000 + (r >> 32) as u32 % 30000,
                dst_port: [443, 80, 53, 5432, 6379, 8080][(r >> 40) as usize % 6],
                protocol: if r % 3 == 0 { 17 } else { 6 },
                packets: 10,
                bytes: 1500,
                ..Default::default()
            }),
            60..=89 => {
                let name = names[(r >> 8) as usize % names.len()];
                Payload::Process(ProcessEvent {
                    kind: process_event::Kind::Start as i32,
                    pid: (r % 60000) as u32,
                    name: name.into(),
                    exe: format!("/usr/bin/{name}"),
                    cmdline: vec![name.into(), "--flag".into(), "value".into()],
                    container_id: if r % 4 == 0 {
                        format!("{:x}", r)
                    } else {
                        String::new()
                    },
                    parent_name: "containerd-shim".into(),
                    ..Default::default()
                })
            }
            90..=94 => Payload::Process(ProcessEvent {
                kind: process_event::Kind::Exit as i32,
                name: "ls".into(),
                ..Default::default()
            }),
            95..=97 => Payload::Heartbeat(Heartbeat::default()),
            _ => Payload::Inventory(InventoryEvent {
                kind: inventory_event::Kind::ListenerAdded as i32,
                listeners: vec![Listener {
                    protocol: "tcp".into(),
                    address: "0.0.0.0".into(),
                    port: (r % 65535) as u32,
                    pid: 1,
                    process: "app".into(),
                }],
                ..Default::default()
            }),
        };
        out.push(Event {
            agent_id: format!("node-{}", r % 20),
            node: format!("node-{}", r % 20),
            collector: "x".into(),
            offset: i as u64 + 1,
            stored_at: 1_700_000_000_000_000_000 + i as i64 * 10_000,
            payload: Some(payload),
            ..Default::default()
        });
    }
    out
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
