//! The siterecovery provider: the control plane ("VMM server + vault") and the
//! operator CLI.
//!
//! - [`vault`]: the data dir, CA, registration secret, operator certificates.
//! - [`store`]: the embedded database.
//! - [`registration`], [`inventory`], [`control`]: the gRPC services.
//! - [`auth`]: per-RPC authorisation from the peer certificate.
//! - [`policy`], [`protection`], [`job`], [`health`]: replication policies and cloud
//!   pairings, protected VMs and their state machine, jobs, replication health.
//! - [`api`]: the server that ties them together.
//! - [`cli`]: the operator's commands against a running provider.

pub mod api;
pub mod auth;
pub mod cli;
pub mod control;
pub mod health;
pub mod inventory;
pub mod job;
pub mod policy;
pub mod protection;
pub mod registration;
pub mod store;
pub mod vault;
