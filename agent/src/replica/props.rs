//! Property tests of the replica's on-disk decoders: the spool ([`super::spool::apply`])
//! and undo records ([`super::undo::load_undo`], [`super::undo::merge_undo`]). Arbitrary
//! bytes and damaged valid files (a flipped byte, cut short, extended) never panic and
//! end in a typed error or a value; valid files round-trip; length fields over the
//! documented limits are refused before anything that size is allocated.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use proptest::prelude::*;

use super::image::Image;
use super::spool::{self, ExtentData};
use super::undo::{load_undo, merge_undo, write_undo};
use super::{END, MAX_EXTENT, ReplicaError};
use crate::testkit::{Damage, damage, tmpdir};

/// Size of each test image: small, so a damaged zeroes length writes little.
const DISK: u64 = 64 << 10;

fn image(dir: &Path, i: usize, size: u64, fill: &[u8]) -> Image {
    let path = dir.join(format!("d{i}.img"));
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("image");
    file.set_len(size).expect("len");
    file.write_all_at(fill, 0).expect("fill");
    Image { id: format!("d{i}"), path, file, size }
}

fn contents(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; img.size as usize];
    img.file.read_exact_at(&mut v, 0).expect("read image");
    v
}

/// `n` pseudo-random bytes from `seed` (cheaper than a generated vector of that size).
fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An extent: disk, offset, Some(data) or None for zeroes of `len`.
type Ext = (u32, u64, Option<Vec<u8>>, u64);

fn ext_strategy(disks: u32) -> impl Strategy<Value = Ext> {
    (0..disks, 0..DISK, any::<bool>(), 1..4096u64, any::<u8>()).prop_map(|(d, off, data, len, fill)| {
        let len = len.min(DISK - off);
        (d, off, data.then(|| vec![fill ^ (off as u8); len as usize]), len)
    })
}

fn spool_bytes(dir: &Path, exts: &[Ext]) -> Vec<u8> {
    let path = dir.join("p.pt");
    let _ = std::fs::remove_file(&path);
    let mut w = spool::create(&path, 7).expect("create");
    for (d, off, data, len) in exts {
        let e = match data {
            Some(d) => ExtentData::Data(d),
            None => ExtentData::Zeroes(*len),
        };
        spool::write_extent(&mut w, &path, *d, *off, e).expect("extent");
    }
    spool::finish(w, &path).expect("finish");
    std::fs::read(&path).expect("read spool")
}

/// Applies spool `bytes` to two fresh images; the images afterwards.
fn apply_spool(dir: &Path, bytes: &[u8]) -> (Result<(), ReplicaError>, Vec<Vec<u8>>) {
    let images = [image(dir, 0, DISK, &[0x5a; 512]), image(dir, 1, DISK, &[])];
    let path = dir.join("in.pt");
    std::fs::write(&path, bytes).expect("write spool");
    let r = spool::apply(&images, &path);
    (r, images.iter().map(contents).collect())
}

/// The images a spool of `exts` should leave (the model).
fn model(exts: &[Ext]) -> Vec<Vec<u8>> {
    let mut disks = vec![vec![0u8; DISK as usize]; 2];
    disks[0][..512].fill(0x5a);
    for (d, off, data, len) in exts {
        let r = &mut disks[*d as usize][*off as usize..(*off + *len) as usize];
        match data {
            Some(v) => r.copy_from_slice(v),
            None => r.fill(0),
        }
    }
    disks
}

