//! Wire-boundary tests of the control channel: every command converts when valid, and a
//! hostile value in every name, id, point or path field is refused naming the field.

use siterecovery_proto::model::{FailoverKind, PointId, PointSelector, PointSeq};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command as W;

use super::command::{Command, CommandKind};

const REL: &str = "r-0000abcd";

fn msg(c: W) -> v1::ProviderMessage {
    v1::ProviderMessage { command_id: 7, command: Some(c) }
}

fn nic() -> v1::Nic {
    v1::Nic { network: "lan".into(), ip: "10.0.0.5".into(), dhcp: false, mac: "52:54:00:12:34:56".into() }
}

fn disk(id: &str) -> v1::DiskSize {
    v1::DiskSize { id: id.into(), size_bytes: 1 << 20 }
}

type Maker = fn(&str) -> W;

/// One valid command per kind with field `f` set to `v` (`f` = "" for all valid).
fn cases() -> Vec<(&'static str, Maker)> {
    vec![
        ("create_vm.name", |v| {
            W::CreateVm(v1::CreateVm {
                machine: Default::default(),
                name: v.into(),
                disk_sizes: vec![1 << 20],
                nics: vec![nic()],
                start: true,
            })
        }),
        ("create_vm.nics[0].network", |v| {
            W::CreateVm(v1::CreateVm {
                name: "vm1".into(),
                nics: vec![v1::Nic { network: v.into(), ..nic() }],
                ..Default::default()
            })
        }),
        ("delete_vm.name", |v| W::DeleteVm(v1::DeleteVm { name: v.into() })),
        ("start_vm.name", |v| W::StartVm(v1::StartVm { name: v.into() })),
        ("stop_vm.name", |v| W::StopVm(v1::StopVm { name: v.into() })),
        ("prepare_replica.relationship_id", |v| {
            W::PrepareReplica(v1::PrepareReplica {
                relationship_id: v.into(),
                vm: "vm1".into(),
                primary_host_id: "hv1-abc123".into(),
                disks: vec![disk("disk0")],
                ..Default::default()
            })
        }),
        ("prepare_replica.vm", |v| {
            W::PrepareReplica(v1::PrepareReplica {
                relationship_id: REL.into(),
                vm: v.into(),
                primary_host_id: "hv1-abc123".into(),
                disks: vec![disk("disk0")],
                ..Default::default()
            })
        }),
        ("prepare_replica.primary_host_id", |v| {
            W::PrepareReplica(v1::PrepareReplica {
                relationship_id: REL.into(),
                vm: "vm1".into(),
                primary_host_id: v.into(),
                disks: vec![disk("disk0")],
                ..Default::default()
            })
        }),
        ("prepare_replica.disks[1].id", |v| {
            W::PrepareReplica(v1::PrepareReplica {
                relationship_id: REL.into(),
                vm: "vm1".into(),
                primary_host_id: "hv1-abc123".into(),
                disks: vec![disk("disk0"), disk(v)],
                ..Default::default()
            })
        }),
        ("start_replication.relationship_id", |v| {
            W::StartReplication(v1::StartReplication {
                relationship_id: v.into(),
                vm: "vm1".into(),
                replica_host_id: "hv2-abc123".into(),
                replica_address: "hv2:7443".into(),
                ..Default::default()
            })
        }),
        ("start_replication.vm", |v| {
            W::StartReplication(v1::StartReplication {
                relationship_id: REL.into(),
                vm: v.into(),
                replica_host_id: "hv2-abc123".into(),
                replica_address: "hv2:7443".into(),
                ..Default::default()
            })
        }),
        ("start_replication.replica_host_id", |v| {
            W::StartReplication(v1::StartReplication {
                relationship_id: REL.into(),
                vm: "vm1".into(),
                replica_host_id: v.into(),
                replica_address: "hv2:7443".into(),
                ..Default::default()
            })
        }),
        ("stop_replication.relationship_id", |v| {
            W::StopReplication(v1::StopReplication {
                relationship_id: v.into(),
                vm: "vm1".into(),
                remove_replica: true,
            })
        }),
        ("stop_replication.vm", |v| {
            W::StopReplication(v1::StopReplication { relationship_id: REL.into(), vm: v.into(), remove_replica: true })
        }),
        ("request_resync.relationship_id", |v| {
            W::RequestResync(v1::RequestResync { relationship_id: v.into(), vm: "vm1".into() })
        }),
        ("request_resync.vm", |v| W::RequestResync(v1::RequestResync { relationship_id: REL.into(), vm: v.into() })),
        ("list_points.vm", |v| W::ListPoints(v1::ListPoints { vm: v.into() })),
        ("export_point.vm", |v| W::ExportPoint(v1::ExportPoint { vm: v.into(), point: "latest".into() })),
        ("export_point.point", |v| {
            W::ExportPoint(v1::ExportPoint { vm: "vm1".into(), point: if v == "vm1" { "p3".into() } else { v.into() } })
        }),
        ("unexport_point.vm", |v| W::UnexportPoint(v1::UnexportPoint { vm: v.into() })),
        ("prepare_failover.relationship_id", |v| {
            W::PrepareFailover(v1::PrepareFailover { relationship_id: v.into(), vm: "vm1".into() })
        }),
        ("prepare_failover.vm", |v| {
            W::PrepareFailover(v1::PrepareFailover { relationship_id: REL.into(), vm: v.into() })
        }),
        ("failover.relationship_id", |v| {
            W::Failover(v1::Failover { relationship_id: v.into(), vm: "vm1".into(), ..Default::default() })
        }),
        ("failover.vm", |v| {
            W::Failover(v1::Failover { relationship_id: REL.into(), vm: v.into(), ..Default::default() })
        }),
        ("failover.point", |v| {
            W::Failover(v1::Failover {
                relationship_id: REL.into(),
                vm: "vm1".into(),
                point: if v == "vm1" { "latest".into() } else { v.into() },
                ..Default::default()
            })
        }),
        ("failover.test_vm_name", |v| {
            W::Failover(v1::Failover {
                relationship_id: REL.into(),
                vm: "vm1".into(),
                test: true,
                test_vm_name: v.into(),
                ..Default::default()
            })
        }),
        ("failover.nics[0].network", |v| {
            W::Failover(v1::Failover {
                relationship_id: REL.into(),
                vm: "vm1".into(),
                nics: vec![v1::Nic { network: v.into(), ..nic() }],
                ..Default::default()
            })
        }),
        ("change_point.vm", |v| W::ChangePoint(v1::ChangePoint { vm: v.into(), point: "p2".into() })),
        ("change_point.point", |v| {
            W::ChangePoint(v1::ChangePoint { vm: "vm1".into(), point: if v == "vm1" { "p2".into() } else { v.into() } })
        }),
        ("commit_failover.vm", |v| W::CommitFailover(v1::CommitFailover { vm: v.into() })),
        ("cleanup_test_failover.vm", |v| {
            W::CleanupTestFailover(v1::CleanupTestFailover { vm: v.into(), test_vm_name: "vm1-test".into() })
        }),
        ("cleanup_test_failover.test_vm_name", |v| {
            W::CleanupTestFailover(v1::CleanupTestFailover { vm: "vm1".into(), test_vm_name: v.into() })
        }),
        ("export_initial.relationship_id", |v| {
            W::ExportInitial(v1::ExportInitial {
                relationship_id: v.into(),
                vm: "vm1".into(),
                replica_host_id: "hv2-abc123".into(),
                replica_address: "hv2:7443".into(),
                dir: "/srv/export".into(),
                ..Default::default()
            })
        }),
        ("export_initial.vm", |v| {
            W::ExportInitial(v1::ExportInitial {
                relationship_id: REL.into(),
                vm: v.into(),
                replica_host_id: "hv2-abc123".into(),
                replica_address: "hv2:7443".into(),
                dir: "/srv/export".into(),
                ..Default::default()
            })
        }),
        ("export_initial.replica_host_id", |v| {
            W::ExportInitial(v1::ExportInitial {
                relationship_id: REL.into(),
                vm: "vm1".into(),
                replica_host_id: v.into(),
                replica_address: "hv2:7443".into(),
                dir: "/srv/export".into(),
                ..Default::default()
            })
        }),
        ("import_initial.relationship_id", |v| {
            W::ImportInitial(v1::ImportInitial {
                relationship_id: v.into(),
                vm: "vm1".into(),
                dir: "/srv/export".into(),
            })
        }),
        ("import_initial.vm", |v| {
            W::ImportInitial(v1::ImportInitial { relationship_id: REL.into(), vm: v.into(), dir: "/srv/export".into() })
        }),
    ]
}

