//! [`ReplicaSet`]: every replica of this host, by VM name; creating one (sparse images
//! for a new relationship, or adopting the former primary's images for reverse
//! replication) and removing one.

use siterecovery_proto::model::{RelationshipId, VmName};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use super::state::{DiskCopyProgress, ReplicaDisk, ReplicaSpec, STATE_FILE, State, save_state};
use super::store::Replica;
use super::{ReplicaError, io_at, sync_dir};

/// Every replica of this host, by VM name.
#[derive(Debug)]
pub struct ReplicaSet {
    dir: PathBuf,
    replicas: Mutex<BTreeMap<String, Arc<Replica>>>,
}

impl ReplicaSet {
    /// Opens every replica under `dir`, finishing any interrupted apply.
    pub fn open(dir: &Path) -> Result<Self, ReplicaError> {
        crate::files::private_dir(dir).map_err(io_at(dir))?;
        let mut replicas = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let path = e.map_err(io_at(dir))?.path();
            if !path.join(STATE_FILE).exists() {
                continue;
            }
            // Forced at every start, whatever made the folder.
            if let Err(e) = crate::files::private_dir(&path) {
                tracing::error!(replica = %path.display(), "cannot make the replica folder private: {e}");
                continue;
            }
            match Replica::open(&path) {
                Ok(r) => {
                    replicas.insert(r.spec.vm.clone(), Arc::new(r));
                }
                Err(e) => tracing::error!(replica = %path.display(), "cannot open replica: {e:#}"),
            }
        }
        Ok(Self { dir: dir.to_path_buf(), replicas: Mutex::new(replicas) })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Replica>>> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the replica of `spec.vm` (sparse images), or returns the existing one of
    /// the same relationship.
    pub fn prepare(&self, spec: ReplicaSpec) -> Result<Arc<Replica>, ReplicaError> {
        self.create(spec, |dir, d| {
            let path = dir.join(format!("{}.img", d.id));
            let f = crate::files::create_new(&path).map_err(io_at(&path))?;
            f.set_len(d.size_bytes).map_err(io_at(&path))?;
            f.sync_all().map_err(io_at(&path))
        })
    }

    /// The folder the replica of `vm` lives in.
    pub fn folder_of(&self, vm: &str) -> PathBuf {
        self.dir.join(vm)
    }

    /// Reverse replication, first part: clears the folder the replica of `spec.vm` will
    /// take (a leftover not in service) so that the adoption's images can move in. An
    /// error when a replica of `spec.vm` is in service.
    pub fn clear_for_adoption(&self, spec: &ReplicaSpec) -> Result<PathBuf, ReplicaError> {
        let map = self.lock();
        if let Some(r) = map.get(&spec.vm) {
            return Err(ReplicaError::Exists { vm: spec.vm.clone(), existing: r.spec.relationship_id.clone() });
        }
        let dir = self.folder_of(&spec.vm);
        if dir.exists() {
            tracing::warn!(folder = %dir.display(), "replacing a replica folder that is not in service");
            std::fs::remove_dir_all(&dir).map_err(io_at(&dir))?;
        }
        Ok(dir)
    }

    /// Reverse replication, last part: makes the replica of the images already in its
    /// folder (the former primary's, moved in by the VM module's adoption journal),
    /// with no points; the first point the new primary ships is a
    /// resync, which brings them in line block by block. Idempotent: a replica of the same
    /// relationship already registered (state saved before a crash) is returned as is.
    pub fn adopt(&self, spec: ReplicaSpec) -> Result<Arc<Replica>, ReplicaError> {
        let mut map = self.lock();
        if let Some(r) = map.get(&spec.vm) {
            if r.spec.relationship_id == spec.relationship_id {
                return Ok(r.clone());
            }
            return Err(ReplicaError::Exists { vm: spec.vm.clone(), existing: r.spec.relationship_id.clone() });
        }
        let dir = self.folder_of(&spec.vm);
        for d in &spec.disks {
            let target = dir.join(format!("{}.img", d.id));
            let f = crate::files::open_existing(&target, true).map_err(io_at(&target))?;
            if f.metadata().map_err(io_at(&target))?.len() != d.size_bytes {
                f.set_len(d.size_bytes).map_err(io_at(&target))?;
            }
            f.sync_all().map_err(io_at(&target))?;
        }
        self.register(&mut map, spec, true)
    }

