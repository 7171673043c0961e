//! Block hashes of the replica images for resynchronisation (the replication package's resync compares
//! them with the primary's).

use std::os::unix::fs::FileExt;

use super::store::Replica;
use super::{ReplicaError, io_at};

impl Replica {
    /// Hashes `count` blocks of a disk from `first_block` (xxh3-128, little-endian).
    pub fn block_hashes(
        &self,
        disk_id: &str,
        block_size: u32,
        first_block: u64,
        count: u64,
    ) -> Result<Vec<[u8; 16]>, ReplicaError> {
        if block_size == 0 || block_size > 16 << 20 {
            return Err(ReplicaError::State(format!("block size {block_size} out of range")));
        }
        let img = &self.images[self.disk_index(disk_id)?];
        let _guard = self.read();
        let mut buf = vec![0u8; block_size as usize];
        let mut out = Vec::new();
        for b in first_block..first_block.saturating_add(count) {
            let off = b.saturating_mul(block_size as u64);
            if off >= img.size {
                break;
            }
            let n = (img.size - off).min(block_size as u64) as usize;
            img.file.read_exact_at(&mut buf[..n], off).map_err(io_at(&img.path))?;
            out.push(xxhash_rust::xxh3::xxh3_128(&buf[..n]).to_le_bytes());
        }
        Ok(out)
    }

    /// Hashes the sub-blocks of `sub_block_size` of each listed block of `block_size`, in
    /// the order given, concatenated (the last sub-block of the disk may be short; a block
    /// at the end of the disk has fewer sub-blocks). xxh3-128, little-endian, like
    /// [`Replica::block_hashes`]; read under the same read lock.
    pub fn sub_block_hashes(
        &self,
        disk_id: &str,
        block_size: u32,
        sub_block_size: u32,
        blocks: &[u64],
    ) -> Result<Vec<[u8; 16]>, ReplicaError> {
        if block_size == 0 || block_size > 16 << 20 || sub_block_size == 0 || !block_size.is_multiple_of(sub_block_size)
        {
            return Err(ReplicaError::State(format!("block size {block_size} / sub-block size {sub_block_size}")));
        }
        let img = &self.images[self.disk_index(disk_id)?];
        let _guard = self.read();
        let (bs, sbs) = (u64::from(block_size), u64::from(sub_block_size));
        let mut buf = vec![0u8; block_size as usize];
        let mut out = Vec::with_capacity(blocks.len() * (block_size / sub_block_size) as usize);
        for &b in blocks {
            let off = b.checked_mul(bs).filter(|&o| o < img.size).ok_or_else(|| {
                ReplicaError::State(format!("block {b} of {block_size} bytes is beyond disk {disk_id}"))
            })?;
            let n = (img.size - off).min(bs) as usize;
            img.file.read_exact_at(&mut buf[..n], off).map_err(io_at(&img.path))?;
            out.extend(buf[..n].chunks(sbs as usize).map(|c| xxhash_rust::xxh3::xxh3_128(c).to_le_bytes()));
        }
        Ok(out)
    }
}
