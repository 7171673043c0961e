//! VMs on this host: their folders, config files and disk images, and serving their
//! disks over NBD while they run.
//!
//! A VM folder (`<data-dir>/vms/<name>/`) holds `vm.json` ([`VmConfig`]), one sparse
//! raw image per disk (`disk0.img`, ...), the disks' HRL logs, and while the VM runs
//! the unix socket `nbd.sock` serving its disks. Every disk is also served on the
//! agent's TCP NBD port (TLS, `nbd` module doc). Every write goes through a
//! [`crate::tracker::TrackedDisk`], which is how the replication tracker sees it.
//!
//! The folders are the source of truth: at start the agent loads every folder and
//! starts the VMs whose config says `running`.
//!
//! The parts, bottom up: `error`, `config` (`vm.json`), `entry` (a VM held in memory),
//! `manager` (the set of VMs and read-only queries), `report` (the inventory),
//! `running` (serving the disks), `lifecycle` (create, start, stop, delete, ...) and
//! `failover` (VMs over a recovery point, commit), with `journal` (commit and
//! change-point made crash-safe, finished at the next start).

mod config;
mod entry;
mod error;
mod failover;
mod journal;
mod lifecycle;
mod manager;
mod report;
mod running;

#[cfg(test)]
mod tests;

pub use crate::machine::{DEFAULT_MEMORY_BYTES, MachineConfig};
pub use config::{CONFIG_FILE, DiskConfig, FailoverConfig, NicConfig, Power, VmConfig, read_config};
pub use error::VmError;
use error::io;
pub use manager::{DiskHandles, Hooks, VmManager};

/// Largest disk we create (64 TiB), well inside what raw files and NBD handle.
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn export_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}")
}
