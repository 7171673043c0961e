//! Refused registrations, rate-limited per source address: a token bucket per address
//! (IPv6 by its /64, the block one machine usually holds). Every refusal takes a
//! token; an address with no token left is answered `RESOURCE_EXHAUSTED` before the
//! secret file or the store is read. Tokens come back at [`REFILL_PER_MINUTE`] a
//! minute, up to [`BURST`].
//!
//! Memory is bounded: at most [`MAX_ADDRESSES`] buckets. When the table is full, the
//! buckets that have refilled (they say nothing a missing bucket would not) are
//! dropped first, then the one refused longest ago.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Refusals an address may collect at once.
pub const BURST: f64 = 5.0;
/// Tokens an address gets back per minute.
pub const REFILL_PER_MINUTE: f64 = 5.0;
/// Buckets kept at most.
pub const MAX_ADDRESSES: usize = 4096;

/// The key of an address: an IPv4 address, or the /64 of an IPv6 one.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// The limit was announced in the log since the bucket ran dry.
    announced: bool,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let minutes = now.saturating_duration_since(self.at).as_secs_f64() / 60.0;
        self.tokens = (self.tokens + minutes * REFILL_PER_MINUTE).min(BURST);
        self.at = now;
    }
}

/// What the limiter says of an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (a refusal will take a token).
    Allowed,
    /// Refused without looking; `first` for the first such answer since the address
    /// ran out (the one worth a log line).
    Limited { first: bool, retry_after: Duration },
}

/// The per-address buckets of refused registrations.
#[derive(Debug, Default)]
pub struct RefusalLimiter {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RefusalLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an attempt from `ip` may be looked at, at `now`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Verdict {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = map.get_mut(&key(ip)) else { return Verdict::Allowed };
        b.refill(now);
        if b.tokens >= 1.0 {
            b.announced = false;
            return Verdict::Allowed;
        }
        let first = !b.announced;
        b.announced = true;
        let retry_after = Duration::from_secs_f64((1.0 - b.tokens) * 60.0 / REFILL_PER_MINUTE);
        Verdict::Limited { first, retry_after }
    }

    /// Takes a token from `ip`'s bucket: an attempt from it was refused.
    pub fn refused(&self, ip: IpAddr, now: Instant) {
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(ip);
        if !map.contains_key(&k) && map.len() >= MAX_ADDRESSES {
            make_room(&mut map, now);
        }
        let b = map.entry(k).or_insert(Bucket { tokens: BURST, at: now, announced: false });
        b.refill(now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    /// Buckets held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drops the refilled buckets; when none has, the one touched longest ago.
fn make_room(map: &mut HashMap<IpAddr, Bucket>, now: Instant) {
    map.retain(|_, b| {
        b.refill(now);
        b.tokens < BURST
    });
    if map.len() >= MAX_ADDRESSES
        && let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k)
    {
        map.remove(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn five_refusals_a_minute_then_exhausted_until_refilled() {
        let l = RefusalLimiter::new();
        let t0 = Instant::now();
        let a = ip("192.0.2.7");
        for i in 0..5 {
            assert_eq!(l.check(a, t0), Verdict::Allowed, "attempt {i}");
            l.refused(a, t0);
        }
        let Verdict::Limited { first, retry_after } = l.check(a, t0) else { panic!("not limited after 5") };
        assert!(first);
        assert_eq!(retry_after, Duration::from_secs(12));
        assert!(matches!(l.check(a, t0), Verdict::Limited { first: false, .. }), "announced once");
        // Another address is not affected.
        assert_eq!(l.check(ip("192.0.2.8"), t0), Verdict::Allowed);
        // One token back after 12 s; taking it empties the bucket again.
        let t1 = t0 + Duration::from_secs(12);
        assert_eq!(l.check(a, t1), Verdict::Allowed);
        l.refused(a, t1);
        assert!(matches!(l.check(a, t1), Verdict::Limited { first: true, .. }), "a new episode is announced");
        // Full again after a minute.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..5 {
            assert_eq!(l.check(a, t2), Verdict::Allowed);
            l.refused(a, t2);
        }
        assert!(matches!(l.check(a, t2), Verdict::Limited { .. }));
    }

    #[test]
    fn ipv6_is_limited_by_its_64() {
        let l = RefusalLimiter::new();
        let t0 = Instant::now();
        for i in 0..5 {
            l.refused(ip(&format!("2001:db8:1:2::{i}")), t0);
        }
        assert!(matches!(l.check(ip("2001:db8:1:2::99"), t0), Verdict::Limited { .. }));
        assert_eq!(l.check(ip("2001:db8:1:3::1"), t0), Verdict::Allowed);
        // An IPv4-mapped address counts as its IPv4 address.
        for _ in 0..5 {
            l.refused(ip("::ffff:192.0.2.1"), t0);
        }
        assert!(matches!(l.check(ip("192.0.2.1"), t0), Verdict::Limited { .. }));
    }

    #[test]
    fn the_table_stays_bounded() {
        let l = RefusalLimiter::new();
        let t0 = Instant::now();
        let limited = ip("198.51.100.1");
        for _ in 0..5 {
            l.refused(limited, t0);
        }
        for i in 0..(MAX_ADDRESSES as u32 * 2) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            l.refused(a, t0 + Duration::from_millis(u64::from(i) + 1));
            assert!(l.len() <= MAX_ADDRESSES);
        }
        assert_eq!(l.len(), MAX_ADDRESSES);
        // Refilled buckets go first: an address limited a while ago keeps its place
        // only while it is still short of tokens.
        let later = t0 + Duration::from_secs(3600);
        l.refused(ip("203.0.113.9"), later);
        assert!(l.len() <= MAX_ADDRESSES);
        assert!(l.len() < 10, "every refilled bucket dropped: {}", l.len());
    }
}
