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
