//! The log budget and the dirty-block bitmap a disk falls back to past it.
//!
//! Pending HRL logs (sealed, not yet acknowledged, plus the open one) of a disk are
//! capped by the log budget ([`set_default_log_budget`], `agent serve --log-budget`).
//! A write that would take them past it *collapses* them: every range of every pending
//! log is marked in a bitmap of [`DIRTY_BLOCK_SIZE`] blocks, the bitmap is synced, then
//! the logs are deleted. From then on a write only marks its blocks (the image still
//! takes it), so a replica outage costs at most one bit per 64 KiB of disk and guest
//! writes never fail because of logs. When the replica is back the sender takes the
//! dirty blocks ([`TrackedDisk::take_dirty`]: writes are logged again from that instant),
//! ships their current content plus the logs written since, and once the replica
//! acknowledged that point drops the bitmap ([`TrackedDisk::finish_catch_up`]).
//!
//! The file, `<image>.dirty` beside the image (format in `docs/dirty-bitmap-format.md`):
//!
//! ```text
//! 0   magic "SRDB"
//! 4   version u32 LE (1)
//! 8   block size u32 LE (65536)
//! 12  reserved u32 (0)
//! 16  disk size u64 LE
//! 24  crc32c of bytes 0..24, u32 LE
//! 28  reserved u32 (0)
//! 32  bits: bit i (byte i/8, bit i%8, LSB first) set = block i written since the
//!     replica's last point
//! ```
//!
//! Created atomically (temp, fsync, rename, fsync dir). A mark writes the changed bytes
//! in place before the write is acknowledged (page cache: survives `kill -9`), and flush
//! and FUA fsync the file with the image. Bits are only ever set, so an in-place byte
//! write cannot lose an earlier mark. A file that does not decode (torn header, wrong
//! length or geometry) is read as *every block dirty*: more is sent, nothing is lost.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{State, TrackedDisk, TrackerError, log_err};
use crate::disk::DiskError;
use crate::hrl::{self, EncodedRecord, FILE_HEADER_LEN, FOOTER_LEN, HrlReader, LogSeq, RECORD_HEADER_LEN};

/// Granularity of the bitmap: the resync block size, so a dirty block is one block of
/// the comparison.
pub const DIRTY_BLOCK_SIZE: u32 = 64 << 10;
const MAGIC: &[u8; 4] = b"SRDB";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 32;

/// The host's log budget (bytes of pending logs over every disk of the process; 0 =
/// none), and the budget new disks get of their own (never more than half the disk).
static DEFAULT_BUDGET: AtomicU64 = AtomicU64::new(0);

/// Pending log bytes of every open disk of the process, as each last published them
/// ([`Spill::publish`]: at every logged write, log deletion and collapse). O(1) per
/// write: a disk adds the difference to its last figure.
static HOST_PENDING: AtomicU64 = AtomicU64::new(0);

/// Sets the host's log budget, which is also the budget of every disk opened from now
/// on (`agent serve` calls it once): the pending logs of all disks together stay under
/// it; a disk whose write would take the sum past it runs on its bitmap.
pub fn set_default_log_budget(bytes: u64) {
    DEFAULT_BUDGET.store(bytes, Ordering::Relaxed);
}

/// Pending log bytes over every open disk of this process (as last published).
pub fn host_pending_log_bytes() -> u64 {
    HOST_PENDING.load(Ordering::Relaxed)
}

/// The default budget: a quarter of the free space of the data dir's file system at
/// start, at most [`MAX_DEFAULT_BUDGET`], at least [`MIN_DEFAULT_BUDGET`].
pub fn default_log_budget(free_bytes: u64) -> u64 {
    (free_bytes / 4).clamp(MIN_DEFAULT_BUDGET, MAX_DEFAULT_BUDGET)
}
/// Upper bound of the default budget.
pub const MAX_DEFAULT_BUDGET: u64 = 64 << 30;
/// Lower bound of the default budget (below it a disk would live on its bitmap).
pub const MIN_DEFAULT_BUDGET: u64 = 64 << 20;

