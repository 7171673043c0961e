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

mod handshake;
mod plan;
mod protocol;
mod server;
#[cfg(test)]
mod tests;
mod transmission;

use handshake::*;
use plan::*;
use protocol::*;
pub use server::{serve_connection, serve_tcp, serve_unix};
use transmission::*;

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
