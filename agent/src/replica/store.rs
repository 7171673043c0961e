//! [`Replica`]: one VM's replica, opened (see `recover`): its folder, its images, and
//! under one lock its state and the undo records of its points; the accessors every
//! other part reads it through.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::ReplicaError;
use super::image::{self, Image};
use super::state::{DiskCopyProgress, PointInfo, ReplicaSpec, State};
use super::undo::Undo;

/// What changes as points arrive, under one lock.
pub(super) struct Inner {
    pub(super) state: State,
    /// The loaded undo record of each retained point that has one, by seq.
    pub(super) undo: BTreeMap<u64, Arc<Undo>>,
    /// Points exported for reading (never pruned while pinned).
    pub(super) pins: HashMap<u64, usize>,
}

/// The replica of one VM.
pub struct Replica {
    pub(super) dir: PathBuf,
    pub(super) spec: ReplicaSpec,
    pub(super) images: Vec<Image>,
    pub(super) inner: RwLock<Inner>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("dir", &self.dir).field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl Replica {
    pub(super) fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn spec(&self) -> &ReplicaSpec {
        &self.spec
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn disk_index(&self, disk_id: &str) -> Result<usize, ReplicaError> {
        self.images
            .iter()
            .position(|i| i.id == disk_id)
            .ok_or_else(|| ReplicaError::NotFound(format!("disk {disk_id} in replica of {}", self.spec.vm)))
    }

    pub fn copy_progress(&self) -> Vec<DiskCopyProgress> {
        self.read().state.copy.clone()
    }

    /// True once every disk's initial copy is complete.
    pub fn initial_complete(&self) -> bool {
        self.read().state.copy.iter().all(|c| c.complete)
    }

    pub fn latest_seq(&self) -> Option<u64> {
        self.read().state.points.last().map(|m| m.info.seq)
    }

    pub fn latest(&self) -> Option<PointInfo> {
        self.read().state.points.last().map(|m| m.info.clone())
    }

    /// Retained points, oldest first.
    pub fn points(&self) -> Vec<PointInfo> {
        self.read().state.points.iter().map(|m| m.info.clone()).collect()
    }

    pub(super) fn sync_images(&self) -> Result<(), ReplicaError> {
        image::sync_all(&self.images)
    }

    /// The replica's image files by disk id.
    pub fn images(&self) -> Vec<(String, PathBuf)> {
        self.images.iter().map(|i| (i.id.clone(), i.path.clone())).collect()
    }
}
