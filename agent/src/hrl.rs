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
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, IoSlice, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Magic at the start of every log file.
pub const FILE_MAGIC: [u8; 8] = *b"SRHRLOG\0";
/// The only format version this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;
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

/// What a record does to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `length` bytes of data follow the record header.
    Write = 1,
    /// The range reads as zeroes (NBD WRITE_ZEROES); no data.
    Zeroes = 2,
    /// The range was discarded (NBD TRIM); reads as zeroes in our implementation; no data.
    Trim = 3,
}

impl RecordKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zeroes),
            3 => Some(RecordKind::Trim),
            _ => None,
        }
    }
}

/// The decoded file header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogHeader {
    pub disk_id: DiskId,
    pub seq: LogSeq,
    /// Unix time in milliseconds when the log was created.
    pub start_ms: u64,
}

impl LogHeader {
    fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&FILE_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(self.disk_id.as_str().len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.start_ms.to_le_bytes());
        b[32..32 + self.disk_id.as_str().len()].copy_from_slice(self.disk_id.as_str().as_bytes());
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; FILE_HEADER_LEN]) -> Result<Self, HrlError> {
        if b[0..8] != FILE_MAGIC {
            return Err(HrlError::BadMagic { at: 0 });
        }
        let stored = le_u32(&b[124..128]);
        let computed = crc32c::crc32c(&b[..124]);
        if stored != computed {
            return Err(HrlError::ChecksumMismatch { what: "file header", at: 0, stored, computed });
        }
        let version = le_u32(&b[8..12]);
        if version != FORMAT_VERSION {
            return Err(HrlError::UnsupportedVersion(version));
        }
        let id_len = le_u32(&b[12..16]) as usize;
        if id_len == 0 || id_len > MAX_DISK_ID_LEN || b[32 + id_len..124].iter().any(|&x| x != 0) {
            return Err(HrlError::Malformed { what: "file header", at: 0 });
        }
        let id =
            std::str::from_utf8(&b[32..32 + id_len]).map_err(|_| HrlError::Malformed { what: "disk id", at: 32 })?;
        let disk_id = DiskId::new(id).map_err(|_| HrlError::Malformed { what: "disk id", at: 32 })?;
        Ok(LogHeader { disk_id, seq: LogSeq(le_u64(&b[16..24])), start_ms: le_u64(&b[24..32]) })
    }

    /// The first value of the log's chain checksum: binds the records to this header.
    fn chain_seed(&self) -> u32 {
        crc32c::crc32c(&self.encode())
    }
}

/// The decoded sealing footer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogFooter {
    pub record_count: u64,
    /// Sum of the data bytes of all write records.
    pub data_bytes: u64,
    /// Unix time in milliseconds when the log was sealed.
    pub end_ms: u64,
    /// Chain checksum over every record header (see the format doc).
    pub chain: u32,
}

impl LogFooter {
    fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..4].copy_from_slice(&FOOTER_MAGIC);
        b[8..16].copy_from_slice(&self.record_count.to_le_bytes());
        b[16..24].copy_from_slice(&self.data_bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.end_ms.to_le_bytes());
        b[32..36].copy_from_slice(&self.chain.to_le_bytes());
        let crc = crc32c::crc32c(&b[..36]);
        b[36..40].copy_from_slice(&crc.to_le_bytes());
        b[40..48].copy_from_slice(&END_MAGIC);
        b
    }

    fn decode(b: &[u8; FOOTER_LEN], at: u64) -> Result<Self, HrlError> {
        if b[0..4] != FOOTER_MAGIC || b[40..48] != END_MAGIC {
            return Err(HrlError::BadMagic { at });
        }
        let stored = le_u32(&b[36..40]);
        let computed = crc32c::crc32c(&b[..36]);
        if stored != computed {
            return Err(HrlError::ChecksumMismatch { what: "footer", at, stored, computed });
        }
        if b[4..8] != [0; 4] {
            return Err(HrlError::Malformed { what: "footer", at });
        }
        Ok(LogFooter {
            record_count: le_u64(&b[8..16]),
            data_bytes: le_u64(&b[16..24]),
            end_ms: le_u64(&b[24..32]),
            chain: le_u32(&b[32..36]),
        })
    }
}

/// One decoded record (without its data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Offset of the record header in the log file.
    pub pos: u64,
    pub kind: RecordKind,
    pub flags: u8,
    /// Disk offset the record applies to.
    pub offset: u64,
    /// Length of the disk range (= data length for writes).
    pub length: u64,
}

