//! Catching up a disk that ran on its dirty-block bitmap (`tracker::bitmap`): instead of
//! the logs it dropped past the log budget, one point (marked `resync`) carries the
//! current content of the dirty blocks, then every log sealed since, up to a second
//! barrier: the point is the VM's state at that barrier. Only the dirty blocks travel —
//! no block comparison, no full copy. Once the replica acknowledged it the bitmap goes
//! and the disk is back on HRL logs; if the point fails, the next try takes the logs
//! written meanwhile into the bitmap again.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use siterecovery_proto::model::units::human_size;

use super::error::io_err;
use super::state::PointRecord;
use super::task::Task;
use super::transport::PeerTransport;
use super::{EXTENT_MAX, ReplicationError, barrier_seal};
use crate::hrl::{self, DiskId};

impl<T: PeerTransport> Task<T> {
    /// Whether some disk has a dirty-block bitmap to catch up.
    pub(super) fn on_bitmap(&self) -> bool {
        self.disks.iter().any(|(_, d)| d.bitmap_state().is_some())
    }

    /// What health shows while disks run on their bitmaps.
    pub(super) fn bitmap_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (id, d) in &self.disks {
            if let Some(s) = d.bitmap_state() {
                out.push(format!(
                    "disk {id} runs on its dirty-block bitmap: pending logs passed the log budget of {}; \
                     {} blocks of 64 KiB dirty, sent when the replica is reachable",
                    human_size(s.budget),
                    s.dirty_blocks
                ));
            }
        }
        out
    }

    /// Ships the catch-up point of every disk on its bitmap (and every log of the others).
    pub(super) async fn catch_up(&mut self) -> Result<(), ReplicationError> {
        if !self.live {
            return Ok(()); // a stopped VM cannot be sealed: wait for it
        }
        // Earlier unacknowledged points are obsolete: this one covers them.
        self.st.pending.clear();
        let meta = self.new_resync_point()?;
        let (seq, created) = (meta.seq, meta.created_unix_ms);
        let disks = self.disks.clone();
        let wire_before = self.wire.load(Ordering::Relaxed);
        let (ack, (t1, dirty_blocks, dirty_bytes)) = self
            .ship(meta, crate::bandwidth::Traffic::Bulk, move |sink| {
                let (mut blocks, mut bytes) = (0u64, 0u64);
                let mut from: BTreeMap<DiskId, u64> = BTreeMap::new();
                let mut buf = vec![0u8; EXTENT_MAX];
                for (id, d) in &disks {
                    let Some(dirty) = d.take_dirty()? else { continue };
                    let path = d.image_path();
                    let file = File::open(path).map_err(|e| io_err(format!("image {}", path.display()), e))?;
                    for &(offset, len) in &dirty.ranges {
                        let mut done = 0;
                        while done < len {
                            let n = (len - done).min(EXTENT_MAX as u64);
                            let data = &mut buf[..n as usize];
                            file.read_exact_at(data, offset + done)
                                .map_err(|e| io_err(format!("image read at {}", offset + done), e))?;
                            sink.write(id.as_str(), offset + done, data)?;
                            done += n;
                        }
                    }
                    blocks += dirty.blocks;
                    bytes += dirty.bytes;
                    from.insert(id.clone(), dirty.through.0);
                }
                // What was written since the blocks were taken is in logs: seal at one
                // barrier and append them, so the point is consistent at that barrier.
                let t1 = barrier_seal(&disks)?;
                for (id, d) in &disks {
                    let from = from.get(id).copied().unwrap_or(0);
                    let to = t1.get(id).copied().unwrap_or(0);
                    let dir = d.image_path().parent().map(Path::to_owned).unwrap_or_default();
                    for l in d.sealed_logs().iter().filter(|l| l.seq.0 > from && l.seq.0 <= to) {
                        sink.log(id.as_str(), l.seq.0, &dir.join(hrl::log_file_name(id, l.seq)))?;
                    }
                }
                Ok((t1, blocks, bytes))
            })
            .await?;
        let wire = self.wire.load(Ordering::Relaxed) - wire_before;
        self.st.last_point =
            Some(PointRecord { id: ack.point_id, seq, created_unix_ms: created, app_consistent: false });
        self.st.assigned_through = t1.clone();
        self.persist()?;
        for (_, d) in &self.disks {
            d.finish_catch_up()?;
        }
        for (disk, &through) in &t1 {
            self.delete_logs(disk, through)?;
        }
        self.view.resync_wire = wire;
        self.view.detail = format!(
            "caught up from the dirty-block bitmap: {dirty_blocks} dirty blocks ({dirty_bytes} bytes), {wire} bytes sent"
        );
        tracing::info!(dirty_blocks, dirty_bytes, wire_bytes = wire, "dirty-block catch-up done");
        Ok(())
    }
}
