//! Carries out one validated provider command ([`super::command`]) with the handlers
//! (`vm`, `protection`) and turns the outcome into the `CommandResult` sent back.

use siterecovery_proto::model::WireError;
use siterecovery_proto::v1;

use super::command::{Command, CommandKind};
use crate::protection::{Protection, ProtectionError};
use crate::vm::{VmError, VmManager};

fn ok(id: u64) -> v1::CommandResult {
    v1::CommandResult { command_id: id, ok: true, ..Default::default() }
}

fn fail(id: u64, code: v1::ErrorCode, error: String) -> v1::CommandResult {
    tracing::warn!(command_id = id, "command failed: {error}");
    v1::CommandResult { command_id: id, ok: false, code: code as i32, error, ..Default::default() }
}

/// The result of a command refused at the boundary: InvalidArgument naming the field.
pub fn refused(id: u64, e: &WireError) -> v1::CommandResult {
    fail(id, v1::ErrorCode::InvalidArgument, e.to_string())
}

fn vm_result(id: u64, r: Result<Option<v1::Vm>, VmError>) -> v1::CommandResult {
    match r {
        Ok(vm) => v1::CommandResult { vm, ..ok(id) },
        Err(e) => fail(id, e.code(), e.to_string()),
    }
}

fn protection_result<T>(
    id: u64,
    r: Result<T, ProtectionError>,
    fill: impl FnOnce(T, v1::CommandResult) -> v1::CommandResult,
) -> v1::CommandResult {
    match r {
        Ok(v) => fill(v, ok(id)),
        Err(e) => fail(id, e.code(), e.to_string()),
    }
}

/// Runs `c`. The handlers that still take a `v1` message get `wire`, whose fields the
/// conversion has checked.
pub async fn execute(vms: &VmManager, protection: &Protection, c: Command) -> v1::CommandResult {
    let id = c.id;
    let done = |(), r| r;
    let with_vm = |vm, r| v1::CommandResult { vm: Some(vm), ..r };
    let with_bytes = |bytes, r| v1::CommandResult { bytes, ..r };
    match c.kind {
        CommandKind::CreateVm { name, disk_sizes, nics, start } => {
            vm_result(id, vms.create(name.as_str(), &disk_sizes, &nics, start).await.map(Some))
        }
        CommandKind::DeleteVm { name } => vm_result(id, vms.delete(name.as_str()).await.map(|()| None)),
        CommandKind::StartVm { name } => vm_result(id, vms.start(name.as_str()).await.map(Some)),
        CommandKind::StopVm { name } => vm_result(id, vms.stop(name.as_str()).await.map(Some)),
        CommandKind::PrepareReplica { wire, .. } => protection_result(id, protection.prepare_replica(wire).await, done),
        CommandKind::StartReplication { wire, .. } => {
            protection_result(id, protection.start_replication(wire).await, done)
        }
        CommandKind::StopReplication { wire, .. } => {
            protection_result(id, protection.stop_replication(wire).await, done)
        }
        CommandKind::RequestResync { wire, .. } => protection_result(id, protection.request_resync(wire).await, done),
        CommandKind::ExportInitial { wire, .. } => {
            protection_result(id, protection.export_initial(wire).await, with_bytes)
        }
        CommandKind::ImportInitial { wire, .. } => {
            protection_result(id, protection.import_initial(wire).await, with_bytes)
        }
        CommandKind::ListPoints { vm } => {
            protection_result(id, protection.list_points(vm.as_str()), |points, r| v1::CommandResult { points, ..r })
        }
        CommandKind::ExportPoint { vm, point } => {
            protection_result(id, protection.export_point(vm.as_str(), &point.to_string()), |(uri, point_id), r| {
                let points = vec![v1::RecoveryPoint { id: point_id, ..Default::default() }];
                v1::CommandResult { uri, points, ..r }
            })
        }
        CommandKind::UnexportPoint { vm } => {
            protection.unexport_point(vm.as_str());
            ok(id)
        }
        CommandKind::PrepareFailover { wire, .. } => {
            protection_result(id, protection.prepare_failover(wire).await, |point, r| v1::CommandResult {
                points: vec![point],
                ..r
            })
        }
        CommandKind::Failover { kind, wire, .. } => {
            protection_result(id, protection.failover(wire, kind).await, with_vm)
        }
        CommandKind::ChangePoint { wire, .. } => protection_result(id, protection.change_point(wire).await, with_vm),
        CommandKind::CommitFailover { wire, .. } => {
            protection_result(id, protection.commit_failover(wire).await, with_vm)
        }
        CommandKind::CleanupTestFailover { wire, .. } => {
            protection_result(id, protection.cleanup_test_failover(wire).await, done)
        }
    }
}