impl Record {
    /// Offset of the record's data in the log file (writes only).
    pub fn data_pos(&self) -> u64 {
        self.pos + RECORD_HEADER_LEN as u64
    }
    /// Bytes the record occupies in the log file.
    pub fn encoded_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + if self.kind == RecordKind::Write { self.length } else { 0 }
    }
}

/// A record header ready to append: built (and its checksum computed over the data)
/// *before* the tracker takes its lock, so the lock covers only the copies.
#[derive(Clone, Copy, Debug)]
pub struct EncodedRecord {
    bytes: [u8; RECORD_HEADER_LEN],
    data_len: u64,
}

impl EncodedRecord {
    /// Encodes a record. `data` must be empty for zeroes/trim and have `length` bytes
    /// for a write.
    pub fn new(kind: RecordKind, flags: u8, offset: u64, length: u64, data: &[u8]) -> Result<Self, HrlError> {
        if length == 0 {
            return Err(HrlError::InvalidRecord("zero length"));
        }
        if offset.checked_add(length).is_none() {
            return Err(HrlError::InvalidRecord("offset + length overflows"));
        }
        if flags & !KNOWN_FLAGS != 0 {
            return Err(HrlError::InvalidRecord("unknown flags"));
        }
        let data_len = match kind {
            RecordKind::Write => {
                if data.len() as u64 != length {
                    return Err(HrlError::InvalidRecord("data length differs from record length"));
                }
                if length > MAX_RECORD_DATA {
                    return Err(HrlError::InvalidRecord("write larger than MAX_RECORD_DATA"));
                }
                length
            }
            RecordKind::Zeroes | RecordKind::Trim => {
                if !data.is_empty() {
                    return Err(HrlError::InvalidRecord("data on a zeroes/trim record"));
                }
                0
            }
        };
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&RECORD_MAGIC);
        b[4] = kind as u8;
        b[5] = flags;
        b[8..16].copy_from_slice(&offset.to_le_bytes());
        b[16..24].copy_from_slice(&length.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..28]), data);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        Ok(EncodedRecord { bytes: b, data_len })
    }
}

/// Appends records to one log file. Not synchronised: the tracker serialises access.
#[derive(Debug)]
pub struct HrlWriter {
    file: File,
    path: PathBuf,
    header: LogHeader,
    /// Length of the valid part; the file cursor is always here between appends.
    pos: u64,
    record_count: u64,
    data_bytes: u64,
    chain: u32,
    /// An append or seal failed and the tail could not be cut back.
    broken: bool,
    /// The footer is written; no more appends.
    sealed: bool,
}

impl HrlWriter {
    /// Creates log `seq` of `disk_id` in `dir` (fails if it exists), writes and syncs its
    /// header and syncs the directory, so the new file survives a crash.
    pub fn create(dir: &Path, disk_id: &DiskId, seq: LogSeq) -> Result<Self, HrlError> {
        let path = dir.join(log_file_name(disk_id, seq));
        let header = LogHeader { disk_id: disk_id.clone(), seq, start_ms: now_ms() };
        let mut file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
        file.write_all(&header.encode())?;
        file.sync_all()?;
        sync_dir(dir)?;
        let chain = header.chain_seed();
        Ok(HrlWriter {
            file,
            path,
            header,
            pos: FILE_HEADER_LEN as u64,
            record_count: 0,
            data_bytes: 0,
            chain,
            broken: false,
            sealed: false,
        })
    }

    /// Reopens an open (unsealed) log for appending after recovery: truncates a torn
    /// tail to the last whole record and positions after it. Fails on a sealed log.
    pub fn open_append(path: &Path) -> Result<Self, HrlError> {
        let scan = scan(path)?;
        if let ScanEnd::Sealed(_) = scan.end {
            return Err(HrlError::Malformed { what: "open log (it is sealed)", at: scan.valid_len });
        }
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        if file.metadata()?.len() != scan.valid_len {
            file.set_len(scan.valid_len)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start(scan.valid_len))?;
        Ok(HrlWriter {
            file,
            path: path.to_owned(),
            header: scan.header,
            pos: scan.valid_len,
            record_count: scan.record_count,
            data_bytes: scan.data_bytes,
            chain: scan.chain,
            broken: false,
            sealed: false,
        })
    }

