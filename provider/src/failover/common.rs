//! What every failover operation shares: finding the VM's relationship and hosts,
//! refusals, the commands that stop or drain the primary, the replica's start of the
//! VM (planned and unplanned alike), and recording the VM an agent returned.

use std::time::Duration;

use siterecovery_proto::model::{FailoverKind, PointSelector, VmName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;
use tonic::Code;

use super::FailoverError;
use crate::inventory::{FailoverRecord as VmFailover, HostRecord, VmRecord};
use crate::jobs::{Claim, now_ms};
use crate::relationship::{Core, Event, InvalidTransition, RelationshipRecord};
use crate::store::{HOSTS, VMS};

/// The relationship of `vm`, or why there is none.
pub(crate) fn protected(state: &Core, vm: &VmName) -> Result<RelationshipRecord, FailoverError> {
    state.protection.of_vm(vm.as_str()).ok_or_else(|| {
        let exists = state.store.get::<VmRecord>(VMS, vm.as_str()).ok().flatten().is_some();
        if exists { FailoverError::NotProtected(vm.to_string()) } else { FailoverError::UnknownVm(vm.to_string()) }
    })
}

pub(crate) fn hosts(state: &Core) -> Result<Vec<HostRecord>, FailoverError> {
    Ok(state.store.list(HOSTS)?)
}

pub(crate) fn host_name(hosts: &[HostRecord], id: &str) -> String {
    hosts.iter().find(|h| h.id.as_str() == id).map(|h| h.name.to_string()).unwrap_or_else(|| id.to_owned())
}

pub(crate) fn claim(state: &Core, vm: &VmName) -> Result<Claim, FailoverError> {
    Ok(state.protection.jobs.claim(vm.as_str())?)
}

/// Changes the relationship `id` through [`crate::relationship::ProtectionCore::update`],
/// classifying its refusal.
pub(crate) fn update(
    state: &Core,
    id: &str,
    f: impl FnOnce(&mut RelationshipRecord) -> Result<(), InvalidTransition>,
) -> Result<RelationshipRecord, FailoverError> {
    state.protection.update(&state.store, id, f).map_err(|s| {
        let msg = s.message().to_owned();
        match s.code() {
            Code::NotFound => FailoverError::RelationshipGone(msg),
            Code::FailedPrecondition => FailoverError::Relationship(msg),
            _ => FailoverError::RelationshipStore(msg),
        }
    })
}

pub(crate) fn refuse(vm: &VmName, e: InvalidTransition, hint: &str) -> FailoverError {
    let hint = if hint.is_empty() { String::new() } else { format!("; {hint}") };
    FailoverError::Refused(format!("VM {vm}: {e}{hint}"))
}

pub(crate) fn require_connected(
    state: &Core,
    hosts: &[HostRecord],
    host_id: &str,
    role: &str,
) -> Result<(), FailoverError> {
    if state.agents.connected(host_id) {
        Ok(())
    } else {
        Err(FailoverError::HostDown(format!("{role} host {} is not connected", host_name(hosts, host_id))))
    }
}

/// Records that a failover job failed before the VM ran on the replica host.
pub(crate) fn abort(state: &Core, rel_id: &str) {
    if let Err(e) = update(state, rel_id, |r| {
        r.state = r.state.next(Event::FailoverAborted)?;
        Ok(())
    }) {
        tracing::warn!(relationship = rel_id, "cannot record the aborted failover: {e}");
    }
}

/// Stores the VM an agent returned (it now runs on `host_id`: the provider places it
/// there), filling in what a minimal agent leaves out: the NICs it was given and how it
/// came to run. Only the VM asked for (`expected`): a host answering with another name
/// places nothing.
pub(crate) fn record_vm(
    state: &Core,
    res: &v1::CommandResult,
    host_id: &str,
    expected: &str,
    nics: &[v1::Nic],
    failover: Option<VmFailover>,
) -> Option<VmRecord> {
    let vm = res.vm.as_ref()?;
    if vm.name != expected {
        let got: String = vm.name.chars().take(80).collect();
        tracing::warn!(vm = expected, %got, host_id, "agent returned another VM than asked for; not recorded");
        return None;
    }
    let rec = siterecovery_proto::model::HostId::new(host_id)
        .map_err(|source| siterecovery_proto::model::WireError::Invalid { field: "host_id".into(), source })
        .and_then(|host_id| VmRecord::from_report(vm, &host_id));
    let mut rec = match rec {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(vm = %vm.name.chars().take(80).collect::<String>(), "agent returned an invalid VM: {e}");
            return None;
        }
    };
    if rec.nics.is_empty() && !nics.is_empty() {
        match nics
            .iter()
            .enumerate()
            .map(|(i, n)| crate::inventory::NicRecord::from_wire(n, &format!("nics[{i}]")))
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(n) => rec.nics = n,
            Err(e) => tracing::warn!(vm = %rec.name, "NICs not recorded: {e}"),
        }
    }
    if rec.failover.is_none() {
        rec.failover = failover;
    }
    if let Err(e) = state.store.put(VMS, &rec.name, &rec) {
        tracing::error!(vm = %rec.name, "cannot record the failed-over VM: {e:#}");
    }
    Some(rec)
}

