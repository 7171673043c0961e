//! Why a protection command failed ([`ProtectionError`]) and its one mapping to the
//! control channel's error codes ([`ProtectionError::code`]).

use siterecovery_proto::model::WireError;
use siterecovery_proto::v1;

use crate::persist::PersistError;
use crate::replica::ReplicaError;
use crate::replication::offline::OfflineError;
use crate::replication::sender::{DrainError, ReplicationError};
use crate::vm::VmError;

/// Why a protection command failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtectionError {
    /// A command field breaks its rule (named in the message).
    #[error("invalid argument: {0}")]
    Wire(#[from] WireError),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdError),
    #[error(transparent)]
    Offline(#[from] OfflineError),
    /// The protection state file cannot be written.
    #[error(transparent)]
    State(#[from] PersistError),
    /// The sender could not be seeded or sealed.
    #[error(transparent)]
    Sender(#[from] ReplicationError),
    /// A planned failover's drain did not finish.
    #[error(transparent)]
    Drain(#[from] DrainError),
    #[error("internal: {0}")]
    Internal(String),
}

impl ProtectionError {
    pub fn code(&self) -> v1::ErrorCode {
        match self {
            ProtectionError::Wire(_) | ProtectionError::Invalid(_) => v1::ErrorCode::InvalidArgument,
            ProtectionError::NotFound(_) => v1::ErrorCode::NotFound,
            ProtectionError::Vm(e) => e.code(),
            ProtectionError::Replica(ReplicaError::NotFound(_)) => v1::ErrorCode::NotFound,
            ProtectionError::Replica(ReplicaError::Exists { .. }) => v1::ErrorCode::AlreadyExists,
            ProtectionError::Replica(ReplicaError::State(_)) => v1::ErrorCode::FailedPrecondition,
            ProtectionError::Offline(OfflineError::Invalid(_)) => v1::ErrorCode::FailedPrecondition,
            _ => v1::ErrorCode::Internal,
        }
    }
}

/// A blocking task that panicked or was cancelled.
pub(super) fn joined(e: tokio::task::JoinError) -> ProtectionError {
    ProtectionError::Internal(e.to_string())
}
