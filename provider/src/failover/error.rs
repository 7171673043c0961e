//! What a failover operation refuses or fails with, and how each is classified.

use siterecovery_proto::model::WireError;

use crate::agents::{AgentError, AgentErrorKind};
use crate::error::{Classify, ErrorClass};
use crate::jobs::JobError;
use crate::store::StoreError;

/// An error of the failover area (test, planned, unplanned failover, commit, change of
/// point, cleanup, reprotect). Refusals are returned before a job starts; the rest end
/// a job's task as its error text.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The request does not convert into domain types (a field breaks its rule).
    #[error(transparent)]
    Request(#[from] WireError),
    /// The inventory has no such VM.
    #[error("no VM {0:?} (see `vm list`)")]
    UnknownVm(String),
    /// The VM exists but has no replication relationship.
    #[error("VM {0:?} is not protected (see `protect {0}`)")]
    NotProtected(String),
    /// Not possible in the relationship's current state; the text says what to do first.
    #[error("{0}")]
    Refused(String),
    /// A host the operation needs is not connected to the provider.
    #[error("{0}")]
    HostDown(String),
    /// Another job is working on the VM, or the job store failed.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The relationship was removed while the operation ran.
    #[error("{0}")]
    RelationshipGone(String),
    /// The relationship refused the change (a transition no longer possible).
    #[error("{0}")]
    Relationship(String),
    /// The relationship could not be written.
    #[error("{0}")]
    RelationshipStore(String),
    /// An agent refused or failed a command; `host` says which (`replica host hv-b`).
    #[error("{host}: {source}")]
    Agent {
        host: String,
        #[source]
        source: AgentError,
    },
    /// `latest-app-consistent` asked, and the replica holds no such point.
    #[error("VM {0} has no app-consistent recovery point (see `points {0}`)")]
    NoAppConsistentPoint(String),
    /// The operation failed after its job was created: the error names the job.
    #[error("{source} (job {job})")]
    InJob {
        job: String,
        #[source]
        source: Box<FailoverError>,
    },
}

impl Classify for FailoverError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Request(_) => ErrorClass::InvalidArgument,
            Self::UnknownVm(_) | Self::RelationshipGone(_) => ErrorClass::NotFound,
            Self::NotProtected(_) | Self::Refused(_) | Self::Relationship(_) | Self::NoAppConsistentPoint(_) => {
                ErrorClass::FailedPrecondition
            }
            Self::Job(JobError::Busy(_)) => ErrorClass::FailedPrecondition,
            Self::Job(JobError::NotFound(_)) => ErrorClass::NotFound,
            Self::Job(JobError::Store(_)) | Self::Store(_) | Self::RelationshipStore(_) => ErrorClass::Internal,
            Self::HostDown(_) => ErrorClass::Unavailable,
            Self::Agent { source, .. } => agent_class(source),
            Self::InJob { source, .. } => source.class(),
        }
    }
}

/// How an agent's refusal reads to the operator who asked the provider.
fn agent_class(e: &AgentError) -> ErrorClass {
    match e.kind() {
        AgentErrorKind::Unavailable | AgentErrorKind::Timeout => ErrorClass::Unavailable,
        AgentErrorKind::NotFound => ErrorClass::NotFound,
        AgentErrorKind::AlreadyExists => ErrorClass::AlreadyExists,
        AgentErrorKind::FailedPrecondition | AgentErrorKind::ResourceExhausted => ErrorClass::FailedPrecondition,
        // The provider sent something the agent could not take: a provider bug.
        AgentErrorKind::InvalidArgument | AgentErrorKind::Internal => ErrorClass::Internal,
    }
}
