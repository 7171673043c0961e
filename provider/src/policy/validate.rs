//! The operator's policy and pairing requests, converted from the wire with `TryFrom`
//! (names, the initial method) and checked by pure functions the tests call directly.

use std::time::Duration;

use siterecovery_proto::model::bandwidth::{BandwidthError, BandwidthSpec};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, PolicyName};
use siterecovery_proto::v1;

use super::records::{CloudInfo, InitialMethod, PairingRecord, PolicyRecord};
use super::{INTERVALS, MAX_RETENTION, MIN_RETENTION, PairingError, PolicyError};

fn dur(ms: u64) -> String {
    human_duration(Duration::from_millis(ms))
}

/// "30s", "5m", "1h30m", "2d": the CLI's own duration syntax.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, h, m, sec) = (s / 86400, (s % 86400) / 3600, (s % 3600) / 60, s % 60);
    let mut out = String::new();
    for (n, u) in [(days, "d"), (h, "h"), (m, "m"), (sec, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{u}"));
        }
    }
    out
}

/// A policy as the operator asked for it: the wire message with its name and initial
/// method converted (the rest is checked by [`validate_policy`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRequest {
    pub name: PolicyName,
    pub interval_ms: u64,
    pub retention_ms: u64,
    pub app_consistent_every_ms: u64,
    pub compression: bool,
    pub initial_method: InitialMethod,
    pub port: u32,
    pub resync_window_start_hour: u32,
    pub resync_window_end_hour: u32,
    pub bandwidth: Option<BandwidthSpec>,
    pub resync_bandwidth: Option<BandwidthSpec>,
}

/// An optional bandwidth spec from the wire: empty = unset.
fn spec_field(name: &'static str, s: &str) -> Result<Option<BandwidthSpec>, WireError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e: BandwidthError| WireError::rule(name, e.to_string()))
}

impl TryFrom<&v1::Policy> for PolicyRequest {
    type Error = WireError;
    fn try_from(p: &v1::Policy) -> Result<Self, WireError> {
        Ok(Self {
            name: wire::field("policy.name", &p.name)?,
            interval_ms: p.interval_ms,
            retention_ms: p.retention_ms,
            app_consistent_every_ms: p.app_consistent_every_ms,
            compression: p.compression,
            initial_method: InitialMethod::from_wire(p.initial_method, p.initial_at_unix_ms)
                .map_err(|e| WireError::rule("policy.initial_method", e.to_string()))?,
            port: p.port,
            resync_window_start_hour: p.resync_window_start_hour,
            resync_window_end_hour: p.resync_window_end_hour,
            bandwidth: spec_field("policy.bandwidth", &p.bandwidth)?,
            resync_bandwidth: spec_field("policy.resync_bandwidth", &p.resync_bandwidth)?,
        })
    }
}

/// Validates a requested policy. `test_intervals` (the hidden `serve --test-intervals`)
/// allows any interval from 1 s and any retention not shorter than the interval, so the
/// end-to-end tests can run cycles of a second or two.
pub fn validate_policy(p: &PolicyRequest, test_intervals: bool) -> Result<PolicyRecord, PolicyError> {
    let interval = Duration::from_millis(p.interval_ms);
    if interval < Duration::from_secs(1) {
        return Err(if test_intervals {
            PolicyError::IntervalTooShort
        } else {
            PolicyError::Interval(dur(p.interval_ms))
        });
    }
    if !test_intervals && !INTERVALS.contains(&interval) {
        return Err(PolicyError::Interval(dur(p.interval_ms)));
    }
    let retention = Duration::from_millis(p.retention_ms);
    if test_intervals {
        if retention < interval {
            return Err(PolicyError::RetentionBelowInterval {
                retention: dur(p.retention_ms),
                interval: dur(p.interval_ms),
            });
        }
    } else if !(MIN_RETENTION..=MAX_RETENTION).contains(&retention) {
        return Err(PolicyError::Retention(dur(p.retention_ms)));
    }
    if p.app_consistent_every_ms != 0 && p.app_consistent_every_ms < p.interval_ms {
        return Err(PolicyError::AppConsistent { every: dur(p.app_consistent_every_ms), interval: dur(p.interval_ms) });
    }
    if p.resync_window_start_hour > 23 || p.resync_window_end_hour > 23 {
        return Err(PolicyError::Window(p.resync_window_start_hour, p.resync_window_end_hour));
    }
    if p.port > 65535 {
        return Err(PolicyError::Port(p.port));
    }
    Ok(PolicyRecord {
        name: p.name.clone(),
        interval_ms: p.interval_ms,
        retention_ms: p.retention_ms,
        app_consistent_every_ms: p.app_consistent_every_ms,
        compression: p.compression,
        initial_method: p.initial_method,
        port: p.port,
        resync_window_start_hour: p.resync_window_start_hour,
        resync_window_end_hour: p.resync_window_end_hour,
        bandwidth: p.bandwidth.clone(),
        resync_bandwidth: p.resync_bandwidth.clone(),
    })
}

