//! The spool file (`spool-<seq>-<rand>.pt`): a received point's extents, made durable
//! before the point is applied, so a crash mid-apply rolls forward from it.
//!
//! Format: `"SRSPOOL1"` · seq u64 · records `disk u32 · kind u8 (1 data, 2 zeroes) ·
//! offset u64 · len u64 · crc32c u32 · data (kind 1)` · end marker `disk = u32::MAX`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::image::{Image, check};
use super::{END, MAX_EXTENT, ReplicaError, io_at};
use crate::zeroes::{ZeroMode, zero_range};

const SPOOL_MAGIC: &[u8; 8] = b"SRSPOOL1";
const KIND_DATA: u8 = 1;
const KIND_ZEROES: u8 = 2;

/// Data of an extent pushed into a point.
#[derive(Debug, Clone, Copy)]
pub enum ExtentData<'a> {
    Data(&'a [u8]),
    Zeroes(u64),
}

impl ExtentData<'_> {
    /// Bytes the extent covers on the disk.
    pub fn len(&self) -> u64 {
        match self {
            ExtentData::Data(d) => d.len() as u64,
            ExtentData::Zeroes(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Creates a spool for point `seq` (the header written, buffered).
pub(super) fn create(path: &Path, seq: u64) -> Result<BufWriter<File>, ReplicaError> {
    let file = crate::files::create_new(path).map_err(io_at(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(SPOOL_MAGIC).and_then(|()| w.write_all(&seq.to_le_bytes())).map_err(io_at(path))?;
    Ok(w)
}

/// Appends one extent record (already checked against the disk).
pub(super) fn write_extent(
    w: &mut BufWriter<File>,
    path: &Path,
    disk: u32,
    offset: u64,
    data: ExtentData<'_>,
) -> Result<(), ReplicaError> {
    let (kind, len, crc, payload): (u8, u64, u32, &[u8]) = match data {
        ExtentData::Data(d) => (KIND_DATA, d.len() as u64, crc32c::crc32c(d), d),
        ExtentData::Zeroes(n) => (KIND_ZEROES, n, 0, &[]),
    };
    let mut hdr = [0u8; 25];
    hdr[..4].copy_from_slice(&disk.to_le_bytes());
    hdr[4] = kind;
    hdr[5..13].copy_from_slice(&offset.to_le_bytes());
    hdr[13..21].copy_from_slice(&len.to_le_bytes());
    hdr[21..25].copy_from_slice(&crc.to_le_bytes());
    crate::faults::point(crate::faults::RECEIVER_SPOOL_WRITE).map_err(io_at(path))?;
    w.write_all(&hdr).and_then(|()| w.write_all(payload)).map_err(io_at(path))
}

/// Writes the end marker and makes the spool durable.
pub(super) fn finish(mut w: BufWriter<File>, path: &Path) -> Result<(), ReplicaError> {
    w.write_all(&END.to_le_bytes()).map_err(io_at(path))?;
    let file = w.into_inner().map_err(|e| ReplicaError::Io { path: path.to_path_buf(), source: e.into_error() })?;
    crate::faults::point(crate::faults::RECEIVER_SPOOL_FSYNC).map_err(io_at(path))?;
    file.sync_all().map_err(io_at(path))
}

/// Applies every extent of a spool to the images, in order.
pub(super) fn apply(images: &[Image], path: &Path) -> Result<(), ReplicaError> {
    let file = File::open(path).map_err(io_at(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let corrupt = |why: &str| ReplicaError::Corrupt { path: path.to_path_buf(), why: why.into() };
    let mut magic = [0u8; 16];
    r.read_exact(&mut magic).map_err(|_| corrupt("short header"))?;
    if &magic[..8] != SPOOL_MAGIC {
        return Err(corrupt("bad magic"));
    }
    let mut data = Vec::new();
    loop {
        let mut disk = [0u8; 4];
        r.read_exact(&mut disk).map_err(|_| corrupt("truncated record"))?;
        let disk = u32::from_le_bytes(disk);
        if disk == END {
            return Ok(());
        }
        let mut hdr = [0u8; 21];
        r.read_exact(&mut hdr).map_err(|_| corrupt("truncated record"))?;
        let kind = hdr[0];
        let offset = u64::from_le_bytes(hdr[1..9].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(hdr[9..17].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(hdr[17..21].try_into().unwrap_or_default());
        let img = images.get(disk as usize).ok_or_else(|| corrupt("unknown disk"))?;
        check(img, "spool", offset, len)?;
        match kind {
            KIND_DATA => {
                if len > MAX_EXTENT {
                    return Err(corrupt("extent too large"));
                }
                data.resize(len as usize, 0);
                r.read_exact(&mut data).map_err(|_| corrupt("truncated data"))?;
                if crc32c::crc32c(&data) != crc {
                    return Err(corrupt("checksum mismatch"));
                }
                img.file.write_all_at(&data, offset).map_err(io_at(&img.path))?;
            }
            // A hole, not zero bytes: a trimmed range frees space on the replica too.
            KIND_ZEROES => zero_range(&img.file, offset, len, ZeroMode::Punch).map_err(io_at(&img.path))?,
            _ => return Err(corrupt("unknown extent kind")),
        }
        crate::faults::point(crate::faults::REPLICA_APPLY_MID).map_err(io_at(&img.path))?;
    }
}