    /// Appends one record (header and data in one vectored write). On failure the file
    /// is cut back to the previous record boundary; if even that fails the writer
    /// refuses all further appends ([`HrlError::Broken`]).
    pub fn append(&mut self, rec: &EncodedRecord, data: &[u8]) -> Result<(), HrlError> {
        if self.broken || self.sealed {
            return Err(HrlError::Broken);
        }
        let data = if rec.data_len == 0 { &[][..] } else { data };
        if data.len() as u64 != rec.data_len {
            return Err(HrlError::InvalidRecord("data length differs from the encoded record"));
        }
        if let Err(e) = write_all_vectored(&mut self.file, &rec.bytes, data) {
            let restored = self.file.set_len(self.pos).and_then(|()| self.file.seek(SeekFrom::Start(self.pos)));
            if restored.is_err() {
                self.broken = true;
            }
            return Err(e.into());
        }
        self.pos += RECORD_HEADER_LEN as u64 + rec.data_len;
        self.record_count += 1;
        self.data_bytes += rec.data_len;
        self.chain = crc32c::crc32c_append(self.chain, &rec.bytes);
        Ok(())
    }

    /// Makes every appended record durable (fdatasync).
    pub fn sync(&self) -> Result<(), HrlError> {
        Ok(self.file.sync_data()?)
    }

    /// A handle on the file for syncing without holding the writer (group commit).
    pub fn try_clone_file(&self) -> Result<File, HrlError> {
        Ok(self.file.try_clone()?)
    }

    /// Writes the footer and fsyncs: the log is sealed and verifiable end to end; the
    /// writer accepts no more records. Returns the footer and the file's final length.
    /// On failure the footer is cut away again and the log stays open.
    pub fn seal(&mut self) -> Result<(LogFooter, u64), HrlError> {
        if self.broken || self.sealed {
            return Err(HrlError::Broken);
        }
        let footer = LogFooter {
            record_count: self.record_count,
            data_bytes: self.data_bytes,
            end_ms: now_ms(),
            chain: self.chain,
        };
        let done = self.file.write_all(&footer.encode()).and_then(|()| self.file.sync_all());
        if let Err(e) = done {
            let restored = self.file.set_len(self.pos).and_then(|()| self.file.seek(SeekFrom::Start(self.pos)));
            if restored.is_err() {
                self.broken = true;
            }
            return Err(e.into());
        }
        self.sealed = true;
        Ok((footer, self.pos + FOOTER_LEN as u64))
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Bytes of the log so far (header and whole records).
    pub fn len(&self) -> u64 {
        self.pos
    }
    /// True when no record has been appended.
    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }
    pub fn record_count(&self) -> u64 {
        self.record_count
    }
}

