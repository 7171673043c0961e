//! The kinds of job: one per long operation, with the words the CLI prints.

use std::fmt;

use serde::{Deserialize, Serialize};
use siterecovery_proto::v1;

/// What a job does. Stored and printed as its words ("Enable protection").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    #[serde(rename = "Enable protection")]
    EnableProtection,
    #[serde(rename = "Finalize protection")]
    FinalizeProtection,
    #[serde(rename = "Disable protection")]
    DisableProtection,
    #[serde(rename = "Resync")]
    Resync,
    #[serde(rename = "Test failover")]
    TestFailover,
    #[serde(rename = "Planned failover")]
    PlannedFailover,
    #[serde(rename = "Unplanned failover")]
    UnplannedFailover,
    #[serde(rename = "Commit failover")]
    CommitFailover,
    #[serde(rename = "Change recovery point")]
    ChangePoint,
    #[serde(rename = "Cleanup test failover")]
    CleanupTestFailover,
    #[serde(rename = "Reverse replication")]
    ReverseReplication,
    #[serde(rename = "Local failover detected")]
    LocalFailover,
    #[serde(rename = "Recovery plan failover")]
    RecoveryPlan,
}

impl JobKind {
    /// Every kind, in wire order.
    pub const ALL: [Self; 13] = [
        Self::EnableProtection,
        Self::FinalizeProtection,
        Self::DisableProtection,
        Self::Resync,
        Self::TestFailover,
        Self::PlannedFailover,
        Self::UnplannedFailover,
        Self::CommitFailover,
        Self::ChangePoint,
        Self::CleanupTestFailover,
        Self::ReverseReplication,
        Self::LocalFailover,
        Self::RecoveryPlan,
    ];

    /// The words the CLI prints (and the store keeps).
    pub fn name(self) -> &'static str {
        match self {
            Self::EnableProtection => "Enable protection",
            Self::FinalizeProtection => "Finalize protection",
            Self::DisableProtection => "Disable protection",
            Self::Resync => "Resync",
            Self::TestFailover => "Test failover",
            Self::PlannedFailover => "Planned failover",
            Self::UnplannedFailover => "Unplanned failover",
            Self::CommitFailover => "Commit failover",
            Self::ChangePoint => "Change recovery point",
            Self::CleanupTestFailover => "Cleanup test failover",
            Self::ReverseReplication => "Reverse replication",
            Self::LocalFailover => "Local failover detected",
            Self::RecoveryPlan => "Recovery plan failover",
        }
    }

    /// The kind of its words.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<JobKind> for v1::JobKind {
    fn from(k: JobKind) -> Self {
        use v1::JobKind as K;
        match k {
            JobKind::EnableProtection => K::EnableProtection,
            JobKind::FinalizeProtection => K::FinalizeProtection,
            JobKind::DisableProtection => K::DisableProtection,
            JobKind::Resync => K::Resync,
            JobKind::TestFailover => K::TestFailover,
            JobKind::PlannedFailover => K::PlannedFailover,
            JobKind::UnplannedFailover => K::UnplannedFailover,
            JobKind::CommitFailover => K::CommitFailover,
            JobKind::ChangePoint => K::ChangePoint,
            JobKind::CleanupTestFailover => K::CleanupTestFailover,
            JobKind::ReverseReplication => K::ReverseReplication,
            JobKind::LocalFailover => K::LocalFailover,
            JobKind::RecoveryPlan => K::RecoveryPlan,
        }
    }
}

impl From<JobKind> for i32 {
    fn from(k: JobKind) -> Self {
        v1::JobKind::from(k).into()
    }
}

impl TryFrom<i32> for JobKind {
    type Error = i32;
    /// The wire's value; unspecified and unknown refused.
    fn try_from(v: i32) -> Result<Self, i32> {
        Self::ALL.into_iter().find(|k| i32::from(*k) == v).ok_or(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_wire_and_serde_round_trip() {
        for k in JobKind::ALL {
            assert_eq!(JobKind::from_name(k.name()), Some(k));
            assert_eq!(JobKind::try_from(i32::from(k)), Ok(k));
            let json = serde_json::to_string(&k).expect("json");
            assert_eq!(json, format!("\"{}\"", k.name()));
            assert_eq!(serde_json::from_str::<JobKind>(&json).expect("back"), k);
        }
        assert_eq!(JobKind::try_from(0), Err(0));
        assert_eq!(JobKind::from_name("bogus"), None);
    }
}
