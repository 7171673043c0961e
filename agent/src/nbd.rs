//! The NBD server (fixed newstyle) exporting [`crate::disk::BlockDevice`]s on tokio.
//!
//! This module owns the wire protocol between a hypervisor (QEMU's `nbd+unix://` drive,
//! `qemu-img`, `qemu-io`, the kernel's `nbd-client`) and the agent's disks. It knows
//! nothing of HRL logs or replication: every request ends in a [`BlockDevice`] call, and
//! the tracker behind that trait sees each write. The protocol reference is the
//! NetworkBlockDevice project's `doc/proto.md`.
//!
//! # Layout
//!
//! * [`Exports`]: the registry of named devices, shared by every listener. Removing an
//!   export marks it closed: connections that already opened it get `NBD_ESHUTDOWN` for
//!   every further request, new connections cannot open it.
//! * [`serve_unix`] / [`serve_tcp`]: accept loops, one task per connection, stopped by
//!   the shutdown token. [`serve_connection`] runs one connection over any byte stream.
//! * Handshake (`handshake`): fixed newstyle, options `EXPORT_NAME`, `GO`, `INFO`,
//!   `LIST`, `ABORT`, `STRUCTURED_REPLY`, `LIST/SET_META_CONTEXT` (answered with zero
//!   contexts), anything else `NBD_REP_ERR_UNSUP`. Option payloads are bounded.
//! * Transmission: a pipeline of three stages per connection.
//!   1. the *reader* (the connection task) parses 28-byte request headers and decides
//!      each request with the pure function `plan` (range, size, flags, read-only and
//!      closed checks, so a bad request never reaches the device); it reads a write's
//!      payload fully before the next header;
//!   2. each accepted request runs on tokio's blocking pool (the trait is blocking
//!      positional I/O), so up to [`MAX_IN_FLIGHT`] requests of a connection proceed in
//!      parallel, as QEMU's queue depth of 16-64 expects;
//!   3. the *writer* task receives replies over a channel in completion order (NBD
//!      cookies let replies come out of order), encodes them into one buffer and writes
//!      large read payloads with a vectored write (no copy), flushing only when the
//!      channel is drained.
//!
//!   Back-pressure: the reader takes a slot (count) and, for reads and writes, a byte
//!   budget before it reads a payload or starts an operation; they are given back when
//!   the reply has been written. A client that stops reading replies therefore stops
//!   being read, and memory per connection stays below [`MAX_BYTES_IN_FLIGHT`] plus
//!   buffers. Payload buffers are recycled through a small per-connection pool.
//!
//! Requests whose payload length is above [`MAX_PAYLOAD`] (32 MiB, the protocol's
//! portable limit and what we advertise in `NBD_INFO_BLOCK_SIZE`): a read gets
//! `NBD_EINVAL`; a write gets `NBD_EINVAL` and the connection is closed without reading
//! the payload. A client that ignores the advertised maximum is broken or hostile, the
//! protocol allows a hard disconnect for it, and draining up to 4 GiB to stay in sync
//! with such a peer only keeps it talking. `TRIM` and `WRITE_ZEROES` carry no payload
//! and may be larger (QEMU sends discards of up to 2 GiB), as the protocol says.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::disk::{BlockDevice, DiskError};

/// Largest read or write payload we accept (and advertise): 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Requests of one connection executing or waiting for their reply to be written.
pub const MAX_IN_FLIGHT: usize = 128;
/// Read and write payload bytes one connection may hold in flight.
pub const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;
/// Longest export name we accept (the protocol's own limit is 4 KiB).
pub const MAX_NAME_LEN: usize = 4096;
/// Largest option payload we read during the handshake: a name plus small fields.
const MAX_OPTION_LEN: u32 = MAX_NAME_LEN as u32 + 1024;
/// Oversized option payloads up to this are drained and refused with
/// `NBD_REP_ERR_TOO_BIG`; beyond it the connection is closed.
const MAX_OPTION_DISCARD: u32 = 1 << 20;
/// A client must finish the handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Unit of the byte budget semaphore (a semaphore counts `u32` permits).
const BUDGET_UNIT: usize = 1024;
/// Read-side buffering: enough for many headers per syscall under a deep queue, but
/// small, so most of a large write payload bypasses it and is read straight into its
/// own buffer (a 128 KiB buffer, copying every payload once, was measurably slower on
/// 64 KiB sequential writes).
const READ_BUF: usize = 32 << 10;
/// Replies are batched in one buffer up to this size before a write.
const WRITE_BUF: usize = 64 << 10;
/// Read payloads smaller than this are copied into the batch; larger ones are written
/// with a vectored write from their own buffer.
const COPY_PAYLOAD_BELOW: usize = 8 << 10;
/// Payload buffers kept for reuse per connection, and the largest one kept.
const POOL_BUFFERS: usize = 64;
const POOL_MAX_BUFFER: usize = 4 << 20;

