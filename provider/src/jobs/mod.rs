//! The job engine: every long operation (Enable/Finalize/Disable protection, resync,
//! the failovers, commit, change of point, cleanup, reverse replication, plan runs) is
//! a job of a [`JobKind`] with the steps of that kind ([`steps`]).
//!
//! - [`record`]: the stored record (pure).
//! - [`restart`]: what becomes of a running job at provider start (pure).
//! - [`Jobs`]: ids, persistence (table `jobs`, key `j-000042`, so key order is creation
//!   order), change notification, and the claims that keep two jobs off one VM.
//! - [`runner::JobRun`]: a running job: claims its VM, records each step's start,
//!   progress, success or failure, and persists on every change.
//!
//! Watchers are woken through one `tokio::sync::watch` counter bumped on every change
//! ([`Jobs::changed`]); they re-read the job they care about.

pub mod kind;
pub mod record;
pub mod restart;
pub mod runner;
pub mod steps;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub use kind::JobKind;
pub use record::{AsStepName, JobRecord, JobState, StepRecord, StepState, now_ms};
pub use restart::{OnRestart, RESTARTED, on_restart, restart_rule};
pub use runner::JobRun;
pub use steps::{
    ChangePointStep, CleanupStep, CommitStep, DisableStep, EnableStep, FinalizeStep, LocalFailoverStep, PlanStep,
    PlannedFailoverStep, ReprotectStep, ResyncStep, Step, TestFailoverStep, UnplannedFailoverStep,
};

use crate::store::{JOBS, META, Store, StoreError};

/// Why a job could not start or be read.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("another protection job is working on VM {0:?} right now (see `job list`)")]
    Busy(String),
    #[error("no job {0:?} (see `job list`)")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Job ids, persistence, change notification and VM claims.
pub struct Jobs {
    seq: Mutex<()>,
    changed: watch::Sender<u64>,
    busy: Arc<Mutex<HashSet<String>>>,
}

const SEQ_KEY: &str = "job_seq";

impl Default for Jobs {
    fn default() -> Self {
        Self::new()
    }
}

impl Jobs {
    pub fn new() -> Self {
        Self { seq: Mutex::new(()), changed: watch::channel(0).0, busy: Arc::default() }
    }

    /// A receiver that changes whenever a job or a relationship changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Wakes every watcher.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Allocates the next id (`j-000001`, ...), durable across restarts.
    pub fn next_id(&self, store: &Store) -> Result<String, StoreError> {
        let _g = lock(&self.seq);
        let n = store.get::<u64>(META, SEQ_KEY)?.unwrap_or(0) + 1;
        store.put(META, SEQ_KEY, &n)?;
        Ok(format!("j-{n:06}"))
    }

    pub fn create<S: AsStepName>(
        &self,
        store: &Store,
        kind: JobKind,
        vm: &str,
        steps: &[S],
    ) -> Result<JobRecord, StoreError> {
        let job = JobRecord::new(self.next_id(store)?, kind, vm, steps, now_ms());
        self.save(store, &job)?;
        Ok(job)
    }

    pub fn save(&self, store: &Store, job: &JobRecord) -> Result<(), StoreError> {
        store.put(JOBS, &job.id, job)?;
        self.notify();
        Ok(())
    }

    pub fn get(&self, store: &Store, id: &str) -> Result<Option<JobRecord>, StoreError> {
        store.get(JOBS, id)
    }

    /// The job `id`, or [`JobError::NotFound`].
    pub fn find(&self, store: &Store, id: &str) -> Result<JobRecord, JobError> {
        self.get(store, id)?.ok_or_else(|| JobError::NotFound(id.to_owned()))
    }

    pub fn list(&self, store: &Store) -> Result<Vec<JobRecord>, StoreError> {
        store.list(JOBS)
    }

    /// Marks `vm` as worked on by a job until the claim is dropped.
    pub fn claim(&self, vm: &str) -> Result<Claim, JobError> {
        if !lock(&self.busy).insert(vm.to_owned()) {
            return Err(JobError::Busy(vm.to_owned()));
        }
        Ok(Claim { busy: self.busy.clone(), vm: vm.to_owned() })
    }

    /// Whether a job is working on `vm` right now.
    pub fn busy(&self, vm: &str) -> bool {
        lock(&self.busy).contains(vm)
    }
}

