//! The fixed-newstyle handshake: option haggling until the client picks an export
//! (`EXPORT_NAME`, `GO`), with bounded option payloads; on a TLS-mandatory listener,
//! haggling until `STARTTLS` first (see the module doc of `nbd`).

use super::*;

/// What the handshake agreed on.
pub(super) struct Session {
    pub(super) export: Arc<Export>,
    /// `NBD_OPT_STRUCTURED_REPLY` was negotiated: reads are answered with chunks.
    pub(super) structured: bool,
    /// Payload bytes this connection may hold in flight.
    pub(super) request_bytes: usize,
    /// The connection's place under the export's cap, given back when it ends.
    pub(super) _slot: Option<OwnedSemaphorePermit>,
}

/// Where a connection stands with TLS while options are haggled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TlsPhase<'a> {
    /// A plain listener (unix socket, `--nbd-insecure-tcp`): `STARTTLS` is refused by
    /// policy, everything else is served.
    Off,
    /// A TLS-mandatory listener before `STARTTLS`: only `STARTTLS` and `ABORT`.
    Required,
    /// Inside TLS, the client's certificate accepted.
    Done,
    /// Inside TLS, the client's certificate may not open exports: every option is
    /// refused by policy with this message.
    Denied(&'a str),
}

/// How option haggling ended.
pub(super) enum Negotiated {
    /// An export was chosen: transmission follows.
    Session(Session),
    /// `STARTTLS` was acknowledged: the TLS handshake follows on the same stream.
    StartTls,
    /// The client aborted or closed the connection between options.
    Closed,
}

/// Runs the plain fixed-newstyle handshake (unix sockets, insecure TCP). `Ok(None)`
/// when the client aborted or closed the connection between options.
pub(super) async fn handshake<R, W>(r: &mut R, w: &mut W, exports: &Exports) -> Result<Option<Session>, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let no_zeroes = greet(r, w).await?;
    match options(r, w, exports, no_zeroes, TlsPhase::Off).await? {
        Negotiated::Session(s) => Ok(Some(s)),
        Negotiated::StartTls | Negotiated::Closed => Ok(None),
    }
}

/// The server's greeting and the client's flags; returns whether the client asked for
/// no zeroes after `EXPORT_NAME`.
pub(super) async fn greet<R, W>(r: &mut R, w: &mut W) -> Result<bool, NbdError>
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
    Ok(client_flags & CLIENT_NO_ZEROES != 0)
}

/// Option haggling in `phase` until an export is chosen, `STARTTLS` is acknowledged
/// (only in [`TlsPhase::Required`]) or the client leaves.
pub(super) async fn options<R, W>(
    r: &mut R,
    w: &mut W,
    exports: &Exports,
    no_zeroes: bool,
    phase: TlsPhase<'_>,
) -> Result<Negotiated, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut structured = false;
    loop {
        let magic = match r.read_u64().await {
            Ok(m) => m,
            // A client may probe and hang up between options (qemu-img info does not,
            // but port scanners and health checks do).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Negotiated::Closed),
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
            let rep = if phase == TlsPhase::Required { REP_ERR_TLS_REQD } else { REP_ERR_TOO_BIG };
            option_reply(w, option, rep, &[]).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;

        if option == OPT_ABORT {
            // Best effort: the client may already have closed its end.
            let _ = option_reply(w, option, REP_ACK, &[]).await;
            return Ok(Negotiated::Closed);
        }
        match (phase, option) {
            (TlsPhase::Required, OPT_STARTTLS) if data.is_empty() => {
                option_reply(w, option, REP_ACK, &[]).await?;
                return Ok(Negotiated::StartTls);
            }
            (TlsPhase::Required, OPT_STARTTLS) => {
                option_reply(w, option, REP_ERR_INVALID, &[]).await?;
                continue;
            }
            (TlsPhase::Required, OPT_EXPORT_NAME) => {
                return Err(NbdError::ExportNameRefused("TLS is required first (NBD_OPT_STARTTLS)"));
            }
            (TlsPhase::Required, _) => {
                option_reply(
                    w,
                    option,
                    REP_ERR_TLS_REQD,
                    b"TLS is required: connect with a client certificate of the vault",
                )
                .await?;
                continue;
            }
            (TlsPhase::Denied(_), OPT_EXPORT_NAME) => {
                return Err(NbdError::ExportNameRefused("the client certificate may not open exports"));
            }
            (TlsPhase::Denied(why), _) => {
                option_reply(w, option, REP_ERR_POLICY, why.as_bytes()).await?;
                continue;
            }
            (TlsPhase::Off, OPT_STARTTLS) => {
                option_reply(w, option, REP_ERR_POLICY, b"TLS is not offered on this listener").await?;
                continue;
            }
            (TlsPhase::Done, OPT_STARTTLS) => {
                // TLS already negotiated: the protocol says INVALID.
                option_reply(w, option, REP_ERR_INVALID, &[]).await?;
                continue;
            }
            (TlsPhase::Off | TlsPhase::Done, _) => {}
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = exports.get(&name) else {
                    return Err(NbdError::UnknownExport(short(&name)));
                };
                let Some(slot) = export.slots.try_take() else {
                    note_busy(exports, &name, export.slots.max());
                    return Err(NbdError::ExportBusy(short(&name)));
                };
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&export.dev.size().to_be_bytes());
                reply.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    reply.resize(10 + 124, 0);
                }
                w.write_all(&reply).await?;
                w.flush().await?;
                let request_bytes = exports.limits.max_request_bytes;
                return Ok(Negotiated::Session(Session { export, structured, request_bytes, _slot: Some(slot) }));
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
                // The slot is taken before anything is promised, so a refusal can
                // still be told in-band.
                let slot = if option == OPT_GO {
                    let Some(slot) = export.slots.try_take() else {
                        let name = String::from_utf8_lossy(name);
                        note_busy(exports, &name, export.slots.max());
                        let why =
                            format!("export {} is at its cap of {} connections", short(&name), export.slots.max());
                        option_reply(w, option, REP_ERR_POLICY, why.as_bytes()).await?;
                        continue;
                    };
                    Some(slot)
                } else {
                    None
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
                    let request_bytes = exports.limits.max_request_bytes;
                    return Ok(Negotiated::Session(Session { export, structured, request_bytes, _slot: slot }));
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

/// Logs (rate-limited) that a client was refused an export at its connection cap.
fn note_busy(exports: &Exports, name: &str, max: usize) {
    if let Some(more) = exports.refusals.note() {
        tracing::warn!(export = %short(name), cap = max, also_refused = more, "nbd: export at its connection cap; client refused");
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
