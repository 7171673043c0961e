//! Enable protection: check the prerequisites (before answering the operator), create
//! the relationship and the replica, start the initial replication and wait for it;
//! then Finalize protection ([`super::finalize`]). With an offline policy the initial
//! copy is exported instead ([`super::offline`]).

use std::sync::Arc;
use std::time::Duration;

use siterecovery_proto::model::VmName;
use siterecovery_proto::model::units::human_size;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::ProtectionError;
use crate::addresses::{describe_reservation, reserve_addresses};
use crate::inventory::{HostRecord, VmRecord};
use crate::jobs::{Claim, EnableStep, JobKind, JobRecord, now_ms};
use crate::network::Reservation;
use crate::policy::{self, PairingRecord, PolicyRecord};
use crate::relationship::{
    Core, Event, RelationshipRecord, ReplicationState, StatusRecord, Wait, claim_vm, fail_job, list_hosts,
    progress_detail, relationship_id, save_job, wait_step,
};
use crate::store::{PAIRINGS, POLICIES, VMS};

/// What "Check prerequisites" found: everything the following steps need.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub vm: VmRecord,
    pub primary: HostRecord,
    pub replica: HostRecord,
    pub policy: PolicyRecord,
    pub total_bytes: u64,
    pub addresses: Vec<Reservation>,
}

fn check_prerequisites(state: &Core, vm_name: &str) -> Result<(Plan, String), ProtectionError> {
    let vm = state.store.get::<VmRecord>(VMS, vm_name)?.ok_or_else(|| ProtectionError::UnknownVm(vm_name.into()))?;
    if let Some(r) = state.protection.of_vm(vm_name) {
        return Err(ProtectionError::AlreadyProtected {
            vm: vm_name.to_owned(),
            relationship: r.id,
            state: r.state.as_str(),
        });
    }
    let hosts = list_hosts(state)?;
    let primary = hosts
        .iter()
        .find(|h| h.id == vm.host_id)
        .cloned()
        .ok_or_else(|| ProtectionError::VmHostGone(vm_name.to_owned()))?;
    let pairing = state.store.get::<PairingRecord>(PAIRINGS, &primary.cloud)?.ok_or_else(|| {
        ProtectionError::NotPaired { cloud: primary.cloud.to_string(), host: primary.name.to_string() }
    })?;
    let policy = state.store.get::<PolicyRecord>(POLICIES, &pairing.policy)?.ok_or_else(|| {
        ProtectionError::PolicyGone { policy: pairing.policy.to_string(), cloud: primary.cloud.to_string() }
    })?;
    if !state.agents.connected(primary.id.as_str()) {
        return Err(ProtectionError::PrimaryNotConnected(primary.name.to_string()));
    }
    let total_bytes: u64 = vm.disks.iter().map(|d| d.size_bytes).sum();
    let candidates: Vec<(HostRecord, u64)> = hosts
        .iter()
        .filter(|h| h.cloud == pairing.target_cloud)
        .filter(|h| state.agents.connected(h.id.as_str()))
        .map(|h| (h.clone(), state.agents.free_bytes(h.id.as_str())))
        .collect();
    let (replica, free) = candidates
        .into_iter()
        .max_by_key(|(_, free)| *free)
        .ok_or_else(|| ProtectionError::NoTargetHost(pairing.target_cloud.to_string()))?;
    if free < total_bytes {
        return Err(ProtectionError::NoSpace {
            cloud: pairing.target_cloud.to_string(),
            host: replica.name.to_string(),
            free: human_size(free),
            vm: vm_name.to_owned(),
            needed: human_size(total_bytes),
        });
    }
    // The other VMs' relationships hold their addresses.
    let others: Vec<RelationshipRecord> = state.protection.all().into_iter().filter(|r| r.vm != vm_name).collect();
    let addresses = reserve_addresses(&state.store, &vm, others.iter().flat_map(|r| r.addresses.iter()))?;
    let mut detail = format!(
        "cloud {} paired with {} (policy {}); replica host {} has {} free for {}",
        primary.cloud,
        pairing.target_cloud,
        policy.name,
        replica.name,
        human_size(free),
        human_size(total_bytes)
    );
    for r in &addresses {
        detail.push_str(&format!("; {}", describe_reservation(r)));
    }
    Ok((Plan { vm, primary, replica, policy, total_bytes, addresses }, detail))
}

