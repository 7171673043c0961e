//! The tracked disk as a [`BlockDevice`]: what the NBD server calls for every request
//! (reads from the image, writes logged first, flush, trim and write-zeroes).

use super::*;
use crate::zeroes::ZeroMode;

impl BlockDevice for TrackedDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.image.read_exact_at(buf, offset).map_err(DiskError::from_io)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        self.mutate(RecordKind::Write, offset, data.len() as u64, data, fua, || self.write_image(data, offset))
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> Result<(), DiskError> {
        let mode = if no_hole { ZeroMode::Allocate } else { ZeroMode::Punch };
        self.mutate(RecordKind::Zeroes, offset, len, &[], fua, || self.zero_image(offset, len, mode))
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.mutate(RecordKind::Trim, offset, len, &[], false, || self.zero_image(offset, len, ZeroMode::Punch))
    }
    /// Group commit: the first flusher syncs everything completed so far; flushers that
    /// queued behind it find their writes covered and return without a second fdatasync.
    fn flush(&self) -> Result<(), DiskError> {
        let target = self.completed.load(Ordering::SeqCst);
        let mut synced = self.synced_gen.lock().unwrap_or_else(PoisonError::into_inner);
        if *synced >= target {
            return Ok(());
        }
        // Everything completed up to `now` is in this log file or in an earlier log,
        // which its seal already synced.
        let now = self.completed.load(Ordering::SeqCst);
        let log_file = self.lock().log_file.clone();
        crate::faults::point(crate::faults::HRL_APPEND_BEFORE_SYNC).map_err(DiskError::from_io)?;
        if let Some(f) = log_file {
            f.sync_data().map_err(DiskError::from_io)?;
        }
        self.spill.sync().map_err(DiskError::from_io)?; // before the image: it must cover it
        self.image.sync_data().map_err(DiskError::from_io)?;
        crate::faults::point(crate::faults::HRL_APPEND_AFTER_SYNC).map_err(DiskError::from_io)?;
        *synced = now;
        Ok(())
    }
}