/// `write_all` for two buffers with one `writev` in the common case (no copy of the
/// data into a staging buffer).
fn write_all_vectored(file: &mut File, head: &[u8], data: &[u8]) -> io::Result<()> {
    let mut bufs = [IoSlice::new(head), IoSlice::new(data)];
    let mut slices: &mut [IoSlice<'_>] = &mut bufs;
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "failed to write log record")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a log sequentially, verifying every checksum. Works on any `Read` (a file, a
/// byte slice, a network stream of a log).
#[derive(Debug)]
pub struct HrlReader<R> {
    inner: R,
    header: LogHeader,
    /// Offset of the next unread byte.
    pos: u64,
    record_count: u64,
    data_bytes: u64,
    chain: u32,
    footer: Option<LogFooter>,
    /// Set once the reader has returned the end (footer, EOF or an error).
    done: bool,
}

impl HrlReader<BufReader<File>> {
    /// Opens a log file and checks its header.
    pub fn open(path: &Path) -> Result<Self, HrlError> {
        HrlReader::new(BufReader::with_capacity(256 << 10, File::open(path)?))
    }
}

impl<R: Read> HrlReader<R> {
    /// Reads and checks the file header.
    pub fn new(mut inner: R) -> Result<Self, HrlError> {
        let mut b = [0u8; FILE_HEADER_LEN];
        let got = read_full(&mut inner, &mut b)?;
        if got < FILE_HEADER_LEN {
            return Err(HrlError::Truncated { at: got as u64, needed: (FILE_HEADER_LEN - got) as u64 });
        }
        let header = LogHeader::decode(&b)?;
        let chain = header.chain_seed();
        Ok(HrlReader {
            inner,
            header,
            pos: FILE_HEADER_LEN as u64,
            record_count: 0,
            data_bytes: 0,
            chain,
            footer: None,
            done: false,
        })
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }
    /// The footer, once the reader has reached it.
    pub fn footer(&self) -> Option<LogFooter> {
        self.footer
    }
    /// End of the last whole, verified record (or of the footer once it is read).
    pub fn valid_len(&self) -> u64 {
        self.pos
    }

    /// Reads the next record, its data (writes only) into `data`. `Ok(None)` at a clean
    /// end: after a verified footer (which must end the file) or at EOF on a record
    /// boundary (an open log). Any damage is an `Err`; after it, the reader is done.
    pub fn next_record(&mut self, data: &mut Vec<u8>) -> Result<Option<Record>, HrlError> {
        if self.done {
            return Ok(None);
        }
        let r = self.next_inner(data);
        if !matches!(r, Ok(Some(_))) {
            self.done = true;
        }
        r
    }

    fn next_inner(&mut self, data: &mut Vec<u8>) -> Result<Option<Record>, HrlError> {
        let at = self.pos;
        let mut head = [0u8; RECORD_HEADER_LEN];
        let got = read_full(&mut self.inner, &mut head[..4])?;
        if got == 0 {
            return Ok(None);
        }
        if got < 4 {
            return Err(HrlError::Truncated { at: at + got as u64, needed: (4 - got) as u64 });
        }
        if head[0..4] == FOOTER_MAGIC {
            return self.read_footer(at, &head[..4]).map(|()| None);
        }
        if head[0..4] != RECORD_MAGIC {
            return Err(HrlError::BadMagic { at });
        }
        let got = read_full(&mut self.inner, &mut head[4..])?;
        if got < RECORD_HEADER_LEN - 4 {
            return Err(HrlError::Truncated { at: at + 4 + got as u64, needed: (RECORD_HEADER_LEN - 4 - got) as u64 });
        }
        let kind = RecordKind::from_u8(head[4]).ok_or(HrlError::Malformed { what: "record kind", at })?;
        let flags = head[5];
        let offset = le_u64(&head[8..16]);
        let length = le_u64(&head[16..24]);
        if flags & !KNOWN_FLAGS != 0 || head[6..8] != [0, 0] || head[24..28] != [0; 4] {
            return Err(HrlError::Malformed { what: "record header", at });
        }
        if length == 0 || offset.checked_add(length).is_none() {
            return Err(HrlError::Malformed { what: "record range", at });
        }
        data.clear();
        if kind == RecordKind::Write {
            if length > MAX_RECORD_DATA {
                return Err(HrlError::RecordTooLarge { at, len: length });
            }
            // Bounded by MAX_RECORD_DATA above; `take` stops at EOF without trusting
            // the length for the allocation beyond that bound.
            data.reserve(length as usize);
            let got = (&mut self.inner).take(length).read_to_end(data)? as u64;
            if got < length {
                return Err(HrlError::Truncated { at: at + RECORD_HEADER_LEN as u64 + got, needed: length - got });
            }
        }
        let stored = le_u32(&head[28..32]);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&head[..28]), data);
        if stored != computed {
            return Err(HrlError::ChecksumMismatch { what: "record", at, stored, computed });
        }
        let rec = Record { pos: at, kind, flags, offset, length };
        self.pos += rec.encoded_len();
        self.record_count += 1;
        self.data_bytes += data.len() as u64;
        self.chain = crc32c::crc32c_append(self.chain, &head);
        Ok(Some(rec))
    }

    fn read_footer(&mut self, at: u64, magic: &[u8]) -> Result<(), HrlError> {
        let mut b = [0u8; FOOTER_LEN];
        b[..4].copy_from_slice(magic);
        let got = read_full(&mut self.inner, &mut b[4..])?;
        if got < FOOTER_LEN - 4 {
            return Err(HrlError::Truncated { at: at + 4 + got as u64, needed: (FOOTER_LEN - 4 - got) as u64 });
        }
        let footer = LogFooter::decode(&b, at)?;
        if footer.record_count != self.record_count {
            return Err(HrlError::FooterMismatch { what: "record count", at });
        }
        if footer.data_bytes != self.data_bytes {
            return Err(HrlError::FooterMismatch { what: "data bytes", at });
        }
        if footer.chain != self.chain {
            return Err(HrlError::FooterMismatch { what: "chain checksum", at });
        }
        let mut probe = [0u8; 1];
        let extra = read_full(&mut self.inner, &mut probe)?;
        if extra != 0 {
            let rest = io::copy(&mut (&mut self.inner).take(u64::MAX), &mut io::sink())?;
            return Err(HrlError::TrailingData { at: at + FOOTER_LEN as u64, len: 1 + rest });
        }
        self.pos = at + FOOTER_LEN as u64;
        self.footer = Some(footer);
        Ok(())
    }
}

