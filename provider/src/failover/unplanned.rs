//! Unplanned failover: optionally a best-effort `StopVm` to the primary host, then the
//! replica starts the VM from the chosen point; commit or change of point follow.

use super::common::{abort, resolve_point, stop_primary};
use super::start::{Run, START_ON_REPLICA, failover_done, start_on_replica, started_text};
use crate::jobs::now_ms;

pub(crate) const SHUT_DOWN: &str = "Shut down the primary VM (best effort)";

/// Runs the job's steps after the check; false when the job failed.
pub(crate) async fn run(run: &mut Run) -> bool {
    let (vm, pname, rname) = (run.rel.vm.clone(), run.pname.clone(), run.rname.clone());
    if run.opts.prepared.is_some() {
        run.job.skip_step(SHUT_DOWN, "done by the plan's shutdown step", now_ms());
    } else if !run.opts.shutdown_primary {
        run.job.skip_step(SHUT_DOWN, "not asked (--shutdown-primary)", now_ms());
    } else {
        run.job.start_step(SHUT_DOWN, &format!("on {pname}"), now_ms());
        run.save();
        let detail = stop_primary(&run.state, &run.rel, &pname).await;
        run.job.succeed_step(SHUT_DOWN, &detail, now_ms());
    }
    run.save();
    let point = match resolve_point(&run.state, &run.rel, &run.opts.point).await {
        Ok(p) => p,
        Err(e) => {
            abort(&run.state, &run.rel.id);
            run.fail(&e.to_string());
            return false;
        }
    };
    run.job.start_step(START_ON_REPLICA, &format!("on {rname} from point {point}"), now_ms());
    run.save();
    let Some((point_id, rec)) = start_on_replica(run, &point, &point, false).await else { return false };
    if !failover_done(run, &point_id, false) {
        return false;
    }
    let text = started_text(run, &point_id, rec.as_ref());
    run.job.succeed_step(
        START_ON_REPLICA,
        &format!(
            "{text}; not protected: `failover change-point {vm} --point ID` or `failover commit {vm}`, then `reprotect {vm}`"
        ),
        now_ms(),
    );
    true
}
