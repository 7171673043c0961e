use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use siterecovery_proto::model::bandwidth::BandwidthSpec;

use super::limiter::REEVALUATE;
use super::*;

const MIB: u64 = 1 << 20;

/// A wall clock the test moves.
struct FakeClock(Mutex<Timestamp>);

impl WallClock for FakeClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().expect("clock")
    }
}

impl FakeClock {
    fn at(s: &str) -> Arc<Self> {
        Arc::new(FakeClock(Mutex::new(s.parse().expect("timestamp"))))
    }
    fn advance(&self, d: Duration) {
        let mut t = self.0.lock().expect("clock");
        *t = t.checked_add(SignedDuration::try_from(d).expect("duration")).expect("add");
    }
}

fn spec(s: &str) -> BandwidthSpec {
    s.parse().expect("spec")
}

/// A limiter on virtual time: the monotonic instant and the wall clock move together,
/// only when the test says so or a sender waits.
struct Sim {
    l: Limiter,
    clock: Arc<FakeClock>,
    now: Instant,
}

impl Sim {
    fn new(s: &str, bulk: Option<&str>, at: &str, tz: TimeZone) -> Self {
        let clock = FakeClock::at(at);
        let now = Instant::now();
        let l = Limiter::new_at(spec(s), bulk.map(spec), LocalClock::new(clock.clone(), tz), now);
        Sim { l, clock, now }
    }
    fn sleep(&mut self, d: Duration) {
        self.now += d;
        self.clock.advance(d);
    }
    /// Sends `n` bytes, waiting as the limiter says; how long it waited.
    fn send(&mut self, n: u64, class: Traffic) -> Duration {
        let mut waited = Duration::ZERO;
        for _ in 0..1_000_000 {
            match self.l.take(n, class, self.now) {
                None => return waited,
                Some(w) => {
                    assert!(w <= REEVALUATE, "{w:?}");
                    waited += w;
                    self.sleep(w);
                }
            }
        }
        panic!("never sent");
    }
    /// Sends `chunk`-sized messages for `secs` seconds; the bytes that went within them.
    fn send_for(&mut self, chunk: u64, secs: u64, class: Traffic) -> u64 {
        let end = self.now + Duration::from_secs(secs);
        let mut sent = 0;
        while self.now < end {
            self.send(chunk, class);
            if self.now < end {
                sent += chunk;
            }
        }
        sent
    }
    fn limit(&self) -> u64 {
        self.l.limit_at(self.now)
    }
}

const NOON: &str = "2026-06-01T12:00:00Z";

#[test]
fn the_rate_holds_and_bursts_are_bounded() {
    let mut s = Sim::new("*=4M", None, NOON, TimeZone::UTC);
    let sent = s.send_for(MIB, 10, Traffic::Delta);
    // 10 s at 4 MiB/s, plus at most 100 ms worth and one message of burst.
    assert!((40 * MIB..=40 * MIB + MIB * 4 / 10 + MIB).contains(&sent), "{sent}");
    assert_eq!(s.limit(), 4 * MIB);
    let a = s.l.achieved_at(s.now);
    assert!((a as f64 - 4.0 * MIB as f64).abs() < 0.15 * 4.0 * MIB as f64, "achieved {a}");
    // Idle: the achieved rate decays to 0.
    s.sleep(Duration::from_secs(3));
    assert_eq!(s.l.achieved_at(s.now), 0);
}

#[test]
fn unlimited_never_waits() {
    let mut s = Sim::new("0", None, NOON, TimeZone::UTC);
    for _ in 0..1000 {
        assert_eq!(s.send(MIB, Traffic::Bulk), Duration::ZERO);
    }
    assert_eq!(s.limit(), 0);
}

#[test]
fn a_window_edge_applies_within_a_second() {
    let mut s = Sim::new("08:00-18:00=1M,*=0", None, "2026-06-01T07:59:58Z", TimeZone::UTC);
    assert_eq!(s.limit(), 0, "07:59:58 is outside the window");
    for _ in 0..100 {
        assert_eq!(s.send(MIB, Traffic::Delta), Duration::ZERO, "unlimited before the edge");
    }
    s.sleep(Duration::from_secs(2));
    assert_eq!(s.limit(), MIB, "08:00:00 is inside");
    let sent = s.send_for(64 << 10, 5, Traffic::Delta);
    assert!((5 * MIB - (64 << 10)..=5 * MIB + MIB / 10 + (64 << 10)).contains(&sent), "{sent}");
    // Just before 18:00, deep in debt (hours at 1 KiB/s would be needed)...
    s.clock.advance(Duration::from_secs(10 * 3600 - 6));
    s.l.set_spec(spec("08:00-18:00=1K,*=0"), None);
    s.send(10 * MIB, Traffic::Delta);
    let waited = s.send(MIB, Traffic::Delta);
    // ...the sender is released at the edge, within a second.
    assert!(waited <= Duration::from_secs(2), "{waited:?}");
    assert_eq!(s.limit(), 0);
}

