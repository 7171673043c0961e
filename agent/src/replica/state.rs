//! `replica.json`: what the provider asked for ([`ReplicaSpec`]), the initial-copy
//! progress, the retained points and the apply or rollback in progress; saved and read
//! through [`crate::persist`] (kind [`REPLICA_STATE`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ReplicaError;
use crate::persist::{self, REPLICA_STATE};

/// What the provider asked this host to keep a replica of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub relationship_id: String,
    pub vm: String,
    /// Only this host may push data for the relationship.
    pub primary_host_id: String,
    pub disks: Vec<ReplicaDisk>,
    pub retention_ms: u64,
    /// One point is kept per bucket of this length (an hour; shorter in tests).
    #[serde(default = "default_bucket")]
    pub bucket_ms: u64,
    /// The VM's machine settings (from the primary's VM): a failed-over VM runs with them.
    #[serde(default)]
    pub machine: crate::machine::MachineConfig,
}

fn default_bucket() -> u64 {
    3_600_000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDisk {
    pub id: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopyProgress {
    pub disk_id: String,
    /// Everything below is durable in the replica image.
    pub acked_offset: u64,
    pub complete: bool,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    pub id: String,
    pub seq: u64,
    pub created_unix_ms: i64,
    pub app_consistent: bool,
    pub resync: bool,
    /// Bytes of data the point changed.
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PointMeta {
    pub(super) info: PointInfo,
    /// Undo record taking this point back to the previous retained point; `None` for
    /// the oldest retained point.
    pub(super) undo: Option<String>,
}

/// A point being applied: recorded before its extents touch the images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Applying {
    pub(super) seq: u64,
    pub(super) spool: String,
    pub(super) undo: Option<String>,
    pub(super) info: PointInfo,
}

/// `replica.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct State {
    pub(super) spec: ReplicaSpec,
    pub(super) copy: Vec<DiskCopyProgress>,
    /// Retained points, ascending by seq.
    pub(super) points: Vec<PointMeta>,
    pub(super) applying: Option<Applying>,
    /// Counter for merged undo file names.
    #[serde(default)]
    pub(super) merges: u64,
    /// A rollback to this seq was started (commit of a failover to an older point);
    /// re-done on open, as applying before-images again is idempotent.
    #[serde(default)]
    pub(super) rollback_to: Option<u64>,
}

impl State {
    /// A retained point by `"latest"`, its id (`p7`) or its bare sequence (`7`).
    pub(super) fn find_point(&self, point: &str) -> Option<&PointMeta> {
        if point == "latest" {
            self.points.last()
        } else {
            self.points.iter().find(|m| m.info.id == point || m.info.seq.to_string() == point)
        }
    }
}

/// The state file of a replica folder.
pub const STATE_FILE: &str = "replica.json";

pub(super) fn save_state(dir: &Path, state: &State) -> Result<(), ReplicaError> {
    persist::save(&dir.join(STATE_FILE), &REPLICA_STATE, state)?;
    Ok(())
}

/// Reads a replica folder's state file. A missing, torn or corrupt one is an error
/// naming the file: the replica is not opened.
pub(super) fn load_state(dir: &Path) -> Result<State, ReplicaError> {
    let path = dir.join(STATE_FILE);
    persist::load(&path, &REPLICA_STATE)?
        .ok_or_else(|| ReplicaError::NotFound(format!("replica state {}", path.display())))
}
