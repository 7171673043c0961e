//! HRL logs: the per-disk change log format (full description: `docs/hrl-format.md`).
//!
//! This module owns the bytes of one log file: encoding ([`HrlWriter`]), decoding and
//! verification ([`HrlReader`], [`scan`], [`verify_sealed`]), recovery of a torn tail
//! ([`truncate_torn_tail`]) and the coalesced view that replication ships
//! ([`Coalesced`]). It knows nothing of images, locks or replication.
//!
//! ```text
//! <disk-id>.<seq as 16 hex digits>.hrl
//! +-------------------+  128 bytes: magic "SRHRLOG\0", version, disk id, seq, start ms, crc
//! | file header       |
//! +-------------------+
//! | record 0 header   |  32 bytes: "HRLR", kind, flags, offset, length, crc32c(hdr + data)
//! | record 0 data     |  `length` bytes, writes only
//! +-------------------+
//! | ...               |
//! +-------------------+
//! | footer (sealed)   |  48 bytes: "HRLF", count, data bytes, end ms, chain, crc, "HRL-END\0"
//! +-------------------+
//! ```
//!
//! All integers are little-endian. A log without a footer is *open*: it is read record by
//! record and the first record that is short or fails its checksum ends its valid part.
//! A *sealed* log is verified end to end by the footer's chain checksum.
//!
//! Every decoder is bounded ([`MAX_RECORD_DATA`]) and returns an [`HrlError`] on any
//! input; none of them panics.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

mod coalesce;
mod format;
#[cfg(test)]
mod props;
mod reader;
#[cfg(test)]
mod tests;
mod writer;

pub use coalesce::*;
pub use format::*;
pub use reader::*;
pub use writer::*;

/// Magic at the start of every log file.
pub const FILE_MAGIC: [u8; 8] = *b"SRHRLOG\0";
/// The format version this code writes (2: cancel records). It reads every version
/// from [`MIN_FORMAT_VERSION`] on.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this code reads (1: no cancel records).
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Length of the file header.
pub const FILE_HEADER_LEN: usize = 128;
/// Length of a record header (data follows it).
pub const RECORD_HEADER_LEN: usize = 32;
/// Length of the sealing footer.
pub const FOOTER_LEN: usize = 48;
/// Largest data payload of one write record (NBD's usual maximum request size). Larger
/// writes are split into several records by the tracker.
pub const MAX_RECORD_DATA: u64 = 32 << 20;
/// Room for the disk id in the file header (a [`DiskId`] is at most 63 bytes).
pub const MAX_DISK_ID_LEN: usize = 64;

const RECORD_MAGIC: [u8; 4] = *b"HRLR";
const FOOTER_MAGIC: [u8; 4] = *b"HRLF";
const END_MAGIC: [u8; 8] = *b"HRL-END\0";
/// Record flag: the write was sent with FUA.
pub const FLAG_FUA: u8 = 0x01;
const KNOWN_FLAGS: u8 = FLAG_FUA;

/// Why a log could not be written, read or verified. `at` is always a byte offset in
/// the log file, so an operator can look at the damage with `xxd -s`.
#[derive(Debug, thiserror::Error)]
pub enum HrlError {
    /// Reading or writing the log file failed.
    #[error("log I/O: {0}")]
    Io(#[from] io::Error),
    /// The file header or a record/footer does not start with the expected magic
    /// (not a log, or garbage where a record should be).
    #[error("bad magic at offset {at}")]
    BadMagic { at: u64 },
    /// The file was written by a format version this code does not know.
    #[error("unsupported HRL format version {0}")]
    UnsupportedVersion(u32),
    /// A checksum (header, record or footer) does not match its bytes.
    #[error("{what} checksum mismatch at offset {at}: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch { what: &'static str, at: u64, stored: u32, computed: u32 },
    /// The file ends inside the header, a record or the footer (a torn tail).
    #[error("truncated at offset {at}: {needed} more bytes needed")]
    Truncated { at: u64, needed: u64 },
    /// A write record claims more data than [`MAX_RECORD_DATA`].
    #[error("record at offset {at} too large: {len} bytes (max {MAX_RECORD_DATA})")]
    RecordTooLarge { at: u64, len: u64 },
    /// A record or header field is out of its domain (unknown kind or flags, zero length,
    /// offset + length overflows, non-zero reserved bytes, invalid disk id).
    #[error("malformed {what} at offset {at}")]
    Malformed { what: &'static str, at: u64 },
    /// A footer is intact but disagrees with the records before it.
    #[error("footer at offset {at} disagrees with the log: {what}")]
    FooterMismatch { what: &'static str, at: u64 },
    /// Bytes follow the footer of a sealed log.
    #[error("{len} bytes of trailing data after the footer at offset {at}")]
    TrailingData { at: u64, len: u64 },
    /// The log has no footer where a sealed log was required.
    #[error("log is not sealed (valid part ends at offset {valid_len})")]
    NotSealed { valid_len: u64 },
    /// The header names another disk or sequence number than the file name.
    #[error("header says {found}, file name says {expected}")]
    NameMismatch { expected: String, found: String },
    /// A disk id that cannot be used in a file name or header.
    #[error(transparent)]
    InvalidDiskId(#[from] siterecovery_proto::model::NameError),
    /// The writer was asked to log an invalid record (caller bug).
    #[error("invalid record: {0}")]
    InvalidRecord(&'static str),
    /// The writer refuses appends: the log is sealed, or an earlier append failed and
    /// its tail could not be cut back (it never writes after a partial record).
    #[error("log writer is sealed or broken by an earlier failed append")]
    Broken,
}

/// Sequence number of a log within one disk; increases by one at every seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogSeq(pub u64);

impl LogSeq {
    /// The sequence number after this one.
    pub fn next(self) -> LogSeq {
        LogSeq(self.0 + 1)
    }
}

impl fmt::Display for LogSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Identifier of a disk, as used in log file names and headers: the domain model's
/// (one naming rule for every disk id, so a valid id is always a safe file name).
pub use siterecovery_proto::model::DiskId;

/// File name of log `seq` of `disk`: `<disk-id>.<seq as 16 hex digits>.hrl`.
pub fn log_file_name(disk: &DiskId, seq: LogSeq) -> String {
    format!("{disk}.{seq}.hrl")
}

/// The inverse of [`log_file_name`]: the sequence number if `name` is a log of `disk`.
pub fn parse_log_file_name(disk: &DiskId, name: &str) -> Option<LogSeq> {
    let rest = name.strip_prefix(disk.as_str())?.strip_prefix('.')?;
    let hex = rest.strip_suffix(".hrl")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(LogSeq)
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Unix time in milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Fsyncs a directory so a created, renamed or deleted entry in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}
