//! Job steps that wait on a relationship ("Initial replication", "Resynchronise", a
//! failover's replication steps): they wake on every change of the relationships and
//! jobs, copy progress into the job, and never wait for ever (each has an overall
//! timeout, and fails as soon as its relationship is removed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::{fail_job, save_job};
use super::{Core, RelationshipRecord};
use crate::jobs::{JobRecord, now_ms};

/// How a waiting step sees its relationship.
pub enum Wait {
    Done(String),
    Failed(String),
    Progress { detail: String },
}

/// Waits on the relationship of `job` until `judge` says done or failed, copying
/// progress into the job; fails on timeout or when the relationship goes away.
/// Returns true when the step succeeded.
pub async fn wait_step(
    state: &Arc<Core>,
    job: &mut JobRecord,
    step: &str,
    mut judge: impl FnMut(&RelationshipRecord, bool) -> Wait,
) -> bool {
    let mut rx = state.protection.jobs.subscribe();
    let started = job.steps.iter().find(|s| s.name == step).map(|s| s.started_unix_ms).unwrap_or_else(now_ms);
    let deadline = started + state.protection.config.step_timeout.as_millis() as i64;
    let mut last_save = Instant::now();
    loop {
        let Some(rel) = state.protection.get(&job.relationship_id) else {
            fail_job(state, job, &format!("protection of VM {} was removed while the job ran", job.vm));
            return false;
        };
        let primary_connected = state.agents.connected(&rel.primary_host_id);
        match judge(&rel, primary_connected) {
            Wait::Done(detail) => {
                job.done_bytes = job.total_bytes.max(rel.status.done_bytes);
                job.succeed_step(step, &detail, now_ms());
                save_job(state, job);
                return true;
            }
            Wait::Failed(e) => {
                fail_job(state, job, &e);
                return false;
            }
            Wait::Progress { detail } => {
                let s = &rel.status;
                let changed = job.done_bytes != s.done_bytes
                    || (s.total_bytes > 0 && job.total_bytes != s.total_bytes)
                    || job.steps.iter().any(|x| x.name == step && x.detail != detail);
                if changed && last_save.elapsed() >= Duration::from_millis(500) {
                    job.done_bytes = s.done_bytes;
                    if s.total_bytes > 0 {
                        job.total_bytes = s.total_bytes;
                    }
                    job.rate_bytes_per_sec = rel.rate_bytes_per_sec;
                    job.set_detail(step, &detail);
                    save_job(state, job);
                    last_save = Instant::now();
                }
            }
        }
        if now_ms() > deadline {
            let limit = crate::policy::human_duration(state.protection.config.step_timeout);
            fail_job(
                state,
                job,
                &format!(
                    "{step} did not finish within {limit} (replication is {}); see `vm show {}`",
                    rel.state.as_str(),
                    job.vm
                ),
            );
            return false;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            // The job stays running; the restart rule decides its fate.
            _ = state.shutdown.cancelled() => return false,
        }
    }
}

pub fn progress_detail(rel: &RelationshipRecord, connected: bool, what: &str) -> String {
    let s = &rel.status;
    let mut d = if s.total_bytes > 0 {
        format!(
            "{what} {} of {}",
            siterecovery_proto::model::units::human_size(s.done_bytes),
            siterecovery_proto::model::units::human_size(s.total_bytes)
        )
    } else {
        rel.state.as_str().to_string()
    };
    if !s.error.is_empty() && s.error_recoverable {
        d.push_str(&format!("; retrying after: {}", s.error));
    }
    if !connected {
        d.push_str("; primary host not connected, waiting");
    }
    d
}
