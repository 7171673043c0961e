//! The operator's commands on registered hosts: `host reset` (revoke the current
//! certificate; exactly one new registration of the name is then allowed), `host
//! remove` (deregister: the host and its VM records deleted, its certificate revoked),
//! `host move` (site and/or cloud: registration never changes them), and the revoked
//! certificates.
//!
//! Each change of a host record is one read-modify-write of the store
//! ([`Store::update`], [`Store::reconcile`]), so a registration or another command at the same moment
//! cannot undo it. A certificate is revoked after its host record changed: from then
//! on a renewal with it is refused (the record says reset, or is gone) before the
//! revocation even lands.

use serde::Deserialize;
use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{CloudName, HostId, HostName, SiteName};
use siterecovery_proto::v1;

use super::records::{HostRecord, VmRecord};
use super::service::InventoryError;
use crate::store::{Change, HOSTS, RELATIONSHIPS, Store, StoreError, VMS};
use crate::trust::{Revocations, RevokedRecord};

/// `MoveHost`, converted: the host by name or id, and what changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveHostRequest {
    pub host: HostId,
    pub site: Option<SiteName>,
    pub cloud: Option<CloudName>,
}

impl TryFrom<&v1::MoveHostRequest> for MoveHostRequest {
    type Error = WireError;
    fn try_from(r: &v1::MoveHostRequest) -> Result<Self, WireError> {
        let req = Self {
            host: wire::field("move_host.host", &r.host)?,
            site: wire::optional("move_host.site", &r.site)?,
            cloud: wire::optional("move_host.cloud", &r.cloud)?,
        };
        if req.site.is_none() && req.cloud.is_none() {
            return Err(WireError::rule("move_host.site", "give a new site, a new cloud, or both"));
        }
        Ok(req)
    }
}

/// The hosts of a relationship as the relationships table stores them: the module
/// `relationship` sits above this one, so its record type is not imported here, and
/// only these fields are read.
#[derive(Deserialize)]
struct StoredRelationship {
    vm: String,
    primary_host_id: String,
    replica_host_id: String,
}

/// The VMs whose replication relationship uses host `id`, as primary or replica.
pub fn relationships_using(store: &Store, id: &HostId) -> Result<Vec<String>, StoreError> {
    let rels: Vec<StoredRelationship> = store.list(RELATIONSHIPS)?;
    let mut vms: Vec<String> = rels
        .into_iter()
        .filter(|r| r.primary_host_id == id.as_str() || r.replica_host_id == id.as_str())
        .map(|r| r.vm)
        .collect();
    vms.sort();
    vms.dedup();
    Ok(vms)
}

/// Revokes `host`'s current certificate for `reason`; its serial, or `None` for a
/// record from before serials were kept (nothing to revoke by serial).
fn revoke(
    store: &Store,
    revocations: &Revocations,
    host: &HostRecord,
    reason: &str,
) -> Result<Option<String>, StoreError> {
    if host.cert_serial.is_empty() {
        tracing::warn!(host = %host.name, "{reason}: no certificate serial recorded for the host; nothing revoked");
        return Ok(None);
    }
    revocations.revoke(
        store,
        RevokedRecord {
            serial: host.cert_serial.clone(),
            host_id: host.id.clone(),
            host_name: host.name.clone(),
            revoked_unix_ms: siterecovery_certs::unix_now().saturating_mul(1000),
            reason: reason.to_owned(),
        },
    )?;
    Ok(Some(host.cert_serial.clone()))
}

/// Changes host `name` by `f` in one read-modify-write; the host as written.
fn change(store: &Store, name: &HostName, f: impl FnOnce(&mut HostRecord)) -> Result<HostRecord, InventoryError> {
    let host = store.update(HOSTS, name, |rec: Option<HostRecord>| match rec {
        Some(mut h) => {
            f(&mut h);
            (Some(h.clone()), Some(h))
        }
        None => (None, None),
    })?;
    host.ok_or_else(|| InventoryError::UnknownHost(name.to_string()))
}

/// `host reset`: flags the host (one new registration allowed), then revokes its
/// certificate. The host as it is now.
pub fn reset(store: &Store, revocations: &Revocations, name: &HostName) -> Result<HostRecord, InventoryError> {
    let host = change(store, name, |h| h.reset_pending = true)?;
    let serial = revoke(store, revocations, &host, "host reset")?;
    tracing::info!(host = %host.name, host_id = %host.id, serial = serial.as_deref().unwrap_or("-"),
        "host reset: certificate revoked, one new registration allowed");
    Ok(host)
}

/// `host remove`: refused while a relationship uses the host; otherwise the host
/// record and its VM records deleted and its certificate revoked. The revoked serial.
pub fn remove(store: &Store, revocations: &Revocations, name: &HostName) -> Result<Option<String>, InventoryError> {
    let host = store.reconcile(HOSTS, |all: &[(String, HostRecord)]| {
        let Some((key, h)) = all.iter().find(|(k, _)| k == name.as_str()) else {
            return (vec![], Err(InventoryError::UnknownHost(name.to_string())));
        };
        match relationships_using(store, &h.id) {
            Ok(vms) if vms.is_empty() => (vec![Change::Delete(key.clone())], Ok(h.clone())),
            Ok(vms) => (vec![], Err(InventoryError::HostInUse { host: h.name.clone(), vms })),
            Err(e) => (vec![], Err(e.into())),
        }
    })??;
    let serial = revoke(store, revocations, &host, "host remove")?;
    let none: &[(String, VmRecord)] = &[];
    store.replace_where(VMS, |v: &VmRecord| v.host_id == host.id, none)?;
    tracing::info!(host = %host.name, host_id = %host.id, serial = serial.as_deref().unwrap_or("-"),
        "host removed: deregistered, its VM records deleted, certificate revoked");
    Ok(serial)
}

/// `host move`: the host's new site and/or cloud.
pub fn move_host(store: &Store, name: &HostName, req: &MoveHostRequest) -> Result<HostRecord, InventoryError> {
    let host = change(store, name, |h| {
        if let Some(site) = &req.site {
            h.site = site.clone();
        }
        if let Some(cloud) = &req.cloud {
            h.cloud = cloud.clone();
        }
    })?;
    tracing::info!(host = %host.name, site = %host.site, cloud = %host.cloud, "host moved");
    Ok(host)
}

/// The revoked certificates, newest first.
pub fn revoked(store: &Store, revocations: &Revocations) -> Result<Vec<v1::RevokedCertificate>, StoreError> {
    let mut all = revocations.records(store)?;
    all.sort_by(|a, b| b.revoked_unix_ms.cmp(&a.revoked_unix_ms).then_with(|| a.serial.cmp(&b.serial)));
    Ok(all
        .into_iter()
        .map(|r| v1::RevokedCertificate {
            serial: r.serial,
            host_id: r.host_id.into_string(),
            host_name: r.host_name.into_string(),
            revoked_unix_ms: r.revoked_unix_ms,
            reason: r.reason,
        })
        .collect())
}

#[cfg(test)]
mod tests;
