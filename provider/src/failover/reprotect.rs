//! Reverse replication after a failover (reprotect): commit when not committed yet,
//! the former primary prepares as replica reusing its disks, the new primary starts
//! replicating with a resync first; a relationship with the roles swapped replaces
//! the old one.

use std::sync::Arc;

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::FailoverError;
use super::commit::commit_on_replica;
use super::common::{claim, host_name, hosts, protected, refuse, require_connected};
use crate::inventory::VmRecord;
use crate::jobs::{Claim, JobKind, JobRecord, now_ms};
use crate::policy::{self, PolicyRecord};
use crate::relationship::{
    Core, Event, RelationshipRecord, ReplicationState, StatusRecord, Wait, fail_job, progress_detail, relationship_id,
    save_job, wait_step,
};
use crate::store::{POLICIES, VMS};

const CHECK: &str = super::start::CHECK;
const REPROTECT_STEPS: [&str; 5] = [
    CHECK,
    "Commit failover",
    "Prepare the former primary host as replica (its disks are reused)",
    "Start reverse replication",
    "Resynchronise",
];

/// `Reprotect` RPC: reverse replication after a failover.
pub async fn start_reprotect(state: &Arc<Core>, vm: &VmName) -> Result<JobRecord, FailoverError> {
    let rel = protected(state, vm)?;
    rel.state.next(Event::Reprotected).map_err(|e| {
        refuse(
            vm,
            e,
            &format!("reverse replication follows a failover (`failover planned {vm}` or `failover unplanned {vm}`)"),
        )
    })?;
    let hosts = hosts(state)?;
    let (new_primary, new_replica) = (rel.replica_host_id.clone(), rel.primary_host_id.clone());
    require_connected(state, &hosts, &new_primary, "new primary (former replica)")?;
    if !state.agents.connected(&new_replica) {
        return Err(FailoverError::HostDown(format!(
            "former primary host {} is not connected: reverse replication reuses its disks",
            host_name(&hosts, &new_replica)
        )));
    }
    let policy = state.store.get::<PolicyRecord>(POLICIES, &rel.policy)?.ok_or_else(|| {
        FailoverError::Refused(format!("policy {:?} of VM {vm}'s protection no longer exists", rel.policy))
    })?;
    let vm_rec =
        state.store.get::<VmRecord>(VMS, vm.as_str())?.ok_or_else(|| FailoverError::UnknownVm(vm.to_string()))?;
    let claim = claim(state, vm)?;
    let mut job =
        state.protection.jobs.create(&state.store, JobKind::ReverseReplication, vm.as_str(), &REPROTECT_STEPS)?;
    job.relationship_id = rel.id.clone();
    job.total_bytes = vm_rec.disks.iter().map(|d| d.size_bytes).sum();
    job.start_step(CHECK, "", now_ms());
    job.succeed_step(
        CHECK,
        &format!(
            "new primary {}, new replica {} (policy {}); replaces relationship {}",
            host_name(&hosts, &new_primary),
            host_name(&hosts, &new_replica),
            policy.name,
            rel.id
        ),
        now_ms(),
    );
    save_job(state, &job);
    let ret = job.clone();
    tokio::spawn(run_reprotect(state.clone(), job, rel, policy, vm_rec, claim));
    Ok(ret)
}

