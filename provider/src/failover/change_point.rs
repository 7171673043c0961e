//! Change of recovery point before commit: the replica host restarts the VM from
//! another point; writes since the failover are discarded.

use std::sync::Arc;

use siterecovery_proto::model::{FailoverKind, PointSelector, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::FailoverError;
use super::common::{
    claim, host_name, hosts, protected, record_vm, refuse, reported_point, require_connected, resolve_point, update,
    vm_failover,
};
use crate::jobs::{JobKind, JobRecord, now_ms};
use crate::relationship::{Core, Event, ReplicationState, fail_job, save_job};

const CHANGE_POINT_STEPS: [&str; 1] = ["Restart the VM from another point"];

/// `ChangePoint` RPC.
pub async fn start_change_point(
    state: &Arc<Core>,
    vm: &VmName,
    point: PointSelector,
) -> Result<JobRecord, FailoverError> {
    let rel = protected(state, vm)?;
    rel.state.next(Event::PointChanged).map_err(|e| {
        let hint = if rel.state == ReplicationState::Committed {
            "the failover is committed: its recovery point can no longer be changed".to_string()
        } else {
            format!("only a failed-over VM waiting for commit can change its point (`failover unplanned {vm}` first)")
        };
        refuse(vm, e, &hint)
    })?;
    let hosts = hosts(state)?;
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job = state.protection.jobs.create(&state.store, JobKind::ChangePoint, vm.as_str(), &CHANGE_POINT_STEPS)?;
    job.relationship_id = rel.id.clone();
    let rname = host_name(&hosts, &rel.replica_host_id);
    job.start_step(CHANGE_POINT_STEPS[0], &format!("point {point} on {rname}"), now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let point = match resolve_point(&state, &rel, &point).await {
            Ok(p) => p,
            Err(e) => return fail_job(&state, &mut job, &e.to_string()),
        };
        let cmd = Command::ChangePoint(v1::ChangePoint { vm: rel.vm.clone(), point: point.clone() });
        let res = match state.agents.command(&rel.replica_host_id, cmd, state.protection.config.command_timeout).await {
            Ok(r) => r,
            Err(s) => return fail_job(&state, &mut job, &format!("replica host {rname}: {}", s.message())),
        };
        let point_id = reported_point(&res, &point);
        let before = rel.failover.as_ref().map(|f| f.point_id.clone()).unwrap_or_default();
        let kind = rel.failover.as_ref().map_or(FailoverKind::Unplanned, |f| f.kind);
        record_vm(&state, &res, &rel.replica_host_id, &rel.vm, &[], vm_failover(&rel, kind, &point_id, false, ""));
        if let Err(e) = update(&state, &rel.id, |r| {
            r.state = r.state.next(Event::PointChanged)?;
            if let Some(f) = &mut r.failover {
                f.point_id = point_id.clone();
            }
            Ok(())
        }) {
            return fail_job(&state, &mut job, &e.to_string());
        }
        job.succeed_step(
            CHANGE_POINT_STEPS[0],
            &format!(
                "VM {} restarted on {rname} from point {point_id} (was {before}); writes since the failover discarded",
                rel.vm
            ),
            now_ms(),
        );
        job.succeed(now_ms());
        save_job(&state, &job);
    });
    Ok(ret)
}
