//! The engine: stored events in offset order in, alert events out.
//!
//! It is deterministic, so that evaluating the same events again after a
//! crash writes the same alerts with the same seqs, which the bus's writer
//! drops as duplicates: an alert's seq is `source offset × 256 + n` (the
//! n-th alert that event caused), and all time is the events' stored time,
//! never the wall clock. Its state (open dedup windows, threshold windows)
//! is plain data the bus saves beside its cursor.
//!
//! Nothing is dropped silently: a repeat within a dedup window raises the
//! open alert's count (and, when the window closes, an update alert carries
//! the total); every such repeat is returned as a suppression.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use amoskys_proto::event::Payload;
use amoskys_proto::{Alert, Event, K8sIdentity};
use cel::Value;
use serde::{Deserialize, Serialize};

use crate::compile::{CompiledRule, Eval, RuleSet};
use crate::rule::Mode;
use crate::view::{EventRef, Fields, View, text};
use crate::{DETECT_COLLECTOR, detector_agent_id};

/// Alerts one source event may cause (the low byte of an alert's seq).
pub const ALERTS_PER_EVENT: u64 = 256;
/// Open dedup windows kept at most; past it alerts are written undeduped.
pub const MAX_OPEN: usize = 100_000;
/// Threshold keys tracked at most; matches for new keys past it are
/// counted as suppressed (`threshold_keys_full`).
pub const MAX_THRESHOLD_KEYS: usize = 100_000;
/// How often (stored time) closed windows are swept.
const SWEEP_NS: i64 = 1_000_000_000;

/// What the engine decided for one event.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// An alert event to write (new, or an update of a closed window).
    Alert(Box<Event>),
    /// A match that did not become a new alert, and why (`dedup`:
    /// counted in its open alert; `threshold_keys_full`; `per_event_limit`).
    Suppressed {
        /// The rule.
        rule: String,
        /// Why.
        reason: &'static str,
    },
    /// A match of a rule in dry-run mode.
    DryRun {
        /// The rule.
        rule: String,
    },
    /// The condition failed to evaluate on this event.
    Error {
        /// The rule.
        rule: String,
    },
}

/// An alert whose dedup window is open.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OpenAlert {
    /// The rule.
    pub rule: String,
    /// The first alert's seq.
    pub alert_seq: u64,
    /// Matches so far.
    pub count: u64,
    /// Stored time of the first and last match.
    pub first_seen: i64,
    /// Stored time of the last match.
    pub last_seen: i64,
    /// When the window closes.
    pub until: i64,
    /// The first alert, as its update repeats it.
    pub summary: String,
    /// The alert's severity.
    pub severity: i32,
    /// Node and agent of the first match.
    pub node: String,
    /// Its agent.
    pub source_agent: String,
    /// Its pod's namespace and name.
    pub namespace: String,
    /// Its pod.
    pub pod: String,
    /// The rule's generation.
    pub generation: i64,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// A threshold window: (stored time, distinct value) of each match in it.
pub type ThresholdWindow = VecDeque<(i64, String)>;

/// The engine's state, saved by the bus with its cursor.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DetectState {
    /// Open dedup windows by fingerprint.
    pub open: BTreeMap<String, OpenAlert>,
    /// Threshold windows by rule and key.
    pub windows: BTreeMap<String, ThresholdWindow>,
    /// The newest stored time seen.
    pub clock: i64,
}

/// What one rule did, since the engine started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleStats {
    /// Events it selected (payload, kind, scope) and prefilters passed.
    pub selected: u64,
    /// CEL runs.
    pub cel_runs: u64,
    /// Time in CEL, ns.
    pub cel_nanos: u64,
    /// The longest single CEL run, ns.
    pub cel_max_nanos: u64,
    /// Matches (before thresholds and dedup).
    pub matches: u64,
    /// Matches left out by an exception.
    pub excepted: u64,
    /// Alerts written (new and updates).
    pub alerts: u64,
    /// Matches that raised an open alert's count, or were refused.
    pub suppressed: u64,
    /// Evaluation errors.
    pub errors: u64,
    /// Stored time of its last match (0: none).
    pub last_match: i64,
}

