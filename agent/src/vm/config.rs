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
    pub machine: MachineConfig,
}

/// Memory, CPUs and boot settings of a VM (`vm create --memory --cpus --kernel ...`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub memory_bytes: u64,
    pub cpus: u32,
    /// Direct kernel boot: a kernel image on the host; empty boots from disk0.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kernel: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub initrd: String,
    /// The kernel command line (with `kernel` only).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub append: String,
}

/// 1 GiB, the memory of a VM created without `--memory`.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
/// Smallest memory a VM may have (16 MiB).
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Most memory a VM may have (16 TiB).
pub const MAX_MEMORY_BYTES: u64 = 16 << 40;
/// Most virtual CPUs a VM may have (QEMU's pc machine limit).
pub const MAX_CPUS: u32 = 255;

impl Default for MachineConfig {
    fn default() -> Self {
        Self { memory_bytes: DEFAULT_MEMORY_BYTES, cpus: 1, kernel: String::new(), initrd: String::new(), append: String::new() }
    }
}

impl MachineConfig {
    /// From the wire (`field` names it in errors): unset or zero fields take the
    /// defaults; the result is validated.
    pub fn from_wire(m: Option<&v1::Machine>, field: &str) -> Result<Self, String> {
        let Some(m) = m else { return Ok(Self::default()) };
        let d = Self::default();
        let c = Self {
            memory_bytes: if m.memory_bytes == 0 { d.memory_bytes } else { m.memory_bytes },
            cpus: if m.cpus == 0 { d.cpus } else { m.cpus },
            kernel: m.kernel.clone(),
            initrd: m.initrd.clone(),
            append: m.append.clone(),
        };
        c.validate().map_err(|e| format!("{field}: {e}"))?;
        Ok(c)
    }

    pub fn to_proto(&self) -> v1::Machine {
        v1::Machine {
            memory_bytes: self.memory_bytes,
            cpus: self.cpus,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            append: self.append.clone(),
        }
    }

    /// Checks the values (from a file or the wire); the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&self.memory_bytes) {
            return Err(format!(
                "machine.memory_bytes: {} is outside {MIN_MEMORY_BYTES}..={MAX_MEMORY_BYTES}",
                self.memory_bytes
            ));
        }
        if self.memory_bytes % (1 << 20) != 0 {
            return Err(format!("machine.memory_bytes: {} is not a whole number of MiB", self.memory_bytes));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(format!("machine.cpus: {} is outside 1..={MAX_CPUS}", self.cpus));
        }
        for (field, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if !path.is_empty() && !path.starts_with('/') {
                return Err(format!("machine.{field}: {path:?} is not an absolute path"));
            }
            if path.contains('\0') || path.contains('\n') {
                return Err(format!("machine.{field}: {path:?} has a NUL or newline"));
            }
        }
        if self.kernel.is_empty() && (!self.initrd.is_empty() || !self.append.is_empty()) {
            return Err("machine.initrd and machine.append need machine.kernel".into());
        }
        Ok(())
    }
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
