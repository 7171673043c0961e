//! The siterecovery agent: the host daemon that serves VM disks over NBD, tracks every
//! write in per-disk HRL logs, and (later) replicates them to a peer host.

pub mod disk;
pub mod hrl;
pub mod nbd;
pub mod tracker;
