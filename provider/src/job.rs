//! Jobs: the record of a long operation (Enable protection, Finalize protection,
//! Disable protection, Resync, ...) with its steps, progress and outcome.
//!
//! Jobs are persisted (table `jobs`, key `j-000042`, so key order is creation order) on
//! every step change and at most about once a second for progress. Watchers are woken
//! through one `tokio::sync::watch` counter bumped on every change ([`Jobs::changed`]);
//! they re-read the job they care about. At provider start [`recover`] applies the
//! restart rule: a running Enable protection job in its "Initial replication" step keeps
//! running (the agent goes on sending statuses and the job completes from them), and so
//! does one in "Waiting for import" (offline initial replication: it goes on when the
//! operator imports the export); any other running job failed with the provider.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use siterecovery_proto::v1;
use tokio::sync::watch;

use crate::store::{JOBS, META, Store, StoreError};

pub const ENABLE_PROTECTION: &str = "Enable protection";
pub const FINALIZE_PROTECTION: &str = "Finalize protection";
pub const DISABLE_PROTECTION: &str = "Disable protection";
pub const RESYNC: &str = "Resync";
pub const TEST_FAILOVER: &str = "Test failover";
pub const PLANNED_FAILOVER: &str = "Planned failover";
pub const UNPLANNED_FAILOVER: &str = "Unplanned failover";
pub const COMMIT_FAILOVER: &str = "Commit failover";
pub const CHANGE_POINT: &str = "Change recovery point";
pub const CLEANUP_TEST_FAILOVER: &str = "Cleanup test failover";
pub const REVERSE_REPLICATION: &str = "Reverse replication";
pub const LOCAL_FAILOVER: &str = "Local failover detected";
pub const RECOVERY_PLAN: &str = "Recovery plan failover";
/// The step of Enable protection that survives a provider restart.
pub const STEP_INITIAL_REPLICATION: &str = "Initial replication";
/// Offline initial replication: the initial copy goes to a directory on the primary host.
pub const STEP_EXPORT: &str = "Export the initial copy";
/// Offline initial replication: until `protect-import` copied the export into the
/// replica (survives a provider restart).
pub const STEP_WAITING_FOR_IMPORT: &str = "Waiting for import";
pub const RESTARTED: &str = "provider restarted while the job ran";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

/// The wire's job kind of a kind name.
pub fn kind_to_wire(kind: &str) -> v1::JobKind {
    use v1::JobKind as K;
    match kind {
        ENABLE_PROTECTION => K::EnableProtection,
        FINALIZE_PROTECTION => K::FinalizeProtection,
        DISABLE_PROTECTION => K::DisableProtection,
        RESYNC => K::Resync,
        TEST_FAILOVER => K::TestFailover,
        PLANNED_FAILOVER => K::PlannedFailover,
        UNPLANNED_FAILOVER => K::UnplannedFailover,
        COMMIT_FAILOVER => K::CommitFailover,
        CHANGE_POINT => K::ChangePoint,
        CLEANUP_TEST_FAILOVER => K::CleanupTestFailover,
        REVERSE_REPLICATION => K::ReverseReplication,
        LOCAL_FAILOVER => K::LocalFailover,
        RECOVERY_PLAN => K::RecoveryPlan,
        _ => K::Unspecified,
    }
}

/// The kind name (what the CLI prints) of the wire's job kind.
pub fn kind_name(kind: i32) -> &'static str {
    use v1::JobKind as K;
    match K::try_from(kind).unwrap_or(K::Unspecified) {
        K::EnableProtection => ENABLE_PROTECTION,
        K::FinalizeProtection => FINALIZE_PROTECTION,
        K::DisableProtection => DISABLE_PROTECTION,
        K::Resync => RESYNC,
        K::TestFailover => TEST_FAILOVER,
        K::PlannedFailover => PLANNED_FAILOVER,
        K::UnplannedFailover => UNPLANNED_FAILOVER,
        K::CommitFailover => COMMIT_FAILOVER,
        K::ChangePoint => CHANGE_POINT,
        K::CleanupTestFailover => CLEANUP_TEST_FAILOVER,
        K::ReverseReplication => REVERSE_REPLICATION,
        K::LocalFailover => LOCAL_FAILOVER,
        K::RecoveryPlan => RECOVERY_PLAN,
        K::Unspecified => "unknown job",
    }
}

