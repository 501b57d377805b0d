#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Bus processes on loopback as shards of one bus, with real agent
//! processes bootstrapping through shard 0: every agent settles on its owner,
//! the map grows 3→5 and shrinks 5→3 under load, and every (agent,
//! incarnation, seq) is stored exactly once across the shards.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amoskys_client::shard::owner_of;
use amoskys_client::{BusClient, ClientOptions};
use amoskys_proto::{ListAgentsRequest, QueryRequest};
use common::{BIN, http_get, metric, pki, wait_http_ready};

const AGENTS: usize = 30;

struct Shard {
    child: Child,
    grpc: u16,
    http: u16,
    map_file: PathBuf,
}

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Distinct listening ports below the kernel's ephemeral range, so the
/// agents' own connections (which take ephemeral ports) never occupy a port
/// a shard started later is to listen on.
fn listen_ports(n: usize) -> Vec<u16> {
    let mut out: Vec<u16> = Vec::new();
    let mut held = Vec::new();
    let mut p = 20_000 + (std::process::id() % 4_000) as u16 * 3;
    while out.len() < n {
        p = if p >= 32_000 { 20_000 } else { p + 1 };
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", p)) {
            held.push(l);
            out.push(p);
        }
    }
    out
}

fn url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

fn map_yaml(epoch: u64, active: u32, ports: &[u16]) -> String {
    let peers: Vec<String> = ports.iter().map(|&p| format!("\"{}\"", url(p))).collect();
    format!(
        "epoch: {epoch}\nactive: {active}\npeers: [{}]\n",
        peers.join(", ")
    )
}

