//! The fixed-newstyle handshake: option haggling until the client picks an export
//! (`EXPORT_NAME`, `GO`), with bounded option payloads.

use super::*;

/// What the handshake agreed on.
pub(super) struct Session {
    pub(super) export: Arc<Export>,
    /// `NBD_OPT_STRUCTURED_REPLY` was negotiated: reads are answered with chunks.
    pub(super) structured: bool,
}

/// Runs the fixed-newstyle handshake. `Ok(None)` when the client aborted or closed the
/// connection between options.
pub(super) async fn handshake<R, W>(r: &mut R, w: &mut W, exports: &Exports) -> Result<Option<Session>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;

    let client_flags = r.read_u32().await?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(NbdError::ClientFlags(client_flags));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut structured = false;

    loop {
        let magic = match r.read_u64().await {
            Ok(m) => m,
            // A client may probe and hang up between options (qemu-img info does not,
            // but port scanners and health checks do).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(NbdError::OptionMagic(magic));
        }
        let option = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            // EXPORT_NAME has no error reply; anything else can be refused in-band if
            // the payload is small enough to drain.
            if option == OPT_EXPORT_NAME || len > MAX_OPTION_DISCARD {
                return Err(NbdError::OptionTooLarge { option, len });
            }
            discard(r, u64::from(len)).await?;
            option_reply(w, option, REP_ERR_TOO_BIG, &[]).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = exports.get(&name) else {
                    return Err(NbdError::UnknownExport(name.into_owned()));
                };
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.dev.size().to_be_bytes());
                reply.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.resize(10 + 124, 0);
                }
                w.write_all(&reply).await?;
                w.flush().await?;
                return Ok(Some(Session { export, structured }));
            }
            OPT_ABORT => {
                // Best effort: the client may already have closed its end.
                let _ = option_reply(w, option, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(w, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                }
                for name in exports.names() {
                    let mut entry = Vec::with_capacity(4 + name.len());
                    entry.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(name.as_bytes());
                    option_reply(w, option, REP_SERVER, &entry).await?;
                }
                option_reply(w, option, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    option_reply(w, option, REP_ACK, &[]).await?;
                } else {
                    option_reply(w, option, REP_ERR_INVALID, &[]).await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let Some((name, infos)) = parse_info_request(&data) else {
                    option_reply(w, option, REP_ERR_INVALID, &[]).await?;
                    continue;
                };
                let Some(export) = exports.get(&String::from_utf8_lossy(name)) else {
                    option_reply(w, option, REP_ERR_UNKNOWN, &[]).await?;
                    continue;
                };
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.dev.size().to_be_bytes());
                info.extend_from_slice(&export.transmission_flags().to_be_bytes());
                option_reply(w, option, REP_INFO, &info).await?;
                // Our limits are the protocol's defaults, so sending them even when not
                // asked cannot constrain a client that does not understand them.
                let mut info = Vec::with_capacity(14);
                info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                info.extend_from_slice(&1u32.to_be_bytes());
                info.extend_from_slice(&4096u32.to_be_bytes());
                info.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                option_reply(w, option, REP_INFO, &info).await?;
                if infos.contains(&INFO_NAME) {
                    let mut info = Vec::with_capacity(2 + name.len());
                    info.extend_from_slice(&INFO_NAME.to_be_bytes());
                    info.extend_from_slice(name);
                    option_reply(w, option, REP_INFO, &info).await?;
                }
                option_reply(w, option, REP_ACK, &[]).await?;
                if option == OPT_GO {
                    return Ok(Some(Session { export, structured }));
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                // No block-status contexts: an ACK with zero contexts tells the client
                // to treat everything as allocated data (what qemu does without them).
                let rep = if structured { REP_ACK } else { REP_ERR_INVALID };
                option_reply(w, option, rep, &[]).await?;
            }
            _ => option_reply(w, option, REP_ERR_UNSUP, &[]).await?,
        }
    }
}

pub(super) async fn option_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    option: u32,
    rep: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&rep.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads and drops `n` bytes; an early end of stream is an error.
pub(super) async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
