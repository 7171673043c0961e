//! Bandwidth control of the sender: a token bucket ([`Limiter`]) whose rate follows a
//! [`BandwidthSpec`] evaluated against the host's local time ([`LocalClock`]).
//!
//! Two limits apply to every byte the sender puts on the wire (after compression): the
//! host's (`agent serve --bandwidth`, one bucket shared by all relationships of the
//! host, [`host`]) and the relationship's policy (`policy create --bandwidth`, one bucket
//! per relationship); the effective limit is the smaller one. Bulk traffic — the
//! initial copy, resync and dirty-block catch-up — uses the policy's
//! `--resync-bandwidth` when it is set, else its `--bandwidth`: the initial copy counts
//! as resync traffic (it is the same kind of bulk catch-up and would otherwise crowd
//! out nothing but itself).
//!
//! A bucket holds at most 100 ms worth of its rate; a message larger than what is in
//! the bucket is sent once the bucket is not in debt and then puts it in debt, so a
//! burst is at most 100 ms worth plus one message (≤ 2 MiB). The rate is re-evaluated
//! against the clock at least every second (and at once when the spec changes), so a
//! window edge applies without a restart.
//!
//! Local time: `jiff` with the system time zone database (`TZ`, else `/etc/localtime`),
//! read safely in a multithreaded process, unlike the `time` crate's local offset. Tests
//! inject the clock and the zone ([`LocalClock::new`]); e2e tests shift the agent's
//! clock with the hidden environment variable [`CLOCK_OFFSET_ENV`].

mod limiter;

#[cfg(test)]
mod tests;

use std::sync::{Arc, LazyLock};

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use siterecovery_proto::model::bandwidth::BandwidthSpec;

pub use self::limiter::{Limiter, Traffic};

/// Test-only: seconds (signed) added to the real time before the bandwidth windows are
/// evaluated, so an e2e test can put the agent just before a window edge.
pub const CLOCK_OFFSET_ENV: &str = "SITERECOVERY_TEST_BANDWIDTH_CLOCK_OFFSET_S";

/// The wall clock the windows are evaluated against.
pub trait WallClock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The real time, shifted by [`CLOCK_OFFSET_ENV`] when set.
struct SystemClock {
    offset: SignedDuration,
}

impl WallClock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now().saturating_add(self.offset).unwrap_or_else(|_| Timestamp::now())
    }
}

/// The host's local time of day.
#[derive(Clone)]
pub struct LocalClock {
    clock: Arc<dyn WallClock>,
    tz: TimeZone,
}

impl LocalClock {
    /// `clock` in zone `tz`.
    pub fn new(clock: Arc<dyn WallClock>, tz: TimeZone) -> Self {
        LocalClock { clock, tz }
    }

    /// The system's clock and zone (UTC when the zone cannot be found, with a warning).
    pub fn system() -> Self {
        let tz = TimeZone::try_system().unwrap_or_else(|e| {
            tracing::warn!("local time zone unknown ({e}): bandwidth windows are in UTC");
            TimeZone::UTC
        });
        let offset = std::env::var(CLOCK_OFFSET_ENV).ok().and_then(|s| s.trim().parse::<i64>().ok()).unwrap_or(0);
        LocalClock { clock: Arc::new(SystemClock { offset: SignedDuration::from_secs(offset) }), tz }
    }

    /// Seconds since local midnight, now.
    pub fn second_of_day(&self) -> u32 {
        let z = self.clock.now().to_zoned(self.tz.clone());
        (z.hour() as u32) * 3600 + (z.minute() as u32) * 60 + z.second() as u32
    }
}

static HOST: LazyLock<Arc<Limiter>> =
    LazyLock::new(|| Arc::new(Limiter::new(BandwidthSpec::unlimited(), None, LocalClock::system())));

/// The host's limiter, shared by every sender of this agent (unlimited until
/// [`set_host_limit`]).
pub fn host() -> Arc<Limiter> {
    HOST.clone()
}

/// Sets the host's limit (`agent serve --bandwidth`, `agent.toml` `bandwidth`).
pub fn set_host_limit(spec: BandwidthSpec) {
    tracing::info!(%spec, "host bandwidth limit");
    HOST.set_spec(spec, None);
}

/// The flag parser of a spec (clap's `value_parser`).
pub fn parse_spec(s: &str) -> Result<BandwidthSpec, String> {
    s.parse().map_err(|e: siterecovery_proto::model::bandwidth::BandwidthError| e.to_string())
}

/// What `provider vm show` and the metrics show of one relationship's bandwidth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateView {
    /// The effective limit now (the smaller of the host's and the policy's), bytes/s;
    /// 0 = unlimited.
    pub limit_bytes_per_sec: u64,
    /// Bytes per second on the wire over the last measurement (≈ the last second or two).
    pub achieved_bytes_per_sec: u64,
}

/// The smaller of two limits, 0 being unlimited.
pub fn min_limit(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// The two limits one relationship's traffic passes: its policy's and the host's.
#[derive(Clone)]
pub struct Throttle {
    pub relationship: Arc<Limiter>,
    pub host: Arc<Limiter>,
}

impl Throttle {
    /// The policy's specs (bulk: `None` = the same as `spec`) under the host's limit.
    pub fn for_policy(spec: Option<BandwidthSpec>, bulk: Option<BandwidthSpec>) -> Self {
        let relationship = Arc::new(Limiter::new(spec.unwrap_or_default(), bulk, LocalClock::system()));
        Throttle { relationship, host: host() }
    }

    /// No limit of its own (the host's still applies).
    pub fn unlimited() -> Self {
        Self::for_policy(None, None)
    }

    /// Waits until `n` bytes of `class` may go on the wire under both limits.
    pub async fn acquire(&self, n: u64, class: Traffic) {
        self.relationship.acquire(n, class).await;
        self.host.acquire(n, class).await;
    }

    /// The effective limit now and the relationship's achieved rate.
    pub fn view(&self) -> RateView {
        RateView {
            limit_bytes_per_sec: min_limit(self.relationship.limit(), self.host.limit()),
            achieved_bytes_per_sec: self.relationship.achieved(),
        }
    }
}
