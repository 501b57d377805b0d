//! Interface rates from counter deltas, with 32-bit wrap and device-reset
//! handling. Pure functions over samples.

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub in_octets: u64,
    pub out_octets: u64,
    /// 64 for ifHCInOctets/ifHCOutOctets, 32 for ifInOctets/ifOutOctets.
    pub bits: u32,
    /// sysUpTime in hundredths of a second.
    pub uptime_ticks: u64,
    /// Wall clock, seconds, as a fallback time base.
    pub at: f64,
}

/// The increase of a counter, or None when it cannot be known: a 64-bit
/// counter going backwards (a reset, not a wrap).
pub fn counter_delta(prev: u64, cur: u64, bits: u32) -> Option<u64> {
    if cur >= prev {
        Some(cur - prev)
    } else if bits == 32 && prev <= u64::from(u32::MAX) {
        Some(cur + (1u64 << 32) - prev)
    } else {
        None
    }
}

/// (in, out) bits per second between two samples; None across a reset
/// (uptime went backwards, or the counter width changed).
pub fn rates(prev: &Sample, cur: &Sample) -> Option<(f64, f64)> {
    if cur.uptime_ticks < prev.uptime_ticks || cur.bits != prev.bits {
        return None;
    }
    let mut secs = (cur.uptime_ticks - prev.uptime_ticks) as f64 / 100.0;
    if secs <= 0.0 {
        secs = cur.at - prev.at;
    }
    if secs <= 0.0 {
        return None;
    }
    let din = counter_delta(prev.in_octets, cur.in_octets, cur.bits)?;
    let dout = counter_delta(prev.out_octets, cur.out_octets, cur.bits)?;
    Some((din as f64 * 8.0 / secs, dout as f64 * 8.0 / secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(i: u64, o: u64, bits: u32, up: u64) -> Sample {
        Sample {
            in_octets: i,
            out_octets: o,
            bits,
            uptime_ticks: up,
            at: up as f64 / 100.0,
        }
    }

    #[test]
    fn plain_rate() {
        let r = rates(&s(1000, 0, 64, 100), &s(2000, 500, 64, 1100)).unwrap();
        assert_eq!(r, (800.0, 400.0));
    }

    #[test]
    fn wrap_of_a_32_bit_counter() {
        let prev = s(u64::from(u32::MAX) - 99, 0, 32, 0);
        let cur = s(100, 0, 32, 100);
        let (i, _) = rates(&prev, &cur).unwrap();
        assert_eq!(i, 200.0 * 8.0);
    }

    #[test]
    fn resets_give_no_rate() {
        // Device rebooted: uptime went back.
        assert!(rates(&s(5000, 0, 64, 9000), &s(10, 0, 64, 50)).is_none());
        // 64-bit counter went back without a reboot: a reset, not a wrap.
        assert!(rates(&s(5000, 0, 64, 100), &s(10, 0, 64, 200)).is_none());
        // Switched from 32- to 64-bit counters.
        assert!(rates(&s(5000, 0, 32, 100), &s(6000, 0, 64, 200)).is_none());
        assert_eq!(counter_delta(7, 7, 64), Some(0));
    }
}
