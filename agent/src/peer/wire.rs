//! The Peer RPCs' requests as domain values: every message from the wire is converted
//! here, once, with `TryFrom`, before the receiver looks anything up or touches a file.
//!
//! A refused field is a [`WireError`] naming it (`copy_chunk.disk_id`,
//! `point_chunk.extents[2].kind`) and the rule it broke; the service answers it with
//! `InvalidArgument`. Rules that need the replica (the disk exists, a range is inside
//! it) are checked by the receiver, which has it.

use siterecovery_proto::model::wire::{self, WireError};
use siterecovery_proto::model::{DiskId, PointSeq, RelationshipId};
use siterecovery_proto::v1;

/// Largest decompressed data of one copy chunk or point extent accepted from the wire.
pub const MAX_WIRE_DATA: u64 = 4 << 20;
/// Smallest block size a resync may ask hashes for.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest block size a resync may ask hashes for.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;
/// Most blocks one sub-block hash request may list.
pub const MAX_SUB_HASH_BLOCKS: usize = 1 << 20;

/// Data as it came off the wire: `len` raw bytes, zstd-compressed when `zstd`. The
/// announced length is bounded by [`MAX_WIRE_DATA`]; [`WireData::into_raw`] checks the
/// bytes really are that long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireData {
    bytes: Vec<u8>,
    zstd: bool,
    len: u64,
}

impl WireData {
    fn new(field: &str, bytes: Vec<u8>, zstd: bool, len: u64) -> Result<Self, WireError> {
        if len > MAX_WIRE_DATA {
            return Err(WireError::rule(field, format!("{len} bytes of data in one message (max {MAX_WIRE_DATA})")));
        }
        Ok(Self { bytes, zstd, len })
    }

    /// Raw length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The raw bytes: decompressed (bounded by the announced length) if needed, and
    /// exactly [`Self::len`] of them.
    pub fn into_raw(self) -> Result<Vec<u8>, WireError> {
        let raw = if self.zstd {
            zstd::bulk::decompress(&self.bytes, self.len as usize)
                .map_err(|e| WireError::rule("data", format!("zstd data: {e}")))?
        } else {
            self.bytes
        };
        if raw.len() as u64 != self.len {
            return Err(WireError::rule("data", format!("data is {} bytes, announced {}", raw.len(), self.len)));
        }
        Ok(raw)
    }
}

/// `CopyProgress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyProgress {
    pub relationship: RelationshipId,
}

impl TryFrom<&v1::CopyProgressRequest> for CopyProgress {
    type Error = WireError;
    fn try_from(r: &v1::CopyProgressRequest) -> Result<Self, WireError> {
        Ok(Self { relationship: wire::field("copy_progress.relationship_id", &r.relationship_id)? })
    }
}

/// One message of an `InitialCopy` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyChunk {
    /// Required in the first message of a stream; later ones may repeat it.
    pub relationship: Option<RelationshipId>,
    pub disk: DiskId,
    pub offset: u64,
    pub data: WireData,
    /// The copy of this disk is complete.
    pub done: bool,
}

impl TryFrom<v1::CopyChunk> for CopyChunk {
    type Error = WireError;
    fn try_from(c: v1::CopyChunk) -> Result<Self, WireError> {
        let relationship = wire::optional("copy_chunk.relationship_id", &c.relationship_id)?;
        let disk = wire::field("copy_chunk.disk_id", &c.disk_id)?;
        let len = if c.zstd { u64::from(c.raw_len) } else { c.data.len() as u64 };
        let data = WireData::new("copy_chunk.data", c.data, c.zstd, len)?;
        Ok(Self { relationship, disk, offset: c.offset, data, done: c.done })
    }
}

/// What one point extent does to its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentBody {
    Data(WireData),
    /// This many bytes read as zeroes.
    Zeroes(u64),
}

/// One extent of a point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub disk: DiskId,
    pub offset: u64,
    pub body: ExtentBody,
}

fn extent(field: &str, e: v1::Extent) -> Result<Extent, WireError> {
    let disk = wire::field(&format!("{field}.disk_id"), &e.disk_id)?;
    let body = match v1::ExtentKind::try_from(e.kind) {
        Ok(v1::ExtentKind::Data) => {
            ExtentBody::Data(WireData::new(&format!("{field}.data"), e.data, e.zstd, e.length)?)
        }
        Ok(v1::ExtentKind::Zeroes) if e.data.is_empty() => ExtentBody::Zeroes(e.length),
        Ok(v1::ExtentKind::Zeroes) => {
            return Err(WireError::rule(format!("{field}.data"), "a zeroes extent carries no data"));
        }
        _ => {
            return Err(WireError::Enum { field: format!("{field}.kind"), value: e.kind, allowed: "DATA, ZEROES" });
        }
    };
    Ok(Extent { disk, offset: e.offset, body })
}

