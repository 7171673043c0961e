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
}

impl HrlWriter {
    /// Creates log `seq` of `disk_id` in `dir` (fails if it exists), writes and syncs its
    /// header and syncs the directory, so the new file survives a crash.
    pub fn create(dir: &Path, disk_id: &DiskId, seq: LogSeq) -> Result<Self, HrlError> {
        let path = dir.join(log_file_name(disk_id, seq));
        let header = LogHeader { disk_id: disk_id.clone(), seq, start_ms: now_ms() };
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
