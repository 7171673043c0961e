//! The provider's commands as domain values: every `ProviderMessage` is converted here,
//! once, with `TryFrom`, before any handler runs. A refused field is a [`WireError`]
//! naming it (`failover.test_vm_name`, `prepare_replica.disks[1].id`) and the rule it
//! broke; the channel answers it with an `InvalidArgument` result.
//!
//! The protection commands become the handlers' own request values
//! ([`crate::protection::request`]); the handlers take them as they are.

use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};

use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{FailoverKind, NameError, NetworkName, PointId, PointSelector, PointSeq, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command as Wire;

use crate::protection::request;

/// One command from the provider, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    pub id: u64,
    pub kind: CommandKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CommandKind {
    CreateVm { name: VmName, disk_sizes: Vec<u64>, nics: Vec<v1::Nic>, machine: crate::vm::MachineConfig, start: bool },
    DeleteVm { name: VmName },
    StartVm { name: VmName },
    StopVm { name: VmName },
    PrepareReplica(request::PrepareReplica),
    StartReplication(request::StartReplication),
    StopReplication(request::StopReplication),
    RequestResync(request::RequestResync),
    ListPoints { vm: VmName },
    ExportPoint { vm: VmName, point: PointSelector },
    UnexportPoint { vm: VmName },
    PrepareFailover(request::PrepareFailover),
    Failover(request::Failover),
    ChangePoint(request::ChangePoint),
    CommitFailover(request::CommitFailover),
    CleanupTestFailover(request::CleanupTestFailover),
    ExportInitial(request::ExportInitial),
    ImportInitial(request::ImportInitial),
}

/// A point as the provider (or an operator on this host) names it: a selector, or (as
/// the agent always accepted) the bare sequence number.
pub fn point_selector(s: &str) -> Result<PointSelector, NameError> {
    if !s.is_empty()
        && s.len() <= 20
        && s.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = s.parse::<u64>()
    {
        return Ok(PointSelector::Id(PointId::from_seq(PointSeq(n))));
    }
    PointSelector::new(s)
}

fn point(field: &str, s: &str) -> Result<PointSelector, WireError> {
    point_selector(s).map_err(|source| WireError::Invalid { field: field.to_owned(), source })
}

/// A directory on this host: absolute, no `..`, no NUL.
fn directory(field: &str, s: &str) -> Result<PathBuf, WireError> {
    if s.is_empty() {
        return Err(WireError::missing(field));
    }
    let p = Path::new(s);
    if !p.is_absolute() || s.contains('\0') || p.components().any(|c| c == Component::ParentDir) {
        return Err(WireError::rule(field, format!("{s:?} must be an absolute path without '..'")));
    }
    Ok(p.to_path_buf())
}

/// A host:port the sender dials.
fn address(field: &str, s: &str) -> Result<String, WireError> {
    if s.is_empty() {
        return Err(WireError::missing(field));
    }
    let host = siterecovery_certs::host_of(s);
    if host.is_empty()
        || s.len() > 255
        || s.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'/')
    {
        return Err(WireError::rule(field, format!("{s:?} is not a host:port address")));
    }
    Ok(s.to_owned())
}

fn nics(field: &str, nics: &[v1::Nic]) -> Result<Vec<v1::Nic>, WireError> {
    for (i, n) in nics.iter().enumerate() {
        wire::optional::<NetworkName>(&format!("{field}[{i}].network"), &n.network)?;
        if !n.ip.is_empty() {
            let (addr, prefix) = n.ip.split_once('/').unwrap_or((&n.ip, "0"));
            if addr.parse::<IpAddr>().is_err() || prefix.parse::<u8>().is_err() {
                return Err(WireError::rule(format!("{field}[{i}].ip"), format!("{:?} is not an IP address", n.ip)));
            }
        }
        let hex = |p: &str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit());
        let mac_ok = n.mac.is_empty() || (n.mac.split(':').count() == 6 && n.mac.split(':').all(hex));
        if !mac_ok {
            return Err(WireError::rule(format!("{field}[{i}].mac"), format!("{:?} is not a MAC address", n.mac)));
        }
    }
    Ok(nics.to_vec())
}