impl JobState {
    pub fn to_wire(self) -> v1::JobState {
        match self {
            JobState::Running => v1::JobState::Running,
            JobState::Succeeded => v1::JobState::Succeeded,
            JobState::Failed => v1::JobState::Failed,
        }
    }

    /// The word of the wire's job state.
    pub fn name_of(v: i32) -> &'static str {
        match v1::JobState::try_from(v) {
            Ok(v1::JobState::Running) => "running",
            Ok(v1::JobState::Succeeded) => "succeeded",
            Ok(v1::JobState::Failed) => "failed",
            _ => "unknown",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

impl StepState {
    pub fn to_wire(self) -> v1::StepState {
        match self {
            StepState::Pending => v1::StepState::Pending,
            StepState::Running => v1::StepState::Running,
            StepState::Succeeded => v1::StepState::Succeeded,
            StepState::Failed => v1::StepState::Failed,
            StepState::Skipped => v1::StepState::Skipped,
        }
    }

    /// The word of the wire's step state.
    pub fn name_of(v: i32) -> &'static str {
        match v1::StepState::try_from(v) {
            Ok(v1::StepState::Pending) => "pending",
            Ok(v1::StepState::Running) => "running",
            Ok(v1::StepState::Succeeded) => "succeeded",
            Ok(v1::StepState::Failed) => "failed",
            Ok(v1::StepState::Skipped) => "skipped",
            _ => "unknown",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StepRecord {
    pub name: String,
    pub state: StepState,
    pub detail: String,
    pub started_unix_ms: i64,
    pub ended_unix_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub kind: String,
    pub vm: String,
    pub state: JobState,
    pub steps: Vec<StepRecord>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_sec: u64,
    pub created_unix_ms: i64,
    pub ended_unix_ms: i64,
    pub error: String,
    /// The relationship the job acts on, once known.
    #[serde(default)]
    pub relationship_id: String,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl JobRecord {
    pub fn new(id: String, kind: &str, vm: &str, steps: &[&str], now: i64) -> Self {
        Self {
            id,
            kind: kind.into(),
            vm: vm.into(),
            state: JobState::Running,
            steps: steps
                .iter()
                .map(|n| StepRecord {
                    name: (*n).into(),
                    state: StepState::Pending,
                    detail: String::new(),
                    started_unix_ms: 0,
                    ended_unix_ms: 0,
                })
                .collect(),
            done_bytes: 0,
            total_bytes: 0,
            rate_bytes_per_sec: 0,
            created_unix_ms: now,
            ended_unix_ms: 0,
            error: String::new(),
            relationship_id: String::new(),
        }
    }

    /// The step now running, if any.
    pub fn running_step(&self) -> Option<&StepRecord> {
        self.steps.iter().find(|s| s.state == StepState::Running)
    }

    fn step_mut(&mut self, name: &str) -> Option<&mut StepRecord> {
        self.steps.iter_mut().find(|s| s.name == name)
    }

    pub fn start_step(&mut self, name: &str, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Running;
            s.started_unix_ms = now;
            s.detail = detail.into();
        }
    }

    pub fn set_detail(&mut self, name: &str, detail: &str) {
        if let Some(s) = self.step_mut(name) {
            s.detail = detail.into();
        }
    }

    pub fn succeed_step(&mut self, name: &str, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Succeeded;
            s.ended_unix_ms = now;
            if !detail.is_empty() {
                s.detail = detail.into();
            }
        }
    }

    /// Marks a step skipped (with why).
    pub fn skip_step(&mut self, name: &str, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Skipped;
            s.started_unix_ms = now;
            s.ended_unix_ms = now;
            s.detail = detail.into();
        }
    }

    /// Ends a step as failed without ending the job (a plan goes on with the other VMs
    /// of a group before it fails).
    pub fn fail_step(&mut self, name: &str, detail: &str, now: i64) {
        if let Some(s) = self.step_mut(name) {
            s.state = StepState::Failed;
            if s.started_unix_ms == 0 {
                s.started_unix_ms = now;
            }
            s.ended_unix_ms = now;
            s.detail = detail.into();
        }
    }

    /// Ends the job as succeeded (pending steps, if any, are skipped).
    pub fn succeed(&mut self, now: i64) {
        for s in &mut self.steps {
            if s.state == StepState::Pending {
                s.state = StepState::Skipped;
            }
        }
        self.state = JobState::Succeeded;
        self.ended_unix_ms = now;
    }

    /// Ends the job as failed: the running step (or the first pending one) fails with
    /// `error`, the later ones are skipped.
    pub fn fail(&mut self, error: &str, now: i64) {
        let idx = self.steps.iter().position(|s| s.state == StepState::Running).or_else(|| {
            // A step that already failed (a plan's VM) is the failure's place.
            if self.steps.iter().any(|s| s.state == StepState::Failed) {
                None
            } else {
                self.steps.iter().position(|s| s.state == StepState::Pending)
            }
        });
        if let Some(i) = idx {
            let s = &mut self.steps[i];
            s.state = StepState::Failed;
            if s.started_unix_ms == 0 {
                s.started_unix_ms = now;
            }
            s.ended_unix_ms = now;
            s.detail = if s.detail.is_empty() { error.into() } else { format!("{}; {error}", s.detail) };
        }
        for s in &mut self.steps {
            if s.state == StepState::Pending {
                s.state = StepState::Skipped;
            }
        }
        self.state = JobState::Failed;
        self.error = error.into();
        self.ended_unix_ms = now;
    }

    pub fn to_proto(&self) -> v1::Job {
        v1::Job {
            id: self.id.clone(),
            kind: kind_to_wire(&self.kind).into(),
            vm: self.vm.clone(),
            state: self.state.to_wire().into(),
            steps: self
                .steps
                .iter()
                .map(|s| v1::JobStep {
                    name: s.name.clone(),
                    state: s.state.to_wire().into(),
                    detail: s.detail.clone(),
                    started_unix_ms: s.started_unix_ms,
                    ended_unix_ms: s.ended_unix_ms,
                })
                .collect(),
            done_bytes: self.done_bytes,
            total_bytes: self.total_bytes,
            rate_bytes_per_sec: self.rate_bytes_per_sec,
            created_unix_ms: self.created_unix_ms,
            ended_unix_ms: self.ended_unix_ms,
            error: self.error.clone(),
        }
    }
}

/// The restart rule for one job read at provider start: `Some(updated)` when it must
/// be rewritten (it failed with the provider), `None` when it stays as it is.
pub fn restart_rule(job: &JobRecord, now: i64) -> Option<JobRecord> {
    if job.state != JobState::Running {
        return None;
    }
    let resumable = job.kind == ENABLE_PROTECTION
        && job.running_step().is_some_and(|s| s.name == STEP_INITIAL_REPLICATION || s.name == STEP_WAITING_FOR_IMPORT)
        && !job.relationship_id.is_empty();
    if resumable {
        return None;
    }
    let mut j = job.clone();
    j.fail(RESTARTED, now);
    Some(j)
}

/// Job ids, persistence and change notification.
pub struct Jobs {
    seq: Mutex<()>,
    changed: watch::Sender<u64>,
}

const SEQ_KEY: &str = "job_seq";

impl Default for Jobs {
    fn default() -> Self {
        Self::new()
    }
}

impl Jobs {
    pub fn new() -> Self {
        Self { seq: Mutex::new(()), changed: watch::channel(0).0 }
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
        let _g = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        let n = store.get::<u64>(META, SEQ_KEY)?.unwrap_or(0) + 1;
        store.put(META, SEQ_KEY, &n)?;
        Ok(format!("j-{n:06}"))
    }

    pub fn create(&self, store: &Store, kind: &str, vm: &str, steps: &[&str]) -> Result<JobRecord, StoreError> {
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

    fn enable(step_running: usize) -> JobRecord {
        let mut j = JobRecord::new(
            "j-000001".into(),
            ENABLE_PROTECTION,
            "vm1",
            &[
                "Check prerequisites",
                "Create replication relationship",
                "Start initial replication",
                STEP_INITIAL_REPLICATION,
            ],
            1,
        );
        for i in 0..step_running {
            let n = j.steps[i].name.clone();
            j.start_step(&n, "", 1);
            j.succeed_step(&n, "", 2);
        }
        let n = j.steps[step_running].name.clone();
        j.start_step(&n, "", 3);
        j.relationship_id = "r-abc".into();
        j
    }

    #[test]
    fn fail_marks_running_step_and_skips_the_rest() {
        let mut j = enable(1);
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
    fn restart_rule_keeps_waiting_for_import_but_not_export() {
        let mut j = JobRecord::new(
            "j-000002".into(),
            ENABLE_PROTECTION,
            "vm1",
            &[
                "Check prerequisites",
                "Create replication relationship",
                STEP_EXPORT,
                STEP_WAITING_FOR_IMPORT,
                STEP_INITIAL_REPLICATION,
            ],
            1,
        );
        j.relationship_id = "r-abc".into();
        j.start_step(STEP_EXPORT, "", 3);
        let failed = restart_rule(&j, 5).expect("an interrupted export fails");
        assert_eq!(failed.error, RESTARTED);
        j.succeed_step(STEP_EXPORT, "", 4);
        j.start_step(STEP_WAITING_FOR_IMPORT, "", 4);
        assert_eq!(restart_rule(&j, 5), None);
    }

    #[test]
    fn restart_rule_keeps_only_initial_replication() {
        assert_eq!(restart_rule(&enable(3), 5), None);
        let failed = restart_rule(&enable(2), 5).expect("failed");
        assert_eq!(failed.state, JobState::Failed);
        assert_eq!(failed.error, RESTARTED);
        let mut done = enable(3);
        done.succeed(4);
        assert_eq!(restart_rule(&done, 5), None);
        let mut resync = JobRecord::new("j-2".into(), RESYNC, "vm1", &["Request resync", "Resynchronise"], 1);
        resync.start_step("Resynchronise", "", 1);
        assert!(restart_rule(&resync, 5).is_some());
    }

    #[test]
    fn jobs_survive_a_store_reopen_with_the_restart_rule() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (kept, lost) = {
            let store = Store::open(dir.path()).expect("open");
            let jobs = Jobs::new();
            let mut a = jobs
                .create(&store, ENABLE_PROTECTION, "vm1", &["Check prerequisites", STEP_INITIAL_REPLICATION])
                .expect("a");
            a.start_step("Check prerequisites", "", 1);
            a.succeed_step("Check prerequisites", "", 1);
            a.start_step(STEP_INITIAL_REPLICATION, "", 1);
            a.relationship_id = "r-1".into();
            jobs.save(&store, &a).expect("save a");
            let mut b = jobs.create(&store, RESYNC, "vm2", &["Request resync"]).expect("b");
            b.start_step("Request resync", "", 1);
            jobs.save(&store, &b).expect("save b");
            assert_eq!(a.id, "j-000001");
            assert_eq!(b.id, "j-000002");
            (a.id, b.id)
        };
        let store = Store::open(dir.path()).expect("reopen");
        let resumed = recover(&store).expect("recover");
        assert_eq!(resumed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![kept.clone()]);
        let jobs = Jobs::new();
        let b = jobs.get(&store, &lost).expect("get").expect("b");
        assert_eq!(b.state, JobState::Failed);
        assert_eq!(b.error, RESTARTED);
        assert_eq!(jobs.get(&store, &kept).expect("get").expect("a").state, JobState::Running);
        // Ids continue after the reopen.
        assert_eq!(jobs.next_id(&store).expect("id"), "j-000003");
    }
}
