//! The job engine's former path: the job engine is [`crate::jobs`]; the CLI keeps
//! naming the wire's job kinds through here.

use siterecovery_proto::v1;

pub use crate::jobs::{JobKind, JobRecord, JobState, StepRecord, StepState, now_ms};

/// The kind name (what the CLI prints) of the wire's job kind.
pub fn kind_name(kind: i32) -> &'static str {
    JobKind::try_from(kind).map_or("unknown job", JobKind::name)
}

/// The wire's job kind of a kind name.
pub fn kind_to_wire(kind: &str) -> v1::JobKind {
    JobKind::from_name(kind).map_or(v1::JobKind::Unspecified, v1::JobKind::from)
}