/// Protocol constants from `doc/proto.md`.
mod wire {
    pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

    pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const FLAG_NO_ZEROES: u16 = 1 << 1;
    pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_ABORT: u32 = 2;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_LIST_META_CONTEXT: u32 = 9;
    pub const OPT_SET_META_CONTEXT: u32 = 10;

    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

    pub const INFO_EXPORT: u16 = 0;
    pub const INFO_NAME: u16 = 1;
    pub const INFO_BLOCK_SIZE: u16 = 3;

    pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
    pub const TFLAG_READ_ONLY: u16 = 1 << 1;
    pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
    pub const TFLAG_SEND_FUA: u16 = 1 << 3;
    pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
    pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;

    pub const CMD_FLAG_FUA: u16 = 1 << 0;
    pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
    pub const CMD_FLAG_DF: u16 = 1 << 2;

    pub const REPLY_FLAG_DONE: u16 = 1 << 0;
    pub const REPLY_TYPE_NONE: u16 = 0;
    pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
    pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const ESHUTDOWN: u32 = 108;

    /// Size of a request header: magic, flags, type, cookie, offset, length.
    pub const REQUEST_LEN: usize = 28;
}
use wire::*;

/// Why a connection ended abnormally, or an export could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Reading from or writing to the client failed (includes the client closing the
    /// connection in the middle of a handshake message).
    #[error("connection I/O: {0}")]
    Io(#[from] io::Error),
    /// The client set handshake flags we do not know; the protocol says to close.
    #[error("unknown client handshake flags {0:#x}")]
    ClientFlags(u32),
    /// An option did not start with `IHAVEOPT`: the stream is not NBD or lost sync.
    #[error("bad option magic {0:#018x}")]
    OptionMagic(u64),
    /// An option payload was too large even to drain.
    #[error("option {option} payload of {len} bytes is too large")]
    OptionTooLarge { option: u32, len: u32 },
    /// `NBD_OPT_EXPORT_NAME` named an unknown export; that option has no error reply,
    /// so the protocol says to close the connection.
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// The client did not finish the handshake within the time limit.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// A request header did not start with the request magic: the client lost sync.
    #[error("bad request magic {0:#010x}")]
    RequestMagic(u32),
    /// A write announced a payload above [`MAX_PAYLOAD`]; answered `NBD_EINVAL` and
    /// closed without reading the payload.
    #[error("write payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(u32),
    /// [`Exports::add`]: an export of that name already exists.
    #[error("export {0:?} already exists")]
    DuplicateExport(String),
    /// [`Exports::add`]: the name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("export name of {0} bytes is too long")]
    ExportName(usize),
}

/// One registered device. Connections hold it for their lifetime; `closed` is set when
/// the export is removed so they stop issuing I/O to it.
struct Export {
    dev: Arc<dyn BlockDevice>,
    closed: AtomicBool,
}

impl Export {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn transmission_flags(&self) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            // All connections to an export share one device, so a flush on any of them
            // covers writes completed on all of them.
            | TFLAG_CAN_MULTI_CONN;
        if self.dev.read_only() {
            flags |= TFLAG_READ_ONLY;
        }
        flags
    }
}

/// The devices served over NBD, by export name; shared by all listeners and safe to
/// change while serving (a VM started or stopped).
#[derive(Default)]
pub struct Exports {
    map: RwLock<HashMap<String, Arc<Export>>>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports").field("names", &self.names()).finish()
    }
}

