//! What every collector shares: the sink its events go to, its control
//! channel (pause, resume, interval) and its status counters.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amoskys_proto::{CollectorStatus, control};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics::{AgentMetrics, ModeLabel, collector};
use crate::spool::Draft;

/// What control can change while a collector runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Paused collectors emit nothing until resumed.
    pub paused: bool,
    /// None for collectors that have no interval (flow).
    pub interval: Option<Duration>,
}

/// Counters and mode of one collector, for metrics and heartbeats.
pub struct Status {
    /// The collector's name.
    pub name: &'static str,
    /// Events it has emitted.
    pub produced: AtomicU64,
    /// Errors it has counted.
    pub errors: AtomicU64,
    /// Whether control has paused it.
    pub paused: AtomicBool,
    mode: Mutex<String>,
    last_error: Mutex<String>,
    metrics: Arc<AgentMetrics>,
}

impl Status {
    fn new(name: &'static str, metrics: Arc<AgentMetrics>) -> Self {
        Self {
            name,
            produced: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            mode: Mutex::new("starting".into()),
            last_error: Mutex::new(String::new()),
            metrics,
        }
    }

    /// Records the mode it runs in (`netlink`, `poll`, `live`, ...) and
    /// moves the `collector_mode` gauge to it.
    pub fn set_mode(&self, mode: &str) {
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if *m != mode {
            self.metrics
                .collector_mode
                .get_or_create(&ModeLabel {
                    collector: self.name.into(),
                    mode: m.clone(),
                })
                .set(0);
            *m = mode.to_string();
            self.metrics
                .collector_mode
                .get_or_create(&ModeLabel {
                    collector: self.name.into(),
                    mode: mode.into(),
                })
                .set(1);
        }
    }

    /// The mode it runs in.
    pub fn mode(&self) -> String {
        self.mode.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts an error and keeps its text for the heartbeat.
    pub fn error(&self, message: impl Into<String>) {
        let message = message.into();
        tracing::warn!(collector = self.name, error = %message, "collector error");
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .collector_errors
            .get_or_create(&collector(self.name))
            .inc();
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = message;
    }

    /// The text of its latest error; empty when it has had none.
    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Where collectors put their events. Bounded: a collector that outruns the
/// spool waits, it does not grow memory.
#[derive(Clone)]
pub struct Sink {
    tx: mpsc::Sender<Draft>,
    status: Arc<Status>,
}

impl Sink {
    /// Hands an event on, waiting while the queue is full; false once the
    /// agent has stopped taking events.
    pub async fn emit(&self, d: Draft) -> bool {
        self.count(&d);
        self.tx.send(d).await.is_ok()
    }

    /// For collectors that run on their own thread.
    pub fn emit_blocking(&self, d: Draft) -> bool {
        self.count(&d);
        self.tx.blocking_send(d).is_ok()
    }

    fn count(&self, d: &Draft) {
        debug_assert_eq!(d.collector, self.status.name);
        self.status.produced.fetch_add(1, Ordering::Relaxed);
        self.status
            .metrics
            .produced
            .get_or_create(&collector(self.status.name))
            .inc();
    }
}

/// Everything a collector task gets.
pub struct Ctx {
    /// Where its events go.
    pub sink: Sink,
    /// Pause, resume and interval changes.
    pub control: watch::Receiver<Control>,
    /// Its counters and mode.
    pub status: Arc<Status>,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
    /// Cancelled when the agent stops.
    pub stop: CancellationToken,
}

impl Ctx {
    /// Whether control has paused the collector.
    pub fn paused(&self) -> bool {
        self.control.borrow().paused
    }

    /// The interval control set, or `default` when it set none.
    pub fn interval(&self, default: Duration) -> Duration {
        self.control.borrow().interval.unwrap_or(default)
    }

    /// Sleeps for `d`, waking early on stop or a control change. Returns
    /// false when the agent is stopping.
    pub async fn sleep(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
            _ = self.control.changed() => !self.stop.is_cancelled(),
        }
    }

    /// Waits while paused. Returns false when the agent is stopping.
    pub async fn wait_unpaused(&mut self) -> bool {
        while self.paused() {
            tokio::select! {
                _ = self.stop.cancelled() => return false,
                r = self.control.changed() => if r.is_err() { return false },
            }
        }
        !self.stop.is_cancelled()
    }
}

struct Entry {
    control: watch::Sender<Control>,
    status: Arc<Status>,
}

/// The agent's collectors by name: how control reaches them and how the
/// heartbeat reads them.
#[derive(Default)]
pub struct Registry {
    entries: Mutex<BTreeMap<&'static str, Entry>>,
}

impl Registry {
    /// Registers a collector and returns the context its task runs with.
    pub fn register(
        &self,
        name: &'static str,
        interval: Option<Duration>,
        tx: mpsc::Sender<Draft>,
        metrics: Arc<AgentMetrics>,
        stop: CancellationToken,
    ) -> Ctx {
        let status = Arc::new(Status::new(name, metrics.clone()));
        let (ctl_tx, ctl_rx) = watch::channel(Control {
            paused: false,
            interval,
        });
        metrics
            .collector_paused
            .get_or_create(&collector(name))
            .set(0);
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name,
                Entry {
                    control: ctl_tx,
                    status: status.clone(),
                },
            );
        Ctx {
            sink: Sink {
                tx,
                status: status.clone(),
            },
            control: ctl_rx,
            status,
            metrics,
            stop,
        }
    }

