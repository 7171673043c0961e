//! Carries out one validated provider command ([`super::command`]) with the handlers
//! (`vm`, `protection`) and turns the outcome into the `CommandResult` sent back, its
//! error code from [`CommandError::code`].

use siterecovery_proto::model::WireError;
use siterecovery_proto::v1;

use super::command::{Command, CommandKind};
use super::error::CommandError;
use crate::protection::{Protection, ProtectionError};
use crate::vm::{VmError, VmManager};

fn ok(id: u64) -> v1::CommandResult {
    v1::CommandResult { command_id: id, ok: true, ..Default::default() }
}

fn fail(id: u64, e: &CommandError) -> v1::CommandResult {
    let error = e.to_string();
    tracing::warn!(command_id = id, "command failed: {error}");
    v1::CommandResult { command_id: id, ok: false, code: e.code() as i32, error, ..Default::default() }
}

/// The result of a command refused at the boundary: InvalidArgument naming the field.
pub fn refused(id: u64, e: WireError) -> v1::CommandResult {
    fail(id, &CommandError::Refused(e))
}

fn vm_result(id: u64, r: Result<Option<v1::Vm>, VmError>) -> v1::CommandResult {
    match r {
        Ok(vm) => v1::CommandResult { vm, ..ok(id) },
        Err(e) => fail(id, &e.into()),
    }
}

fn protection_result<T>(
    id: u64,
    r: Result<T, ProtectionError>,
    fill: impl FnOnce(T, v1::CommandResult) -> v1::CommandResult,
) -> v1::CommandResult {
    match r {
        Ok(v) => fill(v, ok(id)),
        Err(e) => fail(id, &e.into()),
    }
}

/// Runs `c` with the handlers, which take its validated values as they are.
pub async fn execute(vms: &VmManager, protection: &Protection, c: Command) -> v1::CommandResult {
    let id = c.id;
    let done = |(), r| r;
    let with_vm = |vm, r| v1::CommandResult { vm: Some(vm), ..r };
    let with_bytes = |bytes, r| v1::CommandResult { bytes, ..r };
    match c.kind {
        CommandKind::CreateVm { name, disk_sizes, nics, machine, start } => {
            vm_result(id, vms.create(&name, &disk_sizes, &nics, machine, start).await.map(Some))
        }
        CommandKind::DeleteVm { name } => vm_result(id, vms.delete(&name).await.map(|()| None)),
        CommandKind::StartVm { name } => vm_result(id, vms.start(&name).await.map(Some)),
        CommandKind::StopVm { name } => vm_result(id, vms.stop(&name).await.map(Some)),
        CommandKind::PrepareReplica(c) => protection_result(id, protection.prepare_replica(c).await, done),
        CommandKind::StartReplication(c) => protection_result(id, protection.start_replication(c).await, done),
        CommandKind::StopReplication(c) => protection_result(id, protection.stop_replication(c).await, done),
        CommandKind::RequestResync(c) => protection_result(id, protection.request_resync(c).await, done),
        CommandKind::ExportInitial(c) => protection_result(id, protection.export_initial(c).await, with_bytes),
        CommandKind::ImportInitial(c) => protection_result(id, protection.import_initial(c).await, with_bytes),
        CommandKind::ListPoints { vm } => {
            protection_result(id, protection.list_points(&vm), |points, r| v1::CommandResult { points, ..r })
        }
        CommandKind::ExportPoint { vm, point } => {
            protection_result(id, protection.export_point(&vm, point), |(uri, point_id), r| {
                let points = vec![v1::RecoveryPoint { id: point_id, ..Default::default() }];
                v1::CommandResult { uri, points, ..r }
            })
        }
        CommandKind::UnexportPoint { vm } => {
            protection.unexport_point(&vm);
            ok(id)
        }
        CommandKind::PrepareFailover(c) => protection_result(id, protection.prepare_failover(c).await, |point, r| {
            v1::CommandResult { points: vec![point], ..r }
        }),
        CommandKind::Failover(c) => protection_result(id, protection.failover(c).await, with_vm),
        CommandKind::ChangePoint(c) => protection_result(id, protection.change_point(c).await, with_vm),
        CommandKind::CommitFailover(c) => protection_result(id, protection.commit_failover(c).await, with_vm),
        CommandKind::CleanupTestFailover(c) => protection_result(id, protection.cleanup_test_failover(c).await, done),
    }
}
