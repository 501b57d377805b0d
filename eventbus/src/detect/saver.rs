//! Writes the detector's checkpoints on a thread of its own, so that a
//! large one (many windows changed) never stalls evaluation: the detector
//! encodes what changed and hands it over. Saves are written in order; one
//! due while the last is still being written waits, and a later one is
//! merged into it (its windows appended, its head replacing the older).
//!
//! A save that fails leaves the store behind the windows the detector
//! holds, so every later save is refused until a whole one (every window)
//! arrives; the keys the refused saves would have deleted are handed back
//! to be deleted by it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::warn;

use crate::metrics::BusMetrics;
use crate::store::Store;

/// One save: the head and each changed window (`None`: delete).
pub struct Job {
    pub cursor: u64,
    pub head: Vec<u8>,
    pub windows: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Every window the detector holds is in it (after a failure).
    pub whole: bool,
    /// Time the detector spent encoding it.
    pub encode: Duration,
}

#[derive(Default)]
struct Slot {
    waiting: Option<Job>,
    writing: bool,
    closed: bool,
    /// A save failed; refused until a whole one arrives.
    failed: bool,
    /// Keys refused or failed saves would have deleted.
    undeleted: Vec<Vec<u8>>,
}

struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
    /// The last save's time, encoding and writing, in ns.
    last_nanos: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Saver {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn deletions(windows: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> impl Iterator<Item = Vec<u8>> {
    windows.into_iter().filter(|w| w.1.is_none()).map(|w| w.0)
}

impl Saver {
    pub fn start(store: Arc<Store>, metrics: Arc<BusMetrics>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            slot: Mutex::new(Slot::default()),
            wake: Condvar::new(),
            last_nanos: AtomicU64::new(0),
        });
        let me = shared.clone();
        let thread = std::thread::Builder::new()
            .name("amoskys-detect-save".into())
            .spawn(move || run(&me, &store, &metrics))?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands a save over; false when the saver wants a whole one (a save
    /// failed): the caller marks every window changed and adds
    /// [`Saver::take_undeleted`] to the next.
    pub fn submit(&self, job: Job) -> bool {
        let mut s = self.shared.lock();
        if s.failed && !job.whole {
            s.undeleted.extend(deletions(job.windows));
            return false;
        }
        if job.whole {
            s.failed = false;
        }
        s.waiting = Some(match s.waiting.take() {
            Some(mut older) if !job.whole => {
                older.windows.extend(job.windows);
                Job {
                    cursor: job.cursor,
                    head: job.head,
                    windows: older.windows,
                    whole: older.whole,
                    encode: older.encode + job.encode,
                }
            }
            _ => job,
        });
        self.shared.wake.notify_all();
        true
    }

    /// Whether a whole save is wanted, and the keys to delete in it.
    pub fn take_undeleted(&self) -> Option<Vec<Vec<u8>>> {
        let mut s = self.shared.lock();
        s.failed.then(|| std::mem::take(&mut s.undeleted))
    }

    /// The last save's time, encoding and writing.
    pub fn last(&self) -> Duration {
        Duration::from_nanos(self.shared.last_nanos.load(Ordering::Relaxed))
    }

    /// Waits until everything handed over is written (or refused).
    pub fn wait_idle(&self) {
        let mut s = self.shared.lock();
        while s.waiting.is_some() || s.writing {
            s = self.shared.wake.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Saver {
    /// Writes what is waiting, then stops.
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, store: &Store, metrics: &BusMetrics) {
    loop {
        let job = {
            let mut s = shared.lock();
            loop {
                if let Some(job) = s.waiting.take() {
                    s.writing = true;
                    break job;
                }
                if s.closed {
                    return;
                }
                s = shared.wake.wait(s).unwrap_or_else(|p| p.into_inner());
            }
        };
        let started = Instant::now();
        let result = store.save_detect(job.cursor, &job.head, &job.windows);
        let took = job.encode + started.elapsed();
        shared
            .last_nanos
            .store(took.as_nanos() as u64, Ordering::Relaxed);
        metrics
            .detect_checkpoint_seconds
            .observe(took.as_secs_f64());
        let mut s = shared.lock();
        s.writing = false;
        if let Err(e) = result {
            warn!(error = %e, "cannot save the detector's cursor; it will evaluate again from the last one saved");
            s.failed = true;
            s.undeleted.extend(deletions(job.windows));
            if let Some(refused) = s.waiting.take() {
                s.undeleted.extend(deletions(refused.windows));
            }
        }
        drop(s);
        shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(cursor: u64, windows: &[(&str, Option<&str>)], whole: bool) -> Job {
        Job {
            cursor,
            head: format!("{{\"cursor\":{cursor}}}").into_bytes(),
            windows: windows
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec())))
                .collect(),
            whole,
            encode: Duration::ZERO,
        }
    }

    fn keys(store: &Store) -> Vec<Vec<u8>> {
        let saved = store.detect_windows().unwrap();
        saved.into_iter().map(|w| w.0).collect()
    }

    #[test]
    fn saves_are_written_in_order_and_a_failure_holds_them_until_a_whole_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let saver = Saver::start(store.clone(), Arc::new(BusMetrics::new())).unwrap();
        assert!(saver.submit(job(1, &[("oa", Some("1")), ("ob", Some("2"))], false)));
        assert!(saver.submit(job(2, &[("oa", None), ("oc", Some("3"))], false)));
        saver.wait_idle();
        assert_eq!(keys(&store), [b"ob".to_vec(), b"oc".to_vec()]);
        assert_eq!(store.detect_state().unwrap().unwrap(), b"{\"cursor\":2}");
        assert!(saver.take_undeleted().is_none());

        // A failed save: the store is closed under the saver.
        store.close().unwrap();
        assert!(saver.submit(job(3, &[("ob", None)], false)));
        saver.wait_idle();
        // Refused until whole; what they would delete is handed back.
        assert!(!saver.submit(job(4, &[("oc", None), ("od", Some("4"))], false)));
        let undeleted = saver.take_undeleted().unwrap();
        assert_eq!(undeleted, [b"ob".to_vec(), b"oc".to_vec()]);
        assert!(saver.take_undeleted().is_some(), "still wants a whole save");

        // The store is back; a whole save (every window, and the deletions
        // handed back) is taken and leaves the store as the detector holds it.
        store.reopen().unwrap();
        assert!(saver.submit(job(
            5,
            &[("ob", None), ("oc", None), ("od", Some("4"))],
            true
        )));
        saver.wait_idle();
        assert_eq!(keys(&store), [b"od".to_vec()]);
        assert_eq!(store.detect_state().unwrap().unwrap(), b"{\"cursor\":5}");
        assert!(saver.take_undeleted().is_none());
        assert!(
            saver.submit(job(6, &[("od", None)], false)),
            "partial saves again"
        );
        drop(saver);
        assert!(
            store.detect_windows().unwrap().is_empty(),
            "written before the saver stops"
        );
    }
}