/// Whether `export_dir` (offline initial replication) suits the policy: required by an
/// offline policy, refused otherwise, and absolute.
fn check_export_dir(plan: &Plan, vm: &str, export_dir: &str) -> Result<(), ProtectionError> {
    let offline = plan.policy.initial_method == policy::InitialMethod::Offline;
    if offline && export_dir.is_empty() {
        return Err(ProtectionError::ExportDirRequired {
            policy: plan.policy.name.to_string(),
            primary: plan.primary.name.to_string(),
            replica: plan.replica.name.to_string(),
            vm: vm.to_owned(),
        });
    }
    if !offline && !export_dir.is_empty() {
        return Err(ProtectionError::ExportDirNotOffline {
            policy: plan.policy.name.to_string(),
            how: match plan.policy.initial_method {
                policy::InitialMethod::Network => "over the network".to_string(),
                method => format!("by {method}"),
            },
        });
    }
    if !export_dir.is_empty() && !export_dir.starts_with('/') {
        return Err(ProtectionError::NotAbsolute { what: "export", dir: export_dir.to_owned() });
    }
    Ok(())
}

/// Starts Enable protection for `vm`: prerequisites are checked before answering (a
/// failure is returned as the error and recorded as a failed job), the rest runs in a
/// task. `export_dir` (offline initial replication) is required when the policy's
/// initial method is `offline`, refused otherwise.
pub async fn start_protect(state: &Arc<Core>, vm: &VmName, export_dir: &str) -> Result<JobRecord, ProtectionError> {
    let vm = vm.as_str();
    let claim = claim_vm(state, vm)?;
    // An export directory is given for, and required by, an offline policy (checked below).
    let steps: &[EnableStep] = if export_dir.is_empty() { &EnableStep::ONLINE } else { &EnableStep::OFFLINE };
    let mut job = state.protection.jobs.create(&state.store, JobKind::EnableProtection, vm, steps)?;
    job.start_step(EnableStep::CheckPrerequisites, "", now_ms());
    let checked = check_prerequisites(state, vm)
        .and_then(|(plan, detail)| check_export_dir(&plan, vm, export_dir).map(|()| (plan, detail)));
    match checked {
        Ok((plan, detail)) => {
            job.succeed_step(EnableStep::CheckPrerequisites, &detail, now_ms());
            save_job(state, &job);
            tokio::spawn(run_enable(state.clone(), job.clone(), plan, claim, export_dir.to_owned()));
            Ok(job)
        }
        Err(e) => {
            fail_job(state, &mut job, &e.to_string());
            Err(e.in_job(&job.id))
        }
    }
}