/// The valid value of a case's field (each case is valid with it).
fn valid_value(field: &str) -> &'static str {
    if field.ends_with("relationship_id") {
        REL
    } else if field.ends_with("host_id") {
        "hv1-abc123"
    } else if field.ends_with("network") {
        "lan"
    } else if field.ends_with("id") {
        "disk1"
    } else {
        "vm1"
    }
}

const HOSTILE: &[&str] = &["../../etc/passwd", "a/b", "/abs", "..", ".", "-x", "a\0b", "é", "vm 1", "x\n"];

#[test]
fn every_command_converts_when_valid() {
    for (field, make) in cases() {
        let c = Command::try_from(msg(make(valid_value(field)))).unwrap_or_else(|e| panic!("{field}: {e}"));
        assert_eq!(c.id, 7);
    }
}

#[test]
fn a_hostile_value_in_every_field_is_refused_naming_it() {
    for (field, make) in cases() {
        for &bad in
            HOSTILE.iter().chain(if field.ends_with("relationship_id") { &["r-1", "rel-1"][..] } else { &[][..] })
        {
            // An empty optional field is valid (it means "the default").
            let e = Command::try_from(msg(make(bad))).expect_err(&format!("{field} = {bad:?} accepted"));
            assert_eq!(e.field(), field, "{e}");
            let r = super::execute::refused(7, e.clone());
            assert!(!r.ok && r.code == v1::ErrorCode::InvalidArgument as i32, "{r:?}");
            assert!(r.error.contains(field), "{}", r.error);
        }
    }
}

