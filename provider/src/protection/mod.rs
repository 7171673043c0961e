//! Protection of a VM: the jobs that enable, finalize, disable and resync it (online or
//! with an offline initial copy), the operator's reads of recovery points and jobs, and
//! the policies, pairings and networks set up before. The relationships themselves are
//! [`crate::relationship`]; the gRPC handlers are `api::protection`.
//!
//! - [`enable`]: Enable protection (prerequisites, relationship, replica, initial copy).
//! - [`finalize`]: Finalize protection (the first recovery point).
//! - [`offline`]: offline initial replication (export, `protect-import`).
//! - [`unprotect`], [`resync`]: Disable protection and resync.
//! - [`points`]: recovery points on the replica host.
//! - [`settings`]: policies, pairings, networks and mappings.
//! - [`requests`]: the operator's requests as domain types (`TryFrom` the wire).
//! - [`error`]: the typed error, [`ProtectionError`].

pub mod enable;
pub mod error;
pub mod finalize;
pub mod offline;
pub mod points;
pub mod requests;
pub mod resync;
pub mod settings;
pub mod unprotect;

#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use enable::start_protect;
pub use error::ProtectionError;
pub use offline::start_import;
pub use resync::start_resync;
pub use unprotect::start_unprotect;

use crate::jobs::{EnableStep, JobError, JobRecord, Step};
use crate::relationship::Core;
use crate::store::JOBS;

/// Resumes the jobs the restart rule kept running (Enable protection waiting for its
/// initial replication or for an import).
pub fn resume_jobs(state: &Arc<Core>, jobs: Vec<JobRecord>) {
    for job in jobs {
        tracing::info!(job = %job.id, vm = %job.vm, "resuming job after restart");
        if job.running() == Some(Step::Enable(EnableStep::WaitingForImport)) {
            tokio::spawn(offline::wait_import(state.clone(), job));
        } else {
            tokio::spawn(enable::wait_initial(state.clone(), job));
        }
    }
}

/// Every job, oldest first.
pub fn list_jobs(state: &Core) -> Result<Vec<JobRecord>, ProtectionError> {
    Ok(state.store.list::<JobRecord>(JOBS)?)
}

/// One job by id.
pub fn job(state: &Core, id: &str) -> Result<JobRecord, ProtectionError> {
    state.protection.jobs.get(&state.store, id)?.ok_or_else(|| JobError::NotFound(id.to_owned()).into())
}
