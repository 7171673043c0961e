//! Replication policies and cloud pairings: what an operator decides before protecting
//! a VM.
//!
//! A policy says how often a VM replicates (interval), how long its recovery points are
//! kept (retention), how often an app-consistent point is made, compression, the initial
//! replication method and the automatic-resync window. A cloud pairing says that the VMs
//! of a source cloud replicate to the hosts of a target cloud at another site, under a
//! policy. Both are validated here by pure functions (tests call them directly); the
//! Protection service ([`crate::protection`]) stores them.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, PolicyName, SiteName};
use siterecovery_proto::v1;

/// Intervals a production provider accepts (as the seed's Hyper-V Replica does).
pub const INTERVALS: [Duration; 3] = [Duration::from_secs(30), Duration::from_secs(300), Duration::from_secs(900)];
const MIN_RETENTION: Duration = Duration::from_secs(3600);
const MAX_RETENTION: Duration = Duration::from_secs(30 * 86400);

/// Why a policy or pairing was refused. Each maps to one `tonic::Status` code in
/// [`crate::protection`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The request does not convert into domain types (a name, the initial method).
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("interval {0} is not allowed: use 30s, 5m or 15m")]
    Interval(String),
    #[error("interval must be at least 1s")]
    IntervalTooShort,
    #[error("retention {0} is out of range: use 1h to 30d")]
    Retention(String),
    #[error("retention {retention} is shorter than the interval {interval}")]
    RetentionBelowInterval { retention: String, interval: String },
    #[error("app-consistent snapshot frequency {every} is shorter than the interval {interval} (use 0 for never)")]
    AppConsistent { every: String, interval: String },
    #[error(
        "initial replication method {0:?}: use network, offline or at=TIME (RFC 3339, e.g. at=2025-01-31T22:00:00Z)"
    )]
    Initial(String),
    #[error("resync window hours must be 0-23, got {0}-{1}")]
    Window(u32, u32),
    #[error("port {0} is out of range (1-65535, or 0 for the host's replication port)")]
    Port(u32),
    #[error("no policy {0:?} (see `policy list`)")]
    UnknownPolicy(String),
    #[error("policy {name:?} is used by the pairing of cloud {source_cloud:?}; unpair it first")]
    InUse { name: String, source_cloud: String },
    #[error("policy {0:?} already exists")]
    Exists(String),
}

/// Why a cloud pairing was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    /// The request does not convert into domain types (a cloud or policy name).
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("no cloud {0:?} (clouds come from registered hosts; see `cloud list`)")]
    UnknownCloud(String),
    #[error("cannot pair cloud {0:?} with itself")]
    SameCloud(String),
    #[error(
        "clouds {source_cloud:?} and {target_cloud:?} are both at site {site:?}; the target must be at another site"
    )]
    SameSite { source_cloud: String, target_cloud: String, site: String },
    #[error("no policy {0:?} (see `policy list`)")]
    UnknownPolicy(String),
    #[error(
        "cloud {source_cloud:?} is already paired with {target_cloud:?} and {protected} of its VMs are protected; unprotect them first"
    )]
    AlreadyPaired { source_cloud: String, target_cloud: String, protected: usize },
}

/// A policy, as stored (table `policies`, by name). Durations in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyRecord {
    pub name: PolicyName,
    pub interval_ms: u64,
    pub retention_ms: u64,
    /// 0 = never.
    pub app_consistent_every_ms: u64,
    pub compression: bool,
    pub initial_method: InitialMethod,
    /// 0 = the replica host's own address.
    pub port: u32,
    pub resync_window_start_hour: u32,
    pub resync_window_end_hour: u32,
}

/// How the first full copy of a VM reaches its replica host.
///
/// Stored as the words of the records before this type (`network`, `offline`,
/// `at=<RFC 3339>`), so existing stores read unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum InitialMethod {
    /// Over the network, as soon as protection is enabled.
    Network,
    /// Exported to a directory on the primary host, imported on the replica host.
    Offline,
    /// Over the network, from a given time (unix milliseconds, positive).
    At { unix_ms: i64 },
}

