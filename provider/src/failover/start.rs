//! Starting a test, planned or unplanned failover: the refusals checked before the
//! job exists, the job's first step, and the start of the VM on the replica host that
//! planned and unplanned failover share.

use std::sync::Arc;

use siterecovery_proto::model::{FailoverKind, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::common::{
    claim, disks_text, host_name, hosts, nics_text, protected, record_vm, refuse, reported_point, require_connected,
    update, vm_failover,
};
use super::{FailoverError, FailoverOptions, FailoverType, StartFailover, planned, test_failover, unplanned};
use crate::inventory::VmRecord;
use crate::jobs::{Claim, JobRecord, now_ms};
use crate::relationship::{Core, Event, FailoverRecord, RelationshipRecord, fail_job, save_job};
use crate::store::VMS;

pub(crate) const CHECK: &str = "Check prerequisites";
pub(crate) const START_ON_REPLICA: &str = "Start the VM on the replica host";

/// `Failover` RPC.
pub async fn start_failover(state: &Arc<Core>, r: StartFailover) -> Result<JobRecord, FailoverError> {
    let opts = FailoverOptions {
        kind: r.kind,
        point: r.point,
        test_network: r.test_network,
        shutdown_primary: r.shutdown_primary,
        prepared: None,
    };
    start_vm_failover(state, &r.vm, opts).await
}

/// Checks that `vm` may fail over as asked, then starts the job.
pub async fn start_vm_failover(
    state: &Arc<Core>,
    vm: &VmName,
    opts: FailoverOptions,
) -> Result<JobRecord, FailoverError> {
    let rel = protected(state, vm)?;
    let hosts = hosts(state)?;
    let primary = host_name(&hosts, &rel.primary_host_id);
    match opts.kind {
        FailoverType::Test => {
            if let Some(t) = &rel.test_failover {
                return Err(FailoverError::Refused(format!(
                    "a test failover of VM {vm} is running (test VM {}, job {}): `failover cleanup {vm}` first",
                    t.test_vm, t.job_id
                )));
            }
            rel.state.next(Event::TestFailover).map_err(|e| refuse(vm, e, ""))?;
        }
        FailoverType::Planned | FailoverType::Unplanned => {
            let planned = opts.kind == FailoverType::Planned;
            if let Some(t) = &rel.test_failover {
                return Err(FailoverError::Refused(format!(
                    "a test failover of VM {vm} is running (test VM {}): `failover cleanup {vm}` first",
                    t.test_vm
                )));
            }
            rel.state.next(Event::FailoverStarted { planned }).map_err(|e| {
                let hint = if planned && !rel.state.in_failover() {
                    format!("a planned failover needs replication running; `failover unplanned {vm}` starts from a recovery point")
                } else {
                    String::new()
                };
                refuse(vm, e, &hint)
            })?;
            if planned && opts.prepared.is_none() && !state.agents.connected(&rel.primary_host_id) {
                return Err(FailoverError::Refused(format!(
                    "primary host {primary} is not connected: a planned failover needs it to stop VM {vm} and ship its last changes; \
                     use `failover unplanned {vm}` (changes since the last recovery point are lost)"
                )));
            }
        }
    }
    require_connected(state, &hosts, &rel.replica_host_id, "replica")?;
    let claim = claim(state, vm)?;
    let mut job = state.protection.jobs.create(&state.store, opts.kind.job_kind(), vm.as_str(), opts.kind.steps())?;
    job.relationship_id = rel.id.clone();
    job.start_step(CHECK, "", now_ms());
    if opts.kind != FailoverType::Test {
        let planned = opts.kind == FailoverType::Planned;
        if let Err(e) = update(state, &rel.id, |r| {
            r.state = r.state.next(Event::FailoverStarted { planned })?;
            Ok(())
        }) {
            fail_job(state, &mut job, &e.to_string());
            return Err(FailoverError::InJob { job: job.id.clone(), source: Box::new(e) });
        }
    }
    job.succeed_step(
        CHECK,
        &format!(
            "{} failover of {vm}: primary {primary}, replica {}; replication was {}",
            opts.kind.as_str(),
            host_name(&hosts, &rel.replica_host_id),
            rel.state.as_str()
        ),
        now_ms(),
    );
    save_job(state, &job);
    tokio::spawn(run_failover(state.clone(), job.clone(), rel, opts, claim));
    Ok(job)
}

/// What a failover task works with.
pub(crate) struct Run {
    pub state: Arc<Core>,
    pub job: JobRecord,
    pub rel: RelationshipRecord,
    pub opts: FailoverOptions,
    pub pname: String,
    pub rname: String,
    /// The NICs the VM gets on the replica host (mapped networks, reserved addresses).
    pub failover_nics: Vec<v1::Nic>,
    pub macs: Vec<String>,
}

impl Run {
    pub fn fail(&mut self, error: &str) {
        fail_job(&self.state, &mut self.job, error);
    }

    pub fn save(&self) {
        save_job(&self.state, &self.job);
    }
}

async fn run_failover(state: Arc<Core>, job: JobRecord, rel: RelationshipRecord, opts: FailoverOptions, claim: Claim) {
    let hosts = super::common::hosts(&state).unwrap_or_default();
    let (pname, rname) = (host_name(&hosts, &rel.primary_host_id), host_name(&hosts, &rel.replica_host_id));
    let macs: Vec<String> = state
        .store
        .get::<VmRecord>(VMS, &rel.vm)
        .ok()
        .flatten()
        .map(|v| v.nics.iter().map(|n| n.mac.clone()).collect())
        .unwrap_or_default();
    let failover_nics: Vec<v1::Nic> = rel
        .addresses
        .iter()
        .map(|r| r.failover_nic(macs.get(r.nic as usize).map(String::as_str).unwrap_or("")))
        .collect();
    let kind = opts.kind;
    let mut run = Run { state, job, rel, opts, pname, rname, failover_nics, macs };
    let done = match kind {
        FailoverType::Test => test_failover::run(&mut run).await,
        FailoverType::Planned => planned::run(&mut run, claim).await,
        FailoverType::Unplanned => unplanned::run(&mut run).await,
    };
    if done {
        run.job.succeed(now_ms());
        run.save();
        tracing::info!(job = %run.job.id, vm = %run.rel.vm, kind = kind.as_str(), "failover done");
    }
}

/// Starts the VM on the replica host from `point` (planned and unplanned; the VM's
/// own NICs) and records the VM; the point it runs from (else `asked`). `None` when
/// the job failed (the failover is aborted: the VM did not start).
pub(crate) async fn start_on_replica(
    run: &mut Run,
    point: &str,
    asked: &str,
    planned: bool,
) -> Option<(String, Option<VmRecord>)> {
    let vm = run.rel.vm.clone();
    let cmd = Command::Failover(v1::Failover {
        relationship_id: run.rel.id.clone(),
        vm: vm.clone(),
        point: point.to_owned(),
        nics: run.failover_nics.clone(),
        test: false,
        test_vm_name: String::new(),
        planned,
    });
    let timeout = run.state.protection.config.command_timeout;
    let res = match run.state.agents.command(&run.rel.replica_host_id, cmd, timeout).await {
        Ok(r) => r,
        Err(s) => {
            super::common::abort(&run.state, &run.rel.id);
            let e = format!("replica host {}: {}", run.rname, s.message());
            run.fail(&e);
            return None;
        }
    };
    let point_id = reported_point(&res, asked);
    let kind = if planned { FailoverKind::Planned } else { FailoverKind::Unplanned };
    let rec = record_vm(
        &run.state,
        &res,
        &run.rel.replica_host_id,
        &run.rel.vm,
        &run.failover_nics,
        vm_failover(&run.rel, kind, &point_id, planned, ""),
    );
    Some((point_id, rec))
}

/// Records on the relationship that the VM runs on the replica host from `point_id`
/// (committed at once for a planned failover).
pub(crate) fn failover_done(run: &mut Run, point_id: &str, planned: bool) -> bool {
    let job_id = run.job.id.clone();
    let kind = if planned { FailoverKind::Planned } else { FailoverKind::Unplanned };
    let result = update(&run.state, &run.rel.id, |r| {
        r.state = r.state.next(Event::FailoverDone { committed: planned })?;
        r.failover = Some(FailoverRecord {
            kind,
            point_id: point_id.to_owned(),
            job_id,
            started_unix_ms: now_ms(),
            committed_unix_ms: if planned { now_ms() } else { 0 },
        });
        Ok(())
    });
    match result {
        Ok(_) => true,
        Err(e) => {
            run.fail(&e.to_string());
            false
        }
    }
}

/// The detail of the "start on the replica" step.
pub(crate) fn started_text(run: &Run, point_id: &str, rec: Option<&VmRecord>) -> String {
    format!(
        "VM {} runs on {} from point {point_id}{}{}",
        run.rel.vm,
        run.rname,
        nics_text(&run.failover_nics),
        disks_text(rec)
    )
}
