//! The initial copy into a replica: network copy chunks ([`Replica::write_initial`],
//! made durable by [`Replica::ack_initial`]) or an offline export imported whole
//! ([`Replica::import_initial`]).

use siterecovery_proto::model::DiskId;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::image::check;
use super::state::save_state;
use super::store::Replica;
use super::{ReplicaError, io_at};

impl Replica {
    /// Writes initial-copy data into a replica image (not durable until [`Self::ack_initial`]).
    pub fn write_initial(&self, disk_id: &DiskId, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        let disk_id = disk_id.as_str();
        let i = self.disk_index(disk_id)?;
        let img = &self.images[i];
        check(img, "initial copy", offset, data.len() as u64)?;
        let inner = self.read();
        let acked = inner.state.copy.get(i).map(|c| c.acked_offset).unwrap_or(0);
        if offset < acked {
            return Err(ReplicaError::State(format!(
                "initial copy of {disk_id} at {offset} is below the acknowledged offset {acked}"
            )));
        }
        if !inner.state.points.is_empty() {
            return Err(ReplicaError::State("initial copy after recovery points exist".into()));
        }
        img.file.write_all_at(data, offset).map_err(io_at(&img.path))
    }

    /// Makes the initial copy of a disk durable up to `offset`.
    pub fn ack_initial(&self, disk_id: &DiskId, offset: u64, complete: bool) -> Result<(), ReplicaError> {
        self.ack_disk(disk_id.as_str(), offset, complete)
    }

    /// [`Self::ack_initial`] of a disk named by the replica's own spec.
    fn ack_disk(&self, disk_id: &str, offset: u64, complete: bool) -> Result<(), ReplicaError> {
        let i = self.disk_index(disk_id)?;
        let img = &self.images[i];
        if offset > img.size {
            return Err(ReplicaError::OutOfRange { what: "ack", disk: disk_id.into(), offset, len: 0, size: img.size });
        }
        img.file.sync_data().map_err(io_at(&img.path))?;
        let mut inner = self.write();
        if let Some(c) = inner.state.copy.get_mut(i) {
            c.acked_offset = c.acked_offset.max(offset);
            c.complete |= complete;
        }
        save_state(&self.dir, &inner.state)
    }

    /// Offline initial replication: copies the export in `dir` (already checked against
    /// this replica with [`crate::offline::Manifest::check`]) into the images, verifying
    /// each disk's checksum, then marks every disk's initial copy complete. Only the
    /// manifest's (allocated) ranges are read and written. A checksum mismatch empties
    /// the images again and fails. Returns the bytes copied; an already completed
    /// import returns 0.
    pub fn import_initial(&self, dir: &Path, manifest: &crate::offline::Manifest) -> Result<u64, ReplicaError> {
        {
            let inner = self.read();
            if inner.state.copy.iter().all(|c| c.complete) {
                return Ok(0);
            }
            if !inner.state.points.is_empty() || inner.state.copy.iter().any(|c| c.acked_offset > 0) {
                return Err(ReplicaError::State(
                    "the replica already received part of a network initial copy: import refused".into(),
                ));
            }
        }
        let mut copied = 0;
        let mut buf = vec![0u8; crate::offline::CHUNK as usize];
        let result = (|| {
            for img in &self.images {
                let d = manifest
                    .disks
                    .iter()
                    .find(|d| d.id == img.id)
                    .ok_or_else(|| ReplicaError::NotFound(format!("disk {} in the export", img.id)))?;
                let path = dir.join(&d.file);
                let src = File::open(&path).map_err(io_at(&path))?;
                let len = src.metadata().map_err(io_at(&path))?.len();
                if len != d.size_bytes {
                    return Err(ReplicaError::State(format!(
                        "{} is {len} bytes, the manifest says {}",
                        path.display(),
                        d.size_bytes
                    )));
                }
                let mut sum = crate::offline::Checksum::default();
                for &(s, e) in &d.ranges {
                    check(img, "import", s, e - s)?;
                    let mut off = s;
                    while off < e {
                        let n = (e - off).min(crate::offline::CHUNK) as usize;
                        src.read_exact_at(&mut buf[..n], off).map_err(io_at(&path))?;
                        sum.update(&buf[..n]);
                        img.file.write_all_at(&buf[..n], off).map_err(io_at(&img.path))?;
                        off += n as u64;
                        copied += n as u64;
                    }
                }
                if sum.hex() != d.xxh3 {
                    return Err(ReplicaError::Corrupt {
                        path,
                        why: format!(
                            "checksum mismatch: xxh3 {} read, {} in the manifest (the export was damaged in transit)",
                            sum.hex(),
                            d.xxh3
                        ),
                    });
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Nothing half-imported stays: the images are empty again.
            for img in &self.images {
                let _ = img.file.set_len(0).and_then(|()| img.file.set_len(img.size));
            }
            return Err(e);
        }
        for img in &self.images {
            self.ack_disk(&img.id, img.size, true)?;
        }
        tracing::info!(vm = %self.spec.vm, bytes = copied, dir = %dir.display(), "initial copy imported");
        Ok(copied)
    }
}
