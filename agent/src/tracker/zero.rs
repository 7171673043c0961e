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
