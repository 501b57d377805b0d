//! Synthetic events at a configured rate and size, for demos and load tests.
//! Its control interval is the time between events (1/rate).

use std::time::{Duration, Instant};

use amoskys_proto::event::Payload;
use amoskys_proto::{Severity, SyntheticEvent};
use tokio::task::JoinHandle;

use crate::collectors::context::Ctx;
use serde::{Deserialize, Serialize};

use crate::config::value::{ConfigError, invalid};
use crate::spool::Draft;

/// `collectors.synthetic`: load for demos and benchmarks.
#[derive(Debug, Deserialize, Serialize, Clone, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub struct SyntheticSpec {
    /// Off unless set.
    pub enabled: bool,
    /// Events per second.
    pub rate: u64,
    /// Bytes of payload per event.
    pub event_bytes: usize,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            rate: 10,
            event_bytes: 200,
        }
    }
}

impl SyntheticSpec {
    /// Checks every key; `None` when the collector is off.
    pub fn resolve(&self) -> Result<Option<SyntheticSpec>, ConfigError> {
        Ok(if self.enabled {
            if self.rate == 0 {
                return Err(invalid(
                    "collectors.synthetic.rate",
                    "must be greater than 0",
                ));
            }
            if self.event_bytes > 1024 * 1024 {
                return Err(invalid(
                    "collectors.synthetic.eventBytes",
                    "must be at most 1MiB",
                ));
            }
            Some(self.clone())
        } else {
            None
        })
    }
}

/// The collector's name in events, metrics and control.
pub const NAME: &str = "synthetic";

/// Starts emitting events at the spec's rate.
pub fn spawn(spec: SyntheticSpec, ctx: Ctx) -> super::Started {
    Ok(Some(run(spec, ctx)))
}

fn run(spec: SyntheticSpec, mut ctx: Ctx) -> JoinHandle<()> {
    ctx.status.set_mode("rate");
    tokio::spawn(async move {
        let data: Vec<u8> = (0..spec.event_bytes).map(|i| (i % 251) as u8).collect();
        let mut n = 0u64;
        let mut t0 = Instant::now();
        let mut sent_since = 0u64;
        let mut every = ctx.interval(Duration::from_millis(100));
        loop {
            let was_paused = ctx.paused();
            if !ctx.wait_unpaused().await {
                return;
            }
            let now_every = ctx.interval(every);
            if was_paused || now_every != every {
                // Resumed or re-timed: restart the schedule rather than
                // bursting what a paused collector would have owed.
                every = now_every;
                t0 = Instant::now();
                sent_since = 0;
            }
            // Emit what the schedule owes, in ticks of at most 10 ms so high
            // rates do not need one timer per event.
            let due = (t0.elapsed().as_secs_f64() / every.as_secs_f64()) as u64 + 1;
            while sent_since < due {
                n += 1;
                sent_since += 1;
                let d = Draft::new(
                    NAME,
                    Severity::Info,
                    Payload::Synthetic(SyntheticEvent {
                        n,
                        data: data.clone(),
                    }),
                );
                if !ctx.sink.emit(d).await {
                    return;
                }
                if ctx.stop.is_cancelled() || ctx.paused() {
                    break;
                }
            }
            let next = t0 + every.mul_f64(sent_since as f64);
            let wait = next.saturating_duration_since(Instant::now());
            let nap = if every >= Duration::from_millis(10) {
                wait.max(Duration::from_millis(1))
            } else {
                Duration::from_millis(10)
            };
            if !ctx.sleep(nap).await {
                return;
            }
        }
    })
}
