//! The detector: evaluates every event this shard stores against the
//! detection rules and writes alerts into the same store.
//!
//! It follows committed groups as the live tail does (the writer's
//! broadcast, the store when it falls behind) from its own cursor, kept in
//! the store with the engine's windows, so a restart resumes where it
//! stopped and no stored event goes unevaluated. Its alerts go through the
//! writer like an agent's batches, under a reserved agent id and seqs
//! derived from the source offsets: evaluating events again after a crash
//! produces alerts the writer already holds, and drops. The cursor moves
//! only past events whose alerts are durable. It runs on a thread of its
//! own and never holds ingest up: when it cannot keep up it lags, and says
//! so in `detect_lag_events`.
//!
//! Rules come from a directory of YAML rule files, re-read when a file
//! changes and swapped in whole; a rule that does not compile or fails one
//! of its inline tests is not loaded (logged with the position, counted),
//! and the others keep working.

mod saver;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use amoskys_detect::engine::Changes;
use amoskys_detect::{
    CompiledRule, Decision, DetectState, Engine, RuleActivity, RuleSet, RuleStatus, TestOutcome,
    compile, detector_agent_id, parse_rule_file, run_tests,
};
use amoskys_proto::Event;
use amoskys_proto::event::Payload;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};
use tracing::{info, warn};

use crate::config::DetectionConfig;
use crate::metrics::{RuleLabel, RuleReasonLabel, RuleSeverityLabel};
use crate::service::BusState;
use crate::writer::{WriteRequest, WriterMsg, now_ns};

/// Events read from the store at a time while catching up.
const READ: usize = 1024;
/// How often the engine's figures are carried into the metrics.
const STATS: Duration = Duration::from_millis(100);
/// How long the detector waits for a new group before it looks again.
const IDLE: Duration = Duration::from_millis(100);
/// CEL runs a rule needs before its mean cost is judged against the budget.
const BUDGET_MIN_RUNS: u64 = 100;

/// A checkpoint that took this long keeps the next one at least this many
/// times as far away: saving never takes more than about 2 % of the
/// detector's time, however many windows are open.
const CHECKPOINT_SPACING: u32 = 50;

/// What is saved in the store under one key: where to resume, the clock,
/// and each rule's counts. The windows are saved beside it, one key each,
/// and only those that changed since the last save (`Store::save_detect`);
/// checkpoints from before that held every window in `state`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    cursor: u64,
    state: DetectState,
    /// What each rule matched up to `cursor`, so a rule's 24-hour count
    /// survives a restart (absent in checkpoints from before it).
    #[serde(default)]
    activity: HashMap<String, RuleActivity>,
    /// The windows are in their own keys (absent in older checkpoints).
    #[serde(default)]
    windows_apart: bool,
}

/// The head as saved: borrowed, so nothing is copied to be encoded.
#[derive(Serialize)]
struct CheckpointRef<'a> {
    cursor: u64,
    state: &'a DetectState,
    activity: &'a HashMap<String, RuleActivity>,
    windows_apart: bool,
}

/// Store keys of the windows: a dedup window by its fingerprint, a
/// threshold window by its rule and key.
const OPEN_KEY: u8 = b'o';
const WINDOW_KEY: u8 = b'w';

fn window_key(kind: u8, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(kind);
    k.extend_from_slice(key.as_bytes());
    k
}

/// A save: the head (cursor, clock, counts; `windows_apart`) and each
/// changed window's key with its value, `None` to delete it (closed, or a
/// stale key from before).
type Save = (Vec<u8>, Vec<(Vec<u8>, Option<Vec<u8>>)>);

