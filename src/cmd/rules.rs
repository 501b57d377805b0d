//! `amoskys rules test`: compile rule files, run their inline tests, and
//! with `--bus`, replay stored events through them (a backtest) without
//! writing anything.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use amoskys_client::BusClient;
use amoskys_detect::compile::env;
use amoskys_detect::{
    CompiledRule, Decision, Engine, RuleDocument, RuleSet, compile, parse_rule_file, run_tests,
};
use amoskys_proto::QueryRequest;
use amoskys_proto::event::Payload;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use super::Conn;

#[derive(Subcommand)]
pub enum RulesCmd {
    /// Compile rules and run their inline tests; with --bus, backtest them
    /// over stored events.
    Test(TestArgs),
}

#[derive(Args)]
pub struct TestArgs {
    /// Rule files, or directories of them (*.yaml, *.yml).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Backtest: replay the events a bus stores (with --tls-dir of a
    /// reader) and print what would have matched. Writes nothing.
    #[arg(long, requires = "tls_dir")]
    pub bus: Option<String>,
    /// Directory with this client's tls.crt, tls.key and ca.crt.
    #[arg(long, env = "AMOSKYS_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Backtest from this long ago or this RFC 3339 time.
    #[arg(long, default_value = "24h")]
    pub since: String,
    /// Backtest until this long ago or this RFC 3339 time (default: now).
    #[arg(long)]
    pub until: Option<String>,
}

fn rule_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| matches!(f.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn load(path: &Path) -> Result<Vec<RuleDocument>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(parse_rule_file(&path.display().to_string(), &text)?)
}

pub async fn run(cmd: RulesCmd) -> Result<()> {
    let RulesCmd::Test(a) = cmd;
    let env = env();
    let mut failed = 0;
    let mut loaded: Vec<Arc<CompiledRule>> = Vec::new();
    for file in rule_files(&a.paths)? {
        let docs = match load(&file) {
            Ok(d) => d,
            Err(e) => {
                println!("FAIL  {}: {e:#}", file.display());
                failed += 1;
                continue;
            }
        };
        for doc in docs {
            let name = doc.qualified_name();
            let rule = match compile(&doc, &env) {
                Ok(r) => Arc::new(r),
                Err(e) => {
                    println!("FAIL  {name} ({}): {e}", file.display());
                    failed += 1;
                    continue;
                }
            };
            let outcomes = run_tests(&doc, &rule, &env);
            let bad: Vec<_> = outcomes.iter().filter(|o| !o.passed).collect();
            if bad.is_empty() {
                println!("ok    {name}: inline tests passed: {}", outcomes.len());
                loaded.push(rule);
            } else {
                failed += 1;
                for o in bad {
                    println!("FAIL  {name} / {}: {}", o.name, o.message);
                }
            }
        }
    }
    if let Some(bus) = a.bus {
        let Some(tls_dir) = a.tls_dir else {
            bail!("--bus needs --tls-dir");
        };
        let conn = Conn {
            bus,
            tls_dir,
            server_name: None,
        };
        backtest(&conn, loaded, &a.since, a.until.as_deref()).await?;
    }
    if failed > 0 {
        bail!("{failed} rule(s) failed");
    }
    Ok(())
}

/// Replays stored events through `rules` and prints the alerts they would
/// have written; nothing is written.
async fn backtest(
    conn: &Conn,
    rules: Vec<Arc<CompiledRule>>,
    since: &str,
    until: Option<&str>,
) -> Result<()> {
    let n_rules = rules.len();
    let set = Arc::new(RuleSet::new(rules, env()));
    let mut engine = Engine::new(set, 0, Default::default());
    engine.force_alert_mode();
    let mut client = BusClient::connect(&conn.options()).await?;
    let mut req = QueryRequest {
        from_time: super::events::parse_time("--since", since)?,
        to_time: until
            .map(|u| super::events::parse_time("--until", u))
            .transpose()?
            .unwrap_or(0),
        limit: 10_000,
        allow_partial: true,
        ..Default::default()
    };
    let (mut events, mut alerts, mut suppressed) = (0u64, 0u64, 0u64);
    loop {
        let page = client.query_page(req.clone()).await?;
        if !page.missing_shards.is_empty() {
            eprintln!(
                "warning: shards {:?} did not answer; their events are not in the backtest",
                page.missing_shards
            );
        }
        for e in &page.events {
            if matches!(e.payload, Some(Payload::Alert(_))) {
                continue;
            }
            events += 1;
            for d in engine.evaluate(e) {
                match d {
                    Decision::Alert(a) => {
                        alerts += 1;
                        if let Some(Payload::Alert(x)) = &a.payload {
                            println!(
                                "would alert  {:<28}  {:<8}  shard {} offset {:<10}  {}{}",
                                x.rule,
                                amoskys_client::render::severity_name(a.severity),
                                e.shard,
                                e.offset,
                                x.summary,
                                if x.updates_seq != 0 {
                                    format!(" (repeated {} times)", x.count)
                                } else {
                                    String::new()
                                }
                            );
                        }
                    }
                    Decision::Suppressed { .. } => suppressed += 1,
                    Decision::DryRun { .. } | Decision::Error { .. } => {}
                }
            }
        }
        if page.events.len() < req.limit as usize {
            break;
        }
        // A sharded bus pages by cursor, a single one by offset.
        match (page.cursor.is_empty(), page.events.last()) {
            (false, _) => req.cursor = page.cursor,
            (true, Some(last)) => req.from_offset = last.offset + 1,
            (true, None) => break,
        }
    }
    println!(
        "backtest: {events} events, {n_rules} rules: {alerts} alerts would be written, {suppressed} repeats counted into them"
    );
    Ok(())
}