/// How the valid part of a log ends.
#[derive(Debug)]
pub enum ScanEnd {
    /// A verified footer ends the file.
    Sealed(LogFooter),
    /// EOF on a record boundary: an open log with no damage.
    Open,
    /// An open (or damaged sealed) log whose tail is torn or corrupt from `valid_len` on.
    Torn(HrlError),
}

/// What a full pass over a log found.
#[derive(Debug)]
pub struct LogScan {
    pub header: LogHeader,
    pub record_count: u64,
    pub data_bytes: u64,
    /// Chain checksum over the valid records.
    pub chain: u32,
    /// Length of the valid part: header + whole verified records (+ footer if sealed).
    pub valid_len: u64,
    pub end: ScanEnd,
}

/// Reads a whole log and reports where its valid part ends. Errors only when the header
/// itself is unreadable (not a log of this format).
pub fn scan(path: &Path) -> Result<LogScan, HrlError> {
    let mut reader = HrlReader::open(path)?;
    scan_reader(&mut reader)
}

fn scan_reader<R: Read>(reader: &mut HrlReader<R>) -> Result<LogScan, HrlError> {
    let mut data = Vec::new();
    let end = loop {
        match reader.next_record(&mut data) {
            Ok(Some(_)) => {}
            Ok(None) => break reader.footer().map_or(ScanEnd::Open, ScanEnd::Sealed),
            Err(HrlError::Io(e)) => return Err(HrlError::Io(e)),
            Err(e) => break ScanEnd::Torn(e),
        }
    };
    Ok(LogScan {
        header: reader.header.clone(),
        record_count: reader.record_count,
        data_bytes: reader.data_bytes,
        chain: reader.chain,
        valid_len: reader.pos,
        end,
    })
}

/// Verifies a sealed log end to end: header, every record checksum, the footer and its
/// chain checksum, nothing after the footer.
pub fn verify_sealed(path: &Path) -> Result<LogFooter, HrlError> {
    let scan = scan(path)?;
    match scan.end {
        ScanEnd::Sealed(f) => Ok(f),
        ScanEnd::Open => Err(HrlError::NotSealed { valid_len: scan.valid_len }),
        ScanEnd::Torn(e) => Err(e),
    }
}

/// Recovery of an open log after a crash: cuts the file after its last whole, verified
/// record (or after the footer of a sealed log) and fsyncs. Returns the valid length.
pub fn truncate_torn_tail(path: &Path) -> Result<u64, HrlError> {
    let scan = scan(path)?;
    let file = OpenOptions::new().write(true).open(path)?;
    if file.metadata()?.len() != scan.valid_len {
        file.set_len(scan.valid_len)?;
        file.sync_all()?;
    }
    Ok(scan.valid_len)
}

/// One extent of a coalesced log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: RecordKind,
    /// Where the extent's data starts in the log file (writes only).
    pub data_pos: u64,
}

/// An item of the coalesced iteration: what replication ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoalescedItem {
    /// Write `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// Zero `len` bytes at `offset`.
    Zeroes { offset: u64, len: u64 },
    /// Discard `len` bytes at `offset` (reads as zeroes).
    Trim { offset: u64, len: u64 },
}

/// The last version of every byte range written in a sealed log, as non-overlapping
/// extents in ascending offset order. Data stays in the log file and is read on demand,
/// so a log of any size coalesces in memory proportional to its record count.
#[derive(Debug)]
pub struct Coalesced<R> {
    source: R,
    header: LogHeader,
    footer: LogFooter,
    extents: Vec<Extent>,
}

impl Coalesced<File> {
    /// Verifies the sealed log at `path` and builds its coalesced view.
    pub fn open(path: &Path) -> Result<Self, HrlError> {
        Coalesced::new(File::open(path)?)
    }
}

impl<R: Read + Seek> Coalesced<R> {
    /// Verifies the sealed log in `source` (every checksum, footer) and coalesces it.
    pub fn new(mut source: R) -> Result<Self, HrlError> {
        source.seek(SeekFrom::Start(0))?;
        let mut reader = HrlReader::new(BufReader::with_capacity(256 << 10, &mut source))?;
        let mut map = IntervalMap::default();
        let mut data = Vec::new();
        while let Some(rec) = reader.next_record(&mut data)? {
            map.insert(Extent { offset: rec.offset, len: rec.length, kind: rec.kind, data_pos: rec.data_pos() });
        }
        let footer = reader.footer().ok_or(HrlError::NotSealed { valid_len: reader.valid_len() })?;
        let header = reader.header().clone();
        drop(reader);
        Ok(Coalesced { source, header, footer, extents: map.into_extents() })
    }

