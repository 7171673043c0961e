//! Commit of an unplanned failover: the replica host keeps the chosen point and the
//! writes since; the other recovery points are discarded.

use std::sync::Arc;

use siterecovery_proto::model::{FailoverKind, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::FailoverError;
use super::common::{claim, host_name, hosts, protected, record_vm, refuse, require_connected, update, vm_failover};
use crate::jobs::{JobKind, JobRecord, now_ms};
use crate::relationship::{Core, Event, RelationshipRecord, ReplicationState, fail_job, save_job};

const COMMIT_STEPS: [&str; 1] = ["Commit on the replica host"];

/// `CommitFailover` RPC.
pub async fn start_commit(state: &Arc<Core>, vm: &VmName) -> Result<JobRecord, FailoverError> {
    let rel = protected(state, vm)?;
    rel.state.next(Event::Committed).map_err(|e| {
        let hint = match rel.state {
            ReplicationState::Committed => "the failover is already committed".to_string(),
            ReplicationState::FailoverInProgress => "wait for the failover job to end".into(),
            _ => format!("VM {vm} has no failover waiting for commit (`failover unplanned {vm}` first)"),
        };
        refuse(vm, e, &hint)
    })?;
    let hosts = hosts(state)?;
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job = state.protection.jobs.create(&state.store, JobKind::CommitFailover, vm.as_str(), &COMMIT_STEPS)?;
    job.relationship_id = rel.id.clone();
    let rname = host_name(&hosts, &rel.replica_host_id);
    job.start_step(COMMIT_STEPS[0], &rname, now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        match commit_on_replica(&state, &rel).await {
            Ok(()) => {
                let point = rel.failover.as_ref().map(|f| f.point_id.clone()).unwrap_or_default();
                job.succeed_step(
                    COMMIT_STEPS[0],
                    &format!(
                        "VM {vm} keeps point {point} and the writes since on {rname}; the other recovery points are \
                         discarded; protect it again with `reprotect {vm}`",
                        vm = rel.vm
                    ),
                    now_ms(),
                );
                job.succeed(now_ms());
                save_job(&state, &job);
            }
            Err(e) => fail_job(&state, &mut job, &e.to_string()),
        }
    });
    Ok(ret)
}

/// `CommitFailover` to the replica host, then the relationship records the commit.
pub(crate) async fn commit_on_replica(state: &Core, rel: &RelationshipRecord) -> Result<(), FailoverError> {
    let cmd = Command::CommitFailover(v1::CommitFailover { vm: rel.vm.clone() });
    let res = state
        .agents
        .command(&rel.replica_host_id, cmd, state.protection.config.command_timeout)
        .await
        .map_err(|source| FailoverError::Agent { host: "replica host".into(), source })?;
    let point = rel.failover.as_ref().map(|f| f.point_id.clone()).unwrap_or_default();
    let kind = rel.failover.as_ref().map_or(FailoverKind::Unplanned, |f| f.kind);
    let nics: Vec<v1::Nic> = Vec::new();
    record_vm(state, &res, &rel.replica_host_id, &rel.vm, &nics, vm_failover(rel, kind, &point, true, ""));
    update(state, &rel.id, |r| {
        r.state = r.state.next(Event::Committed)?;
        if let Some(f) = &mut r.failover {
            f.committed_unix_ms = now_ms();
        }
        Ok(())
    })
    .map(|_| ())
}