fn encode_save(
    cursor: u64,
    changes: &Changes<'_>,
    stale: Vec<Vec<u8>>,
    activity: &HashMap<String, RuleActivity>,
) -> Result<Save, serde_json::Error> {
    let mut windows: Vec<(Vec<u8>, Option<Vec<u8>>)> =
        stale.into_iter().map(|k| (k, None)).collect();
    for (k, v) in &changes.open {
        windows.push((
            window_key(OPEN_KEY, k),
            v.map(serde_json::to_vec).transpose()?,
        ));
    }
    for (k, v) in &changes.windows {
        windows.push((
            window_key(WINDOW_KEY, k),
            v.map(serde_json::to_vec).transpose()?,
        ));
    }
    let head = serde_json::to_vec(&CheckpointRef {
        cursor,
        state: &DetectState {
            clock: changes.clock,
            ..Default::default()
        },
        activity,
        windows_apart: true,
    })?;
    Ok((head, windows))
}

/// Where a detector resumes: the saved checkpoint with its windows
/// restored, and saved window keys to delete at the next save.
struct Resume {
    /// Nothing was saved: the detector's first start, at the store's end
    /// (rules apply from when they are turned on; `amoskys rules test
    /// --bus` looks back).
    fresh: bool,
    checkpoint: Checkpoint,
    stale: Vec<Vec<u8>>,
}

fn resume(store: &crate::store::Store) -> Resume {
    let saved = match store.detect_state() {
        Ok(Some(bytes)) => match serde_json::from_slice::<Checkpoint>(&bytes) {
            Ok(c) => Some(c),
            Err(e) => {
                // Unreadable state: resume from the oldest stored event
                // rather than skip any; alerts already written are
                // dropped by the writer as duplicates.
                warn!(error = %e, "the detector's saved state is unreadable; evaluating the store from its start");
                Some(Checkpoint::default())
            }
        },
        Ok(None) => None,
        Err(e) => {
            warn!(error = %e, "cannot read the detector's saved state; evaluating the store from its start");
            Some(Checkpoint::default())
        }
    };
    let fresh = saved.is_none();
    let mut checkpoint = saved.unwrap_or(Checkpoint {
        cursor: store.next_offset(),
        windows_apart: true,
        ..Default::default()
    });
    // Saved windows: in their own keys, or (older checkpoints) all in the
    // head, in which case any keys left over are stale.
    let stored = store.detect_windows().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the detector's saved windows; they start empty");
        Vec::new()
    });
    let stale = if checkpoint.windows_apart {
        restore_windows(&mut checkpoint.state, stored)
    } else {
        stored.into_iter().map(|(k, _)| k).collect()
    };
    Resume {
        fresh,
        checkpoint,
        stale,
    }
}

/// Puts the saved windows into `state`; the keys of any that cannot be read
/// are returned, to be deleted at the next save.
fn restore_windows(state: &mut DetectState, saved: Vec<crate::store::SavedWindow>) -> Vec<Vec<u8>> {
    let mut bad = Vec::new();
    for (k, v) in saved {
        let key = std::str::from_utf8(k.get(1..).unwrap_or_default()).map(str::to_string);
        let ok = match (k.first(), key) {
            (Some(&OPEN_KEY), Ok(key)) => serde_json::from_slice(&v)
                .map(|o| state.open.insert(key, o))
                .is_ok(),
            (Some(&WINDOW_KEY), Ok(key)) => serde_json::from_slice(&v)
                .map(|w| state.windows.insert(key, w))
                .is_ok(),
            _ => false,
        };
        if !ok {
            warn!(key = %String::from_utf8_lossy(&k), "a saved detector window is unreadable; it is dropped");
            bad.push(k);
        }
    }
    bad
}

/// Rule files in `dir`: `*.yaml` and `*.yml`, by name.
fn rule_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    files
}

/// A stamp of the directory's rule files; a change means a reload.
fn stamp(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    rule_files(dir)
        .into_iter()
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        })
        .collect()
}

/// One rule file: its name, and its text or why it could not be read.
type Source = (String, Result<String, String>);

/// The rule files in `dir`, read.
fn dir_sources(dir: &Path) -> Vec<Source> {
    rule_files(dir)
        .into_iter()
        .map(|path| {
            let file = path.display().to_string();
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{file}: {e}"));
            (file, text)
        })
        .collect()
}

