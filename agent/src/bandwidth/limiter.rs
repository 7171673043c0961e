//! The token bucket ([`Limiter`]): its rate follows the spec and the local time, its
//! meter measures what passed.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use siterecovery_proto::model::bandwidth::{BandwidthSpec, human_rate};

use super::LocalClock;

/// How often the rate is evaluated against the clock at the latest.
pub const REEVALUATE: Duration = Duration::from_secs(1);
/// The bucket holds this much of its rate (the burst bound, plus one message).
const BURST_SECS: f64 = 0.1;
/// The achieved rate is measured over windows of at least this long.
const METER: Duration = Duration::from_secs(1);

/// What kind of traffic a message is: the policy's resync limit applies to bulk
/// traffic when it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// Recovery points of the replicating phase.
    Delta,
    /// Initial copy, resync, dirty-block catch-up.
    Bulk,
}

/// A token bucket whose rate follows a [`BandwidthSpec`] (0 = unlimited).
pub struct Limiter {
    clock: LocalClock,
    state: Mutex<State>,
}

struct State {
    spec: BandwidthSpec,
    bulk: Option<BandwidthSpec>,
    class: Traffic,
    rate: u64,
    tokens: f64,
    refilled: Instant,
    evaluated: Option<Instant>,
    meter_start: Instant,
    meter_bytes: u64,
    achieved: u64,
}

fn cap(rate: u64) -> f64 {
    rate as f64 * BURST_SECS
}

impl Limiter {
    /// A limiter of `spec`, with `bulk` for [`Traffic::Bulk`] when set.
    pub fn new(spec: BandwidthSpec, bulk: Option<BandwidthSpec>, clock: LocalClock) -> Self {
        Self::new_at(spec, bulk, clock, Instant::now())
    }

    pub(super) fn new_at(spec: BandwidthSpec, bulk: Option<BandwidthSpec>, clock: LocalClock, now: Instant) -> Self {
        let state = State {
            spec,
            bulk,
            class: Traffic::Delta,
            rate: 0,
            tokens: 0.0,
            refilled: now,
            evaluated: None,
            meter_start: now,
            meter_bytes: 0,
            achieved: 0,
        };
        Limiter { clock, state: Mutex::new(state) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the specs (a changed policy or host limit); applies at the next message.
    pub fn set_spec(&self, spec: BandwidthSpec, bulk: Option<BandwidthSpec>) {
        let mut s = self.lock();
        s.spec = spec;
        s.bulk = bulk;
        s.evaluated = None;
    }

    /// The rate now for the traffic last sent (bytes/s, 0 = unlimited).
    pub fn limit(&self) -> u64 {
        self.limit_at(Instant::now())
    }

    pub(super) fn limit_at(&self, now: Instant) -> u64 {
        let mut s = self.lock();
        let class = s.class;
        s.refresh(&self.clock, class, now);
        s.rate
    }

    /// Bytes per second that passed over the last measurement window.
    pub fn achieved(&self) -> u64 {
        self.achieved_at(Instant::now())
    }

    pub(super) fn achieved_at(&self, now: Instant) -> u64 {
        let mut s = self.lock();
        s.meter(0, now, 2 * METER);
        s.achieved
    }

    /// Waits until `n` bytes of `class` may go on the wire, and counts them.
    pub async fn acquire(&self, n: u64, class: Traffic) {
        // Bounded: each round either returns or sleeps at most REEVALUATE, and the debt
        // it waits for shrinks at the rate (or the rate becomes unlimited).
        while let Some(wait) = self.take(n, class, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// The bytes are taken (`None`: send now), or how long to wait before asking again.
    pub(super) fn take(&self, n: u64, class: Traffic, now: Instant) -> Option<Duration> {
        let mut s = self.lock();
        s.refresh(&self.clock, class, now);
        s.refill(now);
        if s.rate == 0 || s.tokens >= 0.0 {
            if s.rate != 0 {
                s.tokens -= n as f64;
            }
            s.meter(n, now, METER);
            return None;
        }
        Some(Duration::from_secs_f64(-s.tokens / s.rate as f64).min(REEVALUATE))
    }
}

impl State {
    fn refresh(&mut self, clock: &LocalClock, class: Traffic, now: Instant) {
        let fresh = self.evaluated.is_some_and(|t| now.duration_since(t) < REEVALUATE);
        if fresh && class == self.class {
            return;
        }
        self.class = class;
        self.evaluated = Some(now);
        let spec = match class {
            Traffic::Bulk => self.bulk.as_ref().unwrap_or(&self.spec),
            Traffic::Delta => &self.spec,
        };
        let rate = spec.rate_at(clock.second_of_day());
        if rate != self.rate {
            tracing::debug!(from = %human_rate(self.rate), to = %human_rate(rate), "bandwidth limit changed");
            self.refill(now);
            self.tokens = if self.rate == 0 { cap(rate) } else { self.tokens.min(cap(rate)) };
            self.rate = rate;
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate as f64).min(cap(self.rate));
        self.refilled = now;
    }

    fn meter(&mut self, n: u64, now: Instant, window: Duration) {
        self.meter_bytes += n;
        let dt = now.duration_since(self.meter_start);
        if dt >= window {
            self.achieved = (self.meter_bytes as f64 / dt.as_secs_f64()) as u64;
            self.meter_bytes = 0;
            self.meter_start = now;
        }
    }
}