/// One message of a `ShipPoint` stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointChunk {
    /// Required in the first message of a stream; later ones may repeat it.
    pub relationship: Option<RelationshipId>,
    /// Never 0.
    pub seq: PointSeq,
    pub extents: Vec<Extent>,
    /// Last message: the point is complete.
    pub commit: bool,
    pub created_unix_ms: i64,
    pub app_consistent: bool,
    pub resync: bool,
}

impl TryFrom<v1::PointChunk> for PointChunk {
    type Error = WireError;
    fn try_from(c: v1::PointChunk) -> Result<Self, WireError> {
        let relationship = wire::optional("point_chunk.relationship_id", &c.relationship_id)?;
        if c.seq == 0 {
            return Err(WireError::rule("point_chunk.seq", "point seq 0: sequences start at 1"));
        }
        let extents = c
            .extents
            .into_iter()
            .enumerate()
            .map(|(i, e)| extent(&format!("point_chunk.extents[{i}]"), e))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            relationship,
            seq: PointSeq(c.seq),
            extents,
            commit: c.commit,
            created_unix_ms: c.created_unix_ms,
            app_consistent: c.app_consistent,
            resync: c.resync,
        })
    }
}

/// The second level of a resync compare: sub-block hashes of the listed blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubBlocks {
    /// Divides the block size, at least [`MIN_BLOCK_SIZE`].
    pub sub_block_size: u32,
    /// Block indices, at most [`MAX_SUB_HASH_BLOCKS`] (inside the disk: the receiver checks).
    pub blocks: Vec<u64>,
}

/// `BlockHashes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    pub relationship: RelationshipId,
    pub disk: DiskId,
    /// In [`MIN_BLOCK_SIZE`]..=[`MAX_BLOCK_SIZE`].
    pub block_size: u32,
    /// `None`: the hashes of every block of the disk.
    pub sub: Option<SubBlocks>,
}

impl TryFrom<v1::BlockHashesRequest> for BlockHashes {
    type Error = WireError;
    fn try_from(r: v1::BlockHashesRequest) -> Result<Self, WireError> {
        let relationship = wire::field("block_hashes.relationship_id", &r.relationship_id)?;
        let disk = wire::field("block_hashes.disk_id", &r.disk_id)?;
        let bs = r.block_size;
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(WireError::rule(
                "block_hashes.block_size",
                format!("block size {bs} out of range ({MIN_BLOCK_SIZE}..={MAX_BLOCK_SIZE})"),
            ));
        }
        let sub = if r.blocks.is_empty() {
            None
        } else {
            let sbs = r.sub_block_size;
            if sbs < MIN_BLOCK_SIZE || sbs > bs || !bs.is_multiple_of(sbs) {
                return Err(WireError::rule(
                    "block_hashes.sub_block_size",
                    format!("sub-block size {sbs} does not divide block size {bs}"),
                ));
            }
            if r.blocks.len() > MAX_SUB_HASH_BLOCKS {
                return Err(WireError::rule(
                    "block_hashes.blocks",
                    format!("{} blocks listed, at most {MAX_SUB_HASH_BLOCKS} per request", r.blocks.len()),
                ));
            }
            Some(SubBlocks { sub_block_size: sbs, blocks: r.blocks })
        };
        Ok(Self { relationship, disk, block_size: bs, sub })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values no name or id field accepts.
    const HOSTILE: &[&str] = &["../../etc/passwd", "a/b", "/abs", "..", ".", "-x", "a\0b", "é"];
    const REL: &str = "r-0000abcd";

    fn chunk() -> v1::CopyChunk {
        v1::CopyChunk { relationship_id: REL.into(), disk_id: "disk0".into(), data: vec![1; 8], ..Default::default() }
    }

