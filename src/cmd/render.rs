//! `amoskys render`: the objects the operator would create for EventBus,
//! AgentSet and detection rule files, printed as YAML.

use std::io::Read;
use std::path::PathBuf;

use amoskys_operator::render::{Input, render};
use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct RenderArgs {
    /// YAML files (or directories of them) of EventBus, AgentSet,
    /// DetectionRule and ClusterDetectionRule resources (`-` reads stdin).
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// The namespace of resources that name none.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// The image pods run when a resource names none (the operator's own).
    #[arg(long, env = "AMOSKYS_IMAGE")]
    pub image: Option<String>,
}

pub fn run(args: RenderArgs) -> Result<()> {
    let mut docs = Vec::new();
    let mut files = Vec::new();
    for f in &args.files {
        if f.is_dir() {
            // A directory: its YAML files, by name.
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("reading {}", f.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")))
                .collect();
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(f.clone());
        }
    }
    for f in &files {
        let text = if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s)?;
            s
        } else {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        };
        let parsed: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        docs.extend(parsed);
    }
    let input = Input::from_documents(docs, &args.namespace)?;
    let objects = render(&input, args.image.as_deref())?;
    let mut out = String::new();
    for o in &objects {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(o)?);
    }
    print!("{out}");
    Ok(())
}
