//! [`Coalesced`]: the view of a sealed log that replication ships, the last write to
//! each byte wins (an interval map of extents pointing into the log).

use super::*;

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
    pub(super) source: R,
    pub(super) header: LogHeader,
    pub(super) footer: LogFooter,
    pub(super) extents: Vec<Extent>,
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
        // Records are collected first: a cancel record (format version 2) follows the
        // records it cancels, which must then never reach the map.
        let mut records = Vec::new();
        let mut cancelled = Cancelled::default();
        let mut data = Vec::new();
        while let Some(rec) = reader.next_record(&mut data)? {
            match rec.kind {
                RecordKind::Cancel => cancelled.add(&rec),
                _ => records.push(rec),
            }
        }
        let mut map = IntervalMap::default();
        for rec in records.iter().filter(|r| !cancelled.contains(r.pos)) {
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
                // Never an extent: cancel records are consumed when coalescing.
                RecordKind::Cancel => Err(HrlError::InvalidRecord("cancel record as an extent")),
            })
        })
    }
}

/// Non-overlapping extents keyed by start offset; a later insert cuts away whatever
/// part of older extents it covers.
#[derive(Default, Debug)]
pub(super) struct IntervalMap {
    pub(super) map: BTreeMap<u64, Extent>,
}

impl IntervalMap {
    pub(super) fn insert(&mut self, new: Extent) {
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

    pub(super) fn into_extents(self) -> Vec<Extent> {
        self.map.into_values().collect()
    }
}

/// The part of `e` from disk offset `at` (inside `e`) on.
pub(super) fn cut_front(e: Extent, at: u64) -> Extent {
    let skip = at - e.offset;
    let data_pos = if e.kind == RecordKind::Write { e.data_pos + skip } else { e.data_pos };
    Extent { offset: at, len: e.len - skip, kind: e.kind, data_pos }
}
