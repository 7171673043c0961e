//! Shipping one point: a producer on a blocking thread pushes extents into a
//! [`ChunkSink`] (batched into messages, compressed, wire bytes counted) while the task
//! streams them to the replica and waits for its acknowledgement.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use siterecovery_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::task::Task;
use super::transport::PeerTransport;
use super::{EXTENT_MAX, POINT_MESSAGE_BYTES, ReplicationError, maybe_compress, now_ms};
use crate::bandwidth::{Throttle, Traffic};
use crate::hrl::{self, CoalescedItem};

impl<T: PeerTransport> Task<T> {
    /// The header of a new resync-kind point (a resynchronisation, or a catch-up from the
    /// dirty bitmap): its sequence number taken and the state saved before anything ships.
    pub(super) fn new_resync_point(&mut self) -> Result<v1::PointChunk, ReplicationError> {
        let seq = self.st.next_seq;
        self.st.next_seq += 1;
        self.persist()?;
        Ok(v1::PointChunk {
            relationship_id: self.p.relationship_id.to_string(),
            seq,
            created_unix_ms: now_ms(),
            resync: true,
            ..Default::default()
        })
    }

    /// Ships one point: `produce` pushes its extents (on a blocking thread); the point is
    /// committed when it returns Ok. The producer's own error wins over the RPC's.
    pub(super) async fn ship<R: Send + 'static>(
        &mut self,
        meta: v1::PointChunk,
        traffic: Traffic,
        produce: impl FnOnce(&mut ChunkSink) -> Result<R, ReplicationError> + Send + 'static,
    ) -> Result<(v1::PointAck, R), ReplicationError> {
        let (tx, rx) = mpsc::channel(4);
        let abort = CancellationToken::new();
        let _guard = abort.clone().drop_guard();
        let mut sink = ChunkSink {
            tx,
            meta,
            batch: Vec::new(),
            batch_bytes: 0,
            compress: self.p.settings.compression,
            wire: self.wire.clone(),
            throttle: (self.throttle.clone(), traffic),
            abort: abort.clone(),
            rt: tokio::runtime::Handle::current(),
        };
        let producer = tokio::task::spawn_blocking(move || {
            let out = produce(&mut sink)?;
            sink.commit()?;
            Ok::<R, ReplicationError>(out)
        });
        let mut peer = self.peer.clone();
        let call = peer.ship_point(rx);
        tokio::pin!(call);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let resp = loop {
            tokio::select! {
                r = &mut call => break r,
                _ = tick.tick() => {
                    if self.view.total > 0 {
                        self.view.done = self.progress.load(Ordering::Relaxed);
                        self.report();
                    }
                }
            }
        };
        if resp.is_err() {
            abort.cancel();
        }
        let produced = producer.await.map_err(|e| ReplicationError::Protocol(format!("point producer: {e}")))?;
        match (resp, produced) {
            (_, Err(e)) if !matches!(e, ReplicationError::StreamClosed) => Err(e),
            (Err(e), _) => Err(e),
            (Ok(ack), Ok(out)) => Ok((ack, out)),
            (Ok(_), Err(_)) => Err(ReplicationError::Protocol("the replica acknowledged an incomplete point".into())),
        }
    }
}

/// The producer side of a `ShipPoint` stream (runs on a blocking thread).
pub struct ChunkSink {
    tx: mpsc::Sender<v1::PointChunk>,
    /// Point fields repeated in every message.
    meta: v1::PointChunk,
    batch: Vec<v1::Extent>,
    batch_bytes: usize,
    compress: bool,
    wire: Arc<AtomicU64>,
    throttle: (Throttle, Traffic),
    pub(super) abort: CancellationToken,
    pub(super) rt: tokio::runtime::Handle,
}

impl ChunkSink {
    /// Data at `offset`, split into extents of at most [`EXTENT_MAX`].
    pub(super) fn write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), ReplicationError> {
        let mut at = offset;
        for piece in data.chunks(EXTENT_MAX) {
            let (bytes, zstd) = maybe_compress(piece, self.compress);
            self.wire.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.push(v1::Extent {
                disk_id: disk.to_owned(),
                offset: at,
                kind: v1::ExtentKind::Data as i32,
                length: piece.len() as u64,
                data: bytes,
                zstd,
            })?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    fn zeroes(&mut self, disk: &str, offset: u64, len: u64) -> Result<(), ReplicationError> {
        self.push(v1::Extent {
            disk_id: disk.to_owned(),
            offset,
            kind: v1::ExtentKind::Zeroes as i32,
            length: len,
            ..Default::default()
        })
    }

    /// The coalesced extents of one sealed log. A trim is shipped as zeroes: the tracker
    /// zeroes trimmed ranges of the image too.
    pub(super) fn log(&mut self, disk: &str, seq: u64, path: &Path) -> Result<(), ReplicationError> {
        let broken = |source| ReplicationError::BrokenLog { disk: disk.to_owned(), seq, source };
        let mut log = hrl::Coalesced::open(path).map_err(broken)?;
        for item in log.items() {
            match item.map_err(broken)? {
                CoalescedItem::Write { offset, data } => self.write(disk, offset, &data)?,
                CoalescedItem::Zeroes { offset, len } | CoalescedItem::Trim { offset, len } => {
                    self.zeroes(disk, offset, len)?
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, e: v1::Extent) -> Result<(), ReplicationError> {
        self.batch_bytes += e.data.len() + 64;
        self.batch.push(e);
        if self.batch_bytes >= POINT_MESSAGE_BYTES || self.batch.len() >= 8192 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ReplicationError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut msg = self.meta.clone();
        msg.extents = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.send(msg)
    }

    fn commit(mut self) -> Result<(), ReplicationError> {
        self.flush()?;
        let mut msg = self.meta.clone();
        msg.commit = true;
        self.send(msg)
    }

    fn send(&self, msg: v1::PointChunk) -> Result<(), ReplicationError> {
        let (tx, abort) = (&self.tx, &self.abort);
        let bytes: u64 = msg.extents.iter().map(|e| e.data.len() as u64).sum();
        let (throttle, traffic) = &self.throttle;
        self.rt.block_on(async {
            tokio::select! {
                _ = throttle.acquire(bytes, *traffic) => {}
                _ = abort.cancelled() => return Err(ReplicationError::StreamClosed),
            }
            tokio::select! {
                r = tx.send(msg) => r.map_err(|_| ReplicationError::StreamClosed),
                _ = abort.cancelled() => Err(ReplicationError::StreamClosed),
            }
        })
    }
}