impl TryFrom<v1::ProviderMessage> for Command {
    type Error = WireError;
    fn try_from(m: v1::ProviderMessage) -> Result<Self, WireError> {
        use wire::{field, optional};
        let kind = match m
            .command
            .ok_or_else(|| WireError::rule("command", "unknown command (is this agent older than the provider?)"))?
        {
            Wire::CreateVm(c) => CommandKind::CreateVm {
                name: field("create_vm.name", &c.name)?,
                nics: nics("create_vm.nics", &c.nics)?,
                disk_sizes: c.disk_sizes,
                machine: crate::vm::MachineConfig::from_wire(c.machine.as_ref(), "create_vm.machine")
                    .map_err(|e| WireError::rule("create_vm.machine", e))?,
                start: c.start,
            },
            Wire::DeleteVm(c) => CommandKind::DeleteVm { name: field("delete_vm.name", &c.name)? },
            Wire::StartVm(c) => CommandKind::StartVm { name: field("start_vm.name", &c.name)? },
            Wire::StopVm(c) => CommandKind::StopVm { name: field("stop_vm.name", &c.name)? },
            Wire::PrepareReplica(c) => CommandKind::PrepareReplica(request::PrepareReplica {
                relationship: field("prepare_replica.relationship_id", &c.relationship_id)?,
                vm: field("prepare_replica.vm", &c.vm)?,
                primary: field("prepare_replica.primary_host_id", &c.primary_host_id)?,
                disks: c
                    .disks
                    .iter()
                    .enumerate()
                    .map(|(i, d)| {
                        Ok(request::DiskSize {
                            id: field(&format!("prepare_replica.disks[{i}].id"), &d.id)?,
                            size_bytes: d.size_bytes,
                        })
                    })
                    .collect::<Result<_, WireError>>()?,
                settings: c.settings.unwrap_or_default(),
                adopt_vm_disks: c.adopt_vm_disks,
                machine: crate::vm::MachineConfig::from_wire(c.machine.as_ref(), "prepare_replica.machine")
                    .map_err(|e| WireError::rule("prepare_replica.machine", e))?,
            }),
            Wire::StartReplication(c) => CommandKind::StartReplication(request::StartReplication {
                replica_address: address("start_replication.replica_address", &c.replica_address)?,
                relationship: field("start_replication.relationship_id", &c.relationship_id)?,
                vm: field("start_replication.vm", &c.vm)?,
                replica_host: field("start_replication.replica_host_id", &c.replica_host_id)?,
                settings: c.settings.unwrap_or_default(),
                resync_initial: c.resync_initial,
            }),
            Wire::StopReplication(c) => CommandKind::StopReplication(request::StopReplication {
                relationship: field("stop_replication.relationship_id", &c.relationship_id)?,
                vm: field("stop_replication.vm", &c.vm)?,
                remove_replica: c.remove_replica,
            }),
            Wire::RequestResync(c) => CommandKind::RequestResync(request::RequestResync {
                relationship: field("request_resync.relationship_id", &c.relationship_id)?,
                vm: field("request_resync.vm", &c.vm)?,
            }),
            Wire::ListPoints(c) => CommandKind::ListPoints { vm: field("list_points.vm", &c.vm)? },
            Wire::ExportPoint(c) => CommandKind::ExportPoint {
                vm: field("export_point.vm", &c.vm)?,
                point: point("export_point.point", &c.point)?,
            },
            Wire::UnexportPoint(c) => CommandKind::UnexportPoint { vm: field("unexport_point.vm", &c.vm)? },
            Wire::PrepareFailover(c) => CommandKind::PrepareFailover(request::PrepareFailover {
                relationship: field("prepare_failover.relationship_id", &c.relationship_id)?,
                vm: field("prepare_failover.vm", &c.vm)?,
            }),
            Wire::Failover(c) => {
                let kind = if c.test {
                    FailoverKind::Test
                } else if c.planned {
                    FailoverKind::Planned
                } else {
                    FailoverKind::Unplanned
                };
                let nics = nics("failover.nics", &c.nics)?;
                CommandKind::Failover(request::Failover {
                    relationship: field("failover.relationship_id", &c.relationship_id)?,
                    vm: field("failover.vm", &c.vm)?,
                    point: point("failover.point", &c.point)?,
                    kind,
                    test_vm: optional("failover.test_vm_name", &c.test_vm_name)?,
                    nics,
                })
            }
            Wire::ChangePoint(c) => CommandKind::ChangePoint(request::ChangePoint {
                vm: field("change_point.vm", &c.vm)?,
                point: point("change_point.point", &c.point)?,
            }),
            Wire::CommitFailover(c) => {
                CommandKind::CommitFailover(request::CommitFailover { vm: field("commit_failover.vm", &c.vm)? })
            }
            Wire::CleanupTestFailover(c) => CommandKind::CleanupTestFailover(request::CleanupTestFailover {
                vm: field("cleanup_test_failover.vm", &c.vm)?,
                test_vm: optional("cleanup_test_failover.test_vm_name", &c.test_vm_name)?,
            }),
            Wire::ExportInitial(c) => CommandKind::ExportInitial(request::ExportInitial {
                replica_address: address("export_initial.replica_address", &c.replica_address)?,
                relationship: field("export_initial.relationship_id", &c.relationship_id)?,
                vm: field("export_initial.vm", &c.vm)?,
                replica_host: field("export_initial.replica_host_id", &c.replica_host_id)?,
                settings: c.settings.unwrap_or_default(),
                dir: directory("export_initial.dir", &c.dir)?,
            }),
            Wire::ImportInitial(c) => CommandKind::ImportInitial(request::ImportInitial {
                relationship: field("import_initial.relationship_id", &c.relationship_id)?,
                vm: field("import_initial.vm", &c.vm)?,
                dir: directory("import_initial.dir", &c.dir)?,
            }),
            // Pushes, handled by the session before commands are converted.
            Wire::CertificateIssued(_) | Wire::RevocationList(_) => {
                return Err(WireError::rule("command", "a push is not a command"));
            }
        };
        Ok(Command { id: m.command_id, kind })
    }
}
