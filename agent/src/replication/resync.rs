//! Resynchronisation: the block comparison that brings a diverged replica back without
//! copying the whole disk.
//!
//! Both sides split a disk into fixed blocks of [`RESYNC_BLOCK_SIZE`] (the last one may
//! be short) and hash each with xxh3-128 (16 bytes, the `u128` little-endian; the replica
//! store computes the same, see `replica::Replica::block_hashes`). The sender fetches
//! the replica's hashes, hashes its own image in parallel, then, for the blocks that
//! differ, fetches and compares the hashes of their [`RESYNC_SUB_BLOCK_SIZE`] sub-blocks
//! (`replica::Replica::sub_block_hashes`), and ships only the sub-blocks that differ, as
//! one recovery point marked `resync` (the orchestration is in `sender`).
//!
//! This module holds the pure and blocking pieces: hashing, comparing, reading the
//! differing blocks, and the business-hours rule for automatic resync.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Block size of the comparison. 64 KiB: 1/4096 of the disk in hashes on the wire, and
/// small enough that a scattered change costs little more than the bytes changed.
pub const RESYNC_BLOCK_SIZE: u32 = 64 << 10;

/// Sub-block size of the second level of the comparison: the replica hashes the
/// 4 KiB sub-blocks of the 64 KiB blocks that differ, and only the differing sub-blocks
/// travel (a scattered 4 KiB change costs ~4 KiB, not 64 KiB).
pub const RESYNC_SUB_BLOCK_SIZE: u32 = 4 << 10;

/// Differing blocks whose sub-block hashes are asked for in one request.
pub const SUB_HASH_BATCH_BLOCKS: usize = 4096;

/// Longest extent made by merging adjacent differing sub-blocks (bounds the read buffer).
pub const MERGED_EXTENT_MAX: u64 = 1 << 20;

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

/// Number of sub-blocks of `sub_block_size` in block `index` of `block_size` (fewer, or
/// none, at the end of a disk of `size` bytes).
pub fn sub_block_count(index: u64, size: u64, block_size: u32, sub_block_size: u32) -> u64 {
    block_count(block_range(index, size, block_size).1, sub_block_size)
}

/// Hashes the sub-blocks of each of `blocks` (in order, concatenated) on `threads`
/// threads, each taking a contiguous share of the blocks.
pub fn hash_sub_blocks(
    image: &File,
    size: u64,
    block_size: u32,
    sub_block_size: u32,
    blocks: &[u64],
    threads: usize,
) -> io::Result<Vec<[u8; HASH_LEN]>> {
    let threads = threads.clamp(1, 16);
    let share = blocks.len().div_ceil(threads).max(1);
    let parts: Vec<io::Result<Vec<[u8; HASH_LEN]>>> = std::thread::scope(|s| {
        let handles: Vec<_> = blocks
            .chunks(share)
            .map(|part| {
                s.spawn(move || -> io::Result<Vec<[u8; HASH_LEN]>> {
                    let mut buf = vec![0u8; block_size as usize];
                    let mut out = Vec::with_capacity(part.len() * (block_size / sub_block_size.max(1)) as usize);
                    for &b in part {
                        let (offset, len) = block_range(b, size, block_size);
                        let data = &mut buf[..len as usize];
                        image.read_exact_at(data, offset)?;
                        out.extend(data.chunks(sub_block_size as usize).map(block_hash));
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("hash thread panicked"))))
            .collect()
    });
    let mut out = Vec::new();
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// The byte ranges `(offset, len)` to send: the sub-blocks of `blocks` whose local hash
/// (`local`, as [`hash_sub_blocks`] orders them) differs from the replica's (`remote`,
/// concatenated), adjacent ones merged into extents of at most `max_len` bytes. Also
/// returns the number of differing sub-blocks.
pub fn differing_sub_ranges(
    blocks: &[u64],
    size: u64,
    block_size: u32,
    sub_block_size: u32,
    local: &[[u8; HASH_LEN]],
    remote: &[u8],
    max_len: u64,
) -> (Vec<(u64, u64)>, u64) {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut count = 0;
    let mut hashes = local.iter().zip(remote.chunks_exact(HASH_LEN));
    for &b in blocks {
        let (start, _) = block_range(b, size, block_size);
        for i in 0..sub_block_count(b, size, block_size, sub_block_size) {
            let Some((l, r)) = hashes.next() else { return (out, count) };
            if l.as_slice() == r {
                continue;
            }
            count += 1;
            let sub = block_range(i, size - start, sub_block_size);
            let (offset, len) = (start + sub.0, sub.1);
            match out.last_mut() {
                Some((o, l)) if *o + *l == offset && *l + len <= max_len => *l += len,
                _ => out.push((offset, len)),
            }
        }
    }
    (out, count)
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
    fn sub_blocks_at_the_disk_end() {
        let (bs, sbs) = (16384, 4096);
        let size = 2 * 16384 + 4096 + 100; // block 2 holds one full and one short sub-block
        assert_eq!(sub_block_count(0, size, bs, sbs), 4);
        assert_eq!(sub_block_count(2, size, bs, sbs), 2);
        assert_eq!(sub_block_count(3, size, bs, sbs), 0);
        // Everything differs in block 2: its two sub-blocks, the last one short.
        let local = vec![[1u8; HASH_LEN]; 2];
        let remote = vec![0u8; 2 * HASH_LEN];
        let (r, n) = differing_sub_ranges(&[2], size, bs, sbs, &local, &remote, 1 << 20);
        assert_eq!(n, 2);
        assert_eq!(r, vec![(32768, 4096 + 100)]);
    }

    #[test]
    fn adjacent_sub_blocks_merge() {
        let (bs, sbs) = (16384, 4096);
        let size = 10 * 16384;
        // Blocks 1 and 2 (adjacent) and 5; differing sub-blocks marked.
        let blocks = [1u64, 2, 5];
        let differs = [false, true, false, true, true, true, false, false, true, false, false, true];
        let local = vec![[7u8; HASH_LEN]; differs.len()];
        let remote: Vec<u8> = differs.iter().flat_map(|&d| if d { [0u8; HASH_LEN] } else { [7u8; HASH_LEN] }).collect();
        let (r, n) = differing_sub_ranges(&blocks, size, bs, sbs, &local, &remote, 1 << 20);
        assert_eq!(n, 6);
        // 1.1 alone; 1.3 + 2.0 + 2.1 across the block boundary; 5.0; 5.3.
        assert_eq!(r, vec![(16384 + 4096, 4096), (16384 + 12288, 12288), (5 * 16384, 4096), (5 * 16384 + 12288, 4096)]);
        // The merge stops at max_len.
        let (r, _) = differing_sub_ranges(&blocks, size, bs, sbs, &local, &remote, 8192);
        assert_eq!(r[1..3], [(16384 + 12288, 8192), (2 * 16384 + 4096, 4096)]);
    }

    #[test]
    fn parallel_sub_hashes_match_serial() {
        let mut f = tempfile::tempfile().expect("tmp");
        let size = 5 * 16384 + 5000;
        let data: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        f.write_all(&data).expect("write");
        let blocks = [4u64, 0, 5, 2];
        let par = hash_sub_blocks(&f, size as u64, 16384, 4096, &blocks, 3).expect("hash");
        let serial: Vec<_> = blocks
            .iter()
            .flat_map(|&b| {
                let s = (b as usize * 16384).min(size);
                data[s..(s + 16384).min(size)].chunks(4096).map(block_hash).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(par.len(), 4 + 4 + 2 + 4);
        assert_eq!(par, serial);
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
