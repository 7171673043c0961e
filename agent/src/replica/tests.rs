//! Unit tests of the replica store: points through undo, pruning, crash recovery, the
//! state file, imports and hashes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::state::{Applying, save_state};
use super::undo::write_undo;
use super::*;
use crate::disk::BlockDevice;
use crate::persist::{self, PersistError, REPLICA_STATE};

fn disk(id: &str) -> siterecovery_proto::model::DiskId {
    id.parse().expect("disk id")
}

fn vm(name: &str) -> siterecovery_proto::model::VmName {
    name.parse().expect("VM name")
}

fn spec(vm: &str, bucket_ms: u64) -> ReplicaSpec {
    ReplicaSpec {
        machine: Default::default(),
        bucket_ms,
        relationship_id: "r-00000001".into(),
        vm: vm.into(),
        primary_host_id: "h1".into(),
        disks: vec![ReplicaDisk { id: "disk0".into(), size_bytes: 1 << 20 }],
        retention_ms: 24 * 3_600_000,
    }
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).expect("read");
    v
}

fn point(r: &Arc<Replica>, seq: u64, writes: &[(u64, u8, usize)]) -> PointInfo {
    // distinct buckets whatever the clock does between calls
    let mut s = r.begin_point(seq, now_ms() - 100_000 + seq as i64 * 10, false, false).expect("begin");
    for &(off, byte, len) in writes {
        s.push(&disk("disk0"), off, ExtentData::Data(&vec![byte; len])).expect("push");
    }
    s.commit().expect("commit")
}

#[test]
fn import_copies_the_export_and_a_damaged_one_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src.img");
    let f = File::create(&src).expect("src");
    f.set_len(1 << 20).expect("len");
    f.write_all_at(&[7u8; 8192], 64 << 10).expect("write");
    let exp = dir.path().join("exp");
    let d = crate::offline::ExportDisk { id: "disk0".into(), image: src, size: 1 << 20, log_seq: 3 };
    let m = crate::offline::export(&exp, "r-00000001", "vm1", &[d]).expect("export");
    let set = ReplicaSet::open(&dir.path().join("replicas")).expect("open");
    let r = set.prepare(spec("vm1", 1)).expect("prepare");
    m.check(r.spec()).expect("fits");

    // Damaged in transit: refused, and nothing of it stays in the replica.
    let img = exp.join("disk0.img");
    let e = OpenOptions::new().write(true).open(&img).expect("export image");
    e.write_all_at(&[8u8], 64 << 10).expect("damage");
    let err = r.import_initial(&exp, &m).expect_err("checksum");
    assert!(err.to_string().contains("checksum mismatch"), "{err}");
    assert!(!r.initial_complete());
    let v = std::fs::read(r.dir().join("disk0.img")).expect("image");
    assert!(v.iter().all(|&b| b == 0), "a refused import left data");

    e.write_all_at(&[7u8], 64 << 10).expect("repair");
    assert_eq!(r.import_initial(&exp, &m).expect("import"), m.copied_bytes());
    assert!(r.initial_complete());
    let v = std::fs::read(r.dir().join("disk0.img")).expect("image");
    assert!(v[64 << 10..(64 << 10) + 8192].iter().all(|&b| b == 7) && v[..64 << 10].iter().all(|&b| b == 0));
    // Idempotent: a repeated import (lost answer) does nothing.
    assert_eq!(r.import_initial(&exp, &m).expect("again"), 0);
    // Points now apply on top.
    point(&r, 1, &[(0, 9, 4096)]);
}

