//! Cleanup of a test failover: the replica host deletes the test VM and its overlay.

use std::sync::Arc;

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::FailoverError;
use super::common::{claim, host_name, hosts, protected, require_connected, update};
use crate::agents::AgentErrorKind;
use crate::jobs::{JobKind, JobRecord, now_ms};
use crate::relationship::{Core, fail_job, save_job};
use crate::store::VMS;

const CLEANUP_STEPS: [&str; 1] = ["Delete the test VM and its overlay"];

/// `CleanupTestFailover` RPC.
pub async fn start_cleanup(state: &Arc<Core>, vm: &VmName) -> Result<JobRecord, FailoverError> {
    let rel = protected(state, vm)?;
    let Some(test) = rel.test_failover.clone() else {
        return Err(FailoverError::Refused(format!(
            "VM {vm} has no test failover to clean up (`failover test {vm}` starts one)"
        )));
    };
    let hosts = hosts(state)?;
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job =
        state.protection.jobs.create(&state.store, JobKind::CleanupTestFailover, vm.as_str(), &CLEANUP_STEPS)?;
    job.relationship_id = rel.id.clone();
    let rname = host_name(&hosts, &rel.replica_host_id);
    job.start_step(CLEANUP_STEPS[0], &format!("{} on {rname}", test.test_vm), now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let cmd = Command::CleanupTestFailover(v1::CleanupTestFailover {
            vm: rel.vm.clone(),
            test_vm_name: test.test_vm.clone(),
        });
        let note = match state.agents.command(&rel.replica_host_id, cmd, state.protection.config.command_timeout).await
        {
            Ok(_) => String::new(),
            Err(s) if s.kind() == AgentErrorKind::NotFound => format!(" (the host had no such VM: {})", s.message()),
            Err(s) => return fail_job(&state, &mut job, &format!("replica host {rname}: {}", s.message())),
        };
        if let Err(e) = state.store.delete(VMS, &test.test_vm) {
            tracing::warn!(vm = %test.test_vm, "cannot forget the test VM: {e:#}");
        }
        if let Err(e) = update(&state, &rel.id, |r| {
            r.test_failover = None;
            Ok(())
        }) {
            return fail_job(&state, &mut job, &e.to_string());
        }
        job.succeed_step(
            CLEANUP_STEPS[0],
            &format!("test VM {} and its overlay removed from {rname}{note}", test.test_vm),
            now_ms(),
        );
        job.succeed(now_ms());
        save_job(&state, &job);
    });
    Ok(ret)
}
