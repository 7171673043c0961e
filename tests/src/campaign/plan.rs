//! A scenario drawn from a seed: which fault, where, when, and which failover.

use siterecovery_agent::faults;

/// splitmix64: a small deterministic generator (one seed, one scenario).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.range(0, items.len() as u64) as usize]
    }

    /// True with probability `percent` %.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }
}

/// Which agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// hv-a, the primary.
    A,
    /// hv-b, the replica.
    B,
}

impl Host {
    pub fn name(self) -> &'static str {
        match self {
            Host::A => "hv-a",
            Host::B => "hv-b",
        }
    }
}

/// A network fault on the primary → replica peer link, held for a while, then healed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetFault {
    Cut,
    Stall,
    /// Bytes per second.
    Throttle(u64),
    Reset,
}

/// Which link a network fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The primary's sender to the replica's peer port.
    Peer,
    /// Both agents to the provider (the operator CLI connects directly).
    Provider,
}

/// The one fault of a scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Restart `host` with `name` armed to crash once (`NAME=1*return(crash)`); a
    /// failpoint that does not fire within the window is recorded as not hit and the
    /// agent is then killed with SIGKILL instead.
    Failpoint { host: Host, name: &'static str },
    /// Restart `host` with `name` armed to fail its step once with an I/O error
    /// (`NAME=1*return(ERRNO)`, `eio` or `enospc`); the agent keeps running. Drawn for
    /// [`IO_ERROR_FAILPOINTS`]: the step's caller must turn the error into a failed
    /// request (a failed image write is an error to the writer, never an acknowledged
    /// write), which the writer retries.
    IoError { host: Host, name: &'static str, errno: &'static str },
    /// `kill -9` of an agent after `after_ms` of writes.
    Kill { host: Host, after_ms: u64 },
    /// `kill -9` of the provider after `after_ms`.
    KillProvider { after_ms: u64 },
    /// A network fault on `link` for `hold_ms`, after `after_ms`.
    Net { link: Link, fault: NetFault, after_ms: u64, hold_ms: u64 },
}

/// The failover a scenario ends with, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failover {
    None,
    /// A test failover from a random retained point.
    Test,
    Planned,
    /// The primary killed, then an unplanned failover from a random retained point.
    Unplanned,
}

/// Failpoints that fire in steady replication or the initial copy (the failover-commit
/// and reprotect ones need a failover step the scenario would have to drive into).
pub fn steady_failpoints() -> Vec<&'static str> {
    let skip = ["commit.", "change_point.", "reprotect."];
    faults::ALL.iter().copied().filter(|n| !skip.iter().any(|s| n.starts_with(s))).collect()
}

/// Failpoints of the steps after an unplanned failover, on the replica host:
/// `failover change-point` and `failover commit`.
pub fn failover_failpoints() -> Vec<&'static str> {
    faults::ALL.iter().copied().filter(|n| n.starts_with("commit.") || n.starts_with("change_point.")).collect()
}

/// Failpoints whose injected I/O error a scenario may draw instead of a crash: the
/// guest's image write on the primary (the tracker takes its log record back out).
pub const IO_ERROR_FAILPOINTS: &[&str] = &[faults::TRACKER_IMAGE_WRITE];

/// Which host a failpoint runs on: the sender's and the change log's (and the tracker's,
/// where guest writes land) on the primary.
pub fn failpoint_host(name: &str) -> Host {
    let primary = ["hrl.", "tracker.", "sender.", "initial."];
    if primary.iter().any(|p| name.starts_with(p)) { Host::A } else { Host::B }
}

/// A whole scenario.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub fault: Fault,
    pub failover: Failover,
    /// Writes per qemu-io run, and the pause between runs.
    pub per_call: u64,
    pub pace_ms: u64,
    /// After an unplanned failover: `change-point` (a `change_point.*` failpoint) or
    /// `commit` (any other) on hv-b armed to crash at this failpoint, then the
    /// operation again after the restart.
    pub after_failover: Option<&'static str>,
}

impl Plan {
    pub fn from_seed(seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let fault = match r.range(0, 10) {
            0..=3 => {
                let fps = steady_failpoints();
                let name = *r.pick(&fps);
                let host = failpoint_host(name);
                if IO_ERROR_FAILPOINTS.contains(&name) && r.chance(50) {
                    let errno = if r.chance(50) { "eio" } else { "enospc" };
                    Fault::IoError { host, name, errno }
                } else {
                    Fault::Failpoint { host, name }
                }
            }
            4..=5 => Fault::Kill { host: *r.pick(&[Host::A, Host::B]), after_ms: r.range(200, 3000) },
            6 => Fault::KillProvider { after_ms: r.range(200, 3000) },
            _ => {
                let fault = match r.range(0, 4) {
                    0 => NetFault::Cut,
                    1 => NetFault::Stall,
                    2 => NetFault::Throttle(r.range(32 << 10, 512 << 10)),
                    _ => NetFault::Reset,
                };
                let link = if r.chance(30) { Link::Provider } else { Link::Peer };
                Fault::Net { link, fault, after_ms: r.range(200, 2000), hold_ms: r.range(3000, 6000) }
            }
        };
        let failover = match r.range(0, 10) {
            0..=3 => Failover::None,
            4..=5 => Failover::Test,
            6..=7 => Failover::Planned,
            _ => Failover::Unplanned,
        };
        let (mut per_call, pace_ms) = (r.range(2, 8), r.range(30, 120));
        if matches!(fault, Fault::IoError { .. }) {
            // One write a run: qemu-io goes on past a failed write (see `stream`).
            per_call = 1;
        }
        let fps = failover_failpoints();
        let after_failover = (failover == Failover::Unplanned && !fps.is_empty()).then(|| *r.pick(&fps));
        Self { seed, fault, failover, per_call, pace_ms, after_failover }
    }
}
