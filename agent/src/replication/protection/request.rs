//! The protection commands as validated values: `control::command` builds them, once,
//! from the provider's messages, and the handlers take them. Nothing here holds a raw
//! string from the wire except `replica_address` (checked as a host:port there).

use std::path::PathBuf;

use siterecovery_proto::model::{DiskId, FailoverKind, HostId, PointSelector, RelationshipId, VmName};
use siterecovery_proto::v1;

/// One disk of a replica to prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSize {
    pub id: DiskId,
    pub size_bytes: u64,
}

/// The replica side of a new relationship (or reverse replication: `adopt_vm_disks`).
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareReplica {
    pub relationship: RelationshipId,
    pub vm: VmName,
    pub primary: HostId,
    pub disks: Vec<DiskSize>,
    pub settings: v1::ReplicationSettings,
    pub adopt_vm_disks: bool,
    /// The VM's memory, CPUs and boot settings: a VM failed over here runs with them.
    pub machine: crate::vm::MachineConfig,
}

/// The primary side: track the VM and replicate it to `replica_address`.
#[derive(Debug, Clone, PartialEq)]
pub struct StartReplication {
    pub relationship: RelationshipId,
    pub vm: VmName,
    pub replica_host: HostId,
    pub replica_address: String,
    pub settings: v1::ReplicationSettings,
    pub resync_initial: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReplication {
    pub relationship: RelationshipId,
    pub vm: VmName,
    pub remove_replica: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestResync {
    pub relationship: RelationshipId,
    pub vm: VmName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrepareFailover {
    pub relationship: RelationshipId,
    pub vm: VmName,
}

/// A failover on the replica host.
#[derive(Debug, Clone, PartialEq)]
pub struct Failover {
    pub relationship: RelationshipId,
    pub vm: VmName,
    pub point: PointSelector,
    pub kind: FailoverKind,
    /// Test failover: the test VM's name (`None`: `<vm>-test`).
    pub test_vm: Option<VmName>,
    pub nics: Vec<v1::Nic>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePoint {
    pub vm: VmName,
    pub point: PointSelector,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitFailover {
    pub vm: VmName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupTestFailover {
    pub vm: VmName,
    /// The test VM's name (`None`: `<vm>-test`).
    pub test_vm: Option<VmName>,
}

/// Offline initial replication, primary side: export into `dir` (absolute, no `..`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportInitial {
    pub relationship: RelationshipId,
    pub vm: VmName,
    pub replica_host: HostId,
    pub replica_address: String,
    pub settings: v1::ReplicationSettings,
    pub dir: PathBuf,
}

/// Offline initial replication, replica side: import from `dir` (absolute, no `..`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportInitial {
    pub relationship: RelationshipId,
    pub vm: VmName,
    pub dir: PathBuf,
}

/// The test VM of a test failover of `vm`: `test_vm`, or `<vm>-test`.
pub fn test_vm_name(vm: &VmName, test_vm: Option<&VmName>) -> Result<VmName, super::ProtectionError> {
    match test_vm {
        Some(n) => Ok(n.clone()),
        None => VmName::new(format!("{vm}-test"))
            .map_err(|e| super::ProtectionError::Invalid(format!("the test VM of {vm}: {e}"))),
    }
}