/// How the VM came to run on the replica host, as the VM record keeps it.
pub(crate) fn vm_failover(
    rel: &RelationshipRecord,
    kind: FailoverKind,
    point: &str,
    committed: bool,
    test_of: &str,
) -> Option<VmFailover> {
    use siterecovery_proto::model::wire;
    let f = (|| {
        Ok::<_, siterecovery_proto::model::WireError>(VmFailover {
            relationship_id: wire::field("relationship_id", &rel.id)?,
            point_id: wire::field("point_id", point)?,
            kind,
            committed,
            test_of: wire::optional("test_of", test_of)?,
            started_unix_ms: now_ms(),
        })
    })();
    f.map_err(|e| tracing::warn!(vm = %rel.vm, "failover not recorded on the VM: {e}")).ok()
}

pub(crate) fn disks_text(v: Option<&VmRecord>) -> String {
    let Some(v) = v else { return String::new() };
    let uris: Vec<&str> = v
        .disks
        .iter()
        .map(|d| if d.nbd_tcp_uri.is_empty() { d.nbd_unix_uri.as_str() } else { d.nbd_tcp_uri.as_str() })
        .filter(|u| !u.is_empty())
        .collect();
    if uris.is_empty() { String::new() } else { format!("; disks {}", uris.join(" ")) }
}

pub(crate) fn nics_text(nics: &[v1::Nic]) -> String {
    let parts: Vec<String> = nics
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let addr = if n.dhcp {
                "dhcp".to_string()
            } else if n.ip.is_empty() {
                "-".into()
            } else {
                n.ip.clone()
            };
            let net = if n.network.is_empty() { "disconnected" } else { n.network.as_str() };
            format!("nic{i} {net} {addr}")
        })
        .collect();
    if parts.is_empty() { String::new() } else { format!("; {}", parts.join(", ")) }
}

/// Resolves `latest-app-consistent` to a point id on the replica host; the other
/// selectors go to the agent as they are.
pub(crate) async fn resolve_point(
    state: &Core,
    rel: &RelationshipRecord,
    point: &PointSelector,
) -> Result<String, FailoverError> {
    match point {
        PointSelector::Latest => Ok("latest".into()),
        PointSelector::Id(id) => Ok(id.to_string()),
        PointSelector::LatestAppConsistent => {
            let res = state
                .agents
                .command(
                    &rel.replica_host_id,
                    Command::ListPoints(v1::ListPoints { vm: rel.vm.clone() }),
                    state.protection.config.command_timeout,
                )
                .await
                .map_err(|source| FailoverError::Agent { host: "replica host".into(), source })?;
            res.points
                .iter()
                .filter(|p| p.app_consistent)
                .max_by_key(|p| (p.created_unix_ms, p.seq))
                .map(|p| p.id.clone())
                .ok_or_else(|| FailoverError::NoAppConsistentPoint(rel.vm.clone()))
        }
    }
}

/// The point the agent says the VM runs from (else the one asked for).
pub(crate) fn reported_point(res: &v1::CommandResult, asked: &str) -> String {
    res.vm
        .as_ref()
        .and_then(|v| v.failover.as_ref())
        .map(|f| f.point_id.clone())
        .filter(|p| !p.is_empty())
        .or_else(|| res.points.first().map(|p| p.id.clone()))
        .unwrap_or_else(|| asked.to_owned())
}

/// `PrepareFailover` to the primary host `pname`; the last point the replica
/// acknowledged.
pub(crate) async fn prepare_primary(
    state: &Core,
    rel: &RelationshipRecord,
    pname: &str,
) -> Result<String, FailoverError> {
    let cmd = Command::PrepareFailover(v1::PrepareFailover { relationship_id: rel.id.clone(), vm: rel.vm.clone() });
    let res = state
        .agents
        .command(&rel.primary_host_id, cmd, state.protection.config.command_timeout)
        .await
        .map_err(|source| FailoverError::Agent { host: format!("primary host {pname}"), source })?;
    Ok(res.points.first().map(|p| p.id.clone()).filter(|p| !p.is_empty()).unwrap_or_else(|| "latest".into()))
}

/// Best-effort `StopVm` to the primary host; says what happened.
pub(crate) async fn stop_primary(state: &Core, rel: &RelationshipRecord, pname: &str) -> String {
    let timeout = state.protection.config.command_timeout.min(Duration::from_secs(30));
    let cmd = Command::StopVm(v1::StopVm { name: rel.vm.clone() });
    match state.agents.command(&rel.primary_host_id, cmd, timeout).await {
        Ok(_) => format!("VM {} stopped on {pname}", rel.vm),
        Err(s) => format!("could not stop VM {} on {pname} ({}); failover goes on", rel.vm, s.message()),
    }
}
