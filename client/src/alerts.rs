//! Alerts as people read them: a rule's repeats within its dedup window are
//! stored as updates (`updates_seq` naming the alert they update, carrying
//! the window's total), and a reader shows one alert with the latest count.

use std::collections::HashMap;

use amoskys_proto::event::Payload;
use amoskys_proto::{Alert, Event};

/// The alert an event carries, if any.
pub fn alert_of(e: &Event) -> Option<&Alert> {
    match &e.payload {
        Some(Payload::Alert(a)) => Some(a),
        _ => None,
    }
}

/// The alerts among `events` (in the order given), each with the count and
/// last match of the newest update to it that is also among `events`;
/// the updates themselves are folded away.
pub fn fold(events: &[Event]) -> Vec<(&Event, Alert)> {
    // (detector agent id, seq of the updated alert) -> (count, last seen)
    let mut totals: HashMap<(&str, u64), (u64, i64)> = HashMap::new();
    for e in events {
        if let Some(a) = alert_of(e)
            && a.updates_seq != 0
        {
            let t = totals
                .entry((e.agent_id.as_str(), a.updates_seq))
                .or_insert((a.count, a.last_seen));
            if a.count > t.0 {
                *t = (a.count, a.last_seen);
            }
        }
    }
    events
        .iter()
        .filter_map(|e| {
            let a = alert_of(e)?;
            if a.updates_seq != 0 {
                return None;
            }
            let mut a = a.clone();
            if let Some(&(count, last)) = totals.get(&(e.agent_id.as_str(), e.seq)) {
                a.count = count;
                a.last_seen = last;
            }
            Some((e, a))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(seq: u64, updates: u64, count: u64, last: i64) -> Event {
        Event {
            agent_id: "amoskys:detect/0".into(),
            seq,
            payload: Some(Payload::Alert(Alert {
                rule: "shell".into(),
                updates_seq: updates,
                count,
                last_seen: last,
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn updates_fold_into_the_alert_they_update_with_the_highest_count() {
        let events = vec![
            alert(1, 0, 1, 10),
            alert(2, 0, 1, 20),
            alert(3, 1, 3, 30),
            alert(4, 1, 5, 40),
            Event::default(),
        ];
        // Newest first or oldest first, the result is the same.
        for order in [events.clone(), events.iter().rev().cloned().collect()] {
            let mut got: Vec<(u64, u64, i64)> = fold(&order)
                .iter()
                .map(|(e, a)| (e.seq, a.count, a.last_seen))
                .collect();
            got.sort();
            assert_eq!(got, [(1, 5, 40), (2, 1, 20)]);
        }
    }
}
