//! Reading a retained point without a copy: [`PointView`] pins the point, each
//! [`PointDevice`] reads the image overlaid by the undo records of every later point.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::ReplicaError;
use super::state::PointInfo;
use super::store::Replica;
use crate::disk::{BlockDevice, DiskError, check_range};

impl Replica {
    /// Opens a retained point for reading (`"latest"` or a point id); pinned (not pruned)
    /// until the view is dropped.
    pub fn open_point(self: &Arc<Self>, point: &str) -> Result<PointView, ReplicaError> {
        let mut inner = self.write();
        let meta = inner
            .state
            .find_point(point)
            .ok_or_else(|| ReplicaError::NotFound(format!("point {point:?} of {}", self.spec.vm)))?;
        let info = meta.info.clone();
        *inner.pins.entry(info.seq).or_default() += 1;
        drop(inner);
        let view = Arc::new(ViewPin { replica: self.clone(), seq: info.seq });
        let disks = (0..self.images.len())
            .map(|i| (self.images[i].id.clone(), Arc::new(PointDevice { pin: view.clone(), disk: i })))
            .collect();
        Ok(PointView { info, disks })
    }
}

struct ViewPin {
    replica: Arc<Replica>,
    seq: u64,
}

impl Drop for ViewPin {
    fn drop(&mut self) {
        let mut inner = self.replica.write();
        if let Some(n) = inner.pins.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                inner.pins.remove(&self.seq);
            }
        }
    }
}

/// A retained point opened for reading: one read-only device per disk.
pub struct PointView {
    pub info: PointInfo,
    pub disks: Vec<(String, Arc<PointDevice>)>,
}

/// A disk as it was at a point: the image plus the undo records of every later point.
pub struct PointDevice {
    pin: Arc<ViewPin>,
    disk: usize,
}

impl BlockDevice for PointDevice {
    fn size(&self) -> u64 {
        self.pin.replica.images[self.disk].size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let r = &self.pin.replica;
        let img = &r.images[self.disk];
        check_range(offset, buf.len() as u64, img.size)?;
        // The read lock keeps a point from being applied between the image read and
        // the overlay of its undo record.
        let inner = r.read();
        img.file.read_exact_at(buf, offset).map_err(DiskError::from_io)?;
        for (_, undo) in inner.undo.range(self.pin.seq + 1..).rev() {
            undo.overlay(self.disk, offset, buf).map_err(DiskError::from_io)?;
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn trim(&self, _: u64, _: u64) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
}