/// The digest of a rule set as [`amoskys_detect::rule_set_digest`] makes it
/// (an unreadable file counts as empty: it changes when it can be read).
fn digest_of(sources: &[Source]) -> String {
    amoskys_detect::rule_set_digest(sources.iter().map(|(_, t)| t.as_deref().unwrap_or("")))
}

/// Reads, compiles and tests every rule in `dir`. Only rules that compiled
/// and passed all their tests are in the set; every rule has a status.
#[cfg(test)]
fn load_rules(dir: &Path) -> (RuleSet, Vec<RuleStatus>) {
    let (set, mut statuses) = load_sources(dir_sources(dir));
    if !dir.is_dir() {
        statuses.insert(0, not_a_directory(dir));
    }
    (set, statuses)
}

fn not_a_directory(dir: &Path) -> RuleStatus {
    RuleStatus {
        name: dir.display().to_string(),
        file: dir.display().to_string(),
        loaded: false,
        error: "detection.rulesDir: not a directory".into(),
        tests: 0,
        tests_passed: 0,
    }
}

/// Compiles and tests every rule in `sources`, as [`load_rules`] does.
fn load_sources(sources: Vec<Source>) -> (RuleSet, Vec<RuleStatus>) {
    let env = amoskys_detect::compile::env();
    let mut loaded: Vec<Arc<CompiledRule>> = Vec::new();
    let mut statuses = Vec::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    for (file, text) in sources {
        let docs = text.and_then(|text| parse_rule_file(&file, &text).map_err(|e| e.to_string()));
        let docs = match docs {
            Ok(d) => d,
            Err(error) => {
                statuses.push(RuleStatus {
                    name: file.clone(),
                    file,
                    loaded: false,
                    error,
                    tests: 0,
                    tests_passed: 0,
                });
                continue;
            }
        };
        for doc in docs {
            let name = doc.qualified_name();
            let mut status = RuleStatus {
                name: name.clone(),
                file: file.clone(),
                loaded: false,
                error: String::new(),
                tests: doc.spec.tests.len(),
                tests_passed: 0,
            };
            if let Some(first) = seen.get(&name) {
                status.error = format!("a rule named {name} is already loaded from {first}");
                statuses.push(status);
                continue;
            }
            match compile(&doc, &env) {
                Err(e) => status.error = e.to_string(),
                Ok(rule) => {
                    let rule = Arc::new(rule);
                    let outcomes = run_tests(&doc, &rule, &env);
                    status.tests_passed = outcomes.iter().filter(|o| o.passed).count();
                    let failed: Vec<&TestOutcome> = outcomes.iter().filter(|o| !o.passed).collect();
                    if failed.is_empty() {
                        status.loaded = true;
                        seen.insert(name, file.clone());
                        loaded.push(rule);
                    } else {
                        status.error = failed
                            .iter()
                            .map(|o| format!("test {:?}: {}", o.name, o.message))
                            .collect::<Vec<_>>()
                            .join("; ");
                    }
                }
            }
            statuses.push(status);
        }
    }
    (RuleSet::new(loaded, env), statuses)
}

/// Counter values last carried into the metrics, per rule.
#[derive(Default)]
struct Reported {
    rules: HashMap<String, amoskys_detect::RuleStats>,
    events: u64,
    without_cel: u64,
}

/// Loads the rules and the saved cursor, then runs the detector on a
/// thread of its own until the bus stops; join it before closing the store.
pub fn spawn(
    state: Arc<BusState>,
    cfg: DetectionConfig,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let handle = tokio::runtime::Handle::current();
    // Subscribe before reading the cursor so no group falls in between.
    let live = state.tail.subscribe();
    let detector = Detector::start(state, cfg, handle, live);
    std::thread::Builder::new()
        .name("amoskys-detect".into())
        .stack_size(amoskys_detect::compile::RULE_STACK_BYTES)
        .spawn(move || detector.run())
}

