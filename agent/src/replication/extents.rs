//! The allocated ranges of an image file (SEEK_DATA / SEEK_HOLE): what the initial copy
//! and the offline export read, so holes never travel.

use std::fs::File;
use std::io;

/// The allocated ranges `[start, end)` of `file` from `from`.
/// A file system without hole reporting gives one range: everything.
pub fn allocated_ranges(file: &File, from: u64, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{Whence, lseek};
    let mut out = Vec::new();
    let mut pos = from;
    while pos < size {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(o) => o as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                out.push((pos, size));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match lseek(file, data as i64, Whence::SeekHole) {
            Ok(o) => (o as u64).min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            out.push((data, size));
            break;
        }
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// Bytes of `ranges` below `offset`.
pub fn allocated_below(ranges: &[(u64, u64)], offset: u64) -> u64 {
    ranges.iter().map(|&(s, e)| e.min(offset).saturating_sub(s)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn allocation_map_skips_holes() {
        let f = tempfile::tempfile().expect("tmp");
        f.set_len(8 << 20).expect("len");
        f.write_all_at(&[1u8; 4096], 2 << 20).expect("write");
        f.write_all_at(&[1u8; 4096], 6 << 20).expect("write");
        let r = allocated_ranges(&f, 0, 8 << 20).expect("map");
        let total = allocated_below(&r, u64::MAX);
        assert!((8192..8 << 20).contains(&total), "{r:?}");
        assert!(r.iter().any(|&(s, e)| s <= 2 << 20 && e > 2 << 20));
        assert_eq!(allocated_below(&[(0, 10), (20, 30)], 25), 15);
        let later = allocated_ranges(&f, 4 << 20, 8 << 20).expect("map");
        assert!(later.iter().all(|&(s, _)| s >= 4 << 20));
    }
}
