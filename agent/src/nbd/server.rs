//! The accept loops (unix socket, TCP) with their connection caps, and one
//! connection's life: handshake (with TLS on a TLS-mandatory listener), then
//! transmission, over any byte stream.

use super::*;

/// Serves NBD on a unix socket until `shutdown` is cancelled, then waits for the
/// connections to stop (each stops reading at once and waits for its operations that
/// are already running on the device). At most `exports.limits().max_connections`
/// connections at once; one more is closed at accept.
pub async fn serve_unix(listener: UnixListener, exports: Arc<Exports>, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Some(slot) = exports.listener.try_take() else {
                        refuse(&exports, "unix socket");
                        continue;
                    };
                    let (r, w) = stream.into_split();
                    let exports = exports.clone();
                    let token = shutdown.child_token();
                    conns.spawn(async move {
                        let _slot = slot;
                        log_end("unix", &exports, serve_halves(r, w, exports.clone(), token).await);
                    });
                }
                Err(e) => accept_backoff(e, &shutdown).await,
            },
        }
    }
    while conns.join_next().await.is_some() {}
}

/// Serves NBD on a TCP listener until `shutdown` is cancelled; see [`serve_unix`].
/// With [`TcpSecurity::Tls`] every client must negotiate TLS with a certificate of the
/// vault before anything else (the module doc of `nbd`).
pub async fn serve_tcp(
    listener: TcpListener,
    exports: Arc<Exports>,
    security: TcpSecurity,
    shutdown: CancellationToken,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(slot) = exports.listener.try_take() else {
                        refuse(&exports, "TCP listener");
                        continue;
                    };
                    // Replies are batched by the writer; Nagle would only add latency.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("nbd: set_nodelay for {peer}: {e:#}");
                    }
                    let exports = exports.clone();
                    let token = shutdown.child_token();
                    let security = security.clone();
                    conns.spawn(async move {
                        let _slot = slot;
                        let peer = peer.to_string();
                        let result = match security {
                            TcpSecurity::Insecure => {
                                let (r, w) = stream.into_split();
                                serve_halves(r, w, exports.clone(), token).await
                            }
                            TcpSecurity::Tls(tls) => serve_tls(stream, exports.clone(), &tls, token, &peer).await,
                        };
                        log_end(&peer, &exports, result);
                    });
                }
                Err(e) => accept_backoff(e, &shutdown).await,
            },
        }
    }
    while conns.join_next().await.is_some() {}
}

/// A connection over a listener's cap: closed at once (the stream is dropped by the
/// caller), logged at most once per interval.
fn refuse(exports: &Exports, listener: &str) {
    if let Some(more) = exports.refusals.note() {
        tracing::warn!(
            cap = exports.listener.max(),
            also_refused = more,
            "nbd: {listener} at its connection cap; connection closed"
        );
    }
}

/// An accept error (typically EMFILE) would repeat at once: wait a little so the loop
/// does not spin, but stay responsive to shutdown.
pub(super) async fn accept_backoff(e: io::Error, shutdown: &CancellationToken) {
    tracing::warn!("nbd: accept failed: {e:#}");
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
}

/// Logs how a connection ended. Anyone who can connect can make a connection fail, so
/// failures are logged through the registry's rate limit.
fn log_end(peer: &str, exports: &Exports, result: Result<(), NbdError>) {
    match result {
        Ok(()) => tracing::debug!("nbd: connection from {peer} closed"),
        Err(NbdError::Io(e)) => tracing::debug!("nbd: connection from {peer}: {e:#}"),
        Err(e) => {
            if let Some(more) = exports.failures.note() {
                tracing::warn!(also_failed = more, "nbd: connection from {peer} closed: {e:#}");
            }
        }
    }
}

/// Serves one plain NBD connection over `stream`: handshake, then transmission until
/// the client disconnects, a protocol violation, or `shutdown`. `Ok` for a clean end
/// (`NBD_CMD_DISC`, `NBD_OPT_ABORT`, end of stream between requests, shutdown).
pub async fn serve_connection<S>(stream: S, exports: Arc<Exports>, shutdown: CancellationToken) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    serve_halves(r, w, exports, shutdown).await
}

pub(super) async fn serve_halves<R, W>(
    r: R,
    mut w: W,
    exports: Arc<Exports>,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(READ_BUF, r);
    let session = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut reader, &mut w, &exports)) => {
            r.map_err(|_| NbdError::HandshakeTimeout)??
        }
    };
    match session {
        Some(session) => transmission(reader, w, session, shutdown).await,
        None => Ok(()),
    }
}

/// One connection on a TLS-mandatory listener: [`tls::tls_handshake`] within the
/// handshake time limit, then transmission inside TLS.
pub(super) async fn serve_tls<S>(
    stream: S,
    exports: Arc<Exports>,
    tls: &NbdTls,
    shutdown: CancellationToken,
    peer: &str,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let negotiated = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls::tls_handshake(stream, &exports, tls, peer)) => {
            r.map_err(|_| NbdError::HandshakeTimeout)??
        }
    };
    match negotiated {
        Some((reader, w, session)) => transmission(reader, w, session, shutdown).await,
        None => Ok(()),
    }
}
