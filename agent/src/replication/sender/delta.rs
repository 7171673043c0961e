//! Delta replication: each interval, seal every disk at one barrier, persist the new
//! point (its seq and logs) and ship every unacknowledged point; logs are deleted once
//! the replica acknowledged them. Also the checks that make delta replication give up
//! (a damaged log, pending logs over half the disks) and the quiesce hook.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use siterecovery_proto::v1;

use super::phase::Event;
use super::state::{PendingPoint, PointRecord};
use super::task::Task;
use super::transport::PeerTransport;
use super::{ReplicationError, barrier_seal, blocking, now_ms};
use crate::disk::BlockDevice;
use crate::hrl::{self, DiskId, LogSeq};

/// Longest a quiesce hook may run before the point is taken crash-consistent.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

impl<T: PeerTransport> Task<T> {
    /// One cycle: seal, persist the new point, ship every unacknowledged point.
    pub(super) async fn cycle(&mut self) -> Result<(), ReplicationError> {
        self.view.cycles += 1;
        if self.live
            && let Some(reason) = self.detect_resync()
        {
            return Err(ReplicationError::ResyncRequired(reason));
        }
        // A disk past its log budget ships its dirty blocks instead of logs.
        if self.on_bitmap() {
            return self.catch_up().await;
        }
        // Seal first, ship after: while the replica is unreachable the writes of each
        // interval still become their own point, so the logs stay interval-sized.
        let app = self.live && self.app_consistent_due();
        let app_ok = if app { self.run_quiesce_hook().await } else { false };
        let through = if self.live {
            let disks = self.disks.clone();
            blocking(move || barrier_seal(&disks)).await?
        } else {
            self.disks.iter().map(|(id, d)| (id.clone(), d.sealed_logs().last().map_or(0, |l| l.seq.0))).collect()
        };
        if app {
            self.st.last_app_consistent_unix_ms = now_ms();
        }
        let logs = self.unassigned_logs(&through);
        if self.disks.is_empty() {
            return Ok(()); // stopped before we ever saw its disks: nothing to read
        }
        // A running VM gets a point every interval even when nothing was written, so the
        // RPO lag (time since the last point) tells the truth; a stopped one does not,
        // and neither does one whose earlier points still wait for the replica.
        let empty_point_due = self.live && self.st.last_point.is_some() && self.st.pending.is_empty();
        if !logs.is_empty() || empty_point_due || self.st.last_point.is_none() {
            let point = PendingPoint { seq: self.st.next_seq, created_unix_ms: now_ms(), app_consistent: app_ok, logs };
            self.st.next_seq += 1;
            for (disk, seqs) in &point.logs {
                if let Some(&last) = seqs.last() {
                    self.st.assigned_through.insert(disk.clone(), last);
                }
            }
            self.st.pending.push(point);
            self.persist()?;
        }
        while let Some(p) = self.st.pending.first().cloned() {
            self.ship_pending(&p).await?;
        }
        Ok(())
    }

    /// Why delta replication cannot continue, if it cannot.
    fn detect_resync(&self) -> Option<String> {
        for (id, d) in &self.disks {
            let covered = self.st.resynced_through.get(id).copied().unwrap_or(0);
            if let Some(c) = d.corrupt_logs().iter().find(|c| c.seq.0 > covered) {
                return Some(format!("HRL log {} of disk {id} is damaged: {}", c.path.display(), c.error));
            }
        }
        let pending: u64 = self.disks.iter().map(|(_, d)| d.pending_log_bytes()).sum();
        let size: u64 = self.disks.iter().map(|(_, d)| d.size()).sum();
        if size > 0 && pending > size / 2 {
            return Some(format!("pending logs ({pending} bytes) exceed 50% of the disk size ({size} bytes)"));
        }
        None
    }

    fn app_consistent_due(&self) -> bool {
        let every = self.p.settings.app_consistent_every_ms;
        self.p.quiesce_hook.is_some()
            && every > 0
            && now_ms().saturating_sub(self.st.last_app_consistent_unix_ms) >= every as i64
    }

