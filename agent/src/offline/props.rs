//! Property tests of the offline export's manifest decoder ([`Manifest::read`] and
//! [`Manifest::check`]): manifests round-trip; arbitrary and damaged files end in
//! [`OfflineError::Invalid`], never a panic; whatever parses is checked against the
//! replica without a panic (hostile sizes and ranges included); a file over the size
//! limit is refused before it is read.

use proptest::prelude::*;

use super::*;
use crate::testkit::{damage, tmpdir};

fn disk_strategy() -> impl Strategy<Value = ManifestDisk> {
    (
        "[a-z0-9]{1,8}",
        prop_oneof![0..1u64 << 40, any::<u64>()],
        prop::collection::vec((any::<u64>(), any::<u64>()), 0..6),
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
    )
        .prop_map(|(id, size_bytes, ranges, copied_bytes, log_seq, sorted)| {
            // Half the cases well-formed ranges (ascending, inside the disk).
            let ranges = if sorted {
                let mut cuts: Vec<u64> = ranges
                    .iter()
                    .flat_map(|&(a, b)| [a % size_bytes.saturating_add(1), b % size_bytes.saturating_add(1)])
                    .collect();
                cuts.sort_unstable();
                cuts.dedup();
                cuts.chunks_exact(2).map(|c| (c[0], c[1])).collect()
            } else {
                ranges
            };
            let total: u64 = ranges.iter().map(|&(s, e): &(u64, u64)| e.wrapping_sub(s)).fold(0, u64::wrapping_add);
            ManifestDisk {
                file: format!("{id}.img"),
                id,
                size_bytes,
                copied_bytes: if sorted { total } else { copied_bytes },
                ranges,
                xxh3: format!("{log_seq:016x}"),
                log_seq,
            }
        })
}

fn manifest_strategy() -> impl Strategy<Value = Manifest> {
    (prop::collection::vec(disk_strategy(), 0..4), any::<i64>(), "[ -~]{0,12}").prop_map(|(disks, created, vm)| {
        Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            relationship_id: "r-1".into(),
            vm,
            created_unix_ms: created,
            disks,
        }
    })
}

fn target_of(m: &Manifest) -> Target {
    Target {
        relationship_id: m.relationship_id.clone(),
        vm: m.vm.clone(),
        disks: m.disks.iter().map(|d| TargetDisk { id: d.id.clone(), size_bytes: d.size_bytes }).collect(),
    }
}

fn read_bytes(dir: &Path, bytes: &[u8]) -> Result<Manifest, OfflineError> {
    std::fs::write(dir.join(MANIFEST_FILE), bytes).expect("write manifest");
    Manifest::read(dir)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn manifests_round_trip_and_check_without_panic(m in manifest_strategy()) {
        let dir = tmpdir();
        let got = read_bytes(dir.path(), &serde_json::to_vec_pretty(&m).expect("json")).expect("read");
        prop_assert_eq!(&got, &m);
        // Against the replica it describes: a verdict, never a panic; ranges that are
        // out of order, outside the disk or miscounted are refused.
        let r = got.check(&target_of(&m));
        let well_formed = m.disks.iter().all(|d| {
            let mut prev = 0;
            d.ranges.iter().all(|&(s, e)| {
                let ok = s >= prev && e > s && e <= d.size_bytes;
                prev = e;
                ok
            }) && d.ranges.iter().map(|&(s, e)| e - s).sum::<u64>() == d.copied_bytes
        });
        let unique_ids = m.disks.iter().enumerate().all(|(i, d)| m.disks[..i].iter().all(|o| o.id != d.id));
        if unique_ids {
            prop_assert_eq!(r.is_ok(), well_formed, "{:?}", r);
        }
    }

    #[test]
    fn arbitrary_bytes_are_refused(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let dir = tmpdir();
        let r = read_bytes(dir.path(), &bytes);
        prop_assert!(matches!(r, Err(OfflineError::Invalid(_))), "{:?}", r);
    }

    #[test]
    fn a_damaged_manifest_is_refused_or_checked(m in manifest_strategy(), d in damage()) {
        let dir = tmpdir();
        let bad = d.apply(serde_json::to_vec_pretty(&m).expect("json"));
        match read_bytes(dir.path(), &bad) {
            Ok(got) => {
                let _ = got.check(&target_of(&m));
            }
            Err(OfflineError::Invalid(_)) => {}
            Err(e) => prop_assert!(false, "{e:?}"),
        }
    }
}

#[test]
fn a_manifest_over_the_limit_is_refused_before_reading() {
    let dir = tmpdir();
    // Sparse: 64 MiB + 1 byte of nothing.
    let f = File::create(dir.path().join(MANIFEST_FILE)).expect("create");
    f.set_len(MANIFEST_MAX_BYTES + 1).expect("len");
    match Manifest::read(dir.path()) {
        Err(OfflineError::Invalid(why)) => assert!(why.contains("too large"), "{why}"),
        other => panic!("{other:?}"),
    }
}