async fn run_reprotect(
    state: Arc<Core>,
    mut job: JobRecord,
    old: RelationshipRecord,
    policy: PolicyRecord,
    vm: VmRecord,
    claim: Claim,
) {
    let cfg = state.protection.config.clone();
    let hosts = super::common::hosts(&state).unwrap_or_default();
    let (new_primary, new_replica) = (old.replica_host_id.clone(), old.primary_host_id.clone());
    let (pname, rname) = (host_name(&hosts, &new_primary), host_name(&hosts, &new_replica));
    let step = REPROTECT_STEPS[1];
    let mut old = old;
    if old.state == ReplicationState::FailedOver {
        job.start_step(step, &pname, now_ms());
        save_job(&state, &job);
        if let Err(e) = commit_on_replica(&state, &old).await {
            return fail_job(&state, &mut job, &e.to_string());
        }
        old = state.protection.get(&old.id).unwrap_or(old);
        job.succeed_step(step, "failover committed", now_ms());
    } else {
        job.skip_step(step, "already committed", now_ms());
    }
    save_job(&state, &job);

    let (addresses, note) = match super::reserve_for(&state, &vm) {
        Ok(a) => (a, String::new()),
        Err(e) => (vec![], format!("; addresses not reserved: {e}")),
    };
    let mut new = RelationshipRecord {
        id: relationship_id(),
        vm: vm.name.to_string(),
        primary_host_id: new_primary.clone(),
        replica_host_id: new_replica.clone(),
        policy: policy.name.to_string(),
        interval_ms: policy.interval_ms,
        state: ReplicationState::NotEnabled,
        created_unix_ms: now_ms(),
        total_bytes: vm.disks.iter().map(|d| d.size_bytes).sum(),
        status: StatusRecord::default(),
        replicating_since_unix_ms: 0,
        resyncs_completed: 0,
        rate_bytes_per_sec: 0,
        samples: vec![],
        addresses,
        test_failover: None,
        failover: None,
        reversed_from: old.id.clone(),
    };
    new.state = ReplicationState::NotEnabled.next(Event::Enabled).unwrap_or(ReplicationState::WaitingForInitial);
    let restore = |state: &Core, new_id: &str, old: &RelationshipRecord| {
        let _ = state.protection.remove(&state.store, new_id);
        if let Err(e) = state.protection.save(&state.store, old.clone()) {
            tracing::error!(relationship = %old.id, "cannot restore the relationship: {e:#}");
        }
    };
    let step = REPROTECT_STEPS[2];
    job.start_step(step, &rname, now_ms());
    // The old relationship ends; the reversed one takes the VM.
    if let Err(e) = state.protection.remove(&state.store, &old.id) {
        return fail_job(&state, &mut job, &format!("cannot end relationship {}: {e}", old.id));
    }
    if let Err(e) = state.protection.save(&state.store, new.clone()) {
        restore(&state, &new.id, &old);
        return fail_job(&state, &mut job, &format!("cannot record the reversed relationship: {e}"));
    }
    job.relationship_id = new.id.clone();
    save_job(&state, &job);
    let settings = policy::replication_settings(&policy, cfg.test_intervals);
    let prepare = Command::PrepareReplica(v1::PrepareReplica {
        relationship_id: new.id.clone(),
        vm: vm.name.to_string(),
        primary_host_id: new_primary.clone(),
        disks: vm.disks.iter().map(|d| v1::DiskSize { id: d.id.to_string(), size_bytes: d.size_bytes }).collect(),
        settings: Some(settings.clone()),
        adopt_vm_disks: true,
        machine: Some(vm.machine.to_proto()),
    });
    if let Err(s) = state.agents.command(&new_replica, prepare, cfg.command_timeout).await {
        restore(&state, &new.id, &old);
        return fail_job(&state, &mut job, &format!("former primary host {rname} refused: {}", s.message()));
    }
    job.succeed_step(
        step,
        &format!("relationship {}: {pname} → {rname}; {rname} reuses its disks{note}", new.id),
        now_ms(),
    );
    let step = REPROTECT_STEPS[3];
    job.start_step(step, &pname, now_ms());
    save_job(&state, &job);
    let replica_address =
        hosts.iter().find(|h| h.id.as_str() == new_replica).map(|h| h.address.clone()).unwrap_or_default();
    let start = Command::StartReplication(v1::StartReplication {
        relationship_id: new.id.clone(),
        vm: vm.name.to_string(),
        replica_host_id: new_replica.clone(),
        replica_address: replica_address.clone(),
        settings: Some(settings),
        resync_initial: true,
    });
    if let Err(s) = state.agents.command(&new_primary, start, cfg.command_timeout).await {
        // Keep the former primary's disks: they are the VM's older copy.
        let stop = Command::StopReplication(v1::StopReplication {
            relationship_id: new.id.clone(),
            vm: vm.name.to_string(),
            remove_replica: false,
        });
        let _ = state.agents.command(&new_replica, stop, cfg.command_timeout).await;
        restore(&state, &new.id, &old);
        return fail_job(&state, &mut job, &format!("new primary host {pname} refused: {}", s.message()));
    }
    job.succeed_step(step, &format!("{pname} replicating to {rname} ({replica_address}), resync first"), now_ms());
    job.start_step(REPROTECT_STEPS[4], "", now_ms());
    save_job(&state, &job);
    drop(claim);
    let ok = wait_step(&state, &mut job, REPROTECT_STEPS[4], |rel, connected| {
        let s = &rel.status;
        let blocks = format!(
            "{} blocks compared, {} sent (4 KiB sub-blocks), {} on the wire",
            s.resync_blocks_compared,
            s.resync_blocks_sent,
            siterecovery_proto::model::units::human_size(s.resync_wire_bytes)
        );
        match rel.state {
            ReplicationState::Replicating => Wait::Done(format!("reverse replication running: {blocks}")),
            ReplicationState::StoppedOnError => Wait::Failed(if s.error.is_empty() {
                "replication stopped on an error".into()
            } else {
                s.error.clone()
            }),
            _ => Wait::Progress { detail: format!("{}; {blocks}", progress_detail(rel, connected, "compared")) },
        }
    })
    .await;
    if ok {
        job.succeed(now_ms());
        save_job(&state, &job);
        tracing::info!(vm = %vm.name, "reverse replication running");
    }
}
