//! The failover journal: `failover commit` and change-point as a plan written durably
//! before their first step, so a crash in between is finished (or undone) at the next
//! agent start instead of leaving a VM that cannot start.
//!
//! The file is `vms/<vm>/failover.journal`, a [`crate::persist`] envelope (kind
//! [`FAILOVER_JOURNAL`], JSON payload: [`Journal`]); `agent/docs/failover-journal.md`
//! describes it. It names the whole plan (the point, every disk's overlay, replica image
//! and target) and the last step done. Every step is idempotent and is followed by a
//! save of the journal naming it, so a crash between a step and that save only repeats
//! the step. The journal is removed last.
//!
//! A **commit** goes forward only: once the replica is rolled back to the point the
//! later points are gone, so there is nothing to go back to. A **change-point** goes
//! forward too when its target point is still on the replica; otherwise it is rolled
//! back (the VM stays on its former point). Either way the overlay writes are
//! discarded, as the operator asked.
//!
//! The order of a commit (the step names are what the journal records):
//! `planned` → `rolled_back` (replica at the point) → `overlays_folded` (overlay blocks
//! written into the replica images, fsynced) → `images_moved` (renamed into the VM
//! folder, both folders fsynced) → `overlays_removed` → `config_written` (`vm.json`
//! names the images, `committed`) → `replica_removed` → journal removed.
//! A change-point: `planned` → `overlays_removed` → `config_written` → journal removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::VmName;

use super::config::{read_config, save_config};
use super::{VmError, io};
use crate::disk::BlockDevice;
use crate::faults;
use crate::overlay::Overlay;
use crate::persist::{self, FAILOVER_JOURNAL, PersistError};
use crate::replica::ReplicaSet;

pub mod adopt;
#[cfg(test)]
mod tests;

pub use adopt::{AdoptDisk, AdoptPlan, AdoptStep};

/// The journal's file name in the VM folder.
pub const JOURNAL_FILE: &str = "failover.journal";

/// `failover.journal`: one operation in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Journal {
    Commit(CommitPlan),
    ChangePoint(ChangePointPlan),
    /// Reprotect: the VM's images adopted as a replica ([`adopt`]).
    Adopt(AdoptPlan),
}

/// The steps of a commit, in order; a journal records the last one done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommitStep {
    Planned,
    RolledBack,
    OverlaysFolded,
    ImagesMoved,
    OverlaysRemoved,
    ConfigWritten,
    ReplicaRemoved,
}

impl CommitStep {
    /// The step after this one; `None` after the last (the journal goes).
    pub fn next(self) -> Option<Self> {
        use CommitStep::*;
        match self {
            Planned => Some(RolledBack),
            RolledBack => Some(OverlaysFolded),
            OverlaysFolded => Some(ImagesMoved),
            ImagesMoved => Some(OverlaysRemoved),
            OverlaysRemoved => Some(ConfigWritten),
            ConfigWritten => Some(ReplicaRemoved),
            ReplicaRemoved => None,
        }
    }

    /// The failpoint just after this step's effect (before the journal says it is done).
    pub fn failpoint(self) -> &'static str {
        use CommitStep::*;
        match self {
            Planned => faults::COMMIT_JOURNAL_WRITTEN,
            RolledBack => faults::COMMIT_ROLLED_BACK,
            OverlaysFolded => faults::COMMIT_OVERLAY_FOLDED,
            ImagesMoved => faults::COMMIT_IMAGES_MOVED,
            OverlaysRemoved => faults::COMMIT_OVERLAYS_REMOVED,
            ConfigWritten => faults::COMMIT_CONFIG_WRITTEN,
            ReplicaRemoved => faults::COMMIT_REPLICA_REMOVED,
        }
    }
}

/// The steps of a change-point, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangePointStep {
    Planned,
    OverlaysRemoved,
    ConfigWritten,
}

impl ChangePointStep {
    pub fn next(self) -> Option<Self> {
        use ChangePointStep::*;
        match self {
            Planned => Some(OverlaysRemoved),
            OverlaysRemoved => Some(ConfigWritten),
            ConfigWritten => None,
        }
    }

    pub fn failpoint(self) -> &'static str {
        use ChangePointStep::*;
        match self {
            Planned => faults::CHANGE_POINT_JOURNAL_WRITTEN,
            OverlaysRemoved => faults::CHANGE_POINT_OVERLAYS_REMOVED,
            ConfigWritten => faults::CHANGE_POINT_CONFIG_WRITTEN,
        }
    }
}

/// One disk of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitDisk {
    pub id: String,
    pub size_bytes: u64,
    /// The overlay's file name in the VM folder (its map is `<overlay>.map`).
    pub overlay: String,
    /// The replica's image (absolute path), until it is moved.
    pub source: PathBuf,
    /// The image's file name in the VM folder once moved.
    pub target: String,
}

