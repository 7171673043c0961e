//! Planned failover: the primary stops and ships its last log (`PrepareFailover`), the
//! replica starts the VM from the latest point and the failover is committed at once,
//! then reverse replication starts.

use siterecovery_proto::model::VmName;

use super::common::{abort, prepare_primary};
use super::start::{Run, START_ON_REPLICA, failover_done, start_on_replica, started_text};
use crate::jobs::{Claim, now_ms};

pub(crate) const SHUT_DOWN: &str = "Shut down the primary VM and ship its last changes";
pub(crate) const COMMIT: &str = "Commit";
pub(crate) const START_REVERSE: &str = "Start reverse replication";

/// Runs the job's steps after the check; false when the job failed.
pub(crate) async fn run(run: &mut Run, claim: Claim) -> bool {
    let (vm, pname, rname) = (run.rel.vm.clone(), run.pname.clone(), run.rname.clone());
    let point = match run.opts.prepared.clone() {
        Some(p) => {
            run.job.start_step(SHUT_DOWN, "", now_ms());
            run.job.succeed_step(SHUT_DOWN, &format!("done by the plan's shutdown step; last point {p}"), now_ms());
            p
        }
        None => {
            run.job.start_step(SHUT_DOWN, &format!("on {pname}"), now_ms());
            run.save();
            match prepare_primary(&run.state, &run.rel, &pname).await {
                Ok(p) => {
                    run.job.succeed_step(
                        SHUT_DOWN,
                        &format!("VM {vm} stopped on {pname} (writes refused), every log shipped; last acknowledged point {p}"),
                        now_ms(),
                    );
                    p
                }
                Err(e) => {
                    abort(&run.state, &run.rel.id);
                    run.fail(&format!(
                        "{e}; the VM may be stopped there: retry `failover planned {vm}`, or `failover unplanned {vm}`"
                    ));
                    return false;
                }
            }
        }
    };
    run.job.start_step(START_ON_REPLICA, &format!("on {rname} from point {point}"), now_ms());
    run.save();
    // The primary is drained, so the replica's latest point holds every acknowledged
    // write; asking for it (not the point the primary reported, which a late status
    // could make stale) never goes back in time.
    let Some((point_id, rec)) = start_on_replica(run, "latest", &point, true).await else { return false };
    run.job.succeed_step(START_ON_REPLICA, &started_text(run, &point_id, rec.as_ref()), now_ms());
    run.job.start_step(COMMIT, "", now_ms());
    if !failover_done(run, &point_id, true) {
        return false;
    }
    run.job.succeed_step(COMMIT, "committed: no acknowledged write lost", now_ms());
    run.save();
    drop(claim);
    run.job.start_step(START_REVERSE, "", now_ms());
    let detail = match VmName::new(vm.as_str()) {
        Ok(name) => match super::reprotect::start_reprotect(&run.state, &name).await {
            Ok(j) => format!("job {} ({}): {rname} → {pname}", j.id, j.kind),
            Err(e) => format!("not started: {e}; run `reprotect {vm}`"),
        },
        Err(e) => format!("not started: {e}; run `reprotect {vm}`"),
    };
    run.job.succeed_step(START_REVERSE, &detail, now_ms());
    true
}
