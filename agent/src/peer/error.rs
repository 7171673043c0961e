//! Why a Peer RPC was refused ([`PeerError`]) and its one mapping to `tonic::Status`
//! (`From<PeerError> for Status`). The sender classifies the codes: FailedPrecondition
//! and DataLoss make it resynchronise, Unavailable and ResourceExhausted make it retry.

use siterecovery_proto::model::WireError;
use tonic::Status;

use crate::replica::ReplicaError;

/// Why a Peer RPC was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A request field breaks its rule (named in the message).
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The request is well-formed but does not fit this replica or stream.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// No (or an unusable) client certificate.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller is not allowed this: another vault, not a host, not the primary.
    #[error("{0}")]
    Denied(String),
    /// The stream ended before the operation was complete; nothing was applied.
    #[error("{0}")]
    Aborted(String),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The caller's own stream failed; its status is passed on as it is.
    #[error("inbound stream: {}", .0.message())]
    Inbound(Status),
    #[error("{0}")]
    Internal(String),
}

impl PeerError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }
}

impl From<Status> for PeerError {
    fn from(s: Status) -> Self {
        Self::Inbound(s)
    }
}

impl From<PeerError> for Status {
    fn from(e: PeerError) -> Status {
        let msg = e.to_string();
        match e {
            PeerError::Wire(w) => w.into(),
            PeerError::Invalid(_) => Status::invalid_argument(msg),
            PeerError::NotFound(_) => Status::not_found(msg),
            PeerError::Unauthenticated(_) => Status::unauthenticated(msg),
            PeerError::Denied(_) => Status::permission_denied(msg),
            PeerError::Aborted(_) => Status::aborted(msg),
            PeerError::Inbound(s) => s,
            PeerError::Internal(_) => Status::internal(msg),
            PeerError::Replica(r) => {
                tracing::warn!("replica store refused: {r:#}");
                match &r {
                    ReplicaError::NotFound(_) => Status::not_found(msg),
                    ReplicaError::Exists { .. } => Status::already_exists(msg),
                    ReplicaError::OutOfRange { .. } => Status::invalid_argument(msg),
                    ReplicaError::State(_) => Status::failed_precondition(msg),
                    ReplicaError::Corrupt { .. } => Status::data_loss(msg),
                    ReplicaError::Io { source, .. } if source.raw_os_error() == Some(nix::libc::ENOSPC) => {
                        Status::resource_exhausted(msg)
                    }
                    ReplicaError::Io { .. } | ReplicaError::StateFile(_) => Status::unavailable(msg),
                }
            }
        }
    }
}
