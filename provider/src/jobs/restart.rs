//! The restart rule: what becomes of a job that was running when the provider stopped.
//!
//! Only the steps that wait on the agents keep going: Enable protection in "Initial
//! replication" (the agent goes on sending statuses and the job completes from them)
//! or "Waiting for import" (offline initial replication goes on when the operator
//! imports the export). Every other running job failed with the provider: its task,
//! and whatever it was waiting for, is gone.

use super::kind::JobKind;
use super::record::{JobRecord, JobState};
use super::steps::{EnableStep, Step};

/// The error of a job the restart rule fails.
pub const RESTARTED: &str = "provider restarted while the job ran";

/// What happens to a running job at provider start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRestart {
    /// Its task starts again from the step it was in.
    Resume,
    /// It ends as failed with [`RESTARTED`].
    Fail,
}

/// The rule, keyed on the kind and the running step (`None`: between steps, or a step
/// that is not one of the kind's).
pub fn on_restart(kind: JobKind, step: Option<&Step>) -> OnRestart {
    match (kind, step) {
        (
            JobKind::EnableProtection,
            Some(Step::Enable(EnableStep::InitialReplication | EnableStep::WaitingForImport)),
        ) => OnRestart::Resume,
        _ => OnRestart::Fail,
    }
}

/// The restart rule for one job read at provider start: `Some(updated)` when it must
/// be rewritten (it failed with the provider), `None` when it stays as it is.
pub fn restart_rule(job: &JobRecord, now: i64) -> Option<JobRecord> {
    if job.state != JobState::Running {
        return None;
    }
    // A resumed job waits on its relationship: without one there is nothing to wait on.
    let resume = on_restart(job.kind, job.running().as_ref()) == OnRestart::Resume && !job.relationship_id.is_empty();
    if resume {
        return None;
    }
    let mut j = job.clone();
    j.fail(RESTARTED, now);
    Some(j)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::record::StepState;
    use crate::jobs::steps::PlanStep;

    #[test]
    fn only_enable_waiting_on_the_agents_resumes_every_other_step_fails() {
        for kind in JobKind::ALL {
            for step in Step::all_of(kind) {
                let want = matches!(
                    step,
                    Step::Enable(EnableStep::InitialReplication) | Step::Enable(EnableStep::WaitingForImport)
                );
                let got = on_restart(kind, Some(&step));
                assert_eq!(got == OnRestart::Resume, want, "{kind} / {}", step.name());
            }
            assert_eq!(on_restart(kind, None), OnRestart::Fail, "{kind} between steps");
        }
        // A step of another kind never resumes a job.
        assert_eq!(on_restart(JobKind::Resync, Some(&Step::Enable(EnableStep::InitialReplication))), OnRestart::Fail);
    }

    /// A job of `kind` with its steps `0..running` done and `running` in progress.
    fn job_at(kind: JobKind, steps: &[Step], running: usize) -> JobRecord {
        let names: Vec<String> = steps.iter().map(|s| s.name().into_owned()).collect();
        let mut j = JobRecord::new("j-000001".into(), kind, "vm1", &names, 1);
        for n in &names[..running] {
            j.start_step(n, "", 1);
            j.succeed_step(n, "", 2);
        }
        j.start_step(&names[running], "", 3);
        j.relationship_id = "r-0000abcd".into();
        j
    }

    #[test]
    fn a_job_interrupted_at_each_step_of_each_kind() {
        for kind in JobKind::ALL {
            let steps = Step::all_of(kind);
            for (i, step) in steps.iter().enumerate() {
                let j = job_at(kind, &steps, i);
                match (on_restart(kind, Some(step)), restart_rule(&j, 9)) {
                    (OnRestart::Resume, None) => {}
                    (OnRestart::Fail, Some(f)) => {
                        assert_eq!(f.state, JobState::Failed, "{kind} / {}", step.name());
                        assert_eq!(f.error, RESTARTED);
                        assert_eq!(f.steps[i].state, StepState::Failed);
                        assert!(f.steps[..i].iter().all(|s| s.state == StepState::Succeeded));
                        assert!(f.steps[i + 1..].iter().all(|s| s.state == StepState::Skipped));
                        assert_eq!(f.ended_unix_ms, 9);
                    }
                    (want, got) => panic!("{kind} / {}: rule {want:?}, job {got:?}", step.name()),
                }
            }
        }
    }

    #[test]
    fn finished_jobs_stay_and_a_resumable_step_without_relationship_fails() {
        let steps = Step::all_of(JobKind::EnableProtection);
        let at = steps.iter().position(|s| *s == Step::Enable(EnableStep::InitialReplication)).expect("step");
        let mut done = job_at(JobKind::EnableProtection, &steps, at);
        done.succeed(4);
        assert_eq!(restart_rule(&done, 5), None);
        let mut orphan = job_at(JobKind::EnableProtection, &steps, at);
        orphan.relationship_id.clear();
        assert!(restart_rule(&orphan, 5).is_some());
        // A plan between two stages (no step running) fails.
        let mut plan = JobRecord::new("j-2".into(), JobKind::RecoveryPlan, "dc", &[PlanStep::Shutdown], 1);
        plan.relationship_id = "r-1".into();
        assert!(restart_rule(&plan, 5).is_some());
    }
}
