//! Finalize protection: after the initial replication, waits until the replica host
//! holds a recovery point (bounded by the step timeout, at most ten minutes).

use std::sync::Arc;
use std::time::{Duration, Instant};

use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use crate::jobs::{FinalizeStep, JobKind, now_ms};
use crate::relationship::{Core, fail_job, save_job};

pub(super) async fn run_finalize(state: Arc<Core>, vm: String, rel_id: String) {
    let mut job = match state.protection.jobs.create(&state.store, JobKind::FinalizeProtection, &vm, FinalizeStep::ALL)
    {
        Ok(j) => j,
        Err(e) => return tracing::error!(vm, "cannot create the Finalize protection job: {e:#}"),
    };
    job.relationship_id = rel_id.clone();
    let step = FinalizeStep::CheckRecoveryPoints;
    job.start_step(step, "", now_ms());
    save_job(&state, &job);
    let cfg = state.protection.config.clone();
    let deadline = Instant::now() + cfg.step_timeout.min(Duration::from_secs(600));
    loop {
        let Some(rel) = state.protection.get(&rel_id) else {
            return fail_job(&state, &mut job, &format!("protection of VM {vm} was removed while the job ran"));
        };
        let r = state
            .agents
            .command(&rel.replica_host_id, Command::ListPoints(v1::ListPoints { vm: vm.clone() }), cfg.command_timeout)
            .await;
        match r {
            Ok(res) if !res.points.is_empty() => {
                let latest = res.points.iter().max_by_key(|p| p.created_unix_ms).cloned().unwrap_or_default();
                job.succeed_step(
                    step,
                    &format!("{} recovery point(s) on the replica; latest {}", res.points.len(), latest.id),
                    now_ms(),
                );
                job.succeed(now_ms());
                save_job(&state, &job);
                return;
            }
            Ok(_) => job.set_detail(step, "no recovery point yet; waiting for the first cycle"),
            Err(s) => job.set_detail(step, &format!("replica host: {}; retrying", s.message())),
        }
        save_job(&state, &job);
        if Instant::now() > deadline {
            let why = job.steps[0].detail.clone();
            return fail_job(&state, &mut job, &format!("no recovery point on the replica host in time ({why})"));
        }
        let wait = Duration::from_millis(rel.interval_ms.clamp(500, 10_000));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}
