//! The `--json` views' field names and words, as scripts and the end-to-end tests read them.

use serde_json::{Value, json};

use super::*;

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn job() -> v1::Job {
    v1::Job {
        id: "job-7".into(),
        kind: v1::JobKind::EnableProtection.into(),
        vm: "vm1".into(),
        state: v1::JobState::Succeeded.into(),
        steps: vec![v1::JobStep {
            name: "Initial replication".into(),
            state: v1::StepState::Succeeded.into(),
            detail: "1.0 GiB".into(),
            started_unix_ms: 1,
            ended_unix_ms: 2,
        }],
        done_bytes: 3,
        total_bytes: 4,
        rate_bytes_per_sec: 5,
        created_unix_ms: 6,
        ended_unix_ms: 7,
        error: String::new(),
    }
}

#[test]
fn a_job_shows_its_kind_and_states_as_words() {
    let j = job();
    assert_eq!(
        to_value(&JobView::from(&j)),
        json!({
            "id": "job-7", "kind": "Enable protection", "vm": "vm1", "state": "succeeded", "error": "",
            "done_bytes": 3, "total_bytes": 4, "rate_bytes_per_sec": 5, "created_unix_ms": 6, "ended_unix_ms": 7,
            "steps": [{"name": "Initial replication", "state": "succeeded", "detail": "1.0 GiB",
                       "started_unix_ms": 1, "ended_unix_ms": 2}],
        })
    );
}

#[test]
fn json_keys_are_printed_in_the_order_they_always_were() {
    let j = job();
    let text = serde_json::to_string(&JobView::from(&j)).unwrap_or_default();
    let sorted = serde_json::to_string(&to_value(&JobView::from(&j))).unwrap_or_default();
    assert_eq!(text, sorted);
    let vm = v1::Vm {
        disks: vec![v1::Disk::default()],
        nics: vec![v1::Nic::default()],
        replication: Some(v1::Replication { addresses: vec![Default::default()], ..Default::default() }),
        failover: Some(v1::FailoverInfo::default()),
        ..Default::default()
    };
    let text = serde_json::to_string(&VmView::from(&vm)).unwrap_or_default();
    assert_eq!(text, serde_json::to_string(&to_value(&VmView::from(&vm))).unwrap_or_default());
}

