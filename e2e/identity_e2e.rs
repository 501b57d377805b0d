#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed setup is a failed test
//! Agent identity end to end, with real `amoskys bus` and `amoskys agent`
//! processes: a wiped spool, two agents with one id, a bus restored from an
//! older backup, and a crash sweep with SIGKILL at random moments, each
//! checked by the history checker (`common/history.rs`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use amoskys_client::BusClient;
use amoskys_proto::event::Payload;
use amoskys_proto::{
    AgentRecord, Event, GapEvent, IncarnationEvent, ListAgentsRequest, QueryRequest,
};
use common::history::{SpoolView, check};
use common::{BIN, Bus, cli, free_port, http_get, metric, opts, pki, start_bus_with};
use rand::Rng;

fn agent_config(rate: u32) -> String {
    format!(
        "heartbeatInterval: 1s\nshutdownGrace: 30s\nbatch:\n  maxDelay: 20ms\ncollectors:\n  process:\n    enabled: false\n  inventory:\n    enabled: false\n  synthetic:\n    enabled: true\n    rate: {rate}\n"
    )
}

/// An `amoskys agent` process with its own spool and log file.
struct AgentProc {
    child: Option<Child>,
    id: String,
    cfg: PathBuf,
    bus: u16,
    spool: PathBuf,
    log: PathBuf,
    http: u16,
}

impl AgentProc {
    fn start(root: &Path, bus: u16, id: &str, name: &str, rate: u32) -> Self {
        let cfg = root.join(format!("{name}.yaml"));
        std::fs::write(&cfg, agent_config(rate)).unwrap();
        let spool = root.join(format!("spool-{name}"));
        let log = root.join(format!("{name}.log"));
        let mut a = Self {
            child: None,
            id: id.into(),
            cfg,
            bus,
            spool,
            log,
            http: free_port(),
        };
        a.spawn();
        a
    }