    /// A replica adopted by a reprotect whose provider never heard back (the agent
    /// crashed after the adoption finished): the provider's next reprotect names a new
    /// relationship. A replica of `spec.vm` with no points yet takes the new spec (its
    /// images are kept; the first point is a resync anyway); else an error.
    pub fn readopt(&self, spec: ReplicaSpec) -> Result<Arc<Replica>, ReplicaError> {
        let mut map = self.lock();
        let old =
            map.get(&spec.vm).cloned().ok_or_else(|| ReplicaError::NotFound(format!("replica of {}", spec.vm)))?;
        if old.spec.relationship_id == spec.relationship_id {
            return Ok(old);
        }
        if !old.points().is_empty() || old.spec.disks != spec.disks {
            return Err(ReplicaError::Exists { vm: spec.vm.clone(), existing: old.spec.relationship_id.clone() });
        }
        tracing::warn!(vm = %spec.vm, from = %old.spec.relationship_id, to = %spec.relationship_id, "an adopted replica with no points taken over by a new reprotect");
        map.remove(&spec.vm);
        drop(old);
        self.register(&mut map, spec, true)
    }

    /// [`Self::prepare`]: a fresh folder, one image per disk made by `image`, the state
    /// file (initial copy to do), opened and registered. An existing replica of the same
    /// relationship is returned as is.
    fn create(
        &self,
        spec: ReplicaSpec,
        image: impl Fn(&Path, &ReplicaDisk) -> Result<(), ReplicaError>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let mut map = self.lock();
        if let Some(r) = map.get(&spec.vm) {
            if r.spec.relationship_id == spec.relationship_id {
                return Ok(r.clone());
            }
            return Err(ReplicaError::Exists { vm: spec.vm.clone(), existing: r.spec.relationship_id.clone() });
        }
        let dir = self.dir.join(&spec.vm);
        if dir.exists() {
            // Leftover of an earlier relationship that was not removed cleanly, or a
            // replica whose state could not be read at start: the provider asked for a
            // new one, which starts with a full initial copy.
            tracing::warn!(folder = %dir.display(), "replacing a replica folder that is not in service");
            std::fs::remove_dir_all(&dir).map_err(io_at(&dir))?;
        }
        crate::files::private_dir(&dir).map_err(io_at(&dir))?;
        for d in &spec.disks {
            image(&dir, d)?;
        }
        self.register(&mut map, spec, false)
    }

    /// The state file of the images in the replica's folder (initial copy `complete` or
    /// not), written durably; the replica opened and registered.
    fn register(
        &self,
        map: &mut BTreeMap<String, Arc<Replica>>,
        spec: ReplicaSpec,
        complete: bool,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let dir = self.dir.join(&spec.vm);
        sync_dir(&dir)?;
        let state = State {
            copy: spec
                .disks
                .iter()
                .map(|d| DiskCopyProgress {
                    disk_id: d.id.clone(),
                    acked_offset: if complete { d.size_bytes } else { 0 },
                    complete,
                })
                .collect(),
            spec,
            points: vec![],
            applying: None,
            merges: 0,
            rollback_to: None,
        };
        save_state(&dir, &state)?;
        let r = Arc::new(Replica::open(&dir)?);
        tracing::info!(vm = %r.spec.vm, relationship = %r.spec.relationship_id, adopted = complete, "replica created");
        map.insert(r.spec.vm.clone(), r.clone());
        Ok(r)
    }

    pub fn get(&self, vm: &VmName) -> Option<Arc<Replica>> {
        self.lock().get(vm.as_str()).cloned()
    }

    pub fn by_relationship(&self, relationship_id: &RelationshipId) -> Option<Arc<Replica>> {
        self.lock().values().find(|r| *relationship_id == r.spec.relationship_id.as_str()).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Replica>> {
        self.lock().values().cloned().collect()
    }

    /// Deletes a replica and its folder.
    pub fn remove(&self, vm: &VmName) -> Result<(), ReplicaError> {
        let r = self.lock().remove(vm.as_str());
        if let Some(r) = r {
            std::fs::remove_dir_all(&r.dir).map_err(io_at(&r.dir))?;
            tracing::info!(%vm, "replica removed");
        }
        Ok(())
    }

    /// Deletes the replica folder of `vm` whether or not it could be opened (a committed
    /// failover whose images have already moved out of it). Idempotent.
    pub fn remove_folder(&self, vm: &VmName) -> Result<(), ReplicaError> {
        self.lock().remove(vm.as_str());
        let dir = self.dir.join(vm.as_str());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                sync_dir(&self.dir)?;
                tracing::info!(%vm, "replica folder removed");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_at(&dir)(e)),
        }
    }
}
