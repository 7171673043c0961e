//! Opening a tracked disk and recovering from a crash: the open log's torn tail is cut,
//! its records (less the cancelled ones) are re-applied to the image, sealed logs are
//! verified.

use super::*;

impl TrackedDisk {
    /// Opens the image at `image_path` (its logs live in the same folder) and recovers
    /// from a crash: the open log's torn tail is cut to its last whole record and its
    /// records are re-applied to the image in order (idempotent), so every acknowledged
    /// write is in both; sealed logs are verified (damaged ones are kept and listed by
    /// [`Self::corrupt_logs`]). With `tracking` off, writes go to the image only.
    pub fn open(image_path: &Path, disk_id: DiskId, tracking: bool) -> Result<Self, TrackerError> {
        let img_err = |source| TrackerError::Image { path: image_path.to_owned(), source };
        let image = crate::files::open_existing(image_path, true).map_err(img_err)?;
        let size = image.metadata().map_err(img_err)?.len();
        let dir = match image_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
            _ => PathBuf::from("."),
        };
        let mut disk = TrackedDisk {
            image,
            image_path: image_path.to_owned(),
            dir,
            disk_id,
            size,
            state: Mutex::new(State {
                tracking,
                stopped: false,
                log: None,
                log_file: None,
                next_seq: LogSeq(1),
                sealed: BTreeMap::new(),
            }),
            tracking_hint: AtomicBool::new(tracking),
            synced_gen: Mutex::new(0),
            completed: AtomicU64::new(0),
            inflight: Mutex::new(Inflight::default()),
            inflight_done: Condvar::new(),
            corrupt: Vec::new(),
            spill: bitmap::Spill::open(image_path, size)?,
        };
        disk.recover()?;
        disk.spill.publish(disk.pending_log_bytes());
        Ok(disk)
    }

    fn recover(&mut self) -> Result<(), TrackerError> {
        let logs = self.list_logs()?;
        let mut st = State {
            tracking: self.state_mut().tracking,
            stopped: false,
            log: None,
            log_file: None,
            next_seq: logs.keys().next_back().map_or(LogSeq(1), |s| s.next()),
            sealed: BTreeMap::new(),
        };
        let last = logs.keys().next_back().copied();
        for (&seq, path) in &logs {
            if Some(seq) != last {
                // Only the highest log may be open: everything below must verify sealed.
                match hrl::verify_sealed(path) {
                    Ok(_) => {
                        let bytes = file_len(path)?;
                        st.sealed.insert(seq, SealedLog { seq, path: path.clone(), bytes });
                    }
                    Err(error) => self.report_corrupt(seq, path, error),
                }
                continue;
            }
            match hrl::scan(path) {
                Ok(scan) if scan.header.seq != seq || scan.header.disk_id != self.disk_id => {
                    let error = HrlError::NameMismatch {
                        expected: format!("{} seq {seq}", self.disk_id),
                        found: format!("{} seq {}", scan.header.disk_id, scan.header.seq),
                    };
                    self.report_corrupt(seq, path, error);
                }
                Ok(scan) => match scan.end {
                    ScanEnd::Sealed(_) => {
                        let bytes = file_len(path)?;
                        st.sealed.insert(seq, SealedLog { seq, path: path.clone(), bytes });
                    }
                    ScanEnd::Open | ScanEnd::Torn(_) => {
                        if let ScanEnd::Torn(e) = &scan.end {
                            tracing::warn!(log = %path.display(), "cutting torn tail of open HRL log: {e:#}");
                        }
                        let writer = HrlWriter::open_append(path).map_err(|source| log_err(path, source))?;
                        self.reapply(path)?;
                        st.next_seq = seq; // reused: `install_log` below advances it
                        install_log(&mut st, writer).map_err(|source| log_err(path, source))?;
                    }
                },
                // Torn inside the header: the crash hit the log's creation (header written
                // and synced before any record), so it holds no record; start it anew.
                Err(HrlError::Truncated { .. }) => {
                    tracing::warn!(log = %path.display(), "removing HRL log torn at creation");
                    std::fs::remove_file(path).map_err(|source| log_err(path, source.into()))?;
                    hrl::sync_dir(&self.dir).map_err(|source| TrackerError::Dir { path: self.dir.clone(), source })?;
                    st.next_seq = seq;
                }
                Err(error) => self.report_corrupt(seq, path, error),
            }
        }
        // The re-applied records are durable in the image before anything new is written.
        self.image.sync_data().map_err(|source| self.image_err(source))?;
        // An open log of an older format cannot take cancel records: sealed (a point
        // boundary at the crash, which is a consistent prefix) or, when empty, replaced.
        let old_format = st.log.as_ref().is_some_and(|l| l.header().version < hrl::FORMAT_VERSION);
        if (!st.tracking || old_format) && st.log.as_ref().is_some_and(|l| !l.is_empty()) {
            self.seal_locked(&mut st, true)?;
        } else if old_format && let Some(log) = st.log.take() {
            st.log_file = None;
            st.next_seq = log.header().seq;
            let path = log.path().to_owned();
            drop(log);
            std::fs::remove_file(&path).map_err(|source| log_err(&path, source.into()))?;
        }
        if st.log.is_none() {
            self.create_log(&mut st)?;
        }
        *self.state_mut() = st;
        Ok(())
    }

    fn state_mut(&mut self) -> &mut State {
        self.state.get_mut().unwrap_or_else(PoisonError::into_inner)
    }

    fn report_corrupt(&mut self, seq: LogSeq, path: &Path, error: HrlError) {
        tracing::error!(log = %path.display(), "damaged HRL log kept for inspection; replication needs a resync: {error:#}");
        self.corrupt.push(CorruptLog { seq, path: path.to_owned(), error });
    }

    /// Logs of this disk in its folder, by sequence number.
    fn list_logs(&self) -> Result<BTreeMap<LogSeq, PathBuf>, TrackerError> {
        let dir_err = |source| TrackerError::Dir { path: self.dir.clone(), source };
        let mut logs = BTreeMap::new();
        for entry in std::fs::read_dir(&self.dir).map_err(dir_err)? {
            let entry = entry.map_err(dir_err)?;
            let name = entry.file_name();
            if let Some(seq) = name.to_str().and_then(|n| hrl::parse_log_file_name(&self.disk_id, n)) {
                logs.insert(seq, entry.path());
            }
        }
        Ok(logs)
    }

    /// Re-applies every valid record of the (already truncated) open log to the image,
    /// except cancelled ones (their image write failed and the client got the error).
    fn reapply(&self, path: &Path) -> Result<(), TrackerError> {
        let cancelled = cancelled_records(path)?;
        let mut reader = HrlReader::open(path).map_err(|source| log_err(path, source))?;
        let mut data = Vec::new();
        while let Some(rec) = reader.next_record(&mut data).map_err(|source| log_err(path, source))? {
            if rec.kind == RecordKind::Cancel || cancelled.contains(rec.pos) {
                continue;
            }
            if check_range(rec.offset, rec.length, self.size).is_err() {
                let error = HrlError::Malformed { what: "record past the end of the image", at: rec.pos };
                return Err(log_err(path, error));
            }
            let done = match rec.kind {
                RecordKind::Write => self.image.write_all_at(&data, rec.offset),
                RecordKind::Zeroes | RecordKind::Trim => self.zero_image(rec.offset, rec.length, super::zero::REAPPLY),
                RecordKind::Cancel => Ok(()),
            };
            done.map_err(|source| self.image_err(source))?;
        }
        Ok(())
    }
}

/// The cancelled spans of a log: a first pass over its record headers (the open log is
/// read twice at start; it holds one interval at most).
fn cancelled_records(path: &Path) -> Result<hrl::Cancelled, TrackerError> {
    let mut reader = HrlReader::open(path).map_err(|source| log_err(path, source))?;
    let mut cancelled = hrl::Cancelled::default();
    let mut data = Vec::new();
    while let Some(rec) = reader.next_record(&mut data).map_err(|source| log_err(path, source))? {
        cancelled.add(&rec);
    }
    Ok(cancelled)
}
