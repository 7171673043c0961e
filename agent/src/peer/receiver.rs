//! The receiver of replication: the replica host's side of `sender`, writing validated
//! Peer requests ([`super::wire`]) into the replica store (`replica`).
//!
//! Every data request names a relationship; the caller must be that relationship's
//! primary host, else PermissionDenied. Rules that need the replica (the disk exists,
//! ranges inside it) are checked here before the store is called. Store calls block on
//! file I/O and run on `spawn_blocking`.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use siterecovery_certs::PeerIdentity;
use siterecovery_proto::model::{DiskId, RelationshipId};
use siterecovery_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use super::error::PeerError;
use super::wire::{self, BlockHashes, CopyChunk, CopyProgress, ExtentBody, PointChunk};
use crate::replica::{ExtentData, PointSpool, Replica, ReplicaSet};
use siterecovery_proto::model::WireError;

/// The initial copy is made durable and acknowledged after this many bytes written: each
/// acknowledgement costs an fdatasync and a state save inline in the stream, so not too
/// often; a broken connection re-sends at most this plus the sender's window.
pub const COPY_ACK_EVERY: u64 = 16 << 20;
/// Blocks per `BlockHashesChunk` (64 KiB of hashes).
pub const HASHES_PER_CHUNK: u64 = 4096;

/// Runs a blocking store call.
async fn store<T: Send + 'static>(f: impl FnOnce() -> Result<T, PeerError> + Send + 'static) -> Result<T, PeerError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| PeerError::Internal(format!("store task: {e}")))?
}

/// The next message of an inbound stream, converted.
async fn next<W, T, S>(inbound: &mut S) -> Result<Option<T>, PeerError>
where
    S: Stream<Item = Result<W, Status>> + Unpin,
    T: TryFrom<W, Error = WireError>,
{
    match inbound.next().await {
        None => Ok(None),
        Some(m) => Ok(Some(T::try_from(m?)?)),
    }
}

/// Size of disk `disk` of `replica`.
fn disk_size(replica: &Replica, disk: &DiskId) -> Result<u64, PeerError> {
    replica
        .spec()
        .disks
        .iter()
        .find(|d| d.id == disk.as_str())
        .map(|d| d.size_bytes)
        .ok_or_else(|| PeerError::invalid(format!("no disk {disk:?} in this replica")))
}

pub type HashStream = std::pin::Pin<Box<dyn Stream<Item = Result<v1::BlockHashesChunk, Status>> + Send>>;
pub type AckStream = std::pin::Pin<Box<dyn Stream<Item = Result<v1::CopyAck, Status>> + Send>>;

/// The replica store as the peer service sees it.
pub struct Receiver {
    replicas: Arc<ReplicaSet>,
}

impl Receiver {
    pub fn new(replicas: Arc<ReplicaSet>) -> Self {
        Self { replicas }
    }

    /// The replica of `relationship`, if `caller` is its primary host.
    fn replica_for(&self, caller: &PeerIdentity, relationship: &RelationshipId) -> Result<Arc<Replica>, PeerError> {
        let replica = self
            .replicas
            .by_relationship(relationship)
            .ok_or_else(|| PeerError::NotFound(format!("no replica of relationship {relationship} on this host")))?;
        let primary = &replica.spec().primary_host_id;
        if caller.id != *primary {
            tracing::warn!(caller = %caller.id, primary = %primary, relationship = %relationship, "refused replication data from a host that is not the primary");
            return Err(PeerError::Denied(format!(
                "host {} is not the primary of relationship {relationship}",
                caller.id
            )));
        }
        Ok(replica)
    }

    pub async fn copy_progress(
        &self,
        caller: &PeerIdentity,
        r: CopyProgress,
    ) -> Result<v1::CopyProgressResponse, PeerError> {
        let replica = self.replica_for(caller, &r.relationship)?;
        let disks = store(move || Ok(replica.copy_progress())).await?;
        Ok(v1::CopyProgressResponse {
            disks: disks
                .into_iter()
                .map(|d| v1::DiskProgress { disk_id: d.disk_id, acked_offset: d.acked_offset, complete: d.complete })
                .collect(),
        })
    }