impl InitialMethod {
    /// The wire's method and time; unspecified is the default, network.
    pub fn from_wire(method: i32, at_unix_ms: i64) -> Result<Self, PolicyError> {
        match v1::InitialMethod::try_from(method) {
            Ok(v1::InitialMethod::Unspecified | v1::InitialMethod::Network) => Ok(Self::Network),
            Ok(v1::InitialMethod::Offline) => Ok(Self::Offline),
            Ok(v1::InitialMethod::At) => {
                if at_unix_ms <= 0 || rfc3339(at_unix_ms).is_none() {
                    return Err(PolicyError::Initial(format!("at {at_unix_ms} ms")));
                }
                Ok(Self::At { unix_ms: at_unix_ms })
            }
            Err(_) => Err(PolicyError::Initial(format!("method {method}"))),
        }
    }

    pub fn to_wire(self) -> (v1::InitialMethod, i64) {
        match self {
            Self::Network => (v1::InitialMethod::Network, 0),
            Self::Offline => (v1::InitialMethod::Offline, 0),
            Self::At { unix_ms } => (v1::InitialMethod::At, unix_ms),
        }
    }
}

/// `t` (unix ms) in RFC 3339, UTC.
fn rfc3339(unix_ms: i64) -> Option<String> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(unix_ms) * 1_000_000)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}

impl std::fmt::Display for InitialMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Network => f.write_str("network"),
            Self::Offline => f.write_str("offline"),
            Self::At { unix_ms } => match rfc3339(*unix_ms) {
                Some(t) => write!(f, "at={t}"),
                None => write!(f, "at={unix_ms}ms"),
            },
        }
    }
}

impl std::str::FromStr for InitialMethod {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "network" => Ok(Self::Network),
            "offline" => Ok(Self::Offline),
            _ => s
                .strip_prefix("at=")
                .and_then(parse_rfc3339_ms)
                .filter(|&t| t > 0)
                .map(|unix_ms| Self::At { unix_ms })
                .ok_or_else(|| PolicyError::Initial(s.to_owned())),
        }
    }
}

impl TryFrom<String> for InitialMethod {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        s.parse()
    }
}

impl From<InitialMethod> for String {
    fn from(m: InitialMethod) -> String {
        m.to_string()
    }
}

/// A pairing, as stored (table `pairings`, by source cloud: a cloud has at most one target).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairingRecord {
    pub source_cloud: CloudName,
    pub target_cloud: CloudName,
    pub policy: PolicyName,
}

/// A cloud as known from registered hosts, for pairing checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInfo {
    pub name: CloudName,
    pub site: SiteName,
}

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
    }
}

impl PolicyRecord {
    pub fn to_proto(&self) -> v1::Policy {
        let (method, at) = self.initial_method.to_wire();
        v1::Policy {
            name: self.name.to_string(),
            interval_ms: self.interval_ms,
            retention_ms: self.retention_ms,
            app_consistent_every_ms: self.app_consistent_every_ms,
            compression: self.compression,
            initial_method: method.into(),
            initial_at_unix_ms: at,
            port: self.port,
            resync_window_start_hour: self.resync_window_start_hour,
            resync_window_end_hour: self.resync_window_end_hour,
        }
    }

    /// For `initial_method = at=TIME`: when initial replication may start (unix ms).
    pub fn initial_at_unix_ms(&self) -> Option<i64> {
        match self.initial_method {
            InitialMethod::At { unix_ms } => Some(unix_ms),
            _ => None,
        }
    }
}

impl PairingRecord {
    pub fn to_proto(&self) -> v1::CloudPairing {
        v1::CloudPairing {
            source_cloud: self.source_cloud.to_string(),
            target_cloud: self.target_cloud.to_string(),
            policy: self.policy.to_string(),
        }
    }
}