/// The dirty blocks of one disk, in memory and in its file.
#[derive(Debug)]
pub struct DirtyBitmap {
    path: PathBuf,
    file: Arc<File>,
    disk_size: u64,
    bits: Vec<u8>,
}

impl DirtyBitmap {
    /// Creates an empty bitmap at `path` (atomically).
    pub fn create(path: &Path, disk_size: u64) -> io::Result<Self> {
        let bits = vec![0u8; bit_bytes(disk_size)];
        let tmp = path.with_extension("dirty.tmp");
        let mut bytes = header(disk_size).to_vec();
        bytes.extend_from_slice(&bits);
        std::fs::write(&tmp, &bytes)?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        sync_parent(path)?;
        Self::open_file(path, disk_size, bits)
    }

    /// Loads the bitmap at `path`, `None` if there is none. A file that does not decode
    /// is rewritten as every block dirty.
    pub fn load(path: &Path, disk_size: u64) -> io::Result<Option<Self>> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let want = HEADER_LEN as usize + bit_bytes(disk_size);
        if bytes.len() == want && bytes[..HEADER_LEN as usize] == header(disk_size) {
            let bits = bytes[HEADER_LEN as usize..].to_vec();
            return Self::open_file(path, disk_size, bits).map(Some);
        }
        tracing::warn!(bitmap = %path.display(), "dirty-block bitmap damaged: every block counts as dirty");
        let mut map = Self::create(path, disk_size)?;
        map.mark(0, disk_size)?;
        map.sync()?;
        Ok(Some(map))
    }

    fn open_file(path: &Path, disk_size: u64, bits: Vec<u8>) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Self { path: path.to_owned(), file: Arc::new(file), disk_size, bits })
    }

    /// Marks the blocks of `offset..offset + len` (clamped to the disk), writing the
    /// changed bytes to the file (not synced: see [`Self::sync`]).
    pub fn mark(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.disk_size);
        if len == 0 || offset >= end {
            return Ok(());
        }
        let bs = u64::from(DIRTY_BLOCK_SIZE);
        let (first, last) = (offset / bs, (end - 1) / bs);
        let mut changed: Option<(usize, usize)> = None;
        for b in first..=last {
            let (byte, bit) = ((b / 8) as usize, (b % 8) as u8);
            if self.bits[byte] & (1 << bit) == 0 {
                self.bits[byte] |= 1 << bit;
                changed = Some(changed.map_or((byte, byte), |(lo, _)| (lo, byte)));
            }
        }
        if let Some((lo, hi)) = changed {
            self.file.write_all_at(&self.bits[lo..=hi], HEADER_LEN + lo as u64)?;
        }
        Ok(())
    }

    /// Makes every mark so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Number of dirty blocks.
    pub fn dirty_blocks(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The dirty byte ranges `(offset, len)`, adjacent blocks merged, clamped to the disk.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let bs = u64::from(DIRTY_BLOCK_SIZE);
        let mut out: Vec<(u64, u64)> = Vec::new();
        for b in 0..self.disk_size.div_ceil(bs) {
            if self.bits[(b / 8) as usize] & (1 << (b % 8)) == 0 {
                continue;
            }
            let (off, len) = (b * bs, bs.min(self.disk_size - b * bs));
            match out.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => out.push((off, len)),
            }
        }
        out
    }

    /// Deletes the file (durably).
    pub fn remove(self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_parent(&self.path)
    }
}

fn bit_bytes(disk_size: u64) -> usize {
    disk_size.div_ceil(u64::from(DIRTY_BLOCK_SIZE)).div_ceil(8) as usize
}

fn header(disk_size: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&DIRTY_BLOCK_SIZE.to_le_bytes());
    h[16..24].copy_from_slice(&disk_size.to_le_bytes());
    let crc = crc32c::crc32c(&h[..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => hrl::sync_dir(d),
        _ => hrl::sync_dir(Path::new(".")),
    }
}