/// Evaluates events against a rule set.
pub struct Engine {
    set: Arc<RuleSet>,
    env: Arc<cel::Env>,
    shard: u32,
    state: DetectState,
    stats: HashMap<String, RuleStats>,
    force_alert: bool,
    last_sweep: i64,
    /// Windows changed since the last [`Engine::take_changes`].
    changed: Changed,
    /// Events that had a view (rules could see them).
    pub events_seen: u64,
    /// Of those, events for which no CEL ran at all.
    pub events_without_cel: u64,
}

/// Keys of the windows that changed (or closed) since they were last saved.
#[derive(Debug, Default)]
struct Changed {
    open: HashSet<String>,
    windows: HashSet<String>,
}

/// What changed in the state since the last save: each key with its window
/// now, or `None` where it closed. Saving these (with the clock) instead of
/// the whole state keeps a save proportional to what happened since the
/// last one, not to every window open.
#[derive(Debug, Default, PartialEq)]
pub struct Changes<'a> {
    /// Dedup windows by fingerprint.
    pub open: Vec<(String, Option<&'a OpenAlert>)>,
    /// Threshold windows by rule and key.
    pub windows: Vec<(String, Option<&'a ThresholdWindow>)>,
    /// The newest stored time seen.
    pub clock: i64,
}

fn fingerprint(rule: &str, key: &[String]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(rule.as_bytes());
    for k in key {
        h.update(b"\0");
        h.update(k.as_bytes());
    }
    format!("{:016x}", h.digest())
}

fn k8s_of(v: &View) -> Option<K8sIdentity> {
    let get = |p: &str| v.get(p).map(text).unwrap_or_default();
    let k = K8sIdentity {
        namespace: get("k8s.namespace"),
        pod: get("k8s.pod"),
        pod_uid: get("k8s.podUid"),
        labels: match v.get("k8s.labels") {
            Some(Value::Map(m)) => m
                .map
                .iter()
                .filter_map(|(k, x)| match k {
                    cel::objects::Key::String(k) => Some((k.to_string(), text(x))),
                    _ => None,
                })
                .collect(),
            _ => Default::default(),
        },
        service_account: get("k8s.serviceAccount"),
        container: get("k8s.container"),
        image: get("k8s.image"),
    };
    (k != K8sIdentity::default()).then_some(k)
}

impl Engine {
    /// An engine for shard `shard` resuming from `state`.
    pub fn new(set: Arc<RuleSet>, shard: u32, state: DetectState) -> Self {
        Self {
            env: set.env(),
            set,
            shard,
            last_sweep: state.clock,
            state,
            stats: HashMap::new(),
            force_alert: false,
            changed: Changed::default(),
            events_seen: 0,
            events_without_cel: 0,
        }
    }

    /// Treats dry-run rules as alerting (inline tests).
    pub fn force_alert_mode(&mut self) {
        self.force_alert = true;
    }

    /// Swaps the rule set at once; windows of rules that are gone close.
    pub fn set_rules(&mut self, set: Arc<RuleSet>) {
        self.env = set.env();
        self.set = set;
    }

    /// The rules in force.
    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.set
    }

    /// The state to save with the cursor.
    pub fn state(&self) -> &DetectState {
        &self.state
    }

    /// Marks every window changed, so the next [`Engine::take_changes`]
    /// holds the whole state (a state restored from a full save).
    pub fn mark_all_changed(&mut self) {
        self.changed.open = self.state.open.keys().cloned().collect();
        self.changed.windows = self.state.windows.keys().cloned().collect();
    }

    /// The windows changed since the last call, and forgets them.
    pub fn take_changes(&mut self) -> Changes<'_> {
        /// Each key with its window now (None: closed), by key.
        fn now<V>(keys: HashSet<String>, map: &BTreeMap<String, V>) -> Vec<(String, Option<&V>)> {
            let mut out: Vec<_> = keys
                .into_iter()
                .map(|k| {
                    let v = map.get(&k);
                    (k, v)
                })
                .collect();
            out.sort_by(|a, b| a.0.cmp(&b.0));
            out
        }
        let Changed { open, windows } = std::mem::take(&mut self.changed);
        Changes {
            open: now(open, &self.state.open),
            windows: now(windows, &self.state.windows),
            clock: self.state.clock,
        }
    }

    /// Per-rule figures.
    pub fn stats(&self) -> &HashMap<String, RuleStats> {
        &self.stats
    }

    /// Evaluates one stored event (offset order).
    pub fn evaluate(&mut self, e: &Event) -> Vec<Decision> {
        let mut out = Vec::new();
        let mut n = 0;
        self.sweep(e.stored_at, e.offset, &mut n, &mut out);
        // The detector's own alerts are never evaluated again.
        if e.collector == DETECT_COLLECTOR && matches!(e.payload, Some(Payload::Alert(_))) {
            return out;
        }
        let Some(r) = EventRef::new(e) else {
            return out;
        };
        let (payload, kind) = (r.payload, r.kind);
        self.step(
            &r,
            || r.view(),
            payload,
            kind,
            &e.collector,
            e.stored_at,
            e.offset,
            &mut n,
            &mut out,
        );
        out
    }

    /// Evaluates one event's view, stored at `offset` (inline tests).
    pub fn evaluate_view(&mut self, v: &View, offset: u64) -> Vec<Decision> {
        let t = v.stored_at();
        let mut out = Vec::new();
        let mut n = 0u64;
        self.sweep(t, offset, &mut n, &mut out);
        let kind = v.get("event.kind").map(text).unwrap_or_default();
        let collector = v.get("event.collector").map(text).unwrap_or_default();
        self.step(
            v,
            || Some(v),
            v.payload,
            &kind,
            &collector,
            t,
            offset,
            &mut n,
            &mut out,
        );
        out
    }

    /// Runs every rule for the payload over one event: checks that need no
    /// CEL on `fields`, then CEL and alerts on the full view, built only
    /// when one is needed.
    #[allow(clippy::too_many_arguments)]
    fn step<'v>(
        &mut self,
        fields: &dyn Fields,
        view: impl Fn() -> Option<&'v View>,
        payload: &str,
        kind: &str,
        collector: &str,
        t: i64,
        offset: u64,
        n: &mut u64,
        out: &mut Vec<Decision>,
    ) {
        self.events_seen += 1;
        let set = self.set.clone();
        let mut ctx = None;
        let mut ran_cel = false;
        for rule in set.for_payload(payload) {
            let outcome = match rule.precheck(fields, payload, kind, collector) {
                Some(Eval::Skipped) => continue,
                Some(o) => o,
                None => {
                    let Some(v) = view() else { continue };
                    let ctx = ctx.get_or_insert_with(|| v.context(&self.env));
                    let t0 = Instant::now();
                    let o = rule.run(ctx);
                    let took = t0.elapsed().as_nanos() as u64;
                    ran_cel = true;
                    let s = self.stats.entry(rule.name.clone()).or_default();
                    s.cel_runs += 1;
                    s.cel_nanos += took;
                    s.cel_max_nanos = s.cel_max_nanos.max(took);
                    o
                }
            };
            let s = self.stats.entry(rule.name.clone()).or_default();
            s.selected += 1;
            match outcome {
                Eval::Skipped | Eval::NoMatch => {}
                Eval::Excepted => s.excepted += 1,
                Eval::Error => {
                    s.errors += 1;
                    out.push(Decision::Error {
                        rule: rule.name.clone(),
                    });
                }
                Eval::Match { .. } => {
                    s.matches += 1;
                    s.last_match = t;
                    self.matched(rule, fields, &view, t, offset, n, out);
                }
            }
        }
        if !ran_cel {
            self.events_without_cel += 1;
        }
    }

    fn next_seq(offset: u64, n: &mut u64) -> Option<u64> {
        if *n >= ALERTS_PER_EVENT {
            return None;
        }
        let seq = offset.saturating_mul(ALERTS_PER_EVENT) + *n;
        *n += 1;
        Some(seq)
    }

    /// A match: thresholds read `fields` only; the full view is built once
    /// an alert (or a repeat of one) is certain.
    #[allow(clippy::too_many_arguments)]
    fn matched<'v>(
        &mut self,
        rule: &Arc<CompiledRule>,
        fields: &dyn Fields,
        view: impl Fn() -> Option<&'v View>,
        t: i64,
        offset: u64,
        n: &mut u64,
        out: &mut Vec<Decision>,
    ) {
        let suppress = |me: &mut Self, out: &mut Vec<Decision>, reason| {
            me.stats.entry(rule.name.clone()).or_default().suppressed += 1;
            out.push(Decision::Suppressed {
                rule: rule.name.clone(),
                reason,
            });
        };
        let mut count = 1;
        let mut kind = "alert";
        if let Some(th) = &rule.threshold {
            let key = format!(
                "{}\0{}",
                rule.name,
                CompiledRule::key(&th.by, fields).join("\0")
            );
            if !self.state.windows.contains_key(&key)
                && self.state.windows.len() >= MAX_THRESHOLD_KEYS
            {
                suppress(self, out, "threshold_keys_full");
                return;
            }
            self.changed.windows.insert(key.clone());
            let win = self.state.windows.entry(key.clone()).or_default();
            while win.front().is_some_and(|(at, _)| *at <= t - th.window_ns) {
                win.pop_front();
            }
            let value = th
                .distinct
                .as_ref()
                .and_then(|p| fields.field(p).map(|s| s.text()))
                .unwrap_or_default();
            win.push_back((t, value));
            let reached = if th.distinct.is_some() {
                win.iter()
                    .map(|(_, x)| x.as_str())
                    .collect::<HashSet<_>>()
                    .len()
            } else {
                win.len()
            };
            if reached < th.count as usize {
                return;
            }
            self.state.windows.remove(&key);
            count = reached as u64;
            kind = "threshold";
        }
        if rule.mode == Mode::DryRun && !self.force_alert {
            out.push(Decision::DryRun {
                rule: rule.name.clone(),
            });
            return;
        }
        // A repeat keyed by fields is counted without building the view.
        let field_key = rule
            .dedup
            .as_ref()
            .filter(|(by, _)| !by.is_empty())
            .map(|(by, _)| fingerprint(&rule.name, &CompiledRule::key(by, fields)));
        if let Some(fp) = &field_key
            && self.state.open.get(fp).is_some_and(|o| t < o.until)
        {
            if let Some(o) = self.state.open.get_mut(fp) {
                o.count += count;
                o.last_seen = t;
                self.changed.open.insert(fp.clone());
            }
            suppress(self, out, "dedup");
            return;
        }
        let Some(v) = view() else { return };
        let summary = rule.render_summary(v);
        if let Some((_, window)) = &rule.dedup {
            let fp = field_key
                .clone()
                .unwrap_or_else(|| fingerprint(&rule.name, std::slice::from_ref(&summary)));
            match self.state.open.get(&fp).map(|o| o.until) {
                Some(until) if t < until => {
                    if let Some(o) = self.state.open.get_mut(&fp) {
                        o.count += count;
                        o.last_seen = t;
                        self.changed.open.insert(fp.clone());
                    }
                    suppress(self, out, "dedup");
                    return;
                }
                Some(_) => self.close(&fp, offset, n, out),
                None => {}
            }
            let Some(seq) = Self::next_seq(offset, n) else {
                suppress(self, out, "per_event_limit");
                return;
            };
            if self.state.open.len() < MAX_OPEN {
                self.changed.open.insert(fp.clone());
                self.state.open.insert(
                    fp.clone(),
                    OpenAlert {
                        rule: rule.name.clone(),
                        alert_seq: seq,
                        count,
                        first_seen: t,
                        last_seen: t,
                        until: t.saturating_add(*window),
                        summary: summary.clone(),
                        severity: rule.severity.to_proto() as i32,
                        node: v.get("event.node").map(text).unwrap_or_default(),
                        source_agent: v.get("event.agentId").map(text).unwrap_or_default(),
                        namespace: v.namespace().to_string(),
                        pod: v.get("k8s.pod").map(text).unwrap_or_default(),
                        generation: rule.generation,
                        labels: rule.labels.clone(),
                    },
                );
            }
            self.emit(rule, v, seq, &summary, &fp, count, kind, offset, out);
            return;
        }
        let fp = fingerprint(&rule.name, std::slice::from_ref(&summary));
        let Some(seq) = Self::next_seq(offset, n) else {
            suppress(self, out, "per_event_limit");
            return;
        };
        self.emit(rule, v, seq, &summary, &fp, count, kind, offset, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        rule: &CompiledRule,
        v: &View,
        seq: u64,
        summary: &str,
        fp: &str,
        count: u64,
        kind: &str,
        offset: u64,
        out: &mut Vec<Decision>,
    ) {
        let t = v.stored_at();
        let mut labels: HashMap<String, String> = rule
            .labels
            .iter()
            .map(|(k, x)| (k.clone(), x.clone()))
            .collect();
        labels.insert("rule".into(), rule.name.clone());
        self.stats.entry(rule.name.clone()).or_default().alerts += 1;
        out.push(Decision::Alert(Box::new(Event {
            agent_id: detector_agent_id(self.shard),
            seq,
            node: v.get("event.node").map(text).unwrap_or_default(),
            collector: DETECT_COLLECTOR.into(),
            observed_at: t,
            severity: rule.severity.to_proto() as i32,
            labels,
            k8s: k8s_of(v),
            payload: Some(Payload::Alert(Alert {
                rule: rule.name.clone(),
                summary: summary.to_string(),
                description: rule.description.clone(),
                rule_generation: rule.generation,
                fingerprint: fp.to_string(),
                count,
                first_seen: t,
                last_seen: t,
                source_shard: self.shard,
                source_offset: offset,
                source_agent: v.get("event.agentId").map(text).unwrap_or_default(),
                updates_seq: 0,
                kind: kind.into(),
                ..Default::default()
            })),
            ..Default::default()
        })));
    }

    /// Closes the window `fp`: an update alert carries its count when
    /// repeats raised it.
    fn close(&mut self, fp: &str, offset: u64, n: &mut u64, out: &mut Vec<Decision>) {
        let Some(o) = self.state.open.remove(fp) else {
            return;
        };
        self.changed.open.insert(fp.to_string());
        if o.count <= 1 {
            return;
        }
        let Some(seq) = Self::next_seq(offset, n) else {
            // Only at 256 alerts from one event; the count stays in metrics.
            out.push(Decision::Suppressed {
                rule: o.rule,
                reason: "per_event_limit",
            });
            return;
        };
        self.stats.entry(o.rule.clone()).or_default().alerts += 1;
        let mut labels: HashMap<String, String> = o.labels.clone().into_iter().collect();
        labels.insert("rule".into(), o.rule.clone());
        let k8s = (!o.namespace.is_empty()).then(|| K8sIdentity {
            namespace: o.namespace.clone(),
            pod: o.pod.clone(),
            ..Default::default()
        });
        out.push(Decision::Alert(Box::new(Event {
            agent_id: detector_agent_id(self.shard),
            seq,
            node: o.node.clone(),
            collector: DETECT_COLLECTOR.into(),
            observed_at: o.last_seen,
            severity: o.severity,
            labels,
            k8s,
            payload: Some(Payload::Alert(Alert {
                rule: o.rule,
                summary: o.summary,
                rule_generation: o.generation,
                fingerprint: fp.to_string(),
                count: o.count,
                first_seen: o.first_seen,
                last_seen: o.last_seen,
                source_shard: self.shard,
                source_agent: o.source_agent,
                updates_seq: o.alert_seq,
                kind: "update".into(),
                ..Default::default()
            })),
            ..Default::default()
        })));
    }

    /// Advances the clock to `t`; at most once a second of stored time,
    /// closes expired dedup windows and forgets idle threshold keys.
    fn sweep(&mut self, t: i64, offset: u64, n: &mut u64, out: &mut Vec<Decision>) {
        if t > self.state.clock {
            self.state.clock = t;
        }
        let now = self.state.clock;
        if now < self.last_sweep + SWEEP_NS {
            return;
        }
        self.last_sweep = now;
        let expired: Vec<String> = self
            .state
            .open
            .iter()
            .filter(|(_, o)| o.until <= now)
            .map(|(fp, _)| fp.clone())
            .collect();
        for fp in expired {
            self.close(&fp, offset, n, out);
        }
        let windows: HashMap<&str, i64> = self
            .set
            .rules
            .iter()
            .filter_map(|r| {
                r.threshold
                    .as_ref()
                    .map(|th| (r.name.as_str(), th.window_ns))
            })
            .collect();
        let changed = &mut self.changed.windows;
        self.state.windows.retain(|key, win| {
            let rule = key.split('\0').next().unwrap_or_default();
            let keep = match windows.get(rule) {
                Some(w) => win.back().is_some_and(|(at, _)| *at > now - w),
                None => false,
            };
            if !keep {
                changed.insert(key.clone());
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile, env};
    use crate::rule::parse_rule_file;
    use amoskys_proto::*;

    fn set(rules: &str) -> Arc<RuleSet> {
        let env = env();
        let docs = parse_rule_file("t.yaml", rules).unwrap();
        let compiled = docs
            .iter()
            .map(|d| Arc::new(compile(d, &env).unwrap()))
            .collect();
        Arc::new(RuleSet::new(compiled, env))
    }

    const SHELL: &str = "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: shell}\nspec:\n  match: {event: process, kinds: [start]}\n  condition: \"process.name in lists.shells\"\n  lists: {shells: [sh, bash]}\n  severity: error\n  summary: 'shell {process.exe} on {event.node}'\n  labels: {mitre: T1059}\n  dedup: {by: [event.node], window: 10s}\n";

    fn process(offset: u64, secs: i64, name: &str, ns: &str) -> Event {
        Event {
            agent_id: "a".into(),
            node: "n1".into(),
            collector: "process".into(),
            offset,
            stored_at: secs * 1_000_000_000,
            k8s: (!ns.is_empty()).then(|| K8sIdentity {
                namespace: ns.into(),
                pod: format!("{ns}-pod"),
                ..Default::default()
            }),
            payload: Some(event::Payload::Process(ProcessEvent {
                kind: process_event::Kind::Start as i32,
                name: name.into(),
                exe: format!("/bin/{name}"),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn alerts(d: &[Decision]) -> Vec<&Alert> {
        d.iter()
            .filter_map(|d| match d {
                Decision::Alert(e) => match &e.payload {
                    Some(event::Payload::Alert(a)) => Some(a),
                    _ => None,
                },
                _ => None,
            })
            .collect()
    }

    #[test]
    fn repeats_raise_the_count_and_the_closed_window_reports_it() {
        let mut eng = Engine::new(set(SHELL), 2, DetectState::default());
        let d = eng.evaluate(&process(10, 100, "bash", ""));
        let a = alerts(&d);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].summary, "shell /bin/bash on n1");
        assert_eq!(
            (a[0].source_offset, a[0].source_shard, a[0].count),
            (10, 2, 1)
        );
        let Decision::Alert(first) = &d[0] else {
            panic!()
        };
        assert_eq!(first.seq, 10 * ALERTS_PER_EVENT);
        assert_eq!(first.agent_id, "amoskys:detect/2");
        assert_eq!(first.labels["mitre"], "T1059");
        assert_eq!(first.severity, Severity::Error as i32);

        for (o, s) in [(11, 101), (12, 105)] {
            let d = eng.evaluate(&process(o, s, "sh", ""));
            assert_eq!(
                d,
                vec![Decision::Suppressed {
                    rule: "shell".into(),
                    reason: "dedup"
                }]
            );
        }
        // Not a shell: nothing.
        assert!(eng.evaluate(&process(13, 106, "ls", "")).is_empty());
        // The window (10 s from 100) has closed by 111: an update with the
        // total, then a new alert for the new shell.
        let d = eng.evaluate(&process(14, 111, "sh", ""));
        let a = alerts(&d);
        assert_eq!(a.len(), 2, "{d:?}");
        assert_eq!(
            (a[0].count, a[0].updates_seq, a[0].kind.as_str()),
            (3, 10 * 256, "update")
        );
        assert_eq!(
            (a[0].first_seen, a[0].last_seen),
            (100_000_000_000, 105_000_000_000)
        );
        assert_eq!((a[1].count, a[1].updates_seq), (1, 0));
        let seqs: Vec<u64> = d
            .iter()
            .filter_map(|d| match d {
                Decision::Alert(e) => Some(e.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![14 * 256, 14 * 256 + 1]);
        assert_eq!(eng.stats()["shell"].suppressed, 2);
        assert_eq!(eng.stats()["shell"].alerts, 3);
    }

    #[test]
    fn the_same_events_from_a_saved_state_give_the_same_alerts() {
        let events: Vec<Event> = (0..40)
            .map(|i| {
                process(
                    i + 1,
                    100 + i as i64,
                    if i % 3 == 0 { "sh" } else { "ls" },
                    "",
                )
            })
            .collect();
        let run = |from: usize, state: DetectState| {
            let mut eng = Engine::new(set(SHELL), 0, state);
            let mut out = Vec::new();
            for e in &events[from..] {
                out.extend(eng.evaluate(e));
            }
            (out, eng.state().clone())
        };
        let (all, _) = run(0, DetectState::default());
        // Stop after 17 events, keep the state as the bus saves it, resume.
        let mut eng = Engine::new(set(SHELL), 0, DetectState::default());
        let mut first = Vec::new();
        for e in &events[..17] {
            first.extend(eng.evaluate(e));
        }
        let saved: DetectState =
            serde_json::from_str(&serde_json::to_string(eng.state()).unwrap()).unwrap();
        let (rest, _) = run(17, saved);
        first.extend(rest);
        assert_eq!(first, all);
        assert!(alerts(&all).len() >= 4);
    }

    #[test]
    fn changes_applied_in_turn_rebuild_the_state_exactly() {
        let env = env();
        let mut rules = Vec::new();
        for (file, text) in crate::starter::STARTER_RULES {
            for doc in parse_rule_file(file, text).unwrap() {
                rules.push(Arc::new(compile(&doc, &env).unwrap()));
            }
        }
        let mut eng = Engine::new(
            Arc::new(RuleSet::new(rules, env)),
            0,
            DetectState::default(),
        );
        let mut mix = crate::sample::NodeMix::new(11);
        let mut saved = DetectState::default();
        let apply = |saved: &mut DetectState, c: Changes<'_>| {
            for (k, v) in c.open {
                match v {
                    Some(o) => saved.open.insert(k, o.clone()),
                    None => saved.open.remove(&k),
                };
            }
            for (k, v) in c.windows {
                match v {
                    Some(w) => saved.windows.insert(k, w.clone()),
                    None => saved.windows.remove(&k),
                };
            }
            saved.clock = c.clock;
        };
        let (mut opened, mut closed) = (0, 0);
        // 800 s of stored time at 100 events/s: dedup windows (10 min for
        // shells) and threshold windows open, count up, close and are swept.
        for i in 0..80_000u64 {
            let (payload, r) = mix.next_payload();
            let e = Event {
                agent_id: format!("a{}", r % 3),
                node: format!("n{}", r % 3),
                collector: "x".into(),
                offset: i + 1,
                stored_at: i as i64 * 10_000_000,
                payload: Some(payload),
                ..Default::default()
            };
            eng.evaluate(&e);
            if i % 7_919 == 0 {
                let c = eng.take_changes();
                opened += c.open.iter().filter(|x| x.1.is_some()).count();
                closed += c.open.iter().filter(|x| x.1.is_none()).count()
                    + c.windows.iter().filter(|x| x.1.is_none()).count();
                apply(&mut saved, c);
                assert_eq!(&saved, eng.state(), "after event {i}");
            }
        }
        apply(&mut saved, eng.take_changes());
        assert_eq!(&saved, eng.state());
        assert!(opened > 0 && closed > 0, "{opened} {closed}");
        assert!(eng.take_changes().open.is_empty(), "taken once");
        // A state restored whole is saved whole next time.
        let mut again = Engine::new(eng.rules().clone(), 0, saved.clone());
        again.mark_all_changed();
        let mut rebuilt = DetectState::default();
        apply(&mut rebuilt, again.take_changes());
        assert_eq!(rebuilt, saved);
    }

    #[test]
    fn thresholds_count_distinct_values_by_key_within_the_window() {
        let rules = "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {name: scan}\nspec:\n  match: {event: flow}\n  condition: \"flow.proto == 'tcp'\"\n  summary: '{flow.srcIp} scanned'\n  threshold: {by: [flow.srcIp], distinct: flow.dstPort, count: 5, window: 10s}\n";
        let mut eng = Engine::new(set(rules), 0, DetectState::default());
        let flow = |o: u64, s: i64, src: &str, port: u32| Event {
            offset: o,
            stored_at: s * 1_000_000_000,
            collector: "flow".into(),
            payload: Some(event::Payload::Flow(FlowEvent {
                src_ip: src.into(),
                dst_port: port,
                protocol: 6,
                ..Default::default()
            })),
            ..Default::default()
        };
        let mut fired = Vec::new();
        let mut o = 0;
        // Same port five times, and four ports from another source: nothing.
        for _ in 0..5 {
            o += 1;
            fired.extend(eng.evaluate(&flow(o, 1, "10.0.0.1", 80)));
        }
        for p in 1..=4 {
            o += 1;
            fired.extend(eng.evaluate(&flow(o, 1, "10.0.0.2", p)));
        }
        assert!(alerts(&fired).is_empty(), "{fired:?}");
        // Ports spread past the window do not add up.
        o += 1;
        fired.extend(eng.evaluate(&flow(o, 30, "10.0.0.2", 5)));
        assert!(alerts(&fired).is_empty());
        for p in 6..=9 {
            o += 1;
            fired.extend(eng.evaluate(&flow(o, 31, "10.0.0.2", p)));
        }
        let a = alerts(&fired);
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].kind.as_str(), a[0].count), ("threshold", 5));
        assert_eq!(a[0].summary, "10.0.0.2 scanned");
    }

    #[test]
    fn namespaced_rules_see_only_their_namespace() {
        let rules = "apiVersion: amoskys.io/v1alpha1\nkind: DetectionRule\nmetadata: {name: shell, namespace: shop}\nspec:\n  match: {event: process}\n  condition: \"process.name == 'sh'\"\n  summary: 'shell in {k8s.namespace}/{k8s.pod}'\n";
        let mut eng = Engine::new(set(rules), 0, DetectState::default());
        assert!(eng.evaluate(&process(1, 1, "sh", "bank")).is_empty());
        assert!(eng.evaluate(&process(2, 1, "sh", "")).is_empty());
        let d = eng.evaluate(&process(3, 1, "sh", "shop"));
        let a = alerts(&d);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].rule, "shop/shell");
        assert_eq!(a[0].summary, "shell in shop/shop-pod");
        let Decision::Alert(e) = &d[0] else { panic!() };
        assert_eq!(e.k8s.as_ref().unwrap().namespace, "shop");
    }

    #[test]
    fn dry_run_rules_count_and_write_nothing() {
        let rules = SHELL.replace("severity: error", "mode: dryRun");
        let mut eng = Engine::new(set(&rules), 0, DetectState::default());
        let d = eng.evaluate(&process(1, 1, "sh", ""));
        assert_eq!(
            d,
            vec![Decision::DryRun {
                rule: "shell".into()
            }]
        );
        assert_eq!(eng.stats()["shell"].matches, 1);
    }
}
