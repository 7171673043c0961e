//! [`ReplicaError`]: why a replica store operation failed (the peer service maps it to
//! gRPC statuses in one place, `From<peer::PeerError> for Status`).

use std::io;
use std::path::{Path, PathBuf};

use crate::persist::PersistError;

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// No replica for that VM or relationship, or no such disk or point.
    #[error("not found: {0}")]
    NotFound(String),
    /// The VM already has a replica for another relationship.
    #[error("VM {vm} already has a replica for relationship {existing}")]
    Exists { vm: String, existing: String },
    /// An extent or copy chunk outside the disk, or too large.
    #[error("{what}: range {offset}+{len} is outside disk {disk} of {size} bytes")]
    OutOfRange { what: &'static str, disk: String, offset: u64, len: u64, size: u64 },
    /// A request that cannot apply to the replica's state (e.g. copy below the acked offset).
    #[error("invalid replica state: {0}")]
    State(String),
    /// A spool or undo record failed its checksum or is malformed.
    #[error("{path}: corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `replica.json` could not be written, or read back (torn, corrupt, newer version).
    #[error(transparent)]
    StateFile(#[from] PersistError),
}

impl ReplicaError {
    /// Whether retrying later may succeed (I/O, e.g. no space) or the caller must act.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, ReplicaError::Io { .. } | ReplicaError::StateFile(PersistError::Io { .. }))
    }
}

pub(super) fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io { path: path.to_path_buf(), source }
}
