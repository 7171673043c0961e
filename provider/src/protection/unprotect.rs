//! Disable protection (`unprotect`): stop replication on the replica host (removing the
//! replica) and on the primary host, best effort each (a host that is not connected is
//! skipped and keeps its copy), then delete the relationship.

use std::sync::Arc;

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::ProtectionError;
use crate::agents::AgentErrorKind;
use crate::jobs::{DisableStep, JobKind, JobRecord, now_ms};
use crate::relationship::{Core, claim_vm, fail_job, find_protected, host_name, list_hosts, save_job};

pub async fn start_unprotect(state: &Arc<Core>, vm: &VmName) -> Result<JobRecord, ProtectionError> {
    let vm = vm.as_str();
    let rel = find_protected(state, vm)?;
    let claim = claim_vm(state, vm)?;
    let mut job = state.protection.jobs.create(&state.store, JobKind::DisableProtection, vm, DisableStep::ALL)?;
    job.relationship_id = rel.id.clone();
    save_job(state, &job);
    let state = state.clone();
    let ret = job.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let hosts = list_hosts(&state).unwrap_or_default();
        let cfg = state.protection.config.clone();
        for (step, host_id, remove) in [
            (DisableStep::StopOnReplica, &rel.replica_host_id, true),
            (DisableStep::StopOnPrimary, &rel.primary_host_id, false),
        ] {
            let name = host_name(&hosts, host_id);
            job.start_step(step, &name, now_ms());
            save_job(&state, &job);
            let cmd = Command::StopReplication(v1::StopReplication {
                relationship_id: rel.id.clone(),
                vm: rel.vm.clone(),
                remove_replica: remove,
            });
            let detail = match state.agents.command(host_id, cmd, cfg.command_timeout).await {
                Ok(_) if remove => format!("{name}: replication stopped, replica removed"),
                Ok(_) => format!("{name}: replication stopped"),
                Err(s) if s.kind() == AgentErrorKind::Unavailable => {
                    format!(
                        "{name} is not connected: skipped ({}); it will hold its copy until told otherwise",
                        s.message()
                    )
                }
                Err(s) if s.kind() == AgentErrorKind::NotFound => format!("{name}: nothing to stop ({})", s.message()),
                Err(s) => format!("{name} failed to stop ({}); continued", s.message()),
            };
            job.succeed_step(step, &detail, now_ms());
            save_job(&state, &job);
        }
        let step = DisableStep::DeleteRelationship;
        job.start_step(step, &rel.id, now_ms());
        if let Err(e) = state.protection.remove(&state.store, &rel.id) {
            return fail_job(&state, &mut job, &format!("cannot delete relationship {}: {e}", rel.id));
        }
        job.succeed_step(step, &format!("relationship {} deleted", rel.id), now_ms());
        job.succeed(now_ms());
        save_job(&state, &job);
        tracing::info!(vm = %rel.vm, "protection disabled");
    });
    Ok(ret)
}
