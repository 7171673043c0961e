//! The write path: an operation is appended to the open log under the state lock (which
//! fixes the order), then applied to the image outside it. An operation whose image write
//! fails is taken back out of the log before the client sees the error: cut away when it
//! is still the log's tail, else cancelled by a cancel record (format version 2), and the
//! log synced. So a write is acknowledged only if both log and image took it, and a
//! failed one is never shipped nor re-applied at the next start ("ghost" writes).
//!
//! A write that fails *after* its space was reserved (EIO from the image's `pwrite`)
//! may have changed part of the range: the image is then neither the old content nor
//! the new one, and no log record describes it. Re-logging the range's read-back content
//! at the log's tail would be wrong (a later overlapping write may already be logged
//! before it), and there is no before-image to restore on the primary. So the range is
//! marked in the disk's dirty-block bitmap ([`super::bitmap`]; the pending logs collapse
//! into it): the next catch-up ships the blocks' content as the image has it then, and
//! the replica is again at a whole recovery point of the primary's image. The guest got
//! the error: the range is undefined to it, as a failed write on any disk.

use super::*;
use crate::hrl::LogMark;

/// Log space kept allocated past the end of the open log for cancel records (32 bytes
/// each): room for 2048 failed in-flight operations, far more than an NBD client queues.
const CANCEL_ROOM: u64 = 64 << 10;

/// Where one operation's records are in the log, until its image write succeeded.
#[derive(Clone, Copy, Debug)]
pub(super) struct LoggedOp {
    seq: LogSeq,
    mark: LogMark,
    /// End position of its last record.
    end: u64,
}

impl TrackedDisk {
    /// Writes every record of one operation to the open log, and keeps [`CANCEL_ROOM`]
    /// allocated after it. Caller holds the lock. On failure nothing of it stays logged.
    pub(super) fn append_locked(
        &self,
        st: &mut State,
        recs: &[EncodedRecord],
        data: &[u8],
    ) -> Result<LoggedOp, DiskError> {
        if st.log.is_none() {
            self.create_log(st).map_err(|e| DiskError::Io(io::Error::other(e)))?;
        }
        let Some(log) = st.log.as_mut() else {
            return Err(DiskError::Io(io::Error::other("no open HRL log")));
        };
        let mark = log.mark();
        let mut chunks = data.chunks(MAX_RECORD_DATA as usize);
        let appended = recs.iter().try_for_each(|rec| log.append(rec, chunks.next().unwrap_or(&[])));
        if let Err(e) = appended.and_then(|()| log.reserve(CANCEL_ROOM)) {
            // Still the tail (we hold the lock): cut the operation's records away. If even
            // that fails the writer refuses all further appends.
            if let Err(cut) = log.cut_back(mark) {
                tracing::error!(log = %log.path().display(), "cannot cut back a failed HRL append: {cut:#}");
            }
            return Err(hrl_to_disk(e));
        }
        Ok(LoggedOp { seq: log.header().seq, mark, end: log.len() })
    }

    /// Takes the operations whose image write failed back out of the open log: cut
    /// away if they are its tail, else cancelled; then the log is synced, so the
    /// cancellation is durable before the client sees the error. Caller holds the lock.
    /// What could not be settled stays queued (a seal retries it, and fails rather than
    /// seal a log that would ship a failed write).
    pub(super) fn settle_failed_locked(&self, st: &mut State) -> Result<(), HrlError> {
        let mut failed = std::mem::take(&mut self.inflight().failed);
        if failed.is_empty() {
            return Ok(());
        }
        // Latest first: each one cut away may make the one before it the tail.
        failed.sort_by_key(|op| std::cmp::Reverse(op.mark.pos));
        let result = self.settle(st, &mut failed);
        self.inflight().failed.extend(failed);
        result
    }

    fn settle(&self, st: &mut State, failed: &mut Vec<LoggedOp>) -> Result<(), HrlError> {
        let Some(log) = st.log.as_mut() else {
            return Err(HrlError::Broken);
        };
        while let Some(&op) = failed.first() {
            if op.seq != log.header().seq {
                // Cannot happen: a seal drains and settles before it seals.
                tracing::error!(seq = %op.seq, "failed write of an already sealed HRL log cannot be cancelled");
            } else if log.len() != op.end || log.cut_back(op.mark).is_err() {
                log.append(&EncodedRecord::cancel(op.mark.pos, op.end - op.mark.pos)?, &[])?;
            }
            failed.remove(0);
        }
        log.sync()
    }

