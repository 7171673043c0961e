//! Unit tests of policies and pairings.

use std::time::Duration;

use siterecovery_proto::v1;

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

/// Stored policies keep their JSON shape: the initial method as its old words.
#[test]
fn records_keep_their_stored_shape() {
    let mut p = policy(30, 86400);
    for (method, at, word) in [
        (v1::InitialMethod::Network, 0, "network"),
        (v1::InitialMethod::Offline, 0, "offline"),
        (v1::InitialMethod::At, 1_738_360_800_000, "at=2025-01-31T22:00:00Z"),
    ] {
        p.initial_method = method.into();
        p.initial_at_unix_ms = at;
        let rec = validate(&p, false).expect("valid");
        let json = serde_json::to_value(&rec).expect("ser");
        assert_eq!(json["initial_method"], word);
        assert_eq!(json["name"], "gold");
        assert_eq!(serde_json::from_value::<PolicyRecord>(json).expect("de"), rec);
    }
    let old = serde_json::json!({
        "name": "gold", "interval_ms": 30000, "retention_ms": 86400000, "app_consistent_every_ms": 0,
        "compression": false, "initial_method": "at=2025-01-31T22:00:00Z", "port": 0,
        "resync_window_start_hour": 0, "resync_window_end_hour": 0
    });
    let rec: PolicyRecord = serde_json::from_value(old.clone()).expect("old record");
    assert_eq!(rec.initial_at_unix_ms(), Some(1_738_360_800_000));
    let mut bad = old;
    bad["initial_method"] = "sneakernet".into();
    assert!(serde_json::from_value::<PolicyRecord>(bad).is_err());
    let pairing = PairingRecord { source_cloud: name("a"), target_cloud: name("b"), policy: name("gold") };
    let json = serde_json::to_string(&pairing).expect("ser");
    assert_eq!(json, r#"{"source_cloud":"a","target_cloud":"b","policy":"gold"}"#);
    assert_eq!(serde_json::from_str::<PairingRecord>(&json).expect("de"), pairing);
}

#[test]
fn requests_refuse_hostile_names_naming_the_field() {
    for bad in ["../x", "a/b", "", ".", "x y"] {
        let mut p = policy(30, 86400);
        p.name = bad.into();
        assert_eq!(PolicyRequest::try_from(&p).expect_err(bad).field(), "policy.name");
        let fields = ["pairing.source_cloud", "pairing.target_cloud", "pairing.policy"];
        for (i, field) in fields.into_iter().enumerate() {
            let mut v = ["gold-a".to_string(), "gold-b".into(), "gold".into()];
            v[i] = bad.into();
            let [s, t, pol] = v;
            let req = v1::CloudPairing { source_cloud: s, target_cloud: t, policy: pol };
            let e = PairingRequest::try_from(&req).expect_err(bad);
            assert_eq!(e.field(), field);
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(field), "{}", status.message());
        }
    }
}

#[test]
fn bandwidth_specs_are_validated_stored_and_sent_to_the_hosts() {
    let mut p = policy(300, 86400);
    p.bandwidth = "08:00-18:00=50M,*=0".into();
    let rec = validate(&p, false).expect("valid");
    assert_eq!(rec.bandwidth.as_ref().map(|s| s.rate_at(9 * 3600)), Some(50 << 20));
    assert_eq!(rec.resync_bandwidth, None);
    let s = replication_settings(&rec, false);
    assert_eq!((s.bandwidth.as_str(), s.resync_bandwidth.as_str()), ("08:00-18:00=50M,*=0", ""));
    assert_eq!(rec.to_proto().bandwidth, "08:00-18:00=50M,*=0");
    // A store written before the field reads as unlimited.
    let mut json = serde_json::to_value(&rec).expect("json");
    json.as_object_mut().expect("object").remove("bandwidth");
    let old: PolicyRecord = serde_json::from_value(json).expect("old record");
    assert_eq!(old.bandwidth, None);
    for bad in ["08:00-18:00=50M,17:00-19:00=1M", "25:00-01:00=1M", "*=fast"] {
        let mut p = policy(300, 86400);
        p.resync_bandwidth = bad.into();
        let e = validate(&p, false).expect_err(bad);
        assert!(e.to_string().contains("resync_bandwidth"), "{bad}: {e}");
    }
}
