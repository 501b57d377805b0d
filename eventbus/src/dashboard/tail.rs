//! The live tail as server-sent events.
//!
//! Each viewer gets at most `tailMaxEventsPerSecond` events per second and a
//! small bounded queue; what the cap or a slow connection leaves out is
//! counted and sent in a `status` message, so the page can say it is
//! sampling. A viewer never makes the bus buffer more than its queue.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use amoskys_proto::{Event, QueryResponse, TailRequest};
use axum::extract::{RawQuery, State};
use axum::response::sse::{Event as Sse, KeepAlive};
use futures::Stream;
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc};

use super::{ApiError, Authed, Dashboard, bad_request, params};
use crate::filter::EventFilter;
use amoskys_client::render::event_line;

/// Messages waiting for one viewer's connection.
const VIEWER_QUEUE: usize = 16;
const FLUSH_EVERY: Duration = Duration::from_millis(200);
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// Counts for the page: what was sent and what was left out, and why.
#[derive(Default)]
struct Counts {
    sent: u64,
    capped: u64,
    slow: u64,
    lagged_groups: u64,
    /// Shards a sharded bus's tail lacks now.
    missing_shards: Vec<u32>,
}

impl Counts {
    fn status(&self, max_rate: u32) -> Value {
        json!({
            "sent": self.sent,
            "skipped_rate_cap": self.capped,
            "skipped_slow_viewer": self.slow,
            "lagged_groups": self.lagged_groups,
            "max_events_per_second": max_rate,
            "missing_shards": self.missing_shards,
        })
    }
}

pub async fn tail(
    State(d): State<Arc<Dashboard>>,
    Authed(caller): Authed,
    RawQuery(q): RawQuery,
) -> Result<axum::response::Sse<impl Stream<Item = Result<Sse, Infallible>>>, ApiError> {
    let filter = params::tail(q.as_deref()).map_err(bad_request)?;
    let live = if d.bus.sharded() {
        let t = TailRequest {
            from_now: true,
            allow_partial: true,
            ..Default::default()
        };
        Live::Shards(d.bus.fan_out_tail(t, filter.clone()).await?)
    } else {
        Live::Here(d.bus.tail.subscribe())
    };
    let (tx, rx) = mpsc::channel(VIEWER_QUEUE);
    tracing::debug!(who = %caller.who, "dashboard tail opened");
    tokio::spawn(async move {
        d.bus.metrics.dashboard_tail_viewers.inc();
        feed(&d, live, &filter, &tx).await;
        d.bus.metrics.dashboard_tail_viewers.dec();
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(axum::response::Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Where a viewer's events come from: this bus's writer, or on a sharded
/// bus the merged tail of every shard.
enum Live {
    Here(broadcast::Receiver<Arc<Vec<Event>>>),
    Shards(mpsc::Receiver<Result<QueryResponse, tonic::Status>>),
}

enum Next {
    Group(Arc<Vec<Event>>),
    /// The shards the merged tail now lacks.
    Missing(Vec<u32>),
    Lagged(u64),
    Closed,
}

impl Live {
    async fn next(&mut self) -> Next {
        match self {
            Live::Here(rx) => match rx.recv().await {
                Ok(g) => Next::Group(g),
                Err(broadcast::error::RecvError::Lagged(n)) => Next::Lagged(n),
                Err(broadcast::error::RecvError::Closed) => Next::Closed,
            },
            Live::Shards(rx) => match rx.recv().await {
                Some(Ok(r)) if r.events.is_empty() => Next::Missing(r.missing_shards),
                Some(Ok(r)) => Next::Group(Arc::new(r.events)),
                Some(Err(_)) | None => Next::Closed,
            },
        }
    }
}

async fn feed(
    d: &Dashboard,
    mut live: Live,
    filter: &EventFilter,
    tx: &mpsc::Sender<Result<Sse, Infallible>>,
) {
    let max_rate = d.cfg.tail_max_events_per_second;
    let mut counts = Counts::default();
    let mut pending: Vec<Value> = Vec::new();
    let mut window_start = Instant::now();
    let mut in_window: u32 = 0;
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    let mut status = tokio::time::interval(STATUS_EVERY);
    // The page shows "connected" from the first status.
    if tx
        .send(Ok(sse("status", &counts.status(max_rate))))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            _ = d.bus.stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = flush.tick() => {
                if pending.is_empty() {
                    continue;
                }
                let n = pending.len() as u64;
                let msg = sse("events", &Value::Array(std::mem::take(&mut pending)));
                match tx.try_send(Ok(msg)) {
                    Ok(()) => counts.sent += n,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        counts.slow += n;
                        d.bus.metrics.dashboard_tail_skipped.inc_by(n);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
            _ = status.tick() => {
                // Cumulative counts: a status lost to a full queue is
                // superseded by the next.
                if let Err(mpsc::error::TrySendError::Closed(_)) =
                    tx.try_send(Ok(sse("status", &counts.status(max_rate))))
                {
                    return;
                }
            }
            r = live.next() => match r {
                Next::Missing(m) => {
                    counts.missing_shards = m;
                }
                Next::Group(group) => {
                    if window_start.elapsed() >= Duration::from_secs(1) {
                        window_start = Instant::now();
                        in_window = 0;
                    }
                    for e in group.iter().filter(|e| filter.matches(e)) {
                        if in_window < max_rate {
                            in_window += 1;
                            pending.push(event_line(e));
                        } else {
                            counts.capped += 1;
                            d.bus.metrics.dashboard_tail_skipped.inc();
                        }
                    }
                }
                Next::Lagged(n) => counts.lagged_groups += n,
                Next::Closed => return,
            }
        }
    }
}

fn sse(kind: &str, v: &Value) -> Sse {
    Sse::default().event(kind).data(v.to_string())
}
