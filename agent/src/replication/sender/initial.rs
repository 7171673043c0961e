//! The initial copy: the allocated ranges of each disk in 1 MiB chunks, at most
//! [`COPY_WINDOW`] raw bytes unacknowledged, resumed from the replica's acknowledged
//! offset after any break; and the wait for an offline copy's import.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use siterecovery_proto::v1;
use tokio::sync::{mpsc, watch};

use super::error::io_err;
use super::phase::Event;
use super::task::Task;
use super::transport::PeerTransport;
use super::{AbortOnDrop, COPY_CHUNK, COPY_WINDOW, ReplicationError, allocated_below, allocated_ranges, blocking};
use super::{maybe_compress, phase::Phase};
use crate::bandwidth::{Throttle, Traffic};
use crate::disk::BlockDevice;
use crate::hrl::DiskId;

/// One disk of the copy: id, image, size, allocated ranges, acknowledged offset, done.
type DiskPlan = (DiskId, PathBuf, u64, Vec<(u64, u64)>, u64, bool);

impl<T: PeerTransport> Task<T> {
    pub(super) async fn initial(&mut self) -> Result<(), ReplicationError> {
        let progress = self
            .peer
            .copy_progress(v1::CopyProgressRequest { relationship_id: self.p.relationship_id.to_string() })
            .await?;
        let disks = self.disks.clone();
        let layouts = blocking(move || {
            disks
                .iter()
                .map(|(id, d)| {
                    let file = File::open(d.image_path())
                        .map_err(|e| io_err(format!("image {}", d.image_path().display()), e))?;
                    let ranges = allocated_ranges(&file, 0, d.size())
                        .map_err(|e| io_err(format!("allocation map of {id}"), e))?;
                    Ok((id.clone(), d.image_path().to_owned(), d.size(), ranges))
                })
                .collect::<Result<Vec<_>, ReplicationError>>()
        })
        .await?;
        let mut plan: Vec<DiskPlan> = Vec::new();
        for (id, path, size, ranges) in layouts {
            let p = progress
                .disks
                .iter()
                .find(|p| p.disk_id == id.as_str())
                .ok_or_else(|| ReplicationError::Protocol(format!("the replica has no disk {id}")))?;
            plan.push((id, path, size, ranges, p.acked_offset, p.complete));
        }
        self.view.total = plan.iter().map(|(_, _, _, r, ..)| allocated_below(r, u64::MAX)).sum();
        self.view.done = plan
            .iter()
            .map(
                |(_, _, _, r, acked, complete)| {
                    if *complete { allocated_below(r, u64::MAX) } else { allocated_below(r, *acked) }
                },
            )
            .sum();
        self.report();
        let mut base = 0;
        for (id, path, size, ranges, acked, complete) in plan {
            let disk_total = allocated_below(&ranges, u64::MAX);
            if !complete {
                if acked > 0 {
                    tracing::info!(disk = %id, acked, "resuming the initial copy");
                }
                self.copy_disk(&id, &path, size, &ranges, acked, base).await?;
            } else if acked > 0 {
                // A restart after the last chunk's acknowledgement: nothing left to send.
                tracing::info!(disk = %id, acked, "resuming the initial copy: the replica already holds all of this disk");
            }
            base += disk_total;
            self.view.done = base;
        }
        Ok(())
    }

