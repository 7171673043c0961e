//! Why a provider command failed ([`CommandError`]: refused at the boundary, or the
//! typed error of the handler that ran it) and the one mapping of those errors to the
//! control channel's `CommandResult` error codes ([`CommandError::code`]).

use siterecovery_proto::model::WireError;
use siterecovery_proto::v1;

use crate::offline::OfflineError;
use crate::protection::ProtectionError;
use crate::replica::ReplicaError;
use crate::vm::VmError;

/// Why a provider command failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// A field of the command broke its rule (named in the message).
    #[error(transparent)]
    Refused(#[from] WireError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Protection(#[from] ProtectionError),
}

/// Out of space (ENOSPC).
const NO_SPACE: i32 = 28;

fn vm_code(e: &VmError) -> v1::ErrorCode {
    match e {
        VmError::Invalid(_) => v1::ErrorCode::InvalidArgument,
        VmError::NotFound(_) => v1::ErrorCode::NotFound,
        VmError::Exists(_) => v1::ErrorCode::AlreadyExists,
        VmError::State(_) => v1::ErrorCode::FailedPrecondition,
        VmError::Io { source, .. } if source.raw_os_error() == Some(NO_SPACE) => v1::ErrorCode::ResourceExhausted,
        _ => v1::ErrorCode::Internal,
    }
}

fn protection_code(e: &ProtectionError) -> v1::ErrorCode {
    match e {
        ProtectionError::Invalid(_) => v1::ErrorCode::InvalidArgument,
        ProtectionError::NotFound(_) => v1::ErrorCode::NotFound,
        ProtectionError::Vm(e) => vm_code(e),
        ProtectionError::Replica(ReplicaError::NotFound(_)) => v1::ErrorCode::NotFound,
        ProtectionError::Replica(ReplicaError::Exists { .. }) => v1::ErrorCode::AlreadyExists,
        ProtectionError::Replica(ReplicaError::State(_)) => v1::ErrorCode::FailedPrecondition,
        ProtectionError::Offline(OfflineError::Invalid(_)) => v1::ErrorCode::FailedPrecondition,
        _ => v1::ErrorCode::Internal,
    }
}

impl CommandError {
    /// The error code the provider sees in the `CommandResult`.
    pub fn code(&self) -> v1::ErrorCode {
        match self {
            CommandError::Refused(_) => v1::ErrorCode::InvalidArgument,
            CommandError::Vm(e) => vm_code(e),
            CommandError::Protection(e) => protection_code(e),
        }
    }
}
