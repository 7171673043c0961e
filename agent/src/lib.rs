//! The siterecovery agent: the host daemon that serves VM disks over NBD, tracks every
//! write in per-disk HRL logs, and replicates them to a peer host.
//!
//! The data path, in order: [`nbd`] (the hypervisor's writes) → [`tracker`] (each write
//! appended to the disk's [`hrl`] log, then applied to the image). Around it: [`vm`]
//! (VM folders and serving their disks), [`replication`] (the sender of each protected VM,
//! the protection handlers), [`replica`] (the replica store), [`control`] (the channel to the provider),
//! [`peer`] (agent-to-agent mutual TLS), [`register`] and [`config`] (the data dir), [`files`] (the modes
//! every file and directory is made with), [`settings`] (the flags, `agent.toml` and `systemctl reload`).

pub mod admin;
pub mod bandwidth;
pub mod config;
pub mod control;
pub mod disk;
pub mod extents;
pub mod faults;
pub mod files;
pub mod hrl;
pub mod machine;
pub mod metrics;
pub mod nbd;
pub mod offline;
pub mod overlay;
pub mod peer;
pub mod persist;
pub mod qemu_hook;
pub mod register;
pub mod replica;
pub mod replication;
pub mod settings;
#[cfg(test)]
mod testkit;
pub mod tracker;
pub mod vm;
pub mod zeroes;

// The replication package's modules at their former paths (other modules and the
// integration tests use them).
pub use replication::{protection, resync, sender};
