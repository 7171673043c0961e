//! The resync run: seal and drop the useless logs, wait for the end of business hours
//! (unless an operator asked), fetch the replica's block hashes, and ship as one point
//! the sub-blocks that differ plus every log sealed meanwhile. The hashing and comparing
//! pieces are in [`crate::replication::resync`].

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use siterecovery_proto::v1;

use super::error::io_err;
use super::phase::Event;
use super::ship::ChunkSink;
use super::state::PointRecord;
use super::task::Task;
use super::transport::PeerTransport;
use super::{ReplicationError, barrier_seal, blocking};
use crate::disk::BlockDevice;
use crate::hrl;
use crate::replication::resync;
use crate::tracker::TrackedDisk;

/// Blocks hashed per parallel batch during resync.
const RESYNC_BATCH_BLOCKS: u64 = 1024;

impl<T: PeerTransport> Task<T> {
    pub(super) async fn resync(&mut self, reason: String, requested: bool) -> Result<(), ReplicationError> {
        self.view.cycles += 1;
        self.view.detail = reason.clone();
        if !self.live {
            return Ok(()); // the VM is stopped: wait for it
        }
        // Logs are of no use until the blocks are compared: seal and drop them, so a
        // resync held back by business hours does not fill the disk.
        // The comparison covers what a dirty-block bitmap holds: it goes with the point.
        for (_, d) in &self.disks {
            d.take_dirty()?;
        }
        let disks = self.disks.clone();
        let t0 = blocking(move || barrier_seal(&disks)).await?;
        for (disk, &through) in &t0 {
            self.delete_logs(disk, through)?;
        }
        let s = &self.p.settings;
        if !requested
            && !resync::automatic_resync_allowed(
                s.resync_window_start_hour,
                s.resync_window_end_hour,
                resync::current_hour_utc(),
            )
        {
            self.view.detail = format!("{reason} (waiting for the end of business hours)");
            return Ok(());
        }
        self.apply(Event::ResyncStarted)?;
        tracing::info!("resynchronising: {reason}");
        let block_size = resync::RESYNC_BLOCK_SIZE;
        let mut remote = Vec::new();
        for (id, d) in &self.disks {
            let n = resync::block_count(d.size(), block_size);
            let mut stream = self
                .peer
                .block_hashes(v1::BlockHashesRequest {
                    relationship_id: self.p.relationship_id.to_string(),
                    disk_id: id.as_str().to_owned(),
                    block_size,
                    ..Default::default()
                })
                .await?;
            let want = n as usize * resync::HASH_LEN;
            let mut hashes = Vec::with_capacity(want);
            while let Some(c) = stream.next().await.transpose()? {
                if c.first_block as usize * resync::HASH_LEN != hashes.len() || hashes.len() + c.hashes.len() > want {
                    return Err(ReplicationError::Protocol(format!("block hashes of {id} out of order or too many")));
                }
                hashes.extend_from_slice(&c.hashes);
            }
            if hashes.len() != want {
                return Err(ReplicationError::Protocol(format!(
                    "{} block hashes of {id}, expected {n}",
                    hashes.len() / resync::HASH_LEN
                )));
            }
            remote.push((id.clone(), d.clone(), hashes));
        }
        let meta = self.new_resync_point()?;
        let (seq, created) = (meta.seq, meta.created_unix_ms);
        self.view.total = self.disks.iter().map(|(_, d)| d.size()).sum();
        self.view.done = 0;
        self.view.compared = 0;
        self.view.sent = 0;
        self.progress.store(0, Ordering::Relaxed);
        let wire_before = self.wire.load(Ordering::Relaxed);
        let progress = self.progress.clone();
        let disks = self.disks.clone();
        let t0c = t0.clone();
        let mut sub = SubHashes {
            peer: self.peer.clone(),
            relationship_id: self.p.relationship_id.to_string(),
            unsupported: false,
        };
        let (ack, (t1, compared, differed, sent)) = self
            .ship(meta, crate::bandwidth::Traffic::Bulk, move |sink| {
                let (mut compared, mut differed, mut sent) = (0u64, 0u64, 0u64);
                for (id, d, hashes) in &remote {
                    let c = sink.differing_blocks(id.as_str(), d, block_size, hashes, &mut sub, &progress)?;
                    compared += c.compared;
                    differed += c.differed;
                    sent += c.sub_blocks_sent;
                }
                // Everything written since the first seal is in logs: seal again and
                // append them, so the point is consistent at this second barrier.
                let t1 = barrier_seal(&disks)?;
                for (id, d) in &disks {
                    let from = t0c.get(id.as_str()).copied().unwrap_or(0);
                    let to = t1.get(id.as_str()).copied().unwrap_or(0);
                    let dir = d.image_path().parent().map(Path::to_owned).unwrap_or_default();
                    for l in d.sealed_logs().iter().filter(|l| l.seq.0 > from && l.seq.0 <= to) {
                        sink.log(id.as_str(), l.seq.0, &dir.join(hrl::log_file_name(id, l.seq)))?;
                    }
                }
                Ok((t1, compared, differed, sent))
            })
            .await?;
        self.view.compared = compared;
        self.view.sent = sent;
        self.view.resync_wire = self.wire.load(Ordering::Relaxed) - wire_before;
        self.view.done = self.view.total;
        self.st.last_point =
            Some(PointRecord { id: ack.point_id, seq, created_unix_ms: created, app_consistent: false });
        self.st.assigned_through = t1.clone();
        for (disk, &through) in &t0 {
            self.st.resynced_through.insert(disk.clone(), through);
        }
        self.view.detail = format!(
            "resync done: {differed} of {compared} blocks differed, {} bytes sent; {sent} {} KiB sub-blocks sent",
            self.view.resync_wire,
            resync::RESYNC_SUB_BLOCK_SIZE >> 10
        );
        self.apply(Event::ResyncDone)?;
        self.persist()?;
        for (_, d) in &self.disks {
            d.finish_catch_up()?;
        }
        for (disk, &through) in &t1 {
            self.delete_logs(disk, through)?;
        }
        // Damaged logs the comparison covered are of no further use.
        for (id, d) in &self.disks {
            let covered = t0.get(id.as_str()).copied().unwrap_or(0);
            for c in d.corrupt_logs().iter().filter(|c| c.seq.0 <= covered) {
                if let Err(e) = std::fs::remove_file(&c.path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(log = %c.path.display(), "removing a damaged log after resync: {e}");
                }
            }
        }
        tracing::info!("{}", self.view.detail);
        Ok(())
    }
}

