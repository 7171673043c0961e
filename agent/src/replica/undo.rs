//! Undo records (`undo-<seq>[-mN].undo`): the before-images taking a point back to the
//! previous retained point. Written before a point is applied, read to show an older
//! point ([`Undo::overlay`]) or to roll back, merged when a point is pruned.
//!
//! Format: `"SRUNDO01"` · seq u64 · records `disk u32 · offset u64 · len u64 (≤ 4 MiB) ·
//! crc32c u32 · data` · end marker `disk = u32::MAX` · crc32c u32 of every record.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::image::Image;
use super::{END, ReplicaError, io_at, sync_dir};

const UNDO_MAGIC: &[u8; 8] = b"SRUNDO01";

/// One undo record loaded for reading: per disk, non-overlapping ranges ascending.
#[derive(Debug)]
pub(super) struct Undo {
    pub(super) file: File,
    /// disk index → (offset, len, position of data in file)
    pub(super) ranges: Vec<Vec<(u64, u64, u64)>>,
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
            self.file.read_exact_at(dst, pos + (from - o))?;
        }
        Ok(())
    }
}

/// Writes the before-images of the union of `ranges` (per disk) from the images.
pub(super) fn write_undo(
    images: &[Image],
    path: &Path,
    seq: u64,
    ranges: &[Vec<(u64, u64)>],
) -> Result<(), ReplicaError> {
    let file = crate::files::create_or_truncate(path).map_err(io_at(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut total = crc32c::crc32c(&[]);
    w.write_all(UNDO_MAGIC).and_then(|()| w.write_all(&seq.to_le_bytes())).map_err(io_at(path))?;
    let mut buf = Vec::new();
    for (disk, rs) in ranges.iter().enumerate() {
        let img = &images[disk];
        for (off, len) in union(rs) {
            // in pieces of at most 4 MiB
            let mut done = 0;
            while done < len {
                let n = (len - done).min(4 << 20);
                buf.resize(n as usize, 0);
                img.file.read_exact_at(&mut buf, off + done).map_err(io_at(&img.path))?;
                let mut hdr = [0u8; 24];
                hdr[..4].copy_from_slice(&(disk as u32).to_le_bytes());
                hdr[4..12].copy_from_slice(&(off + done).to_le_bytes());
                hdr[12..20].copy_from_slice(&n.to_le_bytes());
                hdr[20..24].copy_from_slice(&crc32c::crc32c(&buf).to_le_bytes());
                total = crc32c::crc32c_append(total, &hdr);
                total = crc32c::crc32c_append(total, &buf);
                w.write_all(&hdr).and_then(|()| w.write_all(&buf)).map_err(io_at(path))?;
                done += n;
            }
        }
    }
    w.write_all(&END.to_le_bytes()).and_then(|()| w.write_all(&total.to_le_bytes())).map_err(io_at(path))?;
    let file = w.into_inner().map_err(|e| ReplicaError::Io { path: path.to_path_buf(), source: e.into_error() })?;
    file.sync_all().map_err(io_at(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))?;
    crate::faults::point(crate::faults::REPLICA_UNDO_WRITTEN).map_err(io_at(path))
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
    if &head[..8] != UNDO_MAGIC {
        return Err(corrupt("bad magic"));
    }
    let mut pos = 16u64;
    let mut ranges = vec![Vec::new(); disks];
    let mut total = crc32c::crc32c(&[]);
    let mut buf = Vec::new();
    loop {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).map_err(|_| corrupt("truncated"))?;
        let disk = u32::from_le_bytes(d);
        if disk == END {
            let mut c = [0u8; 4];
            r.read_exact(&mut c).map_err(|_| corrupt("truncated footer"))?;
            if u32::from_le_bytes(c) != total {
                return Err(corrupt("checksum of the whole record mismatches"));
            }
            break;
        }
        let mut rest = [0u8; 20];
        r.read_exact(&mut rest).map_err(|_| corrupt("truncated"))?;
        let off = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(rest[16..20].try_into().unwrap_or_default());
        if (disk as usize) >= disks || len > 4 << 20 || off.checked_add(len).is_none() {
            return Err(corrupt("bad record"));
        }
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf).map_err(|_| corrupt("truncated data"))?;
        if crc32c::crc32c(&buf) != crc {
            return Err(corrupt("record checksum mismatch"));
        }
        let mut hdr = [0u8; 24];
        hdr[..4].copy_from_slice(&d);
        hdr[4..].copy_from_slice(&rest);
        total = crc32c::crc32c_append(total, &hdr);
        total = crc32c::crc32c_append(total, &buf);
        ranges[disk as usize].push((off, len, pos + 24));
        pos += 24 + len;
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
    let file = crate::files::create_or_truncate(out).map_err(io_at(out))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut total = crc32c::crc32c(&[]);
    w.write_all(UNDO_MAGIC).and_then(|()| w.write_all(&seq.to_le_bytes())).map_err(io_at(out))?;
    for disk in 0..disks {
        // piece map: start → (end, source 0=old 1=new, pos)
        let mut map: BTreeMap<u64, (u64, u8, u64)> = BTreeMap::new();
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
            buf.resize(len as usize, 0);
            undo.file.read_exact_at(&mut buf, pos).map_err(io_at(out))?;
            let mut hdr = [0u8; 24];
            hdr[..4].copy_from_slice(&(disk as u32).to_le_bytes());
            hdr[4..12].copy_from_slice(&start.to_le_bytes());
            hdr[12..20].copy_from_slice(&len.to_le_bytes());
            hdr[20..24].copy_from_slice(&crc32c::crc32c(&buf).to_le_bytes());
            total = crc32c::crc32c_append(total, &hdr);
            total = crc32c::crc32c_append(total, &buf);
            w.write_all(&hdr).and_then(|()| w.write_all(&buf)).map_err(io_at(out))?;
        }
    }
    w.write_all(&END.to_le_bytes()).and_then(|()| w.write_all(&total.to_le_bytes())).map_err(io_at(out))?;
    let file = w.into_inner().map_err(|e| ReplicaError::Io { path: out.to_path_buf(), source: e.into_error() })?;
    file.sync_all().map_err(io_at(out))?;
    sync_dir(dir)
}

/// Inserts `start..end` (source, pos) over whatever it covers in `map`, cutting pieces.
fn insert_over(map: &mut BTreeMap<u64, (u64, u8, u64)>, start: u64, end: u64, src: u8, pos: u64) {
    // piece starting before `start` that overlaps: cut its tail (and keep a remainder after `end`)
    if let Some((&s, &(e, sr, p))) = map.range(..start).next_back()
        && e > start
    {
        map.insert(s, (start, sr, p));
        if e > end {
            map.insert(end, (e, sr, p + (end - s)));
        }
    }
    let covered: Vec<u64> = map.range(start..end).map(|(&s, _)| s).collect();
    for s in covered {
        if let Some((e, sr, p)) = map.remove(&s)
            && e > end
        {
            map.insert(end, (e, sr, p + (end - s)));
        }
    }
    map.insert(start, (end, src, pos));
}
