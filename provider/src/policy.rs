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
use siterecovery_certs::identity::is_token;
use siterecovery_proto::v1;

/// Intervals a production provider accepts (as the seed's Hyper-V Replica does).
pub const INTERVALS: [Duration; 3] = [Duration::from_secs(30), Duration::from_secs(300), Duration::from_secs(900)];
const MIN_RETENTION: Duration = Duration::from_secs(3600);
const MAX_RETENTION: Duration = Duration::from_secs(30 * 86400);

/// Why a policy or pairing was refused. Each maps to one `tonic::Status` code in
/// [`crate::protection`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid policy name {0:?}: use 1-64 of A-Z a-z 0-9 . _ -")]
    Name(String),
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
    pub name: String,
    pub interval_ms: u64,
    pub retention_ms: u64,
    /// 0 = never.
    pub app_consistent_every_ms: u64,
    pub compression: bool,
    /// `network`, `offline` or `at=<RFC 3339>`.
    pub initial_method: String,
    /// 0 = the replica host's own address.
    pub port: u32,
    pub resync_window_start_hour: u32,
    pub resync_window_end_hour: u32,
}

/// A pairing, as stored (table `pairings`, by source cloud: a cloud has at most one target).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PairingRecord {
    pub source_cloud: String,
    pub target_cloud: String,
    pub policy: String,
}

/// A cloud as known from registered hosts, for pairing checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudInfo {
    pub name: String,
    pub site: String,
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

/// Validates a requested policy. `test_intervals` (the hidden `serve --test-intervals`)
/// allows any interval from 1 s and any retention not shorter than the interval, so the
/// end-to-end tests can run cycles of a second or two.
pub fn validate_policy(p: &v1::Policy, test_intervals: bool) -> Result<PolicyRecord, PolicyError> {
    if !is_token(&p.name) {
        return Err(PolicyError::Name(p.name.clone()));
    }
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
    let initial = initial_from_wire(p.initial_method, p.initial_at_unix_ms)?;
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
        initial_method: initial,
        port: p.port,
        resync_window_start_hour: p.resync_window_start_hour,
        resync_window_end_hour: p.resync_window_end_hour,
    })
}

/// Refuses to delete a policy that a pairing uses.
pub fn check_policy_delete(name: &str, pairings: &[PairingRecord]) -> Result<(), PolicyError> {
    match pairings.iter().find(|p| p.policy == name) {
        Some(p) => Err(PolicyError::InUse { name: name.into(), source_cloud: p.source_cloud.clone() }),
        None => Ok(()),
    }
}

