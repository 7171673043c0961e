//! [`RelationshipError`]: why a relationship could not be found, read or changed.

use tonic::Status;

use super::state::InvalidTransition;
use crate::error::{Classify, ErrorClass, status};
use crate::jobs::JobError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RelationshipError {
    #[error("no VM {0:?} (see `vm list`)")]
    UnknownVm(String),
    #[error("VM {0:?} is not protected (see `protect {0}`)")]
    NotProtected(String),
    #[error("relationship {0} no longer exists")]
    Gone(String),
    #[error("VM {vm}: {source}")]
    Refused { vm: String, source: InvalidTransition },
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for RelationshipError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::UnknownVm(_) | Self::Gone(_) => ErrorClass::NotFound,
            Self::NotProtected(_) | Self::Refused { .. } => ErrorClass::FailedPrecondition,
            Self::Job(e) => e.class(),
            Self::Store(_) => ErrorClass::Internal,
        }
    }
}

impl Classify for JobError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Busy(_) => ErrorClass::FailedPrecondition,
            Self::NotFound(_) => ErrorClass::NotFound,
            Self::Store(_) => ErrorClass::Internal,
        }
    }
}

/// For the orchestration that still answers with `Status` (failover, plans).
impl From<RelationshipError> for Status {
    fn from(e: RelationshipError) -> Self {
        status(&e)
    }
}
