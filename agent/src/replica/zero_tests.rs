//! Unit tests of zero extents on the replica: applied as holes, stored in undo records
//! as zero ranges (no bytes), merged and rolled back through them.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::disk::BlockDevice;

const SIZE: u64 = 16 << 20;

fn disk0() -> siterecovery_proto::model::DiskId {
    "disk0".parse().expect("disk id")
}

fn spec(vm: &str, bucket_ms: u64) -> ReplicaSpec {
    ReplicaSpec {
        machine: Default::default(),
        bucket_ms,
        relationship_id: "r-00000001".into(),
        vm: vm.into(),
        primary_host_id: "h1".into(),
        disks: vec![ReplicaDisk { id: "disk0".into(), size_bytes: SIZE }],
        retention_ms: 24 * 3_600_000,
    }
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.size() as usize];
    dev.read_at(&mut v, 0).expect("read");
    v
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).expect("meta").blocks() * 512
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).expect("meta").len()
}

fn undo_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "undo"))
        .collect();
    v.sort();
    v
}

/// Point `seq` at time `t` of data writes `(offset, byte, len)` and zero ranges `(offset, len)`.
fn point(r: &Arc<Replica>, seq: u64, t: i64, data: &[(u64, u8, usize)], zeroes: &[(u64, u64)]) -> PointInfo {
    let mut s = r.begin_point(seq, t, false, false).expect("begin");
    for &(off, b, len) in data {
        s.push(&disk0(), off, ExtentData::Data(&vec![b; len])).expect("push");
    }
    for &(off, len) in zeroes {
        s.push(&disk0(), off, ExtentData::Zeroes(len)).expect("push zeroes");
    }
    s.commit().expect("commit")
}

#[test]
fn a_zero_extent_punches_the_replica_and_its_undo_stores_no_zero_bytes() {
    let dir = tempfile::tempdir().expect("tmp");
    let set = ReplicaSet::open(dir.path()).expect("open");
    let r = set.prepare(spec("vm1", 1)).expect("prepare");
    r.ack_initial(&disk0(), SIZE, true).expect("ack");
    let t0 = now_ms() - 100_000;
    let p1 = point(&r, 1, t0, &[(0, 0xab, 2 << 20), (8 << 20, 0xcd, 4096)], &[]);
    let img = r.dir().join("disk0.img");
    let full = allocated(&img);
    assert!(full >= (2 << 20) + 4096, "data allocated: {full}");

    // The whole disk discarded: a hole on the image, zeroes at the point.
    let p2 = point(&r, 2, t0 + 10, &[], &[(0, SIZE)]);
    assert!(allocated(&img) < 64 << 10, "punched: {} bytes still allocated", allocated(&img));
    assert!(read_all(&*r.open_point(&p2.id).expect("p2").disks[0].1).iter().all(|&b| b == 0));
    // The undo holds the 2 MiB + 4 KiB of data, not 16 MiB of before-image.
    let undo = undo_files(r.dir());
    let undo_len: u64 = undo.iter().map(|u| file_len(u)).sum();
    assert!(undo_len < (2 << 20) + 4096 + 4096, "undo is {undo_len} bytes");
    let v1 = read_all(&*r.open_point(&p1.id).expect("p1").disks[0].1);
    assert!(v1[..2 << 20].iter().all(|&b| b == 0xab));
    assert!(v1[8 << 20..(8 << 20) + 4096].iter().all(|&b| b == 0xcd));
    assert!(v1[2 << 20..8 << 20].iter().all(|&b| b == 0) && v1[(8 << 20) + 4096..].iter().all(|&b| b == 0));

    // Data again over part of the hole: its undo is one zero record.
    point(&r, 3, t0 + 20, &[(4 << 20, 0xee, 1 << 20)], &[]);
    let undo3 = undo_files(r.dir()).into_iter().find(|u| !undo.contains(u)).expect("undo of p3");
    assert!(file_len(&undo3) < 256, "undo of a write over a hole is {} bytes", file_len(&undo3));

    // Rolled back to p1: the data is back and the punched ranges are holes again.
    r.rollback_to(&p1.id).expect("rollback");
    let now = read_all(&*r.open_point(&p1.id).expect("p1").disks[0].1);
    assert_eq!(now, v1);
    let mut raw = vec![0u8; SIZE as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(&img).expect("img"), &mut raw, 0).expect("read");
    assert_eq!(raw, v1, "the image is at p1");
    assert!(allocated(&img) < full + (64 << 10), "rollback allocated {} (was {full})", allocated(&img));
}

#[test]
fn pruning_merges_zero_undo_records() {
    let dir = tempfile::tempdir().expect("tmp");
    let set = ReplicaSet::open(dir.path()).expect("open");
    let hour = 3_600_000;
    let r = set.prepare(spec("vm2", hour)).expect("prepare");
    r.ack_initial(&disk0(), SIZE, true).expect("ack");
    let t0 = now_ms() - 3 * hour as i64;
    // Two points in hour 0 (the first is pruned, its undo merged), one in hour 2.
    point(&r, 1, t0 + 10, &[(0, 1, 1 << 20)], &[]);
    point(&r, 2, t0 + 20, &[(4096, 2, 4096)], &[(1 << 20, 4 << 20)]);
    let p3 = point(&r, 3, t0 + 30, &[], &[(0, 8192), (12 << 20, 4096)]);
    let before = read_all(&*r.open_point(&p3.id).expect("p3").disks[0].1);
    point(&r, 4, now_ms(), &[(0, 4, 6 << 20)], &[]);
    let seqs: Vec<u64> = r.points().iter().map(|p| p.seq).collect();
    assert!(!seqs.contains(&1) && !seqs.contains(&2) && seqs.contains(&3), "pruned: {seqs:?}");
    assert_eq!(read_all(&*r.open_point(&p3.id).expect("p3").disks[0].1), before);
    // The merged undo stores p3's before-image of p4's 6 MiB write: 1 MiB - 8 KiB of
    // data and zero records for the rest.
    let undo_len: u64 = undo_files(r.dir()).iter().map(|u| file_len(u)).sum();
    assert!(undo_len < (1 << 20) + (64 << 10), "undo is {undo_len} bytes");
}

#[test]
fn a_version_1_undo_record_is_still_read() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("undo-7.undo");
    let data = vec![0x3cu8; 5000];
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&100u64.to_le_bytes());
    hdr.extend_from_slice(&(data.len() as u64).to_le_bytes());
    hdr.extend_from_slice(&crc32c::crc32c(&data).to_le_bytes());
    let total = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&[]), &hdr), &data);
    let mut file = b"SRUNDO01".to_vec();
    file.extend_from_slice(&7u64.to_le_bytes());
    file.extend_from_slice(&hdr);
    file.extend_from_slice(&data);
    file.extend_from_slice(&END.to_le_bytes());
    file.extend_from_slice(&total.to_le_bytes());
    std::fs::write(&path, &file).expect("write");
    let undo = super::undo::load_undo(&path, 1).expect("load v1");
    assert_eq!(undo.ranges[0], vec![(100, 5000, Some(16 + 24))]);
    let mut buf = vec![9u8; 6000];
    undo.overlay(0, 0, &mut buf).expect("overlay");
    assert!(buf[..100].iter().all(|&b| b == 9) && buf[100..5100].iter().all(|&b| b == 0x3c));
    // A flipped byte of the data is caught.
    let mut bad = file.clone();
    bad[16 + 24 + 10] ^= 1;
    std::fs::write(&path, &bad).expect("write");
    assert!(super::undo::load_undo(&path, 1).is_err());
}
