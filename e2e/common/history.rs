//! The delivery promise, checked over a whole history: what every agent's
//! spool says it produced and saw acked, against everything the bus stores.
//!
//! For each incarnation of each agent (one spool's life):
//! - every seq the agent saw acked is stored exactly once, or lies in a gap
//!   the bus recorded (it holds less than it acked: a restore);
//! - no seq is stored twice;
//! - every seq it produced and the bus never stored is accounted for: it is
//!   still in its spool (and that spool was wiped, which a later incarnation
//!   announces, or it is waiting to be sent), or it lies in a gap event.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use amoskys_agents::spool::Spool;
use amoskys_proto::Event;
use amoskys_proto::event::Payload;

/// What a stopped agent's spool says about its incarnation.
#[derive(Clone, Debug)]
pub struct SpoolView {
    pub agent_id: String,
    pub incarnation: u64,
    /// Seqs 1..next_seq were handed out.
    pub next_seq: u64,
    pub acked_seq: u64,
    /// Seqs still held (unacked).
    pub held: BTreeSet<u64>,
    /// This spool was wiped (moved aside) while its agent was down.
    pub wiped: bool,
}

impl SpoolView {
    /// Opens the spool of an agent that is not running.
    pub fn read(dir: &Path, agent_id: &str, wiped: bool) -> Self {
        let spool = Spool::open(dir, u64::MAX, agent_id, "checker").unwrap();
        let st = spool.stats();
        let held = spool
            .read(0, usize::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        Self {
            agent_id: agent_id.to_string(),
            incarnation: spool.incarnation(),
            next_seq: st.next_seq,
            acked_seq: st.acked_seq,
            held,
            wiped,
        }
    }
}

/// A closed range of seqs of one incarnation that a gap event covers.
type Gaps = Vec<(u64, u64)>;

#[derive(Debug, Default)]
pub struct Report {
    pub incarnations: usize,
    pub produced: u64,
    pub acked: u64,
    pub stored: u64,
    /// Stored a second time: must be 0.
    pub duplicates: u64,
    /// Acked, and neither stored nor in a gap: must be 0.
    pub acked_missing: u64,
    /// Never stored, not in a gap, not held by a spool: must be 0.
    pub unaccounted: u64,
    /// Never stored, held by a wiped spool, announced by a new incarnation.
    pub lost_with_wiped_spool: u64,
    /// Never stored, still waiting in a live spool.
    pub still_spooled: u64,
    /// Never stored, covered by a gap event (agent's or bus's).
    pub in_gaps: u64,
    pub gap_events: u64,
    pub incarnation_events: u64,
    /// Wiped incarnations that no incarnation event names as previous.
    pub unannounced_wipes: u64,
    /// The first few violations, for the failure message.
    pub problems: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.duplicates == 0
            && self.acked_missing == 0
            && self.unaccounted == 0
            && self.unannounced_wipes == 0
    }

    fn problem(&mut self, p: String) {
        if self.problems.len() < 20 {
            self.problems.push(p);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "incarnations={} produced={} acked={} stored={} duplicates={} acked_missing={} \
             unaccounted={} lost_with_wiped_spool={} still_spooled={} in_gaps={} gap_events={} \
             incarnation_events={} unannounced_wipes={}",
            self.incarnations,
            self.produced,
            self.acked,
            self.stored,
            self.duplicates,
            self.acked_missing,
            self.unaccounted,
            self.lost_with_wiped_spool,
            self.still_spooled,
            self.in_gaps,
            self.gap_events,
            self.incarnation_events,
            self.unannounced_wipes
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

fn in_gaps(gaps: &Gaps, seq: u64) -> bool {
    gaps.iter().any(|&(a, b)| a <= seq && seq <= b)
}

/// Checks `stored` (every event the bus holds) against `spools`.
pub fn check(stored: &[Event], spools: &[SpoolView]) -> Report {
    let mut r = Report::default();
    let mut seen: HashMap<(String, u64), BTreeSet<u64>> = HashMap::new();
    let mut gaps: HashMap<(String, u64), Gaps> = HashMap::new();
    let mut announced_previous: BTreeSet<(String, u64)> = BTreeSet::new();
    for e in stored {
        let key = (e.agent_id.clone(), e.incarnation);
        match &e.payload {
            Some(Payload::Gap(g)) => {
                r.gap_events += 1;
                gaps.entry(key.clone())
                    .or_default()
                    .push((g.first_seq, g.last_seq));
            }
            Some(Payload::IncarnationStarted(i)) => {
                r.incarnation_events += 1;
                announced_previous.insert((e.agent_id.clone(), i.previous_incarnation));
            }
            _ => {}
        }
        if e.seq == 0 {
            continue; // the bus's own events
        }
        if !seen.entry(key).or_default().insert(e.seq) {
            r.duplicates += 1;
            r.problem(format!(
                "{} incarnation {:016x} seq {} stored twice",
                e.agent_id, e.incarnation, e.seq
            ));
        } else {
            r.stored += 1;
        }
    }
    let mut by_key: BTreeMap<(String, u64), &SpoolView> = BTreeMap::new();
    for s in spools {
        by_key.insert((s.agent_id.clone(), s.incarnation), s);
    }
    r.incarnations = by_key.len();
    let empty = BTreeSet::new();
    let no_gaps = Gaps::new();
    for (key, s) in &by_key {
        let got = seen.get(key).unwrap_or(&empty);
        let gaps = gaps.get(key).unwrap_or(&no_gaps);
        r.produced += s.next_seq - 1;
        r.acked += s.acked_seq;
        if s.wiped && !announced_previous.contains(key) {
            r.unannounced_wipes += 1;
            r.problem(format!(
                "{} incarnation {:016x} was wiped and no incarnation event names it",
                key.0, key.1
            ));
        }
        for seq in 1..s.next_seq {
            if got.contains(&seq) {
                continue;
            }
            if in_gaps(gaps, seq) {
                r.in_gaps += 1;
                continue;
            }
            if seq <= s.acked_seq {
                r.acked_missing += 1;
                r.problem(format!(
                    "{} incarnation {:016x} seq {seq} was acked (up to {}) but is not stored",
                    key.0, key.1, s.acked_seq
                ));
            } else if s.held.contains(&seq) && s.wiped {
                r.lost_with_wiped_spool += 1;
            } else if s.held.contains(&seq) {
                r.still_spooled += 1;
            } else {
                r.unaccounted += 1;
                r.problem(format!(
                    "{} incarnation {:016x} seq {seq} was never stored, is not spooled and no gap covers it",
                    key.0, key.1
                ));
            }
        }
    }
    // Stored events of an incarnation no spool knows about mean the checker
    // was not shown every spool: say so rather than pass.
    for key in seen.keys() {
        if !by_key.contains_key(key) {
            r.unaccounted += 1;
            r.problem(format!(
                "events of {} incarnation {:016x} are stored but no spool of it was checked",
                key.0, key.1
            ));
        }
    }
    r
}