    pub fn header(&self) -> &LogHeader {
        &self.header
    }
    pub fn footer(&self) -> &LogFooter {
        &self.footer
    }
    /// The extents, ascending by offset, non-overlapping.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
    /// Bytes of write data the coalesced log ships (≤ the log's data bytes).
    pub fn write_bytes(&self) -> u64 {
        self.extents.iter().filter(|e| e.kind == RecordKind::Write).map(|e| e.len).sum()
    }

    /// Reads the data of a write extent into `buf` (resized to `extent.len`). The log's
    /// checksums were verified when it was coalesced; the file is not expected to change.
    pub fn read_data(&mut self, extent: &Extent, buf: &mut Vec<u8>) -> Result<(), HrlError> {
        if extent.kind != RecordKind::Write || extent.len > MAX_RECORD_DATA {
            return Err(HrlError::InvalidRecord("not a write extent"));
        }
        buf.resize(extent.len as usize, 0);
        self.source.seek(SeekFrom::Start(extent.data_pos))?;
        self.source.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => HrlError::Truncated { at: extent.data_pos, needed: extent.len },
            _ => HrlError::Io(e),
        })
    }

    /// Iterates the coalesced items in ascending offset order, reading data as it goes.
    pub fn items(&mut self) -> impl Iterator<Item = Result<CoalescedItem, HrlError>> + '_ {
        let mut i = 0;
        std::iter::from_fn(move || {
            let e = *self.extents.get(i)?;
            i += 1;
            Some(match e.kind {
                RecordKind::Write => {
                    let mut data = Vec::new();
                    self.read_data(&e, &mut data).map(|()| CoalescedItem::Write { offset: e.offset, data })
                }
                RecordKind::Zeroes => Ok(CoalescedItem::Zeroes { offset: e.offset, len: e.len }),
                RecordKind::Trim => Ok(CoalescedItem::Trim { offset: e.offset, len: e.len }),
            })
        })
    }
}

/// Non-overlapping extents keyed by start offset; a later insert cuts away whatever
/// part of older extents it covers.
#[derive(Default, Debug)]
struct IntervalMap {
    map: BTreeMap<u64, Extent>,
}

impl IntervalMap {
    fn insert(&mut self, new: Extent) {
        let start = new.offset;
        let end = new.offset + new.len; // the reader checked this does not overflow
        // An extent starting before `start` that reaches into the new one: keep its head,
        // and its tail too if it reaches past `end`.
        if let Some((&s, &old)) = self.map.range(..start).next_back() {
            let old_end = s + old.len;
            if old_end > start {
                self.map.insert(s, Extent { len: start - s, ..old });
                if old_end > end {
                    self.map.insert(end, cut_front(old, end));
                }
            }
        }
        // Extents starting inside the new range: drop them, keeping a tail past `end`.
        let inside: Vec<u64> = self.map.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some(old) = self.map.remove(&s)
                && s + old.len > end
            {
                self.map.insert(end, cut_front(old, end));
            }
        }
        self.map.insert(start, new);
    }

    fn into_extents(self) -> Vec<Extent> {
        self.map.into_values().collect()
    }
}

