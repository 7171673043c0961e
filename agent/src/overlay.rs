//! A copy-on-write overlay: a writable disk over a read-only base (a recovery point),
//! with no copy of the base. Test VMs run on one (and throw it away); a failed-over VM
//! runs on one until the failover is committed, so its point can still be changed.
//!
//! Writes go to a sparse overlay file of the disk's size, in whole 4 KiB blocks (a
//! partial block is completed from the base first); a bitmap says which blocks the
//! overlay holds. The bitmap is saved beside the file (`<file>.map`, in the
//! [`crate::persist`] envelope, atomically) on every flush, so an agent restart keeps a
//! failed-over VM's acknowledged-and-flushed writes. A map that cannot be read (torn,
//! corrupt, the wrong size) fails the open: reading the base where the guest wrote would
//! hand it stale data.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::disk::{BlockDevice, DiskError, check_range};
use crate::persist::{self, OVERLAY_MAP, PersistError};
use crate::zeroes::{ZeroMode, zero_range};

/// Overlay block size.
pub const BLOCK: u64 = 4096;

/// Why an overlay could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The map file is torn, corrupt or of another kind.
    #[error(transparent)]
    Map(#[from] PersistError),
    /// The map is not the size the disk needs (it belongs to another disk).
    #[error("{path}: overlay map of {len} bytes, the disk needs {expected}")]
    MapSize { path: PathBuf, len: u64, expected: u64 },
    /// The map marks a block past the end of the disk (damage: a commit would copy it).
    #[error("{path}: overlay map marks block {block}, past the disk's {blocks} blocks")]
    StrayBlocks { path: PathBuf, block: u64, blocks: u64 },
}

/// A failed map save as the NBD server sees it (no space stays no space).
fn save_err(e: PersistError) -> DiskError {
    match e {
        PersistError::Io { source, .. } => DiskError::from_io(source),
        other => DiskError::Io(io::Error::other(other)),
    }
}

/// A writable view over a read-only base device.
pub struct Overlay {
    base: Arc<dyn BlockDevice>,
    file: File,
    path: PathBuf,
    size: u64,
    /// Bit per block: set when the overlay file holds the block.
    map: RwLock<Vec<u64>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("path", &self.path).field("size", &self.size).finish_non_exhaustive()
    }
}

fn map_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".map");
    PathBuf::from(p)
}

fn is_set(map: &[u64], b: u64) -> bool {
    map.get((b / 64) as usize).is_some_and(|w| w & (1 << (b % 64)) != 0)
}

impl Overlay {
    /// Opens (or creates) the overlay file at `path` over `base`.
    pub fn open(base: Arc<dyn BlockDevice>, path: &Path) -> Result<Self, OverlayError> {
        let io_err = |source| OverlayError::Io { path: path.to_path_buf(), source };
        let size = base.size();
        let file = crate::files::open_or_create(path).map_err(io_err)?;
        if file.metadata().map_err(io_err)?.len() != size {
            file.set_len(size).map_err(io_err)?;
        }
        let words = size.div_ceil(BLOCK).div_ceil(64) as usize;
        let expected = words as u64 * 8;
        let mut map = vec![0u64; words];
        let map_file = map_path(path);
        // Version 0 (before the envelope) is the same raw bitmap.
        if let Some(stored) = persist::read(&map_file, &OVERLAY_MAP, expected)? {
            if stored.payload.len() as u64 != expected {
                return Err(OverlayError::MapSize { path: map_file, len: stored.payload.len() as u64, expected });
            }
            for (w, c) in map.iter_mut().zip(stored.payload.chunks_exact(8)) {
                *w = u64::from_le_bytes(c.try_into().unwrap_or_default());
            }
            let blocks = size.div_ceil(BLOCK);
            if let Some(block) = (blocks..words as u64 * 64).find(|&b| is_set(&map, b)) {
                return Err(OverlayError::StrayBlocks { path: map_file, block, blocks });
            }
        }
        Ok(Self { base, file, path: path.to_path_buf(), size, map: RwLock::new(map) })
    }

