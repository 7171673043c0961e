//! Unit tests of networks, mappings and address plans.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use siterecovery_proto::model::SiteName;
use siterecovery_proto::v1;

use super::*;
use crate::policy::{CloudInfo, PairingRecord};

/// The service's path: conversion, then validation.
fn validate_network(
    n: &v1::VmNetwork,
    sites: &[SiteName],
    existing: &[NetworkRecord],
) -> Result<NetworkRecord, NetworkError> {
    super::validate_network(&NetworkRequest::try_from(n)?, sites, existing)
}

fn name<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("test name")
}

fn net(name: &str, site: &str, subnet: &str, pools: &[&str], gw: &str) -> v1::VmNetwork {
    v1::VmNetwork {
        site: site.into(),
        name: name.into(),
        subnet: subnet.into(),
        pools: pools.iter().map(|s| s.to_string()).collect(),
        gateway: gw.into(),
        dns: vec![],
    }
}

fn sites() -> Vec<SiteName> {
    vec![name("primary"), name("secondary")]
}

#[test]
fn network_validation() {
    let ok = validate_network(
        &net("corp", "primary", "10.0.0.0/24", &["10.0.0.10-10.0.0.20", "10.0.0.30-10.0.0.40"], "10.0.0.1"),
        &sites(),
        &[],
    )
    .expect("valid");
    assert_eq!(ok.pools.len(), 2);
    let err = |n: v1::VmNetwork| validate_network(&n, &sites(), std::slice::from_ref(&ok)).expect_err("invalid");
    assert!(matches!(
        err(net("x", "primary", "10.0.0.0/24", &["10.0.1.1-10.0.1.5"], "")),
        NetworkError::PoolOutsideSubnet { .. }
    ));
    assert!(matches!(
        err(net("x", "primary", "10.0.0.0/24", &["10.0.0.10-10.0.0.20", "10.0.0.20-10.0.0.25"], "")),
        NetworkError::PoolsOverlap { .. }
    ));
    assert!(matches!(
        err(net("x", "primary", "10.0.0.0/24", &[], "10.9.0.1")),
        NetworkError::GatewayOutsideSubnet { .. }
    ));
    assert!(matches!(err(net("x", "primary", "10.0.0.5/24", &[], "")), NetworkError::InvalidSubnet(_)));
    assert!(matches!(err(net("x", "primary", "10.0.0.0/33", &[], "")), NetworkError::InvalidSubnet(_)));
    assert!(matches!(
        err(net("x", "primary", "10.0.0.0/24", &["10.0.0.9-10.0.0.3"], "")),
        NetworkError::InvalidPool(_)
    ));
    assert!(matches!(err(net("x", "mars", "10.0.0.0/24", &[], "")), NetworkError::UnknownSite(_)));
    assert!(matches!(err(net("corp", "primary", "10.0.0.0/24", &[], "")), NetworkError::Exists(_)));
    assert!(matches!(
        err(net("a b", "primary", "10.0.0.0/24", &[], "")),
        NetworkError::Request(e) if e.field() == "network.name"
    ));
    assert!(matches!(
        err(net("x", "../etc", "10.0.0.0/24", &[], "")),
        NetworkError::Request(e) if e.field() == "network.site"
    ));
}

fn pairing(s: &str, t: &str) -> PairingRecord {
    serde_json::from_value(serde_json::json!({"source_cloud": s, "target_cloud": t, "policy": "p"})).expect("pairing")
}

