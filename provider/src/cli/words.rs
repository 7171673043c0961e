//! The words the CLI prints (and, for failover types, reads) for the wire's enums:
//! the same words as the provider's domain enums and the JSON views use. An unknown
//! value from a newer provider prints as "unknown" rather than failing the command.

use siterecovery_proto::model::{FailoverKind, PointKind};
use siterecovery_proto::v1;

use super::CliError;

/// The wire's failover kind of the CLI's word (`test`, `planned`, `unplanned`).
pub fn failover_type(word: &str) -> Result<i32, CliError> {
    match FailoverKind::from_word(word) {
        Some(k) if k != FailoverKind::Local => Ok(k.into()),
        _ => Err(CliError::Usage(format!("failover type {word:?}: use test, planned or unplanned"))),
    }
}

/// "Enable protection", "Planned failover", ...
pub fn job_kind(v: i32) -> &'static str {
    crate::job::kind_name(v)
}

pub fn job_state(v: i32) -> &'static str {
    crate::job::JobState::name_of(v)
}

pub fn step_state(v: i32) -> &'static str {
    crate::job::StepState::name_of(v)
}

pub fn replication_state(v: i32) -> &'static str {
    crate::relationship::ReplicationState::try_from(v).map_or("unknown", |s| s.as_str())
}

pub fn health(v: i32) -> &'static str {
    crate::relationship::Health::try_from(v).map_or("unknown", |h| h.as_str())
}

pub fn failover_kind(v: i32) -> &'static str {
    FailoverKind::try_from(v).map_or("unknown", |k| k.as_str())
}

pub fn point_kind(v: i32) -> &'static str {
    PointKind::try_from(v).map_or("unknown", |k| k.as_str())
}

pub fn action_kind(v: i32) -> &'static str {
    match v1::PlanActionKind::try_from(v) {
        Ok(v1::PlanActionKind::Script) => "script",
        Ok(v1::PlanActionKind::Manual) => "manual",
        _ => "unknown",
    }
}

pub fn power(v: i32) -> &'static str {
    match v1::PowerState::try_from(v) {
        Ok(v1::PowerState::Running) => "running",
        Ok(v1::PowerState::Off) => "off",
        _ => "unknown",
    }
}

/// `network`, `offline` or `at=<RFC 3339>`, as `policy create --initial` takes it.
pub fn initial_method(p: &v1::Policy) -> String {
    match v1::InitialMethod::try_from(p.initial_method) {
        Ok(v1::InitialMethod::Offline) => "offline".into(),
        Ok(v1::InitialMethod::At) => {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(p.initial_at_unix_ms) * 1_000_000)
                .ok()
                .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
                .map_or_else(|| "at=?".into(), |t| format!("at={t}"))
        }
        _ => "network".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_of_the_wire_enums() {
        assert_eq!(job_kind(v1::JobKind::EnableProtection.into()), "Enable protection");
        assert_eq!(job_state(v1::JobState::Succeeded.into()), "succeeded");
        assert_eq!(step_state(v1::StepState::Running.into()), "running");
        assert_eq!(replication_state(v1::ReplicationState::Replicating.into()), "replicating");
        assert_eq!(health(v1::Health::Normal.into()), "Normal");
        assert_eq!(failover_kind(v1::FailoverKind::Test.into()), "test");
        assert_eq!(point_kind(v1::PointKind::Latest.into()), "latest");
        assert_eq!(point_kind(v1::PointKind::AppConsistent.into()), "app-consistent");
        assert_eq!(action_kind(v1::PlanActionKind::Manual.into()), "manual");
        assert_eq!(power(v1::PowerState::Running.into()), "running");
        assert_eq!(power(0), "unknown");
        assert_eq!(replication_state(999), "unknown");
    }

    #[test]
    fn failover_types_and_refusals() {
        assert_eq!(failover_type("planned").ok(), Some(v1::FailoverKind::Planned as i32));
        assert!(failover_type("local").is_err());
        let e = failover_type("sideways").err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("failover type \"sideways\": use test, planned or unplanned"));
    }

    #[test]
    fn initial_methods() {
        let at = v1::Policy {
            initial_method: v1::InitialMethod::At.into(),
            initial_at_unix_ms: 1_738_360_800_000,
            ..Default::default()
        };
        assert_eq!(initial_method(&at), "at=2025-01-31T22:00:00Z");
        let off = v1::Policy { initial_method: v1::InitialMethod::Offline.into(), ..Default::default() };
        assert_eq!(initial_method(&off), "offline");
        assert_eq!(initial_method(&v1::Policy::default()), "network");
    }
}
