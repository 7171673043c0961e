//! Making a range of an image read as zeroes without writing zero bytes.
//!
//! TRIM and WRITE_ZEROES on a thin disk must not allocate it: a guest `blkdiscard` of a
//! 2 TiB disk would otherwise write 2 TiB. [`zero_range`] punches a hole
//! (`fallocate(PUNCH_HOLE | KEEP_SIZE)`: the blocks are freed, reads return zeroes) or,
//! when the caller must keep the range allocated (NBD `NO_HOLE`), zeroes it in place
//! (`ZERO_RANGE`, metadata only on ext4/xfs). Only when the file system refuses the call
//! (`EOPNOTSUPP`, e.g. ZERO_RANGE on tmpfs) are zero bytes written.
//!
//! Every writer of image bytes uses it: the tracker (primary), untracked raw disks, the
//! replica's apply and rollback, the overlay of a test VM.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::fcntl::{FallocateFlags, fallocate};

/// How a zeroed range is left allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroMode {
    /// Free the blocks (TRIM, WRITE_ZEROES without NO_HOLE, zero ranges on the replica).
    Punch,
    /// Keep the blocks allocated (WRITE_ZEROES with NO_HOLE).
    Allocate,
}

/// Makes `len` bytes at `offset` of `file` read as zeroes, without changing its size.
pub fn zero_range(file: &File, offset: u64, len: u64, mode: ZeroMode) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let off = i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let n = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = match mode {
        ZeroMode::Punch => FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        ZeroMode::Allocate => FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
    };
    match fallocate(file, flags, off, n) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP) => write_zero_bytes(file, offset, len),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Writes real zero bytes (the fallback where `fallocate` is not supported).
pub fn write_zero_bytes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let words = buf.chunks_exact(8);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0) && words.into_iter().all(|w| w.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn allocated(f: &File) -> u64 {
        f.metadata().expect("meta").blocks() * 512
    }

    #[test]
    fn punched_range_reads_zeroes_and_frees_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = crate::files::create_new(&dir.path().join("img")).expect("create");
        f.write_all_at(&vec![0xab; 8 << 20], 0).expect("fill");
        f.sync_all().expect("sync");
        let before = allocated(&f);
        assert!(before >= 8 << 20, "filled: {before}");
        zero_range(&f, 1 << 20, 4 << 20, ZeroMode::Punch).expect("punch");
        let after = allocated(&f);
        assert!(after <= before - (4 << 20), "blocks freed: {before} -> {after}");
        assert_eq!(f.metadata().expect("meta").len(), 8 << 20, "size kept");
        let mut buf = vec![1u8; 6 << 20];
        f.read_exact_at(&mut buf, 0).expect("read");
        assert!(buf[..1 << 20].iter().all(|&b| b == 0xab));
        assert!(is_zero(&buf[1 << 20..5 << 20]));
        assert!(buf[5 << 20..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn zeroed_in_place_reads_zeroes_and_stays_allocated() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = crate::files::create_new(&dir.path().join("img")).expect("create");
        f.write_all_at(&vec![0xcd; 4 << 20], 0).expect("fill");
        f.sync_all().expect("sync");
        let before = allocated(&f);
        // An unaligned range: partial blocks are zeroed, whole ones converted.
        zero_range(&f, 1000, (2 << 20) + 5, ZeroMode::Allocate).expect("zero");
        assert!(allocated(&f) >= before - 4096, "still allocated");
        let mut buf = vec![1u8; 4 << 20];
        f.read_exact_at(&mut buf, 0).expect("read");
        assert!(buf[..1000].iter().all(|&b| b == 0xcd));
        assert!(is_zero(&buf[1000..1000 + (2 << 20) + 5]));
        assert!(buf[1000 + (2 << 20) + 5..].iter().all(|&b| b == 0xcd));
    }

    #[test]
    fn is_zero_sees_any_nonzero_byte() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        for i in [0, 7, 8, 4095, 4098] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
    }
}
