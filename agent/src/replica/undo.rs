//! Undo records (`undo-<seq>[-mN].undo`): the before-images taking a point back to the
//! previous retained point. Written before a point is applied, read to show an older
//! point ([`Undo::overlay`]) or to roll back, merged when a point is pruned.
//!
//! Format (version 2): `"SRUNDO02"` · seq u64 · records `disk u32 · kind u8 · offset u64 ·
//! len u64 · crc32c u32 · data (kind 1 only)` · end marker `disk = u32::MAX` · crc32c u32
//! of every record. Kind 1 holds the before-image bytes (len ≤ 4 MiB); kind 2 says the
//! before-image was all zeroes (a hole, or zero bytes, at 4 KiB granularity) and stores
//! none, so undoing a discard of a mostly empty thin disk costs no space. Version 1
//! (`"SRUNDO01"`, records without the kind byte, all data) is still read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::image::Image;
use super::{END, ReplicaError, io_at, sync_dir};

const UNDO_MAGIC: &[u8; 8] = b"SRUNDO02";
const UNDO_MAGIC_V1: &[u8; 8] = b"SRUNDO01";
const KIND_DATA: u8 = 1;
const KIND_ZEROES: u8 = 2;
/// Largest data record.
const MAX_DATA: u64 = 4 << 20;
/// Granularity at which a before-image is checked for zeroes.
const ZERO_GRAIN: usize = 4096;

/// The before-image of one record: where its bytes are in the undo file, or zeroes.
pub(super) type Before = Option<u64>;

/// One record being written, with the running checksum of the whole file.
struct RecordWriter<'a> {
    w: BufWriter<File>,
    path: &'a Path,
    total: u32,
}

impl<'a> RecordWriter<'a> {
    fn create(path: &'a Path, seq: u64) -> Result<Self, ReplicaError> {
        let file = crate::files::create_or_truncate(path).map_err(io_at(path))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(UNDO_MAGIC).and_then(|()| w.write_all(&seq.to_le_bytes())).map_err(io_at(path))?;
        Ok(Self { w, path, total: crc32c::crc32c(&[]) })
    }

    /// Appends a record: `data` is the before-image, or `None` for `len` zero bytes.
    fn record(&mut self, disk: usize, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), ReplicaError> {
        let mut hdr = [0u8; 25];
        hdr[..4].copy_from_slice(&(disk as u32).to_le_bytes());
        hdr[4] = if data.is_some() { KIND_DATA } else { KIND_ZEROES };
        hdr[5..13].copy_from_slice(&offset.to_le_bytes());
        hdr[13..21].copy_from_slice(&len.to_le_bytes());
        let payload = data.unwrap_or(&[]);
        hdr[21..25].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        self.total = crc32c::crc32c_append(self.total, &hdr);
        self.total = crc32c::crc32c_append(self.total, payload);
        self.w.write_all(&hdr).and_then(|()| self.w.write_all(payload)).map_err(io_at(self.path))
    }

    /// Writes the end marker and the file checksum, and makes the file durable.
    fn finish(mut self) -> Result<(), ReplicaError> {
        let path = self.path;
        self.w
            .write_all(&END.to_le_bytes())
            .and_then(|()| self.w.write_all(&self.total.to_le_bytes()))
            .map_err(io_at(path))?;
        let file =
            self.w.into_inner().map_err(|e| ReplicaError::Io { path: path.to_path_buf(), source: e.into_error() })?;
        file.sync_all().map_err(io_at(path))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        crate::faults::point(crate::faults::REPLICA_UNDO_WRITTEN).map_err(io_at(path))
    }
}

/// One undo record loaded for reading: per disk, non-overlapping ranges ascending.
#[derive(Debug)]
pub(super) struct Undo {
    pub(super) file: File,
    /// disk index → (offset, len, position of the data in the file or `None`: zeroes)
    pub(super) ranges: Vec<Vec<(u64, u64, Before)>>,
}

impl Undo {
    /// Overlays this record's before-images onto `buf` (which holds `offset..`).
    pub(super) fn overlay(&self, disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(ranges) = self.ranges.get(disk) else { return Ok(()) };
        let end = offset + buf.len() as u64;
        // first range whose end is beyond `offset`
        let start = ranges.partition_point(|&(o, l, _)| o + l <= offset);
        for &(o, l, pos) in &ranges[start..] {
            if o >= end {
                break;
            }
            let from = o.max(offset);
            let to = (o + l).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match pos {
                Some(pos) => self.file.read_exact_at(dst, pos + (from - o))?,
                None => dst.fill(0),
            }
        }
        Ok(())
    }
}

