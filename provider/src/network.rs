//! VM networks, network mappings and the static IP addresses NICs get at failover.
//!
//! A VM network belongs to a site and has a subnet, optional gateway and DNS servers,
//! and static IP pools. A mapping sends a network of one site to a network of another
//! (one mapping per source), allowed only when a cloud of the source site is paired with
//! a cloud of the target site. Network names are unique across sites, so `network map
//! --source N --target N` needs no site.
//!
//! Addresses: at protection time every static NIC of the VM gets a reservation in the
//! mapped network ([`plan_addresses`]): the same address when the target pool holds it
//! and it is free, else another free one; DHCP NICs are not managed; a NIC whose network
//! has no mapping keeps its network and address. The reservations live on the
//! relationship and are applied at failover.
//!
//! Storage: networks and mappings are small, so each collection is one JSON document in
//! the store's `meta` table (`networks`, `network_mappings`), written under a lock.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, NetworkName, SiteName};
use siterecovery_proto::v1;

use crate::policy::{CloudInfo, PairingRecord};
use crate::store::{META, Store, StoreError, empty_is_none};

/// `meta` key of the list of networks.
pub const NETWORKS_KEY: &str = "networks";
/// `meta` key of the list of mappings.
pub const MAPPINGS_KEY: &str = "network_mappings";
/// Suffix of the isolated network a test failover may use: `<target>-test-isolated`.
pub const ISOLATED_SUFFIX: &str = "-test-isolated";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// The request does not convert into domain types (a network or site name).
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("unknown site {0:?} (sites come from registered hosts; see `site list`)")]
    UnknownSite(String),
    #[error("network {0:?} already exists")]
    Exists(String),
    #[error("no network {0:?} (see `network list`)")]
    UnknownNetwork(String),
    #[error("{0:?} is not a subnet in CIDR form (e.g. 10.0.0.0/24)")]
    InvalidSubnet(String),
    #[error("{0:?} is not an IPv4 address")]
    InvalidAddress(String),
    #[error("{0:?} is not a pool range A-B with A <= B")]
    InvalidPool(String),
    #[error("pool {pool} is not inside subnet {subnet}")]
    PoolOutsideSubnet { pool: String, subnet: String },
    #[error("pools {a} and {b} overlap")]
    PoolsOverlap { a: String, b: String },
    #[error("gateway {gateway} is not inside subnet {subnet}")]
    GatewayOutsideSubnet { gateway: String, subnet: String },
    #[error("networks {source_net} and {target} are both at site {site}: a mapping goes to another site")]
    SameSite { source_net: String, target: String, site: String },
    #[error(
        "no cloud of site {source_site} is paired with a cloud of site {target_site}: pair them first (`cloud pair`)"
    )]
    SitesNotPaired { source_site: String, target_site: String },
    #[error("network {source_net} is already mapped to {target}")]
    AlreadyMapped { source_net: String, target: String },
    #[error("the static pool of network {network} has no free address left")]
    PoolExhausted { network: String },
    #[error("network {0} has no static pool")]
    NoPool(String),
}

/// A subnet in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::InvalidSubnet(s.into());
        let (a, p) = s.trim().split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 32 {
            return Err(bad());
        }
        let c = Self { base: Ipv4Addr::from(u32::from(addr) & mask(prefix)), prefix };
        if c.base != addr {
            // 10.0.0.5/24 is a host address, not a subnet: say which subnet was meant.
            return Err(NetworkError::InvalidSubnet(format!("{s} (did you mean {c}?)")));
        }
        Ok(c)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.base)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) }
}

/// An inclusive address range of a static pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl Pool {
    pub fn parse(s: &str) -> Result<Self, NetworkError> {
        let bad = || NetworkError::InvalidPool(s.into());
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let start: Ipv4Addr = a.trim().parse().map_err(|_| bad())?;
        let end: Ipv4Addr = b.trim().parse().map_err(|_| bad())?;
        if u32::from(start) > u32::from(end) {
            return Err(bad());
        }
        Ok(Self { start, end })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }

    fn overlaps(&self, o: &Pool) -> bool {
        u32::from(self.start) <= u32::from(o.end) && u32::from(o.start) <= u32::from(self.end)
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// A VM network, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    pub site: SiteName,
    pub name: NetworkName,
    pub subnet: String,
    pub pools: Vec<Pool>,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
}

impl NetworkRecord {
    pub fn to_proto(&self) -> v1::VmNetwork {
        v1::VmNetwork {
            site: self.site.to_string(),
            name: self.name.to_string(),
            subnet: self.subnet.clone(),
            pools: self.pools.iter().map(|p| p.to_string()).collect(),
            gateway: self.gateway.map(|g| g.to_string()).unwrap_or_default(),
            dns: self.dns.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        self.pools.iter().any(|p| p.contains(ip))
    }
}

/// A network mapping, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingRecord {
    pub source: NetworkName,
    pub target: NetworkName,
}

