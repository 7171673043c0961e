//! Replication relationships: the bottom layer of protection, failover and plans.
//!
//! A relationship is one protected VM replicating from its primary host to a replica
//! host. This module owns what every orchestration above it shares, and imports none
//! of them (`protection`, `failover`, `plan`, `api` import this):
//!
//! - [`state`]: the replication state machine (pure).
//! - [`record`]: the stored records and how an agent's status changes them.
//! - [`health`]: Normal / Warning / Critical with reasons (pure).
//! - [`set`]: [`ProtectionCore`], the store-backed set of relationships, and
//!   [`ProtectionConfig`].
//! - [`core`]: [`Core`], the context orchestration runs in, and job bookkeeping.
//! - [`error`]: the typed error, [`RelationshipError`].
//! - [`lookup`]: hosts, clouds, and the relationship of a protected VM.
//! - [`wait`]: job steps that wait on a relationship.
//! - [`view`]: the operator's view of a relationship (`Vm.replication`).

pub mod core;
pub mod error;
pub mod health;
pub mod lookup;
pub mod record;
pub mod set;
pub mod state;
pub mod view;
pub mod wait;

pub use self::core::{Core, claim, fail_job, relationship_id, save_job};
pub use error::RelationshipError;
pub use health::Health;
pub use lookup::{claim_vm, cloud_infos, find_protected, host_name, hosts, list_hosts, protected};
pub use record::{FailoverRecord, RelationshipRecord, StatusRecord, TestFailoverRecord, same_host};
pub use set::{DEFAULT_SCRIPTS_DIR, ProtectionConfig, ProtectionCore};
pub use state::{AgentState, Event, InvalidTransition, ReplicationState};
pub use view::{replication_view, replication_views};
pub use wait::{Wait, progress_detail, wait_step};
