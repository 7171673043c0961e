//! The peer listener: agent-to-agent gRPC over mutual TLS. Only certificates of this
//! vault pass the handshake (client certificate required); each RPC then checks the
//! caller's role. This is the **receiver** of replication: the replica host's side of
//! `sender`, writing into the replica store (`replica`).
//!
//! Every data RPC names a relationship; the caller must be a host of this vault *and*
//! that relationship's primary host, else PermissionDenied. Wire input is validated here
//! once (disk known, ranges inside the disk, decompressed sizes bounded) before it
//! reaches the store. Store calls block on file I/O and run on `spawn_blocking`.

use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::{PeerIdentity, Role};
use siterecovery_proto::v1;
use siterecovery_proto::v1::peer_server::{Peer, PeerServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::config::AgentFiles;
use crate::replica::{ExtentData, PointSpool, Replica, ReplicaError, ReplicaSet};

/// Largest decompressed data of one copy chunk or point extent accepted from the wire.
pub const MAX_WIRE_DATA: u64 = 4 << 20;
/// The initial copy is made durable and acknowledged after this many bytes written: each
/// acknowledgement costs an fdatasync and a state save inline in the stream, so not too
/// often; a broken connection re-sends at most this plus the sender's window.
pub const COPY_ACK_EVERY: u64 = 16 << 20;
/// Blocks per `BlockHashesChunk` (64 KiB of hashes).
pub const HASHES_PER_CHUNK: u64 = 4096;
/// Smallest block size a resync may ask hashes for.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Most blocks one sub-block hash request may list.
pub const MAX_SUB_HASH_BLOCKS: usize = 1 << 20;
/// Largest gRPC message accepted (chunks are ≤ ~3 MiB; headroom for protobuf framing).
const MAX_MESSAGE: usize = 8 << 20;

/// The caller's identity, when it is a host of this vault.
pub fn authorize_host<T>(req: &Request<T>, vault_id: &str) -> Result<PeerIdentity, Status> {
    let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("client certificate required"))?;
    let id = siterecovery_certs::tls::peer_identity(&certs).map_err(|e| Status::unauthenticated(e.to_string()))?;
    if id.vault_id.as_str() != vault_id {
        return Err(Status::permission_denied("certificate of another vault"));
    }
    if id.role != Role::Host {
        return Err(Status::permission_denied(format!("{id} is not a host")));
    }
    Ok(id)
}

/// The one mapping from replica store errors to gRPC statuses (the sender classifies
/// these codes: FailedPrecondition and DataLoss make it resynchronise).
fn replica_status(e: ReplicaError) -> Status {
    let msg = e.to_string();
    let status = match &e {
        ReplicaError::NotFound(_) => Status::not_found(msg),
        ReplicaError::Exists { .. } => Status::already_exists(msg),
        ReplicaError::OutOfRange { .. } => Status::invalid_argument(msg),
        ReplicaError::State(_) => Status::failed_precondition(msg),
        ReplicaError::Corrupt { .. } => Status::data_loss(msg),
        ReplicaError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) => {
            Status::resource_exhausted(msg)
        }
        ReplicaError::Io { .. } | ReplicaError::StateFile(_) => Status::unavailable(msg),
    };
    tracing::warn!("replica store refused: {e:#}");
    status
}

/// Runs a blocking store call.
async fn store<T: Send + 'static>(f: impl FnOnce() -> Result<T, Status> + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("store task: {e}")))?
}

/// Data of a chunk or extent as written to the image: decompressed (bounded) if needed,
/// and exactly `len` bytes.
fn wire_data(data: Vec<u8>, zstd: bool, len: u64) -> Result<Vec<u8>, Status> {
    if len > MAX_WIRE_DATA {
        return Err(Status::invalid_argument(format!("{len} bytes of data in one message (max {MAX_WIRE_DATA})")));
    }
    let raw = if zstd {
        zstd::bulk::decompress(&data, len as usize).map_err(|e| Status::invalid_argument(format!("zstd data: {e}")))?
    } else {
        data
    };
    if raw.len() as u64 != len {
        return Err(Status::invalid_argument(format!("data is {} bytes, announced {len}", raw.len())));
    }
    Ok(raw)
}

/// The Peer service of a host.
pub struct PeerService {
    files: Arc<AgentFiles>,
    replicas: Arc<ReplicaSet>,
}