    async fn run_quiesce_hook(&self) -> bool {
        let Some(hook) = &self.p.quiesce_hook else { return false };
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(hook)
            .env("SITERECOVERY_VM", self.p.vm.as_str())
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(HOOK_TIMEOUT, child).await {
            Ok(Ok(s)) if s.success() => true,
            Ok(Ok(s)) => {
                tracing::warn!("quiesce hook exited with {s}: the point is crash-consistent only");
                false
            }
            Ok(Err(e)) => {
                tracing::warn!("quiesce hook could not run: {e}");
                false
            }
            Err(_) => {
                tracing::warn!("quiesce hook timed out after {HOOK_TIMEOUT:?}");
                false
            }
        }
    }

    /// Sealed logs of each disk above what earlier points took, up to `through`.
    fn unassigned_logs(&self, through: &BTreeMap<DiskId, u64>) -> BTreeMap<DiskId, Vec<u64>> {
        let mut out = BTreeMap::new();
        for (id, d) in &self.disks {
            let from = self.st.assigned_through.get(id).copied().unwrap_or(0);
            let to = through.get(id).copied().unwrap_or(0);
            let seqs: Vec<u64> = d.sealed_logs().iter().map(|l| l.seq.0).filter(|&s| s > from && s <= to).collect();
            if !seqs.is_empty() {
                out.insert(id.clone(), seqs);
            }
        }
        out
    }

    fn log_paths(&self, logs: &BTreeMap<DiskId, Vec<u64>>) -> Result<Vec<(String, u64, PathBuf)>, ReplicationError> {
        let mut out = Vec::new();
        for (disk, seqs) in logs {
            let (id, d) =
                self.disks.iter().find(|(id, _)| id == disk).ok_or_else(|| {
                    ReplicationError::ResyncRequired(format!("disk {disk} of a pending point is gone"))
                })?;
            let dir = d.image_path().parent().map(Path::to_owned).unwrap_or_default();
            for &s in seqs {
                out.push((disk.to_string(), s, dir.join(hrl::log_file_name(id, LogSeq(s)))));
            }
        }
        Ok(out)
    }

    async fn ship_pending(&mut self, p: &PendingPoint) -> Result<(), ReplicationError> {
        let logs = self.log_paths(&p.logs)?;
        let meta = v1::PointChunk {
            relationship_id: self.p.relationship_id.to_string(),
            seq: p.seq,
            created_unix_ms: p.created_unix_ms,
            app_consistent: p.app_consistent,
            ..Default::default()
        };
        let (ack, ()) = self
            .ship(meta, crate::bandwidth::Traffic::Delta, move |sink| {
                for (disk, seq, path) in &logs {
                    sink.log(disk, *seq, path)?;
                }
                Ok(())
            })
            .await?;
        if ack.seq != p.seq {
            return Err(ReplicationError::Protocol(format!("point {} acknowledged as {}", p.seq, ack.seq)));
        }
        self.apply(Event::PointAcknowledged)?;
        self.st.pending.retain(|q| q.seq != p.seq);
        self.st.last_point = Some(PointRecord {
            id: ack.point_id,
            seq: p.seq,
            created_unix_ms: p.created_unix_ms,
            app_consistent: p.app_consistent,
        });
        self.persist()?;
        tracing::debug!(seq = p.seq, "point acknowledged");
        for (disk, seqs) in &p.logs {
            if let Some(&last) = seqs.last() {
                self.delete_logs(disk, last)?;
            }
        }
        Ok(())
    }

    pub(super) fn delete_logs(&self, disk: &DiskId, through: u64) -> Result<(), ReplicationError> {
        if let Some((_, d)) = self.disks.iter().find(|(id, _)| id == disk) {
            crate::faults::point(crate::faults::SENDER_LOG_DELETE)
                .map_err(|e| super::error::io_err(format!("deleting the logs of {disk}"), e))?;
            d.delete_logs_through(LogSeq(through))?;
        }
        Ok(())
    }
}