#[test]
fn a_vm_with_replication_and_failover() {
    let vm = v1::Vm {
        machine: None,
        name: "vm1".into(),
        host_id: "h-1".into(),
        host_name: "hv-b".into(),
        disks: vec![v1::Disk {
            id: "disk0".into(),
            size_bytes: 1 << 30,
            nbd_unix_uri: "nbd+unix:///vm1-disk0?socket=/s".into(),
            tracking: true,
            ..Default::default()
        }],
        nics: vec![v1::Nic { network: "lan".into(), ip: "10.0.0.5".into(), dhcp: false, mac: "52:54".into() }],
        power_state: v1::PowerState::Running.into(),
        folder: "/vms/vm1".into(),
        created_unix_ms: 9,
        replication: Some(v1::Replication {
            relationship_id: "rel-1".into(),
            state: v1::ReplicationState::Replicating.into(),
            health: v1::Health::Normal.into(),
            addresses: vec![v1::AddressReservation {
                nic: 0,
                source_network: "lan".into(),
                target_network: "lan-b".into(),
                target_ip: "10.1.0.5".into(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        failover: Some(v1::FailoverInfo {
            relationship_id: "rel-1".into(),
            point_id: "p-3".into(),
            kind: v1::FailoverKind::Test.into(),
            committed: false,
            test_of: "vm1".into(),
            started_unix_ms: 8,
        }),
    };
    let v = to_value(&VmView::from(&vm));
    assert_eq!(v["host"], "hv-b");
    assert_eq!(v["power_state"], "running");
    assert!(v.get("created_unix_ms").is_none(), "vm JSON never carried created_unix_ms");
    assert_eq!(v["disks"][0]["nbd_unix_uri"], "nbd+unix:///vm1-disk0?socket=/s");
    assert_eq!(v["disks"][0]["tracking"], true);
    assert_eq!(v["nics"][0], json!({"network": "lan", "ip": "10.0.0.5", "dhcp": false, "mac": "52:54"}));
    assert_eq!(v["replication"]["state"], "replicating");
    assert_eq!(v["replication"]["health"], "Normal");
    assert_eq!(v["replication"]["addresses"][0]["target_ip"], "10.1.0.5");
    assert_eq!(
        v["failover"],
        json!({"relationship_id": "rel-1", "point_id": "p-3", "kind": "test", "committed": false,
               "test_of": "vm1", "started_unix_ms": 8})
    );
    let bare = to_value(&VmView::from(&v1::Vm::default()));
    assert_eq!(bare["replication"], Value::Null);
    assert_eq!(bare["failover"], Value::Null);
    assert_eq!(bare["power_state"], "unknown");
}

#[test]
fn points_policies_plans_and_clouds() {
    let p = v1::RecoveryPoint {
        id: "p-1".into(),
        seq: 1,
        created_unix_ms: 2,
        app_consistent: true,
        size_bytes: 3,
        kind: v1::PointKind::Latest.into(),
    };
    assert_eq!(
        to_value(&PointView::from(&p)),
        json!({"id": "p-1", "seq": 1, "created_unix_ms": 2, "app_consistent": true, "size_bytes": 3,
               "kind": "latest"})
    );
    let policy = v1::Policy {
        name: "gold".into(),
        interval_ms: 300_000,
        initial_method: v1::InitialMethod::Offline.into(),
        ..Default::default()
    };
    let v = to_value(&PolicyView::from(&policy));
    assert_eq!(v["initial_method"], "offline");
    assert_eq!(v["interval_ms"], 300_000);
    assert_eq!(v.as_object().map(|o| o.len()), Some(11));
    let plan = v1::RecoveryPlan {
        name: "dr".into(),
        groups: vec![v1::PlanGroup { order: 1, vms: vec!["vm1".into()] }],
        actions: vec![v1::PlanAction {
            after_group: 1,
            kind: v1::PlanActionKind::Manual.into(),
            command: "check".into(),
            timeout_secs: 300,
        }],
    };
    assert_eq!(
        to_value(&PlanView::from(&plan)),
        json!({"name": "dr", "groups": [{"order": 1, "vms": ["vm1"]}],
               "actions": [{"after_group": 1, "kind": "manual", "command": "check", "timeout_secs": 300}]})
    );
    let pairings =
        vec![v1::CloudPairing { source_cloud: "gold-a".into(), target_cloud: "gold-b".into(), policy: "gold".into() }];
    let a = v1::Cloud { name: "gold-a".into(), site: "primary".into(), hosts: vec!["hv-a".into()] };
    let b = v1::Cloud { name: "gold-b".into(), site: "secondary".into(), hosts: vec![] };
    assert_eq!(
        to_value(&CloudView::new(&a, &pairings)),
        json!({"name": "gold-a", "site": "primary", "hosts": ["hv-a"], "target_cloud": "gold-b",
               "policy": "gold", "source_clouds": []})
    );
    assert_eq!(
        to_value(&CloudView::new(&b, &pairings)),
        json!({"name": "gold-b", "site": "secondary", "hosts": [], "target_cloud": null,
               "policy": null, "source_clouds": ["gold-a"]})
    );
    let site = v1::Site { name: "primary".into(), clouds: vec!["gold-a".into()], host_count: 2 };
    assert_eq!(to_value(&SiteView::from(&site)), json!({"name": "primary", "clouds": ["gold-a"], "hosts": 2}));
    assert_eq!(to_value(&Deleted { deleted: "vm1" }), json!({"deleted": "vm1"}));
}
