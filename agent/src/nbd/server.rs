//! The accept loops (unix socket, TCP) and one connection's life: handshake, then
//! transmission, over any byte stream.

use super::*;

/// Serves NBD on a unix socket until `shutdown` is cancelled, then waits for the
/// connections to stop (each stops reading at once and waits for its operations that
/// are already running on the device).
pub async fn serve_unix(listener: UnixListener, exports: Arc<Exports>, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (r, w) = stream.into_split();
                    conns.spawn(run_logged(r, w, exports.clone(), shutdown.child_token(), "unix".into()));
                }
                Err(e) => accept_backoff(e, &shutdown).await,
            },
        }
    }
    while conns.join_next().await.is_some() {}
}

/// Serves NBD on a TCP listener (the agent binds it to loopback) until `shutdown` is
/// cancelled; see [`serve_unix`].
pub async fn serve_tcp(listener: TcpListener, exports: Arc<Exports>, shutdown: CancellationToken) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Replies are batched by the writer; Nagle would only add latency.
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!("nbd: set_nodelay for {peer}: {e:#}");
                    }
                    let (r, w) = stream.into_split();
                    conns.spawn(run_logged(r, w, exports.clone(), shutdown.child_token(), peer.to_string()));
                }
                Err(e) => accept_backoff(e, &shutdown).await,
            },
        }
    }
    while conns.join_next().await.is_some() {}
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

pub(super) async fn run_logged<R, W>(r: R, w: W, exports: Arc<Exports>, shutdown: CancellationToken, peer: String)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tracing::debug!("nbd: connection from {peer}");
    match serve_halves(r, w, exports, shutdown).await {
        Ok(()) => tracing::debug!("nbd: connection from {peer} closed"),
        Err(NbdError::Io(e)) => tracing::debug!("nbd: connection from {peer}: {e:#}"),
        Err(e) => tracing::warn!("nbd: connection from {peer} closed: {e:#}"),
    }
}

/// Serves one NBD connection over `stream`: handshake, then transmission until the
/// client disconnects, a protocol violation, or `shutdown`. `Ok` for a clean end
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
