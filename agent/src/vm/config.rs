//! `vm.json` ([`VmConfig`]): what a VM is — disks, NICs, power, how a failed-over VM
//! came to run — saved and read through [`crate::persist`] (kind [`VM_CONFIG`]).

use std::path::Path;

use serde::{Deserialize, Serialize};
use siterecovery_proto::v1;

use super::VmError;
use crate::persist::{self, PersistError, VM_CONFIG};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    Off,
    Running,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub id: String,
    pub size_bytes: u64,
    /// Image file name inside the VM folder.
    pub file: String,
    /// Whether the replication tracker logs this disk's writes (on once protected).
    #[serde(default)]
    pub tracking: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    pub network: String,
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub dhcp: bool,
    pub mac: String,
}

/// `vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub created_unix_ms: i64,
    pub power: Power,
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NicConfig>,
    /// Set on a VM started by a failover on this (replica) host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverConfig>,
    /// What the hypervisor gives the VM (memory, CPUs, how it boots); read by the QEMU
    /// hook (`siterecovery-qemu-hook`). Absent in files from before it: the defaults.
    #[serde(default)]
    pub machine: crate::machine::MachineConfig,
}

/// How a failed-over (or test) VM runs: until commit its disks are copy-on-write
/// overlays over a recovery point of the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverConfig {
    pub relationship_id: String,
    pub point_id: String,
    pub kind: siterecovery_proto::model::FailoverKind,
    pub committed: bool,
    #[serde(default)]
    pub test_of: String,
    pub started_unix_ms: i64,
}

impl FailoverConfig {
    pub fn to_proto(&self) -> v1::FailoverInfo {
        v1::FailoverInfo {
            relationship_id: self.relationship_id.clone(),
            point_id: self.point_id.clone(),
            kind: self.kind.into(),
            committed: self.committed,
            test_of: self.test_of.clone(),
            started_unix_ms: self.started_unix_ms,
        }
    }
}

/// The config file of a VM folder.
pub const CONFIG_FILE: &str = "vm.json";

pub(super) fn save_config(folder: &Path, config: &VmConfig) -> Result<(), VmError> {
    persist::save(&folder.join(CONFIG_FILE), &VM_CONFIG, config)?;
    Ok(())
}

/// Reads a VM folder's config; `Ok(None)` when the folder has none. A file from before
/// the envelope (plain JSON) is read too; a torn or corrupt one is an error naming it.
pub fn read_config(folder: &Path) -> Result<Option<VmConfig>, PersistError> {
    persist::load(&folder.join(CONFIG_FILE), &VM_CONFIG)
}

/// A random locally administered MAC address in the QEMU range.
pub(super) fn random_mac() -> String {
    let mut b = [0u8; 3];
    rand::fill(&mut b[..]);
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}