    /// Blocks written through the overlay.
    pub fn written_blocks(&self) -> Vec<u64> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        for (i, w) in map.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                out.push(i as u64 * 64 + bit);
                w &= w - 1;
            }
        }
        out
    }

    /// Reads block `b` of the overlay file (only meaningful when written).
    pub fn read_overlay_block(&self, b: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, b * BLOCK)
    }

    /// Deletes the overlay's files.
    pub fn remove_files(path: &Path) {
        let _ = std::fs::remove_file(path);
        let _ = std::fs::remove_file(map_path(path));
    }

    fn save_map(&self, map: &[u64]) -> Result<(), PersistError> {
        let mut bytes = Vec::with_capacity(map.len() * 8);
        for w in map {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        persist::save_bytes(&map_path(&self.path), &OVERLAY_MAP, &bytes)
    }

    /// Writes `data` at `offset` (any alignment) with the write lock held.
    fn write_locked(&self, map: &mut [u64], data: &[u8], offset: u64) -> Result<(), DiskError> {
        let end = offset + data.len() as u64;
        // Only a partial block needs the merge buffer (aligned writes go straight through).
        let mut block: Vec<u8> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let bstart = b * BLOCK;
            let bend = (bstart + BLOCK).min(self.size);
            let take_end = end.min(bend);
            let src = &data[(pos - offset) as usize..(take_end - offset) as usize];
            if pos == bstart && take_end == bend {
                self.file.write_all_at(src, pos).map_err(DiskError::from_io)?;
            } else {
                let blen = (bend - bstart) as usize;
                block.resize(BLOCK as usize, 0);
                if is_set(map, b) {
                    self.file.read_exact_at(&mut block[..blen], bstart).map_err(DiskError::from_io)?;
                } else {
                    self.base.read_at(&mut block[..blen], bstart)?;
                }
                block[(pos - bstart) as usize..(take_end - bstart) as usize].copy_from_slice(src);
                self.file.write_all_at(&block[..blen], bstart).map_err(DiskError::from_io)?;
            }
            if let Some(w) = map.get_mut((b / 64) as usize) {
                *w |= 1 << (b % 64);
            }
            pos = take_end;
        }
        Ok(())
    }
}

impl BlockDevice for Overlay {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        // Runs of blocks from the same source, read in one call each.
        while pos < end {
            let b = pos / BLOCK;
            let from_overlay = is_set(&map, b);
            let mut run_end = ((b + 1) * BLOCK).min(end);
            while run_end < end && is_set(&map, run_end / BLOCK) == from_overlay {
                run_end = ((run_end / BLOCK + 1) * BLOCK).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if from_overlay {
                self.file.read_exact_at(dst, pos).map_err(DiskError::from_io)?;
            } else {
                self.base.read_at(dst, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64, fua: bool) -> Result<(), DiskError> {
        check_range(offset, data.len() as u64, self.size)?;
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        self.write_locked(&mut map, data, offset)?;
        if fua {
            self.file.sync_data().map_err(DiskError::from_io)?;
            self.save_map(&map).map_err(save_err)?;
        }
        Ok(())
    }
    /// Partial blocks at the ends are written as zero bytes (completed from the base);
    /// whole blocks are punched out of the overlay file and marked written, so zeroing
    /// a large range allocates nothing (the hole reads as zeroes).
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, _no_hole: bool) -> Result<(), DiskError> {
        check_range(offset, len, self.size)?;
        let end = offset + len;
        let first_whole = offset.div_ceil(BLOCK) * BLOCK;
        let last_whole = if end == self.size { end } else { end / BLOCK * BLOCK };
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if first_whole >= last_whole {
            self.write_locked(&mut map, &vec![0u8; len as usize], offset)?;
        } else {
            if offset < first_whole {
                self.write_locked(&mut map, &vec![0u8; (first_whole - offset) as usize], offset)?;
            }
            if last_whole < end {
                self.write_locked(&mut map, &vec![0u8; (end - last_whole) as usize], last_whole)?;
            }
            zero_range(&self.file, first_whole, last_whole - first_whole, ZeroMode::Punch)
                .map_err(DiskError::from_io)?;
            for b in first_whole / BLOCK..last_whole.div_ceil(BLOCK) {
                if let Some(w) = map.get_mut((b / 64) as usize) {
                    *w |= 1 << (b % 64);
                }
            }
        }
        drop(map);
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.write_zeroes(offset, len, false, false)
    }
    fn flush(&self) -> Result<(), DiskError> {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        self.file.sync_data().map_err(DiskError::from_io)?;
        self.save_map(&map).map_err(save_err)
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::RawFile;

    #[test]
    fn reads_base_until_written_then_overlay_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let base_path = dir.path().join("base.img");
        std::fs::write(&base_path, vec![7u8; 64 * 1024 + 100]).expect("base");
        let base: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&base_path, true).expect("open base"));
        let ov_path = dir.path().join("d.overlay");
        let ov = Overlay::open(base.clone(), &ov_path).expect("overlay");
        let mut expect = vec![7u8; 64 * 1024 + 100];
        for (off, len, byte) in [(10u64, 5usize, 1u8), (4090, 20, 2), (8192, 4096, 3), (64 * 1024 + 90, 10, 4)] {
            ov.write_at(&vec![byte; len], off, false).expect("write");
            expect[off as usize..off as usize + len].fill(byte);
        }
        let mut got = vec![0u8; expect.len()];
        ov.read_at(&mut got, 0).expect("read");
        assert_eq!(got, expect);
        // the base is untouched
        assert!(std::fs::read(&base_path).expect("base").iter().all(|&b| b == 7));
        ov.flush().expect("flush");
        drop(ov);
        let ov = Overlay::open(base, &ov_path).expect("reopen");
        let mut again = vec![0u8; expect.len()];
        ov.read_at(&mut again, 0).expect("read");
        assert_eq!(again, expect);
        assert_eq!(ov.written_blocks(), vec![0, 1, 2, 16]);
        assert!(ov.read_at(&mut [0u8; 2], ov.size() - 1).is_err());
    }

