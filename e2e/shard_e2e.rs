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
use amoskys_proto::{
    Control, ControlRequest, ListAgentsRequest, QueryRequest, StatsRequest, TailRequest, control,
};
use common::{BIN, http_get, metric, pki, wait_http_ready};

const AGENTS: usize = 30;
const TOKEN: &str = "shard-e2e-dashboard-token-0123456789";

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
    // Tests in this binary run at once: each call takes its own stretch.
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut out: Vec<u16> = Vec::new();
    let mut held = Vec::new();
    let mut p = 20_000 + (std::process::id() % 3_000) as u16 * 3 + call * 100;
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
            "adminTokenFile: {}\nsharding:\n  peerTlsDir: {}\n  mapReloadInterval: 100ms\n  peerTimeout: 1s\ndashboard:\n  sampleInterval: 250ms\n",
            root.join("admin-token").display(),
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
            .list_agents(ListAgentsRequest {
                local: true,
                allow_partial: false,
            })
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

/// Whichever shard they reach, the registry, stats, controls and the
/// dashboard cover every shard.
async fn one_bus_to_readers(root: &Path, shards: &[Shard]) {
    // Rates settle a few samples after the agents do.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for s in shards {
        let (status, body) = http_get(s.http, "/api/agents", Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let rows = v["agents"].as_array().unwrap();
        assert_eq!(
            rows.len(),
            AGENTS,
            "the dashboard on shard port {} shows every agent",
            s.http
        );
        for r in rows {
            let id = r["agent_id"].as_str().unwrap();
            assert_eq!(
                r["shard"].as_u64().unwrap(),
                u64::from(owner_of(id, 3)),
                "{id}"
            );
            assert_eq!(r["connected"], true, "{id}");
        }
        assert_eq!(v["missing_shards"].as_array().unwrap().len(), 0);
        let (status, body) = http_get(s.http, "/api/overview", Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        let o: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(o["agents_total"].as_u64().unwrap(), AGENTS as u64);
        assert_eq!(o["shards"].as_u64().unwrap(), 3);
        // The rate chart is the whole bus's: 30 agents at 20 synthetic
        // events/s each (plus heartbeats), not this shard's third of it.
        let synthetic: Vec<f64> = o["series"]["by_collector"]["synthetic"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let recent = &synthetic[synthetic.len().saturating_sub(8)..];
        let mean = recent.iter().sum::<f64>() / recent.len().max(1) as f64;
        assert!(
            (450.0..800.0).contains(&mean),
            "shard port {}: synthetic events/s over the last samples {recent:?}",
            s.http
        );
    }
    // The events page, newest first across shards, paged by cursor; an
    // event on another shard opens from its address.
    let mut seen: BTreeSet<(u64, u64)> = BTreeSet::new();
    let mut before = String::new();
    let mut shards_seen = BTreeSet::new();
    let mut last_stored = u64::MAX;
    for _ in 0..3 {
        let path = if before.is_empty() {
            "/api/events?limit=40".to_string()
        } else {
            format!("/api/events?limit=40&before={before}")
        };
        let (status, body) = http_get(shards[2].http, &path, Some(TOKEN));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let events = v["events"].as_array().unwrap();
        assert_eq!(events.len(), 40, "{body}");
        for e in events {
            let shard = e["shard"].as_u64().unwrap();
            let stored = humantime::parse_rfc3339(e["stored_at"].as_str().unwrap())
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            assert!(
                stored <= last_stored,
                "newest first across shards and pages"
            );
            last_stored = stored;
            assert!(
                seen.insert((shard, e["offset"].as_u64().unwrap())),
                "an event on two pages"
            );
            shards_seen.insert(shard);
        }
        before = v["next_before"].as_str().unwrap().to_string();
    }
    assert_eq!(shards_seen.len(), 3, "the page holds every shard's events");
    let &(shard, offset) = seen.iter().find(|(s, _)| *s == 1).unwrap();
    let (status, body) = http_get(
        shards[0].http,
        &format!("/api/event?offset={offset}&shard={shard}"),
        Some(TOKEN),
    );
    assert_eq!(status, 200, "{body}");
    let e: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (e["shard"].as_u64(), e["offset"].as_u64()),
        (Some(1), Some(offset))
    );

    let mut admin = BusClient::connect(&client_opts(root, shards[2].grpc, "admin"))
        .await
        .unwrap();
    let list = admin
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.agents.len(), AGENTS);
    let mut stored = 0;
    for s in shards {
        let mut c = BusClient::connect(&client_opts(root, s.grpc, "admin"))
            .await
            .unwrap();
        let own = c
            .admin
            .stats(StatsRequest {
                local: true,
                allow_partial: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(own.shards.is_empty());
        stored += own.events_stored;
    }
    let all = admin
        .admin
        .stats(StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.shards.len(), 3);
    assert_eq!(
        all.shards.iter().map(|s| s.shard).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(
        all.events_stored >= stored,
        "summed over shards: {} >= {stored}",
        all.events_stored
    );
    assert_eq!(all.connected_agents as usize, AGENTS);

    // A control sent to a shard that does not own the agent reaches it
    // through its owner.
    let target = (0..AGENTS)
        .map(agent_id)
        .find(|id| owner_of(id, 3) == 1)
        .unwrap();
    let r = admin
        .admin
        .control(ControlRequest {
            agent_id: target.clone(),
            control: Some(Control {
                collector: "synthetic".into(),
                action: control::Action::SetInterval as i32,
                interval_ms: 900,
                control_id: 0,
            }),
            requested_by: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.delivered, "{}", r.message);
    assert_eq!(r.shard, 1);
    let t0 = Instant::now();
    loop {
        let list = admin
            .admin
            .list_agents(ListAgentsRequest::default())
            .await
            .unwrap()
            .into_inner();
        let rec = list.agents.iter().find(|a| a.agent_id == target).unwrap();
        if let Some(c) = &rec.last_control
            && c.control_id == r.control_id
        {
            assert!(c.ok, "{}", c.message);
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no ControlResult from {target}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A reader may not read a shard's registry as a peer would.
    let mut reader = BusClient::connect(&client_opts(root, shards[0].grpc, "reader"))
        .await
        .unwrap();
    let e = reader
        .admin
        .list_agents(ListAgentsRequest {
            local: true,
            allow_partial: false,
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("may not call it"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_settle_on_their_owner_shards_and_survive_3_to_5_to_3_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    std::fs::write(root.join("admin-token"), format!("{TOKEN}\n")).unwrap();
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
    one_bus_to_readers(root, &shards).await;
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
        // The agent one_bus_to_readers slowed to one event per 900 ms
        // publishes less, by how soon the agents settled.
        let slowed = (0..AGENTS).map(agent_id).find(|id| owner_of(id, 3) == 1);
        let least = if slowed.as_deref() == Some(agent.as_str()) {
            10
        } else {
            50
        };
        assert!(n > least, "{agent} published {n} events");
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
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("shard 4"), "{err}");
    let page = reader
        .query_page(QueryRequest {
            limit: 100_000,
            allow_partial: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.missing_shards, [4]);
    assert_eq!(page.events.len(), total - per_shard[4]);
    drop(dead);
}

/// Follows a Tail through `port` from the first offset, collecting what it
/// sends and the missing shards it reported.
#[derive(Default)]
struct Tailed {
    events: Vec<amoskys_proto::Event>,
    missing_seen: BTreeSet<u32>,
}

fn follow_tail(
    root: &Path,
    port: u16,
) -> (
    std::sync::Arc<std::sync::Mutex<Tailed>>,
    tokio::task::JoinHandle<()>,
) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Tailed::default()));
    let opts = client_opts(root, port, "reader");
    let out = got.clone();
    let task = tokio::spawn(async move {
        let mut c = BusClient::connect(&opts).await.unwrap();
        let mut stream = c
            .tail(TailRequest {
                allow_partial: true,
                ..Default::default()
            })
            .await
            .unwrap();
        while let Some(r) = stream.message().await.unwrap() {
            let mut t = out.lock().unwrap();
            t.missing_seen.extend(r.missing_shards.iter().copied());
            t.events.extend(r.events);
        }
    });
    (got, task)
}

fn stored_on(s: &Shard) -> f64 {
    metric(s.http, "amoskys_bus_events_stored_total")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_killed_under_load_loses_nothing_and_the_tail_skips_nothing() {
    const N: usize = 12;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    std::fs::write(root.join("admin-token"), format!("{TOKEN}\n")).unwrap();
    let ports: Vec<(u16, u16)> = listen_ports(6).chunks(2).map(|c| (c[0], c[1])).collect();
    let grpc: Vec<u16> = ports.iter().map(|p| p.0).collect();
    let map = map_yaml(1, 3, &grpc);
    let mut shards: Vec<Shard> = (0..3)
        .map(|i| start_shard(root, i, ports[i].0, ports[i].1, &map))
        .collect();
    let (tailed, tail_task) = follow_tail(root, grpc[0]);
    let agents: Vec<AgentProc> = (0..N).map(|i| start_agent(root, i, grpc[1])).collect();
    let owned_by_2: Vec<String> = (0..N)
        .map(agent_id)
        .filter(|id| owner_of(id, 3) == 2)
        .collect();
    assert!(
        !owned_by_2.is_empty(),
        "the golden hash gives shard 2 some of {N} agents"
    );
    let t0 = Instant::now();
    loop {
        let got = connected(root, &shards).await;
        if got.iter().map(BTreeSet::len).sum::<usize>() == N {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "agents did not connect: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGKILL shard 2 under load.
    let victim = shards.pop().unwrap();
    let dir_ports = (victim.grpc, victim.http);
    drop(victim);
    let before: Vec<f64> = shards.iter().map(stored_on).collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (s, b) in shards.iter().zip(&before) {
        let now = stored_on(s);
        assert!(
            now > *b,
            "the live shards' agents keep publishing ({b} -> {now})"
        );
    }
    let mut reader = BusClient::connect(&client_opts(root, grpc[0], "reader"))
        .await
        .unwrap();
    let err = reader
        .query_page(QueryRequest::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shard 2"),
        "a query names the dead shard: {err}"
    );
    let page = reader
        .query_page(QueryRequest {
            allow_partial: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.missing_shards, [2]);
    let t0 = Instant::now();
    while !tailed.lock().unwrap().missing_seen.contains(&2) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the tail did not report shard 2 missing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Through the live shards, the dead shard's agents are known but not
    // connected: they spool.
    let (status, body) = http_get(shards[1].http, "/api/agents", Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["missing_shards"],
        serde_json::json!([2]),
        "the dashboard names the missing shard"
    );

    // Shard 2 comes back on its data: its agents return to it.
    shards.push(start_shard(root, 2, dir_ports.0, dir_ports.1, &map));
    let t0 = Instant::now();
    loop {
        let got = connected(root, &shards).await;
        let want: BTreeSet<String> = owned_by_2.iter().cloned().collect();
        if got[2] == want {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "shard 2's agents did not return: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for a in &agents {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(a.0.id() as i32, libc::SIGTERM) };
    }
    for mut a in agents {
        let st = a.0.wait().unwrap();
        assert!(st.success(), "agent exited with {st}");
    }

    // Nothing lost: per (agent, incarnation) seqs 1..=n, once.
    let all = reader
        .query_all(QueryRequest {
            limit: 5_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seqs: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
    for e in all.iter().filter(|e| e.seq > 0) {
        seqs.entry((e.agent_id.clone(), e.incarnation))
            .or_default()
            .push(e.seq);
    }
    assert_eq!(seqs.len(), N);
    for ((agent, _), v) in &seqs {
        let n = v.len() as u64;
        assert_eq!(
            (v.iter().min(), v.iter().max()),
            (Some(&1), Some(&n)),
            "{agent}: a gap or a repeat"
        );
        let unique: BTreeSet<_> = v.iter().collect();
        assert_eq!(unique.len() as u64, n, "{agent}: a seq stored twice");
    }
    let want: BTreeSet<(u32, u64)> = all.iter().map(|e| (e.shard, e.offset)).collect();

    // The tail through shard 0 skipped nothing of shard 2: what it stored
    // before the kill, and what it took after, all arrived, once.
    let t0 = Instant::now();
    loop {
        let got: Vec<(u32, u64)> = tailed
            .lock()
            .unwrap()
            .events
            .iter()
            .map(|e| (e.shard, e.offset))
            .collect();
        let set: BTreeSet<(u32, u64)> = got.iter().copied().collect();
        assert_eq!(set.len(), got.len(), "the tail sent an event twice");
        if set == want {
            break;
        }
        let lacking = want.difference(&set).count();
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the tail lacks {lacking} of {} stored events",
            want.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "shard 2 killed under load: {} events, {} agents, tail complete",
        want.len(),
        N
    );
    tail_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_owner_killed_mid_move_leaves_no_duplicate_visible_to_readers() {
    const N: usize = 12;
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    std::fs::write(root.join("admin-token"), format!("{TOKEN}\n")).unwrap();
    let ports: Vec<(u16, u16)> = listen_ports(8).chunks(2).map(|c| (c[0], c[1])).collect();
    let grpc: Vec<u16> = ports.iter().map(|p| p.0).collect();
    let map3 = map_yaml(1, 3, &grpc[..3]);
    let mut shards: Vec<Shard> = (0..3)
        .map(|i| start_shard(root, i, ports[i].0, ports[i].1, &map3))
        .collect();
    // 3 -> 4 moves some agents to shard 3; their old owner will die with
    // the map change, before it can hand them over. The agents bootstrap
    // through another shard, which routes them to shard 3 meanwhile.
    let movers: Vec<usize> = (0..N).filter(|&i| owner_of(&agent_id(i), 4) == 3).collect();
    assert!(
        !movers.is_empty(),
        "the golden hash moves some of {N} agents to shard 3"
    );
    let victim = owner_of(&agent_id(movers[0]), 3) as usize;
    let bootstrap = (victim + 1) % 3;
    let agents: Vec<AgentProc> = (0..N)
        .map(|i| start_agent(root, i, grpc[bootstrap]))
        .collect();
    settle_n(root, &shards, 3, N).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let map4 = map_yaml(2, 4, &grpc);
    shards.push(start_shard(root, 3, ports[3].0, ports[3].1, &map4));
    set_map(&shards[..3], &map4);
    shards[victim].child.kill().unwrap();
    shards[victim].child.wait().unwrap();
    // The victim's movers reach shard 3 while it is dead.
    let want: BTreeSet<String> = movers
        .iter()
        .filter(|&&i| owner_of(&agent_id(i), 3) as usize == victim)
        .map(|&i| agent_id(i))
        .collect();
    let t0 = Instant::now();
    loop {
        let on3 = connected(root, &shards[3..]).await.remove(0);
        if want.is_subset(&on3) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "movers {want:?} did not reach shard 3 while their old owner was dead: {on3:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    // It comes back on its data and the new map.
    let (g, h) = ports[victim];
    shards[victim] = start_shard(root, victim, g, h, &map4);
    settle_n(root, &shards, 4, N).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for a in &agents {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(a.0.id() as i32, libc::SIGTERM) };
    }
    for mut a in agents {
        assert!(a.0.wait().unwrap().success());
    }

    // What the shards store may hold a batch twice (in flight to the dead
    // owner, resent to the new one); what readers get holds it once.
    let mut stored = 0usize;
    for s in &shards {
        stored += BusClient::connect(&client_opts(root, s.grpc, "reader"))
            .await
            .unwrap()
            .query_all(QueryRequest {
                limit: 5_000,
                local: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .len();
    }
    let unverified: f64 = shards
        .iter()
        .map(|s| metric(s.http, "amoskys_bus_shard_move_unverified_total"))
        .sum();
    let mut reader = BusClient::connect(&client_opts(root, grpc[1], "reader"))
        .await
        .unwrap();
    let all = reader
        .query_all(QueryRequest {
            limit: 5_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut seqs: BTreeMap<(String, u64), Vec<u64>> = BTreeMap::new();
    for e in all.iter().filter(|e| e.seq > 0) {
        seqs.entry((e.agent_id.clone(), e.incarnation))
            .or_default()
            .push(e.seq);
    }
    assert_eq!(seqs.len(), N);
    for ((agent, _), mut v) in seqs {
        v.sort_unstable();
        let n = v.len() as u64;
        assert_eq!(
            (v[0], v[v.len() - 1]),
            (1, n),
            "{agent}: lost or repeated seqs"
        );
        assert!(
            v.windows(2).all(|w| w[0] < w[1]),
            "{agent}: a duplicate reached the reader"
        );
    }
    println!(
        "old owner (shard {victim}) killed mid-move: {} moves unverified, {} copies stored twice, {} events read once each",
        unverified,
        stored - all.len(),
        all.len()
    );
    assert!(
        unverified >= 1.0,
        "the new owner could not ask the dead shard and said so"
    );
}

/// Waits until every one of `n` agents streams to its owner under `active`.
async fn settle_n(root: &Path, shards: &[Shard], active: u32, n: usize) {
    let t0 = Instant::now();
    let mut want = vec![BTreeSet::new(); shards.len()];
    for i in 0..n {
        want[owner_of(&agent_id(i), active) as usize].insert(agent_id(i));
    }
    loop {
        let got = connected(root, shards).await;
        if got == want {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "agents did not settle under {active} shards:\n got  {got:?}\n want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_cli_names_each_agents_owner_as_the_bus_routes_it() {
    let ids: Vec<String> = (0..20).map(agent_id).collect();
    let mut args = vec!["shards", "owner", "--active", "5"];
    args.extend(ids.iter().map(String::as_str));
    let (ok, out) = common::cli(&args);
    assert!(ok, "{out}");
    let got: Vec<String> = out.lines().map(str::to_string).collect();
    let want: Vec<String> = ids
        .iter()
        .map(|id| format!("{id} {}", owner_of(id, 5)))
        .collect();
    assert_eq!(got, want);
    let (ok, out) = common::cli(&["shards", "owner", "--active", "17", "x"]);
    assert!(!ok && out.contains("--active: 17"), "{out}");
}