async fn run_enable(state: Arc<Core>, mut job: JobRecord, plan: Plan, claim: Claim, export_dir: String) {
    let cfg = state.protection.config.clone();
    let settings = policy::replication_settings(&plan.policy, cfg.test_intervals);
    let step = EnableStep::CreateRelationship;
    job.start_step(step, &format!("replica host {}", plan.replica.name), now_ms());
    let mut rec = RelationshipRecord {
        id: relationship_id(),
        vm: plan.vm.name.to_string(),
        primary_host_id: plan.primary.id.to_string(),
        replica_host_id: plan.replica.id.to_string(),
        policy: plan.policy.name.to_string(),
        interval_ms: plan.policy.interval_ms,
        state: ReplicationState::NotEnabled,
        created_unix_ms: now_ms(),
        total_bytes: plan.total_bytes,
        status: StatusRecord::default(),
        replicating_since_unix_ms: 0,
        resyncs_completed: 0,
        rate_bytes_per_sec: 0,
        samples: vec![],
        addresses: plan.addresses.clone(),
        test_failover: None,
        failover: None,
        reversed_from: String::new(),
    };
    rec.state = ReplicationState::NotEnabled.next(Event::Enabled).unwrap_or(ReplicationState::WaitingForInitial);
    job.relationship_id = rec.id.clone();
    job.total_bytes = plan.total_bytes;
    if let Err(e) = state.protection.save(&state.store, rec.clone()) {
        return fail_job(&state, &mut job, &format!("cannot record the relationship: {e}"));
    }
    save_job(&state, &job);
    let prepare = Command::PrepareReplica(v1::PrepareReplica {
        adopt_vm_disks: false,
        relationship_id: rec.id.clone(),
        vm: plan.vm.name.to_string(),
        primary_host_id: plan.primary.id.to_string(),
        disks: plan.vm.disks.iter().map(|d| v1::DiskSize { id: d.id.to_string(), size_bytes: d.size_bytes }).collect(),
        settings: Some(settings.clone()),
        machine: Some(plan.vm.machine.to_proto()),
    });
    if let Err(s) = state.agents.command(plan.replica.id.as_str(), prepare, cfg.command_timeout).await {
        let _ = state.protection.remove(&state.store, &rec.id);
        return fail_job(&state, &mut job, &format!("replica host {} refused: {}", plan.replica.name, s.message()));
    }
    job.succeed_step(
        step,
        &format!("relationship {}: {} → {}", rec.id, plan.primary.name, plan.replica.name),
        now_ms(),
    );
    save_job(&state, &job);

    if !export_dir.is_empty() {
        return super::offline::run_export(state, job, plan, claim, rec, settings.clone(), export_dir).await;
    }

    let step = EnableStep::StartInitialReplication;
    job.start_step(step, "", now_ms());
    if let Some(at) = plan.policy.initial_at_unix_ms()
        && at > now_ms()
    {
        job.set_detail(step, &format!("scheduled by policy {}: {}", plan.policy.name, plan.policy.initial_method));
        save_job(&state, &job);
        let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
    let start = Command::StartReplication(v1::StartReplication {
        resync_initial: false,
        relationship_id: rec.id.clone(),
        vm: plan.vm.name.to_string(),
        replica_host_id: plan.replica.id.to_string(),
        replica_address: plan.replica.address.clone(),
        settings: Some(settings),
    });
    if let Err(s) = state.agents.command(plan.primary.id.as_str(), start, cfg.command_timeout).await {
        let stop = Command::StopReplication(v1::StopReplication {
            relationship_id: rec.id.clone(),
            vm: plan.vm.name.to_string(),
            remove_replica: true,
        });
        let _ = state.agents.command(plan.replica.id.as_str(), stop, cfg.command_timeout).await;
        let _ = state.protection.remove(&state.store, &rec.id);
        return fail_job(&state, &mut job, &format!("primary host {} refused: {}", plan.primary.name, s.message()));
    }
    job.succeed_step(step, &format!("{} replicating to {}", plan.primary.name, plan.replica.address), now_ms());
    job.start_step(EnableStep::InitialReplication, "", now_ms());
    save_job(&state, &job);
    drop(claim);
    wait_initial(state, job).await;
}

/// "Initial replication": waits until the relationship replicates, then finalizes.
pub(super) async fn wait_initial(state: Arc<Core>, mut job: JobRecord) {
    let ok = wait_step(&state, &mut job, EnableStep::InitialReplication.name(), |rel, connected| match rel.state {
        ReplicationState::Replicating => {
            Wait::Done(format!("initial replication done; {} replicated", human_size(rel.status.bytes_replicated)))
        }
        ReplicationState::StoppedOnError => Wait::Failed(if rel.status.error.is_empty() {
            "replication stopped on an error".into()
        } else {
            rel.status.error.clone()
        }),
        _ => Wait::Progress { detail: progress_detail(rel, connected, "copied") },
    })
    .await;
    if !ok {
        return;
    }
    job.succeed(now_ms());
    save_job(&state, &job);
    tracing::info!(job = %job.id, vm = %job.vm, "protection enabled");
    super::finalize::run_finalize(state, job.vm.clone(), job.relationship_id.clone()).await;
}