    /// Starts receiving an initial copy; the acknowledgements stream back.
    pub async fn initial_copy<S>(&self, caller: &PeerIdentity, mut inbound: S) -> Result<AckStream, PeerError>
    where
        S: Stream<Item = Result<v1::CopyChunk, Status>> + Unpin + Send + 'static,
    {
        let first: CopyChunk = next(&mut inbound).await?.ok_or_else(|| PeerError::invalid("empty copy stream"))?;
        let relationship =
            first.relationship.clone().ok_or_else(|| WireError::missing("copy_chunk.relationship_id"))?;
        let replica = self.replica_for(caller, &relationship)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            if let Err(e) = receive_copy(replica, relationship, first, inbound, &tx).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    /// Receives one point: spools it, applies it at commit.
    pub async fn ship_point<S>(&self, caller: &PeerIdentity, mut inbound: S) -> Result<v1::PointAck, PeerError>
    where
        S: Stream<Item = Result<v1::PointChunk, Status>> + Unpin,
    {
        let first: PointChunk = next(&mut inbound).await?.ok_or_else(|| PeerError::invalid("empty point stream"))?;
        let relationship =
            first.relationship.clone().ok_or_else(|| WireError::missing("point_chunk.relationship_id"))?;
        let replica = self.replica_for(caller, &relationship)?;
        let seq = first.seq;
        let (created, app, resync) = (first.created_unix_ms, first.app_consistent, first.resync);
        let r = replica.clone();
        let mut spool = store(move || r.begin_point(seq.0, created, app, resync).map_err(PeerError::from)).await?;
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            if c.seq != seq || c.relationship.as_ref().is_some_and(|r| *r != relationship) {
                return Err(PeerError::invalid("a point stream must carry one relationship and one seq"));
            }
            if !c.extents.is_empty() {
                let extents = c.extents;
                spool = store(move || {
                    for e in extents {
                        push_extent(&mut spool, e)?;
                    }
                    Ok(spool)
                })
                .await?;
            }
            if c.commit {
                let info = store(move || spool.commit().map_err(PeerError::from)).await?;
                tracing::debug!(relationship = %relationship, seq = info.seq, point = %info.id, "point committed");
                return Ok(v1::PointAck { seq: info.seq, point_id: info.id });
            }
            chunk = next(&mut inbound).await?;
        }
        // Dropping the spool discards it: nothing was applied.
        Err(PeerError::Aborted(format!("point {seq} ended without commit: discarded")))
    }

