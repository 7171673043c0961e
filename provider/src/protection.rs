//! Protection: the operator's Protection service and the jobs that enable, finalize,
//! disable and resync the protection of a VM (online or with an offline initial copy).
//! The relationships themselves live in [`crate::relationship`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::Stream;
use siterecovery_certs::Role;
use siterecovery_certs::VaultId;
use siterecovery_proto::model::{PolicyName, SiteName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::protection_server::Protection;
use siterecovery_proto::v1::provider_message::Command;
use tonic::{Code, Request, Response, Status};

use crate::agents::{AgentError, AgentErrorKind};
use crate::auth::authorize;
use crate::error::store_err;
use crate::inventory::HostRecord;
use crate::inventory::VmRecord;
use crate::jobs::{Claim, EnableStep, JobKind, JobRecord, JobState, Step, now_ms};
use crate::network::{self, NetworkError, NetworkStore, Reservation};
use crate::policy::{self, PairingError, PairingRecord, PolicyError, PolicyRecord};
use crate::relationship::{
    Core, Event, RelationshipRecord, ReplicationState, StatusRecord, Wait, claim, cloud_infos, fail_job, host_name,
    hosts, progress_detail, protected, relationship_id, save_job, wait_step,
};
use crate::store::{PAIRINGS, POLICIES, VMS};

// ---------------------------------------------------------------------------------
// Errors.

fn policy_status(e: PolicyError) -> Status {
    let msg = e.to_string();
    match e {
        PolicyError::Exists(_) => Status::already_exists(msg),
        PolicyError::UnknownPolicy(_) => Status::not_found(msg),
        PolicyError::InUse { .. } => Status::failed_precondition(msg),
        _ => Status::invalid_argument(msg),
    }
}

fn network_status(e: NetworkError) -> Status {
    let msg = e.to_string();
    match e {
        NetworkError::Exists(_) => Status::already_exists(msg),
        NetworkError::UnknownNetwork(_) | NetworkError::UnknownSite(_) => Status::not_found(msg),
        NetworkError::SitesNotPaired { .. }
        | NetworkError::AlreadyMapped { .. }
        | NetworkError::PoolExhausted { .. } => Status::failed_precondition(msg),
        _ => Status::invalid_argument(msg),
    }
}

fn pairing_status(e: PairingError) -> Status {
    let msg = e.to_string();
    match e {
        PairingError::UnknownCloud(_) | PairingError::UnknownPolicy(_) => Status::not_found(msg),
        PairingError::Request(_) | PairingError::SameCloud(_) | PairingError::SameSite { .. } => {
            Status::invalid_argument(msg)
        }
        PairingError::AlreadyPaired { .. } => Status::failed_precondition(msg),
    }
}

// ---------------------------------------------------------------------------------
// The service.

pub struct ProtectionService {
    pub core: Arc<Core>,
    pub vault_id: VaultId,
}

/// The status code of an agent's error, as the operator's RPC reports it.
pub(crate) fn agent_code(e: &AgentError) -> Code {
    match e.kind() {
        AgentErrorKind::Unavailable => Code::Unavailable,
        AgentErrorKind::Timeout => Code::DeadlineExceeded,
        AgentErrorKind::InvalidArgument => Code::InvalidArgument,
        AgentErrorKind::NotFound => Code::NotFound,
        AgentErrorKind::AlreadyExists => Code::AlreadyExists,
        AgentErrorKind::FailedPrecondition => Code::FailedPrecondition,
        AgentErrorKind::ResourceExhausted => Code::ResourceExhausted,
        AgentErrorKind::Internal => Code::Internal,
    }
}

/// What "Check prerequisites" found: everything the following steps need.
#[derive(Debug, Clone)]
struct Plan {
    vm: VmRecord,
    primary: HostRecord,
    replica: HostRecord,
    policy: PolicyRecord,
    total_bytes: u64,
    addresses: Vec<Reservation>,
}

/// How many protected VMs have their primary in `cloud`.
fn protected_in_cloud(state: &Core, hosts: &[HostRecord], cloud: &str) -> usize {
    state
        .protection
        .all()
        .iter()
        .filter(|r| hosts.iter().any(|h| h.id.as_str() == r.primary_host_id && h.cloud == cloud))
        .count()
}

fn check_prerequisites(state: &Core, vm_name: &str) -> Result<(Plan, String), Status> {
    let vm = state
        .store
        .get::<VmRecord>(VMS, vm_name)
        .map_err(store_err)?
        .ok_or_else(|| Status::not_found(format!("no VM {vm_name:?} (see `vm list`)")))?;
    if let Some(r) = state.protection.of_vm(vm_name) {
        return Err(Status::already_exists(format!(
            "VM {vm_name:?} is already protected (relationship {}, {})",
            r.id,
            r.state.as_str()
        )));
    }
    let hosts = hosts(state)?;
    let primary =
        hosts.iter().find(|h| h.id == vm.host_id).cloned().ok_or_else(|| {
            Status::failed_precondition(format!("the host of VM {vm_name:?} is no longer registered"))
        })?;
    let pairing = state.store.get::<PairingRecord>(PAIRINGS, &primary.cloud).map_err(store_err)?.ok_or_else(|| {
        Status::failed_precondition(format!(
            "cloud {:?} of host {} is not paired: `cloud pair --source {} --target CLOUD --policy POLICY` first",
            primary.cloud, primary.name, primary.cloud
        ))
    })?;
    let policy = state.store.get::<PolicyRecord>(POLICIES, &pairing.policy).map_err(store_err)?.ok_or_else(|| {
        Status::failed_precondition(format!(
            "policy {:?} of the pairing of {:?} no longer exists",
            pairing.policy, primary.cloud
        ))
    })?;
    if !state.agents.connected(primary.id.as_str()) {
        return Err(Status::unavailable(format!("primary host {} is not connected", primary.name)));
    }
    let total_bytes: u64 = vm.disks.iter().map(|d| d.size_bytes).sum();
    let candidates: Vec<(HostRecord, u64)> = hosts
        .iter()
        .filter(|h| h.cloud == pairing.target_cloud)
        .filter(|h| state.agents.connected(h.id.as_str()))
        .map(|h| (h.clone(), state.agents.free_bytes(h.id.as_str())))
        .collect();
    let (replica, free) = candidates.into_iter().max_by_key(|(_, free)| *free).ok_or_else(|| {
        Status::unavailable(format!("no host of target cloud {:?} is connected", pairing.target_cloud))
    })?;
    if free < total_bytes {
        return Err(Status::failed_precondition(format!(
            "not enough space in target cloud {:?}: host {} (the emptiest connected one) has {} free, VM {vm_name} needs {}",
            pairing.target_cloud,
            replica.name,
            siterecovery_proto::model::units::human_size(free),
            siterecovery_proto::model::units::human_size(total_bytes)
        )));
    }
    let addresses = crate::failover::reserve_addresses(state, &vm, None)?;
    let mut detail = format!(
        "cloud {} paired with {} (policy {}); replica host {} has {} free for {}",
        primary.cloud,
        pairing.target_cloud,
        policy.name,
        replica.name,
        siterecovery_proto::model::units::human_size(free),
        siterecovery_proto::model::units::human_size(total_bytes)
    );
    for r in &addresses {
        detail.push_str(&format!("; {}", crate::failover::describe_reservation(r)));
    }
    Ok((Plan { vm, primary, replica, policy, total_bytes, addresses }, detail))
}

const FINALIZE_STEPS: [&str; 1] = ["Check recovery points"];
const DISABLE_STEPS: [&str; 3] =
    ["Stop replication on the replica host", "Stop replication on the primary host", "Delete replication relationship"];
const RESYNC_STEPS: [&str; 2] = ["Request resync", "Resynchronise"];

/// Starts Enable protection for `vm`: prerequisites are checked before answering (a
/// failure is returned as the RPC's error and recorded as a failed job), the rest runs
/// in a task. `export_dir` (offline initial replication) is required when the policy's
/// initial method is `offline`, refused otherwise.
pub async fn start_protect(state: &Arc<Core>, vm: &str, export_dir: &str) -> Result<JobRecord, Status> {
    let claim = claim(state, vm)?;
    // An export directory is given for, and required by, an offline policy (checked below).
    let steps: &[EnableStep] = if export_dir.is_empty() { &EnableStep::ONLINE } else { &EnableStep::OFFLINE };
    let mut job =
        state.protection.jobs.create(&state.store, JobKind::EnableProtection, vm, steps).map_err(store_err)?;
    job.start_step(EnableStep::CheckPrerequisites, "", now_ms());
    let checked = check_prerequisites(state, vm).and_then(|(plan, detail)| {
        let offline = plan.policy.initial_method == policy::InitialMethod::Offline;
        if offline && export_dir.is_empty() {
            return Err(Status::invalid_argument(format!(
                "policy {} replicates the initial copy offline: give `--export-dir DIR` (an absolute directory on \
                 the primary host {} to export the initial copy to; then carry it to the replica host {} and run \
                 `protect-import {vm} --dir DIR`)",
                plan.policy.name, plan.primary.name, plan.replica.name
            )));
        }
        if !offline && !export_dir.is_empty() {
            return Err(Status::invalid_argument(format!(
                "--export-dir is for offline initial replication; policy {} copies the initial replica {}",
                plan.policy.name,
                match plan.policy.initial_method {
                    policy::InitialMethod::Network => "over the network".to_string(),
                    method => format!("by {method}"),
                }
            )));
        }
        if !export_dir.is_empty() && !export_dir.starts_with('/') {
            return Err(Status::invalid_argument(format!("export directory {export_dir:?} must be an absolute path")));
        }
        Ok((plan, detail))
    });
    match checked {
        Ok((plan, detail)) => {
            job.succeed_step(EnableStep::CheckPrerequisites, &detail, now_ms());
            save_job(state, &job);
            tokio::spawn(run_enable(state.clone(), job.clone(), plan, claim, export_dir.to_owned()));
            Ok(job)
        }
        Err(s) => {
            fail_job(state, &mut job, s.message());
            Err(Status::new(s.code(), format!("{} (job {})", s.message(), job.id)))
        }
    }
}

async fn run_enable(state: Arc<Core>, mut job: JobRecord, plan: Plan, claim: Claim, export_dir: String) {
    let cfg = state.protection.config.clone();
    let settings = policy::replication_settings(&plan.policy, cfg.test_intervals);
    // Create replication relationship.
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
        settings: Some(settings),
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
        return run_export(state, job, plan, claim, rec, settings, export_dir).await;
    }

    // Start initial replication.
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

/// Offline initial replication: the primary exports the initial copy to `dir` and
/// starts replicating (its sender waits for the import); the job then waits until
/// `protect-import` imported the export on the replica host ([`start_import`]).
async fn run_export(
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
        &format!(
            "{} of {} disk(s) exported to {dir} on {}",
            siterecovery_proto::model::units::human_size(bytes),
            plan.vm.disks.len(),
            plan.primary.name
        ),
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
async fn wait_import(state: Arc<Core>, mut job: JobRecord) {
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
pub async fn start_import(state: &Arc<Core>, vm: &str, dir: &str) -> Result<JobRecord, Status> {
    if !dir.starts_with('/') {
        return Err(Status::invalid_argument(format!("import directory {dir:?} must be an absolute path")));
    }
    let rel = protected(state, vm)?;
    let _claim = claim(state, vm)?;
    let waiting = |j: &JobRecord| {
        j.kind == JobKind::EnableProtection
            && j.state == JobState::Running
            && j.relationship_id == rel.id
            && j.running() == Some(Step::Enable(EnableStep::WaitingForImport))
    };
    let find = || -> Result<JobRecord, Status> {
        state.store.list::<JobRecord>(crate::store::JOBS).map_err(store_err)?.into_iter().find(waiting).ok_or_else(
            || {
                Status::failed_precondition(format!(
                    "no Enable protection job of VM {vm} is waiting for an import (replication is {}; see `job list`)",
                    rel.state.as_str()
                ))
            },
        )
    };
    let job = find()?;
    let hosts = hosts(state)?;
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
    let mut job = state.protection.jobs.get(&state.store, &job.id).map_err(store_err)?.unwrap_or(job);
    if !waiting(&job) {
        return Err(Status::failed_precondition(format!("job {} is no longer waiting for an import", job.id)));
    }
    match result {
        Ok(r) => {
            job.succeed_step(
                EnableStep::WaitingForImport,
                &format!("{} imported from {dir} on {replica}", siterecovery_proto::model::units::human_size(r.bytes)),
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
            Err(Status::new(agent_code(&s), format!("replica host {replica}: {}", s.message())))
        }
    }
}

/// Resumes the jobs the restart rule kept running.
pub fn resume_jobs(state: &Arc<Core>, jobs: Vec<JobRecord>) {
    for job in jobs {
        tracing::info!(job = %job.id, vm = %job.vm, "resuming job after restart");
        if job.running() == Some(Step::Enable(EnableStep::WaitingForImport)) {
            tokio::spawn(wait_import(state.clone(), job));
        } else {
            tokio::spawn(wait_initial(state.clone(), job));
        }
    }
}

async fn wait_initial(state: Arc<Core>, mut job: JobRecord) {
    let ok = wait_step(&state, &mut job, EnableStep::InitialReplication.name(), |rel, connected| match rel.state {
        ReplicationState::Replicating => Wait::Done(format!(
            "initial replication done; {} replicated",
            siterecovery_proto::model::units::human_size(rel.status.bytes_replicated)
        )),
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
    run_finalize(state, job.vm.clone(), job.relationship_id.clone()).await;
}

async fn run_finalize(state: Arc<Core>, vm: String, rel_id: String) {
    let mut job = match state.protection.jobs.create(&state.store, JobKind::FinalizeProtection, &vm, &FINALIZE_STEPS) {
        Ok(j) => j,
        Err(e) => return tracing::error!(vm, "cannot create the Finalize protection job: {e:#}"),
    };
    job.relationship_id = rel_id.clone();
    let step = FINALIZE_STEPS[0];
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

pub async fn start_unprotect(state: &Arc<Core>, vm: &str) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    let claim = claim(state, vm)?;
    let mut job = state
        .protection
        .jobs
        .create(&state.store, JobKind::DisableProtection, vm, &DISABLE_STEPS)
        .map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    save_job(state, &job);
    let state = state.clone();
    let ret = job.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let hosts = hosts(&state).unwrap_or_default();
        let cfg = state.protection.config.clone();
        for (step, host_id, remove) in
            [(DISABLE_STEPS[0], &rel.replica_host_id, true), (DISABLE_STEPS[1], &rel.primary_host_id, false)]
        {
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
        let step = DISABLE_STEPS[2];
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

pub async fn start_resync(state: &Arc<Core>, vm: &str) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    let requested = rel.state.next(Event::ResyncRequested).map_err(|e| Status::failed_precondition(e.to_string()))?;
    let primary = hosts(state)?
        .into_iter()
        .find(|h| h.id.as_str() == rel.primary_host_id)
        .ok_or_else(|| Status::failed_precondition("the primary host is no longer registered"))?;
    if !state.agents.connected(primary.id.as_str()) {
        return Err(Status::unavailable(format!("primary host {} is not connected", primary.name)));
    }
    let claim = claim(state, vm)?;
    let mut job = state.protection.jobs.create(&state.store, JobKind::Resync, vm, &RESYNC_STEPS).map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    job.total_bytes = rel.total_bytes;
    job.start_step(RESYNC_STEPS[0], primary.name.as_str(), now_ms());
    save_job(state, &job);
    let baseline = rel.resyncs_completed;
    let previous = rel.state;
    let mut marked = rel.clone();
    marked.state = requested;
    if let Err(e) = state.protection.save(&state.store, marked) {
        fail_job(state, &mut job, &format!("cannot record the resync request: {e}"));
        return Err(store_err(e));
    }
    let cmd = Command::RequestResync(v1::RequestResync { relationship_id: rel.id.clone(), vm: vm.to_owned() });
    if let Err(s) = state.agents.command(primary.id.as_str(), cmd, state.protection.config.command_timeout).await {
        if let Some(mut cur) = state.protection.get(&rel.id)
            && cur.state == requested
            && requested != previous
        {
            cur.state = previous;
            let _ = state.protection.save(&state.store, cur);
        }
        fail_job(state, &mut job, &format!("primary host {}: {}", primary.name, s.message()));
        return Err(Status::new(agent_code(&s), format!("{} (job {})", s.message(), job.id)));
    }
    job.succeed_step(RESYNC_STEPS[0], &format!("{} accepted the resync request", primary.name), now_ms());
    job.start_step(RESYNC_STEPS[1], "", now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let ok = wait_step(&state, &mut job, RESYNC_STEPS[1], |rel, connected| {
            let s = &rel.status;
            let blocks = format!(
                "{} blocks compared, {} sent (4 KiB sub-blocks), {} on the wire",
                s.resync_blocks_compared,
                s.resync_blocks_sent,
                siterecovery_proto::model::units::human_size(s.resync_wire_bytes)
            );
            if rel.resyncs_completed > baseline && rel.state == ReplicationState::Replicating {
                return Wait::Done(format!("resync done: {blocks}"));
            }
            if rel.state == ReplicationState::StoppedOnError {
                return Wait::Failed(if s.error.is_empty() {
                    "replication stopped on an error".into()
                } else {
                    s.error.clone()
                });
            }
            Wait::Progress { detail: format!("{}; {blocks}", progress_detail(rel, connected, "compared")) }
        })
        .await;
        if ok {
            job.succeed(now_ms());
            save_job(&state, &job);
        }
    });
    Ok(ret)
}

type JobStream = Pin<Box<dyn Stream<Item = Result<v1::Job, Status>> + Send>>;

impl ProtectionService {
    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        authorize(req, &self.vault_id, &[Role::Operator]).map(|_| ())
    }

    fn replica_of(&self, vm: &str) -> Result<(RelationshipRecord, String), Status> {
        let rel = protected(&self.core, vm)?;
        let hosts = hosts(&self.core)?;
        let name = host_name(&hosts, &rel.replica_host_id);
        Ok((rel, name))
    }

    async fn replica_command(&self, vm: &str, cmd: Command) -> Result<v1::CommandResult, Status> {
        let (rel, name) = self.replica_of(vm)?;
        self.core
            .agents
            .command(&rel.replica_host_id, cmd, self.core.protection.config.command_timeout)
            .await
            .map_err(|s| Status::new(agent_code(&s), format!("replica host {name}: {}", s.message())))
    }

    fn job(&self, id: &str) -> Result<JobRecord, Status> {
        self.core
            .protection
            .jobs
            .get(&self.core.store, id)
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("no job {id:?} (see `job list`)")))
    }
}

#[tonic::async_trait]
impl Protection for ProtectionService {
    async fn failover(&self, req: Request<v1::FailoverRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::failover::StartFailover::try_from(req.get_ref())?;
        let job = crate::failover::start_failover(&self.core, r).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn commit_failover(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let vm = crate::failover::request::vm_of(req.get_ref())?;
        let job = crate::failover::start_commit(&self.core, &vm).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn cleanup_test_failover(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let vm = crate::failover::request::vm_of(req.get_ref())?;
        let job = crate::failover::start_cleanup(&self.core, &vm).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn change_point(&self, req: Request<v1::ChangePointRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::failover::ChangePoint::try_from(req.get_ref())?;
        let job = crate::failover::start_change_point(&self.core, &r.vm, r.point)
            .await
            .map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn reprotect(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let vm = crate::failover::request::vm_of(req.get_ref())?;
        let job = crate::failover::start_reprotect(&self.core, &vm).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn create_network(&self, req: Request<v1::VmNetwork>) -> Result<Response<v1::VmNetwork>, Status> {
        self.auth(&req)?;
        let n = req.into_inner();
        let hosts = hosts(&self.core)?;
        let n = network::NetworkRequest::try_from(&n)?;
        let mut sites: Vec<SiteName> = hosts.iter().map(|h| h.site.clone()).collect();
        sites.sort();
        sites.dedup();
        let rec = NetworkStore::new(&self.core.store).add_network(store_err, |existing| {
            network::validate_network(&n, &sites, existing).map_err(network_status)
        })?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_networks(
        &self,
        req: Request<v1::ListNetworksRequest>,
    ) -> Result<Response<v1::ListNetworksResponse>, Status> {
        self.auth(&req)?;
        let nets = NetworkStore::new(&self.core.store).networks().map_err(store_err)?;
        Ok(Response::new(v1::ListNetworksResponse { networks: nets.iter().map(|n| n.to_proto()).collect() }))
    }

    async fn map_network(&self, req: Request<v1::NetworkMapping>) -> Result<Response<v1::NetworkMapping>, Status> {
        self.auth(&req)?;
        let m = network::MappingRequest::try_from(req.get_ref())?;
        let ns = NetworkStore::new(&self.core.store);
        let networks = ns.networks().map_err(store_err)?;
        let clouds = cloud_infos(&hosts(&self.core)?);
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        let rec = ns.add_mapping(store_err, |existing| {
            network::validate_mapping(&m, &networks, &clouds, &pairings, existing).map_err(network_status)
        })?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_network_mappings(
        &self,
        req: Request<v1::ListNetworkMappingsRequest>,
    ) -> Result<Response<v1::ListNetworkMappingsResponse>, Status> {
        self.auth(&req)?;
        let maps = NetworkStore::new(&self.core.store).mappings().map_err(store_err)?;
        Ok(Response::new(v1::ListNetworkMappingsResponse { mappings: maps.iter().map(|m| m.to_proto()).collect() }))
    }

    async fn create_plan(&self, req: Request<v1::RecoveryPlan>) -> Result<Response<v1::RecoveryPlan>, Status> {
        self.auth(&req)?;
        let spec = crate::plan::PlanSpec::try_from(req.get_ref()).map_err(|e| crate::error::status(&e))?;
        let rec = crate::plan::create(&self.core, spec).map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_plans(&self, req: Request<v1::ListPlansRequest>) -> Result<Response<v1::ListPlansResponse>, Status> {
        self.auth(&req)?;
        let plans = crate::plan::list(&self.core).map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(v1::ListPlansResponse { plans: plans.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn plan_failover(&self, req: Request<v1::PlanFailoverRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::plan::PlanFailover::try_from(req.get_ref()).map_err(|e| crate::error::status(&e))?;
        let job =
            crate::plan::start_failover(&self.core, &r.plan, r.kind).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn confirm_plan_action(
        &self,
        req: Request<v1::ConfirmPlanActionRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::plan::ConfirmAction::try_from(req.get_ref()).map_err(|e| crate::error::status(&e))?;
        let job = crate::plan::confirm(&self.core, &r.job).map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn create_policy(&self, req: Request<v1::Policy>) -> Result<Response<v1::Policy>, Status> {
        self.auth(&req)?;
        let p = policy::PolicyRequest::try_from(req.get_ref())?;
        let rec = policy::validate_policy(&p, self.core.protection.config.test_intervals).map_err(policy_status)?;
        if self.core.store.get::<PolicyRecord>(POLICIES, &rec.name).map_err(store_err)?.is_some() {
            return Err(policy_status(PolicyError::Exists(rec.name.to_string())));
        }
        self.core.store.put(POLICIES, &rec.name, &rec).map_err(store_err)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_policies(
        &self,
        req: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        self.auth(&req)?;
        let policies = self.core.store.list::<PolicyRecord>(POLICIES).map_err(store_err)?;
        Ok(Response::new(v1::ListPoliciesResponse { policies: policies.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn delete_policy(
        &self,
        req: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        self.auth(&req)?;
        let name: PolicyName = siterecovery_proto::model::wire::field("delete_policy.name", &req.get_ref().name)?;
        if self.core.store.get::<PolicyRecord>(POLICIES, &name).map_err(store_err)?.is_none() {
            return Err(policy_status(PolicyError::UnknownPolicy(name.to_string())));
        }
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        policy::check_policy_delete(&name, &pairings).map_err(policy_status)?;
        self.core.store.delete(POLICIES, &name).map_err(store_err)?;
        Ok(Response::new(v1::DeletePolicyResponse {}))
    }

    async fn pair_clouds(&self, req: Request<v1::CloudPairing>) -> Result<Response<v1::CloudPairing>, Status> {
        self.auth(&req)?;
        let r = policy::PairingRequest::try_from(req.get_ref())?;
        let hosts = hosts(&self.core)?;
        let policies = self.core.store.list::<PolicyRecord>(POLICIES).map_err(store_err)?;
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        let protected = protected_in_cloud(&self.core, &hosts, r.source_cloud.as_str());
        let rec = policy::validate_pairing(&r, &cloud_infos(&hosts), &policies, &pairings, protected)
            .map_err(pairing_status)?;
        self.core.store.put(PAIRINGS, &rec.source_cloud, &rec).map_err(store_err)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_pairings(
        &self,
        req: Request<v1::ListPairingsRequest>,
    ) -> Result<Response<v1::ListPairingsResponse>, Status> {
        self.auth(&req)?;
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        Ok(Response::new(v1::ListPairingsResponse { pairings: pairings.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn unpair_clouds(
        &self,
        req: Request<v1::UnpairCloudsRequest>,
    ) -> Result<Response<v1::UnpairCloudsResponse>, Status> {
        self.auth(&req)?;
        let source = req.into_inner().source_cloud;
        if self.core.store.get::<PairingRecord>(PAIRINGS, &source).map_err(store_err)?.is_none() {
            return Err(Status::not_found(format!("cloud {source:?} is not paired (see `cloud list`)")));
        }
        let hosts = hosts(&self.core)?;
        let n = protected_in_cloud(&self.core, &hosts, &source);
        if n > 0 {
            return Err(Status::failed_precondition(format!(
                "{n} VM(s) of cloud {source:?} are protected; unprotect them first"
            )));
        }
        self.core.store.delete(PAIRINGS, &source).map_err(store_err)?;
        Ok(Response::new(v1::UnpairCloudsResponse {}))
    }

    async fn protect(&self, req: Request<v1::ProtectRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let job = start_protect(&self.core, &r.vm, r.export_dir.trim()).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn import_initial(&self, req: Request<v1::ImportInitialRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let job = start_import(&self.core, &r.vm, r.dir.trim()).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn unprotect(&self, req: Request<v1::UnprotectRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let job = start_unprotect(&self.core, &req.into_inner().vm).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn resync(&self, req: Request<v1::ResyncRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let job = start_resync(&self.core, &req.into_inner().vm).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_points(
        &self,
        req: Request<v1::ListPointsRequest>,
    ) -> Result<Response<v1::ListPointsResponse>, Status> {
        self.auth(&req)?;
        let vm = req.into_inner().vm;
        let res = self.replica_command(&vm, Command::ListPoints(v1::ListPoints { vm: vm.clone() })).await?;
        let mut points = res.points;
        points.sort_by_key(|p| (p.created_unix_ms, p.seq));
        Ok(Response::new(v1::ListPointsResponse { points }))
    }

    async fn export_point(
        &self,
        req: Request<v1::ExportPointRequest>,
    ) -> Result<Response<v1::ExportPointResponse>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let point = if r.point.is_empty() { "latest".to_string() } else { r.point };
        let res = self
            .replica_command(&r.vm, Command::ExportPoint(v1::ExportPoint { vm: r.vm.clone(), point: point.clone() }))
            .await?;
        if res.uri.is_empty() {
            return Err(Status::internal("the replica host returned no export URI"));
        }
        let point_id = res.points.first().map(|p| p.id.clone()).unwrap_or(point);
        Ok(Response::new(v1::ExportPointResponse { uri: res.uri, point_id }))
    }

    async fn unexport_point(
        &self,
        req: Request<v1::UnexportPointRequest>,
    ) -> Result<Response<v1::UnexportPointResponse>, Status> {
        self.auth(&req)?;
        let vm = req.into_inner().vm;
        self.replica_command(&vm, Command::UnexportPoint(v1::UnexportPoint { vm: vm.clone() })).await?;
        Ok(Response::new(v1::UnexportPointResponse {}))
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.auth(&req)?;
        let jobs = self.core.store.list::<JobRecord>(crate::store::JOBS).map_err(store_err)?;
        Ok(Response::new(v1::ListJobsResponse { jobs: jobs.iter().map(|j| j.to_proto()).collect() }))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        Ok(Response::new(self.job(&req.into_inner().id)?.to_proto()))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<JobStream>, Status> {
        self.auth(&req)?;
        let id = req.into_inner().id;
        let first = self.job(&id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let state = self.core.clone();
        tokio::spawn(async move {
            let mut changes = state.protection.jobs.subscribe();
            let mut last: Option<JobRecord> = None;
            let mut cur = first;
            loop {
                if last.as_ref() != Some(&cur) {
                    if tx.send(Ok(cur.to_proto())).await.is_err() {
                        return;
                    }
                    if cur.state != JobState::Running {
                        return;
                    }
                    last = Some(cur.clone());
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = tx.closed() => return,
                    _ = state.shutdown.cancelled() => return,
                }
                match state.protection.jobs.get(&state.store, &id) {
                    Ok(Some(j)) => cur = j,
                    Ok(None) => {
                        let _ = tx.send(Err(Status::not_found(format!("job {id} was deleted")))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(store_err(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