/// The part of `e` from disk offset `at` (inside `e`) on.
fn cut_front(e: Extent, at: u64) -> Extent {
    let skip = at - e.offset;
    let data_pos = if e.kind == RecordKind::Write { e.data_pos + skip } else { e.data_pos };
    Extent { offset: at, len: e.len - skip, kind: e.kind, data_pos }
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    fn disk() -> DiskId {
        DiskId::new("disk-0").expect("valid id")
    }

    /// Ops as (kind, offset, length, fill byte) on a small disk.
    type Op = (RecordKind, u64, u64, u8);

    fn write_log(dir: &Path, seq: u64, ops: &[Op], seal: bool) -> PathBuf {
        let mut w = HrlWriter::create(dir, &disk(), LogSeq(seq)).expect("create");
        for &(kind, off, len, fill) in ops {
            let data = if kind == RecordKind::Write { vec![fill; len as usize] } else { Vec::new() };
            let rec = EncodedRecord::new(kind, 0, off, len, &data).expect("encode");
            w.append(&rec, &data).expect("append");
        }
        let path = w.path().to_owned();
        if seal {
            w.seal().expect("seal");
        }
        path
    }

    fn apply_in_order(size: usize, ops: &[Op]) -> Vec<u8> {
        let mut img = vec![0u8; size];
        for &(kind, off, len, fill) in ops {
            let v = if kind == RecordKind::Write { fill } else { 0 };
            img[off as usize..(off + len) as usize].fill(v);
        }
        img
    }

    fn apply_coalesced<R: Read + Seek>(size: usize, c: &mut Coalesced<R>) -> Vec<u8> {
        let mut img = vec![0u8; size];
        let mut last_end = 0;
        for item in c.items() {
            let (off, len, bytes) = match item.expect("item") {
                CoalescedItem::Write { offset, data } => (offset, data.len() as u64, Some(data)),
                CoalescedItem::Zeroes { offset, len } | CoalescedItem::Trim { offset, len } => (offset, len, None),
            };
            assert!(off >= last_end, "extents must ascend without overlap");
            last_end = off + len;
            match bytes {
                Some(d) => img[off as usize..last_end as usize].copy_from_slice(&d),
                None => img[off as usize..last_end as usize].fill(0),
            }
        }
        img
    }

    #[test]
    fn round_trip_and_seal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ops = [(RecordKind::Write, 0, 4096, 1), (RecordKind::Zeroes, 100, 10, 0), (RecordKind::Trim, 8192, 512, 0)];
        let path = write_log(dir.path(), 7, &ops, true);
        assert_eq!(path.file_name().and_then(|n| n.to_str()), Some("disk-0.0000000000000007.hrl"));
        let footer = verify_sealed(&path).expect("verify");
        assert_eq!(footer.record_count, 3);
        assert_eq!(footer.data_bytes, 4096);
        let mut r = HrlReader::open(&path).expect("open");
        assert_eq!(r.header().seq, LogSeq(7));
        let mut data = Vec::new();
        let rec = r.next_record(&mut data).expect("rec").expect("some");
        assert_eq!((rec.kind, rec.offset, rec.length), (RecordKind::Write, 0, 4096));
        assert!(data.iter().all(|&b| b == 1));
        assert_eq!(parse_log_file_name(&disk(), "disk-0.0000000000000007.hrl"), Some(LogSeq(7)));
        assert_eq!(parse_log_file_name(&disk(), "disk-00.0000000000000007.hrl"), None);
    }

    #[test]
    fn open_log_is_not_sealed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_log(dir.path(), 1, &[(RecordKind::Write, 0, 10, 3)], false);
        assert!(matches!(verify_sealed(&path), Err(HrlError::NotSealed { .. })));
        let s = scan(&path).expect("scan");
        assert!(matches!(s.end, ScanEnd::Open));
        assert_eq!(s.record_count, 1);
    }

    #[test]
    fn chopped_mid_record_is_truncated_to_last_whole_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ops = [(RecordKind::Write, 0, 1000, 1), (RecordKind::Write, 500, 1000, 2), (RecordKind::Write, 0, 3000, 3)];
        let path = write_log(dir.path(), 1, &ops, false);
        let full = std::fs::metadata(&path).expect("meta").len();
        let two = (FILE_HEADER_LEN + 2 * RECORD_HEADER_LEN + 2000) as u64;
        for cut in [two + 1, two + 20, two + RECORD_HEADER_LEN as u64 + 7, full - 1] {
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(cut).expect("chop");
            let s = scan(&path).expect("scan");
            assert!(matches!(s.end, ScanEnd::Torn(HrlError::Truncated { .. })), "cut {cut}: {:?}", s.end);
            assert_eq!(truncate_torn_tail(&path).expect("truncate"), two);
            assert_eq!(std::fs::metadata(&path).expect("meta").len(), two);
            let s = scan(&path).expect("scan");
            assert!(matches!(s.end, ScanEnd::Open));
            assert_eq!(s.record_count, 2);
            // Appending after recovery continues the chain: the sealed log verifies.
            let mut w = HrlWriter::open_append(&path).expect("reopen");
            let data = vec![3u8; 3000];
            w.append(&EncodedRecord::new(RecordKind::Write, 0, 0, 3000, &data).expect("enc"), &data).expect("append");
            w.seal().expect("seal");
            assert_eq!(verify_sealed(&path).expect("verify").record_count, 3);
            // Unseal again for the next cut.
            let f = OpenOptions::new().write(true).open(&path).expect("open");
            f.set_len(full).expect("unseal");
        }
    }

    #[test]
    fn corrupt_data_byte_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_log(dir.path(), 1, &[(RecordKind::Write, 0, 100, 1), (RecordKind::Write, 0, 100, 2)], true);
        let mut bytes = std::fs::read(&path).expect("read");
        let second = FILE_HEADER_LEN + RECORD_HEADER_LEN + 100;
        bytes[second + RECORD_HEADER_LEN + 5] ^= 0x40;
        std::fs::write(&path, &bytes).expect("write");
        match verify_sealed(&path) {
            Err(HrlError::ChecksumMismatch { at, .. }) => assert_eq!(at, second as u64),
            other => panic!("expected checksum mismatch, got {other:?}"),
        }
        assert_eq!(truncate_torn_tail(&path).expect("truncate"), second as u64);
    }

    #[test]
    fn coalesce_keeps_last_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ops: Vec<Op> = (0..100).map(|i| (RecordKind::Write, 4096, 4096, i as u8)).collect();
        ops.push((RecordKind::Write, 0, 6000, 200));
        ops.push((RecordKind::Zeroes, 5000, 100, 0));
        let path = write_log(dir.path(), 1, &ops, true);
        let mut c = Coalesced::open(&path).expect("coalesce");
        let ex: Vec<(u64, u64, RecordKind)> = c.extents().iter().map(|e| (e.offset, e.len, e.kind)).collect();
        assert_eq!(
            ex,
            vec![
                (0, 5000, RecordKind::Write),
                (5000, 100, RecordKind::Zeroes),
                (5100, 900, RecordKind::Write),
                (6000, 2192, RecordKind::Write)
            ]
        );
        assert_eq!(c.write_bytes(), 5000 + 900 + 2192);
        assert_eq!(apply_coalesced(16384, &mut c), apply_in_order(16384, &ops));
    }

    fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
        (0..3u8, 0..size, 1..=size / 4, any::<u8>()).prop_map(move |(k, off, len, fill)| {
            let kind = RecordKind::from_u8(k + 1).unwrap_or(RecordKind::Write);
            let len = len.min(size - off).max(1);
            let off = off.min(size - len);
            (kind, off, len, fill)
        })
    }

    fn log_bytes(ops: &[Op], seal: bool) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write_log(dir.path(), 3, ops, seal);
        std::fs::read(path).expect("read")
    }

    /// Drives every decoder over `bytes`; they must return, never panic.
    fn decode_all(bytes: &[u8]) -> Result<LogScan, HrlError> {
        let _ = Coalesced::new(Cursor::new(bytes.to_vec()));
        let mut r = HrlReader::new(bytes)?;
        scan_reader(&mut r)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_all(&bytes);
            let mut with_header = log_bytes(&[], false);
            with_header.extend_from_slice(&bytes);
            let _ = decode_all(&with_header);
        }

        #[test]
        fn corruption_is_detected(
            ops in proptest::collection::vec(op_strategy(8192), 1..20),
            seal in any::<bool>(),
            pos in any::<proptest::sample::Index>(),
            xor in 1..=255u8,
        ) {
            let good = log_bytes(&ops, seal);
            let mut bad = good.clone();
            let i = pos.index(bad.len());
            bad[i] ^= xor;
            match decode_all(&bad) {
                // A damaged header: the log is refused outright.
                Err(_) => prop_assert!(i < FILE_HEADER_LEN),
                Ok(s) => {
                    // The damage ends the valid part at or before the damaged byte, and
                    // it is never taken for a clean end.
                    prop_assert!(matches!(s.end, ScanEnd::Torn(_)), "undetected flip at {} ({:?})", i, s.end);
                    prop_assert!(s.valid_len <= i as u64);
                }
            }
            // Truncation anywhere (other than at a record boundary of an open log) is
            // detected too.
            let cut = pos.index(good.len());
            if let Ok(s) = decode_all(&good[..cut]) {
                prop_assert!(s.valid_len <= cut as u64);
                prop_assert!(!matches!(s.end, ScanEnd::Sealed(_)));
            }
        }

        #[test]
        fn coalesced_equals_in_order(ops in proptest::collection::vec(op_strategy(8192), 0..40)) {
            let bytes = log_bytes(&ops, true);
            let mut c = Coalesced::new(Cursor::new(bytes)).expect("coalesce");
            prop_assert_eq!(apply_coalesced(8192, &mut c), apply_in_order(8192, &ops));
        }
    }
}
