//! A VM's machine settings ([`MachineRecord`]: memory, CPUs, boot), from `vm create
//! --memory --cpus --kernel --initrd --append`, validated once at the wire; the agent
//! keeps them in the VM's `vm.json` and with its replica, for the QEMU hook.

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::wire::WireError;
use siterecovery_proto::v1;

/// 1 GiB, without `--memory`.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
const MIN_MEMORY_BYTES: u64 = 16 << 20;
const MAX_MEMORY_BYTES: u64 = 16 << 40;
const MAX_CPUS: u32 = 255;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineRecord {
    pub memory_bytes: u64,
    pub cpus: u32,
    #[serde(default)]
    pub kernel: String,
    #[serde(default)]
    pub initrd: String,
    #[serde(default)]
    pub append: String,
}

impl Default for MachineRecord {
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

impl MachineRecord {
    /// From the wire (`field` names it: `create_vm.machine`); unset or zero fields take
    /// the defaults.
    pub fn from_wire(m: Option<&v1::Machine>, field: &str) -> Result<Self, WireError> {
        let Some(m) = m else { return Ok(Self::default()) };
        let r = Self {
            memory_bytes: if m.memory_bytes == 0 { DEFAULT_MEMORY_BYTES } else { m.memory_bytes },
            cpus: if m.cpus == 0 { 1 } else { m.cpus },
            kernel: m.kernel.clone(),
            initrd: m.initrd.clone(),
            append: m.append.clone(),
        };
        if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&r.memory_bytes) || !r.memory_bytes.is_multiple_of(1 << 20) {
            return Err(WireError::rule(
                format!("{field}.memory_bytes"),
                format!("memory {} must be whole MiB between 16 MiB and 16 TiB", r.memory_bytes),
            ));
        }
        if r.cpus > MAX_CPUS {
            return Err(WireError::rule(format!("{field}.cpus"), format!("{} CPUs: at most {MAX_CPUS}", r.cpus)));
        }
        for (name, p) in [("kernel", &r.kernel), ("initrd", &r.initrd)] {
            if !p.is_empty() && (!p.starts_with('/') || p.contains(['\0', '\n'])) {
                return Err(WireError::rule(format!("{field}.{name}"), format!("{p:?} is not an absolute path")));
            }
        }
        if r.append.contains(['\0', '\n']) {
            return Err(WireError::rule(format!("{field}.append"), "the kernel command line has a NUL or newline"));
        }
        if r.kernel.is_empty() && (!r.initrd.is_empty() || !r.append.is_empty()) {
            return Err(WireError::rule(format!("{field}.kernel"), "--initrd and --append need --kernel"));
        }
        Ok(r)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_refusals() {
        assert_eq!(MachineRecord::from_wire(None, "m").expect("accepted"), MachineRecord::default());
        let zero = v1::Machine::default();
        assert_eq!(MachineRecord::from_wire(Some(&zero), "m").expect("accepted"), MachineRecord::default());
        let ok =
            v1::Machine { memory_bytes: 256 << 20, cpus: 4, kernel: "/k".into(), append: "a".into(), ..zero.clone() };
        assert_eq!(MachineRecord::from_wire(Some(&ok), "m").expect("accepted").to_proto(), ok);
        for (bad, field) in [
            (v1::Machine { memory_bytes: 1 << 20, ..zero.clone() }, "m.memory_bytes"),
            (v1::Machine { memory_bytes: (1 << 30) + 1, ..zero.clone() }, "m.memory_bytes"),
            (v1::Machine { cpus: 256, ..zero.clone() }, "m.cpus"),
            (v1::Machine { kernel: "vmlinuz".into(), ..zero.clone() }, "m.kernel"),
            (v1::Machine { append: "x".into(), ..zero.clone() }, "m.kernel"),
        ] {
            let e = MachineRecord::from_wire(Some(&bad), "m").expect_err("refused");
            assert!(e.to_string().contains(field), "{bad:?}: {e}");
        }
    }
}
