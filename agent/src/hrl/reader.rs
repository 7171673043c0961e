//! [`HrlReader`] and the whole-file checks built on it: [`scan`] (the valid part of any
//! log), [`verify_sealed`] (a sealed log end to end) and [`truncate_torn_tail`].

use super::*;

/// Reads a log sequentially, verifying every checksum. Works on any `Read` (a file, a
/// byte slice, a network stream of a log).
#[derive(Debug)]
pub struct HrlReader<R> {
    pub(super) inner: R,
    pub(super) header: LogHeader,
    /// Offset of the next unread byte.
    pub(super) pos: u64,
    pub(super) record_count: u64,
    pub(super) data_bytes: u64,
    pub(super) chain: u32,
    pub(super) footer: Option<LogFooter>,
    /// Set once the reader has returned the end (footer, EOF or an error).
    pub(super) done: bool,
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

    pub(super) fn next_inner(&mut self, data: &mut Vec<u8>) -> Result<Option<Record>, HrlError> {
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
        if kind == RecordKind::Cancel
            && (self.header.version < 2 || offset < FILE_HEADER_LEN as u64 || offset + length > at)
        {
            // A cancel names only earlier records of its own log, and exists from version 2.
            return Err(HrlError::Malformed { what: "cancel record", at });
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

    pub(super) fn read_footer(&mut self, at: u64, magic: &[u8]) -> Result<(), HrlError> {
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

pub(super) fn scan_reader<R: Read>(reader: &mut HrlReader<R>) -> Result<LogScan, HrlError> {
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
    let file = crate::files::open_existing(path, true)?;
    if file.metadata()?.len() != scan.valid_len {
        file.set_len(scan.valid_len)?;
        file.sync_all()?;
    }
    Ok(scan.valid_len)
}
