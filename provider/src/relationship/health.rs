//! Replication health of a protected VM: Normal, Warning or Critical, with reasons.
//!
//! A pure function of the relationship's state, its latest status and its recent cycle
//! counters, evaluated over a window (as Hyper-V Replica does): the window is 60
//! intervals, at most an hour. Health is separate from the replication state: a VM can be
//! `replicating` and in Warning because its last point is too old.

use serde::{Deserialize, Serialize};

use super::state::ReplicationState;
use crate::policy::human_duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Health {
    Normal,
    Warning,
    Critical,
}

impl From<Health> for siterecovery_proto::v1::Health {
    fn from(h: Health) -> Self {
        match h {
            Health::Normal => Self::Normal,
            Health::Warning => Self::Warning,
            Health::Critical => Self::Critical,
        }
    }
}

impl TryFrom<i32> for Health {
    type Error = i32;
    fn try_from(v: i32) -> Result<Self, i32> {
        [Health::Normal, Health::Warning, Health::Critical]
            .into_iter()
            .find(|h| siterecovery_proto::v1::Health::from(*h) as i32 == v)
            .ok_or(v)
    }
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Normal => "Normal",
            Health::Warning => "Warning",
            Health::Critical => "Critical",
        }
    }
}

/// The agent's cycle counters at one moment (they count since the agent started).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CycleSample {
    pub unix_ms: i64,
    pub cycles: u64,
    pub missed: u64,
}

/// What health is computed from.
#[derive(Debug, Clone)]
pub struct HealthInput<'a> {
    pub state: ReplicationState,
    pub interval_ms: u64,
    /// 0 when no point was reported yet.
    pub last_point_unix_ms: i64,
    /// When the relationship last entered `replicating` (0 = never).
    pub replicating_since_unix_ms: i64,
    pub error: &'a str,
    pub error_recoverable: bool,
    /// The agent's reason for a resync, if any.
    pub detail: &'a str,
    /// Conditions the agent reports as warnings (a disk running on its dirty-block
    /// bitmap past the log budget).
    pub warnings: &'a [String],
    /// Oldest first.
    pub samples: &'a [CycleSample],
    pub primary_connected: bool,
    pub primary_host: &'a str,
}

/// The health window for a replication interval.
pub fn window_ms(interval_ms: u64) -> u64 {
    interval_ms.saturating_mul(60).clamp(1, 3_600_000)
}

