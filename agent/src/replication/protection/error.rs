//! Why a protection command failed ([`ProtectionError`]); the control channel maps it
//! to an error code (`control::CommandError::code`, the one mapping).

use crate::offline::OfflineError;
use crate::persist::PersistError;
use crate::replica::ReplicaError;
use crate::replication::sender::{DrainError, ReplicationError};
use crate::vm::VmError;

/// Why a protection command failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtectionError {
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

/// A blocking task that panicked or was cancelled.
pub(super) fn joined(e: tokio::task::JoinError) -> ProtectionError {
    ProtectionError::Internal(e.to_string())
}
