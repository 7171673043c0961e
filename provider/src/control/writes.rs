//! What a host's inventory report writes, and when.
//!
//! [`plan_inventory`] decides, from the stored VM records, which VMs of a report are
//! recorded (only the reporting host's, [`judge_report`]), which are refused, and which
//! of the host's records it deletes (those it no longer reports). It runs twice: once
//! read-only to classify the report, then inside the write transaction that applies it
//! ([`Store::reconcile`]), so the decision is taken on what it replaces.
//!
//! [`due`] keeps floods off the disk: a report equal to the store writes nothing; one
//! that only moves counters (pending log bytes, allocated bytes) is written at most once
//! per [`WriteLimits::refresh`] per host; any other change at most once per
//! [`WriteLimits::min_gap`] per host (the latest report is kept and written when due).
//! Heartbeat-like fields (free bytes, last heartbeat, agent version) live only in
//! memory ([`super::Sessions`]).

use std::collections::HashMap;
use std::time::Duration;

use siterecovery_proto::model::{HostId, VmName};
use tokio::time::Instant;

use crate::inventory::{RefusedReport, RelationshipHosts, ReportVerdict, VmRecord, judge_report};
use crate::store::Change;

#[cfg(doc)]
use crate::store::Store;

/// How often the control channel may write a host's inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteLimits {
    /// Between two writes of a changed inventory of one host.
    pub min_gap: Duration,
    /// Between two writes of an inventory whose only change is its counters.
    pub refresh: Duration,
}

impl Default for WriteLimits {
    fn default() -> Self {
        Self { min_gap: Duration::from_secs(1), refresh: Duration::from_secs(15) }
    }
}

/// How a report differs from the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Difference {
    None,
    /// Only pending log bytes and allocated bytes moved.
    Counters,
    /// VMs appeared or went, or a field other than a counter changed.
    Changed,
}

/// What a report does to the store.
#[derive(Debug, Clone, PartialEq)]
pub struct InventoryPlan {
    pub changes: Vec<Change<VmRecord>>,
    pub difference: Difference,
    /// The reported VMs placed on the host (written or already equal).
    pub recorded: Vec<VmRecord>,
    pub refused: Vec<(VmName, RefusedReport)>,
}

fn without_counters(v: &VmRecord) -> VmRecord {
    let mut v = v.clone();
    for d in &mut v.disks {
        d.pending_log_bytes = 0;
        d.allocated_bytes = 0;
    }
    v
}

/// Decides what the report `reported` of host `host` does, given the stored VM records
/// (key, record) and the relationship of a VM (`relationship`).
pub fn plan_inventory(
    stored: &[(String, VmRecord)],
    host: &HostId,
    reported: &[VmRecord],
    relationship: impl Fn(&VmName) -> Option<RelationshipHosts>,
) -> InventoryPlan {
    let by_name: HashMap<&str, &VmRecord> = stored.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut plan = InventoryPlan { changes: vec![], difference: Difference::None, recorded: vec![], refused: vec![] };
    let mut seen = std::collections::HashSet::new();
    for r in reported {
        // A name reported twice counts once (the first).
        if !seen.insert(r.name.as_str()) {
            continue;
        }
        let current = by_name.get(r.name.as_str()).copied();
        match judge_report(current, r, relationship(&r.name).as_ref()) {
            ReportVerdict::Record => {
                let diff = match current {
                    Some(c) if c == r => Difference::None,
                    Some(c) if c.host_id == r.host_id && without_counters(c) == without_counters(r) => {
                        Difference::Counters
                    }
                    _ => Difference::Changed,
                };
                if diff != Difference::None {
                    plan.changes.push(Change::Put(r.name.to_string(), r.clone()));
                    plan.difference = plan.difference.max(diff);
                }
                plan.recorded.push(r.clone());
            }
            ReportVerdict::OtherCopy => {}
            ReportVerdict::Refused(why) => plan.refused.push((r.name.clone(), why)),
        }
    }
    for (key, v) in stored {
        if &v.host_id == host && !seen.contains(v.name.as_str()) {
            plan.changes.push(Change::Delete(key.clone()));
            plan.difference = Difference::Changed;
        }
    }
    plan
}