/// The budget and the bitmap of one tracked disk. Lock order: the disk's state, then this.
#[derive(Debug)]
pub(super) struct Spill {
    path: PathBuf,
    budget: AtomicU64,
    /// This disk's share of [`HOST_PENDING`].
    published: AtomicU64,
    inner: Mutex<Option<Dirty>>,
}

impl Drop for Spill {
    fn drop(&mut self) {
        self.publish(0);
    }
}

#[derive(Debug)]
struct Dirty {
    map: DirtyBitmap,
    /// The sender took the blocks: writes are logged again, the bitmap stays until the
    /// replica acknowledged the catch-up point.
    draining: bool,
}

/// What the sender ships in a catch-up point for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBlocks {
    /// Dirty byte ranges, adjacent blocks merged.
    pub ranges: Vec<(u64, u64)>,
    pub blocks: u64,
    pub bytes: u64,
    /// Every log up to this seq is covered by the ranges (and deleted).
    pub through: LogSeq,
}

/// The dirty-block bitmap file of the image at `image_path`: `<image>.dirty`.
pub fn bitmap_path(image_path: &Path) -> PathBuf {
    let mut name = image_path.as_os_str().to_owned();
    name.push(".dirty");
    PathBuf::from(name)
}

/// Removes the bitmap file of the image at `image_path`, if any, its directory fsynced:
/// for an image no longer tracked (unprotected, or made the VM's own by a commit), whose
/// stale bitmap would otherwise be resumed by the next tracker.
pub fn remove_bitmap_of(image_path: &Path) -> io::Result<()> {
    let path = bitmap_path(image_path);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    tracing::info!(bitmap = %path.display(), "dirty-block bitmap removed");
    match path.parent() {
        Some(dir) => File::open(dir).and_then(|d| d.sync_all()),
        None => Ok(()),
    }
}

impl Spill {
    /// The spill of the image at `image_path`: its bitmap if one was left running.
    pub(super) fn open(image_path: &Path, disk_size: u64) -> Result<Self, TrackerError> {
        let path = bitmap_path(image_path);
        let map = DirtyBitmap::load(&path, disk_size).map_err(|source| bitmap_err(&path, source))?;
        if map.is_some() {
            tracing::warn!(bitmap = %path.display(), "disk resumes on its dirty-block bitmap");
        }
        let inner = Mutex::new(map.map(|map| Dirty { map, draining: false }));
        let budget = AtomicU64::new(DEFAULT_BUDGET.load(Ordering::Relaxed));
        Ok(Spill { path, budget, published: AtomicU64::new(0), inner })
    }

    /// This disk's pending log bytes are now `pending`: the host's sum follows. Called
    /// under the disk's state lock, so one disk's publications never race.
    pub(super) fn publish(&self, pending: u64) {
        let old = self.published.swap(pending, Ordering::Relaxed);
        // Modular: adds the (possibly negative) difference.
        HOST_PENDING.fetch_add(pending.wrapping_sub(old), Ordering::Relaxed);
    }

