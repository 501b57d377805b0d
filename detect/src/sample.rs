//! Events shaped like a busy node's, for benchmarks of detection: 60 %
//! flows, 30 % process starts (a quarter of them in containers, where the
//! shells among them are what the starter rules alert on), 5 % exits, 3 %
//! heartbeats and 2 % new listeners. Deterministic from the seed, so two
//! runs (or the detector alone and the whole bus) see the same mix.

use amoskys_proto::event::Payload;
use amoskys_proto::{
    FlowEvent, Heartbeat, InventoryEvent, Listener, ProcessEvent, inventory_event, process_event,
};

/// A generator of node-like payloads.
pub struct NodeMix {
    x: u64,
}

const NAMES: [&str; 10] = [
    "nginx", "python3", "java", "node", "ls", "cat", "curl", "bash", "sh", "git",
];

impl NodeMix {
    /// A mix drawn from `seed` (any value; 0 is replaced).
    pub fn new(seed: u64) -> Self {
        Self {
            x: if seed == 0 {
                0x9e37_79b9_7f4a_7c15
            } else {
                seed
            },
        }
    }

    fn draw(&mut self) -> u64 {
        // xorshift64: cheap and reproducible; quality does not matter here.
        self.x ^= self.x << 13;
        self.x ^= self.x >> 7;
        self.x ^= self.x << 17;
        self.x
    }

    /// The next payload, and the random draw it came from (callers spread
    /// other fields, such as the node, with it).
    pub fn next_payload(&mut self) -> (Payload, u64) {
        let r = self.draw();
        let payload = match r % 100 {
            0..=59 => Payload::Flow(FlowEvent {
                src_ip: format!("10.0.{}.{}", r % 7, (r >> 8) % 250),
                dst_ip: format!("10.1.{}.{}", (r >> 16) % 5, (r >> 24) % 250),
                src_port: 30000 + (r >> 32) as u32 % 30000,
                dst_port: [443, 80, 53, 5432, 6379, 8080][(r >> 40) as usize % 6],
                protocol: if r.is_multiple_of(3) { 17 } else { 6 },
                packets: 10,
                bytes: 1500,
                ..Default::default()
            }),
            60..=89 => {
                let name = NAMES[(r >> 8) as usize % NAMES.len()];
                Payload::Process(ProcessEvent {
                    kind: process_event::Kind::Start as i32,
                    pid: (r % 60000) as u32,
                    name: name.into(),
                    exe: format!("/usr/bin/{name}"),
                    cmdline: vec![name.into(), "--flag".into(), "value".into()],
                    container_id: if r.is_multiple_of(4) {
                        format!("{r:x}")
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
        (payload, r)
    }
}

/// The collector that emits `p`, as agents name them.
pub fn collector_of(p: &Payload) -> &'static str {
    match p {
        Payload::Flow(_) => "flow",
        Payload::Process(_) => "process",
        Payload::Inventory(_) => "inventory",
        Payload::Heartbeat(_) => "agent",
        _ => "synthetic",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_has_its_shares_and_repeats_from_the_seed() {
        let mut a = NodeMix::new(7);
        let mut b = NodeMix::new(7);
        let mut flows = 0;
        for _ in 0..10_000 {
            let (p, r) = a.next_payload();
            assert_eq!(b.next_payload().1, r);
            flows += usize::from(matches!(p, Payload::Flow(_)));
        }
        assert!((5_500..6_500).contains(&flows), "{flows}");
    }
}
