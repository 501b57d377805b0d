//! From a rule document to a rule the engine runs: the condition parsed and
//! every field it names checked against the event schema (with the line and
//! column of what is wrong), conjuncts that are plain comparisons lifted
//! into prefilters that run without CEL, exceptions as sets, windows
//! parsed; then the rule's inline tests.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use cel::common::ast::{Expr, LiteralValue};
use cel::{Env, IdedExpr, Program, Value};

use crate::rule::{Mode, RuleDocument, RuleSeverity, Scope};
use crate::view::{Fields, PAYLOADS, Scalar, Ty, View, field_type, text};

/// Why a rule did not compile: the field, and for a condition the line and
/// column (from 1) in it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}{}: {message}", position(*.line, *.column))]
pub struct CompileError {
    /// The spec field, e.g. `spec.condition`, `spec.dedup.by[0]`.
    pub field: String,
    /// Line in the condition (0 when the error is not in one).
    pub line: usize,
    /// Column in that line.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

fn position(line: usize, column: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(" (line {line}, column {column})")
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> CompileError {
    CompileError {
        field: field.into(),
        line: 0,
        column: 0,
        message: message.into(),
    }
}

/// A check that runs before CEL, lifted from the condition: a field
/// compared with constants. Every prefilter of a rule must hold for a match.
#[derive(Clone, Debug, PartialEq)]
enum Prefilter {
    /// A string field equal to one of `eq` or starting with one of `prefixes`.
    Str {
        path: String,
        eq: HashSet<String>,
        prefixes: Vec<String>,
    },
    /// A string field not equal to a constant.
    NotEq(String, String),
    /// A number field equal to one of these.
    Int(String, HashSet<i64>),
}

impl Prefilter {
    fn holds(&self, v: &dyn Fields) -> bool {
        match self {
            Self::Str { path, eq, prefixes } => match v.field(path) {
                Some(Scalar::Str(s)) => {
                    eq.contains(s.as_ref()) || prefixes.iter().any(|p| s.starts_with(p.as_str()))
                }
                _ => false,
            },
            Self::NotEq(path, c) => match v.field(path) {
                Some(Scalar::Str(s)) => s.as_ref() != c,
                _ => true,
            },
            Self::Int(path, set) => match v.field(path) {
                Some(Scalar::Int(n)) => set.contains(&n),
                _ => false,
            },
        }
    }

    fn path(&self) -> &str {
        match self {
            Self::Str { path, .. } | Self::NotEq(path, _) | Self::Int(path, _) => path,
        }
    }

    /// The check that holds when either holds, where both test one field
    /// the same way.
    fn or(self, other: Self) -> Option<Self> {
        match (self, other) {
            (
                Self::Str {
                    path,
                    mut eq,
                    mut prefixes,
                },
                Self::Str {
                    path: p2,
                    eq: e2,
                    prefixes: x2,
                },
            ) if path == p2 => {
                eq.extend(e2);
                prefixes.extend(x2);
                Some(Self::Str { path, eq, prefixes })
            }
            (Self::Int(path, mut a), Self::Int(p2, b)) if path == p2 => {
                a.extend(b);
                Some(Self::Int(path, a))
            }
            _ => None,
        }
    }
}

/// A threshold, parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct ThresholdRule {
    /// Key fields.
    pub by: Vec<String>,
    /// Field counted by distinct value, or None for matches.
    pub distinct: Option<String>,
    /// Count that fires.
    pub count: u32,
    /// Window (ns).
    pub window_ns: i64,
}

/// A rule ready to run.
pub struct CompiledRule {
    /// `NAME` or `NAMESPACE/NAME`.
    pub name: String,
    /// The spec's generation.
    pub generation: i64,
    /// Namespaced rules see only their namespace's pods.
    pub scope: Scope,
    namespace: String,
    namespaces: Vec<String>,
    pod_selector: BTreeMap<String, String>,
    node_events: bool,
    /// The payload type it matches.
    pub payload: &'static str,
    pub(crate) kinds: Vec<String>,
    collectors: Vec<String>,
    program: Option<Program>,
    lists: Value,
    prefilters: Vec<Prefilter>,
    exceptions: Vec<(Vec<String>, HashSet<Vec<String>>)>,
    /// Dedup key fields (empty: the summary) and window (ns); None: no dedup.
    pub dedup: Option<(Vec<String>, i64)>,
    /// Threshold, where the rule has one.
    pub threshold: Option<ThresholdRule>,
    /// Alert or dry run.
    pub mode: Mode,
    /// The alerts' severity.
    pub severity: RuleSeverity,
    /// Summary template.
    pub summary: String,
    /// Description.
    pub description: String,
    /// Labels alerts carry.
    pub labels: BTreeMap<String, String>,
}

impl std::fmt::Debug for CompiledRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledRule")
            .field("name", &self.name)
            .field("payload", &self.payload)
            .field("prefilters", &self.prefilters)
            .field("cel", &self.program.is_some())
            .finish()
    }
}

