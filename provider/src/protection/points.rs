//! Recovery points of a protected VM, read on its replica host: list them, export one
//! over NBD, end the export.

use siterecovery_proto::model::{PointSelector, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::ProtectionError;
use crate::relationship::{Core, find_protected, host_name, list_hosts};

async fn replica_command(state: &Core, vm: &VmName, cmd: Command) -> Result<v1::CommandResult, ProtectionError> {
    let rel = find_protected(state, vm.as_str())?;
    let name = host_name(&list_hosts(state)?, &rel.replica_host_id);
    state
        .agents
        .command(&rel.replica_host_id, cmd, state.protection.config.command_timeout)
        .await
        .map_err(|s| ProtectionError::agent(format!("replica host {name}: "), s))
}

/// The recovery points on the replica host, oldest first.
pub async fn list_points(state: &Core, vm: &VmName) -> Result<Vec<v1::RecoveryPoint>, ProtectionError> {
    let res = replica_command(state, vm, Command::ListPoints(v1::ListPoints { vm: vm.to_string() })).await?;
    let mut points = res.points;
    points.sort_by_key(|p| (p.created_unix_ms, p.seq));
    Ok(points)
}

/// An exported point: where to read it, and which point it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub uri: String,
    pub point_id: String,
}

pub async fn export_point(state: &Core, vm: &VmName, point: PointSelector) -> Result<Export, ProtectionError> {
    let point = point.to_string();
    let cmd = Command::ExportPoint(v1::ExportPoint { vm: vm.to_string(), point: point.clone() });
    let res = replica_command(state, vm, cmd).await?;
    if res.uri.is_empty() {
        return Err(ProtectionError::NoExportUri);
    }
    let point_id = res.points.first().map(|p| p.id.clone()).unwrap_or(point);
    Ok(Export { uri: res.uri, point_id })
}

pub async fn unexport_point(state: &Core, vm: &VmName) -> Result<(), ProtectionError> {
    replica_command(state, vm, Command::UnexportPoint(v1::UnexportPoint { vm: vm.to_string() })).await.map(|_| ())
}