const SEC: Duration = Duration::from_secs(1);

#[test]
fn midnight_wraps_into_the_next_day() {
    let clock = FakeClock::at("2026-06-01T21:59:59Z");
    let local = LocalClock::new(clock.clone(), TimeZone::UTC);
    let s = spec("22:00-06:00=1M,*=8M");
    assert_eq!(s.rate_at(local.second_of_day()), 8 * MIB);
    clock.advance(SEC);
    assert_eq!(s.rate_at(local.second_of_day()), MIB);
    clock.advance(SEC * (2 * 3600 - 1)); // 23:59:59
    assert_eq!(s.rate_at(local.second_of_day()), MIB);
    clock.advance(SEC); // 00:00:00 of the next day
    assert_eq!(local.second_of_day(), 0);
    assert_eq!(s.rate_at(local.second_of_day()), MIB);
    clock.advance(SEC * (6 * 3600 - 1)); // 05:59:59
    assert_eq!(s.rate_at(local.second_of_day()), MIB);
    clock.advance(SEC);
    assert_eq!(s.rate_at(local.second_of_day()), 8 * MIB);
}

#[test]
fn windows_are_in_the_hosts_time_zone() {
    // 06:30 UTC is 08:30 in Paris in summer (CEST), 07:30 in winter (CET).
    let paris = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").expect("posix tz");
    let s = spec("08:00-18:00=1M,*=0");
    let summer = FakeClock::at("2026-07-01T06:30:00Z");
    let winter = FakeClock::at("2026-01-15T06:30:00Z");
    assert_eq!(s.rate_at(LocalClock::new(summer.clone(), paris.clone()).second_of_day()), MIB);
    assert_eq!(s.rate_at(LocalClock::new(summer, TimeZone::UTC).second_of_day()), 0);
    assert_eq!(s.rate_at(LocalClock::new(winter, paris).second_of_day()), 0);
    let tokyo = TimeZone::fixed(jiff::tz::offset(9));
    let night = FakeClock::at("2026-07-01T23:30:00Z"); // 08:30 the next day in Tokyo
    assert_eq!(s.rate_at(LocalClock::new(night, tokyo).second_of_day()), MIB);
}

#[test]
fn bulk_traffic_uses_the_resync_limit_when_set() {
    let mut s = Sim::new("*=4M", Some("*=1M"), NOON, TimeZone::UTC);
    s.send(1, Traffic::Bulk);
    assert_eq!(s.limit(), MIB);
    let bulk = s.send_for(64 << 10, 4, Traffic::Bulk);
    assert!(bulk <= 4 * MIB + MIB / 10 + (64 << 10), "{bulk}");
    s.send(1, Traffic::Delta);
    assert_eq!(s.limit(), 4 * MIB);
    let mut s = Sim::new("*=4M", None, NOON, TimeZone::UTC);
    s.send(1, Traffic::Bulk);
    assert_eq!(s.limit(), 4 * MIB, "without a resync limit bulk traffic has the policy's");
    // A pushed change applies at the next message.
    s.l.set_spec(spec("*=2M"), None);
    s.send(1, Traffic::Bulk);
    assert_eq!(s.limit(), 2 * MIB);
}

#[test]
fn the_smaller_limit_wins_and_zero_is_unlimited() {
    assert_eq!(min_limit(0, 0), 0);
    assert_eq!(min_limit(0, 5), 5);
    assert_eq!(min_limit(7, 0), 7);
    assert_eq!(min_limit(7, 5), 5);
}

#[test]
fn the_system_clock_reads_the_local_zone_in_a_multithreaded_process() {
    // Other threads exist (the test harness): jiff still answers.
    let _t = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(100)));
    let s = LocalClock::system().second_of_day();
    assert!(s < 86_400);
}
