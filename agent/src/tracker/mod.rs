//! The replication tracker: a VM disk whose every write is appended to its HRL log.
//!
//! [`TrackedDisk`] owns one raw image and the HRL logs beside it (format: `hrl`,
//! `docs/hrl-format.md`). It is the [`BlockDevice`] the NBD server exports for a VM disk.
//!
//! ```text
//! <vm folder>/
//!   disk0.img                        the image (raw)
//!   disk0.0000000000000004.hrl       sealed: one replication interval, shipped by the sender
//!   disk0.0000000000000005.hrl       sealed
//!   disk0.0000000000000006.hrl       open: current interval (highest seq, no footer)
//! ```
//!
//! Invariants, all kept under one mutex (`state`):
//! - while tracking, a write is appended to the open log *before* it is applied to the
//!   image, and both happen under the lock, so the log order is the image order even for
//!   overlapping writes from concurrent NBD threads (a per-range lock would let
//!   non-overlapping writes run in parallel, but the critical section is two page-cache
//!   copies and measured fast enough; the checksum is computed before taking the lock);
//! - a seal takes the same lock, so no write straddles two logs, and a sealed log is
//!   exactly the writes between two seals: a crash-consistent delta;
//! - only the highest-numbered log is open; every lower one is sealed;
//! - an open log never has records while tracking is off (switching off seals it), so
//!   re-applying the open log after a crash never overwrites a later untracked write.
//!
//! Durability: writes go to the page cache (survives `kill -9` of the agent, not a power
//! loss); `flush` and FUA fdatasync the log and the image, with group commit (a flush
//! that finds its writes already synced by a concurrent flush returns at once). A seal
//! syncs the image too, so a sealed log's writes are durable in the image as well.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::disk::{BlockDevice, DiskError, check_range};
use crate::hrl::{
    self, DiskId, EncodedRecord, FLAG_FUA, HrlError, HrlReader, HrlWriter, LogSeq, MAX_RECORD_DATA, RecordKind, ScanEnd,
};

/// Why opening or managing a tracked disk failed (the block I/O path reports
/// [`DiskError`] instead).
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The image could not be opened, read, written or synced.
    #[error("image {path}: {source}")]
    Image { path: PathBuf, source: io::Error },
    /// A log could not be created, read, written or synced.
    #[error("HRL log {path}: {source}")]
    Log { path: PathBuf, source: HrlError },
    /// The disk's folder could not be listed or synced.
    #[error("log folder {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    /// The disk was stopped.
    #[error("disk is stopped")]
    Stopped,
}

/// A sealed log waiting to be shipped (or acknowledged and deleted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedLog {
    pub seq: LogSeq,
    pub path: PathBuf,
    /// File size in bytes.
    pub bytes: u64,
}

/// A log found damaged when the disk was opened. It is kept on disk and reported, never
/// deleted here: replication must fall back to resync for the interval it covered.
#[derive(Debug)]
pub struct CorruptLog {
    pub seq: LogSeq,
    pub path: PathBuf,
    pub error: HrlError,
}

#[derive(Debug)]
struct State {
    tracking: bool,
    stopped: bool,
    /// The open log. `None` after `stop`, or when creating the next log failed (the next
    /// tracked write retries the creation, and fails if it fails again).
    log: Option<HrlWriter>,
    /// Second handle on the open log's file, for flushes outside the lock.
    log_file: Option<Arc<File>>,
    /// Sequence number of the next log to create.
    next_seq: LogSeq,
    sealed: BTreeMap<LogSeq, SealedLog>,
}

/// A VM disk whose writes are logged to HRL logs while tracking is on.
#[derive(Debug)]
pub struct TrackedDisk {
    image: File,
    image_path: PathBuf,
    dir: PathBuf,
    disk_id: DiskId,
    size: u64,
    state: Mutex<State>,
    /// A hint read without the lock: when set, a write computes its record checksum
    /// before taking the lock. The decision itself is made under the lock.
    tracking_hint: AtomicBool,
    /// Generation up to which the log and the image are known durable (group commit).
    synced_gen: Mutex<u64>,
    /// Operations completed (logged and applied): what a flush covers.
    completed: AtomicU64,
    /// Operations logged but not yet applied to the image. The log append happens under
    /// the state lock (it fixes the order); the image write happens outside it, after
    /// every earlier operation overlapping the same range was applied, so the image
    /// order of overlapping writes equals the log order while writes to different ranges
    /// copy in parallel. Seal, freeze and stop drain it first.
    inflight: Mutex<Inflight>,
    inflight_done: Condvar,
    corrupt: Vec<CorruptLog>,
    spill: bitmap::Spill,
}