/// Writes the before-images of the union of `ranges` (per disk) from the images. Runs
/// of all-zero 4 KiB blocks are stored as zero records, without their bytes.
pub(super) fn write_undo(
    images: &[Image],
    path: &Path,
    seq: u64,
    ranges: &[Vec<(u64, u64)>],
) -> Result<(), ReplicaError> {
    let mut w = RecordWriter::create(path, seq)?;
    let mut buf = Vec::new();
    for (disk, rs) in ranges.iter().enumerate() {
        let img = &images[disk];
        for (off, len) in union(rs) {
            let end = off + len;
            // Zeroes not yet written: one record for a run of holes and zero blocks.
            let mut zeroes = Zeroes::default();
            // Holes (SEEK_DATA/SEEK_HOLE) are zeroes without reading them.
            let data = crate::extents::allocated_ranges(&img.file, off, end).map_err(io_at(&img.path))?;
            let mut pos = off;
            for (s, e) in data.into_iter().chain([(end, end)]) {
                zeroes.add(pos, s.saturating_sub(pos));
                pos = pos.max(s);
                while pos < e {
                    let n = (e - pos).min(MAX_DATA);
                    buf.resize(n as usize, 0);
                    img.file.read_exact_at(&mut buf, pos).map_err(io_at(&img.path))?;
                    let mut at = 0usize;
                    while at < buf.len() {
                        // A run of 4 KiB blocks all zero or all not.
                        let grain = |i: usize| &buf[i..(i + ZERO_GRAIN).min(buf.len())];
                        let zero = crate::zeroes::is_zero(grain(at));
                        let mut run_end = (at + ZERO_GRAIN).min(buf.len());
                        while run_end < buf.len() && crate::zeroes::is_zero(grain(run_end)) == zero {
                            run_end = (run_end + ZERO_GRAIN).min(buf.len());
                        }
                        let start = pos + at as u64;
                        if zero {
                            zeroes.add(start, (run_end - at) as u64);
                        } else {
                            zeroes.flush(&mut w, disk)?;
                            w.record(disk, start, (run_end - at) as u64, Some(&buf[at..run_end]))?;
                        }
                        at = run_end;
                    }
                    pos += n;
                }
            }
            zeroes.flush(&mut w, disk)?;
        }
    }
    w.finish()
}

/// A run of zeroes being collected for one zero record.
#[derive(Default)]
struct Zeroes(Option<(u64, u64)>);

impl Zeroes {
    /// Extends the run by `len` bytes at `offset` (contiguous with it).
    fn add(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.0 = Some(match self.0 {
                Some((s, l)) => (s, l + len),
                None => (offset, len),
            });
        }
    }

    fn flush(&mut self, w: &mut RecordWriter<'_>, disk: usize) -> Result<(), ReplicaError> {
        match self.0.take() {
            Some((s, l)) => w.record(disk, s, l, None),
            None => Ok(()),
        }
    }
}

