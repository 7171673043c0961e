//! Reading what orchestration works on: the registered hosts, a host's name, the
//! clouds they form, and the relationship of a protected VM.
//!
//! The typed forms ([`list_hosts`], [`find_protected`], [`claim_vm`]) are what new code
//! calls; [`hosts`], [`protected`] and [`super::claim`] answer `Status` for the
//! orchestration not yet converted to typed errors.

use tonic::Status;

use super::{Core, RelationshipError, RelationshipRecord};
use crate::error::status;
use crate::inventory::{HostRecord, VmRecord};
use crate::jobs::{Claim, JobError};
use crate::policy::CloudInfo;
use crate::store::{HOSTS, StoreError, VMS};

pub fn list_hosts(state: &Core) -> Result<Vec<HostRecord>, StoreError> {
    state.store.list(HOSTS)
}

pub fn hosts(state: &Core) -> Result<Vec<HostRecord>, Status> {
    list_hosts(state).map_err(|e| status(&e))
}

pub fn cloud_infos(hosts: &[HostRecord]) -> Vec<CloudInfo> {
    let mut out: Vec<CloudInfo> = Vec::new();
    for h in hosts {
        if !out.iter().any(|c| c.name == h.cloud) {
            out.push(CloudInfo { name: h.cloud.clone(), site: h.site.clone() });
        }
    }
    out
}

pub fn host_name(hosts: &[HostRecord], id: &str) -> String {
    hosts.iter().find(|h| h.id.as_str() == id).map(|h| h.name.to_string()).unwrap_or_else(|| id.to_owned())
}

/// The relationship of `vm`: not protected when the VM exists, unknown otherwise.
pub fn find_protected(state: &Core, vm: &str) -> Result<RelationshipRecord, RelationshipError> {
    state.protection.of_vm(vm).ok_or_else(|| {
        let exists = state.store.get::<VmRecord>(VMS, vm).ok().flatten().is_some();
        if exists {
            RelationshipError::NotProtected(vm.to_owned())
        } else {
            RelationshipError::UnknownVm(vm.to_owned())
        }
    })
}

pub fn protected(state: &Core, vm: &str) -> Result<RelationshipRecord, Status> {
    find_protected(state, vm).map_err(Status::from)
}

/// Claims `vm` for a job (refused while another job works on it).
pub fn claim_vm(state: &Core, vm: &str) -> Result<Claim, JobError> {
    state.protection.jobs.claim(vm)
}