/// What evaluating a rule against one event gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eval {
    /// Out of its scope, kinds or collectors, or a prefilter failed: no CEL ran.
    Skipped,
    /// An exception matched.
    Excepted,
    /// The condition ran and was false.
    NoMatch,
    /// It matched (`cel`: whether CEL ran for it).
    Match {
        /// CEL ran.
        cel: bool,
    },
    /// The condition failed to evaluate (a missing map key, a bad type).
    Error,
}

impl CompiledRule {
    /// Whether the rule sees `v` at all: payload kind, collector and scope.
    fn selects(&self, v: &dyn Fields, payload: &str, kind: &str, collector: &str) -> bool {
        if payload != self.payload
            || (!self.kinds.is_empty() && !self.kinds.iter().any(|k| k == kind))
            || (!self.collectors.is_empty() && !self.collectors.iter().any(|c| c == collector))
        {
            return false;
        }
        let ns = v.namespace();
        match self.scope {
            Scope::Namespaced => {
                if ns != self.namespace {
                    return false;
                }
            }
            Scope::Cluster => {
                if ns.is_empty() {
                    return self.node_events && self.pod_selector.is_empty();
                }
                if !self.namespaces.is_empty() && !self.namespaces.iter().any(|n| n == ns) {
                    return false;
                }
            }
        }
        self.pod_selector
            .iter()
            .all(|(k, want)| v.pod_label(k) == Some(want.as_str()))
    }

    /// The checks that need no CEL: what the rule selects, its prefilters
    /// and exceptions. Some(outcome) when they decide; None when the
    /// condition must run.
    pub fn precheck(
        &self,
        v: &dyn Fields,
        payload: &str,
        kind: &str,
        collector: &str,
    ) -> Option<Eval> {
        if !self.selects(v, payload, kind, collector) || !self.prefilters.iter().all(|p| p.holds(v))
        {
            return Some(Eval::Skipped);
        }
        for (fields, values) in &self.exceptions {
            let tuple: Vec<String> = fields
                .iter()
                .map(|p| v.field(p).map(|s| s.text()).unwrap_or_default())
                .collect();
            if values.contains(&tuple) {
                return Some(Eval::Excepted);
            }
        }
        if self.program.is_none() {
            return Some(Eval::Match { cel: false });
        }
        None
    }

    /// Runs the condition; `ctx` binds the event's variables.
    pub fn run(&self, ctx: &cel::Context) -> Eval {
        let Some(program) = &self.program else {
            return Eval::Match { cel: false };
        };
        let mut scope = ctx.new_inner_scope();
        scope.add_variable_from_value("lists", self.lists.clone());
        match program.execute(&scope) {
            Ok(Value::Bool(true)) => Eval::Match { cel: true },
            Ok(Value::Bool(false)) => Eval::NoMatch,
            _ => Eval::Error,
        }
    }

    /// The summary with `{field.path}` replaced by the event's values.
    pub fn render_summary(&self, v: &View) -> String {
        render(&self.summary, |p| v.get(p).map(text))
    }

    /// The values of `fields` in `v`, as a key.
    pub fn key(fields: &[String], v: &dyn Fields) -> Vec<String> {
        fields
            .iter()
            .map(|p| v.field(p).map(|s| s.text()).unwrap_or_default())
            .collect()
    }
}

/// `{path}` placeholders in `template` filled by `get` (unknown ones left as written).
fn render(template: &str, get: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                let path = &after[..close];
                match get(path) {
                    Some(v) => out.push_str(&v),
                    None => {
                        out.push('{');
                        out.push_str(path);
                        out.push('}');
                    }
                }
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn placeholders(template: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        out.push(&after[..close]);
        rest = &after[close + 1..];
    }
    out
}

/// The CEL environment rules compile and run in: the standard library and
/// the strings and lists extensions.
pub fn env() -> Arc<Env> {
    let mut env = Env::stdlib();
    // Both extensions are part of the crate; adding them to a fresh
    // environment cannot conflict with anything.
    let _ = env.add_extension(cel::extensions::strings);
    let _ = env.add_extension(cel::extensions::lists);
    Arc::new(env)
}

fn duration_ns(field: &str, s: &str) -> Result<i64, CompileError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        err(
            field,
            format!("{s:?} is not a duration like 10s or 5m: {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(err(field, "must be longer than 0s"));
    }
    Ok(d.as_nanos().min(i64::MAX as u128) as i64)
}

fn check_path(field: &str, payload: &str, path: &str) -> Result<Ty, CompileError> {
    field_type(payload, path).ok_or_else(|| {
        err(
            field,
            format!("{path}: no such field for {payload} events (see docs/detection.md)"),
        )
    })
}