#[test]
fn sub_block_hashes_are_the_small_block_hashes_of_the_listed_blocks() {
    let dir = tempfile::tempdir().expect("tmp");
    let set = ReplicaSet::open(dir.path()).expect("open");
    let r = set.prepare(spec("vm1", 1)).expect("prepare");
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    r.write_initial(&disk("disk0"), 0, &data).expect("copy");
    let small = r.block_hashes("disk0", 4096, 0, 256).expect("4 KiB hashes");
    let sub = r.sub_block_hashes("disk0", 64 << 10, 4096, &[15, 2]).expect("sub-block hashes");
    assert_eq!(sub.len(), 32);
    assert_eq!(sub[..16], small[240..256]);
    assert_eq!(sub[16..], small[32..48]);
    assert!(r.sub_block_hashes("disk0", 64 << 10, 4096, &[16]).is_err(), "a block beyond the disk");
    assert!(r.sub_block_hashes("disk0", 64 << 10, 3000, &[0]).is_err(), "a size that does not divide");
}

#[test]
fn points_are_readable_through_undo_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let set = ReplicaSet::open(dir.path()).expect("open");
    let r = set.prepare(spec("vm1", 1)).expect("prepare");
    r.write_initial(&disk("disk0"), 0, &[1u8; 4096]).expect("copy");
    r.ack_initial(&disk("disk0"), 1 << 20, true).expect("ack");
    let p1 = point(&r, 1, &[(0, 2, 100)]);
    let p2 = point(&r, 2, &[(50, 3, 100), (4000, 4, 200)]);
    let p3 = point(&r, 3, &[(0, 5, 10), (60, 6, 10)]);
    let mut expect1 = vec![0u8; 1 << 20];
    expect1[..4096].fill(1);
    expect1[..100].fill(2);
    let mut expect2 = expect1.clone();
    expect2[50..150].fill(3);
    expect2[4000..4200].fill(4);
    let mut expect3 = expect2.clone();
    expect3[..10].fill(5);
    expect3[60..70].fill(6);
    for (p, e) in [(&p1, &expect1), (&p2, &expect2), (&p3, &expect3)] {
        let v = r.open_point(&p.id).expect("open point");
        assert_eq!(&read_all(&*v.disks[0].1), e, "point {}", p.id);
    }
    // a view stays at its point while later points are applied
    let v2 = r.open_point(&p2.id).expect("view");
    point(&r, 4, &[(55, 7, 1000)]);
    assert_eq!(read_all(&*v2.disks[0].1), expect2);
    // idempotent re-ship of an applied seq
    assert_eq!(point(&r, 4, &[(0, 9, 1)]).seq, 4);
    drop(v2);
    drop(r);
    drop(set);
    let set = ReplicaSet::open(dir.path()).expect("reopen");
    let r = set.get(&vm("vm1")).expect("replica");
    assert_eq!(r.points().len(), 4);
    let v = r.open_point(&p1.id).expect("p1");
    assert_eq!(read_all(&*v.disks[0].1), expect1);
    // out of range and unknown disk are refused
    let mut s = r.begin_point(5, now_ms(), false, false).expect("begin");
    assert!(s.push(&disk("disk0"), (1 << 20) - 1, ExtentData::Data(&[0; 2])).is_err());
    assert!(s.push(&disk("nope"), 0, ExtentData::Zeroes(1)).is_err());
}

#[test]
fn pruning_merges_undo_so_older_points_stay_correct() {
    let dir = tempfile::tempdir().expect("tmp");
    let set = ReplicaSet::open(dir.path()).expect("open");
    let r = set.prepare(spec("vm2", 3_600_000)).expect("prepare");
    r.ack_initial(&disk("disk0"), 1 << 20, true).expect("ack");
    let hour = 3_600_000;
    let t0 = now_ms() - 3 * hour;
    let mk = |seq: u64, t: i64, writes: &[(u64, u8, usize)]| {
        let mut s = r.begin_point(seq, t, false, false).expect("begin");
        for &(off, b, len) in writes {
            s.push(&disk("disk0"), off, ExtentData::Data(&vec![b; len])).expect("push");
        }
        s.commit().expect("commit")
    };
    // two points in hour 0 (the first will be pruned as not newest of its hour), one in hour 2
    mk(1, t0 + 10, &[(0, 1, 100)]);
    mk(2, t0 + 20, &[(0, 2, 50)]);
    let p3 = mk(3, t0 + 30, &[(10, 3, 10)]);
    let before: Vec<u8> = read_all(&*r.open_point(&p3.id).expect("p3").disks[0].1);
    mk(4, now_ms(), &[(0, 4, 200)]);
    let seqs: Vec<u64> = r.points().iter().map(|p| p.seq).collect();
    assert!(!seqs.contains(&1) && !seqs.contains(&2), "pruned: {seqs:?}");
    assert!(seqs.contains(&3) && seqs.contains(&4));
    let after = read_all(&*r.open_point(&p3.id).expect("p3").disks[0].1);
    assert_eq!(before, after);
}

