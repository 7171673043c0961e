//! [`ProtectionError`]: why enabling, finalizing, disabling or resyncing protection,
//! an offline import or export, a read of recovery points, or a change of policies,
//! pairings or networks was refused. The Protection service maps it to a status once
//! ([`crate::error::status`]).

use siterecovery_proto::model::WireError;

use crate::addresses::AddressError;
use crate::agents::{AgentError, AgentErrorKind};
use crate::error::{Classify, ErrorClass};
use crate::jobs::JobError;
use crate::network::NetworkError;
use crate::policy::{PairingError, PolicyError};
use crate::relationship::{InvalidTransition, RelationshipError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ProtectionError {
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("no VM {0:?} (see `vm list`)")]
    UnknownVm(String),
    #[error("VM {vm:?} is already protected (relationship {relationship}, {state})")]
    AlreadyProtected { vm: String, relationship: String, state: &'static str },
    #[error("the host of VM {0:?} is no longer registered")]
    VmHostGone(String),
    #[error("the primary host is no longer registered")]
    PrimaryGone,
    #[error(
        "cloud {cloud:?} of host {host} is not paired: `cloud pair --source {cloud} --target CLOUD --policy POLICY` first"
    )]
    NotPaired { cloud: String, host: String },
    #[error("policy {policy:?} of the pairing of {cloud:?} no longer exists")]
    PolicyGone { policy: String, cloud: String },
    #[error("primary host {0} is not connected")]
    PrimaryNotConnected(String),
    #[error("no host of target cloud {0:?} is connected")]
    NoTargetHost(String),
    #[error(
        "not enough space in target cloud {cloud:?}: host {host} (the emptiest connected one) has {free} free, VM {vm} needs {needed}"
    )]
    NoSpace { cloud: String, host: String, free: String, vm: String, needed: String },
    #[error(
        "policy {policy} replicates the initial copy offline: give `--export-dir DIR` (an absolute directory on \
         the primary host {primary} to export the initial copy to; then carry it to the replica host {replica} and run \
         `protect-import {vm} --dir DIR`)"
    )]
    ExportDirRequired { policy: String, primary: String, replica: String, vm: String },
    #[error("--export-dir is for offline initial replication; policy {policy} copies the initial replica {how}")]
    ExportDirNotOffline { policy: String, how: String },
    #[error("{what} directory {dir:?} must be an absolute path")]
    NotAbsolute { what: &'static str, dir: String },
    #[error("no Enable protection job of VM {vm} is waiting for an import (replication is {state}; see `job list`)")]
    NotWaitingForImport { vm: String, state: &'static str },
    #[error("job {0} is no longer waiting for an import")]
    NoLongerWaiting(String),
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    #[error("the replica host returned no export URI")]
    NoExportUri,
    /// An agent refused or could not be reached; `context` says which host.
    #[error("{context}{}", source.message())]
    Agent { context: String, source: AgentError },
    #[error(transparent)]
    Addresses(#[from] AddressError),
    #[error("cloud {0:?} is not paired (see `cloud list`)")]
    CloudNotPaired(String),
    #[error("{count} VM(s) of cloud {cloud:?} are protected; unprotect them first")]
    CloudHasProtected { count: usize, cloud: String },
    /// The refusal of a job that was created and failed (its id helps find it).
    #[error("{source} (job {job})")]
    InJob { job: String, source: Box<ProtectionError> },
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Pairing(#[from] PairingError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Relationship(#[from] RelationshipError),
    #[error(transparent)]
    Job(#[from] JobError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ProtectionError {
    pub fn in_job(self, job: &str) -> Self {
        Self::InJob { job: job.to_owned(), source: Box::new(self) }
    }

    pub fn agent(context: impl Into<String>, source: AgentError) -> Self {
        Self::Agent { context: context.into(), source }
    }
}

fn agent_class(kind: AgentErrorKind) -> ErrorClass {
    match kind {
        AgentErrorKind::Unavailable => ErrorClass::Unavailable,
        AgentErrorKind::Timeout => ErrorClass::DeadlineExceeded,
        AgentErrorKind::InvalidArgument => ErrorClass::InvalidArgument,
        AgentErrorKind::NotFound => ErrorClass::NotFound,
        AgentErrorKind::AlreadyExists => ErrorClass::AlreadyExists,
        AgentErrorKind::FailedPrecondition => ErrorClass::FailedPrecondition,
        AgentErrorKind::ResourceExhausted => ErrorClass::ResourceExhausted,
        AgentErrorKind::Internal => ErrorClass::Internal,
    }
}

impl Classify for ProtectionError {
    fn class(&self) -> ErrorClass {
        use ErrorClass as C;
        match self {
            Self::Request(_)
            | Self::ExportDirRequired { .. }
            | Self::ExportDirNotOffline { .. }
            | Self::NotAbsolute { .. } => C::InvalidArgument,
            Self::UnknownVm(_) | Self::CloudNotPaired(_) => C::NotFound,
            Self::AlreadyProtected { .. } => C::AlreadyExists,
            Self::VmHostGone(_)
            | Self::PrimaryGone
            | Self::NotPaired { .. }
            | Self::PolicyGone { .. }
            | Self::NoSpace { .. }
            | Self::NotWaitingForImport { .. }
            | Self::NoLongerWaiting(_)
            | Self::Transition(_)
            | Self::CloudHasProtected { .. } => C::FailedPrecondition,
            Self::PrimaryNotConnected(_) | Self::NoTargetHost(_) => C::Unavailable,
            Self::NoExportUri | Self::Store(_) => C::Internal,
            Self::Agent { source, .. } => agent_class(source.kind()),
            Self::Addresses(e) => e.class(),
            Self::InJob { source, .. } => source.class(),
            Self::Policy(e) => e.class(),
            Self::Pairing(e) => e.class(),
            Self::Network(e) => e.class(),
            Self::Relationship(e) => e.class(),
            Self::Job(e) => e.class(),
        }
    }
}
