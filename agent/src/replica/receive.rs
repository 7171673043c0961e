//! Receiving a point: [`PointSpool`] spools its extents (`spool`), and on commit applies
//! it atomically (the order is in the module doc of [`crate::replica`]): undo record,
//! "applying" mark in the state, extents into the images, the point recorded, pruning.

use siterecovery_proto::model::DiskId;
use std::fs::File;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Arc;

use super::image::check;
use super::spool::{self, ExtentData};
use super::state::{Applying, PointInfo, PointMeta, save_state};
use super::store::Replica;
use super::undo::{load_undo, write_undo};
use super::{MAX_EXTENT, ReplicaError, io_at, sync_dir};

impl Replica {
    /// Starts receiving point `seq`.
    pub fn begin_point(
        self: &Arc<Self>,
        seq: u64,
        created_unix_ms: i64,
        app_consistent: bool,
        resync: bool,
    ) -> Result<PointSpool, ReplicaError> {
        let name = format!("spool-{seq}-{}.pt", siterecovery_certs::random_hex(4));
        let path = self.dir.join(&name);
        let w = spool::create(&path, seq)?;
        Ok(PointSpool {
            replica: self.clone(),
            name,
            path,
            w: Some(w),
            seq,
            created_unix_ms,
            app_consistent,
            resync,
            ranges: vec![Vec::new(); self.images.len()],
            bytes: 0,
        })
    }
}

/// A point being received: extents spooled to a file, applied on commit.
pub struct PointSpool {
    replica: Arc<Replica>,
    pub(super) name: String,
    path: PathBuf,
    pub(super) w: Option<BufWriter<File>>,
    seq: u64,
    created_unix_ms: i64,
    app_consistent: bool,
    resync: bool,
    /// Ranges touched, per disk (for the undo record).
    pub(super) ranges: Vec<Vec<(u64, u64)>>,
    bytes: u64,
}

impl Drop for PointSpool {
    fn drop(&mut self) {
        if self.w.is_some() {
            // Never committed: nothing was applied.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl PointSpool {
    /// Adds an extent; extents apply in the order pushed.
    pub fn push(&mut self, disk_id: &DiskId, offset: u64, data: ExtentData<'_>) -> Result<(), ReplicaError> {
        let disk_id = disk_id.as_str();
        let disk = self.replica.disk_index(disk_id)?;
        let img = &self.replica.images[disk];
        let len = data.len();
        if len == 0 {
            return Ok(());
        }
        if matches!(data, ExtentData::Data(_)) && len > MAX_EXTENT {
            return Err(ReplicaError::OutOfRange { what: "extent", disk: disk_id.into(), offset, len, size: img.size });
        }
        check(img, "extent", offset, len)?;
        let w = self.w.as_mut().ok_or_else(|| ReplicaError::State("spool already committed".into()))?;
        spool::write_extent(w, &self.path, disk as u32, offset, data)?;
        self.ranges[disk].push((offset, len));
        self.bytes += len;
        Ok(())
    }

    /// Persists the point, then applies it atomically (see the module doc). A seq the
    /// replica already has returns that point (the sender's ack was lost).
    pub fn commit(mut self) -> Result<PointInfo, ReplicaError> {
        let replica = self.replica.clone();
        let w = self.w.take().ok_or_else(|| ReplicaError::State("spool already committed".into()))?;
        let path = self.path.clone();
        let result = (|| {
            spool::finish(w, &path)?;
            sync_dir(&replica.dir)?;
            let mut inner = replica.write();
            if let Some(existing) = inner.state.points.iter().find(|m| m.info.seq == self.seq) {
                return Ok(existing.info.clone());
            }
            if let Some(last) = inner.state.points.last()
                && self.seq < last.info.seq
            {
                return Err(ReplicaError::State(format!(
                    "point {} is older than the latest point {}",
                    self.seq, last.info.seq
                )));
            }
            if !inner.state.copy.iter().all(|c| c.complete) {
                return Err(ReplicaError::State("a point arrived before the initial copy completed".into()));
            }
            let info = PointInfo {
                id: format!("p{}", self.seq),
                seq: self.seq,
                created_unix_ms: self.created_unix_ms,
                app_consistent: self.app_consistent,
                resync: self.resync,
                size_bytes: self.bytes,
            };
            // Before-images, only when an earlier point exists to go back to.
            let undo = if inner.state.points.is_empty() {
                None
            } else {
                let name = format!("undo-{}.undo", self.seq);
                write_undo(&replica.images, &replica.dir.join(&name), self.seq, &self.ranges)?;
                Some(name)
            };
            inner.state.applying =
                Some(Applying { seq: self.seq, spool: self.name.clone(), undo: undo.clone(), info: info.clone() });
            save_state(&replica.dir, &inner.state)?;
            spool::apply(&replica.images, &path)?;
            replica.sync_images()?;
            inner.state.applying = None;
            inner.state.points.push(PointMeta { info: info.clone(), undo: undo.clone() });
            if let Some(u) = &undo {
                inner.undo.insert(self.seq, Arc::new(load_undo(&replica.dir.join(u), replica.images.len())?));
            }
            crate::faults::point(crate::faults::REPLICA_APPLIED_MARK).map_err(io_at(&replica.dir))?;
            save_state(&replica.dir, &inner.state)?;
            if let Err(e) = replica.prune(&mut inner) {
                tracing::warn!(vm = %replica.spec.vm, "pruning recovery points: {e:#}");
            }
            Ok(info)
        })();
        let _ = std::fs::remove_file(&path);
        result
    }
}