struct Detector {
    state: Arc<BusState>,
    cfg: DetectionConfig,
    rt: tokio::runtime::Handle,
    live: broadcast::Receiver<Arc<Vec<Event>>>,
    engine: Engine,
    cursor: u64,
    stamp: Vec<(PathBuf, SystemTime, u64)>,
    /// Digest of the rule set last handed over by the operator, as last seen.
    pushed_seen: Option<String>,
    reported: Reported,
    /// Saved window keys to delete at the next save (stale or unreadable).
    stale: Vec<Vec<u8>>,
    /// Writes the checkpoints; None if its thread could not start (then
    /// they are written here).
    saver: Option<saver::Saver>,
    /// Stored time of the newest evaluated event.
    newest: i64,
    agent_id: String,
}

impl Detector {
    fn start(
        state: Arc<BusState>,
        cfg: DetectionConfig,
        rt: tokio::runtime::Handle,
        live: broadcast::Receiver<Arc<Vec<Event>>>,
    ) -> Self {
        let Resume {
            fresh,
            checkpoint:
                Checkpoint {
                    cursor,
                    state: s,
                    activity,
                    windows_apart,
                },
            stale,
        } = resume(&state.store);
        *state
            .rule_activity
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = activity;
        let cursor = cursor.max(state.store.first_offset());
        state
            .store
            .hold_retention(crate::store::Hold::Detect, cursor);
        let shard = state.shards.index;
        let mut engine = Engine::new(Arc::new(RuleSet::default()), shard, s);
        if !windows_apart {
            // The first save writes every window to its own key.
            engine.mark_all_changed();
        }
        let saver = saver::Saver::start(state.store.clone(), state.metrics.clone())
            .map_err(|e| warn!(error = %e, "cannot start the checkpoint thread; the detector saves them itself"))
            .ok();
        let mut me = Self {
            engine,
            stale,
            saver,
            stamp: stamp(&cfg.rules_dir),
            pushed_seen: None,
            state,
            cfg,
            rt,
            live,
            cursor,
            reported: Reported::default(),
            newest: 0,
            agent_id: detector_agent_id(shard),
        };
        let pushed = me.pushed();
        me.load_current(pushed);
        if fresh {
            // The starting point is durable at once: a crash before the
            // first regular save must not move it to a later "now".
            me.checkpoint();
            if let Some(s) = &me.saver {
                s.wait_idle();
            }
        }
        info!(
            from = cursor,
            fresh,
            rules = me.engine.rules().rules.len(),
            dir = %me.cfg.rules_dir.display(),
            "detector started"
        );
        me
    }

    fn install(&mut self, set: RuleSet, statuses: Vec<RuleStatus>) {
        let m = &self.state.metrics;
        let failed = statuses.iter().filter(|s| !s.loaded).count();
        for s in statuses.iter().filter(|s| !s.loaded) {
            warn!(rule = %s.name, file = %s.file, error = %s.error, "detection rule not loaded");
        }
        m.detect_rules_loaded.set(set.rules.len() as i64);
        m.detect_rules_failed.set(failed as i64);
        self.engine.set_rules(Arc::new(set));
        *self
            .state
            .rule_statuses
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = statuses;
    }

    fn run(mut self) {
        let mut last_checkpoint = Instant::now();
        let mut checkpoint_every = self.cfg.checkpoint_interval;
        let mut last_reload = Instant::now();
        let mut last_stats = Instant::now();
        while !self.state.stop.is_cancelled() {
            let more = match self.step() {
                Ok(more) => more,
                Err(Stop) => break,
            };
            if last_reload.elapsed() >= self.cfg.reload_interval {
                last_reload = Instant::now();
                self.reload_if_changed();
            }
            if last_checkpoint.elapsed() >= checkpoint_every {
                last_checkpoint = Instant::now();
                let took = self.checkpoint();
                checkpoint_every = self.cfg.checkpoint_interval.max(took * CHECKPOINT_SPACING);
            } else if last_stats.elapsed() >= STATS {
                last_stats = Instant::now();
                self.report_stats();
            }
            if !more {
                self.wait_for_group();
            }
        }
        self.checkpoint();
        // Written before the bus goes on stopping.
        drop(self.saver.take());
        info!(cursor = self.cursor, "detector stopped");
    }

