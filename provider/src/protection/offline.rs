//! Offline initial replication: the primary exports the initial copy to a directory
//! (Enable protection's "Export initial copy"), the operator carries it to the replica
//! host and imports it there (`protect-import`, [`start_import`]); meanwhile the job
//! waits in "Waiting for import", without a time limit, across provider restarts.

use std::sync::Arc;
use std::time::Duration;

use siterecovery_proto::model::VmName;
use siterecovery_proto::model::units::human_size;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::ProtectionError;
use super::enable::{Plan, wait_initial};
use crate::jobs::{Claim, EnableStep, JobKind, JobRecord, JobState, Step, now_ms};
use crate::relationship::{
    Core, RelationshipRecord, claim_vm, fail_job, find_protected, host_name, list_hosts, save_job,
};

/// Offline initial replication: the primary exports the initial copy to `dir` and
/// starts replicating (its sender waits for the import); the job then waits until
/// `protect-import` imported the export on the replica host ([`start_import`]).
pub(super) async fn run_export(
    state: Arc<Core>,
    mut job: JobRecord,
    plan: Plan,
    claim: Claim,
    rec: RelationshipRecord,
    settings: v1::ReplicationSettings,
    dir: String,
) {
    let cfg = state.protection.config.clone();
    let step = EnableStep::ExportInitialCopy;
    job.start_step(step, &format!("exporting to {dir} on {}", plan.primary.name), now_ms());
    save_job(&state, &job);
    let export = Command::ExportInitial(v1::ExportInitial {
        relationship_id: rec.id.clone(),
        vm: plan.vm.name.to_string(),
        replica_host_id: plan.replica.id.to_string(),
        replica_address: plan.replica.address.clone(),
        settings: Some(settings),
        dir: dir.clone(),
    });
    // The export reads every allocated byte: it may take far longer than a command.
    let timeout = cfg.step_timeout.max(cfg.command_timeout);
    let bytes = match state.agents.command(plan.primary.id.as_str(), export, timeout).await {
        Ok(r) => r.bytes,
        Err(s) => {
            for (host, remove) in [(&plan.primary.id, false), (&plan.replica.id, true)] {
                let stop = Command::StopReplication(v1::StopReplication {
                    relationship_id: rec.id.clone(),
                    vm: plan.vm.name.to_string(),
                    remove_replica: remove,
                });
                let _ = state.agents.command(host.as_str(), stop, cfg.command_timeout).await;
            }
            let _ = state.protection.remove(&state.store, &rec.id);
            return fail_job(
                &state,
                &mut job,
                &format!("primary host {} could not export to {dir}: {}", plan.primary.name, s.message()),
            );
        }
    };
    job.succeed_step(
        step,
        &format!("{} of {} disk(s) exported to {dir} on {}", human_size(bytes), plan.vm.disks.len(), plan.primary.name),
        now_ms(),
    );
    job.start_step(
        EnableStep::WaitingForImport,
        &format!(
            "carry {dir} to the replica host {}, then run `provider protect-import {} --dir DIR`",
            plan.replica.name, plan.vm.name
        ),
        now_ms(),
    );
    save_job(&state, &job);
    drop(claim);
    wait_import(state, job).await;
}

/// Waits (without a time limit) until [`start_import`] moved the job on to "Initial
/// replication", then waits for that. Fails when the relationship goes away.
pub(super) async fn wait_import(state: Arc<Core>, mut job: JobRecord) {
    let mut rx = state.protection.jobs.subscribe();
    loop {
        if state.protection.get(&job.relationship_id).is_none() {
            let why = format!("protection of VM {} was removed while the job ran", job.vm);
            return fail_job(&state, &mut job, &why);
        }
        // `start_import` writes the job; this task only reads it until then.
        if let Ok(Some(j)) = state.protection.jobs.get(&state.store, &job.id) {
            job = j;
        }
        if job.state != JobState::Running {
            return;
        }
        if job.running() != Some(Step::Enable(EnableStep::WaitingForImport)) {
            break;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            // The job stays running; the restart rule resumes it.
            _ = state.shutdown.cancelled() => return,
        }
    }
    wait_initial(state, job).await;
}

/// `protect-import`: imports the export in `dir` on the replica host of `vm`, whose
/// Enable protection job waits in "Waiting for import"; on success the job goes on to
/// "Initial replication". A failed import leaves the job waiting (fix and retry).
pub async fn start_import(state: &Arc<Core>, vm: &VmName, dir: &str) -> Result<JobRecord, ProtectionError> {
    let vm = vm.as_str();
    if !dir.starts_with('/') {
        return Err(ProtectionError::NotAbsolute { what: "import", dir: dir.to_owned() });
    }
    let rel = find_protected(state, vm)?;
    let _claim = claim_vm(state, vm)?;
    let waiting = |j: &JobRecord| {
        j.kind == JobKind::EnableProtection
            && j.state == JobState::Running
            && j.relationship_id == rel.id
            && j.running() == Some(Step::Enable(EnableStep::WaitingForImport))
    };
    let job = state
        .store
        .list::<JobRecord>(crate::store::JOBS)?
        .into_iter()
        .find(waiting)
        .ok_or_else(|| ProtectionError::NotWaitingForImport { vm: vm.to_owned(), state: rel.state.as_str() })?;
    let hosts = list_hosts(state)?;
    let replica = host_name(&hosts, &rel.replica_host_id);
    let cmd = Command::ImportInitial(v1::ImportInitial {
        relationship_id: rel.id.clone(),
        vm: vm.to_owned(),
        dir: dir.to_owned(),
    });
    let cfg = &state.protection.config;
    let timeout = cfg.step_timeout.max(cfg.command_timeout);
    let result = state.agents.command(&rel.replica_host_id, cmd, timeout).await;
    // Re-read: the job task may have failed it meanwhile.
    let mut job = state.protection.jobs.get(&state.store, &job.id)?.unwrap_or(job);
    if !waiting(&job) {
        return Err(ProtectionError::NoLongerWaiting(job.id));
    }
    match result {
        Ok(r) => {
            job.succeed_step(
                EnableStep::WaitingForImport,
                &format!("{} imported from {dir} on {replica}", human_size(r.bytes)),
                now_ms(),
            );
            job.start_step(EnableStep::InitialReplication, "shipping the writes made since the export", now_ms());
            save_job(state, &job);
            tracing::info!(job = %job.id, %vm, bytes = r.bytes, "initial copy imported");
            Ok(job)
        }
        Err(s) => {
            job.set_detail(
                EnableStep::WaitingForImport,
                &format!("import from {dir} on {replica} failed: {}; still waiting", s.message()),
            );
            save_job(state, &job);
            Err(ProtectionError::agent(format!("replica host {replica}: "), s))
        }
    }
}
