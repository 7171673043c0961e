//! Unit tests of the tracker: tracking off and on, stop, out-of-range and empty writes.

use super::*;

fn setup(size: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("d.img");
    File::create(&img).and_then(|f| f.set_len(size)).expect("image");
    (dir, img)
}

fn id() -> DiskId {
    DiskId::new("d").expect("id")
}

#[test]
fn untracked_writes_are_not_logged_and_switching_off_seals() {
    let (_dir, img) = setup(1 << 20);
    let d = TrackedDisk::open(&img, id(), false).expect("open");
    d.write_at(&[1; 512], 0, false).expect("write");
    assert_eq!(d.seal().expect("seal"), None);
    d.set_tracking(true).expect("on");
    d.write_at(&[2; 512], 512, true).expect("write");
    d.set_tracking(false).expect("off");
    let sealed = d.sealed_logs();
    assert_eq!(sealed.len(), 1);
    assert_eq!(hrl::verify_sealed(&sealed[0].path).expect("verify").record_count, 1);
    d.write_at(&[3; 512], 0, false).expect("write");
    assert_eq!(d.seal().expect("seal"), None, "untracked writes leave the open log empty");
}

#[test]
fn stop_refuses_writes_and_seals() {
    let (_dir, img) = setup(1 << 20);
    let d = TrackedDisk::open(&img, id(), true).expect("open");
    d.write_zeroes(0, 4096, false, false).expect("zeroes");
    d.trim(4096, 4096).expect("trim");
    let seq = d.stop().expect("stop").expect("sealed");
    assert!(matches!(d.write_at(&[1], 0, false), Err(DiskError::Stopped)));
    assert!(matches!(d.seal(), Err(TrackerError::Stopped)));
    assert_eq!(d.sealed_logs()[0].seq, seq);
    let mut buf = [9u8; 16];
    d.read_at(&mut buf, 0).expect("read after stop");
    assert_eq!(buf, [0; 16]);
}

#[test]
fn out_of_range_and_empty_writes() {
    let (_dir, img) = setup(4096);
    let d = TrackedDisk::open(&img, id(), true).expect("open");
    assert!(matches!(d.write_at(&[1; 2], 4095, false), Err(DiskError::OutOfRange { .. })));
    assert!(matches!(d.write_zeroes(u64::MAX, 2, false, false), Err(DiskError::OutOfRange { .. })));
    d.write_at(&[], 10, false).expect("empty write");
    assert_eq!(d.seal().expect("seal"), None);
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::ENOSPC)
}

fn coalesced_items(path: &Path) -> Vec<hrl::CoalescedItem> {
    let mut c = hrl::Coalesced::open(path).expect("coalesce");
    c.items().collect::<Result<_, _>>().expect("items")
}

#[test]
fn a_failed_image_write_at_the_log_tail_is_cut_away() {
    let (_dir, img) = setup(1 << 20);
    let d = TrackedDisk::open(&img, id(), true).expect("open");
    d.write_at(&[1; 4096], 0, false).expect("write");
    let len_before = d.pending_log_bytes();
    let failed = d.mutate(RecordKind::Write, 4096, 4096, &[2; 4096], false, || Err(enospc()));
    assert!(matches!(failed, Err(DiskError::NoSpace(_))), "{failed:?}");
    assert_eq!(d.pending_log_bytes(), len_before, "the failed record is cut from the log");
    d.seal().expect("seal").expect("sealed");
    let items = coalesced_items(&d.sealed_logs()[0].path);
    assert_eq!(items, vec![hrl::CoalescedItem::Write { offset: 0, data: vec![1; 4096] }]);
}

#[test]
fn a_failed_image_write_before_later_records_is_cancelled_never_shipped_nor_reapplied() {
    let (dir, img) = setup(1 << 20);
    let d = TrackedDisk::open(&img, id(), true).expect("open");
    // While the failing write is in flight (logged, image write running) another write
    // is logged after it, so the failed one is no longer the log's tail.
    let failed = d.mutate(RecordKind::Write, 8192, 4096, &[7; 4096], false, || {
        d.write_at(&[3; 4096], 0, false).expect("concurrent write");
        Err(enospc())
    });
    assert!(failed.is_err());
    let (_, open_path) = d.current_log().expect("open log");
    let scan = hrl::scan(&open_path).expect("scan");
    assert_eq!(scan.record_count, 3, "failed write, later write, cancel");
    // A crash now (the disk dropped without stop): the restart re-applies the open log.
    // Make the image differ from the failed write's data so a re-apply would show.
    drop(d);
    let d = TrackedDisk::open(&img, id(), true).expect("reopen");
    let mut buf = [9u8; 4096];
    d.read_at(&mut buf, 8192).expect("read");
    assert_eq!(buf, [0; 4096], "the failed write is not re-applied");
    d.read_at(&mut buf, 0).expect("read");
    assert_eq!(buf, [3; 4096], "the acknowledged write is");
    d.seal().expect("seal").expect("sealed");
    let items = coalesced_items(&d.sealed_logs()[0].path);
    assert_eq!(items, vec![hrl::CoalescedItem::Write { offset: 0, data: vec![3; 4096] }], "never shipped");
    drop(dir);
}

#[test]
fn a_seal_settles_a_failure_first_and_a_failed_write_without_tracking_leaves_no_log() {
    let (_dir, img) = setup(1 << 20);
    let d = TrackedDisk::open(&img, id(), false).expect("open");
    assert!(d.mutate(RecordKind::Write, 0, 512, &[1; 512], false, || Err(enospc())).is_err());
    d.set_tracking(true).expect("on");
    assert!(d.mutate(RecordKind::Zeroes, 0, 512, &[], false, || Err(enospc())).is_err());
    assert_eq!(d.seal().expect("seal"), None, "the only record was taken back: nothing to seal");
}

#[test]
fn an_open_log_of_format_version_1_is_sealed_at_start_and_the_next_log_is_version_2() {
    let (dir, img) = setup(1 << 20);
    let d = TrackedDisk::open(&img, id(), true).expect("open");
    d.write_at(&[5; 512], 0, false).expect("write");
    let (seq, path) = d.current_log().expect("open log");
    drop(d);
    // Rewrite the header as version 1 (header crc and every record crc stay valid: the
    // chain is seeded from the header, so rebuild the file with a v1 writer's bytes).
    let mut bytes = std::fs::read(&path).expect("read log");
    bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..124]);
    bytes[124..128].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write log");
    let d = TrackedDisk::open(&img, id(), true).expect("reopen");
    assert_eq!(d.sealed_logs().iter().map(|l| l.seq).collect::<Vec<_>>(), vec![seq], "v1 log sealed");
    assert_eq!(hrl::verify_sealed(&path).expect("verify").record_count, 1);
    let (next, next_path) = d.current_log().expect("new log");
    assert_eq!(next, seq.next());
    assert_eq!(HrlReader::open(&next_path).expect("open").header().version, hrl::FORMAT_VERSION);
    drop(dir);
}
