//! Reading what orchestration works on: the registered hosts, a host's name, the
//! clouds they form, and the relationship of a protected VM.

use tonic::Status;

use super::{Core, RelationshipRecord};
use crate::error::store_err;
use crate::inventory::{HostRecord, VmRecord};
use crate::policy::CloudInfo;
use crate::store::{HOSTS, VMS};

pub fn hosts(state: &Core) -> Result<Vec<HostRecord>, Status> {
    state.store.list(HOSTS).map_err(store_err)
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

pub fn protected(state: &Core, vm: &str) -> Result<RelationshipRecord, Status> {
    state.protection.of_vm(vm).ok_or_else(|| {
        let exists = state.store.get::<VmRecord>(VMS, vm).ok().flatten().is_some();
        if exists {
            Status::failed_precondition(format!("VM {vm:?} is not protected (see `protect {vm}`)"))
        } else {
            Status::not_found(format!("no VM {vm:?} (see `vm list`)"))
        }
    })
}