#[test]
fn retention_keeps_latest_hourly_and_app_consistent() {
    let h = 3_600_000;
    let now = 100 * h;
    let p = |seq, t, app| PointInfo {
        id: format!("p{seq}"),
        seq,
        created_unix_ms: t,
        app_consistent: app,
        resync: false,
        size_bytes: 0,
    };
    let pts = vec![
        p(1, now - 30 * h, true),
        p(2, now - 3 * h, false),
        p(3, now - 3 * h + 5, false),
        p(4, now - h, true),
        p(5, now - 10, false),
    ];
    let keep = retained(&pts, (24 * h) as u64, h as u64, now);
    assert_eq!(keep.into_iter().collect::<Vec<_>>(), vec![3, 4, 5]);
}

#[test]
fn interrupted_apply_rolls_forward() {
    let dir = tempfile::tempdir().expect("tmp");
    {
        let set = ReplicaSet::open(dir.path()).expect("open");
        let r = set.prepare(spec("vm3", 1)).expect("prepare");
        r.ack_initial(&disk("disk0"), 1 << 20, true).expect("ack");
        point(&r, 1, &[(0, 1, 10)]);
        // simulate a crash after the "applying" mark: spool durable, images not written
        let mut s = r.begin_point(2, now_ms(), false, false).expect("begin");
        s.push(&disk("disk0"), 0, ExtentData::Data(&[9u8; 10])).expect("push");
        let name = s.name.clone();
        let mut w = s.w.take().expect("writer");
        w.write_all(&END.to_le_bytes()).expect("end");
        w.flush().expect("flush");
        drop(w);
        let mut inner = r.write();
        write_undo(&r.images, &r.dir.join("undo-2.undo"), 2, &s.ranges).expect("undo");
        inner.state.applying = Some(Applying {
            seq: 2,
            spool: name,
            undo: Some("undo-2.undo".into()),
            info: PointInfo {
                id: "p2".into(),
                seq: 2,
                created_unix_ms: 0,
                app_consistent: false,
                resync: false,
                size_bytes: 10,
            },
        });
        save_state(&r.dir, &inner.state).expect("save");
    }
    let set = ReplicaSet::open(dir.path()).expect("reopen");
    let r = set.get(&vm("vm3")).expect("replica");
    assert_eq!(r.latest_seq(), Some(2));
    let latest = read_all(&*r.open_point("latest").expect("latest").disks[0].1);
    assert_eq!(&latest[..10], &[9u8; 10]);
    let p1 = read_all(&*r.open_point("p1").expect("p1").disks[0].1);
    assert_eq!(&p1[..10], &[1u8; 10]);
}

/// A replica of `vm` with two points, closed again; returns its folder.
fn replica_with_points(root: &Path, vm: &str) -> PathBuf {
    let set = ReplicaSet::open(root).expect("open");
    let r = set.prepare(spec(vm, 1)).expect("prepare");
    r.ack_initial(&disk("disk0"), 1 << 20, true).expect("ack");
    point(&r, 1, &[(0, 1, 10)]);
    point(&r, 2, &[(0, 2, 10)]);
    r.dir().to_path_buf()
}