/// When a report of this difference is written: `last` is the host's last inventory
/// write (`None`: never since the provider started).
pub fn due(difference: Difference, last: Option<Instant>, now: Instant, limits: &WriteLimits) -> Instant {
    let Some(last) = last else { return now };
    let gap = match difference {
        Difference::Changed => limits.min_gap,
        Difference::Counters | Difference::None => limits.refresh,
    };
    (last + gap).max(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, host: &str, pending: u64) -> VmRecord {
        serde_json::from_value(serde_json::json!({
            "name": name, "host_id": host, "folder": "", "power_state": "running", "created_unix_ms": 1,
            "disks": [{"id": "disk0", "size_bytes": 512, "image_path": "", "export_name": "", "nbd_unix_uri": "",
                "nbd_tcp_uri": "", "tracking": true, "pending_log_bytes": pending, "allocated_bytes": 0}],
            "nics": [],
        }))
        .expect("vm")
    }

    fn stored(vms: &[VmRecord]) -> Vec<(String, VmRecord)> {
        vms.iter().map(|v| (v.name.to_string(), v.clone())).collect()
    }

    fn none(_: &VmName) -> Option<RelationshipHosts> {
        None
    }

    #[test]
    fn a_report_never_touches_another_hosts_vms() {
        let a: HostId = "hv-a-0a0a0a".parse().expect("id");
        let b: HostId = "hv-b-0b0b0b".parse().expect("id");
        let store = stored(&[vm("vm-a", a.as_str(), 0), vm("vm-b", b.as_str(), 0)]);
        // B reports A's VM (changed), a VM nobody created, and omits its own.
        let report = [vm("vm-a", b.as_str(), 99), vm("new", b.as_str(), 0)];
        let plan = plan_inventory(&store, &b, &report, none);
        assert_eq!(plan.changes, vec![Change::Delete("vm-b".into())], "only B's own record goes");
        assert_eq!(
            plan.refused,
            vec![
                ("vm-a".parse().expect("name"), RefusedReport::OtherHost),
                ("new".parse().expect("name"), RefusedReport::NotPlaced)
            ]
        );
        assert!(plan.recorded.is_empty());
    }

    #[test]
    fn differences_are_classified() {
        let a: HostId = "hv-a-0a0a0a".parse().expect("id");
        let store = stored(&[vm("vm1", a.as_str(), 0)]);
        let same = plan_inventory(&store, &a, &[vm("vm1", a.as_str(), 0)], none);
        assert_eq!((same.difference, same.changes.len(), same.recorded.len()), (Difference::None, 0, 1));
        let counters = plan_inventory(&store, &a, &[vm("vm1", a.as_str(), 4096)], none);
        assert_eq!(counters.difference, Difference::Counters);
        let mut off = vm("vm1", a.as_str(), 0);
        off.power_state = crate::inventory::PowerState::Off;
        assert_eq!(plan_inventory(&store, &a, &[off], none).difference, Difference::Changed);
        assert_eq!(plan_inventory(&store, &a, &[], none).difference, Difference::Changed);
    }

    /// A flood of reports, each different from the last: writes stay bounded by time,
    /// not by the number of messages.
    #[test]
    fn a_flood_is_written_by_the_clock() {
        let limits = WriteLimits::default();
        let start = Instant::now();
        let mut last = None;
        let mut writes = 0;
        // 10 000 reports over 10 simulated seconds, alternating content.
        for i in 0..10_000u64 {
            let now = start + Duration::from_millis(i);
            let diff = if i % 2 == 0 { Difference::Changed } else { Difference::Counters };
            if due(diff, last, now, &limits) <= now {
                writes += 1;
                last = Some(now);
            }
        }
        assert!(writes <= 11, "{writes} writes for 10 000 reports in 10 s");
        // Counters alone: once per refresh.
        let (mut last, mut writes) = (Some(start), 0);
        for i in 1..=60_000u64 {
            let now = start + Duration::from_millis(i);
            if due(Difference::Counters, last, now, &limits) <= now {
                writes += 1;
                last = Some(now);
            }
        }
        assert_eq!(writes, 4, "60 s of counter-only reports");
        assert_eq!(due(Difference::Changed, None, start, &limits), start, "the first report is written at once");
    }
}