impl MappingRecord {
    pub fn to_proto(&self) -> v1::NetworkMapping {
        v1::NetworkMapping { source: self.source.to_string(), target: self.target.to_string() }
    }
}

/// A network as the operator asked for it, names converted (addresses are checked by
/// [`validate_network`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRequest {
    pub site: SiteName,
    pub name: NetworkName,
    pub subnet: String,
    pub pools: Vec<String>,
    pub gateway: String,
    pub dns: Vec<String>,
}

impl TryFrom<&v1::VmNetwork> for NetworkRequest {
    type Error = WireError;
    fn try_from(n: &v1::VmNetwork) -> Result<Self, WireError> {
        Ok(Self {
            site: wire::field("network.site", &n.site)?,
            name: wire::field("network.name", &n.name)?,
            subnet: n.subnet.clone(),
            pools: n.pools.clone(),
            gateway: n.gateway.clone(),
            dns: n.dns.clone(),
        })
    }
}

/// A mapping as the operator asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingRequest {
    pub source: NetworkName,
    pub target: NetworkName,
}

impl TryFrom<&v1::NetworkMapping> for MappingRequest {
    type Error = WireError;
    fn try_from(m: &v1::NetworkMapping) -> Result<Self, WireError> {
        Ok(Self {
            source: wire::field("mapping.source", &m.source)?,
            target: wire::field("mapping.target", &m.target)?,
        })
    }
}

/// Validates a new network against the known sites and the existing networks.
pub fn validate_network(
    n: &NetworkRequest,
    sites: &[SiteName],
    existing: &[NetworkRecord],
) -> Result<NetworkRecord, NetworkError> {
    if !sites.contains(&n.site) {
        return Err(NetworkError::UnknownSite(n.site.to_string()));
    }
    if existing.iter().any(|e| e.name == n.name) {
        return Err(NetworkError::Exists(n.name.to_string()));
    }
    let subnet = Cidr::parse(&n.subnet)?;
    let mut pools: Vec<Pool> = Vec::new();
    for s in &n.pools {
        let p = Pool::parse(s)?;
        if !subnet.contains(p.start) || !subnet.contains(p.end) {
            return Err(NetworkError::PoolOutsideSubnet { pool: p.to_string(), subnet: subnet.to_string() });
        }
        if let Some(o) = pools.iter().find(|o| o.overlaps(&p)) {
            return Err(NetworkError::PoolsOverlap { a: o.to_string(), b: p.to_string() });
        }
        pools.push(p);
    }
    let addr = |s: &str| s.trim().parse::<Ipv4Addr>().map_err(|_| NetworkError::InvalidAddress(s.into()));
    let gateway = if n.gateway.is_empty() { None } else { Some(addr(&n.gateway)?) };
    if let Some(g) = gateway
        && !subnet.contains(g)
    {
        return Err(NetworkError::GatewayOutsideSubnet { gateway: g.to_string(), subnet: subnet.to_string() });
    }
    let dns = n.dns.iter().map(|d| addr(d)).collect::<Result<Vec<_>, _>>()?;
    Ok(NetworkRecord { site: n.site.clone(), name: n.name.clone(), subnet: subnet.to_string(), pools, gateway, dns })
}

/// Validates a mapping: both networks exist at different sites whose clouds are paired
/// (any pairing from a cloud of the source site to a cloud of the target site), and the
/// source has no mapping yet. Mapping the same pair again is accepted (idempotent).
pub fn validate_mapping(
    m: &MappingRequest,
    networks: &[NetworkRecord],
    clouds: &[CloudInfo],
    pairings: &[PairingRecord],
    existing: &[MappingRecord],
) -> Result<MappingRecord, NetworkError> {
    let find = |n: &NetworkName| {
        networks.iter().find(|x| &x.name == n).ok_or_else(|| NetworkError::UnknownNetwork(n.to_string()))
    };
    let (src, dst) = (find(&m.source)?, find(&m.target)?);
    if src.site == dst.site {
        return Err(NetworkError::SameSite {
            source_net: src.name.to_string(),
            target: dst.name.to_string(),
            site: src.site.to_string(),
        });
    }
    let site_of = |c: &CloudName| clouds.iter().find(|x| &x.name == c).map(|x| &x.site);
    let paired = pairings
        .iter()
        .any(|p| site_of(&p.source_cloud) == Some(&src.site) && site_of(&p.target_cloud) == Some(&dst.site));
    if !paired {
        return Err(NetworkError::SitesNotPaired {
            source_site: src.site.to_string(),
            target_site: dst.site.to_string(),
        });
    }
    if let Some(e) = existing.iter().find(|e| e.source == src.name)
        && e.target != dst.name
    {
        return Err(NetworkError::AlreadyMapped { source_net: e.source.to_string(), target: e.target.to_string() });
    }
    Ok(MappingRecord { source: src.name.clone(), target: dst.name.clone() })
}

