//! The NBD server (fixed newstyle) exporting [`crate::disk::BlockDevice`]s on tokio.
//!
//! This module owns the wire protocol between a hypervisor (QEMU's `nbd+unix://` drive,
//! `qemu-img`, `qemu-io`, the kernel's `nbd-client`) and the agent's disks. It knows
//! nothing of HRL logs or replication: every request ends in a [`BlockDevice`] call, and
//! the tracker behind that trait sees each write. The protocol reference is the
//! NetworkBlockDevice project's `doc/proto.md`; who may connect, the caps and the flags
//! are in `agent/docs/nbd-access.md`.
//!
//! # Layout
//!
//! * [`Exports`]: the registry of named devices, shared by every listener. Removing an
//!   export marks it closed: connections that already opened it get `NBD_ESHUTDOWN` for
//!   every further request, new connections cannot open it.
//! * [`serve_unix`] / [`serve_tcp`]: accept loops, one task per connection, stopped by
//!   the shutdown token. [`serve_connection`] runs one plain connection over any byte
//!   stream.
//! * Trust (`tls`): the TCP listener is *TLS mandatory* in `doc/proto.md` terms unless
//!   the agent runs with `--nbd-insecure-tcp` ([`TcpSecurity`]). Before TLS, every option
//!   other than `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is answered
//!   `NBD_REP_ERR_TLS_REQD` (`NBD_OPT_EXPORT_NAME`, which has no error reply, closes the
//!   connection); `STARTTLS` is answered `NBD_REP_ACK` and the TLS handshake follows on
//!   the same socket (nothing the client sent before it is kept: the plaintext phase
//!   reads unbuffered). The client must present a certificate of the vault, not
//!   revoked ([`NbdTls`], made from the agent's `certs::live::Trust`), whose role is
//!   `nbd` (`provider nbd-client-cert`) or `host`; any other role gets
//!   `NBD_REP_ERR_POLICY` with a message for every option. The unix sockets stay plain
//!   (`STARTTLS` there gets `NBD_REP_ERR_POLICY`): who may connect is decided by the
//!   socket's mode and group.
//! * Caps ([`Limits`]): connections at once per listener (the TCP listener's cap is the
//!   agent's; each VM's unix socket has its own, so a flood on TCP never starves a
//!   VM's socket) and per export (counted across listeners: the unix and TCP entries of
//!   one disk share [`ConnSlots`]); over a cap a client is refused at once (accept:
//!   closed; `NBD_OPT_GO`: `NBD_REP_ERR_POLICY`), with a rate-limited log line, never
//!   queued. And the bytes of request payload in flight per connection (below).
//! * Handshake (`handshake`): fixed newstyle, options `EXPORT_NAME`, `GO`, `INFO`,
//!   `LIST`, `ABORT`, `STARTTLS`, `STRUCTURED_REPLY`, `LIST/SET_META_CONTEXT` (answered
//!   with zero contexts), anything else `NBD_REP_ERR_UNSUP`. Option payloads are bounded,
//!   and the whole handshake (TLS included) must finish within 30 s.
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
//!   being read, and memory per connection stays below [`Limits::max_request_bytes`]
//!   (default [`MAX_BYTES_IN_FLIGHT`]) plus buffers. Payload buffers are recycled
//!   through a small per-connection pool.
//!
//! Requests whose payload length is above [`MAX_PAYLOAD`] (32 MiB, the protocol's
//! portable limit and what we advertise in `NBD_INFO_BLOCK_SIZE`): a read gets
//! `NBD_EINVAL`; a write gets `NBD_EINVAL` and the connection is closed without reading
//! the payload. A client that ignores the advertised maximum is broken or hostile, the
//! protocol allows a hard disconnect for it, and draining up to 4 GiB to stay in sync
//! with such a peer only keeps it talking. `TRIM` and `WRITE_ZEROES` carry no payload
//! and may be larger (QEMU sends discards of up to 2 GiB), as the protocol says.
//! The devices punch a hole for both (a thin image stays thin); `WRITE_ZEROES` with
//! `NO_HOLE` reaches the device as `no_hole` and keeps the range allocated.
//! `SEND_FAST_ZERO` is not advertised, so a client never sets `FAST_ZERO` (the plan
//! rejects the unknown flag with `NBD_EINVAL`).

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
/// Default read and write payload bytes one connection may hold in flight.
pub const MAX_BYTES_IN_FLIGHT: usize = 64 << 20;
/// Longest export name we accept (the protocol's own limit is 4 KiB).
pub const MAX_NAME_LEN: usize = 4096;
/// Largest option payload we read during the handshake: a name plus small fields.
const MAX_OPTION_LEN: u32 = MAX_NAME_LEN as u32 + 1024;
/// Oversized option payloads up to this are drained and refused with
/// `NBD_REP_ERR_TOO_BIG`; beyond it the connection is closed.
const MAX_OPTION_DISCARD: u32 = 1 << 20;
/// A client must finish the handshake (TLS included) within this time.
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
/// Longest piece of a client-supplied string (export name, identity) put in a log line.
const LOG_CHARS: usize = 80;

