//! A running job: the record, where it is persisted, and the claim on its VM.
//!
//! Every change of a step is persisted at once (watchers see it); progress is written
//! by the caller at its own pace through [`JobRun::save`]. A job task owns its
//! `JobRun`; dropping it releases the VM.

use std::sync::Arc;

use super::record::{AsStepName, JobRecord, now_ms};
use super::{Claim, JobKind, Jobs};
use crate::store::{Store, StoreError};

pub struct JobRun {
    store: Arc<Store>,
    jobs: Arc<Jobs>,
    job: JobRecord,
    claim: Option<Claim>,
}

impl JobRun {
    /// Creates and persists a job of `kind` on `vm` holding `claim` (if any).
    pub fn create<S: AsStepName>(
        store: &Arc<Store>,
        jobs: &Arc<Jobs>,
        kind: JobKind,
        vm: &str,
        steps: &[S],
        claim: Option<Claim>,
    ) -> Result<Self, StoreError> {
        let job = jobs.create(store, kind, vm, steps)?;
        Ok(Self { store: store.clone(), jobs: jobs.clone(), job, claim })
    }

    /// Takes up a stored job again (after a restart, or one another task moved on).
    pub fn resume(store: &Arc<Store>, jobs: &Arc<Jobs>, job: JobRecord) -> Self {
        Self { store: store.clone(), jobs: jobs.clone(), job, claim: None }
    }

    pub fn record(&self) -> &JobRecord {
        &self.job
    }

    /// The record, to change fields the steps do not cover (progress, relationship).
    pub fn record_mut(&mut self) -> &mut JobRecord {
        &mut self.job
    }

    pub fn id(&self) -> &str {
        &self.job.id
    }

    /// Persists the record, logging (not failing) on a store error: the job goes on.
    pub fn save(&self) {
        if let Err(e) = self.jobs.save(&self.store, &self.job) {
            tracing::error!(job = %self.job.id, "cannot record job: {e:#}");
        }
    }

    pub fn start(&mut self, step: impl AsStepName, detail: &str) {
        self.job.start_step(step, detail, now_ms());
        self.save();
    }

    pub fn detail(&mut self, step: impl AsStepName, detail: &str) {
        self.job.set_detail(step, detail);
        self.save();
    }

    pub fn succeed(&mut self, step: impl AsStepName, detail: &str) {
        self.job.succeed_step(step, detail, now_ms());
        self.save();
    }

    pub fn skip(&mut self, step: impl AsStepName, detail: &str) {
        self.job.skip_step(step, detail, now_ms());
        self.save();
    }

    /// Ends one step as failed and lets the job go on (a plan's VM).
    pub fn fail_step(&mut self, step: impl AsStepName, detail: &str) {
        self.job.fail_step(step, detail, now_ms());
        self.save();
    }

    /// Ends the job as failed at its running step.
    pub fn fail(&mut self, error: &str) {
        tracing::warn!(job = %self.job.id, kind = %self.job.kind, vm = %self.job.vm, "job failed: {error}");
        self.job.fail(error, now_ms());
        self.save();
    }

    /// Ends the job as succeeded.
    pub fn finish(&mut self) {
        self.job.succeed(now_ms());
        self.save();
    }

    /// Lets other jobs work on the VM while this one goes on waiting.
    pub fn release(&mut self) {
        self.claim = None;
    }

    /// Re-reads the record from the store (another task may have moved it on).
    pub fn reload(&mut self) -> Result<(), StoreError> {
        if let Some(j) = self.jobs.get(&self.store, &self.job.id)? {
            self.job = j;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::{JobState, ResyncStep, StepState};

    #[test]
    fn every_step_change_is_persisted_and_the_claim_released_at_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("open"));
        let jobs = Arc::new(Jobs::new());
        let claim = jobs.claim("vm1").expect("claim");
        let mut run =
            JobRun::create(&store, &jobs, JobKind::Resync, "vm1", ResyncStep::ALL, Some(claim)).expect("create");
        let id = run.id().to_owned();
        let stored = || jobs.find(&store, &id).expect("stored");
        run.start(ResyncStep::RequestResync, "hv1");
        assert_eq!(stored().steps[0].state, StepState::Running);
        run.succeed(ResyncStep::RequestResync, "accepted");
        assert_eq!(stored().steps[0].detail, "accepted");
        run.start(ResyncStep::Resynchronise, "");
        assert!(jobs.busy("vm1"));
        run.release();
        assert!(!jobs.busy("vm1"));
        run.fail("broken");
        let j = stored();
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.steps[1].state, StepState::Failed);
    }
}
