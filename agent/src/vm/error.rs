//! [`VmError`]: why a VM operation failed (its wire error code is `control::CommandError::code`).

use std::path::{Path, PathBuf};

use crate::nbd;
use crate::persist::PersistError;
use crate::tracker::TrackerError;

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no VM {0:?} on this host")]
    NotFound(String),
    #[error("VM {0:?} already exists on this host")]
    Exists(String),
    #[error("{0}")]
    State(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    /// `vm.json` could not be written or read (torn, corrupt, newer version).
    #[error(transparent)]
    Config(#[from] PersistError),
    #[error(transparent)]
    Overlay(#[from] crate::overlay::OverlayError),
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io { path: path.to_path_buf(), source }
}