/// The address a static NIC gets in `target`: `current` when the target pool holds it
/// and it is not taken, else the lowest free pool address (never the gateway).
pub fn allocate(
    current: Option<Ipv4Addr>,
    target: &NetworkRecord,
    taken: &HashSet<Ipv4Addr>,
) -> Result<Ipv4Addr, NetworkError> {
    if target.pools.is_empty() {
        return Err(NetworkError::NoPool(target.name.to_string()));
    }
    let free = |ip: Ipv4Addr| !taken.contains(&ip) && Some(ip) != target.gateway;
    if let Some(ip) = current
        && target.in_pool(ip)
        && free(ip)
    {
        return Ok(ip);
    }
    for p in &target.pools {
        for n in u32::from(p.start)..=u32::from(p.end) {
            let ip = Ipv4Addr::from(n);
            if free(ip) {
                return Ok(ip);
            }
        }
    }
    Err(NetworkError::PoolExhausted { network: target.name.to_string() })
}

/// The address plan of one NIC (stored on the relationship).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reservation {
    pub nic: u32,
    /// `None`: the NIC is not connected.
    #[serde(with = "empty_is_none")]
    pub source_network: Option<NetworkName>,
    pub source_ip: String,
    /// `None` when the source network has no mapping.
    #[serde(with = "empty_is_none")]
    pub target_network: Option<NetworkName>,
    pub target_ip: String,
    pub dhcp: bool,
    pub note: String,
}

fn name_or_empty(n: &Option<NetworkName>) -> String {
    n.as_ref().map(|n| n.to_string()).unwrap_or_default()
}

impl Reservation {
    pub fn to_proto(&self) -> v1::AddressReservation {
        v1::AddressReservation {
            nic: self.nic,
            source_network: name_or_empty(&self.source_network),
            source_ip: self.source_ip.clone(),
            target_network: name_or_empty(&self.target_network),
            target_ip: self.target_ip.clone(),
            dhcp: self.dhcp,
            note: self.note.clone(),
        }
    }

    /// The NIC of the failed-over VM (planned or unplanned failover).
    pub fn failover_nic(&self, mac: &str) -> v1::Nic {
        if self.target_network.is_none() {
            return v1::Nic {
                network: name_or_empty(&self.source_network),
                ip: self.source_ip.clone(),
                dhcp: self.dhcp,
                mac: mac.into(),
            };
        }
        v1::Nic {
            network: name_or_empty(&self.target_network),
            ip: self.target_ip.clone(),
            dhcp: self.dhcp,
            mac: mac.into(),
        }
    }
}

/// A NIC as the allocation sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicIn {
    /// `None`: not connected.
    pub network: Option<NetworkName>,
    pub ip: String,
    pub dhcp: bool,
}

/// Reserves target addresses for the NICs of a VM. `taken` holds the addresses already
/// in use or reserved (by network name); the new reservations are added to it.
pub fn plan_addresses(
    nics: &[NicIn],
    networks: &[NetworkRecord],
    mappings: &[MappingRecord],
    taken: &mut std::collections::HashMap<NetworkName, HashSet<Ipv4Addr>>,
) -> Result<Vec<Reservation>, NetworkError> {
    let mut out = Vec::new();
    for (i, n) in nics.iter().enumerate() {
        let mut r = Reservation {
            nic: i as u32,
            source_network: n.network.clone(),
            source_ip: n.ip.clone(),
            dhcp: n.dhcp,
            ..Default::default()
        };
        let mapped = mappings.iter().find(|m| n.network.as_ref() == Some(&m.source));
        match mapped {
            None => r.note = format!("network {:?} is not mapped: network and address kept", name_or_empty(&n.network)),
            Some(m) => {
                r.target_network = Some(m.target.clone());
                if n.dhcp {
                    r.note = "dhcp: not managed".into();
                } else {
                    let target = networks
                        .iter()
                        .find(|x| x.name == m.target)
                        .ok_or_else(|| NetworkError::UnknownNetwork(m.target.to_string()))?;
                    let current = n.ip.parse::<Ipv4Addr>().ok();
                    let used = taken.entry(target.name.clone()).or_default();
                    let ip = allocate(current, target, used)?;
                    used.insert(ip);
                    r.target_ip = ip.to_string();
                    r.note = if Some(ip) == current {
                        "same address kept".into()
                    } else if current.is_some_and(|c| target.in_pool(c)) {
                        format!("{} is taken in {}: another free one", n.ip, target.name)
                    } else {
                        format!("{} is not in the pool of {}: another free one", display_ip(&n.ip), target.name)
                    };
                }
            }
        }
        out.push(r);
    }
    Ok(out)
}

