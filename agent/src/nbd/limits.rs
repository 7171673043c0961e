//! The caps of the NBD server: connections per listener and per export, request bytes
//! in flight per connection; and the rate-limited log line of a refusal.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use super::*;

/// Default connections at once on the agent's TCP listener (`--nbd-max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default connections at once to one export (`--nbd-max-export-connections`): QEMU
/// opens one per drive (more with `multi-conn`), so 16 leaves room for tools beside it.
pub const DEFAULT_MAX_EXPORT_CONNECTIONS: usize = 16;
/// A refusal over a cap is logged at most this often (with the count since the last).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// The caps one registry's listeners apply (flags of `agent serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections at once on one listener, from accept to close (the TCP listener's
    /// is the agent's cap; each VM's socket gets its own, see `vm`).
    pub max_connections: usize,
    /// Connections at once that opened one export, counted across listeners.
    pub max_export_connections: usize,
    /// Read and write payload bytes one connection may hold in flight; a client that
    /// sends more before reading replies is not read until replies are taken.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_export_connections: DEFAULT_MAX_EXPORT_CONNECTIONS,
            max_request_bytes: MAX_BYTES_IN_FLIGHT,
        }
    }
}

/// A [`Limits`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// Below the largest request, a maximal write would wait for a budget forever.
    #[error("the request memory per connection ({0} bytes) must be at least the largest request, {MAX_PAYLOAD} bytes")]
    RequestBytes(u64),
}

impl Limits {
    /// Validated limits.
    pub fn new(
        max_connections: usize,
        max_export_connections: usize,
        max_request_bytes: u64,
    ) -> Result<Self, LimitsError> {
        if max_connections == 0 {
            return Err(LimitsError::Zero("the connection cap"));
        }
        if max_export_connections == 0 {
            return Err(LimitsError::Zero("the connection cap per export"));
        }
        // The upper bound keeps the budget's permit count far inside a semaphore's range.
        if max_request_bytes < u64::from(MAX_PAYLOAD) || max_request_bytes > 1 << 40 {
            return Err(LimitsError::RequestBytes(max_request_bytes));
        }
        Ok(Self { max_connections, max_export_connections, max_request_bytes: max_request_bytes as usize })
    }

    /// The same limits with another connection cap per listener.
    pub fn with_max_connections(self, max_connections: usize) -> Self {
        Self { max_connections: max_connections.max(1), ..self }
    }
}

/// Connection slots: of one export (shared by its entries in several registries), or
/// of one listener. Taken without waiting, given back when the connection ends.
#[derive(Debug, Clone)]
pub struct ConnSlots {
    sem: Arc<Semaphore>,
    max: usize,
}

impl ConnSlots {
    /// Room for `max` connections at once (at least one).
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self { sem: Arc::new(Semaphore::new(max)), max }
    }

    /// A slot, or `None` at the cap (never waits).
    pub(super) fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    pub(super) fn max(&self) -> usize {
        self.max
    }
}

/// Counts refusals and lets one log line through per [`REFUSAL_LOG_EVERY`], so a flood
/// of refused connections cannot flood the log too.
#[derive(Default)]
pub(super) struct Refusals {
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl Refusals {
    /// Counts one refusal; `Some(n)` when a line should be logged now, `n` being the
    /// refusals not logged since the last line.
    pub(super) fn note(&self) -> Option<u64> {
        self.note_at(Instant::now())
    }

    fn note_at(&self, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if now.saturating_duration_since(t) < REFUSAL_LOG_EVERY => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated() {
        assert!(Limits::new(256, 16, 64 << 20).is_ok());
        assert_eq!(Limits::new(0, 16, 64 << 20), Err(LimitsError::Zero("the connection cap")));
        assert_eq!(Limits::new(1, 0, 64 << 20), Err(LimitsError::Zero("the connection cap per export")));
        assert_eq!(Limits::new(1, 1, (32 << 20) - 1), Err(LimitsError::RequestBytes((32 << 20) - 1)));
        assert!(Limits::new(1, 1, 32 << 20).is_ok());
        assert_eq!(Limits::default().max_request_bytes, MAX_BYTES_IN_FLIGHT);
    }

    #[test]
    fn slots_never_wait_and_come_back() {
        let s = ConnSlots::new(2);
        let a = s.try_take().expect("first");
        let _b = s.try_take().expect("second");
        assert!(s.try_take().is_none(), "third over the cap");
        drop(a);
        assert!(s.try_take().is_some(), "a slot comes back when a connection ends");
        assert_eq!(ConnSlots::new(0).max(), 1, "never a cap of zero");
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_interval() {
        let r = Refusals::default();
        let t0 = Instant::now();
        assert_eq!(r.note_at(t0), Some(0));
        for _ in 0..5 {
            assert_eq!(r.note_at(t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(r.note_at(t0 + REFUSAL_LOG_EVERY), Some(5), "the next line counts the suppressed ones");
        assert_eq!(r.note_at(t0 + REFUSAL_LOG_EVERY + Duration::from_secs(1)), None);
    }
}