/// Refuses to delete a policy that a pairing uses.
pub fn check_policy_delete(name: &PolicyName, pairings: &[PairingRecord]) -> Result<(), PolicyError> {
    match pairings.iter().find(|p| &p.policy == name) {
        Some(p) => Err(PolicyError::InUse { name: name.to_string(), source_cloud: p.source_cloud.to_string() }),
        None => Ok(()),
    }
}

/// A pairing as the operator asked for it, names converted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairingRequest {
    pub source_cloud: CloudName,
    pub target_cloud: CloudName,
    pub policy: PolicyName,
}

impl TryFrom<&v1::CloudPairing> for PairingRequest {
    type Error = WireError;
    fn try_from(p: &v1::CloudPairing) -> Result<Self, WireError> {
        Ok(Self {
            source_cloud: wire::field("pairing.source_cloud", &p.source_cloud)?,
            target_cloud: wire::field("pairing.target_cloud", &p.target_cloud)?,
            policy: wire::field("pairing.policy", &p.policy)?,
        })
    }
}

/// Validates a pairing request. `protected_of_source` is how many VMs of the source
/// cloud are protected now: re-pairing replaces the existing pairing only when none is.
pub fn validate_pairing(
    req: &PairingRequest,
    clouds: &[CloudInfo],
    policies: &[PolicyRecord],
    pairings: &[PairingRecord],
    protected_of_source: usize,
) -> Result<PairingRecord, PairingError> {
    let find =
        |n: &CloudName| clouds.iter().find(|c| &c.name == n).ok_or_else(|| PairingError::UnknownCloud(n.to_string()));
    let source = find(&req.source_cloud)?;
    let target = find(&req.target_cloud)?;
    if source.name == target.name {
        return Err(PairingError::SameCloud(source.name.to_string()));
    }
    if source.site == target.site {
        return Err(PairingError::SameSite {
            source_cloud: source.name.to_string(),
            target_cloud: target.name.to_string(),
            site: source.site.to_string(),
        });
    }
    if !policies.iter().any(|p| p.name == req.policy) {
        return Err(PairingError::UnknownPolicy(req.policy.to_string()));
    }
    if let Some(existing) = pairings.iter().find(|p| p.source_cloud == source.name)
        && protected_of_source > 0
    {
        return Err(PairingError::AlreadyPaired {
            source_cloud: source.name.to_string(),
            target_cloud: existing.target_cloud.to_string(),
            protected: protected_of_source,
        });
    }
    Ok(PairingRecord {
        source_cloud: source.name.clone(),
        target_cloud: target.name.clone(),
        policy: req.policy.clone(),
    })
}

/// The settings sent to both hosts of a relationship.
pub fn replication_settings(p: &PolicyRecord, test_intervals: bool) -> v1::ReplicationSettings {
    v1::ReplicationSettings {
        interval_ms: p.interval_ms,
        retention_ms: p.retention_ms,
        app_consistent_every_ms: p.app_consistent_every_ms,
        compression: p.compression,
        retry_unit_ms: if test_intervals { 1000 } else { 60_000 },
        resync_window_start_hour: p.resync_window_start_hour,
        resync_window_end_hour: p.resync_window_end_hour,
        bandwidth: super::records::spec_text(&p.bandwidth),
        resync_bandwidth: super::records::spec_text(&p.resync_bandwidth),
    }
}