#[test]
fn the_state_file_is_in_the_envelope_and_a_legacy_one_still_opens() {
    let dir = tempfile::tempdir().expect("tmp");
    let folder = replica_with_points(dir.path(), "vm4");
    let path = folder.join(STATE_FILE);
    let stored = std::fs::read(&path).expect("state");
    assert_eq!(&stored[..4], &REPLICA_STATE.magic);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
    // What older agents wrote: the same JSON without the envelope.
    std::fs::write(&path, &stored[persist::HEADER_LEN..]).expect("legacy");
    let set = ReplicaSet::open(dir.path()).expect("reopen");
    let r = set.get(&vm("vm4")).expect("legacy replica opens");
    assert_eq!(r.latest_seq(), Some(2));
    let p1 = read_all(&*r.open_point("p1").expect("p1").disks[0].1);
    assert_eq!(&p1[..10], &[1u8; 10]);
    point(&r, 3, &[(0, 3, 10)]);
    assert_eq!(&std::fs::read(&path).expect("state")[..4], &REPLICA_STATE.magic, "rewritten in the envelope");
}

#[test]
fn a_torn_or_corrupt_state_file_keeps_the_replica_out_of_service_and_its_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let folder = replica_with_points(dir.path(), "vm5");
    let path = folder.join(STATE_FILE);
    let good = std::fs::read(&path).expect("state");
    let files_before = std::fs::read_dir(&folder).expect("ls").count();
    let mut corrupt = good.clone();
    corrupt[persist::HEADER_LEN + 5] ^= 0x20;
    for (what, bytes) in [("torn", good[..good.len() / 2].to_vec()), ("corrupt", corrupt)] {
        std::fs::write(&path, &bytes).expect("damage");
        match Replica::open(&folder) {
            Err(ReplicaError::StateFile(e)) => {
                assert_eq!(e.path(), path, "{what}");
                assert!(e.is_damage(), "{what}: {e}");
                let torn = matches!(e, PersistError::Torn { .. });
                assert_eq!(torn, what == "torn", "{what}: {e}");
            }
            other => panic!("{what}: {other:?}"),
        }
        // The set opens, without that replica, and leaves its folder alone.
        let set = ReplicaSet::open(dir.path()).expect("set opens");
        assert!(
            set.get(&vm("vm5")).is_none()
                && set.by_relationship(&"r-00000001".parse().expect("relationship id")).is_none(),
            "{what}"
        );
        assert_eq!(std::fs::read_dir(&folder).expect("ls").count(), files_before, "{what}");
        assert_eq!(std::fs::read(&path).expect("state"), bytes, "{what}: the damaged file is kept");
    }
    std::fs::write(&path, &good).expect("repair");
    assert!(ReplicaSet::open(dir.path()).expect("set").get(&vm("vm5")).is_some());
}

#[test]
fn a_state_file_from_a_newer_agent_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let folder = replica_with_points(dir.path(), "vm6");
    let path = folder.join(STATE_FILE);
    let mut b = std::fs::read(&path).expect("state");
    b[4..6].copy_from_slice(&(REPLICA_STATE.version + 1).to_le_bytes());
    std::fs::write(&path, &b).expect("newer");
    assert!(matches!(Replica::open(&folder), Err(ReplicaError::StateFile(PersistError::NewerVersion { .. }))));
    assert!(ReplicaSet::open(dir.path()).expect("set").get(&vm("vm6")).is_none());
}

#[test]
fn leftover_temporaries_of_the_state_file_are_removed_on_open() {
    let dir = tempfile::tempdir().expect("tmp");
    let folder = replica_with_points(dir.path(), "vm7");
    let ours = folder.join("replica.json.0badc0de.tmp");
    let older = folder.join(".replica.json.tmp-1234");
    std::fs::write(&ours, b"SRRP").expect("tmp");
    std::fs::write(&older, b"{").expect("tmp");
    let set = ReplicaSet::open(dir.path()).expect("reopen");
    assert_eq!(set.get(&vm("vm7")).expect("replica").latest_seq(), Some(2));
    assert!(!ours.exists() && !older.exists());
}
