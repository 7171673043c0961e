//! Failover orchestration: test, planned and unplanned failover, commit, change of
//! recovery point, cleanup of a test failover, reverse replication (reprotect), and
//! failovers an agent made on its own while the provider was down.
//!
//! Every operation is a job. Refusals (wrong state, host not connected) are checked
//! before the job task starts and returned as a [`FailoverError`] (classified: failed
//! precondition for state, unavailable for a missing host); the rest runs in a task.
//! Requests arrive in domain types ([`request`]).
//!
//! Command sequences to the agents:
//! - test: `Failover{test}` to the replica host (a `V-test` VM on an overlay over the
//!   point; replication goes on); cleanup: `CleanupTestFailover` to the replica host.
//! - planned: `PrepareFailover` to the primary host (VM stopped, last log shipped; its
//!   result names the last acknowledged point), `Failover{planned, point}` to the
//!   replica host (committed at once), then a Reverse replication job.
//! - unplanned: optionally `StopVm` to the primary host (best effort), `Failover{point}`
//!   to the replica host; then `ChangePoint` / `CommitFailover` to the replica host.
//! - reprotect: `CommitFailover` to the new primary when not committed yet,
//!   `PrepareReplica{adopt_vm_disks}` to the former primary (its disks become the
//!   replica), `StartReplication{resync_initial}` to the new primary; a new relationship
//!   with the roles swapped replaces the old one.

//!
//! Files: [`request`] (wire → domain), [`error`], [`common`] (shared helpers),
//! [`start`] (checks, the first step, the replica start planned and unplanned share),
//! [`test_failover`], [`planned`], [`unplanned`], [`commit`], [`change_point`],
//! [`cleanup`], [`reprotect`], [`inventory`] (failovers an agent made on its own).

use std::time::Duration;

use siterecovery_proto::model::PointSelector;

use crate::inventory::VmRecord;
use crate::jobs::{JobKind, JobRecord, JobState};
use crate::network::{Reservation, TestNetwork};
use crate::relationship::{Core, RelationshipRecord};

pub mod change_point;
pub mod cleanup;
pub mod commit;
pub(crate) mod common;
pub mod error;
pub mod inventory;
pub mod planned;
pub mod reprotect;
pub mod request;
pub mod start;
pub mod test_failover;
pub mod unplanned;

pub use change_point::start_change_point;
pub use cleanup::start_cleanup;
pub use commit::start_commit;
pub(crate) use common::{prepare_primary, stop_primary};
pub use error::FailoverError;
pub use inventory::on_inventory;
pub use reprotect::start_reprotect;
pub use request::{ChangePoint, StartFailover};
pub use start::{start_failover, start_vm_failover};

/// The kind of a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverType {
    Test,
    Planned,
    Unplanned,
}

impl FailoverType {
    /// The wire's `FailoverKind` (local failovers are not requested, only reported).
    pub fn from_wire(v: i32) -> Option<Self> {
        match siterecovery_proto::model::FailoverKind::try_from(v).ok()? {
            siterecovery_proto::model::FailoverKind::Test => Some(Self::Test),
            siterecovery_proto::model::FailoverKind::Planned => Some(Self::Planned),
            siterecovery_proto::model::FailoverKind::Unplanned => Some(Self::Unplanned),
            siterecovery_proto::model::FailoverKind::Local => None,
        }
    }

    pub fn to_wire(self) -> i32 {
        use siterecovery_proto::model::FailoverKind as K;
        i32::from(match self {
            Self::Test => K::Test,
            Self::Planned => K::Planned,
            Self::Unplanned => K::Unplanned,
        })
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "test" => Self::Test,
            "planned" => Self::Planned,
            "unplanned" => Self::Unplanned,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Planned => "planned",
            Self::Unplanned => "unplanned",
        }
    }

    fn job_kind(self) -> JobKind {
        match self {
            Self::Test => JobKind::TestFailover,
            Self::Planned => JobKind::PlannedFailover,
            Self::Unplanned => JobKind::UnplannedFailover,
        }
    }

    fn steps(self) -> &'static [&'static str] {
        match self {
            Self::Test => &[start::CHECK, test_failover::START_TEST_VM],
            Self::Planned => {
                &[start::CHECK, planned::SHUT_DOWN, start::START_ON_REPLICA, planned::COMMIT, planned::START_REVERSE]
            }
            Self::Unplanned => &[start::CHECK, unplanned::SHUT_DOWN, start::START_ON_REPLICA],
        }
    }
}

/// What a failover is asked to do.
#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub kind: FailoverType,
    pub point: PointSelector,
    pub test_network: TestNetwork,
    /// Unplanned: try to stop the primary VM first.
    pub shutdown_primary: bool,
    /// Recovery plans: the plan's shutdown step already prepared (planned: the point it
    /// returned) or stopped (unplanned) the primary.
    pub prepared: Option<String>,
}

/// Reserves addresses for `vm`; the other VMs' relationships hold theirs.
pub(crate) fn reserve_for(state: &Core, vm: &VmRecord) -> Result<Vec<Reservation>, crate::addresses::AddressError> {
    let others: Vec<RelationshipRecord> =
        state.protection.all().into_iter().filter(|r| vm.name != r.vm.as_str()).collect();
    crate::addresses::reserve_addresses(&state.store, vm, others.iter().flat_map(|r| r.addresses.iter()))
}

/// Waits until job `id` ends; the job as it ended.
pub(crate) async fn wait_job_end(state: &Core, id: &str) -> Option<JobRecord> {
    let mut rx = state.protection.jobs.subscribe();
    loop {
        match state.protection.jobs.get(&state.store, id) {
            Ok(Some(j)) if j.state != JobState::Running => return Some(j),
            Ok(Some(_)) => {}
            _ => return None,
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = state.shutdown.cancelled() => return None,
        }
    }
}

#[cfg(test)]
mod tests;
