//! The siterecovery provider: the control plane ("VMM server + vault") and the
//! operator CLI.
//!
//! - [`vault`]: the data dir, CA, registration secret, operator certificates.
//! - [`store`]: the embedded database.
//! - [`registration`], [`inventory`], [`control`]: the gRPC services.
//! - [`trust`]: the revoked certificates.
//! - [`auth`]: per-RPC authorisation from the peer certificate; [`command`]: how a
//!   command to an agent fails.
//! - [`relationship`]: replication relationships (state machine, records, health, the
//!   store-backed set, the orchestration [`relationship::Core`]); the bottom layer of
//!   protection, failover and plans.
//! - [`jobs`]: the job engine; [`agents`]: agents behind a trait.
//! - [`policy`], [`protection`]: replication policies and cloud pairings; the jobs that
//!   enable, finalize, disable and resync protection.
//! - [`failover`], [`network`], [`plan`]: failover jobs, reverse replication, VM
//!   networks with mappings and static IP pools, recovery plans.
//! - [`api`]: the server that ties them together; [`edge`]: the shared state seen
//!   through the edge services' context traits.
//! - [`cli`]: the operator's commands against a running provider; [`settings`]: the
//!   flags and `provider.toml` of `serve`, and `systemctl reload`.
//! - [`metrics`]: the Prometheus endpoint.

pub mod addresses;
pub mod agents;
pub mod api;
pub mod auth;
pub mod cli;
pub mod command;
pub mod control;
pub mod edge;
pub mod error;
pub mod failover;
pub mod inventory;
pub mod job;
pub mod jobs;
pub mod metrics;
pub mod network;
pub mod plan;
pub mod policy;
pub mod protection;
pub mod registration;
pub mod relationship;
pub mod settings;
pub mod store;
#[cfg(test)]
mod testkit;
pub mod trust;
pub mod vault;
