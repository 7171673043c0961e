//! Time in the end-to-end tests: the clocks the assertions compare with, and bounded
//! polls. Nothing here sleeps to synchronise: every wait polls a condition until a
//! deadline ([`wait_until`]), or checks that a condition keeps holding for a while
//! ([`holds_for`]).

use std::time::{Duration, Instant};

/// Poll period of [`wait_until`].
pub const POLL: Duration = Duration::from_millis(100);

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Milliseconds since the epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Polls `f` every [`POLL`] until it returns true (→ true) or `timeout` passes (→ false).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    wait_until_every(timeout, POLL, &mut f)
}

/// [`wait_until`] with another poll period (for races against a fast process).
pub fn wait_until_every(timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Polls `f` every [`POLL`] for `period`: true when it held at every poll (at least
/// once, and once more at the end), false at the first poll where it did not. For
/// "nothing moves on by itself meanwhile" checks.
pub fn holds_for(period: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + period;
    loop {
        if !f() {
            return false;
        }
        if Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(POLL);
    }
}
