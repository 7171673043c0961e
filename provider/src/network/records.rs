//! VM networks and network mappings as stored, the operator's requests that create
//! them (converted with `TryFrom`), their validation, and [`NetworkStore`].

use std::net::Ipv4Addr;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, NetworkName, SiteName};
use siterecovery_proto::v1;

use super::subnet::{Cidr, Pool};
use super::{MAPPINGS_KEY, NETWORKS_KEY, NetworkError};
use crate::policy::{CloudInfo, PairingRecord};
use crate::store::{META, Store, StoreError};

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

    pub(super) fn in_pool(&self, ip: Ipv4Addr) -> bool {
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