    /// The image write of a write request: space reserved first, so a full file system
    /// fails it before a byte of the image changed.
    pub(super) fn write_image(&self, data: &[u8], offset: u64) -> io::Result<()> {
        crate::faults::point(crate::faults::TRACKER_IMAGE_WRITE)?;
        reserve_image(&self.image, offset, data.len() as u64)?;
        // From here a failure may leave part of the range written.
        let half = (data.len() / 2) & !511;
        if half > 0
            && let Err(e) = crate::faults::point(crate::faults::TRACKER_IMAGE_WRITE_PARTIAL)
        {
            MAYBE_TORN.set(true);
            self.image.write_all_at(&data[..half], offset)?;
            return Err(e);
        }
        self.image.write_all_at(data, offset).inspect_err(|_| MAYBE_TORN.set(true))
    }

    /// The common path of write, write-zeroes and trim: log (when tracking, under the
    /// lock) then apply (outside it, after earlier overlapping operations); a failed apply
    /// is taken back out of the log; then flush for FUA.
    pub(super) fn mutate(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
        data: &[u8],
        fua: bool,
        apply: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), DiskError> {
        check_range(offset, len, self.size)?;
        if len == 0 {
            return Ok(());
        }
        let flags = if fua { FLAG_FUA } else { 0 };
        // Checksums outside the lock when tracking is (probably) on.
        let mut recs = if self.tracking_hint.load(Ordering::Relaxed) {
            encode(kind, flags, offset, len, data)?
        } else {
            Vec::new()
        };
        let end = offset + len;
        let (ticket, logged) = {
            let mut st = self.lock();
            if st.stopped {
                return Err(DiskError::Stopped);
            }
            let mut logged = None;
            if st.tracking {
                if recs.is_empty() {
                    recs = encode(kind, flags, offset, len, data)?;
                }
                logged = self.log_or_mark(&mut st, &recs, data, offset, len)?;
            }
            let mut inf = self.inflight();
            let t = inf.next;
            inf.next += 1;
            inf.ranges.push((t, offset, end));
            (t, logged)
        };
        // Wait for earlier overlapping operations, then apply outside the state lock.
        let mut inf = self.inflight();
        while inf.ranges.iter().any(|&(t, s, e)| t < ticket && s < end && offset < e) {
            inf = self.inflight_done.wait(inf).unwrap_or_else(PoisonError::into_inner);
        }
        drop(inf);
        MAYBE_TORN.set(false);
        let applied = apply();
        let torn = applied.is_err() && MAYBE_TORN.replace(false);
        {
            // Queued for settling in the same step that ends it being in flight, so a
            // seal (which drains, then settles) cannot miss it.
            let mut inf = self.inflight();
            inf.ranges.retain(|r| r.0 != ticket);
            if let (Err(_), Some(op)) = (&applied, logged) {
                inf.failed.push(op);
            }
        }
        self.inflight_done.notify_all();
        if torn && let Err(e) = self.mark_torn(offset, len) {
            tracing::error!(image = %self.image_path.display(), "cannot mark a torn write's range dirty: {e:#}");
        }
        if let Err(e) = applied {
            if logged.is_some() {
                let settled = self.settle_failed_locked(&mut self.lock());
                if let Err(s) = settled {
                    tracing::error!(image = %self.image_path.display(), "failed write not yet taken out of the HRL log: {s:#}");
                }
            }
            return Err(DiskError::from_io(e));
        }
        self.completed.fetch_add(1, Ordering::SeqCst);
        if fua { self.flush() } else { Ok(()) }
    }
}

thread_local! {
    /// Set by [`TrackedDisk::write_image`] when it failed after its reservation (part of
    /// the range may be written); read by `mutate` on the same thread.
    static MAYBE_TORN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Allocates the image range (`fallocate`, mode 0: contents unchanged, holes become
/// allocated zeroes). ENOSPC here leaves the image as it was; a file system without
/// `fallocate` is written without the reservation.
fn reserve_image(image: &File, offset: u64, len: u64) -> io::Result<()> {
    match nix::fcntl::fallocate(image, nix::fcntl::FallocateFlags::empty(), offset as i64, len as i64) {
        Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The records of one operation: writes larger than [`MAX_RECORD_DATA`] are split.
fn encode(kind: RecordKind, flags: u8, offset: u64, len: u64, data: &[u8]) -> Result<Vec<EncodedRecord>, DiskError> {
    if kind != RecordKind::Write {
        return Ok(vec![EncodedRecord::new(kind, flags, offset, len, &[]).map_err(hrl_to_disk)?]);
    }
    let mut recs = Vec::with_capacity(data.len().div_ceil(MAX_RECORD_DATA as usize));
    let mut at = offset;
    for chunk in data.chunks(MAX_RECORD_DATA as usize) {
        recs.push(EncodedRecord::new(kind, flags, at, chunk.len() as u64, chunk).map_err(hrl_to_disk)?);
        at += chunk.len() as u64;
    }
    Ok(recs)
}

pub(super) fn hrl_to_disk(e: HrlError) -> DiskError {
    match e {
        HrlError::Io(e) => DiskError::from_io(e),
        other => DiskError::Io(io::Error::other(other)),
    }
}