    /// The block hashes (or, with [`wire::SubBlocks`], the sub-block hashes) of a disk.
    pub async fn block_hashes(&self, caller: &PeerIdentity, r: BlockHashes) -> Result<HashStream, PeerError> {
        let replica = self.replica_for(caller, &r.relationship)?;
        let size = disk_size(&replica, &r.disk)?;
        let blocks = size.div_ceil(u64::from(r.block_size));
        if r.sub.is_some() {
            return sub_block_hashes(replica, r, blocks);
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut first = 0;
            while first < blocks {
                let count = HASHES_PER_CHUNK.min(blocks - first);
                let (rep, disk, bs) = (replica.clone(), r.disk.clone(), r.block_size);
                let msg = store(move || rep.block_hashes(disk.as_str(), bs, first, count).map_err(PeerError::from))
                    .await
                    .map(|h| v1::BlockHashesChunk { first_block: first, hashes: h.concat() });
                let failed = msg.is_err();
                if tx.send(msg.map_err(Status::from)).await.is_err() || failed {
                    return;
                }
                first += count;
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// The second level of a resync compare: the sub-block hashes of the listed blocks of a
/// disk of `disk_blocks` blocks, in the order given, chunked like the block hashes.
fn sub_block_hashes(replica: Arc<Replica>, r: BlockHashes, disk_blocks: u64) -> Result<HashStream, PeerError> {
    let Some(sub) = r.sub else { return Err(PeerError::Internal("no sub-blocks".into())) };
    let (bs, sbs) = (r.block_size, sub.sub_block_size);
    if let Some(b) = sub.blocks.iter().find(|&&b| b >= disk_blocks) {
        return Err(PeerError::invalid(format!("block {b} out of range (the disk has {disk_blocks})")));
    }
    let per_block = (bs / sbs) as u64;
    // Blocks per message: about HASHES_PER_CHUNK hashes each.
    let step = (HASHES_PER_CHUNK / per_block).max(1) as usize;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let blocks = Arc::new(sub.blocks);
        let mut first = 0u64;
        for start in (0..blocks.len()).step_by(step) {
            let end = (start + step).min(blocks.len());
            let (rep, disk, list) = (replica.clone(), r.disk.clone(), blocks.clone());
            let msg =
                store(move || rep.sub_block_hashes(disk.as_str(), bs, sbs, &list[start..end]).map_err(PeerError::from))
                    .await
                    .map(|h| {
                        let at = first;
                        first += h.len() as u64;
                        v1::BlockHashesChunk { first_block: at, hashes: h.concat() }
                    });
            let failed = msg.is_err();
            if tx.send(msg.map_err(Status::from)).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

fn push_extent(spool: &mut PointSpool, e: wire::Extent) -> Result<(), PeerError> {
    match e.body {
        ExtentBody::Data(data) => {
            let data = data.into_raw()?;
            spool.push(&e.disk, e.offset, ExtentData::Data(&data)).map_err(PeerError::from)
        }
        ExtentBody::Zeroes(n) => spool.push(&e.disk, e.offset, ExtentData::Zeroes(n)).map_err(PeerError::from),
    }
}

/// Where the copy of one disk stands in this stream.
struct CopyCursor {
    disk: DiskId,
    size: u64,
    /// End of the highest range written (starts at the acknowledged offset).
    end: u64,
    /// Bytes written since the last acknowledgement.
    unacked: u64,
}

async fn receive_copy<S>(
    replica: Arc<Replica>,
    relationship: RelationshipId,
    first: CopyChunk,
    mut inbound: S,
    tx: &mpsc::Sender<Result<v1::CopyAck, Status>>,
) -> Result<(), PeerError>
where
    S: Stream<Item = Result<v1::CopyChunk, Status>> + Unpin,
{
    let r = replica.clone();
    let progress = store(move || Ok(r.copy_progress())).await?;
    let mut cur: Option<CopyCursor> = None;
    let mut chunk = Some(first);
    while let Some(c) = chunk {
        if c.relationship.as_ref().is_some_and(|r| *r != relationship) {
            return Err(PeerError::invalid("a copy stream must carry one relationship"));
        }
        if cur.as_ref().is_none_or(|cur| cur.disk != c.disk) {
            if let Some(prev) = cur.take() {
                ack(&replica, &prev, prev.end, false, tx).await?;
            }
            let size = disk_size(&replica, &c.disk)?;
            let acked = progress.iter().find(|p| p.disk_id == c.disk.as_str()).map_or(0, |p| p.acked_offset);
            cur = Some(CopyCursor { disk: c.disk.clone(), size, end: acked, unacked: 0 });
        }
        let Some(k) = cur.as_mut() else { return Err(PeerError::Internal("no copy cursor".into())) };
        if c.offset < k.end {
            return Err(PeerError::invalid(format!(
                "copy chunk of {} at {} is below the acknowledged/written offset {}",
                k.disk, c.offset, k.end
            )));
        }
        let len = c.data.len();
        if c.offset.checked_add(len).is_none_or(|end| end > k.size) {
            return Err(PeerError::invalid(format!(
                "copy chunk {}+{len} outside disk {} of {} bytes",
                c.offset, k.disk, k.size
            )));
        }
        if len > 0 {
            let data = c.data.into_raw()?;
            let (r, disk, offset) = (replica.clone(), k.disk.clone(), c.offset);
            store(move || r.write_initial(&disk, offset, &data).map_err(PeerError::from)).await?;
            k.end = c.offset + len;
            k.unacked += len;
        }
        if c.done {
            let size = k.size;
            ack(&replica, k, size, true, tx).await?;
            k.end = size;
            k.unacked = 0;
        } else if k.unacked >= COPY_ACK_EVERY {
            let end = k.end;
            ack(&replica, k, end, false, tx).await?;
            k.unacked = 0;
        }
        chunk = next(&mut inbound).await?;
    }
    // The sender closed the stream: keep what arrived.
    if let Some(k) = cur
        && k.unacked > 0
    {
        ack(&replica, &k, k.end, false, tx).await?;
    }
    Ok(())
}

/// Makes the copy durable up to `offset` and tells the sender.
async fn ack(
    replica: &Arc<Replica>,
    c: &CopyCursor,
    offset: u64,
    complete: bool,
    tx: &mpsc::Sender<Result<v1::CopyAck, Status>>,
) -> Result<(), PeerError> {
    let (r, disk) = (replica.clone(), c.disk.clone());
    store(move || r.ack_initial(&disk, offset, complete).map_err(PeerError::from)).await?;
    if complete {
        tracing::info!(disk = %c.disk, "initial copy of disk complete");
    }
    // A sender that went away learns the offset from CopyProgress next time.
    let _ = tx.send(Ok(v1::CopyAck { disk_id: c.disk.to_string(), acked_offset: offset, complete })).await;
    Ok(())
}
