//! Backups of the store and restores from them.
//!
//! RocksDB's backup engine copies the live table files and the WAL into a
//! backup directory while the bus keeps writing. Table files are immutable,
//! so backups share the ones they have in common and each backup after the
//! first copies only what is new. Because the WAL is copied too, a backup
//! holds every event acked before it started, flushed to a table or not.
//! The agent registry (and with it each agent's last stored seq) lives in
//! the same database, so a restored bus keeps dropping duplicates.

use std::path::{Path, PathBuf};

use rocksdb::Env;
use rocksdb::backup::{BackupEngine, BackupEngineOptions, RestoreOptions};

use crate::store::{Store, StoreError};

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// RocksDB's backup engine failed.
    #[error("backup dir {path}: {source}")]
    Rocks {
        /// The backup directory.
        path: PathBuf,
        /// RocksDB's reason.
        #[source]
        source: rocksdb::Error,
    },
    /// The backup directory could not be made or read.
    #[error("backup dir {path}: {message}")]
    Dir {
        /// The backup directory.
        path: PathBuf,
        /// The OS's reason.
        message: String,
    },
    /// A restore named a backup the directory does not hold.
    #[error("backup dir {path}: no backup with id {id} (ids held: {held})")]
    NoSuchBackup {
        /// The backup directory.
        path: PathBuf,
        /// The id asked for.
        id: u32,
        /// The ids it holds.
        held: String,
    },
    /// A restore found nothing to restore.
    #[error("backup dir {path} holds no backups")]
    Empty {
        /// The backup directory.
        path: PathBuf,
    },
    /// The restore's target directory cannot be used.
    #[error("restore target {path}: {message}")]
    Target {
        /// The target directory.
        path: PathBuf,
        /// Why (not empty, a running bus's store, ...).
        message: String,
    },
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One backup in a backup directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// Its id, increasing.
    pub id: u32,
    /// Unix seconds.
    pub created_at: i64,
    /// Bytes it holds (files shared with other backups included).
    pub size_bytes: u64,
    /// Files it holds.
    pub files: u32,
}

/// A backup directory, opened.
pub struct Backups {
    dir: PathBuf,
    engine: BackupEngine,
}

impl Backups {
    /// Opens `dir`, creating it if needed.
    pub fn open(dir: &Path) -> Result<Self, BackupError> {
        std::fs::create_dir_all(dir).map_err(|e| BackupError::Dir {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let rocks = |source| BackupError::Rocks {
            path: dir.to_path_buf(),
            source,
        };
        let opts = BackupEngineOptions::new(dir).map_err(rocks)?;
        let env = Env::new().map_err(rocks)?;
        let engine = BackupEngine::open(&opts, &env).map_err(rocks)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            engine,
        })
    }