impl PeerService {
    pub fn new(files: Arc<AgentFiles>, replicas: Arc<ReplicaSet>) -> Self {
        Self { files, replicas }
    }

    /// The replica of `relationship_id`, if `caller` is its primary host.
    fn replica_for(&self, caller: &PeerIdentity, relationship_id: &str) -> Result<Arc<Replica>, Status> {
        let replica = self
            .replicas
            .by_relationship(relationship_id)
            .ok_or_else(|| Status::not_found(format!("no replica of relationship {relationship_id:?} on this host")))?;
        let primary = &replica.spec().primary_host_id;
        if caller.id != *primary {
            tracing::warn!(caller = %caller.id, primary = %primary, relationship = %relationship_id, "refused replication data from a host that is not the primary");
            return Err(Status::permission_denied(format!(
                "host {} is not the primary of relationship {relationship_id}",
                caller.id
            )));
        }
        Ok(replica)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn ping(&self, req: Request<v1::PingRequest>) -> Result<Response<v1::PingResponse>, Status> {
        let caller = authorize_host(&req, &self.files.config.vault_id)?;
        Ok(Response::new(v1::PingResponse {
            host_id: self.files.config.host_id.clone(),
            host_name: self.files.config.host_name.clone(),
            caller: caller.uri(),
        }))
    }

    async fn copy_progress(
        &self,
        req: Request<v1::CopyProgressRequest>,
    ) -> Result<Response<v1::CopyProgressResponse>, Status> {
        let caller = authorize_host(&req, &self.files.config.vault_id)?;
        let replica = self.replica_for(&caller, &req.get_ref().relationship_id)?;
        let disks = store(move || Ok(replica.copy_progress())).await?;
        Ok(Response::new(v1::CopyProgressResponse {
            disks: disks
                .into_iter()
                .map(|d| v1::DiskProgress { disk_id: d.disk_id, acked_offset: d.acked_offset, complete: d.complete })
                .collect(),
        }))
    }

    type InitialCopyStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::CopyAck, Status>> + Send>>;

    async fn initial_copy(
        &self,
        req: Request<tonic::Streaming<v1::CopyChunk>>,
    ) -> Result<Response<Self::InitialCopyStream>, Status> {
        let caller = authorize_host(&req, &self.files.config.vault_id)?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty copy stream"))?;
        let replica = self.replica_for(&caller, &first.relationship_id)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            if let Err(status) = receive_copy(replica, first, inbound, &tx).await {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ship_point(
        &self,
        req: Request<tonic::Streaming<v1::PointChunk>>,
    ) -> Result<Response<v1::PointAck>, Status> {
        let caller = authorize_host(&req, &self.files.config.vault_id)?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("empty point stream"))?;
        let replica = self.replica_for(&caller, &first.relationship_id)?;
        let (relationship_id, seq) = (first.relationship_id.clone(), first.seq);
        if seq == 0 {
            return Err(Status::invalid_argument("point seq 0"));
        }
        let (created, app, resync) = (first.created_unix_ms, first.app_consistent, first.resync);
        let r = replica.clone();
        let mut spool = store(move || r.begin_point(seq, created, app, resync).map_err(replica_status)).await?;
        let mut next = Some(first);
        while let Some(chunk) = next {
            if chunk.seq != seq || (!chunk.relationship_id.is_empty() && chunk.relationship_id != relationship_id) {
                return Err(Status::invalid_argument("a point stream must carry one relationship and one seq"));
            }
            let commit = chunk.commit;
            if !chunk.extents.is_empty() {
                let extents = chunk.extents;
                spool = store(move || {
                    for e in extents {
                        push_extent(&mut spool, e)?;
                    }
                    Ok(spool)
                })
                .await?;
            }
            if commit {
                let info = store(move || spool.commit().map_err(replica_status)).await?;
                tracing::debug!(relationship = %relationship_id, seq = info.seq, point = %info.id, "point committed");
                return Ok(Response::new(v1::PointAck { seq: info.seq, point_id: info.id }));
            }
            next = inbound.message().await?;
        }
        // Dropping the spool discards it: nothing was applied.
        Err(Status::aborted(format!("point {seq} ended without commit: discarded")))
    }

    type BlockHashesStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::BlockHashesChunk, Status>> + Send>>;

    async fn block_hashes(
        &self,
        req: Request<v1::BlockHashesRequest>,
    ) -> Result<Response<Self::BlockHashesStream>, Status> {
        let caller = authorize_host(&req, &self.files.config.vault_id)?;
        let r = req.into_inner();
        let replica = self.replica_for(&caller, &r.relationship_id)?;
        if !(MIN_BLOCK_SIZE..=16 << 20).contains(&r.block_size) {
            return Err(Status::invalid_argument(format!("block size {} out of range", r.block_size)));
        }
        let size = replica
            .spec()
            .disks
            .iter()
            .find(|d| d.id == r.disk_id)
            .map(|d| d.size_bytes)
            .ok_or_else(|| Status::invalid_argument(format!("no disk {:?} in this replica", r.disk_id)))?;
        let blocks = size.div_ceil(u64::from(r.block_size));
        if !r.blocks.is_empty() {
            return sub_block_hashes(replica, r, blocks);
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut first = 0;
            while first < blocks {
                let count = HASHES_PER_CHUNK.min(blocks - first);
                let (rep, disk, bs) = (replica.clone(), r.disk_id.clone(), r.block_size);
                let msg = store(move || rep.block_hashes(&disk, bs, first, count).map_err(replica_status))
                    .await
                    .map(|h| v1::BlockHashesChunk { first_block: first, hashes: h.concat() });
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
                first += count;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type HashStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::BlockHashesChunk, Status>> + Send>>;

/// The second level of a resync compare: the sub-block hashes of the listed blocks of a
/// disk of `disk_blocks` blocks, in the order given, chunked like the block hashes.
fn sub_block_hashes(
    replica: Arc<Replica>,
    r: v1::BlockHashesRequest,
    disk_blocks: u64,
) -> Result<Response<HashStream>, Status> {
    let (bs, sbs) = (r.block_size, r.sub_block_size);
    if sbs < MIN_BLOCK_SIZE || sbs > bs || !bs.is_multiple_of(sbs) {
        return Err(Status::invalid_argument(format!("sub-block size {sbs} does not divide block size {bs}")));
    }
    if r.blocks.len() > MAX_SUB_HASH_BLOCKS {
        return Err(Status::invalid_argument(format!(
            "{} blocks listed, at most {MAX_SUB_HASH_BLOCKS} per request",
            r.blocks.len()
        )));
    }
    if let Some(b) = r.blocks.iter().find(|&&b| b >= disk_blocks) {
        return Err(Status::invalid_argument(format!("block {b} out of range (the disk has {disk_blocks})")));
    }
    let per_block = (bs / sbs) as u64;
    // Blocks per message: about HASHES_PER_CHUNK hashes each.
    let step = (HASHES_PER_CHUNK / per_block).max(1) as usize;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let blocks = Arc::new(r.blocks);
        let mut first = 0u64;
        for start in (0..blocks.len()).step_by(step) {
            let end = (start + step).min(blocks.len());
            let (rep, disk, list) = (replica.clone(), r.disk_id.clone(), blocks.clone());
            let msg = store(move || rep.sub_block_hashes(&disk, bs, sbs, &list[start..end]).map_err(replica_status))
                .await
                .map(|h| {
                    let at = first;
                    first += h.len() as u64;
                    v1::BlockHashesChunk { first_block: at, hashes: h.concat() }
                });
            let failed = msg.is_err();
            if tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

fn push_extent(spool: &mut PointSpool, e: v1::Extent) -> Result<(), Status> {
    match v1::ExtentKind::try_from(e.kind) {
        Ok(v1::ExtentKind::Data) => {
            let data = wire_data(e.data, e.zstd, e.length)?;
            spool.push(&e.disk_id, e.offset, ExtentData::Data(&data)).map_err(replica_status)
        }
        Ok(v1::ExtentKind::Zeroes) if e.data.is_empty() => {
            spool.push(&e.disk_id, e.offset, ExtentData::Zeroes(e.length)).map_err(replica_status)
        }
        _ => Err(Status::invalid_argument(format!("extent of kind {} with {} data bytes", e.kind, e.data.len()))),
    }
}

/// Where the copy of one disk stands in this stream.
struct CopyCursor {
    disk_id: String,
    size: u64,
    /// End of the highest range written (starts at the acknowledged offset).
    end: u64,
    /// Bytes written since the last acknowledgement.
    unacked: u64,
}

async fn receive_copy(
    replica: Arc<Replica>,
    first: v1::CopyChunk,
    mut inbound: tonic::Streaming<v1::CopyChunk>,
    tx: &mpsc::Sender<Result<v1::CopyAck, Status>>,
) -> Result<(), Status> {
    let relationship_id = first.relationship_id.clone();
    let r = replica.clone();
    let progress = store(move || Ok(r.copy_progress())).await?;
    let mut cur: Option<CopyCursor> = None;
    let mut next = Some(first);
    while let Some(chunk) = next {
        if !chunk.relationship_id.is_empty() && chunk.relationship_id != relationship_id {
            return Err(Status::invalid_argument("a copy stream must carry one relationship"));
        }
        if cur.as_ref().is_none_or(|c| c.disk_id != chunk.disk_id) {
            if let Some(c) = cur.take() {
                ack(&replica, &c, c.end, false, tx).await?;
            }
            let size = replica
                .spec()
                .disks
                .iter()
                .find(|d| d.id == chunk.disk_id)
                .map(|d| d.size_bytes)
                .ok_or_else(|| Status::invalid_argument(format!("no disk {:?} in this replica", chunk.disk_id)))?;
            let acked = progress.iter().find(|p| p.disk_id == chunk.disk_id).map_or(0, |p| p.acked_offset);
            cur = Some(CopyCursor { disk_id: chunk.disk_id.clone(), size, end: acked, unacked: 0 });
        }
        let Some(c) = cur.as_mut() else { return Err(Status::internal("no copy cursor")) };
        if chunk.offset < c.end {
            return Err(Status::invalid_argument(format!(
                "copy chunk of {} at {} is below the acknowledged/written offset {}",
                c.disk_id, chunk.offset, c.end
            )));
        }
        let len = if chunk.zstd { u64::from(chunk.raw_len) } else { chunk.data.len() as u64 };
        if chunk.offset.checked_add(len).is_none_or(|end| end > c.size) {
            return Err(Status::invalid_argument(format!(
                "copy chunk {}+{len} outside disk {} of {} bytes",
                chunk.offset, c.disk_id, c.size
            )));
        }
        if len > 0 {
            let data = wire_data(chunk.data, chunk.zstd, len)?;
            let (r, disk, offset) = (replica.clone(), c.disk_id.clone(), chunk.offset);
            store(move || r.write_initial(&disk, offset, &data).map_err(replica_status)).await?;
            c.end = chunk.offset + len;
            c.unacked += len;
        }
        if chunk.done {
            let size = c.size;
            ack(&replica, c, size, true, tx).await?;
            c.end = size;
            c.unacked = 0;
        } else if c.unacked >= COPY_ACK_EVERY {
            let end = c.end;
            ack(&replica, c, end, false, tx).await?;
            c.unacked = 0;
        }
        next = inbound.message().await?;
    }
    // The sender closed the stream: keep what arrived.
    if let Some(c) = cur
        && c.unacked > 0
    {
        ack(&replica, &c, c.end, false, tx).await?;
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
) -> Result<(), Status> {
    let (r, disk) = (replica.clone(), c.disk_id.clone());
    store(move || r.ack_initial(&disk, offset, complete).map_err(replica_status)).await?;
    if complete {
        tracing::info!(disk = %c.disk_id, "initial copy of disk complete");
    }
    // A sender that went away learns the offset from CopyProgress next time.
    let _ = tx.send(Ok(v1::CopyAck { disk_id: c.disk_id.clone(), acked_offset: offset, complete })).await;
    Ok(())
}

/// Serves the peer services on `listener` until `shutdown`. `replicas` is this host's
/// replica store (shared with the control channel, which prepares replicas).
pub async fn serve(
    files: Arc<AgentFiles>,
    replicas: Arc<ReplicaSet>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    siterecovery_certs::tls::install_crypto_provider();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&files.identity.cert_pem, &files.identity.key_pem))
        .client_ca_root(Certificate::from_pem(&files.ca_pem))
        .timeout(Duration::from_secs(10));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(siterecovery_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let mut builder = Server::builder().tls_config(tls)?;
    let peer = PeerServer::new(PeerService::new(files, replicas)).max_decoding_message_size(MAX_MESSAGE);
    let mut router = builder.add_service(peer);
    if let Ok(r) = reflection {
        router = router.add_service(r);
    }
    router
        .serve_with_incoming_shutdown(
            // Nagle off: tonic ignores its own tcp_nodelay for a custom incoming, and the
            // small HTTP/2 window updates and acks would wait, capping streams at ~40 MB/s.
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await
}
