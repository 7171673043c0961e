//! [`Core`]: everything orchestration works with (the store, the relationships and
//! jobs, the agents, the process's shutdown signal), and the job bookkeeping every job
//! task does through it.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::ProtectionCore;
use crate::agents::Agents;
use crate::jobs::{Claim, JobRecord, now_ms};
use crate::store::Store;

/// Everything orchestration works with: the store, the relationships and jobs, the
/// agents, and the process's shutdown signal.
pub struct Core {
    pub store: Arc<Store>,
    pub protection: ProtectionCore,
    pub agents: Arc<dyn Agents>,
    pub shutdown: CancellationToken,
}

/// Claims `vm` for a job.
pub fn claim(state: &Core, vm: &str) -> Result<Claim, Status> {
    state.protection.jobs.claim(vm).map_err(|e| Status::failed_precondition(e.to_string()))
}

pub fn relationship_id() -> String {
    format!("r-{:08x}", rand::random::<u32>())
}

/// Saves a job, logging (not failing) on a store error: the job task goes on.
pub fn save_job(state: &Core, job: &JobRecord) {
    if let Err(e) = state.protection.jobs.save(&state.store, job) {
        tracing::error!(job = %job.id, "cannot record job: {e:#}");
    }
}

pub fn fail_job(state: &Core, job: &mut JobRecord, error: &str) {
    tracing::warn!(job = %job.id, kind = %job.kind, vm = %job.vm, "job failed: {error}");
    job.fail(error, now_ms());
    save_job(state, job);
}
