//! The siterecovery agent: the host daemon that serves VM disks over NBD, tracks every
//! write in per-disk HRL logs, and replicates them to a peer host.
//!
//! The data path, in order: [`nbd`] (the hypervisor's writes) → [`tracker`] (each write
//! appended to the disk's [`hrl`] log, then applied to the image). Around it: [`vm`]
//! (VM folders and serving their disks), [`control`] (the channel to the provider),
//! [`peer`] (agent-to-agent mutual TLS), [`register`] and [`config`] (the data dir).

pub mod admin;
pub mod config;
pub mod control;
pub mod disk;
pub mod hrl;
pub mod nbd;
pub mod offline;
pub mod overlay;
pub mod peer;
pub mod persist;
pub mod protection;
pub mod register;
pub mod replica;
pub mod resync;
pub mod sender;
pub mod tracker;
pub mod vm;