    fn point() -> v1::PointChunk {
        v1::PointChunk {
            relationship_id: REL.into(),
            seq: 3,
            extents: vec![v1::Extent {
                disk_id: "disk0".into(),
                kind: v1::ExtentKind::Zeroes as i32,
                length: 4096,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn hashes() -> v1::BlockHashesRequest {
        v1::BlockHashesRequest {
            relationship_id: REL.into(),
            disk_id: "disk0".into(),
            block_size: 65536,
            ..Default::default()
        }
    }

    fn refused<T: std::fmt::Debug>(r: Result<T, WireError>, field: &str) {
        let e = r.expect_err(field);
        assert_eq!(e.field(), field, "{e}");
        let status = tonic::Status::from(e);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(field), "{}", status.message());
    }

    #[test]
    fn valid_requests_convert() {
        let c = CopyChunk::try_from(chunk()).expect("valid");
        assert_eq!(c.relationship.as_ref().map(|r| r.as_str()), Some(REL));
        assert_eq!((c.disk.as_str(), c.data.len()), ("disk0", 8));
        let p = PointChunk::try_from(point()).expect("valid");
        assert_eq!((p.seq, &p.extents[0].body), (PointSeq(3), &ExtentBody::Zeroes(4096)));
        let h = BlockHashes::try_from(hashes()).expect("valid");
        assert_eq!((h.block_size, h.sub), (65536, None));
        let later = CopyChunk::try_from(v1::CopyChunk { relationship_id: String::new(), ..chunk() }).expect("valid");
        assert_eq!(later.relationship, None);
    }

    #[test]
    fn hostile_names_and_ids_are_refused_naming_the_field() {
        for &bad in HOSTILE.iter().chain(&["rel-1", "r-ABCDEF12"]) {
            let r = v1::CopyProgressRequest { relationship_id: bad.into() };
            refused(CopyProgress::try_from(&r), "copy_progress.relationship_id");
            refused(
                CopyChunk::try_from(v1::CopyChunk { relationship_id: bad.into(), ..chunk() }),
                "copy_chunk.relationship_id",
            );
            refused(
                PointChunk::try_from(v1::PointChunk { relationship_id: bad.into(), ..point() }),
                "point_chunk.relationship_id",
            );
            refused(
                BlockHashes::try_from(v1::BlockHashesRequest { relationship_id: bad.into(), ..hashes() }),
                "block_hashes.relationship_id",
            );
        }
        for &bad in HOSTILE {
            refused(CopyChunk::try_from(v1::CopyChunk { disk_id: bad.into(), ..chunk() }), "copy_chunk.disk_id");
            let mut p = point();
            p.extents.push(v1::Extent { disk_id: bad.into(), ..p.extents[0].clone() });
            refused(PointChunk::try_from(p), "point_chunk.extents[1].disk_id");
            refused(
                BlockHashes::try_from(v1::BlockHashesRequest { disk_id: bad.into(), ..hashes() }),
                "block_hashes.disk_id",
            );
        }
    }

    #[test]
    fn missing_ids_are_refused() {
        refused(CopyProgress::try_from(&v1::CopyProgressRequest::default()), "copy_progress.relationship_id");
        refused(CopyChunk::try_from(v1::CopyChunk { disk_id: String::new(), ..chunk() }), "copy_chunk.disk_id");
        refused(
            BlockHashes::try_from(v1::BlockHashesRequest { disk_id: String::new(), ..hashes() }),
            "block_hashes.disk_id",
        );
    }

    #[test]
    fn other_rules() {
        refused(PointChunk::try_from(v1::PointChunk { seq: 0, ..point() }), "point_chunk.seq");
        let mut p = point();
        p.extents[0].kind = 0;
        refused(PointChunk::try_from(p), "point_chunk.extents[0].kind");
        let mut p = point();
        p.extents[0].data = vec![0; 4];
        refused(PointChunk::try_from(p), "point_chunk.extents[0].data");
        let mut p = point();
        p.extents[0] =
            v1::Extent { kind: v1::ExtentKind::Data as i32, length: MAX_WIRE_DATA + 1, ..p.extents[0].clone() };
        refused(PointChunk::try_from(p), "point_chunk.extents[0].data");
        refused(
            CopyChunk::try_from(v1::CopyChunk { zstd: true, raw_len: (MAX_WIRE_DATA + 1) as u32, ..chunk() }),
            "copy_chunk.data",
        );
        for bs in [0, 4095, MAX_BLOCK_SIZE + 1] {
            refused(
                BlockHashes::try_from(v1::BlockHashesRequest { block_size: bs, ..hashes() }),
                "block_hashes.block_size",
            );
        }
        for sbs in [0, 1000, 131072, 24576] {
            refused(
                BlockHashes::try_from(v1::BlockHashesRequest { blocks: vec![0], sub_block_size: sbs, ..hashes() }),
                "block_hashes.sub_block_size",
            );
        }
        let many = vec![0; MAX_SUB_HASH_BLOCKS + 1];
        refused(
            BlockHashes::try_from(v1::BlockHashesRequest { blocks: many, sub_block_size: 4096, ..hashes() }),
            "block_hashes.blocks",
        );
    }

    #[test]
    fn wire_data_is_exactly_as_announced() {
        let d = WireData::new("d", vec![1, 2, 3], false, 3).expect("valid");
        assert_eq!(d.into_raw().expect("raw"), vec![1, 2, 3]);
        let z = zstd::bulk::compress(&[7u8; 100], 1).expect("compress");
        assert_eq!(WireData::new("d", z.clone(), true, 100).and_then(WireData::into_raw), Ok(vec![7u8; 100]));
        assert!(WireData::new("d", z, true, 99).and_then(WireData::into_raw).is_err());
        assert!(WireData::new("d", vec![1], false, 2).and_then(WireData::into_raw).is_err());
    }
}
