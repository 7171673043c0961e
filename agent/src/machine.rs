//! A VM's machine settings ([`MachineConfig`]: memory, CPUs, boot), as `vm create
//! --memory --cpus --kernel --initrd --append` set them: kept in the VM's `vm.json` and
//! with its replica (so a failed-over VM runs with them), read by the QEMU hook. A leaf:
//! both `vm` and `replica` use it.

use serde::{Deserialize, Serialize};
use siterecovery_proto::v1;

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
        Self {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            cpus: 1,
            kernel: String::new(),
            initrd: String::new(),
            append: String::new(),
        }
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
        if !self.memory_bytes.is_multiple_of(1 << 20) {
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
