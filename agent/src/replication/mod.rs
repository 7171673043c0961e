//! Replication on this host, both sides of a relationship: the [`sender`] of each
//! protected VM (the primary side), the [`protection`] handlers that carry out the
//! provider's commands (start, stop, resync, failover, points, offline copy) and the
//! [`resync`] block comparison.
//!
//! Dependencies point down: `protection` → `sender` → `resync`; below the package,
//! [`crate::offline`] (the offline initial copy's medium), [`crate::extents`] and the
//! replica store [`crate::replica`].

pub mod protection;
pub mod resync;
pub mod sender;

pub use self::protection::{Protection, ProtectionError};
pub use self::sender::ReplicationError;