/// A commit of the failed-over VM `vm` to its point `point_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitPlan {
    pub vm: String,
    pub point_id: String,
    pub disks: Vec<CommitDisk>,
    pub done: CommitStep,
}

/// A change-point of `vm` (a failed-over or test VM over the replica `replica_of`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangePointPlan {
    pub vm: String,
    pub replica_of: String,
    pub from_point: String,
    pub to_point: String,
    /// Overlay file names in the VM folder.
    pub overlays: Vec<String>,
    pub done: ChangePointStep,
}

/// How a journaled operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    /// The VM now runs over this point.
    PointChanged(String),
    /// The target point is gone: the VM stays on its former point (overlay writes gone).
    ChangeRolledBack(String),
    /// The VM's images are the replica now; the VM folder is gone.
    Adopted,
    /// An adoption interrupted before the VM's config was removed: the images are back,
    /// the VM is a stopped VM again.
    AdoptionRolledBack,
}

/// The journal of `folder`: `Ok(None)` when no operation is in progress. A torn or
/// corrupt journal is an error naming the file (never taken for "none": the VM's files
/// may be half-moved).
pub fn read(folder: &Path) -> Result<Option<Journal>, PersistError> {
    let path = folder.join(JOURNAL_FILE);
    persist::remove_leftovers(&path);
    persist::load(&path, &FAILOVER_JOURNAL)
}

/// Writes the journal durably (temp, fsync, rename, fsync dir).
pub fn write(folder: &Path, journal: &Journal) -> Result<(), VmError> {
    persist::save(&folder.join(JOURNAL_FILE), &FAILOVER_JOURNAL, journal)?;
    Ok(())
}

fn remove(folder: &Path) -> Result<(), VmError> {
    remove_file_in(folder, JOURNAL_FILE)
}

/// Removes `folder/name` if it is there, then fsyncs `folder`.
fn remove_file_in(folder: &Path, name: &str) -> Result<(), VmError> {
    let path = folder.join(name);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&path)(e)),
    }
    sync_dir(folder)
}

fn sync_dir(dir: &Path) -> Result<(), VmError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn vm_name(name: &str) -> Result<VmName, VmError> {
    VmName::new(name.to_owned()).map_err(|e| VmError::State(format!("the journal names a bad VM {name:?}: {e}")))
}

/// Writes a new journal, then runs it to the end (blocking I/O).
pub fn start(folder: &Path, journal: Journal, replicas: &ReplicaSet) -> Result<Outcome, VmError> {
    write(folder, &journal)?;
    let fp = match &journal {
        Journal::Commit(p) => p.done.failpoint(),
        Journal::ChangePoint(p) => p.done.failpoint(),
        Journal::Adopt(p) => p.done.failpoint(),
    };
    faults::point(fp).map_err(io(&folder.join(JOURNAL_FILE)))?;
    run(folder, journal, replicas)
}

/// Settles a journal found at start: a commit or change-point is run to its end
/// ([`run`]), an adoption finished or rolled back ([`adopt`]).
pub fn resume(folder: &Path, journal: Journal, replicas: &ReplicaSet) -> Result<Outcome, VmError> {
    match journal {
        Journal::Adopt(plan) => adopt::settle(folder, plan, replicas),
        other => run(folder, other, replicas),
    }
}

/// Runs the steps the journal has not done yet, saving it after each, and removes it.
pub fn run(folder: &Path, journal: Journal, replicas: &ReplicaSet) -> Result<Outcome, VmError> {
    match journal {
        Journal::Commit(mut plan) => {
            while let Some(step) = plan.done.next() {
                commit_step(folder, &plan, step, replicas)?;
                faults::point(step.failpoint()).map_err(io(folder))?;
                plan.done = step;
                write(folder, &Journal::Commit(plan.clone()))?;
            }
            remove(folder)?;
            Ok(Outcome::Committed)
        }
        Journal::ChangePoint(mut plan) => {
            let replica_of = vm_name(&plan.replica_of)?;
            // Forward only while the target point is still there; the check is the same
            // on every run, so a resumed change never flips direction half-way.
            let target_there =
                replicas.get(&replica_of).is_some_and(|r| r.points().iter().any(|p| p.id == plan.to_point));
            let point = if target_there { plan.to_point.clone() } else { plan.from_point.clone() };
            while let Some(step) = plan.done.next() {
                change_point_step(folder, &plan, step, &point)?;
                faults::point(step.failpoint()).map_err(io(folder))?;
                plan.done = step;
                write(folder, &Journal::ChangePoint(plan.clone()))?;
            }
            remove(folder)?;
            if target_there { Ok(Outcome::PointChanged(point)) } else { Ok(Outcome::ChangeRolledBack(point)) }
        }
        Journal::Adopt(plan) => adopt::forward(folder, plan, replicas),
    }
}

