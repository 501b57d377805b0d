//! `amoskys backup now|list|restore`.

use std::path::{Path, PathBuf};

use amoskys_client::BusClient;
use anyhow::Result;
use clap::Subcommand;

use super::Conn;

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Ask a running bus to take a backup now (needs an admin certificate).
    Now {
        #[command(flatten)]
        conn: Conn,
    },
    /// List the backups in a backup directory.
    List {
        #[arg(long)]
        dir: PathBuf,
        /// Also check every file of each backup against its recorded checksum.
        #[arg(long)]
        verify: bool,
    },
    /// Restore a backup into a missing or empty data directory; then start
    /// the bus on it.
    Restore {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Backup to restore (default: the newest).
        #[arg(long)]
        id: Option<u32>,
    },
}

fn unix_time(secs: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub async fn run(cmd: BackupCmd) -> Result<()> {
    use amoskys_eventbus::backup::Backups;
    let existing = |dir: &Path| -> Result<Backups> {
        anyhow::ensure!(dir.is_dir(), "backup dir {} does not exist", dir.display());
        Ok(Backups::open(dir)?)
    };
    match cmd {
        BackupCmd::Now { conn } => {
            let mut client = BusClient::connect(&conn.options()).await?;
            let b = client
                .admin
                .backup(amoskys_proto::BackupRequest {})
                .await
                .map_err(amoskys_client::ClientError::from)?
                .into_inner();
            println!(
                "backup {} taken at {}: {} bytes in {} files; {} backups kept in {}",
                b.backup_id,
                unix_time(b.created_at),
                b.size_bytes,
                b.files,
                b.backups_kept,
                b.dir
            );
        }
        BackupCmd::List { dir, verify } => {
            let backups = existing(&dir)?;
            let mut failed = 0;
            println!(
                "{:>6}  {:<20}  {:>14}  {:>6}{}",
                "ID",
                "CREATED",
                "BYTES",
                "FILES",
                if verify { "  VERIFIED" } else { "" }
            );
            for b in backups.list() {
                let check = if verify {
                    match backups.verify(b.id) {
                        Ok(()) => "  ok".to_string(),
                        Err(e) => {
                            failed += 1;
                            format!("  FAILED: {e}")
                        }
                    }
                } else {
                    String::new()
                };
                println!(
                    "{:>6}  {:<20}  {:>14}  {:>6}{check}",
                    b.id,
                    unix_time(b.created_at),
                    b.size_bytes,
                    b.files
                );
            }
            anyhow::ensure!(failed == 0, "{failed} backup(s) failed verification");
        }
        BackupCmd::Restore { dir, data_dir, id } => {
            let mut backups = existing(&dir)?;
            let target = data_dir.clone();
            let b = tokio::task::spawn_blocking(move || backups.restore(id, &target)).await??;
            println!(
                "restored backup {} (taken at {}) into {}; start the bus with --data-dir {}",
                b.id,
                unix_time(b.created_at),
                data_dir.display(),
                data_dir.display()
            );
        }
    }
    Ok(())
}
