//! The adoption journal of reprotect: the former primary's VM becomes the replica of
//! its images for reverse replication. Its steps (the names the journal records):
//! `planned` (VM stopped, journal written in the VM folder) → `images_moved` (every
//! image renamed into the replica folder, both folders fsynced) → `replica_created`
//! (the replica's state file, initial copy complete, no points) → `config_removed`
//! (`vm.json` gone: the point of no return) → the VM folder removed, journal with it.
//!
//! A crash is settled at the next start: before `vm.json` is removed the adoption is
//! **rolled back** (images renamed back, the replica folder removed: the VM is a stopped
//! VM with its disks again, as the provider, which saw the command fail, believes, and
//! the operator's next `reprotect` adopts it anew); after, it is **finished** (the VM
//! folder removed; the replica stays, and a next `reprotect` with a new relationship
//! takes it over while it has no points: `ReplicaSet::readopt`). Either way the
//! images are never lost and the reverse replication that follows starts with a resync
//! of the adopted images, never a full copy.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Journal, Outcome, sync_dir, vm_name, write};
use crate::faults;
use crate::replica::{ReplicaSet, ReplicaSpec};
use crate::vm::config::CONFIG_FILE;
use crate::vm::{VmError, io};

/// The steps of an adoption, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdoptStep {
    Planned,
    ImagesMoved,
    ReplicaCreated,
    ConfigRemoved,
}

impl AdoptStep {
    pub fn next(self) -> Option<Self> {
        use AdoptStep::*;
        match self {
            Planned => Some(ImagesMoved),
            ImagesMoved => Some(ReplicaCreated),
            ReplicaCreated => Some(ConfigRemoved),
            ConfigRemoved => None,
        }
    }

    pub fn failpoint(self) -> &'static str {
        use AdoptStep::*;
        match self {
            Planned => faults::REPROTECT_JOURNAL_WRITTEN,
            ImagesMoved => faults::REPROTECT_IMAGES_MOVED,
            ReplicaCreated => faults::REPROTECT_REPLICA_CREATED,
            ConfigRemoved => faults::REPROTECT_CONFIG_REMOVED,
        }
    }
}

/// One disk of an adoption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptDisk {
    pub id: String,
    /// The VM's image (absolute path), until it is moved.
    pub source: PathBuf,
    /// Its place in the replica folder (absolute path).
    pub target: PathBuf,
}

impl AdoptDisk {
    /// The image is in neither of its places.
    fn missing(&self) -> VmError {
        VmError::State(format!(
            "disk {}: neither {} nor {} exists",
            self.id,
            self.source.display(),
            self.target.display()
        ))
    }
}

/// The adoption of the VM `vm`'s images as the replica `spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptPlan {
    pub vm: String,
    pub spec: ReplicaSpec,
    pub disks: Vec<AdoptDisk>,
    pub done: AdoptStep,
}

/// Runs the adoption's remaining steps forward, saving the journal after each, then
/// removes the VM folder (and the journal in it).
pub(super) fn forward(folder: &Path, mut plan: AdoptPlan, replicas: &ReplicaSet) -> Result<Outcome, VmError> {
    while let Some(step) = plan.done.next() {
        adopt_step(folder, &plan, step, replicas)?;
        faults::point(step.failpoint()).map_err(io(folder))?;
        plan.done = step;
        write(folder, &Journal::Adopt(plan.clone()))?;
    }
    remove_vm_folder(folder)?;
    Ok(Outcome::Adopted)
}

/// An adoption found at start: finished when `vm.json` is gone, else rolled back.
pub(super) fn settle(folder: &Path, plan: AdoptPlan, replicas: &ReplicaSet) -> Result<Outcome, VmError> {
    if !folder.join(CONFIG_FILE).exists() {
        remove_vm_folder(folder)?;
        return Ok(Outcome::Adopted);
    }
    for d in &plan.disks {
        if !d.source.exists() && d.target.exists() {
            std::fs::rename(&d.target, &d.source).map_err(io(&d.source))?;
        } else if !d.source.exists() {
            return Err(d.missing());
        }
    }
    sync_dir(folder)?;
    let vm = vm_name(&plan.vm)?;
    replicas.remove_folder(&vm).map_err(|e| VmError::State(format!("removing the half-adopted replica: {e}")))?;
    super::remove(folder)?;
    Ok(Outcome::AdoptionRolledBack)
}

fn adopt_step(folder: &Path, plan: &AdoptPlan, step: AdoptStep, replicas: &ReplicaSet) -> Result<(), VmError> {
    match step {
        AdoptStep::Planned => Ok(()),
        AdoptStep::ImagesMoved => {
            let dir = replicas.folder_of(&plan.spec.vm);
            crate::files::private_dir(&dir).map_err(io(&dir))?;
            for d in &plan.disks {
                if d.source.exists() {
                    std::fs::rename(&d.source, &d.target).map_err(io(&d.target))?;
                } else if !d.target.exists() {
                    return Err(d.missing());
                }
            }
            sync_dir(&dir)?;
            sync_dir(folder)
        }
        AdoptStep::ReplicaCreated => {
            replicas
                .adopt(plan.spec.clone())
                .map_err(|e| VmError::State(format!("making the replica of the adopted images: {e}")))?;
            Ok(())
        }
        AdoptStep::ConfigRemoved => super::remove_file_in(folder, CONFIG_FILE),
    }
}

fn remove_vm_folder(folder: &Path) -> Result<(), VmError> {
    match std::fs::remove_dir_all(folder) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(folder)(e)),
    }
    if let Some(parent) = folder.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}