    /// The registered collectors' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    /// Applies a control message from the bus. Ok carries what was done, Err
    /// why it was refused; both go back to the bus as the ControlResult.
    pub fn apply(&self, c: &amoskys_proto::Control) -> Result<String, String> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = entries.get(c.collector.as_str()) else {
            return Err(format!(
                "no collector {:?} on this agent (running: {})",
                c.collector,
                entries.keys().copied().collect::<Vec<_>>().join(", ")
            ));
        };
        let mut cur = *e.control.borrow();
        let done = match control::Action::try_from(c.action) {
            Ok(control::Action::Pause) => {
                cur.paused = true;
                format!("{} paused", c.collector)
            }
            Ok(control::Action::Resume) => {
                cur.paused = false;
                format!("{} resumed", c.collector)
            }
            Ok(control::Action::SetInterval) => {
                if cur.interval.is_none() {
                    return Err(format!("{} has no interval to set", c.collector));
                }
                if c.interval_ms == 0 {
                    return Err("interval_ms must be greater than 0".into());
                }
                cur.interval = Some(Duration::from_millis(c.interval_ms));
                format!("{} interval set to {} ms", c.collector, c.interval_ms)
            }
            _ => return Err(format!("unknown action {}", c.action)),
        };
        e.status.paused.store(cur.paused, Ordering::Relaxed);
        e.status
            .metrics
            .collector_paused
            .get_or_create(&collector(e.status.name))
            .set(cur.paused as i64);
        e.control.send_replace(cur);
        Ok(done)
    }

    /// Per-collector status for the heartbeat.
    pub fn statuses(&self) -> Vec<CollectorStatus> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .values()
            .map(|e| {
                let c = *e.control.borrow();
                CollectorStatus {
                    name: e.status.name.into(),
                    mode: e.status.mode(),
                    paused: c.paused,
                    interval_ms: c.interval.map(|d| d.as_millis() as u64).unwrap_or(0),
                    produced: e.status.produced.load(Ordering::Relaxed),
                    dropped: 0,
                    errors: e.status.errors.load(Ordering::Relaxed),
                    last_error: e.status.last_error(),
                }
            })
            .collect()
    }

    /// Events emitted by every collector together.
    pub fn produced(&self) -> u64 {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|e| e.status.produced.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::Control as Msg;

    #[test]
    fn control_pauses_resumes_and_sets_intervals() {
        let reg = Registry::default();
        let (tx, _rx) = mpsc::channel(1);
        let m = Arc::new(AgentMetrics::new());
        let ctx = reg.register(
            "inventory",
            Some(Duration::from_secs(60)),
            tx.clone(),
            m.clone(),
            CancellationToken::new(),
        );
        let flow = reg.register("flow", None, tx, m, CancellationToken::new());
        let msg = |c: &str, a: control::Action, ms| Msg {
            control_id: 1,
            collector: c.into(),
            action: a as i32,
            interval_ms: ms,
        };
        reg.apply(&msg("inventory", control::Action::Pause, 0))
            .unwrap();
        assert!(ctx.paused());
        reg.apply(&msg("inventory", control::Action::SetInterval, 1500))
            .unwrap();
        assert_eq!(ctx.interval(Duration::ZERO), Duration::from_millis(1500));
        reg.apply(&msg("inventory", control::Action::Resume, 0))
            .unwrap();
        assert!(!ctx.paused());
        let e = reg
            .apply(&msg("flow", control::Action::SetInterval, 5))
            .unwrap_err();
        assert!(e.contains("no interval"), "{e}");
        let e = reg
            .apply(&msg("kernel", control::Action::Pause, 0))
            .unwrap_err();
        assert!(e.contains("flow, inventory"), "{e}");
        assert!(!flow.paused());
        let st = reg.statuses();
        assert_eq!(st.len(), 2);
        assert_eq!(st[1].interval_ms, 1500);
    }
}
