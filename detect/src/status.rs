//! What became of each rule when a rule set was loaded.

use serde::Serialize;

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
