//! Property tests of the overlay map's decoder ([`Overlay::open`]): written blocks
//! round-trip through a flush and a reopen; arbitrary and damaged map files (enveloped
//! or legacy raw) open to a typed error or to a map inside the disk, never a panic; a
//! map claiming more bytes than the disk needs is refused before it is read.

use proptest::prelude::*;

use super::*;
use crate::disk::RawFile;
use crate::testkit::{damage, tmpdir};

/// Disk size: not a multiple of the block, so the last block is partial (and the last
/// map word has bits past the disk).
const SIZE: u64 = 5 * BLOCK * 64 / 4 + 100;

fn base(dir: &Path) -> Arc<dyn BlockDevice> {
    let p = dir.join("base.img");
    std::fs::write(&p, vec![7u8; SIZE as usize]).expect("base");
    Arc::new(RawFile::open(&p, true).expect("open base"))
}

fn read_all(ov: &Overlay) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    ov.read_at(&mut v, 0).expect("read");
    v
}

/// Opens the overlay with map file `bytes`; on success checks the map stays inside the
/// disk and the whole disk reads.
fn open_with_map(dir: &Path, bytes: &[u8]) -> Result<Vec<u64>, OverlayError> {
    let ov_path = dir.join("d.overlay");
    std::fs::write(map_path(&ov_path), bytes).expect("map");
    let ov = Overlay::open(base(dir), &ov_path)?;
    let blocks = ov.written_blocks();
    assert!(blocks.iter().all(|&b| b < SIZE.div_ceil(BLOCK)), "blocks past the disk: {blocks:?}");
    read_all(&ov);
    Ok(blocks)
}

fn words() -> usize {
    SIZE.div_ceil(BLOCK).div_ceil(64) as usize
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn written_blocks_round_trip_through_the_map(
        writes in prop::collection::vec((0..SIZE, 1..3 * BLOCK, any::<u8>()), 0..12),
    ) {
        let dir = tmpdir();
        let ov_path = dir.path().join("d.overlay");
        let ov = Overlay::open(base(dir.path()), &ov_path).expect("open");
        let mut want = vec![7u8; SIZE as usize];
        let mut blocks = std::collections::BTreeSet::new();
        for &(off, len, fill) in &writes {
            let len = len.min(SIZE - off);
            ov.write_at(&vec![fill; len as usize], off, false).expect("write");
            want[off as usize..(off + len) as usize].fill(fill);
            blocks.extend(off / BLOCK..(off + len).div_ceil(BLOCK));
        }
        ov.flush().expect("flush");
        drop(ov);
        let ov = Overlay::open(base(dir.path()), &ov_path).expect("reopen");
        prop_assert_eq!(ov.written_blocks(), blocks.into_iter().collect::<Vec<_>>());
        prop_assert!(read_all(&ov) == want);
    }

    #[test]
    fn arbitrary_maps_open_inside_the_disk_or_are_refused(
        map in prop::collection::vec(any::<u64>(), 0..8),
        envelope in any::<bool>(),
    ) {
        let dir = tmpdir();
        let raw: Vec<u8> = map.iter().flat_map(|w| w.to_le_bytes()).collect();
        let bytes = if envelope { persist::encode(&OVERLAY_MAP, &raw) } else { raw };
        match open_with_map(dir.path(), &bytes) {
            Ok(blocks) => prop_assert!(map.len() == words() && blocks.len() as u32 <= map.iter().map(|w| w.count_ones()).sum::<u32>()),
            Err(OverlayError::Map(_) | OverlayError::MapSize { .. } | OverlayError::StrayBlocks { .. }) => {}
            Err(e) => prop_assert!(false, "{e:?}"),
        }
    }

    #[test]
    fn random_map_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), magic in any::<bool>()) {
        let dir = tmpdir();
        let mut b = bytes;
        if magic && b.len() >= 4 {
            b[..4].copy_from_slice(&OVERLAY_MAP.magic);
        }
        let _ = open_with_map(dir.path(), &b);
    }

    #[test]
    fn a_damaged_map_fails_the_open(bits in prop::collection::vec(any::<u64>(), 1..2), d in damage()) {
        let dir = tmpdir();
        // A valid map: only blocks inside the disk.
        let last = (SIZE.div_ceil(BLOCK) % 64) as u32;
        let mut map = vec![bits[0]; words()];
        if let Some(w) = map.last_mut() {
            *w &= (1u64 << last) - 1;
        }
        let raw: Vec<u8> = map.iter().flat_map(|w| w.to_le_bytes()).collect();
        let good = persist::encode(&OVERLAY_MAP, &raw);
        prop_assert!(open_with_map(dir.path(), &good).is_ok());
        let r = open_with_map(dir.path(), &d.apply(good));
        prop_assert!(r.is_err(), "undetected {:?}: {:?}", d, r);
    }
}

#[test]
fn a_map_claiming_more_than_the_disk_needs_is_refused_before_reading() {
    let dir = tmpdir();
    let mut b = persist::encode(&OVERLAY_MAP, &vec![0u8; words() * 8]);
    b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    match open_with_map(dir.path(), &b) {
        Err(OverlayError::Map(PersistError::TooLarge { len, max, .. })) => {
            assert_eq!((len, max), (u64::from(u32::MAX), words() as u64 * 8));
        }
        other => panic!("{other:?}"),
    }
}
