//! What an operator sets up before protecting: replication policies, cloud pairings, VM
//! networks and their mappings. The checks are pure functions of `policy` and
//! `network`; this module reads what they need and stores what they accept.

use siterecovery_proto::model::{CloudName, PolicyName, SiteName};

use super::ProtectionError;
use crate::inventory::HostRecord;
use crate::network::{self, MappingRecord, NetworkRecord, NetworkStore};
use crate::policy::{self, PairingRecord, PolicyError, PolicyRecord};
use crate::relationship::{Core, cloud_infos, list_hosts};
use crate::store::{PAIRINGS, POLICIES};

/// How many protected VMs have their primary in `cloud`.
fn protected_in_cloud(state: &Core, hosts: &[HostRecord], cloud: &str) -> usize {
    state
        .protection
        .all()
        .iter()
        .filter(|r| hosts.iter().any(|h| h.id.as_str() == r.primary_host_id && h.cloud == cloud))
        .count()
}

pub fn create_policy(state: &Core, p: &policy::PolicyRequest) -> Result<PolicyRecord, ProtectionError> {
    let rec = policy::validate_policy(p, state.protection.config.test_intervals)?;
    if state.store.get::<PolicyRecord>(POLICIES, &rec.name)?.is_some() {
        return Err(PolicyError::Exists(rec.name.to_string()).into());
    }
    state.store.put(POLICIES, &rec.name, &rec)?;
    Ok(rec)
}

pub fn list_policies(state: &Core) -> Result<Vec<PolicyRecord>, ProtectionError> {
    Ok(state.store.list::<PolicyRecord>(POLICIES)?)
}

pub fn delete_policy(state: &Core, name: &PolicyName) -> Result<(), ProtectionError> {
    if state.store.get::<PolicyRecord>(POLICIES, name)?.is_none() {
        return Err(PolicyError::UnknownPolicy(name.to_string()).into());
    }
    let pairings = state.store.list::<PairingRecord>(PAIRINGS)?;
    policy::check_policy_delete(name, &pairings)?;
    state.store.delete(POLICIES, name)?;
    Ok(())
}

pub fn pair_clouds(state: &Core, r: &policy::PairingRequest) -> Result<PairingRecord, ProtectionError> {
    let hosts = list_hosts(state)?;
    let policies = state.store.list::<PolicyRecord>(POLICIES)?;
    let pairings = state.store.list::<PairingRecord>(PAIRINGS)?;
    let protected = protected_in_cloud(state, &hosts, r.source_cloud.as_str());
    let rec = policy::validate_pairing(r, &cloud_infos(&hosts), &policies, &pairings, protected)?;
    state.store.put(PAIRINGS, &rec.source_cloud, &rec)?;
    Ok(rec)
}

pub fn list_pairings(state: &Core) -> Result<Vec<PairingRecord>, ProtectionError> {
    Ok(state.store.list::<PairingRecord>(PAIRINGS)?)
}

pub fn unpair_clouds(state: &Core, source: &CloudName) -> Result<(), ProtectionError> {
    if state.store.get::<PairingRecord>(PAIRINGS, source.as_str())?.is_none() {
        return Err(ProtectionError::CloudNotPaired(source.to_string()));
    }
    let hosts = list_hosts(state)?;
    let count = protected_in_cloud(state, &hosts, source.as_str());
    if count > 0 {
        return Err(ProtectionError::CloudHasProtected { count, cloud: source.to_string() });
    }
    state.store.delete(PAIRINGS, source.as_str())?;
    Ok(())
}

pub fn create_network(state: &Core, n: &network::NetworkRequest) -> Result<NetworkRecord, ProtectionError> {
    let hosts = list_hosts(state)?;
    let mut sites: Vec<SiteName> = hosts.iter().map(|h| h.site.clone()).collect();
    sites.sort();
    sites.dedup();
    NetworkStore::new(&state.store)
        .add_network(ProtectionError::from, |existing| Ok(network::validate_network(n, &sites, existing)?))
}

pub fn list_networks(state: &Core) -> Result<Vec<NetworkRecord>, ProtectionError> {
    Ok(NetworkStore::new(&state.store).networks()?)
}

pub fn map_network(state: &Core, m: &network::MappingRequest) -> Result<MappingRecord, ProtectionError> {
    let ns = NetworkStore::new(&state.store);
    let networks = ns.networks()?;
    let clouds = cloud_infos(&list_hosts(state)?);
    let pairings = state.store.list::<PairingRecord>(PAIRINGS)?;
    ns.add_mapping(ProtectionError::from, |existing| {
        Ok(network::validate_mapping(m, &networks, &clouds, &pairings, existing)?)
    })
}

pub fn list_mappings(state: &Core) -> Result<Vec<MappingRecord>, ProtectionError> {
    Ok(NetworkStore::new(&state.store).mappings()?)
}