    fn spawn(&mut self) {
        let (cfg, bus) = (&self.cfg, self.bus);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(BIN)
            .arg("agent")
            .arg("--config")
            .arg(cfg)
            .args(["--bus", &format!("https://127.0.0.1:{bus}")])
            .arg("--tls-dir")
            .arg(cfg.parent().unwrap().join("pki/agent"))
            .arg("--spool-dir")
            .arg(&self.spool)
            .args(["--agent-id", &self.id])
            .args(["--http", &format!("127.0.0.1:{}", self.http)])
            .env("AMOSKYS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM: the agent sends what it holds, then exits. Waits for the
    /// agent to be up first: it handles SIGTERM once it has started (its
    /// HTTP port answers), and before that the signal just ends it.
    fn terminate(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(self.http, "/healthz", None).0 != 200 {
            assert!(Instant::now() < deadline, "{} never came up", self.id);
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let c = self.child.as_ref().expect("agent running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }

    fn wait(&mut self) -> std::process::ExitStatus {
        self.child.take().expect("agent running").wait().unwrap()
    }

    fn stop(&mut self) -> std::process::ExitStatus {
        self.terminate();
        self.wait()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn all_events(bus: &Bus, root: &Path) -> Vec<Event> {
    BusClient::connect(&opts(bus, root, "reader"))
        .await
        .unwrap()
        .query_all(QueryRequest {
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
}

/// The bus registry's record of `id`, as Admin.ListAgents returns it.
async fn agent_record(bus: &Bus, root: &Path, id: &str) -> AgentRecord {
    BusClient::connect(&opts(bus, root, "admin"))
        .await
        .unwrap()
        .admin
        .list_agents(ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
        .into_iter()
        .find(|a| a.agent_id == id)
        .unwrap_or_else(|| panic!("no record of {id}"))
}

async fn until<T>(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn synthetic_seqs(events: &[Event], agent: &str, incarnation: u64) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e.agent_id == agent && e.incarnation == incarnation && e.seq > 0)
        .map(|e| e.seq)
        .collect()
}

#[test]
fn the_checker_finds_duplicates_missing_acks_and_unaccounted_loss() {
    let ev = |seq: u64| Event {
        agent_id: "a".into(),
        incarnation: 7,
        seq,
        payload: Some(Payload::Synthetic(Default::default())),
        ..Default::default()
    };
    let spool = |acked: u64, held: &[u64], wiped: bool| SpoolView {
        agent_id: "a".into(),
        incarnation: 7,
        next_seq: 11,
        acked_seq: acked,
        held: held.iter().copied().collect(),
        wiped,
    };
    // 1..=8 stored, 9 and 10 still spooled: clean.
    let stored: Vec<Event> = (1..=8).map(ev).collect();
    let r = check(&stored, &[spool(8, &[9, 10], false)]);
    assert!(r.ok(), "{r}");
    assert_eq!((r.stored, r.still_spooled), (8, 2));
    // Seq 3 twice, seq 5 acked and missing, 9 neither stored nor spooled.
    let bad: Vec<Event> = [1, 2, 3, 3, 4, 6, 7, 8].into_iter().map(ev).collect();
    let r = check(&bad, &[spool(8, &[10], false)]);
    assert_eq!(
        (r.duplicates, r.acked_missing, r.unaccounted),
        (1, 1, 1),
        "{r}"
    );
    assert!(!r.ok());
    // Gap events covering 5 and 9 account for both.
    let gap = |seq: u64| Event {
        payload: Some(Payload::Gap(GapEvent {
            dropped: 1,
            first_seq: seq,
            last_seq: seq,
            ..Default::default()
        })),
        ..ev(0)
    };
    let mut gapped: Vec<Event> = [1, 2, 3, 4, 6, 7, 8].into_iter().map(ev).collect();
    gapped.extend([gap(5), gap(9)]);
    let r = check(&gapped, &[spool(8, &[10], false)]);
    assert!(r.ok(), "{r}");
    assert_eq!((r.in_gaps, r.gap_events), (2, 2), "{r}");
    // A wiped spool's unsent events count as lost with it only when a new
    // incarnation announced the wipe.
    let stored: Vec<Event> = (1..=8).map(ev).collect();
    let r = check(&stored, &[spool(8, &[9, 10], true)]);
    assert_eq!(r.unannounced_wipes, 1, "{r}");
    let mut announced = stored.clone();
    announced.push(Event {
        agent_id: "a".into(),
        incarnation: 8,
        payload: Some(Payload::IncarnationStarted(IncarnationEvent {
            incarnation: 8,
            previous_incarnation: 7,
            ..Default::default()
        })),
        ..Default::default()
    });
    let r = check(&announced, &[spool(8, &[9, 10], true)]);
    assert!(r.ok(), "{r}");
    assert_eq!(r.lost_with_wiped_spool, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_spool_starts_a_new_incarnation_whose_events_are_all_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let bus = start_bus_with(root, "batch", None, &[]);
    let mut agent = AgentProc::start(root, bus.grpc, "wiped", "wiped", 400);
    until("first events", Duration::from_secs(20), async || {
        (all_events(&bus, root).await.len() > 400).then_some(())
    })
    .await;
    assert!(agent.stop().success());
    let old = SpoolView::read(&agent.spool, "wiped", true);

    // A re-imaged node: same agent id, empty spool.
    std::fs::rename(&agent.spool, root.join("spool-wiped-old")).unwrap();
    agent.spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(agent.stop().success());
    let new = SpoolView::read(&agent.spool, "wiped", false);
    assert_ne!(new.incarnation, old.incarnation);
    assert!(new.next_seq > 200, "the new life produced events: {new:?}");

    let events = all_events(&bus, root).await;
    let fresh = synthetic_seqs(&events, "wiped", new.incarnation);
    assert_eq!(
        fresh,
        (1..new.next_seq).collect::<Vec<_>>(),
        "every event of the new incarnation is stored, once"
    );
    let announced: Vec<&IncarnationEvent> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::IncarnationStarted(i)) => Some(i),
            _ => None,
        })
        .collect();
    assert_eq!(announced.len(), 1, "the new incarnation is announced once");
    assert_eq!(
        (announced[0].incarnation, announced[0].previous_incarnation),
        (new.incarnation, old.incarnation)
    );
    assert_eq!(announced[0].previous_last_seq, old.next_seq - 1);
    let r = check(&events, &[old, new.clone()]);
    println!("wiped spool: {r}");
    assert!(r.ok(), "{r}");

    let rec = agent_record(&bus, root, "wiped").await;
    assert_eq!((rec.incarnation, rec.incarnations), (new.incarnation, 2));
    assert_eq!(rec.last_seq, new.next_seq - 1);
    assert_eq!(
        metric(bus.http, "amoskys_bus_agent_incarnations_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_id_one_is_refused_and_no_event_of_either_is_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let bus = start_bus_with(root, "batch", None, &[]);
    let mut first = AgentProc::start(root, bus.grpc, "cloned-host", "first", 400);
    until(
        "the first agent's events",
        Duration::from_secs(20),
        async || (all_events(&bus, root).await.len() > 100).then_some(()),
    )
    .await;
    let mut clone = AgentProc::start(root, bus.grpc, "cloned-host", "clone", 400);
    until("the clone's refusal", Duration::from_secs(20), async || {
        (metric(
            clone.http,
            "amoskys_agent_connect_errors_total{reason=\"refused\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert!(metric(bus.http, "amoskys_bus_streams_refused_total") >= 1.0);
    let log = clone.log_text();
    assert!(
        log.contains("cloned-host")
            && log.contains("already has a live stream from incarnation")
            && log.contains("two agents share one agent id")
            // Both peers by address and certificate, so the two hosts can be found.
            && log.matches("peer 127.0.0.1:").count() >= 2,
        "the refused agent logs why: {log}"
    );
    // The clone keeps spooling while it is refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rec = agent_record(&bus, root, "cloned-host").await;
    assert!(rec.refused_streams >= 1, "{rec:?}");
    assert!(
        rec.last_refusal.contains("two agents share one agent id"),
        "{rec:?}"
    );

    // Once the first is gone the clone is alone, gets in and delivers all.
    assert!(first.stop().success());
    assert!(clone.stop().success(), "the clone drains and exits 0");
    let spools = [
        SpoolView::read(&first.spool, "cloned-host", false),
        SpoolView::read(&clone.spool, "cloned-host", false),
    ];
    assert_ne!(spools[0].incarnation, spools[1].incarnation);
    let events = all_events(&bus, root).await;
    for s in &spools {
        assert!(s.held.is_empty(), "{s:?} drained");
        assert_eq!(
            synthetic_seqs(&events, "cloned-host", s.incarnation),
            (1..s.next_seq).collect::<Vec<_>>(),
            "incarnation {:016x}: every event stored once",
            s.incarnation
        );
    }
    let r = check(&events, &spools);
    println!("two agents, one id: {r}");
    assert!(r.ok(), "{r}");
    assert_eq!(r.stored, r.produced, "nothing of either is lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_restored_from_an_older_backup_records_the_gap_and_the_agent_continues() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    pki(&root.join("pki"));
    let ports = (free_port(), free_port());
    let (bus, backup_dir) = common::start_bus_with_backups(root, Some(ports));
    let mut agent = AgentProc::start(root, bus.grpc, "restored", "restored", 400);
    until(
        "events before the backup",
        Duration::from_secs(20),
        async || (all_events(&bus, root).await.len() > 300).then_some(()),
    )
    .await;
    let (ok, out) = common::backup_now(bus.grpc, &root.join("pki/admin"));
    assert!(ok, "{out}");
    let in_backup = all_events(&bus, root).await.len();
    // More is acked after the backup; then the bus's volume is lost.
    until(
        "events after the backup",
        Duration::from_secs(20),
        async || (all_events(&bus, root).await.len() > in_backup + 600).then_some(()),
    )
    .await;
    agent.kill9();
    let before = SpoolView::read(&agent.spool, "restored", false);
    drop(bus);
    let (ok, out) = cli(&[
        "backup",
        "restore",
        "--dir",
        &s(&backup_dir),
        "--data-dir",
        &s(&root.join("restored/data")),
    ]);
    assert!(ok, "{out}");
    std::os::unix::fs::symlink(root.join("pki"), root.join("restored/pki")).unwrap();
    let bus = start_bus_with(&root.join("restored"), "batch", Some(ports), &[]);
    let held = synthetic_seqs(
        &all_events(&bus, &root.join("restored")).await,
        "restored",
        before.incarnation,
    );
    let held_max = *held.iter().max().unwrap();
    assert!(
        held_max < before.acked_seq,
        "the backup is older than the acks"
    );

    agent.bus = bus.grpc;
    agent.spawn();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(agent.stop().success());
    let after = SpoolView::read(&agent.spool, "restored", false);
    let events = all_events(&bus, &root.join("restored")).await;
    let gaps: Vec<&GapEvent> = events
        .iter()
        .filter(|e| e.seq == 0 && e.collector == "bus")
        .filter_map(|e| match &e.payload {
            Some(Payload::Gap(g)) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(gaps.len(), 1, "one gap event: {gaps:?}");
    assert_eq!(
        (gaps[0].first_seq, gaps[0].last_seq, gaps[0].dropped),
        (held_max + 1, before.acked_seq, before.acked_seq - held_max)
    );
    assert!(
        gaps[0].reason.contains("no longer holds"),
        "{}",
        gaps[0].reason
    );
    assert_eq!(
        metric(bus.http, "amoskys_bus_lost_total"),
        (before.acked_seq - held_max) as f64
    );
    // The agent went on from its own spool: everything after the gap is there.
    let seqs: BTreeSet<u64> = synthetic_seqs(&events, "restored", after.incarnation)
        .into_iter()
        .collect();
    assert_eq!(
        seqs.range(before.acked_seq + 1..).count() as u64,
        after.next_seq - 1 - before.acked_seq
    );
    let r = check(&events, &[after]);
    println!("restored bus: {r}");
    assert!(r.ok(), "{r}");
    assert_eq!(r.in_gaps, before.acked_seq - held_max);
}

/// Kills per run: a few in the test, 50 in `e2e/crash-sweep.sh`.
fn sweep_kills() -> usize {
    std::env::var("AMOSKYS_SWEEP_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_sweep_kill_9_of_bus_and_agents_at_random_loses_nothing_unaccounted() {
    let kills = sweep_kills();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    pki(&root.join("pki"));
    let ports = (free_port(), free_port());
    let mut bus = Some(start_bus_with(root, "batch", Some(ports), &[]));
    let ids = ["sweep-0", "sweep-1", "sweep-2"];
    let mut agents: Vec<AgentProc> = ids
        .iter()
        .map(|id| AgentProc::start(root, ports.0, id, id, 300))
        .collect();
    let mut wiped: Vec<(PathBuf, String)> = Vec::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut rng = rand::rng();
    let (wipe_at, clone_at) = (kills / 3, (2 * kills) / 3);
    let t0 = Instant::now();
    for k in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..1500))).await;
        if k == wipe_at {
            let a = &mut agents[1];
            a.kill9();
            let aside = root.join(format!("spool-wiped-{k}"));
            std::fs::rename(&a.spool, &aside).unwrap();
            wiped.push((aside, a.id.clone()));
            a.spawn();
            *counts.entry("agent kill + wipe").or_default() += 1;
            continue;
        }
        if k == clone_at {
            agents.push(AgentProc::start(
                root,
                ports.0,
                ids[2],
                "sweep-2-clone",
                300,
            ));
            *counts.entry("clone started").or_default() += 1;
        }
        // A third of the kills hit the bus, the rest one of the agents.
        if rng.random_bool(1.0 / 3.0) {
            // The bus: SIGKILL, sometimes a pause, then the same ports.
            drop(bus.take());
            if rng.random_bool(0.5) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..1000))).await;
            }
            bus = Some(start_bus_with(root, "batch", Some(ports), &[]));
            *counts.entry("bus kill").or_default() += 1;
        } else {
            let n = agents.len();
            let a = &mut agents[rng.random_range(0..n)];
            a.kill9();
            a.spawn();
            *counts.entry("agent kill").or_default() += 1;
        }
    }
    // Everyone hands over what they hold; the clone gets in once the agent
    // it shares an id with is gone.
    let bus = bus.unwrap();
    for a in &agents {
        a.terminate();
    }
    for a in agents.iter_mut() {
        let st = a.wait();
        assert!(st.success(), "{} exits 0 after draining: {st:?}", a.id);
    }
    let mut spools: Vec<SpoolView> = agents
        .iter()
        .map(|a| SpoolView::read(&a.spool, &a.id, false))
        .collect();
    for s in &spools {
        assert!(
            s.held.is_empty(),
            "{} drained: {} held",
            s.agent_id,
            s.held.len()
        );
    }
    spools.extend(wiped.iter().map(|(dir, id)| SpoolView::read(dir, id, true)));
    let events = all_events(&bus, root).await;
    let refusals = agents
        .iter()
        .map(|a| a.log_text().matches("already has a live stream").count())
        .sum::<usize>();
    let r = check(&events, &spools);
    println!(
        "crash sweep: {kills} kills in {:.1}s {counts:?}; refused streams logged: {refusals}\n{r}",
        t0.elapsed().as_secs_f64()
    );
    assert!(r.ok(), "{r}");
    assert!(r.stored > 0 && r.incarnation_events >= 1, "{r}");
    assert!(refusals >= 1, "the clone and its twin never overlapped");
}
