//! Replication policies and cloud pairings: what an operator decides before protecting
//! a VM.
//!
//! A policy says how often a VM replicates (interval), how long its recovery points are
//! kept (retention), how often an app-consistent point is made, compression, the initial
//! replication method and the automatic-resync window. A cloud pairing says that the VMs
//! of a source cloud replicate to the hosts of a target cloud at another site, under a
//! policy. Both are validated here by pure functions (tests call them directly); the
//! Protection service (in `protection`) stores them.

//!
//! - [`records`]: policies and pairings as stored ([`InitialMethod`] among them).
//! - [`validate`]: the operator's requests (converted with `TryFrom`) and their checks.

pub mod records;
pub mod validate;

use std::time::Duration;

use siterecovery_proto::model::wire::WireError;

use crate::error::{Classify, ErrorClass};

pub use records::{CloudInfo, InitialMethod, PairingRecord, PolicyRecord, parse_rfc3339_ms};
pub use validate::{
    PairingRequest, PolicyRequest, check_policy_delete, human_duration, replication_settings, validate_pairing,
    validate_policy,
};

/// Intervals a production provider accepts (as the seed's Hyper-V Replica does).
pub const INTERVALS: [Duration; 3] = [Duration::from_secs(30), Duration::from_secs(300), Duration::from_secs(900)];
pub(crate) const MIN_RETENTION: Duration = Duration::from_secs(3600);
pub(crate) const MAX_RETENTION: Duration = Duration::from_secs(30 * 86400);

/// Why a policy or pairing was refused. Each maps to one `tonic::Status` code in
/// the Protection service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The request does not convert into domain types (a name, the initial method).
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("interval {0} is not allowed: use 30s, 5m or 15m")]
    Interval(String),
    #[error("interval must be at least 1s")]
    IntervalTooShort,
    #[error("retention {0} is out of range: use 1h to 30d")]
    Retention(String),
    #[error("retention {retention} is shorter than the interval {interval}")]
    RetentionBelowInterval { retention: String, interval: String },
    #[error("app-consistent snapshot frequency {every} is shorter than the interval {interval} (use 0 for never)")]
    AppConsistent { every: String, interval: String },
    #[error(
        "initial replication method {0:?}: use network, offline or at=TIME (RFC 3339, e.g. at=2025-01-31T22:00:00Z)"
    )]
    Initial(String),
    #[error("resync window hours must be 0-23, got {0}-{1}")]
    Window(u32, u32),
    #[error("port {0} is out of range (1-65535, or 0 for the host's replication port)")]
    Port(u32),
    #[error("no policy {0:?} (see `policy list`)")]
    UnknownPolicy(String),
    #[error("policy {name:?} is used by the pairing of cloud {source_cloud:?}; unpair it first")]
    InUse { name: String, source_cloud: String },
    #[error("policy {0:?} already exists")]
    Exists(String),
}

/// Why a cloud pairing was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairingError {
    /// The request does not convert into domain types (a cloud or policy name).
    #[error(transparent)]
    Request(#[from] WireError),
    #[error("no cloud {0:?} (clouds come from registered hosts; see `cloud list`)")]
    UnknownCloud(String),
    #[error("cannot pair cloud {0:?} with itself")]
    SameCloud(String),
    #[error(
        "clouds {source_cloud:?} and {target_cloud:?} are both at site {site:?}; the target must be at another site"
    )]
    SameSite { source_cloud: String, target_cloud: String, site: String },
    #[error("no policy {0:?} (see `policy list`)")]
    UnknownPolicy(String),
    #[error(
        "cloud {source_cloud:?} is already paired with {target_cloud:?} and {protected} of its VMs are protected; unprotect them first"
    )]
    AlreadyPaired { source_cloud: String, target_cloud: String, protected: usize },
}

/// How the Protection service answers each refusal (through [`crate::error::status`]).
impl Classify for PolicyError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::Exists(_) => ErrorClass::AlreadyExists,
            Self::UnknownPolicy(_) => ErrorClass::NotFound,
            Self::InUse { .. } => ErrorClass::FailedPrecondition,
            Self::Request(_)
            | Self::Interval(_)
            | Self::IntervalTooShort
            | Self::Retention(_)
            | Self::RetentionBelowInterval { .. }
            | Self::AppConsistent { .. }
            | Self::Initial(_)
            | Self::Window(..)
            | Self::Port(_) => ErrorClass::InvalidArgument,
        }
    }
}

impl Classify for PairingError {
    fn class(&self) -> ErrorClass {
        match self {
            Self::UnknownCloud(_) | Self::UnknownPolicy(_) => ErrorClass::NotFound,
            Self::Request(_) | Self::SameCloud(_) | Self::SameSite { .. } => ErrorClass::InvalidArgument,
            Self::AlreadyPaired { .. } => ErrorClass::FailedPrecondition,
        }
    }
}

#[cfg(test)]
mod tests;