/// The longest condition taken, in bytes.
pub const MAX_CONDITION_BYTES: usize = 4096;
/// The deepest nesting of brackets a condition may have. CEL's parser
/// recurses through a dozen grammar rules per bracket, about 150 KiB of
/// stack per level in a debug build (55 levels aborted the fuzzer), and a
/// rule must never take the bus or the operator down.
pub const MAX_CONDITION_NESTING: usize = 12;
/// The deepest expression tree a condition may have. Evaluation recurses
/// once per level, so this bounds the stack a rule needs when it runs;
/// `!!!…` or `a.b.c…` chains are deep without a bracket.
pub const MAX_EXPRESSION_DEPTH: usize = 48;
/// The stack of the threads that parse, check and run rules. Parsing at
/// the nesting limit needs about 3 MiB in a debug build, and a default
/// thread (2 MiB, tokio's workers and the test harness) is not enough;
/// the pages are only committed as they are touched.
pub const RULE_STACK_BYTES: usize = 32 << 20;

/// Runs `f` on a thread with [`RULE_STACK_BYTES`] of stack and waits for it.
pub fn on_rule_stack<T: Send>(f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("amoskys-rule".into())
            .stack_size(RULE_STACK_BYTES)
            .spawn_scoped(s, f)?;
        h.join()
            .map_err(|_| std::io::Error::other("the rule thread panicked"))
    })
}