    /// Whether `own` pending bytes plus `adding` pass the host's budget, counting the
    /// other disks' published figures.
    fn over_host_budget(&self, own: u64, adding: u64) -> bool {
        match DEFAULT_BUDGET.load(Ordering::Relaxed) {
            0 => false,
            host => {
                let others = HOST_PENDING.load(Ordering::Relaxed).wrapping_sub(self.published.load(Ordering::Relaxed));
                others.min(host).saturating_add(own).saturating_add(adding) > host
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Dirty>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The budget of a disk of `size` bytes: the one set, at most half the disk
    /// (`u64::MAX`: none set).
    fn effective_budget(&self, size: u64) -> u64 {
        match self.budget.load(Ordering::Relaxed) {
            0 => u64::MAX,
            b => b.min(size / 2),
        }
    }

    /// Syncs the bitmap (flush and FUA).
    pub(super) fn sync(&self) -> io::Result<()> {
        let file = self.lock().as_ref().map(|d| d.map.file.clone());
        file.map_or(Ok(()), |f| f.sync_data())
    }
}

/// Whether a disk runs on its bitmap, for status and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapState {
    pub dirty_blocks: u64,
    pub budget: u64,
    /// The catch-up point is being shipped.
    pub draining: bool,
}

impl TrackedDisk {
    /// Sets this disk's log budget (0 = none; a budget is capped at half the disk).
    pub fn set_log_budget(&self, bytes: u64) {
        self.spill.budget.store(bytes, Ordering::Relaxed);
    }

    /// `Some` while the disk has a bitmap (past its budget, or catching up).
    pub fn bitmap_state(&self) -> Option<BitmapState> {
        let budget = self.spill.effective_budget(self.size);
        self.spill.lock().as_ref().map(|d| BitmapState {
            dirty_blocks: d.map.dirty_blocks(),
            budget,
            draining: d.draining,
        })
    }

    /// The tracked half of a write: append to the log, or mark the bitmap when the disk
    /// runs on it or the log would pass the budget. Caller holds the state lock.
    pub(super) fn log_or_mark(
        &self,
        st: &mut State,
        recs: &[EncodedRecord],
        data: &[u8],
        offset: u64,
        len: u64,
    ) -> Result<Option<super::write::LoggedOp>, DiskError> {
        let mut sp = self.spill.lock();
        let io_err = |e: io::Error| DiskError::from_io(e);
        if let Some(d) = sp.as_mut().filter(|d| !d.draining) {
            return d.map.mark(offset, len).map(|()| None).map_err(io_err);
        }
        // Past half the disk's size the bitmap is cheaper than the logs (and delta
        // replication would otherwise give up for a resync at that point).
        let budget = self.spill.effective_budget(self.size);
        // Room kept for the open log's footer and the next log's header, which a seal
        // adds without a write: the files never pass the budget.
        let adding = (recs.len() * RECORD_HEADER_LEN + data.len() + FOOTER_LEN + FILE_HEADER_LEN) as u64;
        let pending = pending_locked(st);
        let over_disk = pending.saturating_add(adding) > budget;
        if over_disk || self.spill.over_host_budget(pending, adding) {
            let host = HOST_PENDING.load(Ordering::Relaxed);
            self.collapse_locked(st, &mut sp).map_err(|e| DiskError::Io(io::Error::other(e)))?;
            let whose = if over_disk { "the disk's" } else { "the host's (all disks)" };
            tracing::warn!(disk = %self.disk_id, pending, host_pending = host, budget, "log budget exceeded ({whose}): the disk runs on its dirty-block bitmap");
            if let Some(d) = sp.as_mut() {
                return d.map.mark(offset, len).map(|()| None).map_err(io_err);
            }
        }
        drop(sp);
        let op = self.append_locked(st, recs, data)?;
        self.spill.publish(pending_locked(st));
        Ok(Some(op))
    }

    /// A write failed after part of its range may have changed (`write_image`): the
    /// pending logs collapse into the bitmap (their failed operations with them: every
    /// range they logged is marked) and the range is marked, so the next catch-up ships
    /// what the image holds there (`tracker::write`'s module documentation).
    pub(super) fn mark_torn(&self, offset: u64, len: u64) -> Result<(), TrackerError> {
        let mut st = self.lock();
        if !st.tracking {
            return Ok(());
        }
        let mut sp = self.spill.lock();
        if sp.as_ref().is_none_or(|d| d.draining) {
            self.collapse_locked(&mut st, &mut sp)?;
            // Their logs are gone: nothing is left to cancel.
            self.inflight().failed.clear();
        }
        if let Some(d) = sp.as_mut() {
            d.map.mark(offset, len).map_err(|source| bitmap_err(&self.spill.path, source))?;
            d.map.sync().map_err(|source| bitmap_err(&self.spill.path, source))?;
        }
        tracing::warn!(disk = %self.disk_id, offset, len, "a failed image write may have changed part of its range: marked dirty, the disk runs on its dirty-block bitmap");
        Ok(())
    }

    /// Marks every pending log's ranges in the bitmap (created if needed), syncs it,
    /// then deletes the logs. Caller holds the state lock.
    fn collapse_locked(&self, st: &mut State, sp: &mut Option<Dirty>) -> Result<(), TrackerError> {
        self.drain();
        // The logs' writes are durable in the image before the logs go.
        self.image.sync_data().map_err(|source| self.image_err(source))?;
        if sp.is_none() {
            let map = DirtyBitmap::create(&self.spill.path, self.size)
                .map_err(|source| bitmap_err(&self.spill.path, source))?;
            *sp = Some(Dirty { map, draining: false });
        }
        let Some(d) = sp.as_mut() else { return Ok(()) };
        d.draining = false;
        let mut paths: Vec<PathBuf> = st.sealed.values().map(|l| l.path.clone()).collect();
        if let Some(log) = st.log.as_ref() {
            paths.push(log.path().to_owned());
        }
        let mut data = Vec::new();
        for path in &paths {
            let mut reader = HrlReader::open(path).map_err(|source| log_err(path, source))?;
            while let Some(rec) = reader.next_record(&mut data).map_err(|source| log_err(path, source))? {
                d.map.mark(rec.offset, rec.length).map_err(|source| bitmap_err(&self.spill.path, source))?;
            }
        }
        d.map.sync().map_err(|source| bitmap_err(&self.spill.path, source))?;
        st.sealed.clear();
        st.log = None;
        st.log_file = None;
        self.spill.publish(0);
        for path in &paths {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(log_err(path, e.into())),
            }
        }
        hrl::sync_dir(&self.dir).map_err(|source| TrackerError::Dir { path: self.dir.clone(), source })
    }

    /// For the catch-up point: collapses whatever was logged since into the bitmap and
    /// returns its dirty blocks; from this instant writes are logged again (the bitmap
    /// stays until [`Self::finish_catch_up`]). `None` when the disk has no bitmap.
    pub fn take_dirty(&self) -> Result<Option<DirtyBlocks>, TrackerError> {
        let mut st = self.lock();
        let mut sp = self.spill.lock();
        if sp.is_none() {
            return Ok(None);
        }
        self.collapse_locked(&mut st, &mut sp)?;
        let Some(d) = sp.as_mut() else { return Ok(None) };
        d.draining = true;
        let ranges = d.map.ranges();
        let bytes = ranges.iter().map(|r| r.1).sum();
        let through = LogSeq(st.next_seq.0.saturating_sub(1));
        Ok(Some(DirtyBlocks { ranges, blocks: d.map.dirty_blocks(), bytes, through }))
    }

    /// The replica acknowledged the catch-up point: the bitmap goes (unless the budget
    /// was passed again meanwhile: then the disk stays on it).
    pub fn finish_catch_up(&self) -> Result<(), TrackerError> {
        let _st = self.lock();
        let mut sp = self.spill.lock();
        if sp.as_ref().is_some_and(|d| d.draining)
            && let Some(d) = sp.take()
        {
            d.map.remove().map_err(|source| bitmap_err(&self.spill.path, source))?;
            tracing::info!(disk = %self.disk_id, "caught up: the disk is back on HRL logs");
        }
        Ok(())
    }

    /// Replication stopped (unprotect): the bitmap, whose blocks no replica will take,
    /// goes with its file; the disk is on its logs again (none while not tracking).
    pub fn drop_bitmap(&self) -> Result<(), TrackerError> {
        let _st = self.lock();
        let mut sp = self.spill.lock();
        if let Some(d) = sp.take() {
            d.map.remove().map_err(|source| bitmap_err(&self.spill.path, source))?;
            tracing::info!(disk = %self.disk_id, "replication stopped: the dirty-block bitmap is removed");
        }
        Ok(())
    }
}

/// Bytes of the pending logs (sealed plus open). Caller holds the state lock.
pub(super) fn pending_locked(st: &State) -> u64 {
    st.sealed.values().map(|l| l.bytes).sum::<u64>() + st.log.as_ref().map_or(0, |l| l.len())
}

fn bitmap_err(path: &Path, source: io::Error) -> TrackerError {
    TrackerError::Image { path: path.to_owned(), source }
}

#[cfg(test)]
#[path = "bitmap_tests.rs"]
mod tests;
