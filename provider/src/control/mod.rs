//! The control channel: one long-lived bidi stream per connected agent.
//!
//! Agents send a `Hello`, their inventory, heartbeats, replication statuses and command
//! results; the provider sends commands, each with an id that its result carries back.
//!
//! - [`report`]: every agent message converted into domain types ([`AgentReport`]).
//! - [`sessions`]: the live streams and host connection state; sending a command.
//! - [`service`]: the Control service, acting on reports through [`ControlContext`].

pub mod report;
pub mod service;
pub mod sessions;

pub use report::{AgentReport, ReplicationReport};
pub use service::{ControlContext, ControlError, ControlService};
pub use sessions::{LiveStatus, Sessions};