/// Shard `index`, with its own data directory and map file (as each pod
/// has its own mounted copy of the operator's map).
fn start_shard(root: &Path, index: usize, grpc: u16, http: u16, map: &str) -> Shard {
    let dir = root.join(format!("shard-{index}"));
    std::fs::create_dir_all(&dir).unwrap();
    let map_file = dir.join("map.yaml");
    std::fs::write(&map_file, map).unwrap();
    let cfg = dir.join("bus.yaml");
    std::fs::write(
        &cfg,
        format!(
            "sharding:\n  peerTlsDir: {}\n  mapReloadInterval: 100ms\n  peerTimeout: 1s\n",
            root.join("pki/peer").display()
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg("bus")
        .args(["--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--tls-dir")
        .arg(root.join("pki/bus"))
        .arg("--config")
        .arg(&cfg)
        .args(["--shard-index", &index.to_string()])
        .arg("--shard-map")
        .arg(&map_file)
        .env("AMOSKYS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let s = Shard {
        child,
        grpc,
        http,
        map_file,
    };
    wait_http_ready(http);
    s
}

fn set_map(shards: &[Shard], map: &str) {
    for s in shards {
        // Written whole and renamed in, as kubelet swaps a ConfigMap volume.
        let tmp = s.map_file.with_extension("tmp");
        std::fs::write(&tmp, map).unwrap();
        std::fs::rename(&tmp, &s.map_file).unwrap();
    }
}

struct AgentProc(Child);

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(root: &Path, i: usize, bootstrap: u16) -> AgentProc {
    let dir = root.join(format!("agent-{i}"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("agent.yaml");
    std::fs::write(
        &cfg,
        "heartbeatInterval: 1s\nshutdownGrace: 20s\nbatch:\n  maxDelay: 20ms\ncollectors:\n  process:\n    enabled: false\n  inventory:\n    enabled: false\n  synthetic:\n    enabled: true\n    rate: 20\n",
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg("agent")
        .arg("--config")
        .arg(&cfg)
        .args(["--bus", &url(bootstrap)])
        .arg("--tls-dir")
        .arg(root.join("pki/agent"))
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .args(["--agent-id", &agent_id(i)])
        .args(["--http", "127.0.0.1:0"])
        .env("AMOSKYS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    AgentProc(child)
}

fn agent_id(i: usize) -> String {
    format!("node-{i:02}")
}

fn client_opts(root: &Path, port: u16, who: &str) -> ClientOptions {
    ClientOptions::new(url(port), root.join("pki").join(who))
}

/// The agents with a live stream on each shard.
async fn connected(root: &Path, shards: &[Shard]) -> Vec<BTreeSet<String>> {
    let mut out = Vec::new();
    for s in shards {
        let mut c = BusClient::connect(&client_opts(root, s.grpc, "admin"))
            .await
            .unwrap();
        let agents = c
            .admin
            .list_agents(ListAgentsRequest {})
            .await
            .unwrap()
            .into_inner()
            .agents;
        out.push(
            agents
                .into_iter()
                .filter(|a| a.connected)
                .map(|a| a.agent_id)
                .collect(),
        );
    }
    out
}

/// Waits until every agent streams to its owner under `active` shards and
/// to no other shard; returns how long that took.
async fn settle(root: &Path, shards: &[Shard], active: u32) -> Duration {
    let t0 = Instant::now();
    let mut want = vec![BTreeSet::new(); shards.len()];
    for i in 0..AGENTS {
        want[owner_of(&agent_id(i), active) as usize].insert(agent_id(i));
    }
    loop {
        let got = connected(root, shards).await;
        if got == want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "agents did not settle on their owners under {active} active shards:\n got  {got:?}\n want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn moved_out(shards: &[Shard]) -> f64 {
    shards
        .iter()
        .map(|s| metric(s.http, "amoskys_bus_shard_moved_out_total"))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_settle_on_their_owner_shards_and_survive_3_to_5_to_3_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let ports: Vec<(u16, u16)> = listen_ports(10).chunks(2).map(|c| (c[0], c[1])).collect();
    let grpc: Vec<u16> = ports.iter().map(|p| p.0).collect();

    let map3 = map_yaml(1, 3, &grpc[..3]);
    let mut shards: Vec<Shard> = (0..3)
        .map(|i| start_shard(root, i, ports[i].0, ports[i].1, &map3))
        .collect();
    let agents: Vec<AgentProc> = (0..AGENTS).map(|i| start_agent(root, i, grpc[0])).collect();
    let took = settle(root, &shards, 3).await;
    println!("30 agents bootstrapped through shard 0 settled on 3 shards in {took:?}");
    assert!(
        metric(shards[0].http, "amoskys_bus_shard_redirects_total") >= 1.0,
        "shard 0 redirected the agents it does not own"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 3 -> 5: the new shards start on the new map, then the old ones get it.
    let map5 = map_yaml(2, 5, &grpc);
    for (i, &(g, h)) in ports.iter().enumerate().skip(3) {
        shards.push(start_shard(root, i, g, h, &map5));
    }
    let before = moved_out(&shards);
    set_map(&shards[..3], &map5);
    let took = settle(root, &shards, 5).await;
    let moved = (0..AGENTS)
        .filter(|&i| owner_of(&agent_id(i), 3) != owner_of(&agent_id(i), 5))
        .count();
    println!(
        "map 3->5: {moved} of {AGENTS} agents moved ({:.2}), settled in {took:?}",
        moved as f64 / AGENTS as f64
    );
    assert!(moved > 0, "the golden hash moves some of 30 agents");
    assert!(
        moved_out(&shards) - before >= 1.0,
        "old owners handed streams over"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 5 -> 3: shards 3 and 4 retire; their agents go back.
    let map3b = map_yaml(3, 3, &grpc);
    set_map(&shards, &map3b);
    let took = settle(root, &shards, 3).await;
    println!("map 5->3 settled in {took:?}");
    for s in &shards[3..] {
        assert_eq!(metric(s.http, "amoskys_bus_shard_retiring"), 1.0);
        assert_eq!(metric(s.http, "amoskys_bus_shard_map_epoch"), 3.0);
    }
    assert_eq!(metric(shards[0].http, "amoskys_bus_shard_retiring"), 0.0);
    let (status, _) = http_get(shards[4].http, "/readyz", None);
    assert_eq!(status, 200, "a retiring shard stays ready for reads");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Agents stop cleanly: each hands the bus everything it spooled.
    for a in &agents {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(a.0.id() as i32, libc::SIGTERM) };
    }
    for mut a in agents {
        let st = a.0.wait().unwrap();
        assert!(st.success(), "agent exited with {st}");
    }

    // Exactly once across all shards: per (agent, incarnation) the seqs are
    // 1..=n with no repeats.
    let mut seqs: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
    let mut total = 0usize;
    let mut per_shard = Vec::new();
    let mut by_address = BTreeSet::new();
    for (i, s) in shards.iter().enumerate() {
        let events = BusClient::connect(&client_opts(root, s.grpc, "reader"))
            .await
            .unwrap()
            .query_all(QueryRequest {
                limit: 10_000,
                local: true,
                ..Default::default()
            })
            .await
            .unwrap();
        total += events.len();
        per_shard.push(events.len());
        by_address.extend(events.iter().map(|e| (i as u32, e.offset)));
        for e in events.into_iter().filter(|e| e.seq > 0) {
            seqs.entry((e.agent_id, e.incarnation))
                .or_default()
                .push(e.seq);
        }
    }
    assert_eq!(seqs.len(), AGENTS, "one incarnation per agent");
    for ((agent, inc), mut v) in seqs {
        v.sort_unstable();
        let n = v.len() as u64;
        let dups = v.windows(2).filter(|w| w[0] == w[1]).count();
        assert_eq!(dups, 0, "{agent}/{inc:016x}: {dups} seqs stored twice");
        assert_eq!(
            (v[0], v[v.len() - 1]),
            (1, n),
            "{agent}/{inc:016x}: seqs not contiguous"
        );
        assert!(n > 50, "{agent} published {n} events");
    }
    println!("{total} events stored across 5 shards, each exactly once: {per_shard:?}");

    // One query through any shard covers them all, paged by cursor, in
    // stored-time order, each event addressed by shard and offset.
    let mut reader = BusClient::connect(&client_opts(root, shards[1].grpc, "reader"))
        .await
        .unwrap();
    let all = reader
        .query_all(QueryRequest {
            limit: 1_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let got: BTreeSet<(u32, u64)> = all.iter().map(|e| (e.shard, e.offset)).collect();
    assert_eq!(all.len(), total, "fan-out returned each stored event once");
    assert_eq!(got, by_address);
    assert!(
        all.windows(2).all(|w| w[0].stored_at <= w[1].stored_at),
        "merged by stored time"
    );

    // A shard killed with SIGKILL: a query names it, or with allow_partial
    // returns the others' events and says which shard is missing.
    let mut dead = shards.pop().unwrap();
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let err = reader
        .query_page(QueryRequest {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("shard 4"), "{err}");
    let page = reader
        .query_page(QueryRequest {
            limit: 10_000,
            allow_partial: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.missing_shards, [4]);
    assert_eq!(page.events.len(), total - per_shard[4]);
    drop(dead);
}
