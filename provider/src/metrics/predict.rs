//! Time to an RPO breach, predicted from the backlog and the measured shipping rate.
//!
//! The breach is the RPO lag reaching twice the policy interval (the warning level of
//! the shipped alert rules). The backlog (pending log bytes) ships at the rate measured
//! from the growth of the bytes replicated between statuses; once it has shipped, a new
//! point brings the lag down. So: no backlog, or a backlog that ships before the lag
//! reaches the threshold → no breach predicted (+Inf); otherwise the breach comes when
//! the lag reaches the threshold, in `threshold - lag` seconds (0 once past it).

use std::collections::HashMap;
use std::sync::Mutex;

/// Seconds until the RPO lag reaches `2 × interval`, or +Inf when the backlog ships first.
pub fn seconds_to_breach(lag_s: f64, interval_s: f64, pending_bytes: u64, rate_bytes_per_s: f64) -> f64 {
    let threshold = 2.0 * interval_s;
    if lag_s >= threshold {
        return 0.0;
    }
    if pending_bytes == 0 {
        return f64::INFINITY;
    }
    let drain = if rate_bytes_per_s > 0.0 { pending_bytes as f64 / rate_bytes_per_s } else { f64::INFINITY };
    if lag_s + drain < threshold { f64::INFINITY } else { threshold - lag_s }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    received_ms: i64,
    bytes: u64,
    rate: f64,
}

/// Shipping rate of each relationship, measured from successive statuses (the bytes
/// replicated and when they were received), smoothed; kept across scrapes.
#[derive(Debug, Default)]
pub struct Rates {
    by_relationship: Mutex<HashMap<String, Sample>>,
}

impl Rates {
    /// Folds in the status received at `received_ms` and returns the rate, bytes/s.
    /// Only intervals with something to ship count (an idle VM ships nothing and says
    /// nothing about the link).
    pub fn observe(&self, id: &str, received_ms: i64, bytes: u64, pending: u64) -> f64 {
        let Ok(mut m) = self.by_relationship.lock() else { return 0.0 };
        let prev = m.get(id).copied();
        let rate = match prev {
            Some(p) if received_ms > p.received_ms && bytes >= p.bytes => {
                let inst = (bytes - p.bytes) as f64 * 1000.0 / (received_ms - p.received_ms) as f64;
                if bytes == p.bytes && pending == 0 {
                    p.rate
                } else if p.rate == 0.0 {
                    inst
                } else {
                    (p.rate * 3.0 + inst) / 4.0
                }
            }
            Some(p) if received_ms == p.received_ms => return p.rate,
            // The first status, or the agent restarted (its counter too).
            _ => 0.0,
        };
        m.insert(id.to_owned(), Sample { received_ms, bytes, rate });
        rate
    }

    /// Forgets relationships no longer there.
    pub fn retain(&self, ids: &[&str]) {
        if let Ok(mut m) = self.by_relationship.lock() {
            m.retain(|k, _| ids.contains(&k.as_str()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_that_ships_in_time_predicts_no_breach() {
        // 10 s interval: threshold 20 s. 1 MB at 1 MB/s ships in 1 s.
        assert_eq!(seconds_to_breach(5.0, 10.0, 1_000_000, 1e6), f64::INFINITY);
        assert_eq!(seconds_to_breach(5.0, 10.0, 0, 0.0), f64::INFINITY);
    }

    #[test]
    fn a_backlog_too_slow_to_ship_predicts_the_breach_at_the_threshold() {
        // 100 MB at 1 MB/s: 100 s, far past the threshold of 20 s; lag 5 s → 15 s left.
        assert_eq!(seconds_to_breach(5.0, 10.0, 100_000_000, 1e6), 15.0);
        // Nothing ships at all.
        assert_eq!(seconds_to_breach(12.0, 10.0, 1, 0.0), 8.0);
        // Already past it.
        assert_eq!(seconds_to_breach(25.0, 10.0, 0, 1e6), 0.0);
    }

    #[test]
    fn the_rate_is_measured_between_statuses() {
        let r = Rates::default();
        assert_eq!(r.observe("r1", 1000, 0, 10), 0.0);
        assert_eq!(r.observe("r1", 2000, 1_000_000, 10), 1e6);
        // The same status seen again at the next scrape: unchanged.
        assert_eq!(r.observe("r1", 2000, 1_000_000, 10), 1e6);
        // Smoothed: a second at 3 MB/s.
        assert_eq!(r.observe("r1", 3000, 4_000_000, 10), 1.5e6);
        // Idle (nothing pending, nothing shipped): the rate is kept.
        assert_eq!(r.observe("r1", 4000, 4_000_000, 0), 1.5e6);
        // The agent restarted: its counter went back.
        assert_eq!(r.observe("r1", 5000, 10, 0), 0.0);
        r.retain(&[]);
        assert_eq!(r.observe("r1", 6000, 20, 0), 0.0);
    }
}