/// A coarse duration for sentences: "45s", "2m", "3h", "2d".
pub fn coarse(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// Cycles attempted and missed within the window ending at `now`.
pub fn cycles_in_window(samples: &[CycleSample], window_ms: u64, now: i64) -> (u64, u64) {
    let Some(last) = samples.last() else { return (0, 0) };
    let start = now - window_ms as i64;
    // Baseline: the newest sample at or before the window's start, else the oldest.
    let base = samples.iter().rev().find(|s| s.unix_ms <= start).or(samples.first()).copied().unwrap_or(*last);
    // The counters restart with the agent: count from zero then.
    let base = if last.cycles < base.cycles || last.missed < base.missed {
        CycleSample { unix_ms: 0, cycles: 0, missed: 0 }
    } else {
        base
    };
    let cycles = last.cycles - base.cycles;
    let missed = (last.missed - base.missed).min(cycles);
    (cycles, missed)
}

/// Whether an error text is a full file system (ENOSPC / EDQUOT as the agents report it:
/// the OS error text, or the gRPC code the replica maps it to).
fn names_no_space(error: &str) -> bool {
    let e = error.to_ascii_lowercase();
    ["no space left", "disk quota exceeded", "resource exhausted", "resourceexhausted", "os error 28"]
        .iter()
        .any(|s| e.contains(s))
}

/// Fewer cycles than this in a window say nothing about the missed ratio.
const MIN_CYCLES: u64 = 5;

/// Health and its reasons (empty for Normal).
pub fn evaluate(h: &HealthInput<'_>, now: i64) -> (Health, Vec<String>) {
    use ReplicationState as S;
    let mut reasons = Vec::new();
    let mut health = Health::Normal;
    match h.state {
        S::NotEnabled | S::FailoverInProgress => return (Health::Normal, reasons),
        // The VM runs at the secondary site unprotected until reverse replication.
        S::FailedOver => {
            reasons.push("failed over, waiting for commit: the VM is not protected".into());
            return (Health::Warning, reasons);
        }
        S::Committed => {
            reasons.push("failed over and committed: not protected until `reprotect`".into());
            return (Health::Warning, reasons);
        }
        S::StoppedOnError => {
            health = Health::Critical;
            let e = if h.error.is_empty() { "an unrecoverable error" } else { h.error };
            reasons.push(format!("replication stopped: {e}"));
        }
        S::WaitingForInitial | S::InitialInProgress => reasons.push("initial replication is not finished".into()),
        S::Paused => reasons.push("replication is paused".into()),
        S::ResyncRequired => {
            let why = if h.detail.is_empty() { String::new() } else { format!(": {}", h.detail) };
            reasons.push(format!("resync required{why}"))
        }
        S::Resynchronising => reasons.push("resynchronisation in progress".into()),
        S::Replicating => {}
    }
    if h.state != S::StoppedOnError {
        reasons.extend(h.warnings.iter().cloned());
    }
    if h.state != S::StoppedOnError && !h.error.is_empty() && h.error_recoverable {
        if names_no_space(h.error) {
            // Retried, but no point can be made until an operator frees space.
            health = Health::Critical;
            reasons.push(format!("no space left on a host's disk (retrying until space is freed): {}", h.error));
        } else {
            reasons.push(format!("retrying after a recoverable error: {}", h.error));
        }
    }
    let rpo_states = matches!(h.state, S::Replicating | S::Resynchronising | S::ResyncRequired | S::Paused);
    if rpo_states && h.interval_ms > 0 {
        let since = if h.last_point_unix_ms > 0 { h.last_point_unix_ms } else { h.replicating_since_unix_ms };
        if since > 0 {
            let lag = (now - since).max(0) as u64;
            if lag > h.interval_ms.saturating_mul(3) {
                reasons.push(format!(
                    "no recovery point for {} (3× the {} interval)",
                    coarse(lag),
                    human_duration(std::time::Duration::from_millis(h.interval_ms))
                ));
            }
        }
    }
    let window = window_ms(h.interval_ms);
    let (cycles, missed) = cycles_in_window(h.samples, window, now);
    if cycles >= MIN_CYCLES && missed * 5 > cycles {
        reasons
            .push(format!("{missed} of {cycles} replication cycles missed in the last {} (over 20%)", coarse(window)));
    }
    if !h.primary_connected && h.state != S::StoppedOnError {
        reasons.push(format!("primary host {} is not connected", h.primary_host));
    }
    if health == Health::Normal && !reasons.is_empty() {
        health = Health::Warning;
    }
    (health, reasons)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 10_000_000;

    fn input(state: ReplicationState) -> HealthInput<'static> {
        HealthInput {
            state,
            interval_ms: 30_000,
            last_point_unix_ms: NOW - 10_000,
            replicating_since_unix_ms: NOW - 100_000,
            error: "",
            error_recoverable: false,
            detail: "",
            warnings: &[],
            samples: &[],
            primary_connected: true,
            primary_host: "hv1",
        }
    }

    #[test]
    fn replicating_recently_is_normal() {
        assert_eq!(evaluate(&input(ReplicationState::Replicating), NOW), (Health::Normal, vec![]));
        assert_eq!(evaluate(&input(ReplicationState::NotEnabled), NOW).0, Health::Normal);
    }

    #[test]
    fn agent_warnings_make_a_replicating_vm_warn() {
        let w = vec!["disk disk0 runs on its dirty-block bitmap".to_string()];
        let mut i = input(ReplicationState::Replicating);
        i.warnings = &w;
        assert_eq!(evaluate(&i, NOW), (Health::Warning, w.clone()));
    }

    #[test]
    fn failed_over_vms_are_not_protected() {
        let (h, r) = evaluate(&input(ReplicationState::FailedOver), NOW);
        assert_eq!(h, Health::Warning);
        assert!(r[0].contains("not protected"), "{r:?}");
        assert_eq!(evaluate(&input(ReplicationState::Committed), NOW).0, Health::Warning);
    }

    #[test]
    fn rpo_lag_over_three_intervals_warns() {
        let mut i = input(ReplicationState::Replicating);
        i.last_point_unix_ms = NOW - 120_000;
        let (h, r) = evaluate(&i, NOW);
        assert_eq!(h, Health::Warning);
        assert_eq!(r, vec!["no recovery point for 2m (3× the 30s interval)".to_string()]);
        i.last_point_unix_ms = NOW - 90_000;
        assert_eq!(evaluate(&i, NOW).0, Health::Normal, "exactly 3× is still fine");
        // No point yet: counted from the start of replication.
        i.last_point_unix_ms = 0;
        i.replicating_since_unix_ms = NOW - 200_000;
        assert_eq!(evaluate(&i, NOW).0, Health::Warning);
    }

    #[test]
    fn missed_cycles_over_a_fifth_warn() {
        let mut i = input(ReplicationState::Replicating);
        let samples = [
            CycleSample { unix_ms: NOW - 4_000_000, cycles: 0, missed: 0 },
            CycleSample { unix_ms: NOW - 1_000_000, cycles: 100, missed: 1 },
            CycleSample { unix_ms: NOW, cycles: 110, missed: 4 },
        ];
        i.samples = &samples;
        // Window 30 min: the baseline is the newest sample before its start (NOW-4000 s).
        let (h, r) = evaluate(&i, NOW);
        assert_eq!(h, Health::Normal, "{r:?}");
        let samples = [
            CycleSample { unix_ms: NOW - 2_000_000, cycles: 100, missed: 1 },
            CycleSample { unix_ms: NOW, cycles: 110, missed: 4 },
        ];
        i.samples = &samples;
        let (h, r) = evaluate(&i, NOW);
        assert_eq!(h, Health::Warning);
        assert!(r[0].starts_with("3 of 10 replication cycles missed"), "{r:?}");
        // Agent restarted: counters went down; counted from zero.
        let samples = [
            CycleSample { unix_ms: NOW - 2_000_000, cycles: 100, missed: 1 },
            CycleSample { unix_ms: NOW, cycles: 10, missed: 1 },
        ];
        i.samples = &samples;
        assert_eq!(evaluate(&i, NOW).0, Health::Normal);
    }

    #[test]
    fn paused_initial_and_resync_warn() {
        for (s, want) in [
            (ReplicationState::Paused, "replication is paused"),
            (ReplicationState::WaitingForInitial, "initial replication is not finished"),
            (ReplicationState::InitialInProgress, "initial replication is not finished"),
            (ReplicationState::Resynchronising, "resynchronisation in progress"),
        ] {
            let (h, r) = evaluate(&input(s), NOW);
            assert_eq!(h, Health::Warning, "{s:?}");
            assert_eq!(r[0], want);
        }
        let mut i = input(ReplicationState::ResyncRequired);
        i.detail = "pending logs exceed 50% of the disk";
        let (h, r) = evaluate(&i, NOW);
        assert_eq!(h, Health::Warning);
        assert_eq!(r[0], "resync required: pending logs exceed 50% of the disk");
    }

    #[test]
    fn recoverable_error_warns_and_unrecoverable_is_critical() {
        let mut i = input(ReplicationState::Replicating);
        i.error = "connection refused";
        i.error_recoverable = true;
        let (h, r) = evaluate(&i, NOW);
        assert_eq!(h, Health::Warning);
        assert_eq!(r, vec!["retrying after a recoverable error: connection refused".to_string()]);
        i.error = "replica store: write spool: No space left on device (os error 28)";
        let (health, r) = evaluate(&i, NOW);
        assert_eq!(health, Health::Critical, "{r:?}");
        assert!(r[0].starts_with("no space left on a host's disk"), "{r:?}");
        for e in ["authorisation failure", "broken log chain", "VM not found", "invalid replica state"] {
            let mut i = input(ReplicationState::StoppedOnError);
            i.error = e;
            let (h, r) = evaluate(&i, NOW);
            assert_eq!(h, Health::Critical);
            assert_eq!(r[0], format!("replication stopped: {e}"));
        }
    }

    #[test]
    fn disconnected_primary_warns() {
        let mut i = input(ReplicationState::Replicating);
        i.primary_connected = false;
        let (h, r) = evaluate(&i, NOW);
        assert_eq!(h, Health::Warning);
        assert_eq!(r, vec!["primary host hv1 is not connected".to_string()]);
    }
}