impl Exports {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` under `name`; refuses a name already in use or longer than
    /// [`MAX_NAME_LEN`]. The empty name is the protocol's default export.
    pub fn add(&self, name: String, dev: Arc<dyn BlockDevice>) -> Result<(), NbdError> {
        if name.len() > MAX_NAME_LEN {
            return Err(NbdError::ExportName(name.len()));
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&name) {
            return Err(NbdError::DuplicateExport(name));
        }
        map.insert(name, Arc::new(Export { dev, closed: AtomicBool::new(false) }));
        Ok(())
    }

    /// Unregisters `name` and returns its device. New connections can no longer open
    /// it; connections that have it open get `NBD_ESHUTDOWN` for every request they
    /// send from now on. Requests already executing finish (the device itself refuses
    /// late writes with [`DiskError::Stopped`] if it must).
    pub fn remove(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let export = self.map.write().unwrap_or_else(|e| e.into_inner()).remove(name)?;
        export.closed.store(true, Ordering::Release);
        Some(export.dev.clone())
    }

    /// The export names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.map.read().unwrap_or_else(|e| e.into_inner()).keys().cloned().collect();
        names.sort();
        names
    }

    fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }
}

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
async fn accept_backoff(e: io::Error, shutdown: &CancellationToken) {
    tracing::warn!("nbd: accept failed: {e:#}");
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
    }
}

async fn run_logged<R, W>(r: R, w: W, exports: Arc<Exports>, shutdown: CancellationToken, peer: String)
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

async fn serve_halves<R, W>(r: R, mut w: W, exports: Arc<Exports>, shutdown: CancellationToken) -> Result<(), NbdError>
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

/// What the handshake agreed on.
struct Session {
    export: Arc<Export>,
    /// `NBD_OPT_STRUCTURED_REPLY` was negotiated: reads are answered with chunks.
    structured: bool,
}

/// Runs the fixed-newstyle handshake. `Ok(None)` when the client aborted or closed the
/// connection between options.
async fn handshake<R, W>(r: &mut R, w: &mut W, exports: &Exports) -> Result<Option<Session>, NbdError>
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

/// Splits an `NBD_OPT_INFO`/`NBD_OPT_GO` payload into the export name and the list of
/// information requests; `None` when the lengths are inconsistent.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = data.get(4 + name_len..)?;
    let count = usize::from(u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?));
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let infos = list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Some((name, infos))
}

async fn option_reply<W: AsyncWrite + Unpin>(w: &mut W, option: u32, rep: u32, data: &[u8]) -> io::Result<()> {
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
async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Request {
    flags: u16,
    cmd: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0, |acc, b| (acc << 8) | u64::from(*b))
}

/// Decodes a request header; a wrong magic means the stream lost sync.
fn parse_request(h: &[u8; REQUEST_LEN]) -> Result<Request, NbdError> {
    let magic = be(&h[0..4]) as u32;
    if magic != REQUEST_MAGIC {
        return Err(NbdError::RequestMagic(magic));
    }
    Ok(Request {
        flags: be(&h[4..6]) as u16,
        cmd: be(&h[6..8]) as u16,
        cookie: be(&h[8..16]),
        offset: be(&h[16..24]),
        len: be(&h[24..28]) as u32,
    })
}

/// What to do with one request, decided before any I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    /// Reply with `errno` after draining `discard` payload bytes.
    Reject {
        errno: u32,
        discard: u32,
    },
    /// Reply with `errno`, then close: the payload cannot be trusted or afforded.
    RejectAndClose {
        errno: u32,
    },
}

/// Validates a request against the export; a pure function so every rule is unit- and
/// property-tested without sockets.
fn plan(req: &Request, size: u64, read_only: bool, closed: bool) -> Plan {
    let payload = if req.cmd == CMD_WRITE { req.len } else { 0 };
    if payload > MAX_PAYLOAD {
        return Plan::RejectAndClose { errno: EINVAL };
    }
    let reject = |errno| Plan::Reject { errno, discard: payload };
    let known_flags = match req.cmd {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_FLUSH | CMD_DISC => 0,
        _ => return reject(EINVAL),
    };
    if req.flags & !known_flags != 0 {
        return reject(EINVAL);
    }
    if req.cmd == CMD_DISC {
        return Plan::Disconnect;
    }
    if closed {
        return reject(ESHUTDOWN);
    }
    let in_range = req.offset.checked_add(u64::from(req.len)).is_some_and(|end| end <= size);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.len);
    match req.cmd {
        CMD_READ if len > MAX_PAYLOAD || !in_range => reject(EINVAL),
        CMD_READ => Plan::Read { offset, len },
        CMD_FLUSH => Plan::Flush,
        _ if read_only => reject(EPERM),
        CMD_WRITE if !in_range => reject(ENOSPC),
        CMD_WRITE => Plan::Write { offset, len, fua },
        CMD_TRIM if !in_range => reject(EINVAL),
        CMD_TRIM => Plan::Trim { offset, len, fua },
        CMD_WRITE_ZEROES if !in_range => reject(ENOSPC),
        // NO_HOLE is honoured trivially: zeroes are always written, never punched.
        _ => Plan::Zeroes { offset, len, fua },
    }
}

/// The NBD errno for a device error; `write` selects `ENOSPC` for an out-of-range
/// write as the protocol asks.
fn errno_of(e: &DiskError, write: bool) -> u32 {
    match e {
        DiskError::OutOfRange { .. } if write => ENOSPC,
        DiskError::OutOfRange { .. } => EINVAL,
        DiskError::ReadOnly => EPERM,
        DiskError::Stopped => ESHUTDOWN,
        DiskError::NoSpace(_) => ENOSPC,
        DiskError::Io(_) => EIO,
    }
}

/// Slots and bytes held by one request until its reply is written.
struct Budget {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

struct Limits {
    slots: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

/// One reply on its way to the writer.
struct Reply {
    cookie: u64,
    /// NBD errno; 0 for success.
    error: u32,
    /// Read data on success; goes back to the pool once written.
    data: Option<Vec<u8>>,
    /// `Some(offset)` for a read on a connection with structured replies.
    structured_read: Option<u64>,
    _budget: Budget,
}

/// Payload buffers of one connection, reused so steady-state I/O does not allocate.
#[derive(Default)]
struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
}

impl BufPool {
    /// A buffer of exactly `len` bytes (contents unspecified: callers overwrite it).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.bufs.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        } else {
            buf.truncate(len);
        }
        buf
    }

    fn put(&self, buf: Vec<u8>) {
        if buf.capacity() > POOL_MAX_BUFFER {
            return;
        }
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        if bufs.len() < POOL_BUFFERS {
            bufs.push(buf);
        }
    }
}

/// The transmission phase: the reader runs here, the writer in its own task.
async fn transmission<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    session: Session,
    shutdown: CancellationToken,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Cancelled by the shutdown tree, or by the writer when the client stops taking
    // replies, so the reader stops too.
    let stop = shutdown.child_token();
    let pool = Arc::new(BufPool::default());
    let (tx, rx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write_replies(writer, rx, pool.clone(), stop.clone()));
    let limits = Limits {
        slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        bytes: Arc::new(Semaphore::new(MAX_BYTES_IN_FLIGHT / BUDGET_UNIT)),
    };
    let result = read_requests(&mut reader, &tx, &session, &pool, &limits, &stop).await;
    drop(tx);
    let written = writer.await;
    result?;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
        Err(join) => Err(io::Error::other(join).into()),
    }
}

/// Waits for a budget, or `None` when the connection is stopping.
async fn acquire(limits: &Limits, bytes: Option<u32>, stop: &CancellationToken) -> Option<Budget> {
    let slot = tokio::select! {
        _ = stop.cancelled() => return None,
        p = limits.slots.clone().acquire_owned() => p.ok()?,
    };
    let bytes = match bytes {
        Some(n) => {
            let units = (n as usize).div_ceil(BUDGET_UNIT).max(1) as u32;
            tokio::select! {
                _ = stop.cancelled() => return None,
                p = limits.bytes.clone().acquire_many_owned(units) => Some(p.ok()?),
            }
        }
        None => None,
    };
    Some(Budget { _slot: slot, _bytes: bytes })
}

/// Runs a device call, turning a panic in the device into `NBD_EIO` so the client
/// still gets a reply for its cookie.
fn run_op(export: &Export, write: bool, op: impl FnOnce(&dyn BlockDevice) -> Result<(), DiskError>) -> u32 {
    // Re-checked here: the export may have been removed while the request queued.
    if export.is_closed() {
        return ESHUTDOWN;
    }
    let dev = &*export.dev;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| op(dev))) {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            if matches!(e, DiskError::Io(_) | DiskError::NoSpace(_)) {
                tracing::warn!("nbd: device error: {e:#}");
            }
            errno_of(&e, write)
        }
        Err(_) => {
            tracing::error!("nbd: device operation panicked");
            EIO
        }
    }
}

async fn read_requests<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    tx: &mpsc::UnboundedSender<Reply>,
    session: &Session,
    pool: &Arc<BufPool>,
    limits: &Limits,
    stop: &CancellationToken,
) -> Result<(), NbdError> {
    let mut header = [0u8; REQUEST_LEN];
    let size = session.export.dev.size();
    let read_only = session.export.dev.read_only();
    loop {
        let got = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            r = reader.read_exact(&mut header) => r,
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = parse_request(&header)?;
        let structured_read = (session.structured && req.cmd == CMD_READ).then_some(req.offset);
        let plan = plan(&req, size, read_only, session.export.is_closed());
        let reply = move |error: u32, budget: Budget| Reply {
            cookie: req.cookie,
            error,
            data: None,
            structured_read,
            _budget: budget,
        };

        let (budget, payload_bytes) = match plan {
            Plan::Disconnect => return Ok(()),
            Plan::Read { len, .. } | Plan::Write { len, .. } => {
                let Some(b) = acquire(limits, Some(len), stop).await else {
                    return Ok(());
                };
                (b, len)
            }
            _ => {
                let Some(b) = acquire(limits, None, stop).await else {
                    return Ok(());
                };
                (b, 0)
            }
        };
        let export = session.export.clone();
        let tx2 = tx.clone();
        match plan {
            Plan::Disconnect => return Ok(()),
            Plan::Reject { errno, discard: n } => {
                if n > 0 {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        r = discard(reader, u64::from(n)) => r?,
                    }
                }
                let _ = tx.send(reply(errno, budget));
            }
            Plan::RejectAndClose { errno } => {
                let _ = tx.send(reply(errno, budget));
                return Err(NbdError::PayloadTooLarge(req.len));
            }
            Plan::Read { offset, .. } => {
                let mut buf = pool.take(payload_bytes as usize);
                let pool = pool.clone();
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, false, |d| d.read_at(&mut buf, offset));
                    let data = if error == 0 {
                        Some(buf)
                    } else {
                        pool.put(buf);
                        None
                    };
                    let _ = tx2.send(Reply { cookie: req.cookie, error, data, structured_read, _budget: budget });
                });
            }
            Plan::Write { offset, fua, .. } => {
                let mut buf = pool.take(payload_bytes as usize);
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    r = reader.read_exact(&mut buf) => { r?; }
                }
                let pool = pool.clone();
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, true, |d| d.write_at(&buf, offset, fua));
                    pool.put(buf);
                    let _ = tx2.send(reply(error, budget));
                });
            }
            Plan::Flush => {
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, true, |d| d.flush());
                    let _ = tx2.send(reply(error, budget));
                });
            }
            Plan::Trim { offset, len, fua } => {
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, false, |d| {
                        d.trim(offset, u64::from(len))?;
                        if fua { d.flush() } else { Ok(()) }
                    });
                    let _ = tx2.send(reply(error, budget));
                });
            }
            Plan::Zeroes { offset, len, fua } => {
                tokio::task::spawn_blocking(move || {
                    let error = run_op(&export, true, |d| d.write_zeroes(offset, u64::from(len), fua));
                    let _ = tx2.send(reply(error, budget));
                });
            }
        }
    }
}

/// Appends the header of `reply` to `out`; returns the payload to send after it.
fn encode_reply<'a>(out: &mut Vec<u8>, reply: &'a Reply) -> &'a [u8] {
    let payload: &[u8] = match (&reply.data, reply.error) {
        (Some(data), 0) => data,
        _ => &[],
    };
    match reply.structured_read {
        None => {
            out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&reply.error.to_be_bytes());
            out.extend_from_slice(&reply.cookie.to_be_bytes());
            payload
        }
        Some(offset) => {
            out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
            out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
            if reply.error != 0 {
                out.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
                out.extend_from_slice(&reply.cookie.to_be_bytes());
                out.extend_from_slice(&6u32.to_be_bytes());
                out.extend_from_slice(&reply.error.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes()); // no message
                &[]
            } else if payload.is_empty() {
                // OFFSET_DATA chunks must carry data; a zero-length read just ends.
                out.extend_from_slice(&REPLY_TYPE_NONE.to_be_bytes());
                out.extend_from_slice(&reply.cookie.to_be_bytes());
                out.extend_from_slice(&0u32.to_be_bytes());
                &[]
            } else {
                out.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
                out.extend_from_slice(&reply.cookie.to_be_bytes());
                out.extend_from_slice(&(8 + payload.len() as u32).to_be_bytes());
                out.extend_from_slice(&offset.to_be_bytes());
                payload
            }
        }
    }
}

/// Writes `a` then `b` with vectored writes, without copying `b`.
async fn write_all_2<W: AsyncWrite + Unpin>(w: &mut W, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b).await?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)]).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        if n >= a.len() {
            b = b.get(n - a.len()..).unwrap_or_default();
            a = &[];
        } else {
            a = a.get(n..).unwrap_or_default();
        }
    }
    Ok(())
}

/// The writer: encodes replies in completion order, flushes when none is waiting.
/// On a write error or `stop` it stops writing but keeps receiving until every
/// in-flight operation has finished, so none outlives the connection.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    pool: Arc<BufPool>,
    stop: CancellationToken,
) -> io::Result<()> {
    let mut out = Vec::with_capacity(WRITE_BUF + COPY_PAYLOAD_BELOW + 64);
    let mut result = Ok(());
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = stop.cancelled() => break,
        };
        let Some(first) = first else { break };
        let batch = async {
            let mut next = Some(first);
            while let Some(mut reply) = next {
                let payload = encode_reply(&mut out, &reply);
                if payload.len() < COPY_PAYLOAD_BELOW {
                    out.extend_from_slice(payload);
                } else {
                    write_all_2(&mut w, &out, payload).await?;
                    out.clear();
                }
                if out.len() >= WRITE_BUF {
                    w.write_all(&out).await?;
                    out.clear();
                }
                if let Some(data) = reply.data.take() {
                    pool.put(data);
                }
                // Dropping the reply releases its budget: the reader may go on.
                drop(reply);
                next = rx.try_recv().ok();
            }
            if !out.is_empty() {
                w.write_all(&out).await?;
                out.clear();
            }
            w.flush().await
        };
        let written = tokio::select! {
            r = batch => r,
            _ = stop.cancelled() => break,
        };
        if let Err(e) = written {
            result = Err(e);
            stop.cancel();
            break;
        }
    }
    // Wait for the reader to stop and for operations still running on the device.
    while rx.recv().await.is_some() {}
    let _ = w.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An in-memory device for protocol tests.
    struct MemDisk {
        data: Mutex<Vec<u8>>,
        read_only: bool,
    }

    impl MemDisk {
        fn new(size: usize, read_only: bool) -> Arc<Self> {
            Arc::new(Self { data: Mutex::new(vec![0; size]), read_only })
        }
        fn snapshot(&self) -> Vec<u8> {
            self.data.lock().unwrap_or_else(|e| e.into_inner()).clone()
        }
    }

    impl BlockDevice for MemDisk {
        fn size(&self) -> u64 {
            self.snapshot().len() as u64
        }
        fn read_only(&self) -> bool {
            self.read_only
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
            let d = self.data.lock().unwrap_or_else(|e| e.into_inner());
            crate::disk::check_range(offset, buf.len() as u64, d.len() as u64)?;
            buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, data: &[u8], offset: u64, _fua: bool) -> Result<(), DiskError> {
            if self.read_only {
                return Err(DiskError::ReadOnly);
            }
            let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
            crate::disk::check_range(offset, data.len() as u64, d.len() as u64)?;
            d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> Result<(), DiskError> {
            if self.read_only {
                return Err(DiskError::ReadOnly);
            }
            let mut d = self.data.lock().unwrap_or_else(|e| e.into_inner());
            crate::disk::check_range(offset, len, d.len() as u64)?;
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn trim(&self, offset: u64, len: u64) -> Result<(), DiskError> {
            self.write_zeroes(offset, len, false)
        }
        fn flush(&self) -> Result<(), DiskError> {
            Ok(())
        }
    }

    fn req(cmd: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request { flags, cmd, cookie: 7, offset, len }
    }

    fn header(r: &Request) -> [u8; REQUEST_LEN] {
        let mut h = [0u8; REQUEST_LEN];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&r.flags.to_be_bytes());
        h[6..8].copy_from_slice(&r.cmd.to_be_bytes());
        h[8..16].copy_from_slice(&r.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&r.offset.to_be_bytes());
        h[24..28].copy_from_slice(&r.len.to_be_bytes());
        h
    }

    #[test]
    fn parse_roundtrip_and_bad_magic() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(parse_request(&header(&r)).ok(), Some(r));
        let mut h = header(&r);
        h[0] ^= 1;
        assert!(matches!(parse_request(&h), Err(NbdError::RequestMagic(_))));
    }

    #[test]
    fn plan_rules() {
        let size = 1 << 20;
        let p = |r: Request| plan(&r, size, false, false);
        assert_eq!(p(req(CMD_READ, 0, 0, 4096)), Plan::Read { offset: 0, len: 4096 });
        assert_eq!(p(req(CMD_READ, 0, size - 1, 2)), Plan::Reject { errno: EINVAL, discard: 0 });
        assert_eq!(p(req(CMD_READ, 0, u64::MAX, 2)), Plan::Reject { errno: EINVAL, discard: 0 });
        assert_eq!(p(req(CMD_READ, 0, 0, MAX_PAYLOAD + 1)), Plan::Reject { errno: EINVAL, discard: 0 });
        assert_eq!(p(req(CMD_WRITE, 0, size, 512)), Plan::Reject { errno: ENOSPC, discard: 512 });
        assert_eq!(p(req(CMD_WRITE, 0, u64::MAX - 10, 512)), Plan::Reject { errno: ENOSPC, discard: 512 });
        assert_eq!(p(req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)), Plan::RejectAndClose { errno: EINVAL });
        assert_eq!(p(req(CMD_WRITE, CMD_FLAG_FUA, 0, 1)), Plan::Write { offset: 0, len: 1, fua: true });
        assert_eq!(p(req(CMD_WRITE, 1 << 9, 0, 1)), Plan::Reject { errno: EINVAL, discard: 1 });
        assert_eq!(p(req(99, 0, 0, 4096)), Plan::Reject { errno: EINVAL, discard: 0 });
        assert_eq!(p(req(CMD_TRIM, 0, size, 1)), Plan::Reject { errno: EINVAL, discard: 0 });
        assert_eq!(p(req(CMD_WRITE_ZEROES, 0, size, 1)), Plan::Reject { errno: ENOSPC, discard: 0 });
        assert_eq!(
            p(req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096)),
            Plan::Zeroes { offset: 0, len: 4096, fua: false }
        );
        assert_eq!(p(req(CMD_FLUSH, 0, 0, 0)), Plan::Flush);
        assert_eq!(p(req(CMD_DISC, 0, 0, 0)), Plan::Disconnect);
        // Read-only and closed exports.
        assert_eq!(plan(&req(CMD_WRITE, 0, 0, 8), size, true, false), Plan::Reject { errno: EPERM, discard: 8 });
        assert_eq!(plan(&req(CMD_TRIM, 0, 0, 8), size, true, false), Plan::Reject { errno: EPERM, discard: 0 });
        assert_eq!(plan(&req(CMD_READ, 0, 0, 8), size, true, false), Plan::Read { offset: 0, len: 8 });
        assert_eq!(plan(&req(CMD_WRITE, 0, 0, 8), size, false, true), Plan::Reject { errno: ESHUTDOWN, discard: 8 });
    }

    #[test]
    fn disk_errors_map_to_errnos() {
        let oor = DiskError::OutOfRange { offset: 0, len: 1, size: 0 };
        assert_eq!(errno_of(&oor, true), ENOSPC);
        assert_eq!(errno_of(&oor, false), EINVAL);
        assert_eq!(errno_of(&DiskError::ReadOnly, true), EPERM);
        assert_eq!(errno_of(&DiskError::Stopped, true), ESHUTDOWN);
        assert_eq!(errno_of(&DiskError::NoSpace(io::Error::other("x")), true), ENOSPC);
        assert_eq!(errno_of(&DiskError::Io(io::Error::other("x")), false), EIO);
    }

    #[test]
    fn info_request_parsing() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let (name, infos) = parse_info_request(&d).expect("valid");
        assert_eq!(name, b"abc");
        assert_eq!(infos, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_none());
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(&[0, 0]);
        assert!(parse_info_request(&huge).is_none());
    }

    #[test]
    fn exports_registry() {
        let exports = Exports::new();
        exports.add("a".into(), MemDisk::new(512, false)).expect("add");
        assert!(matches!(exports.add("a".into(), MemDisk::new(512, false)), Err(NbdError::DuplicateExport(_))));
        assert!(matches!(exports.add("x".repeat(5000), MemDisk::new(512, false)), Err(NbdError::ExportName(_))));
        exports.add("b".into(), MemDisk::new(512, false)).expect("add");
        assert_eq!(exports.names(), vec!["a".to_string(), "b".to_string()]);
        let held = exports.get("a").expect("present");
        assert!(exports.remove("a").is_some());
        assert!(held.is_closed());
        assert!(exports.get("a").is_none());
        assert!(exports.remove("a").is_none());
    }

    /// Client bytes of a valid handshake: fixed newstyle, no zeroes, structured replies
    /// when asked, `NBD_OPT_GO` for `name`.
    fn client_hello(name: &str, structured: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
        if structured {
            b.extend_from_slice(&IHAVEOPT.to_be_bytes());
            b.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
            b.extend_from_slice(&0u32.to_be_bytes());
        }
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
        b.extend_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b
    }

    /// Runs a connection over an in-memory pipe with `input` as everything the client
    /// sends; returns what the server sent. Bounded by a deadline so a hang fails.
    fn run_bytes(exports: Arc<Exports>, input: Vec<u8>) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let (client, server) = tokio::io::duplex(64 << 10);
            let token = CancellationToken::new();
            let srv = tokio::spawn(serve_connection(server, exports, token.clone()));
            let (mut cr, mut cw) = tokio::io::split(client);
            let writer = tokio::spawn(async move {
                let _ = cw.write_all(&input).await;
                let _ = cw.shutdown().await;
                cw
            });
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), cr.read_to_end(&mut out)).await;
            assert!(read.is_ok(), "server did not close the connection in time");
            token.cancel();
            let _ = writer.await;
            let _ = srv.await;
            out
        })
    }

    #[test]
    fn structured_read_and_errors_over_a_pipe() {
        let disk = MemDisk::new(8192, false);
        let exports = Arc::new(Exports::new());
        exports.add("d".into(), disk.clone()).expect("add");
        let mut input = client_hello("d", true);
        let mut w = header(&req(CMD_WRITE, 0, 0, 4));
        w[8..16].copy_from_slice(&1u64.to_be_bytes());
        input.extend_from_slice(&w);
        input.extend_from_slice(b"wxyz");
        input.extend_from_slice(&header(&Request { flags: 0, cmd: CMD_READ, cookie: 2, offset: 1, len: 2 }));
        input.extend_from_slice(&header(&Request { flags: 0, cmd: CMD_READ, cookie: 3, offset: 8192, len: 2 }));
        input.extend_from_slice(&header(&Request { flags: 0, cmd: CMD_DISC, cookie: 4, offset: 0, len: 0 }));
        let out = run_bytes(exports, input);
        assert_eq!(&disk.snapshot()[..4], b"wxyz");
        // Structured OFFSET_DATA chunk for cookie 2 carrying "xy".
        let mut chunk = Vec::new();
        chunk.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        chunk.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        chunk.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        chunk.extend_from_slice(&2u64.to_be_bytes());
        chunk.extend_from_slice(&10u32.to_be_bytes());
        chunk.extend_from_slice(&1u64.to_be_bytes());
        chunk.extend_from_slice(b"xy");
        assert!(out.windows(chunk.len()).any(|w| w == chunk), "no data chunk in {out:x?}");
        let mut err = Vec::new();
        err.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        err.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        err.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
        err.extend_from_slice(&3u64.to_be_bytes());
        err.extend_from_slice(&6u32.to_be_bytes());
        err.extend_from_slice(&EINVAL.to_be_bytes());
        assert!(out.windows(err.len()).any(|w| w == err), "no error chunk in {out:x?}");
    }

    #[test]
    fn removed_export_gets_eshutdown() {
        let disk = MemDisk::new(4096, false);
        let exports = Arc::new(Exports::new());
        exports.add("d".into(), disk.clone()).expect("add");
        let held = exports.get("d").expect("present");
        exports.remove("d");
        // A session opened before the removal: run the transmission directly.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let out = rt.block_on(async move {
            let (client, server) = tokio::io::duplex(1 << 16);
            let (sr, sw) = tokio::io::split(server);
            let session = Session { export: held, structured: false };
            let srv = tokio::spawn(transmission(BufReader::new(sr), sw, session, CancellationToken::new()));
            let (mut cr, mut cw) = tokio::io::split(client);
            let mut input = header(&req(CMD_WRITE, 0, 0, 4)).to_vec();
            input.extend_from_slice(b"abcd");
            input.extend_from_slice(&header(&req(CMD_DISC, 0, 0, 0)));
            cw.write_all(&input).await.expect("write");
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), cr.read_to_end(&mut out))
                .await
                .expect("closed in time")
                .expect("read");
            let _ = srv.await;
            out
        });
        let mut expect = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        expect.extend_from_slice(&ESHUTDOWN.to_be_bytes());
        expect.extend_from_slice(&7u64.to_be_bytes());
        assert_eq!(out, expect);
        assert_eq!(disk.snapshot(), vec![0; 4096]);
    }

    /// Random, mostly well-formed request headers (valid magic, commands around the
    /// known range, offsets near the end of the disk) with random payload bytes.
    fn request_stream() -> impl Strategy<Value = Vec<u8>> {
        let one = (
            0u16..10,
            any::<u16>(),
            prop_oneof![0u64..5000, any::<u64>()],
            prop_oneof![0u32..5000, any::<u32>()],
            any::<bool>(),
        )
            .prop_map(|(cmd, flags, offset, len, good_magic)| {
                let mut h = header(&Request { flags: flags & 0x7, cmd, cookie: u64::from(cmd), offset, len });
                if !good_magic {
                    h[3] ^= 0x5a;
                }
                let mut v = h.to_vec();
                if cmd == CMD_WRITE && len < 5000 {
                    v.resize(v.len() + len as usize, 0xee);
                }
                v
            });
        proptest::collection::vec(one, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

        #[test]
        fn parser_never_panics(bytes in proptest::array::uniform28(any::<u8>()), size in any::<u64>(), ro in any::<bool>(), closed in any::<bool>()) {
            if let Ok(r) = parse_request(&bytes) {
                let p = plan(&r, size, ro, closed);
                // Whatever is accepted lies inside the disk.
                match p {
                    Plan::Read { offset, len } | Plan::Write { offset, len, .. } | Plan::Trim { offset, len, .. } | Plan::Zeroes { offset, len, .. } => {
                        prop_assert!(offset.checked_add(u64::from(len)).is_some_and(|e| e <= size));
                        prop_assert!(!closed);
                    }
                    _ => {}
                }
            }
            let _ = parse_info_request(&bytes);
        }

        #[test]
        fn handshake_survives_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), prefix in any::<bool>()) {
            let exports = Arc::new(Exports::new());
            exports.add("d".into(), MemDisk::new(4096, false)).expect("add");
            // Half the cases start with valid client flags and option magic so the
            // random part reaches the option parser.
            let mut input = Vec::new();
            if prefix {
                input.extend_from_slice(&1u32.to_be_bytes());
                input.extend_from_slice(&IHAVEOPT.to_be_bytes());
            }
            input.extend_from_slice(&bytes);
            run_bytes(exports, input);
        }

        #[test]
        fn transmission_survives_random_requests(stream in request_stream(), structured in any::<bool>(), ro in any::<bool>()) {
            let disk = MemDisk::new(4096, ro);
            let exports = Arc::new(Exports::new());
            exports.add("d".into(), disk.clone()).expect("add");
            let mut input = client_hello("d", structured);
            input.extend_from_slice(&stream);
            run_bytes(exports, input);
            if ro {
                prop_assert_eq!(disk.snapshot(), vec![0; 4096]);
            }
        }
    }
}