#[test]
fn mapping_validation() {
    let nets = vec![
        validate_network(&net("a", "primary", "10.0.0.0/24", &[], ""), &sites(), &[]).expect("a"),
        validate_network(&net("a2", "primary", "10.0.1.0/24", &[], ""), &sites(), &[]).expect("a2"),
        validate_network(&net("b", "secondary", "10.1.0.0/24", &[], ""), &sites(), &[]).expect("b"),
        validate_network(&net("c", "secondary", "10.2.0.0/24", &[], ""), &sites(), &[]).expect("c"),
    ];
    let clouds = vec![
        CloudInfo { name: name("gold-a"), site: name("primary") },
        CloudInfo { name: name("gold-b"), site: name("secondary") },
    ];
    let pairings = vec![pairing("gold-a", "gold-b")];
    let m = |s: &str, t: &str| MappingRequest { source: name(s), target: name(t) };
    let ab = validate_mapping(&m("a", "b"), &nets, &clouds, &pairings, &[]).expect("a→b");
    assert_eq!(ab.target, "b");
    let existing = vec![ab];
    assert!(validate_mapping(&m("a", "b"), &nets, &clouds, &pairings, &existing).is_ok(), "idempotent");
    assert!(matches!(
        validate_mapping(&m("a", "c"), &nets, &clouds, &pairings, &existing),
        Err(NetworkError::AlreadyMapped { .. })
    ));
    assert!(matches!(
        validate_mapping(&m("a", "a2"), &nets, &clouds, &pairings, &[]),
        Err(NetworkError::SameSite { .. })
    ));
    // Only gold-a → gold-b is paired: secondary → primary is not.
    assert!(matches!(
        validate_mapping(&m("b", "a"), &nets, &clouds, &pairings, &[]),
        Err(NetworkError::SitesNotPaired { .. })
    ));
    assert!(matches!(
        validate_mapping(&m("a", "zz"), &nets, &clouds, &pairings, &[]),
        Err(NetworkError::UnknownNetwork(_))
    ));
}

fn target() -> NetworkRecord {
    validate_network(&net("dr", "secondary", "10.0.0.0/24", &["10.0.0.10-10.0.0.12"], "10.0.0.1"), &sites(), &[])
        .expect("dr")
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("ip")
}

#[test]
fn allocation_keeps_the_address_or_finds_a_free_one() {
    let t = target();
    let none = HashSet::new();
    assert_eq!(allocate(Some(ip("10.0.0.11")), &t, &none), Ok(ip("10.0.0.11")), "same address kept");
    assert_eq!(allocate(Some(ip("192.168.5.5")), &t, &none), Ok(ip("10.0.0.10")), "not in the pool");
    let taken: HashSet<_> = [ip("10.0.0.11"), ip("10.0.0.10")].into();
    assert_eq!(allocate(Some(ip("10.0.0.11")), &t, &taken), Ok(ip("10.0.0.12")), "taken");
    let full: HashSet<_> = [ip("10.0.0.10"), ip("10.0.0.11"), ip("10.0.0.12")].into();
    assert_eq!(allocate(Some(ip("10.0.0.11")), &t, &full), Err(NetworkError::PoolExhausted { network: "dr".into() }));
}

#[test]
fn plan_addresses_dhcp_unmapped_and_exhaustion() {
    let t = target();
    let src = validate_network(&net("corp", "primary", "10.0.0.0/24", &[], ""), &sites(), &[]).expect("corp");
    let nets = vec![src, t];
    let maps = vec![MappingRecord { source: name("corp"), target: name("dr") }];
    let nic = |n: &str, ip: &str, dhcp| NicIn { network: Some(name(n)), ip: ip.into(), dhcp };
    let mut taken = HashMap::new();
    let r = plan_addresses(
        &[
            nic("corp", "10.0.0.11", false),
            nic("corp", "", true),
            nic("lab", "172.16.0.4", false),
            nic("corp", "10.0.0.11", false),
        ],
        &nets,
        &maps,
        &mut taken,
    )
    .expect("plan");
    assert_eq!(r[0].target_ip, "10.0.0.11");
    assert_eq!(r[0].note, "same address kept");
    assert!(r[1].dhcp && r[1].target_ip.is_empty() && r[1].target_network == Some(name("dr")));
    assert!(r[2].target_network.is_none() && r[2].note.contains("not mapped"));
    assert_eq!(r[2].failover_nic("").ip, "172.16.0.4");
    // The second NIC asking for .11 gets another one: the first reserved it.
    assert_eq!(r[3].target_ip, "10.0.0.10");
    let e =
        plan_addresses(&[nic("corp", "10.0.0.12", false), nic("corp", "10.0.0.12", false)], &nets, &maps, &mut taken)
            .expect_err("exhausted");
    assert!(e.to_string().contains("no free address"), "{e}");
}