/// Writes an undo record by hand from `recs` (disk, offset, data), every checksum valid:
/// what a damaged-but-consistent or hostile file looks like.
fn undo_bytes_raw(recs: &[(u32, u64, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"SRUNDO01".to_vec();
    out.extend_from_slice(&9u64.to_le_bytes());
    let mut total = crc32c::crc32c(&[]);
    for (d, off, data) in recs {
        let mut hdr = [0u8; 24];
        hdr[..4].copy_from_slice(&d.to_le_bytes());
        hdr[4..12].copy_from_slice(&off.to_le_bytes());
        hdr[12..20].copy_from_slice(&(data.len() as u64).to_le_bytes());
        hdr[20..24].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
        total = crc32c::crc32c_append(total, &hdr);
        total = crc32c::crc32c_append(total, data);
        out.extend_from_slice(&hdr);
        out.extend_from_slice(data);
    }
    out.extend_from_slice(&END.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out
}

/// Loads undo `bytes` for two disks and, when that works, reads the whole of both disks
/// through it and merges it with itself: none of it may panic.
fn exercise_undo(dir: &Path, bytes: &[u8]) -> Result<Vec<Vec<u8>>, ReplicaError> {
    let path = dir.join("u.undo");
    std::fs::write(&path, bytes).expect("write undo");
    let u = load_undo(&path, 2)?;
    let mut out = Vec::new();
    for d in 0..2 {
        let mut buf = vec![0u8; DISK as usize];
        u.overlay(d, 0, &mut buf).map_err(|e| ReplicaError::Io { path: path.clone(), source: e })?;
        out.push(buf);
    }
    merge_undo(dir, Some("u.undo"), Some("u.undo"), &dir.join("m.undo"), 9, 2)?;
    Ok(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn spool_round_trips(exts in prop::collection::vec(ext_strategy(2), 0..12)) {
        let dir = tmpdir();
        let (r, images) = apply_spool(dir.path(), &spool_bytes(dir.path(), &exts));
        prop_assert!(r.is_ok(), "{:?}", r);
        prop_assert!(images == model(&exts));
    }

    #[test]
    fn spool_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let dir = tmpdir();
        let mut b = bytes;
        if magic && b.len() >= 8 {
            b[..8].copy_from_slice(b"SRSPOOL1");
        }
        let _ = apply_spool(dir.path(), &b);
    }

    #[test]
    fn damaged_spool_is_refused_or_applies_within_the_disks(
        exts in prop::collection::vec(ext_strategy(2), 1..8),
        d in damage(),
    ) {
        let dir = tmpdir();
        let good = spool_bytes(dir.path(), &exts);
        let len = good.len();
        let (r, images) = apply_spool(dir.path(), &d.apply(good));
        match (&d, r) {
            // Bytes after the end marker are never read.
            (Damage::Extend(_), r) => {
                prop_assert!(r.is_ok(), "{:?}", r);
                prop_assert!(images == model(&exts));
            }
            // A spool cut short never reaches its end marker.
            (Damage::Cut(_), r) => prop_assert!(matches!(r, Err(ReplicaError::Corrupt { .. })), "{:?}", r),
            // The header's seq (8..16) is informational: the point applies as it was.
            (Damage::Flip(..), r) if d.flipped_at(len).is_some_and(|i| (8..16).contains(&i)) => {
                prop_assert!(r.is_ok(), "{:?}", r);
                prop_assert!(images == model(&exts));
            }
            (Damage::Flip(..), Err(ReplicaError::Corrupt { .. } | ReplicaError::OutOfRange { .. })) => {}
            (Damage::Flip(..), Err(e)) => prop_assert!(false, "untyped refusal {e:?}"),
            // A flip in the seq, a zeroes extent's offset/length/crc, or that keeps
            // the data's checksum: still applies, inside the disks.
            (Damage::Flip(..), Ok(())) => prop_assert!(images.iter().all(|i| i.len() == DISK as usize)),
        }
    }

    #[test]
    fn undo_round_trips(
        seed in any::<u64>(),
        ranges in prop::collection::vec((0..2usize, 0..DISK, 1..8192u64), 0..10),
    ) {
        let dir = tmpdir();
        let fill = pattern(seed, DISK as usize);
        let images = [image(dir.path(), 0, DISK, &fill), image(dir.path(), 1, DISK, &fill[..4096])];
        let mut per_disk = vec![Vec::new(); 2];
        for &(d, off, len) in &ranges {
            per_disk[d].push((off, len.min(DISK - off)));
        }
        write_undo(&images, &dir.path().join("w.undo"), 9, &per_disk).expect("write undo");
        let got = exercise_undo(dir.path(), &std::fs::read(dir.path().join("w.undo")).expect("read"))
            .expect("valid undo");
        // Inside the recorded ranges the before-images, elsewhere what the buffer held.
        for (d, img) in images.iter().enumerate() {
            let before = contents(img);
            let mut want = vec![0u8; DISK as usize];
            for &(off, len) in &per_disk[d] {
                want[off as usize..(off + len) as usize].copy_from_slice(&before[off as usize..(off + len) as usize]);
            }
            prop_assert!(got[d] == want, "disk {}", d);
        }
        // The merge of a record with itself reads the same.
        let merged = std::fs::read(dir.path().join("m.undo")).expect("merged");
        prop_assert!(exercise_undo(dir.path(), &merged).expect("merged undo") == got);
    }

    #[test]
    fn undo_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let dir = tmpdir();
        let mut b = bytes;
        if magic && b.len() >= 8 {
            b[..8].copy_from_slice(b"SRUNDO01");
        }
        prop_assert!(exercise_undo(dir.path(), &b).is_err() || b.len() >= 24);
    }

    #[test]
    fn damaged_undo_is_refused(
        recs in prop::collection::vec((0..2u32, 0..DISK - 4096, prop::collection::vec(any::<u8>(), 1..4096)), 1..6),
        d in damage(),
    ) {
        let dir = tmpdir();
        // Non-overlapping, as written by write_undo.
        let mut recs = recs;
        recs.sort_by_key(|r| (r.0, r.1));
        let mut ok = Vec::new();
        let mut end = [0u64; 2];
        for (disk, off, data) in recs {
            if off >= end[disk as usize] {
                end[disk as usize] = off + data.len() as u64;
                ok.push((disk, off, data));
            }
        }
        let good = undo_bytes_raw(&ok);
        prop_assert!(exercise_undo(dir.path(), &good).is_ok());
        let len = good.len();
        let bad = d.apply(good);
        match exercise_undo(dir.path(), &bad) {
            Err(ReplicaError::Corrupt { .. }) => {}
            // Bytes after the footer are never read; the header's seq (8..16) is
            // informational (the file name carries the point).
            Ok(_) => prop_assert!(
                matches!(d, Damage::Extend(_)) || d.flipped_at(len).is_some_and(|i| (8..16).contains(&i)),
                "undetected {:?}", d
            ),
            Err(e) => prop_assert!(false, "untyped refusal {e:?}"),
        }
    }

    /// Checksums valid, fields hostile: offsets near u64::MAX, overlapping ranges,
    /// unknown disks. Refused or read, never a panic (an overflow included).
    #[test]
    fn hostile_undo_never_panics(
        recs in prop::collection::vec(
            (0..3u32, prop_oneof![0..DISK, any::<u64>(), (u64::MAX - 8192)..=u64::MAX], prop::collection::vec(any::<u8>(), 0..512)),
            0..6,
        ),
    ) {
        let dir = tmpdir();
        let _ = exercise_undo(dir.path(), &undo_bytes_raw(&recs));
    }
}

#[test]
fn spool_lengths_over_the_limit_are_refused_before_allocating() {
    let dir = tmpdir();
    // A sparse image larger than the limit, so only the limit can refuse the extent.
    let images = [image(dir.path(), 0, 2 * MAX_EXTENT, &[])];
    let path = dir.path().join("big.pt");
    let mut b = b"SRSPOOL1".to_vec();
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.push(1);
    b.extend_from_slice(&0u64.to_le_bytes());
    b.extend_from_slice(&(MAX_EXTENT + 1).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    std::fs::write(&path, &b).expect("write");
    match spool::apply(&images, &path) {
        Err(ReplicaError::Corrupt { why, .. }) => assert_eq!(why, "extent too large"),
        other => panic!("{other:?}"),
    }
    // A length past the disk is refused whatever its kind.
    for kind in [1u8, 2] {
        b[20] = kind;
        b[29..37].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &b).expect("write");
        assert!(matches!(spool::apply(&images, &path), Err(ReplicaError::OutOfRange { .. })), "kind {kind}");
    }
}

#[test]
fn undo_lengths_over_the_limit_are_refused_before_allocating() {
    let dir = tmpdir();
    let mut b = undo_bytes_raw(&[(0, 0, vec![1; 16])]);
    // The record's length field claims 4 MiB + 1 (and then u64::MAX); the data is 16 bytes.
    for len in [(4u64 << 20) + 1, u64::MAX] {
        b[28..36].copy_from_slice(&len.to_le_bytes());
        match exercise_undo(dir.path(), &b) {
            Err(ReplicaError::Corrupt { why, .. }) => assert_eq!(why, "bad record"),
            other => panic!("{len}: {other:?}"),
        }
    }
}

#[test]
fn undo_ranges_that_overflow_or_overlap_are_refused() {
    let dir = tmpdir();
    let cases: [&[(u32, u64, Vec<u8>)]; 2] =
        [&[(0, u64::MAX - 3, vec![1; 16])], &[(0, 100, vec![1; 16]), (0, 108, vec![2; 16])]];
    for recs in cases {
        match exercise_undo(dir.path(), &undo_bytes_raw(recs)) {
            Err(ReplicaError::Corrupt { .. }) => {}
            other => panic!("{recs:?}: {other:?}"),
        }
    }
}
