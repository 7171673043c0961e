//! The operator's view of a relationship (`Vm.replication`): hosts by name, health
//! and its reasons, lag, progress and reserved addresses.

use std::collections::HashMap;

use siterecovery_proto::v1;

use super::lookup::host_name;
use super::{Core, RelationshipRecord, ReplicationState};
use crate::inventory::HostRecord;
use crate::jobs::now_ms;
use crate::network::Reservation;

/// The operator's view of a relationship (for `Vm.replication`).
pub fn replication_view(state: &Core, rec: &RelationshipRecord, hosts: &[HostRecord], now: i64) -> v1::Replication {
    let name = |id: &str| host_name(hosts, id);
    let primary = name(&rec.primary_host_id);
    let connected = state.agents.connected(&rec.primary_host_id);
    let (h, reasons) = rec.health(connected, &primary, now);
    let s = &rec.status;
    let lag = if s.last_point_unix_ms > 0 && !rec.state.in_failover() && rec.state != ReplicationState::NotEnabled {
        (now - s.last_point_unix_ms).max(0) as u64
    } else {
        0
    };
    v1::Replication {
        relationship_id: rec.id.clone(),
        primary_host: primary,
        replica_host: name(&rec.replica_host_id),
        policy: rec.policy.clone(),
        state: v1::ReplicationState::from(rec.state).into(),
        health: v1::Health::from(h).into(),
        health_reasons: reasons,
        last_point_unix_ms: s.last_point_unix_ms,
        last_point_id: s.last_point_id.clone(),
        rpo_lag_ms: lag,
        pending_log_bytes: s.pending_log_bytes,
        bytes_replicated: s.bytes_replicated,
        error: s.error.clone(),
        done_bytes: s.done_bytes,
        total_bytes: if s.total_bytes > 0 { s.total_bytes } else { rec.total_bytes },
        addresses: rec.addresses.iter().map(Reservation::to_proto).collect(),
        test_failover_vm: rec.test_failover.as_ref().map(|t| t.test_vm.clone()).unwrap_or_default(),
        bandwidth_limit: s.bandwidth_limit,
        achieved_bytes_per_sec: s.achieved_bytes_per_sec,
    }
}

/// `Vm.replication` for every protected VM, by VM name.
pub fn replication_views(state: &Core, hosts: &[HostRecord]) -> HashMap<String, v1::Replication> {
    let now = now_ms();
    state.protection.all().iter().map(|r| (r.vm.clone(), replication_view(state, r, hosts, now))).collect()
}
