//! [`VmError`]: why a VM operation failed, with its wire error code.

use std::path::{Path, PathBuf};

use siterecovery_proto::v1;

use crate::nbd;
use crate::persist::PersistError;
use crate::tracker::TrackerError;

/// Why a VM operation failed; `code()` gives the wire error code.
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

impl VmError {
    pub fn code(&self) -> v1::ErrorCode {
        match self {
            VmError::Invalid(_) => v1::ErrorCode::InvalidArgument,
            VmError::NotFound(_) => v1::ErrorCode::NotFound,
            VmError::Exists(_) => v1::ErrorCode::AlreadyExists,
            VmError::State(_) => v1::ErrorCode::FailedPrecondition,
            VmError::Io { source, .. } if source.raw_os_error() == Some(28) => v1::ErrorCode::ResourceExhausted,
            _ => v1::ErrorCode::Internal,
        }
    }
}

pub(super) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io { path: path.to_path_buf(), source }
}