/// Validates a pairing request. `protected_of_source` is how many VMs of the source
/// cloud are protected now: re-pairing replaces the existing pairing only when none is.
pub fn validate_pairing(
    req: &v1::CloudPairing,
    clouds: &[CloudInfo],
    policies: &[PolicyRecord],
    pairings: &[PairingRecord],
    protected_of_source: usize,
) -> Result<PairingRecord, PairingError> {
    let find = |n: &str| clouds.iter().find(|c| c.name == n).ok_or_else(|| PairingError::UnknownCloud(n.into()));
    let source = find(&req.source_cloud)?;
    let target = find(&req.target_cloud)?;
    if source.name == target.name {
        return Err(PairingError::SameCloud(source.name.clone()));
    }
    if source.site == target.site {
        return Err(PairingError::SameSite {
            source_cloud: source.name.clone(),
            target_cloud: target.name.clone(),
            site: source.site.clone(),
        });
    }
    if !policies.iter().any(|p| p.name == req.policy) {
        return Err(PairingError::UnknownPolicy(req.policy.clone()));
    }
    if let Some(existing) = pairings.iter().find(|p| p.source_cloud == source.name)
        && protected_of_source > 0
    {
        return Err(PairingError::AlreadyPaired {
            source_cloud: source.name.clone(),
            target_cloud: existing.target_cloud.clone(),
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
        v1::Policy {
            name: self.name.clone(),
            interval_ms: self.interval_ms,
            retention_ms: self.retention_ms,
            app_consistent_every_ms: self.app_consistent_every_ms,
            compression: self.compression,
            initial_method: match self.initial_method.as_str() {
                "offline" => v1::InitialMethod::Offline,
                s if s.starts_with("at=") => v1::InitialMethod::At,
                _ => v1::InitialMethod::Network,
            }
            .into(),
            initial_at_unix_ms: self.initial_at_unix_ms().unwrap_or(0),
            port: self.port,
            resync_window_start_hour: self.resync_window_start_hour,
            resync_window_end_hour: self.resync_window_end_hour,
        }
    }

    /// For `initial_method = at=TIME`: when initial replication may start (unix ms).
    pub fn initial_at_unix_ms(&self) -> Option<i64> {
        self.initial_method.strip_prefix("at=").and_then(parse_rfc3339_ms)
    }
}

impl PairingRecord {
    pub fn to_proto(&self) -> v1::CloudPairing {
        v1::CloudPairing {
            source_cloud: self.source_cloud.clone(),
            target_cloud: self.target_cloud.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The stored word of the wire's initial replication method (`network`, `offline`,
/// `at=<RFC 3339>`).
fn initial_from_wire(method: i32, at_unix_ms: i64) -> Result<String, PolicyError> {
    match v1::InitialMethod::try_from(method) {
        Ok(v1::InitialMethod::Unspecified | v1::InitialMethod::Network) => Ok("network".into()),
        Ok(v1::InitialMethod::Offline) => Ok("offline".into()),
        Ok(v1::InitialMethod::At) => {
            let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_unix_ms) * 1_000_000)
                .ok()
                .filter(|_| at_unix_ms > 0)
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .ok_or_else(|| PolicyError::Initial(format!("at {at_unix_ms} ms")))?;
            Ok(format!("at={t}"))
        }
        Err(_) => Err(PolicyError::Initial(format!("method {method}"))),
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)` into unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) { t.parse().ok() } else { None }
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut ms = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        let digits = &frac[..n];
        ms = format!("{:0<3}", &digits[..n.min(3)]).parse().ok()?;
        rest = &frac[n..];
    }
    let offset_s = match rest {
        "Z" | "z" => 0,
        r if r.len() == 6 && (r.starts_with('+') || r.starts_with('-')) && &r[3..4] == ":" => {
            let oh: i64 = r[1..3].parse().ok()?;
            let om: i64 = r[4..6].parse().ok()?;
            let o = oh * 3600 + om * 60;
            if r.starts_with('-') { -o } else { o }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let yy = if mo <= 2 { y - 1 } else { y };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + mi * 60 + se - offset_s) * 1000 + ms)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert!(validate_policy(&policy(s, 86400), false).is_ok(), "{s}s");
        }
        assert_eq!(validate_policy(&policy(60, 86400), false), Err(PolicyError::Interval("1m".into())));
        assert_eq!(validate_policy(&policy(1, 86400), false), Err(PolicyError::Interval("1s".into())));
        let mut p = policy(30, 86400);
        p.interval_ms = 0;
        assert_eq!(validate_policy(&p, false), Err(PolicyError::Interval("0ms".into())));
    }

    #[test]
    fn test_intervals_allow_short_cycles() {
        let r = validate_policy(&policy(1, 10), true).expect("1s with test intervals");
        assert_eq!(r.interval_ms, 1000);
        assert!(validate_policy(&policy(2, 2), true).is_ok());
        assert!(matches!(validate_policy(&policy(5, 2), true), Err(PolicyError::RetentionBelowInterval { .. })));
        let mut p = policy(1, 10);
        p.interval_ms = 500;
        assert_eq!(validate_policy(&p, true), Err(PolicyError::IntervalTooShort));
    }

    #[test]
    fn retention_range() {
        assert!(validate_policy(&policy(30, 3600), false).is_ok());
        assert!(validate_policy(&policy(30, 30 * 86400), false).is_ok());
        assert_eq!(validate_policy(&policy(30, 3599), false), Err(PolicyError::Retention("59m59s".into())));
        assert_eq!(validate_policy(&policy(30, 31 * 86400), false), Err(PolicyError::Retention("31d".into())));
    }

    #[test]
    fn app_consistent_frequency() {
        let mut p = policy(300, 86400);
        p.app_consistent_every_ms = 0;
        assert!(validate_policy(&p, false).is_ok());
        p.app_consistent_every_ms = 300_000;
        assert!(validate_policy(&p, false).is_ok());
        p.app_consistent_every_ms = 60_000;
        assert!(matches!(validate_policy(&p, false), Err(PolicyError::AppConsistent { .. })));
    }

    #[test]
    fn initial_method_window_port_name() {
        let mut p = policy(30, 86400);
        p.initial_method = 0;
        assert_eq!(validate_policy(&p, false).expect("default").initial_method, "network");
        p.initial_method = v1::InitialMethod::Offline.into();
        assert!(validate_policy(&p, false).is_ok());
        p.initial_method = v1::InitialMethod::At.into();
        p.initial_at_unix_ms = parse_rfc3339_ms("2025-01-31T22:00:00Z").expect("time");
        let rec = validate_policy(&p, false).expect("at");
        assert_eq!(rec.initial_method, "at=2025-01-31T22:00:00Z");
        assert_eq!(rec.initial_at_unix_ms(), Some(p.initial_at_unix_ms));
        assert_eq!(rec.to_proto().initial_method, i32::from(v1::InitialMethod::At));
        p.initial_at_unix_ms = 0;
        assert!(matches!(validate_policy(&p, false), Err(PolicyError::Initial(_))));
        p.initial_method = 42;
        assert!(matches!(validate_policy(&p, false), Err(PolicyError::Initial(_))));
        let mut p = policy(30, 86400);
        p.resync_window_start_hour = 18;
        p.resync_window_end_hour = 24;
        assert_eq!(validate_policy(&p, false), Err(PolicyError::Window(18, 24)));
        let mut p = policy(30, 86400);
        p.port = 70000;
        assert_eq!(validate_policy(&p, false), Err(PolicyError::Port(70000)));
        let mut p = policy(30, 86400);
        p.name = "no spaces".into();
        assert!(matches!(validate_policy(&p, false), Err(PolicyError::Name(_))));
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
        let pairings =
            vec![PairingRecord { source_cloud: "a".into(), target_cloud: "b".into(), policy: "gold".into() }];
        assert!(matches!(check_policy_delete("gold", &pairings), Err(PolicyError::InUse { .. })));
        assert!(check_policy_delete("silver", &pairings).is_ok());
    }

    fn clouds() -> Vec<CloudInfo> {
        vec![
            CloudInfo { name: "gold-a".into(), site: "primary".into() },
            CloudInfo { name: "gold-b".into(), site: "secondary".into() },
            CloudInfo { name: "silver-a".into(), site: "primary".into() },
        ]
    }

    fn policies() -> Vec<PolicyRecord> {
        vec![validate_policy(&policy(30, 86400), false).expect("policy")]
    }

    fn pair(s: &str, t: &str, p: &str) -> v1::CloudPairing {
        v1::CloudPairing { source_cloud: s.into(), target_cloud: t.into(), policy: p.into() }
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
            vec![PairingRecord { source_cloud: "gold-a".into(), target_cloud: "gold-b".into(), policy: "gold".into() }];
        assert!(validate_pairing(&pair("gold-a", "gold-b", "gold"), &clouds(), &policies(), &existing, 0).is_ok());
        assert!(matches!(
            validate_pairing(&pair("gold-a", "gold-b", "gold"), &clouds(), &policies(), &existing, 2),
            Err(PairingError::AlreadyPaired { protected: 2, .. })
        ));
    }

    #[test]
    fn settings_follow_the_policy() {
        let p = validate_policy(&policy(30, 86400), false).expect("policy");
        assert_eq!(replication_settings(&p, false).retry_unit_ms, 60_000);
        assert_eq!(replication_settings(&p, true).retry_unit_ms, 1000);
        assert_eq!(replication_settings(&p, true).interval_ms, 30_000);
        assert_eq!(human_duration(Duration::from_secs(5400)), "1h30m");
    }
}
