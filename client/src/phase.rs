//! An agent's phase, derived from what the registry knows about it. Pure, so
//! the dashboard and the operator's `Agent` status agree on the same rules.

use amoskys_proto::AgentRecord;

/// Where an agent stands, as `kubectl get agents` and the dashboard show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Connected or seen, but no heartbeat yet.
    Pending,
    /// Heartbeating, nothing dropped, spool not growing.
    Running,
    /// No stream, or heartbeats stopped arriving.
    Disconnected,
    /// Heartbeating, but dropping events or its spool keeps growing.
    Degraded,
}

impl Phase {
    /// Every phase, in display order.
    pub const ALL: [Phase; 4] = [
        Phase::Pending,
        Phase::Running,
        Phase::Disconnected,
        Phase::Degraded,
    ];

    /// The name shown to people.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Running => "Running",
            Phase::Disconnected => "Disconnected",
            Phase::Degraded => "Degraded",
        }
    }
}

/// One observation of an agent's spool, oldest first in a slice.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SpoolSample {
    /// When it was taken (unix ns).
    pub at_ns: i64,
    /// Bytes the spool held.
    pub spool_bytes: u64,
    /// Events dropped so far (a running total).
    pub dropped: u64,
}

/// How many consecutive growing spool samples make a trend.
pub const GROWING_SAMPLES: usize = 4;

/// The phase and a sentence saying why.
pub fn phase(
    rec: &AgentRecord,
    now_ns: i64,
    missed_after_ns: i64,
    recent: &[SpoolSample],
) -> (Phase, String) {
    if rec.last_heartbeat.is_none() {
        return if rec.connected {
            (
                Phase::Pending,
                "connected; waiting for the first heartbeat".into(),
            )
        } else {
            (Phase::Pending, "no heartbeat received yet".into())
        };
    }
    if !rec.connected {
        return (Phase::Disconnected, "no stream to the bus".into());
    }
    let silent = now_ns.saturating_sub(rec.last_heartbeat_at);
    if silent > missed_after_ns {
        return (
            Phase::Disconnected,
            format!("no heartbeat for {}s", silent / 1_000_000_000),
        );
    }
    if let (Some(first), Some(last)) = (recent.first(), recent.last())
        && last.dropped > first.dropped
    {
        return (
            Phase::Degraded,
            format!(
                "dropped {} events recently (spool full)",
                last.dropped - first.dropped
            ),
        );
    }
    if recent.len() >= GROWING_SAMPLES {
        let tail = &recent[recent.len() - GROWING_SAMPLES..];
        if tail.windows(2).all(|w| w[1].spool_bytes > w[0].spool_bytes) {
            return (
                Phase::Degraded,
                format!(
                    "spool growing: {} → {} bytes",
                    tail[0].spool_bytes,
                    tail[GROWING_SAMPLES - 1].spool_bytes
                ),
            );
        }
    }
    (Phase::Running, "heartbeating".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use amoskys_proto::Heartbeat;

    const S: i64 = 1_000_000_000;

    fn rec(connected: bool, hb_at: Option<i64>) -> AgentRecord {
        AgentRecord {
            agent_id: "a".into(),
            connected,
            last_heartbeat: hb_at.map(|_| Heartbeat::default()),
            last_heartbeat_at: hb_at.unwrap_or(0),
            ..Default::default()
        }
    }

    fn s(at: i64, spool: u64, dropped: u64) -> SpoolSample {
        SpoolSample {
            at_ns: at * S,
            spool_bytes: spool,
            dropped,
        }
    }

    #[test]
    fn phases_follow_heartbeats_drops_and_spool() {
        let now = 100 * S;
        let missed = 30 * S;
        assert_eq!(phase(&rec(true, None), now, missed, &[]).0, Phase::Pending);
        assert_eq!(phase(&rec(false, None), now, missed, &[]).0, Phase::Pending);
        let fresh = rec(true, Some(95 * S));
        assert_eq!(phase(&fresh, now, missed, &[]).0, Phase::Running);
        assert_eq!(
            phase(&rec(false, Some(95 * S)), now, missed, &[]).0,
            Phase::Disconnected
        );
        let (p, why) = phase(&rec(true, Some(50 * S)), now, missed, &[]);
        assert_eq!(p, Phase::Disconnected);
        assert!(why.contains("50s"), "{why}");

        let dropping = [s(80, 10, 0), s(90, 10, 5)];
        let (p, why) = phase(&fresh, now, missed, &dropping);
        assert_eq!(p, Phase::Degraded);
        assert!(why.contains("dropped 5"), "{why}");

        let growing = [s(70, 1, 0), s(80, 2, 0), s(90, 3, 0), s(95, 4, 0)];
        assert_eq!(phase(&fresh, now, missed, &growing).0, Phase::Degraded);
        let draining = [s(70, 1, 0), s(80, 2, 0), s(90, 3, 0), s(95, 2, 0)];
        assert_eq!(phase(&fresh, now, missed, &draining).0, Phase::Running);
        // Too few samples are not a trend.
        assert_eq!(phase(&fresh, now, missed, &growing[1..]).0, Phase::Running);
    }
}
