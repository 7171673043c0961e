//! Trim and write-zeroes on the tracked image: a hole is punched (or, for NBD `NO_HOLE`,
//! the range zeroed in place) instead of writing zero bytes, so a guest discard frees
//! space on a thin image. The HRL log records the range only (`Zeroes`/`Trim` records
//! carry no data), and the sender ships it as a zero extent.

use std::io;

use super::TrackedDisk;
use crate::zeroes::{ZeroMode, zero_range};

/// How a zero record of the open log is re-applied after a crash: the record does not
/// say whether `NO_HOLE` was asked, and reading zeroes is all the guest was promised.
pub(super) const REAPPLY: ZeroMode = ZeroMode::Punch;

impl TrackedDisk {
    pub(super) fn zero_image(&self, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
        zero_range(&self.image, offset, len, mode)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::path::Path;

    use crate::disk::BlockDevice;
    use crate::hrl::{self, DiskId, HrlReader, RecordKind};
    use crate::tracker::TrackedDisk;

    fn allocated(path: &Path) -> u64 {
        std::fs::metadata(path).expect("meta").blocks() * 512
    }

    #[test]
    fn trim_and_write_zeroes_punch_the_image_and_log_ranges_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("d.img");
        File::create(&img).and_then(|f| f.set_len(64 << 20)).expect("image");
        let d = TrackedDisk::open(&img, DiskId::new("d").expect("id"), false).expect("open");
        d.write_at(&vec![0x5a; 16 << 20], 0, true).expect("fill");
        let full = allocated(&img);
        assert!(full >= 16 << 20, "filled: {full}");
        d.set_tracking(true).expect("on");
        d.trim(0, 8 << 20).expect("trim");
        d.write_zeroes(8 << 20, 56 << 20, false, false).expect("zeroes");
        // NO_HOLE: zeroed but left allocated.
        d.write_at(&vec![0x77; 1 << 20], 20 << 20, false).expect("write");
        d.write_zeroes(20 << 20, 1 << 20, false, true).expect("zeroes, no hole");
        let mut buf = vec![1u8; 64 << 20];
        d.read_at(&mut buf, 0).expect("read");
        assert!(crate::zeroes::is_zero(&buf), "reads zeroes");
        let now = allocated(&img);
        assert!(now <= (1 << 20) + (64 << 10), "allocated {now} of {full}");
        let seq = d.seal().expect("seal").expect("sealed");
        let log = d.sealed_logs().into_iter().find(|l| l.seq == seq).expect("log");
        assert!(log.bytes < (1 << 20) + 4096, "log of the zero ranges is {} bytes", log.bytes);
        let mut r = HrlReader::open(&log.path).expect("reader");
        let mut data = Vec::new();
        let mut kinds = Vec::new();
        while let Some(rec) = r.next_record(&mut data).expect("record") {
            kinds.push((rec.kind, rec.offset, rec.length));
        }
        assert_eq!(
            kinds,
            [
                (RecordKind::Trim, 0, 8 << 20),
                (RecordKind::Zeroes, 8 << 20, 56 << 20),
                (RecordKind::Write, 20 << 20, 1 << 20),
                (RecordKind::Zeroes, 20 << 20, 1 << 20)
            ]
        );
        hrl::verify_sealed(&log.path).expect("sealed log verifies");
    }

    #[test]
    fn a_trim_in_the_open_log_is_reapplied_as_a_hole() {
        let dir = tempfile::tempdir().expect("tmp");
        let img = dir.path().join("d.img");
        File::create(&img).and_then(|f| f.set_len(8 << 20)).expect("image");
        {
            let d = TrackedDisk::open(&img, DiskId::new("d").expect("id"), true).expect("open");
            d.write_at(&vec![0x11; 4 << 20], 0, false).expect("write");
            d.trim(1 << 20, 2 << 20).expect("trim");
            d.flush().expect("flush");
            // "crash": the image loses the trim (as if not applied), the log keeps it.
        }
        File::options()
            .write(true)
            .open(&img)
            .and_then(|f| f.write_all_at(&vec![0x11; 4 << 20], 0))
            .expect("undo the trim on the image");
        let d = TrackedDisk::open(&img, DiskId::new("d").expect("id"), true).expect("reopen");
        let mut buf = vec![0u8; 4 << 20];
        d.read_at(&mut buf, 0).expect("read");
        assert!(buf[..1 << 20].iter().all(|&b| b == 0x11) && buf[3 << 20..].iter().all(|&b| b == 0x11));
        assert!(crate::zeroes::is_zero(&buf[1 << 20..3 << 20]));
        assert!(allocated(&img) <= (2 << 20) + (64 << 10), "re-applied as a hole: {}", allocated(&img));
    }
}
