//! Unit tests of the dirty-block bitmap and the log budget.

use super::*;
use crate::disk::BlockDevice;
use crate::hrl::DiskId;

const BS: u64 = DIRTY_BLOCK_SIZE as u64;

fn setup(size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("d.img");
    File::create(&img).and_then(|f| f.set_len(size)).expect("image");
    (dir, img)
}

fn hrl_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".hrl"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[test]
fn marks_merge_into_block_ranges_and_reload() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.dirty");
    let size = 10 * BS + 100; // a short last block
    let mut m = DirtyBitmap::create(&path, size).expect("create");
    assert_eq!(m.dirty_blocks(), 0);
    m.mark(1, 1).expect("mark"); // block 0
    m.mark(BS - 1, 2).expect("mark"); // blocks 0 and 1
    m.mark(5 * BS, 0).expect("empty mark");
    m.mark(9 * BS + 5, 10 * BS).expect("mark past the end"); // blocks 9, 10 (clamped)
    assert_eq!(m.dirty_blocks(), 4);
    assert_eq!(m.ranges(), vec![(0, 2 * BS), (9 * BS, BS + 100)]);
    m.sync().expect("sync");
    let r = DirtyBitmap::load(&path, size).expect("load").expect("present");
    assert_eq!(r.ranges(), m.ranges());
    r.remove().expect("remove");
    assert!(DirtyBitmap::load(&path, size).expect("load").is_none());
}

#[test]
fn a_torn_or_foreign_file_counts_as_all_dirty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.dirty");
    let size = 20 * BS;
    let mut m = DirtyBitmap::create(&path, size).expect("create");
    m.mark(0, 1).expect("mark");
    drop(m);
    // Torn: cut inside the bits.
    let len = std::fs::metadata(&path).expect("meta").len();
    std::fs::OpenOptions::new().write(true).open(&path).and_then(|f| f.set_len(len - 1)).expect("truncate");
    let r = DirtyBitmap::load(&path, size).expect("load").expect("present");
    assert_eq!(r.ranges(), vec![(0, size)], "a torn bitmap is all dirty");
    // Rewritten whole: loads as is again.
    assert_eq!(DirtyBitmap::load(&path, size).expect("reload").expect("present").dirty_blocks(), 20);
    // Header damaged.
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[3] ^= 0xff;
    std::fs::write(&path, &bytes).expect("write");
    assert_eq!(DirtyBitmap::load(&path, size).expect("load").expect("present").dirty_blocks(), 20);
    // Another disk size: the geometry does not match.
    let r = DirtyBitmap::load(&path, 40 * BS).expect("load").expect("present");
    assert_eq!(r.ranges(), vec![(0, 40 * BS)]);
}

#[test]
fn past_the_budget_logs_collapse_and_writes_only_mark() {
    let (dir, img) = setup(64 * BS);
    let d = TrackedDisk::open(&img, DiskId::new("d").expect("id"), true).expect("open");
    let budget = 4 * BS;
    d.set_log_budget(budget);
    d.write_at(&[1; 4096], 0, false).expect("write");
    d.seal().expect("seal");
    d.write_at(&[2; 4096], 3 * BS, false).expect("write");
    assert!(d.bitmap_state().is_none());
    // Past the budget: both logs collapse, the write succeeds and marks.
    for i in 0..10u64 {
        d.write_at(&vec![3u8; BS as usize], (10 + i) * BS, true).expect("write past the budget");
        assert!(hrl_bytes(dir.path()) <= budget, "logs stay under the budget");
    }
    let s = d.bitmap_state().expect("on the bitmap");
    assert_eq!(s.dirty_blocks, 12, "blocks 0, 3 and 10..20");
    assert!(d.sealed_logs().is_empty());
    assert!(d.pending_log_bytes() <= budget);
    // The image took every write.
    let mut buf = vec![0u8; 4096];
    d.read_at(&mut buf, 15 * BS).expect("read");
    assert_eq!(buf, vec![3u8; 4096]);
    // Reopened (a restart): still on the bitmap, same blocks.
    drop(d);
    let d = TrackedDisk::open(&img, DiskId::new("d").expect("id"), true).expect("reopen");
    assert_eq!(d.bitmap_state().map(|s| s.dirty_blocks), Some(12));
    // Catch-up: the blocks are taken, writes are logged again.
    let t = d.take_dirty().expect("take").expect("dirty");
    assert_eq!(t.ranges, vec![(0, BS), (3 * BS, BS), (10 * BS, 10 * BS)]);
    assert_eq!(t.bytes, 12 * BS);
    d.write_at(&[4; 512], 40 * BS, false).expect("write while draining");
    assert!(d.pending_log_bytes() > 0, "logged again");
    assert!(d.bitmap_state().expect("kept until acknowledged").draining);
    d.finish_catch_up().expect("finish");
    assert!(d.bitmap_state().is_none());
    assert!(!dir.path().join("d.img.dirty").exists());
    assert_eq!(d.sealed_logs().len() + usize::from(d.current_log().is_some()), 1);
}

#[test]
fn a_failed_catch_up_takes_the_logs_written_since() {
    let (_dir, img) = setup(64 * BS);
    let d = TrackedDisk::open(&img, DiskId::new("d").expect("id"), true).expect("open");
    d.set_log_budget(BS);
    d.write_at(&vec![1u8; 2 * BS as usize], 0, false).expect("write");
    assert_eq!(d.bitmap_state().map(|s| s.dirty_blocks), Some(2));
    let first = d.take_dirty().expect("take").expect("dirty");
    assert_eq!(first.blocks, 2);
    d.write_at(&[2; 512], 30 * BS, false).expect("logged");
    d.seal().expect("seal");
    // The point was not acknowledged: taken again, the log written since joins.
    let again = d.take_dirty().expect("take").expect("dirty");
    assert_eq!(again.ranges, vec![(0, 2 * BS), (30 * BS, BS)]);
    assert!(again.through > first.through);
    assert!(d.sealed_logs().is_empty());
}