/// Sorted union of possibly overlapping ranges.
fn union(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.iter().filter(|r| r.1 > 0).map(|&(o, l)| (o, o + l)).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Reads an undo record's index, verifying every checksum.
pub(super) fn load_undo(path: &Path, disks: usize) -> Result<Undo, ReplicaError> {
    let corrupt = |why: &str| ReplicaError::Corrupt { path: path.to_path_buf(), why: why.into() };
    let file = File::open(path).map_err(io_at(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file.try_clone().map_err(io_at(path))?);
    let mut head = [0u8; 16];
    r.read_exact(&mut head).map_err(|_| corrupt("short header"))?;
    let v1 = match &head[..8] {
        m if m == UNDO_MAGIC => false,
        m if m == UNDO_MAGIC_V1 => true,
        _ => return Err(corrupt("bad magic")),
    };
    let mut pos = 16u64;
    let mut ranges = vec![Vec::new(); disks];
    let mut total = crc32c::crc32c(&[]);
    let mut buf = Vec::new();
    // disk u32 · [kind u8, version 2] · offset u64 · len u64 · crc u32
    let hdr_len = if v1 { 24 } else { 25 };
    let mut hdr = [0u8; 25];
    loop {
        r.read_exact(&mut hdr[..4]).map_err(|_| corrupt("truncated"))?;
        let disk = u32::from_le_bytes(hdr[..4].try_into().unwrap_or_default());
        if disk == END {
            let mut c = [0u8; 4];
            r.read_exact(&mut c).map_err(|_| corrupt("truncated footer"))?;
            if u32::from_le_bytes(c) != total {
                return Err(corrupt("checksum of the whole record mismatches"));
            }
            break;
        }
        r.read_exact(&mut hdr[4..hdr_len]).map_err(|_| corrupt("truncated"))?;
        let (kind, rest) = if v1 { (KIND_DATA, &hdr[4..24]) } else { (hdr[4], &hdr[5..25]) };
        let off = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(rest[16..20].try_into().unwrap_or_default());
        if (disk as usize) >= disks || off.checked_add(len).is_none() {
            return Err(corrupt("bad record"));
        }
        let data_len = match kind {
            KIND_DATA if len <= MAX_DATA => len,
            KIND_ZEROES => 0,
            _ => return Err(corrupt("bad record")),
        };
        buf.resize(data_len as usize, 0);
        r.read_exact(&mut buf).map_err(|_| corrupt("truncated data"))?;
        if crc32c::crc32c(&buf) != crc {
            return Err(corrupt("record checksum mismatch"));
        }
        total = crc32c::crc32c_append(total, &hdr[..hdr_len]);
        total = crc32c::crc32c_append(total, &buf);
        let at = pos + hdr_len as u64;
        ranges[disk as usize].push((off, len, (kind == KIND_DATA).then_some(at)));
        pos = at + data_len;
    }
    for r in &mut ranges {
        r.sort_unstable();
        // `overlay` and `merge_undo` rely on disjoint ranges (as written): refuse others.
        if r.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(corrupt("overlapping ranges"));
        }
    }
    Ok(Undo { file, ranges })
}

/// Writes `older` overlaid on `newer` (either may be absent) as one undo record.
pub(super) fn merge_undo(
    dir: &Path,
    older: Option<&str>,
    newer: Option<&str>,
    out: &Path,
    seq: u64,
    disks: usize,
) -> Result<(), ReplicaError> {
    // Collect (disk, start, end) → (source, pos) pieces, older winning.
    let load = |n: Option<&str>| -> Result<Option<Undo>, ReplicaError> {
        n.map(|n| load_undo(&dir.join(n), disks)).transpose()
    };
    let (old, new) = (load(older)?, load(newer)?);
    let mut w = RecordWriter::create(out, seq)?;
    for disk in 0..disks {
        // piece map: start → (end, source 0=old 1=new, pos)
        let mut map: BTreeMap<u64, (u64, u8, Before)> = BTreeMap::new();
        if let Some(n) = &new {
            for &(o, l, p) in &n.ranges[disk] {
                map.insert(o, (o + l, 1, p));
            }
        }
        if let Some(o) = &old {
            for &(s, l, p) in &o.ranges[disk] {
                insert_over(&mut map, s, s + l, 0, p);
            }
        }
        let mut buf = Vec::new();
        for (&start, &(end, src, pos)) in &map {
            let undo = if src == 0 { old.as_ref() } else { new.as_ref() };
            let Some(undo) = undo else { continue };
            let len = end - start;
            match pos {
                Some(pos) => {
                    buf.resize(len as usize, 0);
                    undo.file.read_exact_at(&mut buf, pos).map_err(io_at(out))?;
                    w.record(disk, start, len, Some(&buf))?;
                }
                None => w.record(disk, start, len, None)?,
            }
        }
    }
    w.finish()
}

/// Inserts `start..end` (source, pos) over whatever it covers in `map`, cutting pieces.
fn insert_over(map: &mut BTreeMap<u64, (u64, u8, Before)>, start: u64, end: u64, src: u8, pos: Before) {
    // piece starting before `start` that overlaps: cut its tail (and keep a remainder after `end`)
    if let Some((&s, &(e, sr, p))) = map.range(..start).next_back()
        && e > start
    {
        map.insert(s, (start, sr, p));
        if e > end {
            map.insert(end, (e, sr, p.map(|p| p + (end - s))));
        }
    }
    let covered: Vec<u64> = map.range(start..end).map(|(&s, _)| s).collect();
    for s in covered {
        if let Some((e, sr, p)) = map.remove(&s)
            && e > end
        {
            map.insert(end, (e, sr, p.map(|p| p + (end - s))));
        }
    }
    map.insert(start, (end, src, pos));
}