/// The replica's sub-block hashes, asked for during a resync (from the shipping thread).
pub(super) struct SubHashes<T> {
    peer: T,
    relationship_id: String,
    /// The replica answered a sub-block request with something else (an older agent).
    unsupported: bool,
}

/// Figures of one disk's resync.
#[derive(Debug, Default)]
pub(super) struct ResyncCounts {
    /// Blocks compared.
    compared: u64,
    /// Blocks whose hash differed.
    differed: u64,
    /// Sub-blocks of those that differed, and were sent.
    sub_blocks_sent: u64,
}

impl ChunkSink {
    /// Hashes `disk` against the replica's `remote` block hashes; for the blocks that
    /// differ, compares the sub-block hashes (asked of the replica in batches) and pushes
    /// the sub-blocks that differ.
    fn differing_blocks<T: PeerTransport>(
        &mut self,
        disk_id: &str,
        disk: &TrackedDisk,
        block_size: u32,
        remote: &[u8],
        sub: &mut SubHashes<T>,
        progress: &AtomicU64,
    ) -> Result<ResyncCounts, ReplicationError> {
        let path = disk.image_path();
        let file = File::open(path).map_err(|e| io_err(format!("image {}", path.display()), e))?;
        let size = disk.size();
        let n = resync::block_count(size, block_size);
        let mut counts = ResyncCounts { compared: n, ..Default::default() };
        let mut pending = Vec::new();
        let mut first = 0;
        while first < n {
            let count = RESYNC_BATCH_BLOCKS.min(n - first);
            let local = resync::hash_blocks(&file, size, block_size, first, count, resync::HASH_THREADS)
                .map_err(|e| io_err(format!("hashing {}", path.display()), e))?;
            let r = &remote[first as usize * resync::HASH_LEN..(first + count) as usize * resync::HASH_LEN];
            pending.extend(resync::differing(first, &local, r));
            first += count;
            if pending.len() >= resync::SUB_HASH_BATCH_BLOCKS || first >= n {
                counts.differed += pending.len() as u64;
                counts.sub_blocks_sent += self.differing_sub_blocks(disk_id, &file, size, block_size, &pending, sub)?;
                pending.clear();
            }
            progress.fetch_add(count * u64::from(block_size), Ordering::Relaxed);
        }
        Ok(counts)
    }