    /// An overlay with blocks 0 and 2 written and flushed; returns its path and base.
    fn flushed(dir: &Path) -> (PathBuf, Arc<dyn BlockDevice>) {
        let base_path = dir.join("base.img");
        std::fs::write(&base_path, vec![7u8; 16 * 1024]).expect("base");
        let base: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&base_path, true).expect("open base"));
        let ov_path = dir.join("d.overlay");
        let ov = Overlay::open(base.clone(), &ov_path).expect("overlay");
        ov.write_at(&[1u8; 10], 0, false).expect("write");
        ov.write_at(&[2u8; 10], 2 * BLOCK, false).expect("write");
        ov.flush().expect("flush");
        (ov_path, base)
    }

    #[test]
    fn the_map_is_in_the_envelope_and_a_torn_or_corrupt_one_fails_the_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ov_path, base) = flushed(dir.path());
        let mp = map_path(&ov_path);
        let good = std::fs::read(&mp).expect("map");
        assert_eq!(&good[..4], &OVERLAY_MAP.magic);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&mp).expect("meta").permissions().mode() & 0o777, 0o600);

        std::fs::write(&mp, &good[..good.len() - 1]).expect("tear");
        match Overlay::open(base.clone(), &ov_path) {
            Err(OverlayError::Map(PersistError::Torn { path, .. })) => assert_eq!(path, mp),
            other => panic!("torn map: {other:?}"),
        }
        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        std::fs::write(&mp, &bad).expect("corrupt");
        let err = Overlay::open(base.clone(), &ov_path).expect_err("corrupt map");
        assert!(matches!(err, OverlayError::Map(PersistError::Corrupt { .. })), "{err:?}");
        assert!(err.to_string().contains("d.overlay.map"), "{err}");
        // The map of a larger disk (refused before reading), and of a smaller one.
        persist::save_bytes(&mp, &OVERLAY_MAP, &[0u8; 16]).expect("save");
        assert!(matches!(Overlay::open(base.clone(), &ov_path), Err(OverlayError::Map(PersistError::TooLarge { .. }))));
        persist::save_bytes(&mp, &OVERLAY_MAP, &[]).expect("save");
        assert!(matches!(Overlay::open(base, &ov_path), Err(OverlayError::MapSize { len: 0, expected: 8, .. })));
    }

    #[test]
    fn a_map_from_before_the_envelope_still_opens() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ov_path, base) = flushed(dir.path());
        let mp = map_path(&ov_path);
        // What older agents wrote: the raw bitmap (blocks 0 and 2).
        std::fs::write(&mp, 0b101u64.to_le_bytes()).expect("legacy map");
        let ov = Overlay::open(base, &ov_path).expect("legacy");
        assert_eq!(ov.written_blocks(), vec![0, 2]);
        let mut got = [0u8; 10];
        ov.read_at(&mut got, 2 * BLOCK).expect("read");
        assert_eq!(got, [2u8; 10]);
        ov.flush().expect("flush");
        assert_eq!(&std::fs::read(&mp).expect("map")[..4], &OVERLAY_MAP.magic);
    }

    #[test]
    fn zeroes_through_the_overlay_read_zero_and_allocate_nothing() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tmp");
        let base_path = dir.path().join("base.img");
        let f = File::create(&base_path).expect("base");
        f.set_len(8 << 20).expect("len");
        f.write_all_at(&vec![0x42; 8 << 20], 0).expect("fill");
        let base: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&base_path, true).expect("open base"));
        let path = dir.path().join("ov");
        let ov = Overlay::open(base, &path).expect("overlay");
        // Unaligned at both ends: two partial blocks written, the rest punched.
        ov.write_zeroes(100, (6 << 20) - 200, false, false).expect("zeroes");
        ov.trim(7 << 20, 1 << 20).expect("trim");
        let mut buf = vec![0u8; 8 << 20];
        ov.read_at(&mut buf, 0).expect("read");
        assert!(buf[..100].iter().all(|&b| b == 0x42));
        assert!(crate::zeroes::is_zero(&buf[100..(6 << 20) - 100]));
        assert!(buf[(6 << 20) - 100..7 << 20].iter().all(|&b| b == 0x42));
        assert!(crate::zeroes::is_zero(&buf[7 << 20..]));
        let allocated = std::fs::metadata(&path).expect("meta").blocks() * 512;
        assert!(allocated <= 64 << 10, "overlay allocated {allocated} bytes");
        ov.flush().expect("flush");
        drop(ov);
        let base: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&base_path, true).expect("open base"));
        let ov = Overlay::open(base, &path).expect("reopen");
        let mut again = vec![0u8; 8 << 20];
        ov.read_at(&mut again, 0).expect("read");
        assert_eq!(again, buf, "the zeroed blocks survive a reopen");
    }
}