    /// The backup directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn rocks(&self, source: rocksdb::Error) -> BackupError {
        BackupError::Rocks {
            path: self.dir.clone(),
            source,
        }
    }

    /// Oldest first.
    pub fn list(&self) -> Vec<BackupInfo> {
        let mut v: Vec<BackupInfo> = self
            .engine
            .get_backup_info()
            .into_iter()
            .map(|b| BackupInfo {
                id: b.backup_id,
                created_at: b.timestamp,
                size_bytes: b.size,
                files: b.num_files,
            })
            .collect();
        v.sort_by_key(|b| b.id);
        v
    }

    fn find(&self, id: Option<u32>) -> Result<BackupInfo, BackupError> {
        let all = self.list();
        let found = match id {
            None => all.last().cloned(),
            Some(id) => all.iter().find(|b| b.id == id).cloned(),
        };
        match (found, id) {
            (Some(b), _) => Ok(b),
            (None, None) => Err(BackupError::Empty {
                path: self.dir.clone(),
            }),
            (None, Some(id)) => Err(BackupError::NoSuchBackup {
                path: self.dir.clone(),
                id,
                held: if all.is_empty() {
                    "none".into()
                } else {
                    all.iter()
                        .map(|b| b.id.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }

    /// Checks that the backup's files are all present with the sizes and
    /// checksums recorded when it was taken.
    pub fn verify(&self, id: u32) -> Result<(), BackupError> {
        self.find(Some(id))?;
        self.engine.verify_backup(id).map_err(|e| self.rocks(e))
    }

    /// Backs up `store` as it is now, then removes the oldest backups beyond
    /// `keep` (at least the new one is kept).
    pub fn create(&mut self, store: &Store, keep: u32) -> Result<BackupInfo, BackupError> {
        let before = self.list().last().map(|b| b.id);
        store.backup_into(&mut self.engine)?;
        let made = self.find(None)?;
        if Some(made.id) == before {
            return Err(BackupError::Dir {
                path: self.dir.clone(),
                message: "the backup engine reported success but no new backup appeared".into(),
            });
        }
        self.engine
            .purge_old_backups(keep.max(1) as usize)
            .map_err(|e| self.rocks(e))?;
        Ok(made)
    }

    /// Restores backup `id` (the newest when None) into `data_dir`, which
    /// must be missing or empty: restoring over a live store would mix two
    /// histories, so the old one has to be moved aside first.
    pub fn restore(&mut self, id: Option<u32>, data_dir: &Path) -> Result<BackupInfo, BackupError> {
        let b = self.find(id)?;
        let target = |message: String| BackupError::Target {
            path: data_dir.to_path_buf(),
            message,
        };
        match std::fs::read_dir(data_dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(target(
                        "is not empty; move it aside (with the bus stopped) and restore into a \
                         missing or empty directory"
                            .into(),
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(|e| target(e.to_string()))?;
            }
            Err(e) => return Err(target(e.to_string())),
        }
        self.engine
            .restore_from_backup(data_dir, data_dir, &RestoreOptions::default(), b.id)
            .map_err(|e| self.rocks(e))?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::now_ns;
    use amoskys_proto::{AgentRecord, Event};

    fn ev(agent: &str, seq: u64) -> Event {
        Event {
            agent_id: agent.into(),
            seq,
            observed_at: now_ns(),
            collector: "test".into(),
            ..Default::default()
        }
    }

    fn write(store: &Store, agent: &str, seqs: std::ops::RangeInclusive<u64>) {
        let start = store.next_offset();
        let batch_events: Vec<Event> = seqs
            .clone()
            .enumerate()
            .map(|(i, s)| Event {
                offset: start + i as u64,
                ..ev(agent, s)
            })
            .collect();
        let next_offset = start + batch_events.len() as u64;
        let record = AgentRecord {
            agent_id: agent.into(),
            last_seq: *seqs.end(),
            ..Default::default()
        };
        let mut group = crate::store::PreparedGroup {
            batch_events,
            agents: [(agent.to_string(), record)].into(),
            next_offset,
            stored_at: now_ns(),
        };
        store.commit(&mut group, true).unwrap();
    }

    fn seqs(store: &Store) -> Vec<u64> {
        let spec = crate::store::QuerySpec {
            limit: 1_000_000,
            ..Default::default()
        };
        store.query(&spec).unwrap().iter().map(|e| e.seq).collect()
    }

    #[test]
    fn a_restore_holds_what_was_stored_when_the_backup_was_taken() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("data")).unwrap();
        let mut backups = Backups::open(&tmp.path().join("backup")).unwrap();
        assert_eq!(backups.list(), vec![]);

        write(&store, "a", 1..=100);
        let first = backups.create(&store, 7).unwrap();
        write(&store, "a", 101..=150);
        let second = backups.create(&store, 7).unwrap();
        write(&store, "a", 151..=160);
        assert!(second.id > first.id);
        assert_eq!(backups.list(), vec![first.clone(), second.clone()]);
        backups.verify(first.id).unwrap();

        let r1 = tmp.path().join("r1");
        assert_eq!(backups.restore(Some(first.id), &r1).unwrap(), first);
        let restored = Store::open(&r1).unwrap();
        assert_eq!(seqs(&restored), (1..=100).collect::<Vec<_>>());
        assert_eq!(restored.load_agents().unwrap()["a"].last_seq, 100);

        let r2 = tmp.path().join("r2");
        assert_eq!(backups.restore(None, &r2).unwrap(), second);
        assert_eq!(
            seqs(&Store::open(&r2).unwrap()),
            (1..=150).collect::<Vec<_>>()
        );

        // The source store goes on unaffected.
        assert_eq!(seqs(&store), (1..=160).collect::<Vec<_>>());
    }

    #[test]
    fn keep_removes_the_oldest_and_restore_refuses_what_it_would_overwrite() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(&tmp.path().join("data")).unwrap();
        let dir = tmp.path().join("backup");
        let mut backups = Backups::open(&dir).unwrap();
        let mut made = Vec::new();
        for i in 0..4u64 {
            write(&store, "a", i * 10 + 1..=i * 10 + 10);
            made.push(backups.create(&store, 2).unwrap().id);
        }
        let held: Vec<u32> = backups.list().iter().map(|b| b.id).collect();
        assert_eq!(held, made[2..].to_vec());

        let e = backups
            .restore(Some(made[0]), &tmp.path().join("x"))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("no backup with id {}", made[0])),
            "{msg}"
        );
        assert!(msg.contains(&format!("{}, {}", made[2], made[3])), "{msg}");

        let occupied = tmp.path().join("data");
        let e = backups.restore(None, &occupied).unwrap_err().to_string();
        assert!(e.contains("is not empty"), "{e}");
        assert_eq!(
            seqs(&store).len(),
            40,
            "the refused restore left the store alone"
        );

        let empty = Backups::open(&tmp.path().join("none")).unwrap();
        let e = empty.verify(1).unwrap_err().to_string();
        assert!(e.contains("ids held: none"), "{e}");
    }
}
