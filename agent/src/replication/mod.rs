//! Replication on this host, both sides of a relationship: the [`sender`] of each
//! protected VM (the primary side), the [`protection`] handlers that carry out the
//! provider's commands (start, stop, resync, failover, points, offline copy), the
//! [`resync`] block comparison and the [`offline`] initial copy.
//!
//! Dependencies point down: `protection` → `sender` → `resync`, `extents`;
//! `offline` → `extents`. The replica store itself is [`crate::replica`].

pub mod extents;
pub mod offline;
pub mod protection;
pub mod resync;
pub mod sender;

pub use self::protection::{Protection, ProtectionError};
pub use self::sender::ReplicationError;
