//! The peer listener: agent-to-agent gRPC over mutual TLS. Only certificates of this
//! vault pass the handshake (client certificate required); each RPC then checks the
//! caller's role. Replication services (sender → receiver) are served here.

use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::{PeerIdentity, Role};
use siterecovery_proto::v1;
use siterecovery_proto::v1::peer_server::{Peer, PeerServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::config::AgentFiles;

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

struct PeerService {
    files: Arc<AgentFiles>,
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

    async fn copy_progress(&self, _req: Request<v1::CopyProgressRequest>) -> Result<Response<v1::CopyProgressResponse>, Status> {
        Err(Status::unimplemented("replication is not available yet"))
    }

    type InitialCopyStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::CopyAck, Status>> + Send>>;

    async fn initial_copy(&self, _req: Request<tonic::Streaming<v1::CopyChunk>>) -> Result<Response<Self::InitialCopyStream>, Status> {
        Err(Status::unimplemented("replication is not available yet"))
    }

    async fn ship_point(&self, _req: Request<tonic::Streaming<v1::PointChunk>>) -> Result<Response<v1::PointAck>, Status> {
        Err(Status::unimplemented("replication is not available yet"))
    }

    type BlockHashesStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<v1::BlockHashesChunk, Status>> + Send>>;

    async fn block_hashes(&self, _req: Request<v1::BlockHashesRequest>) -> Result<Response<Self::BlockHashesStream>, Status> {
        Err(Status::unimplemented("replication is not available yet"))
    }
}

/// Serves the peer services on `listener` until `shutdown`.
pub async fn serve(files: Arc<AgentFiles>, listener: TcpListener, shutdown: CancellationToken) -> Result<(), tonic::transport::Error> {
    siterecovery_certs::tls::install_crypto_provider();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&files.identity.cert_pem, &files.identity.key_pem))
        .client_ca_root(Certificate::from_pem(&files.ca_pem))
        .timeout(Duration::from_secs(10));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(siterecovery_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha();
    let mut builder = Server::builder().tls_config(tls)?;
    let mut router = builder.add_service(PeerServer::new(PeerService { files }));
    if let Ok(r) = reflection {
        router = router.add_service(r);
    }
    router
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
}