/// Parses an RFC 3339 time (`2025-01-31T22:00:00Z`, `…+01:00`, fractions allowed)
/// into unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The service's path: conversion, then validation.
    fn validate(p: &v1::Policy, test_intervals: bool) -> Result<PolicyRecord, PolicyError> {
        validate_policy(&PolicyRequest::try_from(p)?, test_intervals)
    }

    fn name<T: std::str::FromStr>(s: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        s.parse().expect("test name")
    }

    fn policy(interval_s: u64, retention_s: u64) -> v1::Policy {
        v1::Policy {
            name: "gold".into(),
            interval_ms: interval_s * 1000,
            retention_ms: retention_s * 1000,
            initial_method: v1::InitialMethod::Network.into(),
            ..Default::default()
        }
    }

    #[test]
    fn production_intervals_only() {
        for s in [30, 300, 900] {
            assert!(validate(&policy(s, 86400), false).is_ok(), "{s}s");
        }
        assert_eq!(validate(&policy(60, 86400), false), Err(PolicyError::Interval("1m".into())));
        assert_eq!(validate(&policy(1, 86400), false), Err(PolicyError::Interval("1s".into())));
        let mut p = policy(30, 86400);
        p.interval_ms = 0;
        assert_eq!(validate(&p, false), Err(PolicyError::Interval("0ms".into())));
    }

    #[test]
    fn test_intervals_allow_short_cycles() {
        let r = validate(&policy(1, 10), true).expect("1s with test intervals");
        assert_eq!(r.interval_ms, 1000);
        assert!(validate(&policy(2, 2), true).is_ok());
        assert!(matches!(validate(&policy(5, 2), true), Err(PolicyError::RetentionBelowInterval { .. })));
        let mut p = policy(1, 10);
        p.interval_ms = 500;
        assert_eq!(validate(&p, true), Err(PolicyError::IntervalTooShort));
    }

    #[test]
    fn retention_range() {
        assert!(validate(&policy(30, 3600), false).is_ok());
        assert!(validate(&policy(30, 30 * 86400), false).is_ok());
        assert_eq!(validate(&policy(30, 3599), false), Err(PolicyError::Retention("59m59s".into())));
        assert_eq!(validate(&policy(30, 31 * 86400), false), Err(PolicyError::Retention("31d".into())));
    }

    #[test]
    fn app_consistent_frequency() {
        let mut p = policy(300, 86400);
        p.app_consistent_every_ms = 0;
        assert!(validate(&p, false).is_ok());
        p.app_consistent_every_ms = 300_000;
        assert!(validate(&p, false).is_ok());
        p.app_consistent_every_ms = 60_000;
        assert!(matches!(validate(&p, false), Err(PolicyError::AppConsistent { .. })));
    }

    #[test]
    fn initial_method_window_port_name() {
        let mut p = policy(30, 86400);
        p.initial_method = 0;
        assert_eq!(validate(&p, false).expect("default").initial_method, InitialMethod::Network);
        p.initial_method = v1::InitialMethod::Offline.into();
        assert!(validate(&p, false).is_ok());
        p.initial_method = v1::InitialMethod::At.into();
        p.initial_at_unix_ms = parse_rfc3339_ms("2025-01-31T22:00:00Z").expect("time");
        let rec = validate(&p, false).expect("at");
        assert_eq!(rec.initial_method.to_string(), "at=2025-01-31T22:00:00Z");
        assert_eq!(rec.initial_at_unix_ms(), Some(p.initial_at_unix_ms));
        assert_eq!(rec.to_proto().initial_method, i32::from(v1::InitialMethod::At));
        p.initial_at_unix_ms = 0;
        assert!(matches!(validate(&p, false), Err(PolicyError::Request(e)) if e.field() == "policy.initial_method"));
        p.initial_method = 42;
        assert!(matches!(validate(&p, false), Err(PolicyError::Request(e)) if e.field() == "policy.initial_method"));
        let mut p = policy(30, 86400);
        p.resync_window_start_hour = 18;
        p.resync_window_end_hour = 24;
        assert_eq!(validate(&p, false), Err(PolicyError::Window(18, 24)));
        let mut p = policy(30, 86400);
        p.port = 70000;
        assert_eq!(validate(&p, false), Err(PolicyError::Port(70000)));
        let mut p = policy(30, 86400);
        p.name = "no spaces".into();
        assert!(matches!(validate(&p, false), Err(PolicyError::Request(e)) if e.field() == "policy.name"));
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("2000-03-01T00:00:00Z"), Some(951_868_800_000));
        assert_eq!(parse_rfc3339_ms("2000-03-01T01:00:00+01:00"), Some(951_868_800_000));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(parse_rfc3339_ms("1970-01-01 00:00:00"), None);
        assert_eq!(parse_rfc3339_ms("1970-13-01T00:00:00Z"), None);
    }

    #[test]
    fn policy_in_use_cannot_be_deleted() {
        let pairings = vec![PairingRecord { source_cloud: name("a"), target_cloud: name("b"), policy: name("gold") }];
        assert!(matches!(check_policy_delete(&name("gold"), &pairings), Err(PolicyError::InUse { .. })));
        assert!(check_policy_delete(&name("silver"), &pairings).is_ok());
    }

    fn clouds() -> Vec<CloudInfo> {
        vec![
            CloudInfo { name: name("gold-a"), site: name("primary") },
            CloudInfo { name: name("gold-b"), site: name("secondary") },
            CloudInfo { name: name("silver-a"), site: name("primary") },
        ]
    }

    fn policies() -> Vec<PolicyRecord> {
        vec![validate(&policy(30, 86400), false).expect("policy")]
    }

    fn pair(s: &str, t: &str, p: &str) -> PairingRequest {
        PairingRequest::try_from(&v1::CloudPairing { source_cloud: s.into(), target_cloud: t.into(), policy: p.into() })
            .expect("pairing request")
    }

    #[test]
    fn pairing_validation() {
        let ok = validate_pairing(&pair("gold-a", "gold-b", "gold"), &clouds(), &policies(), &[], 0).expect("ok");
        assert_eq!(ok.target_cloud, "gold-b");
        assert_eq!(
            validate_pairing(&pair("nope", "gold-b", "gold"), &clouds(), &policies(), &[], 0),
            Err(PairingError::UnknownCloud("nope".into()))
        );
        assert_eq!(
            validate_pairing(&pair("gold-a", "nope", "gold"), &clouds(), &policies(), &[], 0),
            Err(PairingError::UnknownCloud("nope".into()))
        );
        assert_eq!(
            validate_pairing(&pair("gold-a", "gold-a", "gold"), &clouds(), &policies(), &[], 0),
            Err(PairingError::SameCloud("gold-a".into()))
        );
        assert!(matches!(
            validate_pairing(&pair("gold-a", "silver-a", "gold"), &clouds(), &policies(), &[], 0),
            Err(PairingError::SameSite { .. })
        ));
        assert_eq!(
            validate_pairing(&pair("gold-a", "gold-b", "bronze"), &clouds(), &policies(), &[], 0),
            Err(PairingError::UnknownPolicy("bronze".into()))
        );
    }

    #[test]
    fn repairing_only_without_protected_vms() {
        let existing =
            vec![PairingRecord { source_cloud: name("gold-a"), target_cloud: name("gold-b"), policy: name("gold") }];
        assert!(validate_pairing(&pair("gold-a", "gold-b", "gold"), &clouds(), &policies(), &existing, 0).is_ok());
        assert!(matches!(
            validate_pairing(&pair("gold-a", "gold-b", "gold"), &clouds(), &policies(), &existing, 2),
            Err(PairingError::AlreadyPaired { protected: 2, .. })
        ));
    }

    #[test]
    fn settings_follow_the_policy() {
        let p = validate(&policy(30, 86400), false).expect("policy");
        assert_eq!(replication_settings(&p, false).retry_unit_ms, 60_000);
        assert_eq!(replication_settings(&p, true).retry_unit_ms, 1000);
        assert_eq!(replication_settings(&p, true).interval_ms, 30_000);
        assert_eq!(human_duration(Duration::from_secs(5400)), "1h30m");
    }
}