/// Refuses a condition too long or too deeply nested for the parser,
/// naming the line and column where it goes too deep.
fn check_shape(condition: &str) -> Result<(), CompileError> {
    if condition.len() > MAX_CONDITION_BYTES {
        return Err(err(
            "spec.condition",
            format!(
                "{} bytes; a condition has at most {MAX_CONDITION_BYTES} (put long lists in spec.lists)",
                condition.len()
            ),
        ));
    }
    let (mut depth, mut line, mut column) = (0usize, 1usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in condition.chars() {
        column += 1;
        if c == '\n' {
            line += 1;
            column = 0;
        }
        if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' => quote = Some(c),
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_CONDITION_NESTING {
                    return Err(CompileError {
                        field: "spec.condition".into(),
                        line,
                        column,
                        message: format!(
                            "nested more than {MAX_CONDITION_NESTING} brackets deep; split it with lists or simpler terms"
                        ),
                    });
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Compiles one rule document: every error names the field and, in the
/// condition, the position. The work runs on a thread of its own, with
/// the stack the parser needs whatever thread calls this.
pub fn compile(doc: &RuleDocument, env: &Arc<Env>) -> Result<CompiledRule, CompileError> {
    on_rule_stack(|| compile_here(doc, env))
        .unwrap_or_else(|e| Err(err("spec.condition", format!("not compiled: {e}"))))
}

fn compile_here(doc: &RuleDocument, env: &Arc<Env>) -> Result<CompiledRule, CompileError> {
    let spec = &doc.spec;
    let scope = doc
        .scope()
        .ok_or_else(|| err("kind", format!("{:?} is not a rule kind", doc.kind)))?;
    let namespace = match scope {
        Scope::Namespaced => {
            let ns = doc.metadata.namespace.clone().unwrap_or_default();
            if ns.is_empty() {
                return Err(err(
                    "metadata.namespace",
                    "a DetectionRule needs its namespace",
                ));
            }
            if !spec.namespaces.is_empty() {
                return Err(err(
                    "spec.namespaces",
                    "only a ClusterDetectionRule chooses namespaces; a DetectionRule sees its own",
                ));
            }
            if spec.node_events == Some(true) {
                return Err(err(
                    "spec.nodeEvents",
                    "only a ClusterDetectionRule sees node events",
                ));
            }
            ns
        }
        Scope::Cluster => String::new(),
    };
    let (payload, _, kinds) = PAYLOADS
        .iter()
        .find(|p| p.0 == spec.selects.event)
        .copied()
        .ok_or_else(|| {
            let names: Vec<_> = PAYLOADS.iter().map(|p| p.0).collect();
            err(
                "spec.match.event",
                format!(
                    "{:?} is not one of {}",
                    spec.selects.event,
                    names.join(", ")
                ),
            )
        })?;
    for (n, k) in spec.selects.kinds.iter().enumerate() {
        if !kinds.contains(&k.as_str()) {
            return Err(err(
                format!("spec.match.kinds[{n}]"),
                if kinds.is_empty() {
                    format!("{payload} events have no kinds")
                } else {
                    format!("{k:?} is not one of {}", kinds.join(", "))
                },
            ));
        }
    }
    for name in spec.lists.keys() {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err(
                format!("spec.lists.{name}"),
                "a list name is letters, digits and _",
            ));
        }
    }
    let condition = spec.condition.trim();
    if condition.is_empty() {
        return Err(err("spec.condition", "missing"));
    }
    check_shape(condition)?;
    let program = env.compile(condition).map_err(|e| {
        let first = e.errors.first();
        CompileError {
            field: "spec.condition".into(),
            line: first.map_or(1, |p| p.pos.0.max(1) as usize),
            column: first.map_or(1, |p| p.pos.1.max(0) as usize + 1),
            message: first.map_or_else(|| e.to_string(), |p| p.msg.clone()),
        }
    })?;
    let mut checker = Checker {
        payload,
        lists: &spec.lists,
        source: condition,
        program: &program,
        bound: Vec::new(),
        depth: 0,
    };
    checker.walk(program.expression())?;
    let mut prefilters = Vec::new();
    let mut all_lifted = true;
    for c in conjuncts(program.expression()) {
        if matches!(&c.expr, Expr::Literal(LiteralValue::Boolean(b)) if **b) {
            continue;
        }
        match necessary(c, payload, &spec.lists).into_iter().next() {
            Some((p, exact)) => {
                prefilters.push(p);
                all_lifted &= exact;
            }
            None => all_lifted = false,
        }
    }
    for p in placeholders(&spec.summary) {
        check_path("spec.summary", payload, p)?;
    }
    let mut exceptions = Vec::new();
    for (n, x) in spec.exceptions.iter().enumerate() {
        let at = format!("spec.exceptions[{n}]");
        if x.fields.is_empty() {
            return Err(err(format!("{at}.fields"), "at least one field"));
        }
        for f in &x.fields {
            check_path(&format!("{at}.fields"), payload, f)?;
        }
        let mut set = HashSet::new();
        for (m, vals) in x.values.iter().enumerate() {
            if vals.len() != x.fields.len() {
                return Err(err(
                    format!("{at}.values[{m}]"),
                    format!("{} values for {} fields", vals.len(), x.fields.len()),
                ));
            }
            set.insert(vals.clone());
        }
        exceptions.push((x.fields.clone(), set));
    }
    let dedup = match &spec.dedup {
        None => None,
        Some(d) => {
            for (n, f) in d.by.iter().enumerate() {
                check_path(&format!("spec.dedup.by[{n}]"), payload, f)?;
            }
            Some((d.by.clone(), duration_ns("spec.dedup.window", &d.window)?))
        }
    };
    let threshold = match &spec.threshold {
        None => None,
        Some(t) => {
            for (n, f) in t.by.iter().enumerate() {
                check_path(&format!("spec.threshold.by[{n}]"), payload, f)?;
            }
            if let Some(d) = &t.distinct {
                check_path("spec.threshold.distinct", payload, d)?;
            }
            if t.count == 0 {
                return Err(err("spec.threshold.count", "must be at least 1"));
            }
            Some(ThresholdRule {
                by: t.by.clone(),
                distinct: t.distinct.clone(),
                count: t.count,
                window_ns: duration_ns("spec.threshold.window", &t.window)?,
            })
        }
    };
    if spec.summary.trim().is_empty() {
        return Err(err("spec.summary", "missing"));
    }
    let lists = Value::Map(cel::objects::Map {
        map: Arc::new(
            spec.lists
                .iter()
                .map(|(k, v)| {
                    (
                        cel::objects::Key::from(k.as_str()),
                        Value::List(Arc::new(
                            v.iter()
                                .map(|s| Value::String(Arc::new(s.clone())))
                                .collect(),
                        )),
                    )
                })
                .collect::<HashMap<_, _>>(),
        ),
    });
    Ok(CompiledRule {
        name: doc.qualified_name(),
        generation: doc.metadata.generation.unwrap_or(0),
        scope,
        namespace,
        namespaces: spec.namespaces.clone(),
        pod_selector: spec.pod_selector.clone(),
        node_events: spec.node_events.unwrap_or(true),
        payload,
        kinds: spec.selects.kinds.clone(),
        collectors: spec.selects.collectors.clone(),
        // Every conjunct a prefilter: the prefilters are the condition.
        program: (!all_lifted).then_some(program),
        lists,
        prefilters,
        exceptions,
        dedup,
        threshold,
        mode: spec.mode,
        severity: spec.severity,
        summary: spec.summary.clone(),
        description: spec.description.clone(),
        labels: spec.labels.clone(),
    })
}

/// Walks a condition and refuses unknown variables, fields and lists.
struct Checker<'a> {
    payload: &'static str,
    lists: &'a BTreeMap<String, Vec<String>>,
    source: &'a str,
    program: &'a Program,
    /// Comprehension variables in scope.
    bound: Vec<String>,
    /// Levels of the tree above the node being walked.
    depth: usize,
}

impl Checker<'_> {
    fn fail(&self, id: u64, message: String) -> CompileError {
        let (line, column) = self
            .program
            .source_info()
            .offset_for(id)
            .map_or((1, 1), |(start, _)| line_col(self.source, start as usize));
        CompileError {
            field: "spec.condition".into(),
            line,
            column,
            message,
        }
    }

    fn walk(&mut self, e: &IdedExpr) -> Result<(), CompileError> {
        if self.depth >= MAX_EXPRESSION_DEPTH {
            return Err(self.fail(
                e.id,
                format!("more than {MAX_EXPRESSION_DEPTH} levels deep; split it with lists or simpler terms"),
            ));
        }
        self.depth += 1;
        let r = self.walk_node(e);
        self.depth -= 1;
        r
    }

    fn walk_node(&mut self, e: &IdedExpr) -> Result<(), CompileError> {
        match &e.expr {
            Expr::Ident(name) => {
                if self.bound.iter().any(|b| b == name) {
                    return Ok(());
                }
                if name == "lists" || crate::view::variable(self.payload, name).is_some() {
                    return Ok(());
                }
                Err(self.fail(e.id, self.unknown_variable(name)))
            }
            Expr::Select(sel) => {
                if let Some(path) = select_path(e)
                    && let Some(root) = path.split('.').next()
                    && !self.bound.iter().any(|b| b == root)
                {
                    if self.depth + path.split('.').count() - 1 > MAX_EXPRESSION_DEPTH {
                        return Err(self.fail(
                            e.id,
                            format!("more than {MAX_EXPRESSION_DEPTH} levels deep; split it with lists or simpler terms"),
                        ));
                    }
                    return self.check_select(root_id(e), &path);
                }
                self.walk(&sel.operand)
            }
            Expr::Call(call) => {
                if let Some(t) = &call.target {
                    self.walk(t)?;
                }
                call.args.iter().try_for_each(|a| self.walk(a))
            }
            Expr::Comprehension(c) => {
                self.walk(&c.iter_range)?;
                self.walk(&c.accu_init)?;
                let n = self.bound.len();
                self.bound.push(c.iter_var.clone());
                if let Some(v) = &c.iter_var2 {
                    self.bound.push(v.clone());
                }
                self.bound.push(c.accu_var.clone());
                let r = [&c.loop_cond, &c.loop_step, &c.result]
                    .into_iter()
                    .try_for_each(|x| self.walk(x));
                self.bound.truncate(n);
                r
            }
            Expr::List(l) => l.elements.iter().try_for_each(|x| self.walk(x)),
            Expr::Map(m) => m.entries.iter().try_for_each(|entry| match &entry.expr {
                cel::common::ast::EntryExpr::MapEntry(me) => {
                    self.walk(&me.key)?;
                    self.walk(&me.value)
                }
                cel::common::ast::EntryExpr::StructField(sf) => self.walk(&sf.value),
            }),
            Expr::Struct(s) => s.entries.iter().try_for_each(|entry| match &entry.expr {
                cel::common::ast::EntryExpr::StructField(sf) => self.walk(&sf.value),
                cel::common::ast::EntryExpr::MapEntry(me) => {
                    self.walk(&me.key)?;
                    self.walk(&me.value)
                }
            }),
            Expr::Literal(_) | Expr::Unspecified => Ok(()),
        }
    }

    fn unknown_variable(&self, name: &str) -> String {
        format!(
            "{name}: no such variable in rules on {} events (event, k8s, {}, lists)",
            self.payload, self.payload
        )
    }

    /// `a.b.c` rooted at a variable: every step must be a field; past a
    /// labels map anything goes.
    fn check_select(&self, id: u64, path: &str) -> Result<(), CompileError> {
        let mut parts = path.split('.');
        let root = parts.next().unwrap_or_default();
        if root == "lists" {
            let name = parts.next().unwrap_or_default();
            if !self.lists.contains_key(name) {
                let have: Vec<_> = self.lists.keys().map(String::as_str).collect();
                return Err(self.fail(
                    id,
                    format!(
                        "lists.{name}: no such list (spec.lists has: {})",
                        if have.is_empty() {
                            "none".into()
                        } else {
                            have.join(", ")
                        }
                    ),
                ));
            }
            return Ok(());
        }
        if crate::view::variable(self.payload, root).is_none() {
            return Err(self.fail(id, self.unknown_variable(root)));
        }
        let mut sofar = root.to_string();
        for part in parts {
            if matches!(field_type(self.payload, &sofar), Some(Ty::StrMap)) {
                return Ok(());
            }
            sofar.push('.');
            sofar.push_str(part);
            if field_type(self.payload, &sofar).is_none() {
                return Err(self.fail(
                    id,
                    format!(
                        "{sofar}: no such field for {} events (see docs/detection.md)",
                        self.payload
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let mut line = 1;
    let mut col = 1;
    for (i, c) in source.chars().enumerate() {
        if i == offset {
            break;
        }
        if c == '\n' {
            line += 1;
            col = 1;
        } else {
            col += 1;
        }
    }
    (line, col)
}

/// The id of the identifier a selection chain starts at (where it is written).
fn root_id(e: &IdedExpr) -> u64 {
    match &e.expr {
        Expr::Select(s) => root_id(&s.operand),
        _ => e.id,
    }
}

/// `a.b.c` for a chain of field selections on an identifier.
fn select_path(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Ident(n) => Some(n.clone()),
        Expr::Select(s) => Some(format!("{}.{}", select_path(&s.operand)?, s.field)),
        _ => None,
    }
}

/// The conjuncts of a condition's top-level `&&`s.
fn conjuncts(e: &IdedExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        Expr::Call(c) if c.func_name == "_&&_" && c.target.is_none() => {
            c.args.iter().flat_map(conjuncts).collect()
        }
        _ => vec![e],
    }
}

fn string_literal(e: &IdedExpr) -> Option<String> {
    match &e.expr {
        Expr::Literal(LiteralValue::String(s)) => Some(s.to_string()),
        _ => None,
    }
}

/// Checks that must hold for `e` to be true, each with whether it is
/// exactly `e` (then `e` needs no CEL). An atom `f == 'x'`, `f != 'x'`,
/// `f in lists.L`, `f in ['a', 'b']`, `f in [1, 2]`, `f == 3`,
/// `f.startsWith('x')` is exact; a conjunction offers each conjunct's
/// checks; a disjunction offers the union of one check per disjunct on the
/// same field (`exe.startsWith('/a') || exe.startsWith('/b')`).
fn necessary(
    e: &IdedExpr,
    payload: &str,
    lists: &BTreeMap<String, Vec<String>>,
) -> Vec<(Prefilter, bool)> {
    let Expr::Call(c) = &e.expr else {
        return Vec::new();
    };
    if c.target.is_none() && c.func_name == "_&&_" {
        let parts = conjuncts(e);
        let single = parts.len() == 1;
        return parts
            .into_iter()
            .flat_map(|x| necessary(x, payload, lists))
            .map(|(p, exact)| (p, exact && single))
            .collect();
    }
    if c.target.is_none() && c.func_name == "_||_" {
        let options: Vec<Vec<(Prefilter, bool)>> = disjuncts(e)
            .into_iter()
            .map(|x| necessary(x, payload, lists))
            .collect();
        let Some(first) = options.first() else {
            return Vec::new();
        };
        // A field every disjunct checks; the union of those checks.
        for (seed, _) in first {
            let mut merged: Option<(Prefilter, bool)> = None;
            for opts in &options {
                let Some((p, exact)) = opts.iter().find(|(p, _)| p.path() == seed.path()) else {
                    merged = None;
                    break;
                };
                merged = match merged {
                    None => Some((p.clone(), *exact)),
                    Some((m, ex)) => m.or(p.clone()).map(|u| (u, ex && *exact)),
                };
                if merged.is_none() {
                    break;
                }
            }
            if let Some(m) = merged {
                return vec![m];
            }
        }
        return Vec::new();
    }
    lift(e, payload, lists)
        .map(|p| vec![(p, true)])
        .unwrap_or_default()
}

/// The disjuncts of an `||`.
fn disjuncts(e: &IdedExpr) -> Vec<&IdedExpr> {
    match &e.expr {
        Expr::Call(c) if c.func_name == "_||_" && c.target.is_none() => {
            c.args.iter().flat_map(disjuncts).collect()
        }
        _ => vec![e],
    }
}

fn int_literal(e: &IdedExpr) -> Option<i64> {
    match &e.expr {
        Expr::Literal(LiteralValue::Int(n)) => Some(**n),
        _ => None,
    }
}

/// An atom as an exact prefilter.
fn lift(e: &IdedExpr, payload: &str, lists: &BTreeMap<String, Vec<String>>) -> Option<Prefilter> {
    let Expr::Call(c) = &e.expr else { return None };
    let field_of =
        |x: &IdedExpr, ty: Ty| select_path(x).filter(|p| field_type(payload, p) == Some(ty));
    let string_field = |x: &IdedExpr| field_of(x, Ty::Str);
    let int_field = |x: &IdedExpr| field_of(x, Ty::Int);
    let one = |path: String, lit: String| Prefilter::Str {
        path,
        eq: HashSet::from([lit]),
        prefixes: Vec::new(),
    };
    match (c.func_name.as_str(), c.target.as_deref(), c.args.as_slice()) {
        ("_==_", None, [a, b]) => {
            if let (Some(f), Some(n)) = (int_field(a), int_literal(b)) {
                return Some(Prefilter::Int(f, HashSet::from([n])));
            }
            if let (Some(f), Some(n)) = (int_field(b), int_literal(a)) {
                return Some(Prefilter::Int(f, HashSet::from([n])));
            }
            match (string_field(a), string_field(b)) {
                (Some(f), _) => Some(one(f, string_literal(b)?)),
                (None, Some(f)) => Some(one(f, string_literal(a)?)),
                _ => None,
            }
        }
        ("_!=_", None, [a, b]) => {
            let (f, lit) = match (string_field(a), string_field(b)) {
                (Some(f), _) => (f, string_literal(b)?),
                (None, Some(f)) => (f, string_literal(a)?),
                _ => return None,
            };
            Some(Prefilter::NotEq(f, lit))
        }
        ("@in", None, [a, b]) => {
            if let Some(f) = int_field(a) {
                let Expr::List(l) = &b.expr else { return None };
                let set = l.elements.iter().map(int_literal).collect::<Option<_>>()?;
                return Some(Prefilter::Int(f, set));
            }
            let f = string_field(a)?;
            let eq: HashSet<String> = match &b.expr {
                Expr::List(l) => l
                    .elements
                    .iter()
                    .map(string_literal)
                    .collect::<Option<_>>()?,
                _ => {
                    let p = select_path(b)?;
                    let name = p.strip_prefix("lists.")?;
                    lists.get(name)?.iter().cloned().collect()
                }
            };
            Some(Prefilter::Str {
                path: f,
                eq,
                prefixes: Vec::new(),
            })
        }
        ("startsWith", Some(t), [arg]) => Some(Prefilter::Str {
            path: string_field(t)?,
            eq: HashSet::new(),
            prefixes: vec![string_literal(arg)?],
        }),
        _ => None,
    }
}

/// Rules that compiled, indexed by the payload type they match.
#[derive(Default)]
pub struct RuleSet {
    /// The rules, in load order.
    pub rules: Vec<Arc<CompiledRule>>,
    by_payload: HashMap<&'static str, Vec<usize>>,
    env: Option<Arc<Env>>,
}

impl std::fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSet")
            .field("rules", &self.rules)
            .finish()
    }
}

impl RuleSet {
    /// A set of compiled rules.
    pub fn new(rules: Vec<Arc<CompiledRule>>, env: Arc<Env>) -> Self {
        let mut by_payload: HashMap<&'static str, Vec<usize>> = HashMap::new();
        for (i, r) in rules.iter().enumerate() {
            by_payload.entry(r.payload).or_default().push(i);
        }
        Self {
            rules,
            by_payload,
            env: Some(env),
        }
    }

    /// The rules that may match events of `payload`.
    pub fn for_payload(&self, payload: &str) -> impl Iterator<Item = &Arc<CompiledRule>> {
        self.by_payload
            .get(payload)
            .into_iter()
            .flatten()
            .filter_map(|&i| self.rules.get(i))
    }

    /// The CEL environment.
    pub fn env(&self) -> Arc<Env> {
        self.env.clone().unwrap_or_else(env)
    }
}

/// Whether `mode` writes alerts.
pub fn writes_alerts(mode: Mode) -> bool {
    mode == Mode::Alert
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::parse_rule_file;

    fn doc(spec: &str) -> RuleDocument {
        let text = format!(
            "apiVersion: amoskys.io/v1alpha1\nkind: ClusterDetectionRule\nmetadata: {{name: r}}\nspec:\n{}",
            spec.lines().map(|l| format!("  {l}\n")).collect::<String>()
        );
        parse_rule_file("t.yaml", &text).unwrap().remove(0)
    }

    fn compile_err(spec: &str) -> CompileError {
        compile(&doc(spec), &env()).unwrap_err()
    }

    #[test]
    fn conditions_too_deep_or_too_long_are_refused_before_the_parser() {
        let nested = |n: usize| format!("{}process.name == 'sh'{}", "(".repeat(n), ")".repeat(n));
        let ok = format!(
            "match: {{event: process}}\ncondition: \"{}\"\nsummary: s",
            nested(MAX_CONDITION_NESTING)
        );
        assert!(compile(&doc(&ok), &env()).is_ok());
        // Brackets inside string literals do not count.
        let quoted = "match: {event: process}\ncondition: \"process.name == '((((((((((((((((((((('\"\nsummary: s";
        assert!(compile(&doc(quoted), &env()).is_ok());
        let e = compile_err(&format!(
            "match: {{event: process}}\ncondition: \"{}\"\nsummary: s",
            nested(200)
        ));
        assert_eq!(e.field, "spec.condition");
        assert_eq!((e.line, e.column), (1, MAX_CONDITION_NESTING + 1), "{e}");
        assert!(e.message.contains("nested more than"), "{e}");
        let long = format!(
            "match: {{event: process}}\ncondition: \"{}true\"\nsummary: s",
            "true && ".repeat(600)
        );
        let e = compile_err(&long);
        assert!(e.message.contains("at most 4096"), "{e}");
    }

    #[test]
    fn conditions_too_deep_without_brackets_are_refused_with_the_position() {
        // Each `c ? x :` nests the rest one level deeper; `==` and
        // `process.name` (a select over an identifier) add three.
        let ternaries = |n: usize| {
            format!(
                "match: {{event: process}}\ncondition: \"{}process.name == 'sh'\"\nsummary: s",
                "false ? true : ".repeat(n)
            )
        };
        let r = compile(&doc(&ternaries(MAX_EXPRESSION_DEPTH - 3)), &env()).map(|_| ());
        assert!(r.is_ok(), "{r:?}");
        let e = compile_err(&ternaries(60));
        assert_eq!(e.field, "spec.condition");
        assert!(e.message.contains("more than 48 levels deep"), "{e}");
        // The first node past the limit: the 48th ternary's condition.
        assert_eq!(
            (e.line, e.column),
            (1, 15 * (MAX_EXPRESSION_DEPTH - 1) + 1),
            "{e}"
        );
        // A select chain past a labels map passes the field check but is
        // as deep as it is long.
        let chain = format!(
            "match: {{event: process}}\ncondition: \"k8s.labels{} == 'x'\"\nsummary: s",
            ".x".repeat(60)
        );
        let e = compile_err(&chain);
        assert!(e.message.contains("more than 48 levels deep"), "{e}");
    }

    #[test]
    fn compiling_at_the_nesting_limit_needs_no_stack_from_the_caller() {
        // A thread smaller than the parser needs at the limit: compile must
        // not run the parser on it.
        let nested = format!(
            "match: {{event: process}}\ncondition: \"{}[process.name]{} == ['sh']\"\nsummary: s",
            "[".repeat(MAX_CONDITION_NESTING - 2),
            "]".repeat(MAX_CONDITION_NESTING - 2),
        );
        let d = doc(&nested);
        let r = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || compile(&d, &env()).map(|_| ()))
            .unwrap()
            .join()
            .unwrap();
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn errors_name_the_field_and_position() {
        let e =
            compile_err("match: {event: process}\ncondition: process.name == 'sh' &&\nsummary: s");
        assert_eq!(e.field, "spec.condition");
        assert_eq!(e.line, 1, "{e}");

        let e = compile_err(
            "match: {event: process}\ncondition: \"process.name == 'sh' && process.exee == '/x'\"\nsummary: s",
        );
        assert_eq!(e.field, "spec.condition");
        assert!(e.message.starts_with("process.exee: no such field"), "{e}");
        assert_eq!((e.line, e.column), (1, 25), "{e}");

        let e =
            compile_err("match: {event: process}\ncondition: \"flow.dstPort == 22\"\nsummary: s");
        assert!(e.message.starts_with("flow: no such variable"), "{e}");

        let e = compile_err(
            "match: {event: process}\ncondition: \"process.name in lists.shell\"\nlists: {shells: [sh]}\nsummary: s",
        );
        assert!(
            e.message
                .contains("lists.shell: no such list (spec.lists has: shells)"),
            "{e}"
        );

        let e =
            compile_err("match: {event: process, kinds: [begin]}\ncondition: 'true'\nsummary: s");
        assert_eq!(e.field, "spec.match.kinds[0]");

        let e = compile_err("match: {event: flow}\ncondition: 'true'\nsummary: '{flow.dport}'");
        assert_eq!(e.field, "spec.summary");

        let e = compile_err(
            "match: {event: flow}\ncondition: 'true'\nsummary: s\ndedup: {window: soon}",
        );
        assert_eq!(e.field, "spec.dedup.window");

        // Comprehension variables and labels maps are not fields.
        compile(
            &doc("match: {event: process}\ncondition: \"process.cmdline.exists(a, a == '-e') && k8s.labels.app == 'web'\"\nsummary: s"),
            &env(),
        )
        .unwrap();
    }

    #[test]
    fn plain_comparisons_become_prefilters_and_skip_cel() {
        let r = compile(
            &doc("match: {event: process}\ncondition: \"process.containerId != '' && process.name in lists.shells\"\nlists: {shells: [sh, bash]}\nsummary: s"),
            &env(),
        )
        .unwrap();
        assert_eq!(r.prefilters.len(), 2);
        assert!(r.program.is_none(), "every conjunct lifted");
        let r = compile(
            &doc("match: {event: process}\ncondition: \"process.exe.startsWith('/dev/shm/') && process.pid > 1\"\nsummary: s"),
            &env(),
        )
        .unwrap();
        assert_eq!(r.prefilters.len(), 1);
        assert!(r.program.is_some());
        // A disjunction over one field becomes one check; the rest of a
        // disjunct still needs CEL.
        let r = compile(
            &doc("match: {event: process}\ncondition: \"process.exe.startsWith('/dev/shm/') || (process.containerId != '' && process.exe.startsWith('/tmp/'))\"\nsummary: s"),
            &env(),
        )
        .unwrap();
        assert_eq!(
            r.prefilters,
            vec![Prefilter::Str {
                path: "process.exe".into(),
                eq: HashSet::new(),
                prefixes: vec!["/dev/shm/".into(), "/tmp/".into()]
            }]
        );
        assert!(r.program.is_some());
        let r = compile(
            &doc("match: {event: flow}\ncondition: \"(flow.proto == 'tcp' || flow.proto == 'udp') && flow.dstPort in [22, 23] && true\"\nsummary: s"),
            &env(),
        )
        .unwrap();
        assert_eq!(r.prefilters.len(), 2);
        assert!(r.program.is_none(), "exact: {:?}", r.prefilters);
        let v = |proto: &str, port: i64| {
            View::from_json(
                "flow",
                &serde_json::json!({"flow": {"proto": proto, "dstPort": port}}),
            )
            .unwrap()
        };
        assert_eq!(
            r.precheck(&v("udp", 22), "flow", "", ""),
            Some(Eval::Match { cel: false })
        );
        assert_eq!(
            r.precheck(&v("icmp", 22), "flow", "", ""),
            Some(Eval::Skipped)
        );
        assert_eq!(
            r.precheck(&v("tcp", 80), "flow", "", ""),
            Some(Eval::Skipped)
        );
    }

    #[test]
    fn summaries_fill_in_fields() {
        let v = View::from_json(
            "process",
            &serde_json::json!({"process": {"exe": "/bin/sh", "pid": 7}}),
        )
        .unwrap();
        assert_eq!(
            render("{process.exe} ({process.pid}) {nope} {", |p| v
                .get(p)
                .map(text)),
            "/bin/sh (7) {nope} {"
        );
    }
}
