//! `amoskys shards`: which shard owns an agent under a shard count, the
//! same jump hash every bus and agent uses.

use anyhow::{Result, bail};
use clap::Subcommand;

use amoskys_client::shard::{MAX_SHARDS, owner_of};

#[derive(Subcommand)]
pub enum ShardsCmd {
    /// Print `<agent_id> <shard>` for each agent under `--active` shards.
    Owner {
        /// Shards that own agents (the map's `active`).
        #[arg(long)]
        active: u32,
        /// Agent ids; read one per line from stdin when none are given.
        agent_ids: Vec<String>,
    },
}

pub fn run(cmd: ShardsCmd) -> Result<()> {
    match cmd {
        ShardsCmd::Owner { active, agent_ids } => {
            if active == 0 || active > MAX_SHARDS {
                bail!("--active: {active} is not between 1 and {MAX_SHARDS}");
            }
            let ids = if agent_ids.is_empty() {
                std::io::stdin()
                    .lines()
                    .collect::<Result<Vec<String>, _>>()?
                    .into_iter()
                    .filter(|l| !l.trim().is_empty())
                    .collect()
            } else {
                agent_ids
            };
            for id in ids {
                let id = id.trim();
                println!("{id} {}", owner_of(id, active));
            }
            Ok(())
        }
    }
}