/// Holds a VM's claim until dropped.
#[derive(Debug)]
pub struct Claim {
    busy: Arc<Mutex<HashSet<String>>>,
    vm: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        lock(&self.busy).remove(&self.vm);
    }
}

/// Applies [`restart_rule`] to every stored job; returns the jobs that keep running.
pub fn recover(store: &Store) -> Result<Vec<JobRecord>, StoreError> {
    let now = now_ms();
    let mut resumed = Vec::new();
    for job in store.list::<JobRecord>(JOBS)? {
        match restart_rule(&job, now) {
            Some(failed) => {
                tracing::warn!(job = %failed.id, kind = %failed.kind, vm = %failed.vm, "{RESTARTED}");
                store.put(JOBS, &failed.id, &failed)?;
            }
            None if job.state == JobState::Running => resumed.push(job),
            None => {}
        }
    }
    Ok(resumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_marks_running_step_and_skips_the_rest() {
        let mut j = JobRecord::new("j-000001".into(), JobKind::EnableProtection, "vm1", &EnableStep::ONLINE, 1);
        j.start_step(EnableStep::CheckPrerequisites, "", 1);
        j.succeed_step(EnableStep::CheckPrerequisites, "", 2);
        j.start_step(EnableStep::CreateRelationship, "", 3);
        j.fail("boom", 9);
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.steps[0].state, StepState::Succeeded);
        assert_eq!(j.steps[1].state, StepState::Failed);
        assert_eq!(j.steps[1].detail, "boom");
        assert_eq!(j.steps[2].state, StepState::Skipped);
        assert_eq!(j.error, "boom");
        assert_eq!(j.ended_unix_ms, 9);
    }

    #[test]
    fn a_claim_keeps_a_second_job_off_the_vm_until_dropped() {
        let jobs = Jobs::new();
        let c = jobs.claim("vm1").expect("first");
        assert!(jobs.busy("vm1"));
        assert!(matches!(jobs.claim("vm1"), Err(JobError::Busy(v)) if v == "vm1"));
        assert!(jobs.claim("vm2").is_ok(), "another VM is free");
        drop(c);
        assert!(!jobs.busy("vm1"));
        assert!(jobs.claim("vm1").is_ok());
    }

    #[test]
    fn stored_shape_keeps_the_words() {
        let j = JobRecord::new("j-000007".into(), JobKind::CommitFailover, "vm1", CommitStep::ALL, 1);
        let v = serde_json::to_value(&j).expect("json");
        assert_eq!(v["kind"], "Commit failover");
        assert_eq!(v["steps"][0]["name"], "Commit on the replica host");
        assert_eq!(v["state"], "running");
        let back: JobRecord = serde_json::from_value(v).expect("back");
        assert_eq!(back, j);
    }

    #[test]
    fn jobs_survive_a_store_reopen_with_the_restart_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kept, lost) = {
            let store = Store::open(dir.path()).expect("open");
            let jobs = Jobs::new();
            let steps = [EnableStep::CheckPrerequisites, EnableStep::InitialReplication];
            let mut a = jobs.create(&store, JobKind::EnableProtection, "vm1", &steps).expect("a");
            a.start_step(EnableStep::CheckPrerequisites, "", 1);
            a.succeed_step(EnableStep::CheckPrerequisites, "", 1);
            a.start_step(EnableStep::InitialReplication, "", 1);
            a.relationship_id = "r-1".into();
            jobs.save(&store, &a).expect("save a");
            let mut b = jobs.create(&store, JobKind::Resync, "vm2", &[ResyncStep::RequestResync]).expect("b");
            b.start_step(ResyncStep::RequestResync, "", 1);
            jobs.save(&store, &b).expect("save b");
            assert_eq!(a.id, "j-000001");
            assert_eq!(b.id, "j-000002");
            (a.id, b.id)
        };
        let store = Store::open(dir.path()).expect("reopen");
        let resumed = recover(&store).expect("recover");
        assert_eq!(resumed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![kept.clone()]);
        let jobs = Jobs::new();
        let b = jobs.find(&store, &lost).expect("b");
        assert_eq!(b.state, JobState::Failed);
        assert_eq!(b.error, RESTARTED);
        assert_eq!(jobs.find(&store, &kept).expect("a").state, JobState::Running);
        // Ids continue after the reopen.
        assert_eq!(jobs.next_id(&store).expect("id"), "j-000003");
    }
}
