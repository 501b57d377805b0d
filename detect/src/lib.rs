//! Detection for AMOSKYS: rules written as `DetectionRule` and
//! `ClusterDetectionRule` documents, their CEL conditions compiled and
//! checked against the fields events have, their inline tests, and the
//! engine that evaluates stored events and decides which alerts to write.
//!
//! Everything here is pure: no I/O, no clock. The bus feeds the engine
//! stored events in offset order and writes what it returns; the operator
//! and `amoskys rules test` compile rules and run their tests with the same
//! code, so a rule that passes there behaves the same on the bus.

// Every public item is documented, and stays so.
#![warn(missing_docs)]

pub mod compile;
pub mod engine;
pub mod rule;
pub mod sample;
pub mod starter;
pub mod status;
pub mod testing;
pub mod view;

pub use compile::{CompileError, CompiledRule, RuleSet, compile};
pub use engine::{Decision, DetectState, Engine, RuleStats};
pub use rule::{RuleDocument, RuleFileError, RuleSpec, parse_rule_file};
pub use status::{RuleActivity, RuleStatus};
pub use testing::{TestOutcome, run_tests};

/// The agent id the detector of shard `shard` writes its alerts under; ids
/// with the `amoskys:` prefix are reserved for the bus and refused from agents.
pub fn detector_agent_id(shard: u32) -> String {
    format!("{RESERVED_AGENT_PREFIX}detect/{shard}")
}

/// Agent ids that only the bus itself writes under.
pub const RESERVED_AGENT_PREFIX: &str = "amoskys:";

/// The collector name alerts from rules carry.
pub const DETECT_COLLECTOR: &str = "detect";

/// The digest of a rule set made of the rule files `texts` (in file name
/// order): the operator and the bus compute it alike, so the operator can
/// tell from a bus's Stats whether it runs the set it was handed.
pub fn rule_set_digest<'a>(texts: impl IntoIterator<Item = &'a str>) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for t in texts {
        h.update(t.as_bytes());
        // A file boundary counts: two files are not their concatenation.
        h.update(&[0]);
    }
    format!("{:032x}", h.digest128())
}
