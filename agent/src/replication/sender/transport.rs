//! What the sender needs of the replica host ([`PeerTransport`]): the `Peer` service's
//! calls, connected lazily and dropped after an error. [`GrpcPeer`] is the real one (the
//! mutual-TLS gRPC client); tests use a fake replica in memory.
//!
//! Every call of the sender (initial copy, copy progress, points, the resync's block
//! hashes) goes through the one connection of a [`GrpcPeer`], whose handshake requires
//! the relationship's replica host id in the server's certificate
//! (`Expect::Host`): what the peer says about itself is never asked.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use siterecovery_certs::live::Expect;
use siterecovery_proto::model::HostId;
use siterecovery_proto::v1;
use siterecovery_proto::v1::peer_client::PeerClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::error::ReplicationError;
use crate::config::AgentFiles;

/// A stream of answers from the replica host.
pub type Answers<T> = Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// The replica host as the sender sees it. Cloning shares the connection.
pub trait PeerTransport: Clone + Send + Sync + 'static {
    /// Forgets the connection (after an error: the next call connects again).
    fn reset(&mut self);
    /// How far the initial copy of each disk got.
    fn copy_progress(
        &mut self,
        req: v1::CopyProgressRequest,
    ) -> impl Future<Output = Result<v1::CopyProgressResponse, ReplicationError>> + Send;
    /// The initial copy of one disk: `chunks` out, acknowledgements back.
    fn initial_copy(
        &mut self,
        chunks: mpsc::Receiver<v1::CopyChunk>,
    ) -> impl Future<Output = Result<Answers<v1::CopyAck>, ReplicationError>> + Send;
    /// One point, ended by a chunk with `commit`; the answer once it is durable.
    fn ship_point(
        &mut self,
        chunks: mpsc::Receiver<v1::PointChunk>,
    ) -> impl Future<Output = Result<v1::PointAck, ReplicationError>> + Send;
    /// Block (or sub-block) hashes of a replica disk.
    fn block_hashes(
        &mut self,
        req: v1::BlockHashesRequest,
    ) -> impl Future<Output = Result<Answers<v1::BlockHashesChunk>, ReplicationError>> + Send;
}

/// The replica host's `Peer` service over mutual TLS.
#[derive(Clone)]
pub struct GrpcPeer {
    address: String,
    host_id: HostId,
    files: Arc<AgentFiles>,
    /// Shared by the clones (the resync's sub-block requests use the same connection).
    client: Arc<Mutex<Option<PeerClient<Channel>>>>,
}

impl GrpcPeer {
    /// The peer at `address`, which must prove to be host `host_id` (by its certificate).
    pub fn new(address: String, host_id: HostId, files: Arc<AgentFiles>) -> Self {
        GrpcPeer { address, host_id, files, client: Arc::default() }
    }

    async fn client(&mut self) -> Result<PeerClient<Channel>, ReplicationError> {
        if let Some(c) = self.client.lock().ok().and_then(|c| c.clone()) {
            return Ok(c);
        }
        let expect = Expect::Host(self.host_id.to_string());
        let channel = crate::peer::connect(&self.address, expect, &self.files).await.map_err(|e| match e {
            crate::peer::ConnectError::WrongPeer { address, found } => {
                ReplicationError::WrongPeer { address, expected: self.host_id.to_string(), found }
            }
            crate::peer::ConnectError::Failed { address, reason } => ReplicationError::Connect { address, reason },
        })?;
        let client = PeerClient::new(channel);
        if let Ok(mut c) = self.client.lock() {
            *c = Some(client.clone());
        }
        Ok(client)
    }
}

impl GrpcPeer {
    /// A call's error. The channel reconnects by itself after the connection broke, so
    /// a replica refused at that handshake shows here, as an Unavailable status.
    fn refused(&self, s: tonic::Status) -> ReplicationError {
        match crate::peer::client::wrong_peer(&s) {
            Some(found) => {
                ReplicationError::WrongPeer { address: self.address.clone(), expected: self.host_id.to_string(), found }
            }
            None => ReplicationError::Rpc(s),
        }
    }
}

impl PeerTransport for GrpcPeer {
    fn reset(&mut self) {
        if let Ok(mut c) = self.client.lock() {
            *c = None;
        }
    }

    async fn copy_progress(
        &mut self,
        req: v1::CopyProgressRequest,
    ) -> Result<v1::CopyProgressResponse, ReplicationError> {
        let r = self.client().await?.copy_progress(req).await;
        Ok(r.map_err(|s| self.refused(s))?.into_inner())
    }

    async fn initial_copy(
        &mut self,
        chunks: mpsc::Receiver<v1::CopyChunk>,
    ) -> Result<Answers<v1::CopyAck>, ReplicationError> {
        let r = self.client().await?.initial_copy(ReceiverStream::new(chunks)).await;
        Ok(r.map_err(|s| self.refused(s))?.into_inner().boxed())
    }

    async fn ship_point(&mut self, chunks: mpsc::Receiver<v1::PointChunk>) -> Result<v1::PointAck, ReplicationError> {
        let r = self.client().await?.ship_point(ReceiverStream::new(chunks)).await;
        Ok(r.map_err(|s| self.refused(s))?.into_inner())
    }

    async fn block_hashes(
        &mut self,
        req: v1::BlockHashesRequest,
    ) -> Result<Answers<v1::BlockHashesChunk>, ReplicationError> {
        let r = self.client().await?.block_hashes(req).await;
        Ok(r.map_err(|s| self.refused(s))?.into_inner().boxed())
    }
}
