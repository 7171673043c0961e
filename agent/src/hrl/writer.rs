//! [`HrlWriter`]: appends records to an open log (never after a partial record) and
//! seals it with its footer.

use super::*;

/// Appends records to one log file. Not synchronised: the tracker serialises access.
#[derive(Debug)]
pub struct HrlWriter {
    pub(super) file: File,
    pub(super) path: PathBuf,
    pub(super) header: LogHeader,
    /// Length of the valid part; the file cursor is always here between appends.
    pub(super) pos: u64,
    pub(super) record_count: u64,
    pub(super) data_bytes: u64,
    pub(super) chain: u32,
    /// An append or seal failed and the tail could not be cut back.
    pub(super) broken: bool,
    /// The footer is written; no more appends.
    pub(super) sealed: bool,
    /// File space is allocated (beyond the end, `FALLOC_FL_KEEP_SIZE`) up to here, so
    /// the cancel records of in-flight writes can always be appended on a full file
    /// system. `u64::MAX` when the file system cannot preallocate.
    pub(super) reserved_to: u64,
}

/// Where a log stood before an append: [`HrlWriter::cut_back`] returns it there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogMark {
    pub pos: u64,
    record_count: u64,
    data_bytes: u64,
    chain: u32,
}

impl HrlWriter {
    /// Creates log `seq` of `disk_id` in `dir` (fails if it exists), writes and syncs its
    /// header and syncs the directory, so the new file survives a crash.
    pub fn create(dir: &Path, disk_id: &DiskId, seq: LogSeq) -> Result<Self, HrlError> {
        let path = dir.join(log_file_name(disk_id, seq));
        let header = LogHeader { version: FORMAT_VERSION, disk_id: disk_id.clone(), seq, start_ms: now_ms() };
        let mut file = crate::files::create_new(&path)?;
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
            reserved_to: 0,
        })
    }

    /// Reopens an open (unsealed) log for appending after recovery: truncates a torn
    /// tail to the last whole record and positions after it. Fails on a sealed log.
    pub fn open_append(path: &Path) -> Result<Self, HrlError> {
        let scan = scan(path)?;
        if let ScanEnd::Sealed(_) = scan.end {
            return Err(HrlError::Malformed { what: "open log (it is sealed)", at: scan.valid_len });
        }
        let mut file = crate::files::open_existing(path, true)?;
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
            reserved_to: 0,
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
        crate::faults::point(crate::faults::HRL_APPEND_BEFORE_SYNC)?;
        if let Err(e) = write_all_vectored(&mut self.file, &rec.bytes, data) {
            let restored = self.file.set_len(self.pos).and_then(|()| self.file.seek(SeekFrom::Start(self.pos)));
            if restored.is_err() {
                self.broken = true;
            }
            self.reserved_to = 0;
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
        crate::faults::point(crate::faults::HRL_APPEND_BEFORE_SYNC)?;
        self.file.sync_data()?;
        crate::faults::point(crate::faults::HRL_APPEND_AFTER_SYNC)?;
        Ok(())
    }

    /// The position before the next append, for [`Self::cut_back`].
    pub fn mark(&self) -> LogMark {
        LogMark { pos: self.pos, record_count: self.record_count, data_bytes: self.data_bytes, chain: self.chain }
    }

    /// Removes every record appended since `mark` (the file is cut there). On failure
    /// the writer refuses further appends, as after a failed append.
    pub fn cut_back(&mut self, mark: LogMark) -> Result<(), HrlError> {
        if self.broken || self.sealed || mark.pos > self.pos || mark.pos < FILE_HEADER_LEN as u64 {
            return Err(HrlError::Broken);
        }
        let done = self.file.set_len(mark.pos).and_then(|()| self.file.seek(SeekFrom::Start(mark.pos)));
        if let Err(e) = done {
            self.broken = true;
            return Err(e.into());
        }
        self.pos = mark.pos;
        // Truncation also frees the space allocated past the end.
        self.reserved_to = 0;
        self.record_count = mark.record_count;
        self.data_bytes = mark.data_bytes;
        self.chain = mark.chain;
        Ok(())
    }

    /// Makes sure at least `room` bytes past the end are allocated to the file (it
    /// preallocates `2 * room` when less is left), so appends of that much cannot fail
    /// with ENOSPC. A file system without preallocation is accepted (no guarantee).
    pub fn reserve(&mut self, room: u64) -> Result<(), HrlError> {
        if self.reserved_to != u64::MAX && self.pos.saturating_add(room) > self.reserved_to {
            let mode = nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match nix::fcntl::fallocate(&self.file, mode, self.pos as i64, (2 * room) as i64) {
                Ok(()) => self.reserved_to = self.pos + 2 * room,
                Err(nix::errno::Errno::EOPNOTSUPP) => self.reserved_to = u64::MAX,
                Err(e) => return Err(io::Error::from(e).into()),
            }
        }
        Ok(())
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
        crate::faults::point(crate::faults::HRL_SEAL)?;
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
pub(super) fn write_all_vectored(file: &mut File, head: &[u8], data: &[u8]) -> io::Result<()> {
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
