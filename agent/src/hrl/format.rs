//! The bytes of a log: record kinds, the file header, the sealing footer, and the
//! encoding of one record (see `docs/hrl-format.md`).

use super::*;

/// What a record does to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// `length` bytes of data follow the record header.
    Write = 1,
    /// The range reads as zeroes (NBD WRITE_ZEROES); no data.
    Zeroes = 2,
    /// The range was discarded (NBD TRIM); reads as zeroes in our implementation; no data.
    Trim = 3,
    /// Format version 2: cancels earlier records of the same log whose image write failed
    /// (the client got an error, so they must never be shipped or re-applied). `offset`
    /// is the log-file position of the first cancelled record header and `length` the
    /// bytes of log file the cancelled records span; no data.
    Cancel = 4,
}

impl RecordKind {
    pub(super) fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zeroes),
            3 => Some(RecordKind::Trim),
            4 => Some(RecordKind::Cancel),
            _ => None,
        }
    }
}

/// The decoded file header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogHeader {
    /// Format version the log was written in ([`FORMAT_VERSION`] for new logs; an open
    /// log of an older version is appended to in that version's layout).
    pub version: u32,
    pub disk_id: DiskId,
    pub seq: LogSeq,
    /// Unix time in milliseconds when the log was created.
    pub start_ms: u64,
}

impl LogHeader {
    pub(super) fn encode(&self) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(&FILE_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(self.disk_id.as_str().len() as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.start_ms.to_le_bytes());
        b[32..32 + self.disk_id.as_str().len()].copy_from_slice(self.disk_id.as_str().as_bytes());
        let crc = crc32c::crc32c(&b[..124]);
        b[124..128].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(super) fn decode(b: &[u8; FILE_HEADER_LEN]) -> Result<Self, HrlError> {
        if b[0..8] != FILE_MAGIC {
            return Err(HrlError::BadMagic { at: 0 });
        }
        let stored = le_u32(&b[124..128]);
        let computed = crc32c::crc32c(&b[..124]);
        if stored != computed {
            return Err(HrlError::ChecksumMismatch { what: "file header", at: 0, stored, computed });
        }
        let version = le_u32(&b[8..12]);
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(HrlError::UnsupportedVersion(version));
        }
        let id_len = le_u32(&b[12..16]) as usize;
        if id_len == 0 || id_len > MAX_DISK_ID_LEN || b[32 + id_len..124].iter().any(|&x| x != 0) {
            return Err(HrlError::Malformed { what: "file header", at: 0 });
        }
        let id =
            std::str::from_utf8(&b[32..32 + id_len]).map_err(|_| HrlError::Malformed { what: "disk id", at: 32 })?;
        let disk_id = DiskId::new(id).map_err(|_| HrlError::Malformed { what: "disk id", at: 32 })?;
        Ok(LogHeader { version, disk_id, seq: LogSeq(le_u64(&b[16..24])), start_ms: le_u64(&b[24..32]) })
    }

    /// The first value of the log's chain checksum: binds the records to this header.
    pub(super) fn chain_seed(&self) -> u32 {
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
    pub(super) fn encode(&self) -> [u8; FOOTER_LEN] {
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

    pub(super) fn decode(b: &[u8; FOOTER_LEN], at: u64) -> Result<Self, HrlError> {
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
    pub(super) bytes: [u8; RECORD_HEADER_LEN],
    pub(super) data_len: u64,
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
            RecordKind::Zeroes | RecordKind::Trim | RecordKind::Cancel => {
                if !data.is_empty() {
                    return Err(HrlError::InvalidRecord("data on a zeroes/trim/cancel record"));
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

    /// A cancel record for the records spanning `span` bytes of the log file from
    /// position `at` (see [`RecordKind::Cancel`]).
    pub fn cancel(at: u64, span: u64) -> Result<Self, HrlError> {
        EncodedRecord::new(RecordKind::Cancel, 0, at, span, &[])
    }
}

/// The cancelled spans of one log (from its [`RecordKind::Cancel`] records): which
/// records a consumer must skip.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cancelled {
    /// start position -> end position (exclusive) in the log file.
    spans: BTreeMap<u64, u64>,
}

impl Cancelled {
    /// Notes a cancel record.
    pub fn add(&mut self, cancel: &Record) {
        if cancel.kind == RecordKind::Cancel {
            self.spans.insert(cancel.offset, cancel.offset + cancel.length);
        }
    }
    /// Whether the record at log position `pos` is cancelled.
    pub fn contains(&self, pos: u64) -> bool {
        self.spans.range(..=pos).next_back().is_some_and(|(_, &end)| pos < end)
    }
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }
}