    /// The second level: compares the sub-blocks of the differing `blocks` with the
    /// replica's and pushes those that differ (adjacent ones merged). Returns the number
    /// of sub-blocks sent. A replica that does not answer sub-block hashes (an older
    /// agent) gets the whole blocks.
    fn differing_sub_blocks<T: PeerTransport>(
        &mut self,
        disk_id: &str,
        file: &File,
        size: u64,
        block_size: u32,
        blocks: &[u64],
        sub: &mut SubHashes<T>,
    ) -> Result<u64, ReplicationError> {
        if blocks.is_empty() {
            return Ok(0);
        }
        let sbs = resync::RESYNC_SUB_BLOCK_SIZE;
        let want: u64 = blocks.iter().map(|&b| resync::sub_block_count(b, size, block_size, sbs)).sum();
        let remote = if sub.unsupported {
            None
        } else {
            let req = v1::BlockHashesRequest {
                relationship_id: sub.relationship_id.clone(),
                disk_id: disk_id.to_owned(),
                block_size,
                blocks: blocks.to_vec(),
                sub_block_size: sbs,
            };
            let (peer, abort) = (&mut sub.peer, &self.abort);
            let want_len = want as usize * resync::HASH_LEN;
            self.rt.block_on(async {
                let fetch = async {
                    let mut stream = peer.block_hashes(req).await?;
                    let mut hashes = Vec::with_capacity(want_len);
                    while let Some(c) = stream.next().await.transpose()? {
                        if c.first_block as usize * resync::HASH_LEN != hashes.len()
                            || hashes.len() + c.hashes.len() > want_len
                        {
                            return Ok(None); // not an answer to this request: an older replica
                        }
                        hashes.extend_from_slice(&c.hashes);
                    }
                    Ok::<_, ReplicationError>((hashes.len() == want_len).then_some(hashes))
                };
                tokio::select! {
                    r = fetch => r,
                    _ = abort.cancelled() => Err(ReplicationError::StreamClosed),
                }
            })?
        };
        let ranges = match remote {
            Some(remote) => {
                let local = resync::hash_sub_blocks(file, size, block_size, sbs, blocks, resync::HASH_THREADS)
                    .map_err(|e| io_err("hashing sub-blocks".into(), e))?;
                resync::differing_sub_ranges(blocks, size, block_size, sbs, &local, &remote, resync::MERGED_EXTENT_MAX)
            }
            None => {
                if !sub.unsupported {
                    tracing::warn!("the replica does not answer sub-block hashes: sending whole blocks");
                    sub.unsupported = true;
                }
                (blocks.iter().map(|&b| resync::block_range(b, size, block_size)).collect(), want)
            }
        };
        let mut buf = vec![0u8; resync::MERGED_EXTENT_MAX.max(u64::from(block_size)) as usize];
        for (offset, len) in ranges.0 {
            let data = &mut buf[..len as usize];
            file.read_exact_at(data, offset).map_err(|e| io_err(format!("image read at {offset}"), e))?;
            self.write(disk_id, offset, data)?;
        }
        Ok(ranges.1)
    }
}
