//! Resync: mark the relationship as needing a resync, ask the primary host to compare
//! and resend what differs, and wait until the relationship replicates again after one
//! more completed resync (the relationship's `resyncs_completed` grows).

use std::sync::Arc;

use siterecovery_proto::model::VmName;
use siterecovery_proto::model::units::human_size;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::ProtectionError;
use crate::jobs::{JobKind, JobRecord, ResyncStep, now_ms};
use crate::relationship::{
    Core, Event, ReplicationState, Wait, claim_vm, fail_job, find_protected, list_hosts, progress_detail, save_job,
    wait_step,
};

pub async fn start_resync(state: &Arc<Core>, vm: &VmName) -> Result<JobRecord, ProtectionError> {
    let vm = vm.as_str();
    let rel = find_protected(state, vm)?;
    let requested = rel.state.next(Event::ResyncRequested)?;
    let primary = list_hosts(state)?
        .into_iter()
        .find(|h| h.id.as_str() == rel.primary_host_id)
        .ok_or(ProtectionError::PrimaryGone)?;
    if !state.agents.connected(primary.id.as_str()) {
        return Err(ProtectionError::PrimaryNotConnected(primary.name.to_string()));
    }
    let claim = claim_vm(state, vm)?;
    let mut job = state.protection.jobs.create(&state.store, JobKind::Resync, vm, ResyncStep::ALL)?;
    job.relationship_id = rel.id.clone();
    job.total_bytes = rel.total_bytes;
    job.start_step(ResyncStep::RequestResync, primary.name.as_str(), now_ms());
    save_job(state, &job);
    let baseline = rel.resyncs_completed;
    let previous = rel.state;
    let mut marked = rel.clone();
    marked.state = requested;
    if let Err(e) = state.protection.save(&state.store, marked) {
        fail_job(state, &mut job, &format!("cannot record the resync request: {e}"));
        return Err(e.into());
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
        return Err(ProtectionError::agent("", s).in_job(&job.id));
    }
    job.succeed_step(ResyncStep::RequestResync, &format!("{} accepted the resync request", primary.name), now_ms());
    job.start_step(ResyncStep::Resynchronise, "", now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let ok = wait_step(&state, &mut job, ResyncStep::Resynchronise.name(), |rel, connected| {
            let s = &rel.status;
            let blocks = format!(
                "{} blocks compared, {} sent (4 KiB sub-blocks), {} on the wire",
                s.resync_blocks_compared,
                s.resync_blocks_sent,
                human_size(s.resync_wire_bytes)
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
