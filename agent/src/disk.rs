//! The block device the NBD server exports.
//!
//! The NBD server (`nbd`) knows nothing of HRL logs or replication: it speaks to a
//! [`BlockDevice`]. The replication tracker (`tracker`) implements it for VM disks (every
//! write logged before it is acknowledged); [`RawFile`] implements it for an untracked
//! image (tests, read-only exports).
//!
//! Methods are blocking (positional file I/O); async callers run them on the blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::zeroes::{ZeroMode, zero_range};

/// Why a block operation failed; the NBD server maps each variant to an NBD errno.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The range ends past the end of the disk (NBD_EINVAL / NBD_ENOSPC for writes).
    #[error("range {offset}+{len} is outside the disk of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The export is read-only (NBD_EPERM).
    #[error("disk is read-only")]
    ReadOnly,
    /// The VM was stopped: no more writes are accepted (NBD_ESHUTDOWN).
    #[error("disk is stopped")]
    Stopped,
    /// No space left for the image or the HRL log (NBD_ENOSPC).
    #[error("no space left: {0}")]
    NoSpace(#[source] io::Error),
    /// Any other I/O failure (NBD_EIO).
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

impl DiskError {
    /// Classifies an `io::Error` from the image or the log.
    pub fn from_io(e: io::Error) -> Self {
        if e.raw_os_error() == Some(28) {
            // ENOSPC
            DiskError::NoSpace(e)
        } else {
            DiskError::Io(e)
        }
    }
}

/// A disk as an NBD export sees it.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes; fixed while exported.
    fn size(&self) -> u64;
    /// True when writes, trims and zeroes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError>;
    /// Writes `data` at `offset`; with `fua` durable before returning.
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError>;
    /// Makes `len` bytes at `offset` read as zeroes. Without `no_hole` the range may be
    /// deallocated (a hole punched); with it (NBD `NO_HOLE`) it stays allocated.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> Result<(), DiskError>;
    /// Discards `len` bytes at `offset`: in our implementations a hole is punched, and
    /// the range reads as zeroes afterwards.
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError>;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> Result<(), DiskError>;
}

/// Checks that `offset..offset+len` lies within a disk of `size` bytes, without overflow.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), DiskError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DiskError::OutOfRange { offset, len, size }),
    }
}

/// An untracked raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens an existing raw image.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = crate::files::open_existing(path, !read_only)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size, read_only })
    }
}

impl BlockDevice for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset).map_err(DiskError::from_io)
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.size)?;
        self.file.write_all_at(data, offset).map_err(DiskError::from_io)?;
        if fua {
            self.file.sync_data().map_err(DiskError::from_io)?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let mode = if no_hole { ZeroMode::Allocate } else { ZeroMode::Punch };
        zero_range(&self.file, offset, len, mode).map_err(DiskError::from_io)?;
        if fua {
            self.file.sync_data().map_err(DiskError::from_io)?;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, false, false)
    }
    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(DiskError::from_io)
    }
}
