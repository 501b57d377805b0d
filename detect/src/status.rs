//! What became of each rule when a rule set was loaded.

use serde::{Deserialize, Serialize};

/// One rule as loaded (or not).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleStatus {
    /// `NAME` or `NAMESPACE/NAME`; the file for a file that did not parse.
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// Compiled, tests passed, and evaluating.
    pub loaded: bool,
    /// Why it is not loaded (a compile error with its position, or the
    /// failed tests); empty when loaded.
    pub error: String,
    /// Inline tests run.
    pub tests: usize,
    /// Of those, passed.
    pub tests_passed: usize,
}

/// What one rule matched, for the rule's status: matches in hourly buckets
/// by the stored time of the events evaluated, and the newest match.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleActivity {
    /// (hour since the epoch, matches), oldest first, the last 24 hours.
    hours: std::collections::VecDeque<(i64, u64)>,
    /// Stored time (unix ns) of the newest event evaluated at the last match.
    pub last_match: i64,
    /// Mean CEL time over the detector's budget.
    pub degraded: bool,
}

const HOUR_NS: i64 = 3_600_000_000_000;

impl RuleActivity {
    /// Counts `n` matches at stored time `at`.
    pub fn record(&mut self, n: u64, at: i64) {
        if n == 0 {
            return;
        }
        let hour = at.div_euclid(HOUR_NS);
        match self.hours.back_mut() {
            Some((h, c)) if *h == hour => *c += n,
            // Events are evaluated in stored order; an older hour (another
            // shard's clock) joins the newest bucket rather than reorder.
            Some((h, c)) if *h > hour => *c += n,
            _ => self.hours.push_back((hour, n)),
        }
        self.last_match = self.last_match.max(at);
    }

    /// Matches in the 24 hours up to `now` (unix ns).
    pub fn last_24h(&mut self, now: i64) -> u64 {
        let oldest = now.div_euclid(HOUR_NS) - 23;
        while self.hours.front().is_some_and(|(h, _)| *h < oldest) {
            self.hours.pop_front();
        }
        self.hours.iter().map(|(_, c)| c).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_counts_matches_of_the_last_24_hours_by_stored_time() {
        let h = HOUR_NS;
        let mut a = RuleActivity::default();
        a.record(0, 5 * h);
        assert_eq!(
            (a.last_24h(5 * h), a.last_match),
            (0, 0),
            "no match, no time"
        );
        a.record(2, 5 * h + 10);
        a.record(3, 6 * h + 20);
        // A late event from another shard's clock joins the newest hour.
        a.record(1, 4 * h);
        assert_eq!(a.last_match, 6 * h + 20);
        assert_eq!(a.last_24h(7 * h), 6);
        // Hour 5 leaves the window at hour 29, hour 6 at hour 30.
        assert_eq!(a.last_24h(28 * h + 1), 6);
        assert_eq!(a.last_24h(29 * h), 4);
        assert_eq!(a.last_24h(30 * h), 0);
        assert_eq!(
            a.last_match,
            6 * h + 20,
            "the last match outlives the window"
        );
    }
}
