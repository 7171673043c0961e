//! Resynchronisation: the block comparison that brings a diverged replica back without
//! copying the whole disk.
//!
//! Both sides split a disk into fixed blocks of [`RESYNC_BLOCK_SIZE`] (the last one may
//! be short) and hash each with xxh3-128 (16 bytes, the `u128` little-endian; the replica
//! store computes the same, see `replica::Replica::block_hashes`). The sender fetches
//! the replica's hashes, hashes its own image in parallel, and ships only the blocks that
//! differ, as one recovery point marked `resync` (the orchestration is in `sender`).
//!
//! This module holds the pure and blocking pieces: hashing, comparing, reading the
//! differing blocks, and the business-hours rule for automatic resync.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Block size of the comparison. 64 KiB: 1/4096 of the disk in hashes on the wire, and
/// small enough that a scattered change costs little more than the bytes changed.
pub const RESYNC_BLOCK_SIZE: u32 = 64 << 10;

/// Threads hashing the local image (the hash is ~7 GB/s/thread: the disk is the limit).
pub const HASH_THREADS: usize = 2;

/// Length of one block hash on the wire.
pub const HASH_LEN: usize = 16;

/// The hash of one block: xxh3-128, little-endian.
pub fn block_hash(data: &[u8]) -> [u8; HASH_LEN] {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// Number of blocks of a disk of `size` bytes.
pub fn block_count(size: u64, block_size: u32) -> u64 {
    size.div_ceil(u64::from(block_size.max(1)))
}

/// Byte range `(offset, len)` of block `index` (the last block may be short).
pub fn block_range(index: u64, size: u64, block_size: u32) -> (u64, u64) {
    let bs = u64::from(block_size);
    let offset = index.saturating_mul(bs).min(size);
    (offset, bs.min(size - offset))
}

/// Hashes blocks `first..first + count` of `image` (of `size` bytes) on `threads`
/// threads, each taking a contiguous share.
pub fn hash_blocks(
    image: &File,
    size: u64,
    block_size: u32,
    first: u64,
    count: u64,
    threads: usize,
) -> io::Result<Vec<[u8; HASH_LEN]>> {
    let threads = threads.clamp(1, 16) as u64;
    let share = count.div_ceil(threads).max(1);
    let mut out = vec![[0u8; HASH_LEN]; count as usize];
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, part) in out.chunks_mut(share as usize).enumerate() {
            let start = first + i as u64 * share;
            handles.push(s.spawn(move || -> io::Result<()> {
                let mut buf = vec![0u8; block_size as usize];
                for (j, slot) in part.iter_mut().enumerate() {
                    let (offset, len) = block_range(start + j as u64, size, block_size);
                    let b = &mut buf[..len as usize];
                    image.read_exact_at(b, offset)?;
                    *slot = block_hash(b);
                }
                Ok(())
            }));
        }
        handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("hash thread panicked"))))
    })?;
    Ok(out)
}

/// Indexes (from `first`) of the blocks whose local hash differs from the replica's.
/// `remote` is the replica's hashes concatenated, one per local hash.
pub fn differing(first: u64, local: &[[u8; HASH_LEN]], remote: &[u8]) -> Vec<u64> {
    local
        .iter()
        .zip(remote.chunks_exact(HASH_LEN))
        .enumerate()
        .filter(|(_, (l, r))| l.as_slice() != *r)
        .map(|(i, _)| first + i as u64)
        .collect()
}

/// Whether `hour` (0-23) is inside the business-hours window `[start, end)`, which may
/// wrap midnight (22 → 6). `start == end` means no business hours at all.
pub fn in_business_hours(start: u32, end: u32, hour: u32) -> bool {
    let (start, end, hour) = (start % 24, end % 24, hour % 24);
    if start == end {
        false
    } else if start < end {
        (start..end).contains(&hour)
    } else {
        hour >= start || hour < end
    }
}

/// Whether a resync the sender detected may start now: automatic resync runs only
/// outside business hours (an operator's request runs at once, without asking this).
pub fn automatic_resync_allowed(window_start: u32, window_end: u32, hour: u32) -> bool {
    !in_business_hours(window_start, window_end, hour)
}

/// The current hour of the day, UTC (the agent has no time-zone database).
pub fn current_hour_utc() -> u32 {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    ((secs / 3600) % 24) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn business_hours_window() {
        assert!(in_business_hours(8, 18, 8));
        assert!(in_business_hours(8, 18, 17));
        assert!(!in_business_hours(8, 18, 18));
        assert!(!in_business_hours(8, 18, 3));
        // Wrapping midnight.
        assert!(in_business_hours(22, 6, 23));
        assert!(in_business_hours(22, 6, 0));
        assert!(!in_business_hours(22, 6, 6));
        assert!(!in_business_hours(22, 6, 12));
        // Equal bounds: no business hours, resync any time.
        for h in 0..24 {
            assert!(automatic_resync_allowed(0, 0, h));
            assert!(automatic_resync_allowed(9, 9, h));
        }
        assert!(!automatic_resync_allowed(8, 18, 10));
    }

    #[test]
    fn blocks_and_short_last_block() {
        assert_eq!(block_count(0, 4096), 0);
        assert_eq!(block_count(4096, 4096), 1);
        assert_eq!(block_count(4097, 4096), 2);
        assert_eq!(block_range(1, 4097, 4096), (4096, 1));
        assert_eq!(block_range(5, 4097, 4096), (4097, 0));
    }

    #[test]
    fn parallel_hashes_match_serial_and_find_differences() {
        let mut f = tempfile::tempfile().expect("tmp");
        let size = 10 * 4096 + 100;
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).expect("write");
        let n = block_count(size as u64, 4096);
        let par = hash_blocks(&f, size as u64, 4096, 0, n, 3).expect("hash");
        let serial: Vec<_> = data.chunks(4096).map(block_hash).collect();
        assert_eq!(par, serial);
        let tail = hash_blocks(&f, size as u64, 4096, 9, 2, 2).expect("hash tail");
        assert_eq!(tail, serial[9..]);
        let mut remote: Vec<u8> = serial.iter().flatten().copied().collect();
        remote[3 * HASH_LEN] ^= 1;
        remote[10 * HASH_LEN + 5] ^= 1;
        assert_eq!(differing(0, &par, &remote), vec![3, 10]);
    }
}
