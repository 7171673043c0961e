//! The peer listener: agent-to-agent gRPC over mutual TLS. Only unrevoked, unexpired
//! certificates of this vault pass the handshake (client certificate required; the
//! revocation list and this host's own certificate are read at every handshake, so a
//! revocation pushed by the provider or a renewal applies to the next connection);
//! each RPC then checks the caller's role, converts the request into domain values
//! ([`wire`]) and hands them to the [`receiver`] (the replica host's side of `sender`).
//! The mTLS client every host uses to reach another one is [`client::connect`].
//!
//! Order in every RPC: authenticate (a host of this vault), convert (an invalid field is
//! InvalidArgument naming it, before any lookup or file), then authorize (the caller is
//! the relationship's primary host) and act.

pub mod client;
mod error;
pub mod receiver;
#[cfg(test)]
mod tests;
pub mod wire;

use std::sync::Arc;

use siterecovery_certs::tls::ClientAuth;
use siterecovery_certs::transport::{self, AcceptLimits};
use siterecovery_certs::{PeerIdentity, Role};
use siterecovery_proto::lifecycle::{HEALTH_DESCRIPTOR_SET, HealthServer, HealthService};
use siterecovery_proto::v1;
use siterecovery_proto::v1::peer_server::{Peer, PeerServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

pub use client::{ConnectError, connect};
pub use error::PeerError;
pub use receiver::{COPY_ACK_EVERY, HASHES_PER_CHUNK, Receiver};
pub use wire::{MAX_SUB_HASH_BLOCKS, MAX_WIRE_DATA, MIN_BLOCK_SIZE};

use crate::config::AgentFiles;
use crate::replica::ReplicaSet;

/// Largest gRPC message accepted (chunks are ≤ ~3 MiB; headroom for protobuf framing).
const MAX_MESSAGE: usize = 8 << 20;

/// The caller's identity, when it is a host of this vault whose certificate is not
/// revoked. (The handshake refused a revoked certificate already; this catches a
/// connection opened before the revocation arrived.)
pub fn authorize_host<T>(req: &Request<T>, files: &AgentFiles) -> Result<PeerIdentity, PeerError> {
    let certs = req.peer_certs().ok_or_else(|| PeerError::Unauthenticated("client certificate required".into()))?;
    let id = siterecovery_certs::tls::peer_identity(&certs).map_err(|e| PeerError::Unauthenticated(e.to_string()))?;
    let serial = certs.first().map(|c| siterecovery_certs::live::serial_of_der(c.as_ref()));
    if let Some(Ok(serial)) = serial
        && files.trust.revoked.is_revoked(&serial)
    {
        return Err(PeerError::Unauthenticated(format!("the certificate of {id} (serial {serial}) is revoked")));
    }
    if id.vault_id.as_str() != files.config.vault_id {
        return Err(PeerError::Denied("certificate of another vault".into()));
    }
    if id.role != Role::Host {
        return Err(PeerError::Denied(format!("{id} is not a host")));
    }
    Ok(id)
}

/// The Peer service of a host.
pub struct PeerService {
    files: Arc<AgentFiles>,
    receiver: Receiver,
}

impl PeerService {
    pub fn new(files: Arc<AgentFiles>, replicas: Arc<ReplicaSet>) -> Self {
        Self { files, receiver: Receiver::new(replicas) }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn ping(&self, req: Request<v1::PingRequest>) -> Result<Response<v1::PingResponse>, Status> {
        let caller = authorize_host(&req, &self.files)?;
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
        let caller = authorize_host(&req, &self.files)?;
        let r = wire::CopyProgress::try_from(req.get_ref())?;
        Ok(Response::new(self.receiver.copy_progress(&caller, r).await?))
    }

    type InitialCopyStream = receiver::AckStream;

    async fn initial_copy(
        &self,
        req: Request<tonic::Streaming<v1::CopyChunk>>,
    ) -> Result<Response<Self::InitialCopyStream>, Status> {
        let caller = authorize_host(&req, &self.files)?;
        Ok(Response::new(self.receiver.initial_copy(&caller, req.into_inner()).await?))
    }

    async fn ship_point(
        &self,
        req: Request<tonic::Streaming<v1::PointChunk>>,
    ) -> Result<Response<v1::PointAck>, Status> {
        let caller = authorize_host(&req, &self.files)?;
        Ok(Response::new(self.receiver.ship_point(&caller, req.into_inner()).await?))
    }

    type BlockHashesStream = receiver::HashStream;

    async fn block_hashes(
        &self,
        req: Request<v1::BlockHashesRequest>,
    ) -> Result<Response<Self::BlockHashesStream>, Status> {
        let caller = authorize_host(&req, &self.files)?;
        let r = wire::BlockHashes::try_from(req.into_inner())?;
        Ok(Response::new(self.receiver.block_hashes(&caller, r).await?))
    }
}

/// Why the peer listener could not run.
#[derive(Debug, thiserror::Error)]
pub enum PeerServeError {
    #[error("peer listener TLS: {0}")]
    Tls(#[from] siterecovery_certs::CertError),
    #[error("peer listener: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the peer services on `listener` until `shutdown`. `replicas` is this host's
/// replica store (shared with the control channel, which prepares replicas). `health`:
/// `grpc.health.v1.Health`, reachable like the rest with any certificate of the vault
/// (the TLS handshake requires one; an operator's certificate works).
pub async fn serve(
    files: Arc<AgentFiles>,
    replicas: Arc<ReplicaSet>,
    listener: TcpListener,
    health: HealthServer<HealthService>,
    shutdown: CancellationToken,
) -> Result<(), PeerServeError> {
    siterecovery_certs::tls::install_crypto_provider();
    let tls = Arc::new(files.trust.server_config(ClientAuth::Required, true)?);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(siterecovery_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(HEALTH_DESCRIPTOR_SET)
        .build_v1alpha();
    let mut builder = Server::builder();
    let peer = PeerServer::new(PeerService::new(files, replicas)).max_decoding_message_size(MAX_MESSAGE);
    let mut router = builder.add_service(peer).add_service(health);
    if let Ok(r) = reflection {
        router = router.add_service(r);
    }
    // Nagle is off in the accept loop (the small HTTP/2 window updates and acks would
    // wait, capping streams at ~40 MB/s).
    let incoming = transport::incoming(listener, tls, AcceptLimits::default());
    router.serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned()).await?;
    Ok(())
}