#[test]
fn test_network_modes() {
    let r = vec![Reservation {
        nic: 0,
        source_network: Some(name("corp")),
        source_ip: "10.0.0.5".into(),
        target_network: Some(name("dr")),
        target_ip: "10.0.0.10".into(),
        dhcp: false,
        note: String::new(),
    }];
    let macs = vec!["52:54:00:00:00:01".to_string()];
    let m = test_nics(&r, &macs, TestNetwork::Mapped);
    assert_eq!((m[0].network.as_str(), m[0].ip.as_str()), ("dr", "10.0.0.10"));
    let i = test_nics(&r, &macs, TestNetwork::Isolated);
    assert_eq!((i[0].network.as_str(), i[0].ip.as_str()), ("dr-test-isolated", "10.0.0.5"));
    let n = test_nics(&r, &macs, TestNetwork::None);
    assert!(n[0].network.is_empty() && n[0].ip.is_empty());
    assert_eq!(n[0].mac, macs[0]);
    assert_eq!(TestNetwork::parse("bogus"), None);
}

/// Stored records keep the JSON shape of the string fields they had: a NIC that is not
/// mapped (or not connected) is `""`, names are plain strings, hostile names refused.
#[test]
fn records_keep_their_stored_shape() {
    let old = r#"{"nic":0,"source_network":"corp","source_ip":"10.0.0.5","target_network":"","target_ip":"","dhcp":false,"note":"n"}"#;
    let r: Reservation = serde_json::from_str(old).expect("old reservation");
    assert_eq!(r.source_network, Some(name("corp")));
    assert_eq!(r.target_network, None);
    let back = serde_json::to_value(&r).expect("ser");
    assert_eq!(back, serde_json::from_str::<serde_json::Value>(old).expect("json"));
    let hostile = old.replace(r#""source_network":"corp""#, r#""source_network":"../etc""#);
    assert!(serde_json::from_str::<Reservation>(&hostile).is_err());

    let n = target();
    let json = serde_json::to_value(&n).expect("ser");
    assert_eq!(json["name"], "dr");
    assert_eq!(json["site"], "secondary");
    assert_eq!(serde_json::from_value::<NetworkRecord>(json).expect("de"), n);
    let m = MappingRecord { source: name("corp"), target: name("dr") };
    let json = serde_json::to_string(&m).expect("ser");
    assert_eq!(json, r#"{"source":"corp","target":"dr"}"#);
    assert_eq!(serde_json::from_str::<MappingRecord>(&json).expect("de"), m);
}

#[test]
fn requests_refuse_hostile_names_naming_the_field() {
    for bad in ["../x", "a/b", "", ".."] {
        let n = net(bad, "primary", "10.0.0.0/24", &[], "");
        assert_eq!(NetworkRequest::try_from(&n).expect_err(bad).field(), "network.name");
        let n = net("ok", bad, "10.0.0.0/24", &[], "");
        assert_eq!(NetworkRequest::try_from(&n).expect_err(bad).field(), "network.site");
        let m = v1::NetworkMapping { source: bad.into(), target: "b".into() };
        assert_eq!(MappingRequest::try_from(&m).expect_err(bad).field(), "mapping.source");
        let m = v1::NetworkMapping { source: "a".into(), target: bad.into() };
        assert_eq!(MappingRequest::try_from(&m).expect_err(bad).field(), "mapping.target");
    }
}