fn commit_step(folder: &Path, plan: &CommitPlan, step: CommitStep, replicas: &ReplicaSet) -> Result<(), VmError> {
    match step {
        CommitStep::Planned => Ok(()),
        CommitStep::RolledBack => {
            let vm = vm_name(&plan.vm)?;
            let replica = replicas
                .get(&vm)
                .ok_or_else(|| VmError::State(format!("the replica of {vm} is gone: the commit cannot finish")))?;
            replica
                .rollback_to(&plan.point_id)
                .map_err(|e| VmError::State(format!("rolling the replica back: {e}")))?;
            Ok(())
        }
        CommitStep::OverlaysFolded => {
            for d in &plan.disks {
                fold(folder, d)?;
            }
            Ok(())
        }
        CommitStep::ImagesMoved => {
            for d in &plan.disks {
                let target = folder.join(&d.target);
                if d.source.exists() {
                    std::fs::rename(&d.source, &target).map_err(io(&target))?;
                } else if !target.exists() {
                    return Err(VmError::State(format!(
                        "disk {}: neither {} nor {} exists",
                        d.id,
                        d.source.display(),
                        target.display()
                    )));
                }
            }
            sync_dir(folder)?;
            for d in &plan.disks {
                if let Some(parent) = d.source.parent().filter(|p| p.exists()) {
                    sync_dir(parent)?;
                }
            }
            Ok(())
        }
        CommitStep::OverlaysRemoved => {
            // A dirty-block bitmap beside the VM's new image (or its overlay) is stale:
            // the committed image starts its own tracking.
            for d in &plan.disks {
                Overlay::remove_files(&folder.join(&d.overlay));
                for f in [&d.overlay, &d.target] {
                    let image = folder.join(f);
                    crate::tracker::bitmap::remove_bitmap_of(&image).map_err(io(&image))?;
                }
            }
            sync_dir(folder)
        }
        CommitStep::ConfigWritten => {
            let mut config =
                read_config(folder)?.ok_or_else(|| VmError::State(format!("{}: no VM config", folder.display())))?;
            for c in &mut config.disks {
                if let Some(d) = plan.disks.iter().find(|d| d.id == c.id) {
                    c.file = d.target.clone();
                }
            }
            if let Some(f) = &mut config.failover {
                f.committed = true;
            }
            save_config(folder, &config)
        }
        CommitStep::ReplicaRemoved => {
            let vm = vm_name(&plan.vm)?;
            replicas.remove_folder(&vm).map_err(|e| VmError::State(format!("removing the committed replica: {e}")))
        }
    }
}

/// Writes the overlay's blocks into the disk's image wherever it is now (the replica's
/// folder, or the VM folder after the move), fsynced. Writing them twice is harmless.
fn fold(folder: &Path, d: &CommitDisk) -> Result<(), VmError> {
    let ov_path = folder.join(&d.overlay);
    if !ov_path.exists() {
        return Ok(());
    }
    let target = folder.join(&d.target);
    let img_path = if d.source.exists() { d.source.clone() } else { target };
    let base: Arc<dyn BlockDevice> = Arc::new(crate::disk::RawFile::open(&img_path, true).map_err(io(&img_path))?);
    let ov = Overlay::open(base, &ov_path)?;
    let img = crate::files::open_existing(&img_path, true).map_err(io(&img_path))?;
    let mut buf = vec![0u8; crate::overlay::BLOCK as usize];
    for b in ov.written_blocks() {
        let off = b * crate::overlay::BLOCK;
        let n = d.size_bytes.saturating_sub(off).min(crate::overlay::BLOCK) as usize;
        ov.read_overlay_block(b, &mut buf[..n]).map_err(io(&ov_path))?;
        std::os::unix::fs::FileExt::write_all_at(&img, &buf[..n], off).map_err(io(&img_path))?;
    }
    img.sync_all().map_err(io(&img_path))
}

fn change_point_step(folder: &Path, plan: &ChangePointPlan, step: ChangePointStep, point: &str) -> Result<(), VmError> {
    match step {
        ChangePointStep::Planned => Ok(()),
        ChangePointStep::OverlaysRemoved => {
            for o in &plan.overlays {
                Overlay::remove_files(&folder.join(o));
            }
            sync_dir(folder)
        }
        ChangePointStep::ConfigWritten => {
            let mut config =
                read_config(folder)?.ok_or_else(|| VmError::State(format!("{}: no VM config", folder.display())))?;
            if let Some(f) = &mut config.failover {
                f.point_id = point.to_owned();
            }
            save_config(folder, &config)
        }
    }
}