fn display_ip(s: &str) -> &str {
    if s.is_empty() { "no address" } else { s }
}

/// How a test failover connects the test VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestNetwork {
    /// The mapped network, with the reserved address.
    Mapped,
    /// `<target>-test-isolated`, address kept.
    Isolated,
    /// NICs disconnected.
    None,
}

impl TestNetwork {
    /// The wire's value; unspecified is the default, mapped.
    pub fn from_wire(v: i32) -> Option<Self> {
        use siterecovery_proto::v1::TestNetwork as W;
        match W::try_from(v).ok()? {
            W::Unspecified | W::Mapped => Some(Self::Mapped),
            W::Isolated => Some(Self::Isolated),
            W::None => Some(Self::None),
        }
    }

    pub fn to_wire(self) -> i32 {
        use siterecovery_proto::v1::TestNetwork as W;
        (match self {
            Self::Mapped => W::Mapped,
            Self::Isolated => W::Isolated,
            Self::None => W::None,
        }) as i32
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "mapped" => Self::Mapped,
            "isolated" => Self::Isolated,
            "none" => Self::None,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mapped => "mapped",
            Self::Isolated => "isolated",
            Self::None => "none",
        }
    }
}

/// The NICs of a test VM.
pub fn test_nics(reservations: &[Reservation], macs: &[String], mode: TestNetwork) -> Vec<v1::Nic> {
    reservations
        .iter()
        .map(|r| {
            let mac = macs.get(r.nic as usize).cloned().unwrap_or_default();
            match mode {
                TestNetwork::Mapped => r.failover_nic(&mac),
                TestNetwork::Isolated => {
                    let base =
                        name_or_empty(r.target_network.as_ref().map_or(&r.source_network, |_| &r.target_network));
                    v1::Nic { network: format!("{base}{ISOLATED_SUFFIX}"), ip: r.source_ip.clone(), dhcp: r.dhcp, mac }
                }
                TestNetwork::None => v1::Nic { network: String::new(), ip: String::new(), dhcp: false, mac },
            }
        })
        .collect()
}

/// Networks and mappings in the store; a lock makes read-modify-write safe.
pub struct NetworkStore<'a> {
    store: &'a Store,
}

static WRITE: Mutex<()> = Mutex::new(());

impl<'a> NetworkStore<'a> {
    pub fn new(store: &'a Store) -> Self {
        Self { store }
    }

    pub fn networks(&self) -> Result<Vec<NetworkRecord>, StoreError> {
        Ok(self.store.get(META, NETWORKS_KEY)?.unwrap_or_default())
    }

    pub fn mappings(&self) -> Result<Vec<MappingRecord>, StoreError> {
        Ok(self.store.get(META, MAPPINGS_KEY)?.unwrap_or_default())
    }

    /// Adds a network validated by `check` against the current list.
    pub fn add_network<E>(
        &self,
        store_err: impl Fn(StoreError) -> E,
        check: impl FnOnce(&[NetworkRecord]) -> Result<NetworkRecord, E>,
    ) -> Result<NetworkRecord, E> {
        let _g = WRITE.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.networks().map_err(&store_err)?;
        let rec = check(&all)?;
        all.push(rec.clone());
        all.sort_by(|a, b| (&a.site, &a.name).cmp(&(&b.site, &b.name)));
        self.store.put(META, NETWORKS_KEY, &all).map_err(&store_err)?;
        Ok(rec)
    }

    /// Adds (or confirms) a mapping validated by `check` against the current list.
    pub fn add_mapping<E>(
        &self,
        store_err: impl Fn(StoreError) -> E,
        check: impl FnOnce(&[MappingRecord]) -> Result<MappingRecord, E>,
    ) -> Result<MappingRecord, E> {
        let _g = WRITE.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.mappings().map_err(&store_err)?;
        let rec = check(&all)?;
        if !all.contains(&rec) {
            all.push(rec.clone());
            all.sort_by(|a, b| a.source.cmp(&b.source));
            self.store.put(META, MAPPINGS_KEY, &all).map_err(&store_err)?;
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

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
        serde_json::from_value(serde_json::json!({"source_cloud": s, "target_cloud": t, "policy": "p"}))
            .expect("pairing")
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
        assert_eq!(
            allocate(Some(ip("10.0.0.11")), &t, &full),
            Err(NetworkError::PoolExhausted { network: "dr".into() })
        );
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
        let e = plan_addresses(
            &[nic("corp", "10.0.0.12", false), nic("corp", "10.0.0.12", false)],
            &nets,
            &maps,
            &mut taken,
        )
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
}
