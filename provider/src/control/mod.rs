//! The control channel: one long-lived bidi stream per connected agent.
//!
//! Agents send a `Hello`, their inventory, heartbeats, replication statuses, command
//! results and certificate renewals; the provider sends commands, each with an id that
//! its result carries back, and pushes (command id 0) the revocation list and renewed
//! certificates.
//!
//! A session is bound to the certificate that opened it: its serial must be the host
//! record's current one, every write re-reads the record, a renewal rebinds it, and a
//! revoked serial ends it.
//!
//! - [`report`]: every agent message converted into domain types ([`AgentReport`]).
//! - [`sessions`]: the live streams and host connection state; sending a command.
//! - [`service`]: the Control service, acting on reports through [`ControlContext`].
//! - [`session`]: one session's loop; [`binding`]: the record and serial it is bound
//!   to; [`renew`]: certificate renewal; [`writes`]: what an inventory report writes,
//!   and when (floods stay off the disk).

pub mod binding;
pub mod renew;
pub mod report;
pub mod service;
mod session;
pub mod sessions;
#[cfg(test)]
mod tests;
pub mod writes;

pub use binding::Binding;
pub use report::{AgentReport, ReplicationReport};
pub use service::{ControlContext, ControlError, ControlService};
pub use sessions::{LiveStatus, Sessions};
pub use writes::WriteLimits;