mod handshake;
mod limits;
mod plan;
mod protocol;
mod server;
pub mod stats;
#[cfg(test)]
mod tests;
mod tls;
#[cfg(test)]
mod tls_tests;
mod transmission;

use handshake::*;
use limits::Refusals;
pub use limits::{ConnSlots, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_EXPORT_CONNECTIONS, Limits, LimitsError};
use plan::*;
use protocol::*;
#[cfg(test)]
use server::serve_tls;
pub use server::{serve_connection, serve_tcp, serve_unix};
use stats::{ExportStats, Op};
pub use tls::{NbdTls, TcpSecurity};
use transmission::*;

/// At most [`LOG_CHARS`] characters of a client-supplied string, for a log line.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(LOG_CHARS).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

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
    /// so the protocol says to close the connection. The name is cut for logs.
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// `NBD_OPT_EXPORT_NAME` on a TLS-mandatory listener before `NBD_OPT_STARTTLS` (or
    /// by a client whose certificate may not open exports): it has no error reply, so
    /// the connection is closed.
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    ExportNameRefused(&'static str),
    /// `NBD_OPT_EXPORT_NAME` for an export already at its connection cap.
    #[error("export {0:?} is at its connection cap")]
    ExportBusy(String),
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (no client certificate, one
    /// of another vault, a revoked or expired one, not TLS at all).
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
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
    /// Connections that opened this export, counted with the other listeners' entries
    /// of the same disk.
    slots: ConnSlots,
    /// I/O counters, shared likewise (by name).
    stats: Arc<ExportStats>,
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

/// The devices served over NBD, by export name; shared by all listeners of one kind
/// and safe to change while serving (a VM started or stopped). Carries the [`Limits`]
/// its listeners apply.
pub struct Exports {
    map: RwLock<HashMap<String, Arc<Export>>>,
    limits: Limits,
    /// Connections at once on the listeners serving this registry.
    listener: ConnSlots,
    /// Refusals over a cap, logged at most once per interval.
    refusals: Refusals,
    /// Connections that failed (handshake, TLS, protocol), logged likewise.
    failures: Refusals,
}

impl Default for Exports {
    fn default() -> Self {
        Self::with_limits(Limits::default())
    }
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports").field("names", &self.names()).field("limits", &self.limits).finish()
    }
}

impl Exports {
    /// An empty registry with the default [`Limits`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry whose listeners apply `limits`.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
            limits,
            listener: ConnSlots::new(limits.max_connections),
            refusals: Refusals::default(),
            failures: Refusals::default(),
        }
    }

    /// The limits this registry's listeners apply.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Registers `dev` under `name` with a connection cap of its own; refuses a name
    /// already in use or longer than [`MAX_NAME_LEN`]. The empty name is the
    /// protocol's default export.
    pub fn add(&self, name: String, dev: Arc<dyn BlockDevice>) -> Result<(), NbdError> {
        let slots = ConnSlots::new(self.limits.max_export_connections);
        self.add_with_slots(name, dev, slots)
    }

    /// [`Self::add`] counting connections in `slots`, shared with the entries of the
    /// same device in other registries (a disk on its VM's socket and on TCP).
    pub fn add_with_slots(&self, name: String, dev: Arc<dyn BlockDevice>, slots: ConnSlots) -> Result<(), NbdError> {
        if name.len() > MAX_NAME_LEN {
            return Err(NbdError::ExportName(name.len()));
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&name) {
            return Err(NbdError::DuplicateExport(name));
        }
        let stats = stats::for_export(&name);
        map.insert(name, Arc::new(Export { dev, closed: AtomicBool::new(false), slots, stats }));
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