    /// The set last handed over (its text and digest), if any.
    fn pushed(&self) -> Option<(String, String)> {
        self.state
            .pushed_rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn reload_if_changed(&mut self) {
        let now = stamp(&self.cfg.rules_dir);
        let pushed = self.pushed();
        if now == self.stamp && pushed.as_ref().map(|p| &p.1) == self.pushed_seen.as_ref() {
            return;
        }
        self.stamp = now;
        self.load_current(pushed);
        self.state.metrics.detect_rule_reloads.inc();
    }

    /// Runs the rules directory's set, or the set the operator handed over
    /// (`pushed`: text and digest) while the directory (a ConfigMap kubelet
    /// updates within its sync period) does not hold it yet. A set already
    /// running is left as is.
    fn load_current(&mut self, pushed: Option<(String, String)>) {
        self.pushed_seen = pushed.as_ref().map(|p| p.1.clone());
        let dir = dir_sources(&self.cfg.rules_dir);
        let dir_digest = digest_of(&dir);
        if let Some((_, d)) = pushed.as_ref().filter(|p| p.1 == dir_digest) {
            // The directory caught up: from now on it alone says what runs
            // (unless another set was handed over meanwhile).
            let mut p = self
                .state
                .pushed_rules
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if p.as_ref().is_some_and(|p| &p.1 == d) {
                *p = None;
            }
        }
        let (sources, digest, from) = match pushed {
            Some((text, d)) if d != dir_digest => (
                vec![("rules handed over by the operator".to_string(), Ok(text))],
                d,
                "operator",
            ),
            _ => (dir, dir_digest, "directory"),
        };
        let running = self
            .state
            .rules_digest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if digest == running {
            return;
        }
        let (set, mut statuses) = load_sources(sources);
        if from == "directory" && !self.cfg.rules_dir.is_dir() {
            statuses.insert(0, not_a_directory(&self.cfg.rules_dir));
        }
        info!(
            rules = set.rules.len(),
            failed = statuses.iter().filter(|s| !s.loaded).count(),
            from,
            digest = %digest,
            "detection rules loaded"
        );
        self.install(set, statuses);
        *self
            .state
            .rules_digest
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = digest;
    }

    /// Waits for the writer's next group (or a short while).
    fn wait_for_group(&mut self) {
        let live = &mut self.live;
        let got = self
            .rt
            .block_on(async { tokio::time::timeout(IDLE, live.recv()).await });
        if let Ok(Ok(group)) = got {
            // Evaluate it straight from memory when it is next in line;
            // anything else is read from the store by the next step.
            if group.first().is_some_and(|e| e.offset == self.cursor) {
                let _ = self.evaluate(&group);
            }
        }
    }

    /// Evaluates what the store holds past the cursor, a part at a time;
    /// true while there is more.
    fn step(&mut self) -> Result<bool, Stop> {
        // Drain groups already queued: those in line are evaluated from
        // memory; a gap or a lag means reading the store.
        loop {
            match self.live.try_recv() {
                Ok(group) => {
                    let Some(first) = group.first() else { continue };
                    if first.offset == self.cursor {
                        self.evaluate(&group)?;
                    } else if first.offset > self.cursor {
                        break;
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(_)) => break,
                Err(_) => break,
            }
        }
        let next = self.state.store.next_offset();
        if self.cursor >= next {
            self.report_lag(next);
            return Ok(false);
        }
        let from = self.cursor.max(self.state.store.first_offset());
        if from > self.cursor {
            // The size cap deleted events before they were evaluated.
            warn!(
                from = self.cursor,
                to = from - 1,
                "the size cap deleted events the detector had not evaluated"
            );
            self.cursor = from;
        }
        let events = match self.state.store.read_from(from, READ) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "the detector cannot read the store; retrying");
                std::thread::sleep(IDLE);
                return Ok(true);
            }
        };
        self.evaluate(&events)?;
        self.report_lag(next);
        Ok(self.cursor < self.state.store.next_offset())
    }

    /// Evaluates `events` (offset order, starting at or before the cursor),
    /// writes their alerts and waits until they are durable, then moves the
    /// cursor past them.
    fn evaluate(&mut self, events: &[Event]) -> Result<(), Stop> {
        let mut alerts = Vec::new();
        let mut last = None;
        for e in events.iter().filter(|e| e.offset >= self.cursor) {
            for d in self.engine.evaluate(e) {
                match d {
                    Decision::Alert(a) => alerts.push(*a),
                    Decision::Suppressed { rule, reason } => {
                        self.state
                            .metrics
                            .detect_suppressed
                            .get_or_create(&RuleReasonLabel {
                                rule,
                                reason: reason.into(),
                            })
                            .inc();
                    }
                    Decision::DryRun { .. } | Decision::Error { .. } => {}
                }
            }
            last = Some((e.offset, e.stored_at));
        }
        let Some((offset, stored_at)) = last else {
            return Ok(());
        };
        if !alerts.is_empty() {
            let n = alerts.len() as u64;
            // A new alert's last_seen is its source event's stored time;
            // an update is written when its window closes, by design later.
            let sources: Vec<i64> = alerts
                .iter()
                .filter_map(|a| match &a.payload {
                    Some(Payload::Alert(x)) if x.kind != "update" => Some(x.last_seen),
                    _ => None,
                })
                .collect();
            self.write(alerts)?;
            self.state.alerts_written.send_modify(|n| *n += 1);
            self.state.metrics.detect_alerts.inc_by(n);
            let now = now_ns();
            for t in sources {
                self.state
                    .metrics
                    .detect_alert_seconds
                    .observe((now - t).max(0) as f64 / 1e9);
            }
        }
        self.cursor = offset + 1;
        self.newest = stored_at;
        Ok(())
    }

    /// Hands alerts to the writer and waits until they are durable.
    fn write(&self, events: Vec<Event>) -> Result<(), Stop> {
        let (reply, done) = oneshot::channel();
        let req = WriteRequest {
            agent_id: self.agent_id.clone(),
            incarnation: 0,
            events,
            reply,
        };
        let writer = self.state.writer.clone();
        self.rt.block_on(async move {
            writer.send(WriterMsg::Write(req)).await.map_err(|_| Stop)?;
            // The writer answers once the group is durable; a bus that
            // stops first leaves the cursor where it was.
            done.await.map(|_| ()).map_err(|_| Stop)
        })
    }

    fn report_lag(&self, next: u64) {
        let m = &self.state.metrics;
        let behind = next.saturating_sub(self.cursor);
        m.detect_lag_events.set(behind as i64);
        let age = if behind > 0 && self.newest > 0 {
            (now_ns() - self.newest).max(0) as f64 / 1e9
        } else {
            0.0
        };
        m.detect_lag_seconds.set(age);
    }

    /// Saves the cursor and the windows changed since the last save (on
    /// the saver's thread); returns how long the last save took, encoding
    /// and writing, which spaces the next ones.
    fn checkpoint(&mut self) -> Duration {
        let started = Instant::now();
        // Matches up to the cursor are recorded first, so the saved counts
        // and the saved cursor agree: a re-evaluation after a crash counts
        // only what the checkpoint did not.
        self.report_stats();
        let mut whole = false;
        if let Some(undeleted) = self.saver.as_ref().and_then(saver::Saver::take_undeleted) {
            // A save failed: this one carries every window.
            self.stale.extend(undeleted);
            self.engine.mark_all_changed();
            whole = true;
        }
        let stale = std::mem::take(&mut self.stale);
        let encoded = {
            let activity = self
                .state
                .rule_activity
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            encode_save(
                self.cursor,
                &self.engine.take_changes(),
                stale.clone(),
                &activity,
            )
        };
        let (head, windows) = match encoded {
            Ok(e) => e,
            Err(e) => {
                // Not reachable with these types; said, not hidden.
                warn!(error = %e, "cannot encode the detector's state; it is saved whole next time");
                self.stale = stale;
                self.engine.mark_all_changed();
                return started.elapsed();
            }
        };
        let bytes = head.len()
            + windows
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>();
        self.state.metrics.detect_checkpoint_bytes.set(bytes as i64);
        let job = saver::Job {
            cursor: self.cursor,
            head,
            windows,
            whole,
            encode: started.elapsed(),
        };
        match &self.saver {
            Some(s) => {
                if !s.submit(job) {
                    // Refused after a failure: whole next time.
                    self.stale.extend(s.take_undeleted().unwrap_or_default());
                    self.engine.mark_all_changed();
                }
                s.last()
            }
            None => {
                if let Err(e) = self
                    .state
                    .store
                    .save_detect(job.cursor, &job.head, &job.windows)
                {
                    warn!(error = %e, "cannot save the detector's cursor; it will evaluate again from the last one saved");
                    self.stale = stale;
                    self.engine.mark_all_changed();
                }
                let took = started.elapsed();
                self.state
                    .metrics
                    .detect_checkpoint_seconds
                    .observe(took.as_secs_f64());
                took
            }
        }
    }

    fn report_stats(&mut self) {
        let m = &self.state.metrics;
        m.detect_events
            .inc_by(self.engine.events_seen - self.reported.events);
        m.detect_events_without_cel
            .inc_by(self.engine.events_without_cel - self.reported.without_cel);
        self.reported.events = self.engine.events_seen;
        self.reported.without_cel = self.engine.events_without_cel;
        let severities: BTreeMap<&str, &'static str> = self
            .engine
            .rules()
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.severity.as_str()))
            .collect();
        let budget = self.cfg.rule_budget.as_nanos() as u64;
        for (rule, s) in self.engine.stats() {
            let before = self.reported.rules.get(rule).cloned().unwrap_or_default();
            let label = RuleLabel { rule: rule.clone() };
            let severity = severities.get(rule.as_str()).copied().unwrap_or("unknown");
            m.detect_matches
                .get_or_create(&RuleSeverityLabel {
                    rule: rule.clone(),
                    severity: severity.into(),
                })
                .inc_by(s.matches - before.matches);
            m.detect_errors
                .get_or_create(&label)
                .inc_by(s.errors - before.errors);
            m.detect_eval_seconds
                .get_or_create(&label)
                .inc_by((s.cel_nanos - before.cel_nanos) as f64 / 1e9);
            let degraded = s.cel_runs >= BUDGET_MIN_RUNS && s.cel_nanos / s.cel_runs > budget;
            m.detect_rule_degraded
                .get_or_create(&label)
                .set(i64::from(degraded));
            {
                let mut activity = self
                    .state
                    .rule_activity
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                let a: &mut RuleActivity = activity.entry(rule.clone()).or_default();
                a.record(s.matches - before.matches, self.newest);
                a.degraded = degraded;
            }
            self.reported.rules.insert(rule.clone(), s.clone());
        }
    }
}

