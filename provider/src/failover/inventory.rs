//! Failovers an agent made on its own: the replica host's inventory reports a VM
//! failed over that the provider did not fail over (the agent did it while the
//! provider was down, or a failover job was cut by a provider restart).

use siterecovery_proto::model::FailoverKind;

use super::common::update;
use crate::inventory::{HostRecord, VmRecord};
use crate::jobs::{JobKind, now_ms};
use crate::relationship::{Core, Event, FailoverRecord, ReplicationState, save_job};

/// Failovers the replica host reports that the provider did not make (an agent failed
/// the VM over on its own while the provider was down, or a failover job was cut by a
/// provider restart): the relationship follows and a job records it.
pub fn on_inventory(state: &Core, host: &HostRecord, vms: &[VmRecord]) {
    for vm in vms {
        let Some(f) = &vm.failover else { continue };
        if f.kind == FailoverKind::Test || f.test_of.is_some() {
            continue;
        }
        let rel = state.protection.get(f.relationship_id.as_str()).or_else(|| state.protection.of_vm(vm.name.as_str()));
        let Some(rel) = rel else { continue };
        if host.id != rel.replica_host_id.as_str() || vm.name != rel.vm.as_str() {
            continue;
        }
        let known = match rel.state {
            ReplicationState::Committed => true,
            ReplicationState::FailedOver => !f.committed,
            _ => false,
        };
        if known || state.protection.busy(vm.name.as_str()) {
            continue;
        }
        let now = now_ms();
        let updated = update(state, &rel.id, |r| {
            r.state = r.state.next(Event::LocalFailover { committed: f.committed })?;
            let mut rec = r.failover.clone().unwrap_or(FailoverRecord {
                kind: f.kind,
                point_id: f.point_id.to_string(),
                job_id: String::new(),
                started_unix_ms: if f.started_unix_ms > 0 { f.started_unix_ms } else { now },
                committed_unix_ms: 0,
            });
            rec.point_id = f.point_id.to_string();
            if f.committed && rec.committed_unix_ms == 0 {
                rec.committed_unix_ms = now;
            }
            r.failover = Some(rec);
            Ok(())
        });
        let rel = match updated {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(vm = %vm.name, "reported failover not applied: {e}");
                continue;
            }
        };
        let step = "Local failover detected";
        let mut job =
            match state.protection.jobs.create(&state.store, JobKind::LocalFailover, vm.name.as_str(), &[step]) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(vm = %vm.name, "cannot record the local failover job: {e:#}");
                    continue;
                }
            };
        job.relationship_id = rel.id.clone();
        job.start_step(step, "", now);
        let next = if f.committed {
            format!("protect it again with `reprotect {}`", vm.name)
        } else {
            format!("`failover commit {}`, then `reprotect {}`", vm.name, vm.name)
        };
        job.succeed_step(
            step,
            &format!(
                "host {} reports VM {} failed over on its own ({} failover from point {}{}); replication is now {}; {next}",
                host.name,
                vm.name,
                f.kind,
                f.point_id,
                if f.committed { ", committed" } else { "" },
                rel.state.as_str()
            ),
            now,
        );
        job.succeed(now);
        save_job(state, &job);
        tracing::warn!(vm = %vm.name, host = %host.name, "local failover detected");
    }
}