    async fn copy_disk(
        &mut self,
        id: &DiskId,
        path: &Path,
        size: u64,
        ranges: &[(u64, u64)],
        acked: u64,
        base_done: u64,
    ) -> Result<(), ReplicationError> {
        let file = Arc::new(File::open(path).map_err(|e| io_err(format!("image {}", path.display()), e))?);
        // Re-read the allocation from the acked offset: it may have grown since.
        let f2 = file.clone();
        let todo = blocking(move || allocated_ranges(&f2, acked, size).map_err(|e| io_err("allocation map".into(), e)))
            .await?;
        let (tx, rx) = mpsc::channel::<v1::CopyChunk>(4);
        let (ack_tx, ack_rx) = watch::channel(acked);
        let feed = CopyFeed {
            relationship_id: self.p.relationship_id.to_string(),
            disk_id: id.as_str().to_owned(),
            size,
            compress: self.p.settings.compression,
            wire: self.wire.clone(),
            throttle: self.throttle.clone(),
        };
        let feeder = tokio::spawn(feed.run(tx, ack_rx, file, todo));
        let _abort = AbortOnDrop(feeder.abort_handle());
        let mut acks = self.peer.initial_copy(rx).await?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                msg = acks.next() => match msg.transpose()? {
                    Some(ack) => {
                        if ack.disk_id != id.as_str() {
                            return Err(ReplicationError::Protocol(format!("ack for disk {} while copying {id}", ack.disk_id)));
                        }
                        let _ = ack_tx.send(ack.acked_offset);
                        crate::faults::point(crate::faults::INITIAL_CHUNK_ACK)
                            .map_err(|e| io_err(format!("initial copy of {id}"), e))?;
                        self.view.done = base_done + allocated_below(ranges, if ack.complete { u64::MAX } else { ack.acked_offset });
                        if ack.complete {
                            return Ok(());
                        }
                    }
                    None => {
                        // The replica ended the stream: the feeder's error says why, if any.
                        let r = tokio::time::timeout(Duration::from_secs(1), feeder).await;
                        return match r {
                            Ok(Ok(Err(e))) if !matches!(e, ReplicationError::StreamClosed) => Err(e),
                            _ => Err(tonic::Status::aborted("the replica ended the copy before it was complete").into()),
                        };
                    }
                },
                _ = tick.tick() => self.report(),
            }
        }
    }

    /// Offline initial replication: whether the replica host imported the export (the
    /// logs since the export wait, in the open log, until then).
    pub(super) async fn import_done(&mut self) -> Result<bool, ReplicationError> {
        debug_assert_eq!(self.phase, Phase::WaitingForImport);
        let progress = self
            .peer
            .copy_progress(v1::CopyProgressRequest { relationship_id: self.p.relationship_id.to_string() })
            .await?;
        if progress.disks.is_empty() || !progress.disks.iter().all(|d| d.complete) {
            self.view.detail = "waiting for the initial copy to be imported on the replica host".into();
            return Ok(false);
        }
        tracing::info!("the replica host imported the initial copy: shipping the writes made since the export");
        self.apply(Event::ImportDone)?;
        self.persist()?;
        self.view.detail.clear();
        Ok(true)
    }
}

/// Feeds the chunks of one disk's initial copy, keeping at most [`COPY_WINDOW`] raw
/// bytes unacknowledged.
struct CopyFeed {
    relationship_id: String,
    disk_id: String,
    size: u64,
    compress: bool,
    wire: Arc<AtomicU64>,
    throttle: Throttle,
}

impl CopyFeed {
    async fn run(
        self,
        tx: mpsc::Sender<v1::CopyChunk>,
        mut acked: watch::Receiver<u64>,
        file: Arc<File>,
        ranges: Vec<(u64, u64)>,
    ) -> Result<(), ReplicationError> {
        let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
        let mut unacked = 0u64;
        for (start, end) in ranges {
            let mut off = start;
            while off < end {
                let len = COPY_CHUNK.min(end - off);
                loop {
                    let a = *acked.borrow_and_update();
                    while let Some(&(e, l)) = inflight.front() {
                        if e > a {
                            break;
                        }
                        unacked -= l;
                        inflight.pop_front();
                    }
                    if unacked + len <= COPY_WINDOW {
                        break;
                    }
                    acked.changed().await.map_err(|_| ReplicationError::StreamClosed)?;
                }
                let (f, compress) = (file.clone(), self.compress);
                let (data, zstd) = blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, off).map_err(|e| io_err(format!("image read at {off}"), e))?;
                    Ok(maybe_compress(&buf, compress))
                })
                .await?;
                self.throttle.acquire(data.len() as u64, Traffic::Bulk).await;
                self.wire.fetch_add(data.len() as u64, Ordering::Relaxed);
                let chunk = v1::CopyChunk {
                    relationship_id: self.relationship_id.clone(),
                    disk_id: self.disk_id.clone(),
                    offset: off,
                    data,
                    zstd,
                    raw_len: len as u32,
                    done: false,
                };
                tx.send(chunk).await.map_err(|_| ReplicationError::StreamClosed)?;
                inflight.push_back((off + len, len));
                unacked += len;
                off += len;
            }
        }
        let done = v1::CopyChunk {
            relationship_id: self.relationship_id.clone(),
            disk_id: self.disk_id.clone(),
            offset: self.size,
            done: true,
            ..Default::default()
        };
        tx.send(done).await.map_err(|_| ReplicationError::StreamClosed)
    }
}