/// The bus is stopping: the writer is gone.
struct Stop;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn some_state() -> DetectState {
        let mut s = DetectState {
            clock: 77,
            ..Default::default()
        };
        s.open.insert(
            "00ab".into(),
            amoskys_detect::engine::OpenAlert {
                rule: "shell".into(),
                count: 3,
                until: 1_000,
                ..Default::default()
            },
        );
        s.windows.insert(
            "port-scan\u{0}10.0.0.1".into(),
            VecDeque::from([(5, "22".to_string()), (6, "23".to_string())]),
        );
        s
    }

    #[test]
    fn older_checkpoints_are_read_whole_and_their_windows_moved_to_their_own_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        // A key left over from a newer version, then a head as older
        // versions saved it: every window inside.
        store
            .save_detect(1, b"{}", &[(b"wleftover".to_vec(), Some(b"[]".to_vec()))])
            .unwrap();
        let old = serde_json::json!({"cursor": 5, "state": some_state(), "activity": {}});
        store
            .set_detect_state(5, &serde_json::to_vec(&old).unwrap())
            .unwrap();

        let r = resume(&store);
        assert!(!r.fresh && !r.checkpoint.windows_apart);
        assert_eq!(r.checkpoint.cursor, 5);
        assert_eq!(r.checkpoint.state, some_state());
        assert_eq!(r.stale, vec![b"wleftover".to_vec()]);

        // The first save writes every window to its own key and drops the
        // stale one; the next start reads them back.
        let mut engine = Engine::new(Arc::new(RuleSet::default()), 0, r.checkpoint.state);
        engine.mark_all_changed();
        let (head, windows) =
            encode_save(5, &engine.take_changes(), r.stale, &HashMap::new()).unwrap();
        store.save_detect(5, &head, &windows).unwrap();
        let r = resume(&store);
        assert!(r.checkpoint.windows_apart && r.stale.is_empty());
        assert_eq!(r.checkpoint.state, some_state());
        assert_eq!(store.detect_windows().unwrap().len(), 2);

        // A window that closes is deleted; one unreadable is dropped and
        // deleted at the next save.
        let mut state = some_state();
        state.open.clear();
        let changes = Changes {
            open: vec![("00ab".into(), None)],
            windows: vec![],
            clock: 90,
        };
        let (head, mut windows) = encode_save(6, &changes, Vec::new(), &HashMap::new()).unwrap();
        windows.push((b"wbroken".to_vec(), Some(b"not json".to_vec())));
        store.save_detect(6, &head, &windows).unwrap();
        let r = resume(&store);
        assert_eq!(r.checkpoint.state.open.len(), 0);
        assert_eq!(r.checkpoint.state.windows, state.windows);
        assert_eq!(r.checkpoint.state.clock, 90);
        assert_eq!(r.stale, vec![b"wbroken".to_vec()]);
    }

    #[test]
    fn a_store_with_nothing_saved_starts_fresh_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let r = resume(&store);
        assert!(r.fresh && r.checkpoint.windows_apart && r.stale.is_empty());
        assert_eq!(r.checkpoint.cursor, store.next_offset());
    }

    #[test]
    fn rules_that_fail_to_compile_or_test_are_reported_and_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let head = "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\n";
        std::fs::write(
            dir.path().join("a.yaml"),
            format!(
                "{head}metadata: {{name: good}}\nspec:\n  match: {{event: process}}\n  condition: \"process.name == 'sh'\"\n  summary: s\n  tests:\n  - {{name: sh, event: {{process: {{name: sh}}}}, expect: match}}\n---\n{head}metadata: {{name: typo}}\nspec:\n  match: {{event: process}}\n  condition: \"process.nam == 'sh'\"\n  summary: s\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.yml"),
            format!(
                "{head}metadata: {{name: wrong-test}}\nspec:\n  match: {{event: process}}\n  condition: \"process.name == 'sh'\"\n  summary: s\n  tests:\n  - {{name: bash is a shell, event: {{process: {{name: bash}}}}, expect: match}}\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.path().join("c.yaml"), "kind: [").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a rule").unwrap();
        let (set, statuses) = load_rules(dir.path());
        assert_eq!(set.rules.len(), 1);
        assert_eq!(set.rules[0].name, "good");
        let by: HashMap<&str, &RuleStatus> =
            statuses.iter().map(|s| (s.name.as_str(), s)).collect();
        assert!(by["good"].loaded);
        assert_eq!((by["good"].tests, by["good"].tests_passed), (1, 1));
        assert!(
            by["typo"]
                .error
                .contains("spec.condition (line 1, column 1): process.nam"),
            "{}",
            by["typo"].error
        );
        assert!(
            by["wrong-test"].error.contains("bash is a shell")
                && by["wrong-test"].error.contains("expected a match"),
            "{}",
            by["wrong-test"].error
        );
        let c = statuses
            .iter()
            .find(|s| s.file.ends_with("c.yaml"))
            .unwrap();
        assert!(!c.loaded && !c.error.is_empty());
        assert_eq!(statuses.len(), 4, "notes.txt is not a rule file");
    }
}