#[test]
fn required_fields_are_required() {
    for (field, make) in cases() {
        if field.ends_with("test_vm_name") || field.ends_with("network") || field.ends_with(".point") {
            continue;
        }
        let e = Command::try_from(msg(make(""))).expect_err(field);
        assert_eq!(e.field(), field, "{e}");
    }
    let e = Command::try_from(v1::ProviderMessage { command_id: 1, command: None }).expect_err("no command");
    assert_eq!(e.field(), "command");
}

#[test]
fn paths_addresses_and_nic_values() {
    for bad in ["", "relative/dir", "/srv/../etc", "/srv/a\0"] {
        let e = Command::try_from(msg(W::ImportInitial(v1::ImportInitial {
            relationship_id: REL.into(),
            vm: "vm1".into(),
            dir: bad.into(),
        })))
        .expect_err(bad);
        assert_eq!(e.field(), "import_initial.dir");
        let e = Command::try_from(msg(W::ExportInitial(v1::ExportInitial {
            relationship_id: REL.into(),
            vm: "vm1".into(),
            replica_host_id: "hv2".into(),
            replica_address: "hv2:7443".into(),
            dir: bad.into(),
            ..Default::default()
        })))
        .expect_err(bad);
        assert_eq!(e.field(), "export_initial.dir");
    }
    for bad in ["", "hv2 :7443", "http://hv2:7443", ":7443"] {
        let e = Command::try_from(msg(W::StartReplication(v1::StartReplication {
            relationship_id: REL.into(),
            vm: "vm1".into(),
            replica_host_id: "hv2".into(),
            replica_address: bad.into(),
            ..Default::default()
        })))
        .expect_err(bad);
        assert_eq!(e.field(), "start_replication.replica_address", "{bad:?}");
    }
    for (ip, mac, field) in [("10.0.0.x", "", "create_vm.nics[0].ip"), ("", "52:54:00:12:34", "create_vm.nics[0].mac")]
    {
        let nic = v1::Nic { ip: ip.into(), mac: mac.into(), ..nic() };
        let e = Command::try_from(msg(W::CreateVm(v1::CreateVm {
            name: "vm1".into(),
            nics: vec![nic],
            ..Default::default()
        })))
        .expect_err(field);
        assert_eq!(e.field(), field);
    }
    let ok = v1::Nic { ip: "10.0.0.5/24".into(), mac: String::new(), dhcp: true, ..nic() };
    assert!(
        Command::try_from(msg(W::CreateVm(v1::CreateVm { name: "vm1".into(), nics: vec![ok], ..Default::default() })))
            .is_ok()
    );
}

#[test]
fn points_and_failover_kinds() {
    let point =
        |p: &str| match Command::try_from(msg(W::ExportPoint(v1::ExportPoint { vm: "vm1".into(), point: p.into() }))) {
            Ok(Command { kind: CommandKind::ExportPoint { point, .. }, .. }) => Some(point),
            _ => None,
        };
    let p3 = PointSelector::Id(PointId::from_seq(PointSeq(3)));
    assert_eq!(point(""), Some(PointSelector::Latest));
    assert_eq!(point("latest-app-consistent"), Some(PointSelector::LatestAppConsistent));
    assert_eq!(point("p3"), Some(p3));
    // The agent always accepted a point's bare sequence number.
    assert_eq!(point("3"), Some(p3));
    assert_eq!(point("p03"), None);
    let kind = |test, planned| match Command::try_from(msg(W::Failover(v1::Failover {
        relationship_id: REL.into(),
        vm: "vm1".into(),
        test,
        planned,
        ..Default::default()
    }))) {
        Ok(Command { kind: CommandKind::Failover(f), .. }) => Some((f.kind, f.test_vm)),
        _ => None,
    };
    assert_eq!(kind(true, false), Some((FailoverKind::Test, None)));
    assert_eq!(kind(false, true), Some((FailoverKind::Planned, None)));
    assert_eq!(kind(false, false), Some((FailoverKind::Unplanned, None)));
}