#[derive(Debug, Default)]
struct Inflight {
    next: u64,
    /// (ticket, start, end) of operations logged but not applied.
    ranges: Vec<(u64, u64, u64)>,
    /// Logged operations whose image write failed, not yet taken out of the log.
    failed: Vec<write::LoggedOp>,
}

impl TrackedDisk {
    fn image_err(&self, source: io::Error) -> TrackerError {
        TrackerError::Image { path: self.image_path.clone(), source }
    }

    fn inflight(&self) -> MutexGuard<'_, Inflight> {
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every logged operation is applied to the image. Called with the state
    /// lock held, so no new operation can be logged meanwhile.
    fn drain(&self) {
        let mut inf = self.inflight();
        while !inf.ranges.is_empty() {
            inf = self.inflight_done.wait(inf).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state consistent at record
        // granularity (the writer cuts failed appends back), so poisoning is ignored.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn create_log(&self, st: &mut State) -> Result<(), TrackerError> {
        let writer = HrlWriter::create(&self.dir, &self.disk_id, st.next_seq)
            .map_err(|source| log_err(&self.dir.join(hrl::log_file_name(&self.disk_id, st.next_seq)), source))?;
        install_log(st, writer).map_err(|source| log_err(&self.dir, source))
    }

    /// Seals the open log if it has records: image synced, footer written and synced,
    /// then (if `open_next`) the next log created. Caller holds the lock.
    fn seal_locked(&self, st: &mut State, open_next: bool) -> Result<Option<LogSeq>, TrackerError> {
        self.drain();
        if let Err(source) = self.settle_failed_locked(st) {
            return Err(log_err(&self.dir, source));
        }
        let Some(log) = st.log.as_mut() else {
            if open_next && !st.stopped {
                self.create_log(st)?;
            }
            return Ok(None);
        };
        if log.is_empty() {
            return Ok(None);
        }
        self.image.sync_data().map_err(|source| self.image_err(source))?;
        let seq = log.header().seq;
        let path = log.path().to_owned();
        let (_, bytes) = log.seal().map_err(|source| log_err(&path, source))?;
        st.sealed.insert(seq, SealedLog { seq, path, bytes });
        st.log = None;
        st.log_file = None;
        if open_next {
            self.create_log(st)?;
        }
        Ok(Some(seq))
    }

    /// Turns tracking on or off, under the write lock: a write racing with the switch is
    /// either entirely before it (untracked) or entirely after it (logged). Switching off
    /// seals the open log (nothing new will be appended to it).
    pub fn set_tracking(&self, on: bool) -> Result<(), TrackerError> {
        let mut st = self.lock();
        if st.tracking == on {
            return Ok(());
        }
        if !on {
            let open_next = !st.stopped;
            self.seal_locked(&mut st, open_next)?;
        }
        st.tracking = on;
        self.tracking_hint.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Whether writes are being logged.
    pub fn tracking(&self) -> bool {
        self.lock().tracking
    }

    /// Seals the open log and starts the next one, atomically with respect to writes.
    /// Returns the sealed log's seq, or `None` when the open log had no record (an
    /// interval without writes produces no log: nothing to ship, and no empty files).
    pub fn seal(&self) -> Result<Option<LogSeq>, TrackerError> {
        self.write_back()?;
        let mut st = self.lock();
        if st.stopped {
            return Err(TrackerError::Stopped);
        }
        self.seal_locked(&mut st, true)
    }

    /// Writes back the image's and the open log's dirty pages *without* blocking writes,
    /// so that a seal that follows (which syncs both under the write lock) only waits for
    /// what was written in between. [`Self::seal`] calls it; a VM calls it on each disk
    /// before [`Self::freeze`], or the freeze stalls the guest for a whole interval's
    /// write-back.
    pub fn write_back(&self) -> Result<(), TrackerError> {
        let log_file = self.lock().log_file.clone();
        self.image.sync_data().map_err(|source| self.image_err(source))?;
        if let Some(f) = log_file {
            f.sync_data().map_err(|source| log_err(&self.dir, source.into()))?;
        }
        Ok(())
    }

    /// Blocks new writes and waits for in-flight ones (they hold the lock this takes);
    /// writes resume when the guard is dropped. A VM freezes all its disks (always in the
    /// same order, to avoid lock-order inversions between VMs), seals each under its guard,
    /// then drops the guards: every disk's log ends at the same instant, so the point is
    /// crash-consistent across the VM. Do not call methods of this disk while holding its
    /// guard (they would wait for the guard); use the guard's own.
    pub fn freeze(&self) -> FreezeGuard<'_> {
        let state = self.lock();
        self.drain();
        FreezeGuard { disk: self, state }
    }

    /// Refuses all further writes ([`DiskError::Stopped`]), seals the open log if it has
    /// records and syncs the image. Returns the sealed seq, if any.
    pub fn stop(&self) -> Result<Option<LogSeq>, TrackerError> {
        let mut st = self.lock();
        if st.stopped {
            return Ok(None);
        }
        st.stopped = true;
        self.drain();
        let sealed = self.seal_locked(&mut st, false)?;
        if let Some(log) = st.log.as_ref() {
            log.sync().map_err(|source| log_err(log.path(), source))?;
        }
        self.image.sync_data().map_err(|source| self.image_err(source))?;
        Ok(sealed)
    }

    /// Sealed logs not yet deleted, ascending by seq.
    pub fn sealed_logs(&self) -> Vec<SealedLog> {
        self.lock().sealed.values().cloned().collect()
    }

    /// Deletes the sealed logs up to and including `seq` (the replica acknowledged them).
    /// The open log and damaged logs are never deleted here.
    pub fn delete_logs_through(&self, seq: LogSeq) -> Result<(), TrackerError> {
        let doomed: Vec<SealedLog> = {
            let mut st = self.lock();
            let keep = st.sealed.split_off(&seq.next());
            let doomed = std::mem::replace(&mut st.sealed, keep).into_values().collect();
            self.spill.publish(bitmap::pending_locked(&st));
            doomed
        };
        for log in &doomed {
            match std::fs::remove_file(&log.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(log_err(&log.path, e.into())),
            }
        }
        if !doomed.is_empty() {
            hrl::sync_dir(&self.dir).map_err(|source| TrackerError::Dir { path: self.dir.clone(), source })?;
        }
        Ok(())
    }

    /// Bytes of logs not yet deleted: sealed logs plus the open one.
    pub fn pending_log_bytes(&self) -> u64 {
        let st = self.lock();
        st.sealed.values().map(|l| l.bytes).sum::<u64>() + st.log.as_ref().map_or(0, |l| l.len())
    }

    /// Sequence number and path of the open log.
    pub fn current_log(&self) -> Option<(LogSeq, PathBuf)> {
        self.lock().log.as_ref().map(|l| (l.header().seq, l.path().to_owned()))
    }

    /// Logs found damaged at open (kept on disk).
    pub fn corrupt_logs(&self) -> &[CorruptLog] {
        &self.corrupt
    }

    pub fn disk_id(&self) -> &DiskId {
        &self.disk_id
    }
    pub fn image_path(&self) -> &Path {
        &self.image_path
    }
}

/// Writes of a frozen disk wait until this guard is dropped.
#[derive(Debug)]
pub struct FreezeGuard<'a> {
    disk: &'a TrackedDisk,
    state: MutexGuard<'a, State>,
}

impl FreezeGuard<'_> {
    /// Seals the open log while frozen (see [`TrackedDisk::seal`]).
    pub fn seal(&mut self) -> Result<Option<LogSeq>, TrackerError> {
        if self.state.stopped {
            return Err(TrackerError::Stopped);
        }
        self.disk.seal_locked(&mut self.state, true)
    }
}

/// Makes `writer` the open log.
fn install_log(st: &mut State, writer: HrlWriter) -> Result<(), HrlError> {
    st.log_file = Some(Arc::new(writer.try_clone_file()?));
    st.next_seq = writer.header().seq.next();
    st.log = Some(writer);
    Ok(())
}

fn log_err(path: &Path, source: HrlError) -> TrackerError {
    TrackerError::Log { path: path.to_owned(), source }
}

fn file_len(path: &Path) -> Result<u64, TrackerError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(|source| log_err(path, source.into()))
}

pub mod bitmap;
mod block;
mod recover;
#[cfg(test)]
mod tests;
mod write;
mod zero;
