//! gRPC over our own rustls configs: a TLS accept loop for tonic servers and a TLS
//! connector for tonic channels.
//!
//! tonic's own `ServerTlsConfig`/`ClientTlsConfig` take fixed PEMs; ours resolve the
//! [`LiveIdentity`](crate::live::LiveIdentity) and read the
//! [`RevocationList`](crate::live::RevocationList) at every handshake, and a client
//! checks the server's identity ([`Expect`](crate::live::Expect)). The accept loop also
//! caps connections and handshake time, so a flood of half-open connections cannot
//! exhaust a server.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

/// Limits of a TLS accept loop.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Open connections at most (handshaking or established); more are closed at once.
    pub max_connections: usize,
    /// A client that has not finished its handshake by then is dropped.
    pub handshake_timeout: Duration,
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self { max_connections: 1024, handshake_timeout: Duration::from_secs(10) }
    }
}

/// One accepted, handshaken connection; holds its slot of the connection cap.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for TlsConn {
    type ConnectInfo = <tokio_rustls::server::TlsStream<TcpStream> as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The stream of connections for `Server::serve_with_incoming*`.
pub type Incoming = tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>>;

/// Accepts on `listener`, handshakes each connection in its own task with `config`
/// (read once per connection, so a config swapped by the caller is not needed: the
/// identity and revocation list inside it are live), and yields the established ones.
/// Runs until the returned stream is dropped.
pub fn incoming(listener: TcpListener, config: Arc<rustls::ServerConfig>, limits: AcceptLimits) -> Incoming {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let mut refused_logged = tokio::time::Instant::now() - Duration::from_secs(60);
        loop {
            let accepted = tokio::select! {
                _ = tx.closed() => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: do not spin.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if refused_logged.elapsed() > Duration::from_secs(10) {
                    tracing::warn!(%peer, max = limits.max_connections, "connection cap reached: refusing connections");
                    refused_logged = tokio::time::Instant::now();
                }
                drop(stream);
                continue;
            };
            // Nagle off: the small HTTP/2 window updates and acks would otherwise wait.
            let _ = stream.set_nodelay(true);
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn { inner: tls, _slot: slot })).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "TLS handshake refused: {e}"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A tonic connector dialling one address with one client config.
#[derive(Clone)]
pub struct TlsConnector {
    address: String,
    server_name: ServerName<'static>,
    config: Arc<rustls::ClientConfig>,
}

impl TlsConnector {
    /// Dials `address` (`HOST:PORT`) and verifies the server as `config` says, against
    /// the host part of the address.
    pub fn new(address: &str, config: Arc<rustls::ClientConfig>) -> Result<Self, crate::CertError> {
        let server_name = ServerName::try_from(crate::host_of(address).to_owned())
            .map_err(|e| crate::CertError::parse("server address", e))?;
        Ok(Self { address: address.to_owned(), server_name, config })
    }
}

type Io = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl tower_service::Service<http::Uri> for TlsConnector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(&this.address).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(this.config).connect(this.server_name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}

/// An endpoint for `address` whose TLS is done by a [`TlsConnector`] (plain `http://`
/// to tonic, which must not add its own TLS).
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    Endpoint::from_shared(format!("http://{address}"))
}

/// Connects `endpoint` through `connector`.
pub async fn connect(endpoint: Endpoint, connector: TlsConnector) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(connector).await
}

/// A channel that connects on first use (and reconnects) through `connector`.
pub fn connect_lazy(endpoint: Endpoint, connector: TlsConnector) -> Channel {
    endpoint.connect_with_connector_lazy(connector)
}
