//! The most recent alerts, kept in memory for the dashboard's overview.
//!
//! An alert is an `Alert` payload, or any event at warning severity or above.
//! The writer offers every stored group; at start the newest part of the
//! store is scanned once so a restart does not empty the list.

use std::collections::VecDeque;
use std::sync::Mutex;

use amoskys_proto::event::Payload;
use amoskys_proto::{Event, Severity};

pub const RECENT_ALERTS: usize = 50;

pub fn is_alert(e: &Event) -> bool {
    matches!(e.payload, Some(Payload::Alert(_))) || e.severity >= Severity::Warning as i32
}

#[derive(Default)]
pub struct RecentAlerts {
    ring: Mutex<VecDeque<Event>>,
}

impl RecentAlerts {
    /// Keeps the alerts among `events` (offset order), newest last.
    pub fn observe(&self, events: &[Event]) {
        let mut alerts = events.iter().filter(|e| is_alert(e)).peekable();
        if alerts.peek().is_none() {
            return;
        }
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        for e in alerts {
            if ring.back().is_some_and(|last| last.offset >= e.offset) {
                continue;
            }
            if ring.len() == RECENT_ALERTS {
                ring.pop_front();
            }
            ring.push_back(e.clone());
        }
    }

    /// Newest first, at most `n`.
    pub fn newest(&self, n: usize) -> Vec<Event> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().take(n).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::{Alert, SyntheticEvent};

    fn ev(offset: u64, severity: Severity, alert: bool) -> Event {
        Event {
            offset,
            severity: severity as i32,
            payload: Some(if alert {
                Payload::Alert(Alert::default())
            } else {
                Payload::Synthetic(SyntheticEvent::default())
            }),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_the_newest_alerts_once() {
        let r = RecentAlerts::default();
        let events: Vec<Event> = (0..200)
            .map(|i| match i % 4 {
                0 => ev(i, Severity::Info, true),
                1 => ev(i, Severity::Error, false),
                _ => ev(i, Severity::Info, false),
            })
            .collect();
        r.observe(&events);
        // A replayed group (startup scan racing the writer) adds nothing.
        r.observe(&events[150..]);
        let newest = r.newest(RECENT_ALERTS + 10);
        assert_eq!(newest.len(), RECENT_ALERTS);
        assert_eq!(newest[0].offset, 197);
        assert_eq!(newest[1].offset, 196);
        assert!(newest.iter().all(is_alert));
        assert!(newest.windows(2).all(|w| w[0].offset > w[1].offset));
    }
}
