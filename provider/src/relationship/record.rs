//! The stored records of a relationship: [`RelationshipRecord`] (one protected VM), its
//! latest [`StatusRecord`], and the failovers it goes through; how a status from the
//! primary agent changes the record ([`RelationshipRecord::apply_status`]).

use serde::{Deserialize, Serialize};
use siterecovery_proto::v1;

use super::health::{self, CycleSample, Health, HealthInput};
use super::state::{AgentState, Event, InvalidTransition, ReplicationState};
use crate::network::Reservation;

/// The latest status of a relationship, as stored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusRecord {
    pub received_unix_ms: i64,
    pub agent_state: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub last_point_id: String,
    pub last_point_seq: u64,
    pub last_point_unix_ms: i64,
    pub pending_log_bytes: u64,
    pub bytes_replicated: u64,
    pub error: String,
    pub error_recoverable: bool,
    pub cycles: u64,
    pub missed_cycles: u64,
    pub detail: String,
    pub resync_blocks_compared: u64,
    pub resync_blocks_sent: u64,
    pub resync_wire_bytes: u64,
    /// Conditions the agent reports that make health Warning (a disk on its bitmap).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The effective rate limit (bytes/s, 0 = unlimited) and the achieved rate.
    #[serde(default)]
    pub bandwidth_limit: u64,
    #[serde(default)]
    pub achieved_bytes_per_sec: u64,
}

impl StatusRecord {
    fn from_proto(s: &v1::ReplicationStatus, now: i64) -> Self {
        let p = s.last_point.clone().unwrap_or_default();
        Self {
            received_unix_ms: now,
            agent_state: AgentState::try_from(s.state).map(|a| a.as_str().to_owned()).unwrap_or_default(),
            done_bytes: s.done_bytes,
            total_bytes: s.total_bytes,
            last_point_id: p.id,
            last_point_seq: p.seq,
            last_point_unix_ms: p.created_unix_ms,
            pending_log_bytes: s.pending_log_bytes,
            bytes_replicated: s.bytes_replicated,
            error: s.error.clone(),
            error_recoverable: s.error_recoverable,
            cycles: s.cycles,
            missed_cycles: s.missed_cycles,
            detail: s.detail.clone(),
            resync_blocks_compared: s.resync_blocks_compared,
            resync_blocks_sent: s.resync_blocks_sent,
            resync_wire_bytes: s.resync_wire_bytes,
            warnings: s.warnings.clone(),
            bandwidth_limit: s.bandwidth_limit,
            achieved_bytes_per_sec: s.achieved_bytes_per_sec,
        }
    }
}

/// One protected VM (table `relationships`, by id `r-<hex>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelationshipRecord {
    pub id: String,
    pub vm: String,
    pub primary_host_id: String,
    pub replica_host_id: String,
    pub policy: String,
    /// The policy's interval when protection was enabled (health is judged by it).
    pub interval_ms: u64,
    pub state: ReplicationState,
    pub created_unix_ms: i64,
    /// Sum of the VM's disk sizes.
    pub total_bytes: u64,
    #[serde(default)]
    pub status: StatusRecord,
    #[serde(default)]
    pub replicating_since_unix_ms: i64,
    /// Resyncs finished (resynchronising → replicating): a resync job waits for it to grow.
    #[serde(default)]
    pub resyncs_completed: u64,
    /// Progress rate of the current phase, bytes per second.
    #[serde(default)]
    pub rate_bytes_per_sec: u64,
    /// Cycle counters over the health window, oldest first.
    #[serde(default)]
    pub samples: Vec<CycleSample>,
    /// Target addresses of the VM's NICs, reserved at protection time.
    #[serde(default)]
    pub addresses: Vec<Reservation>,
    /// The running test failover (one per VM at a time).
    #[serde(default)]
    pub test_failover: Option<TestFailoverRecord>,
    /// The planned / unplanned / local failover that moved the VM to the replica host.
    #[serde(default)]
    pub failover: Option<FailoverRecord>,
    /// Reverse replication: the relationship this one reversed.
    #[serde(default)]
    pub reversed_from: String,
}

/// A running test failover.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TestFailoverRecord {
    pub test_vm: String,
    pub point_id: String,
    /// mapped | isolated | none
    pub network: String,
    pub job_id: String,
    pub started_unix_ms: i64,
}

/// A failover of the relationship's VM to its replica host.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailoverRecord {
    pub kind: siterecovery_proto::model::FailoverKind,
    pub point_id: String,
    pub job_id: String,
    pub started_unix_ms: i64,
    #[serde(default)]
    pub committed_unix_ms: i64,
}

const MAX_SAMPLES: usize = 256;

impl RelationshipRecord {
    /// Applies one status (pure apart from the given clock). Returns whether the state changed.
    pub fn apply_status(&mut self, s: &v1::ReplicationStatus, now: i64) -> Result<bool, InvalidTransition> {
        let agent = AgentState::try_from(s.state)
            .map_err(|_| InvalidTransition { from: self.state.as_str(), event: "an unknown agent state" })?;
        let old = self.state;
        let new =
            old.next(Event::Agent { state: agent, error: !s.error.is_empty(), recoverable: s.error_recoverable })?;
        if old == ReplicationState::Resynchronising && new == ReplicationState::Replicating {
            self.resyncs_completed += 1;
        }
        if new == ReplicationState::Replicating && old != ReplicationState::Replicating {
            self.replicating_since_unix_ms = now;
        }
        // Progress rate: smoothed over successive statuses of the same phase.
        let prev = &self.status;
        let dt = now - prev.received_unix_ms;
        if prev.agent_state == agent.as_str() && s.done_bytes >= prev.done_bytes && dt > 0 && prev.received_unix_ms > 0
        {
            let inst = (s.done_bytes - prev.done_bytes) * 1000 / dt as u64;
            self.rate_bytes_per_sec =
                if self.rate_bytes_per_sec == 0 { inst } else { (self.rate_bytes_per_sec * 3 + inst) / 4 };
        } else if prev.agent_state != agent.as_str() {
            self.rate_bytes_per_sec = 0;
        }
        let cycles_changed = self.samples.last().is_none_or(|l| l.cycles != s.cycles || l.missed != s.missed_cycles);
        if cycles_changed {
            self.samples.push(CycleSample { unix_ms: now, cycles: s.cycles, missed: s.missed_cycles });
            let keep_from = now - 2 * health::window_ms(self.interval_ms) as i64;
            // Keep one sample older than the window as its baseline.
            while self.samples.len() > 2 && self.samples[1].unix_ms < keep_from {
                self.samples.remove(0);
            }
            if self.samples.len() > MAX_SAMPLES {
                self.samples.remove(0);
            }
        }
        self.status = StatusRecord::from_proto(s, now);
        self.state = new;
        Ok(new != old)
    }

    /// Health and its reasons now.
    pub fn health(&self, primary_connected: bool, primary_host: &str, now: i64) -> (Health, Vec<String>) {
        health::evaluate(
            &HealthInput {
                state: self.state,
                interval_ms: self.interval_ms,
                last_point_unix_ms: self.status.last_point_unix_ms,
                replicating_since_unix_ms: self.replicating_since_unix_ms,
                error: &self.status.error,
                error_recoverable: self.status.error_recoverable,
                detail: &self.status.detail,
                warnings: &self.status.warnings,
                samples: &self.samples,
                primary_connected,
                primary_host,
            },
            now,
        )
    }
}

/// Whether two host ids name the same host across a re-registration: ids are
/// `<host name>-<6 hex digits>` (see `registration.rs`), so the name part is compared.
pub fn same_host(a: &str, b: &str) -> bool {
    fn name(id: &str) -> Option<&str> {
        let (n, suffix) = id.rsplit_once('-')?;
        (suffix.len() == 6 && suffix.bytes().all(|c| c.is_ascii_hexdigit())).then_some(n)
    }
    matches!((name(a), name(b)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    fn rel() -> RelationshipRecord {
        RelationshipRecord {
            id: "r-1".into(),
            vm: "vm1".into(),
            primary_host_id: "h1".into(),
            replica_host_id: "h2".into(),
            policy: "gold".into(),
            interval_ms: 1000,
            state: S::WaitingForInitial,
            created_unix_ms: 0,
            total_bytes: 1 << 20,
            status: StatusRecord::default(),
            replicating_since_unix_ms: 0,
            resyncs_completed: 0,
            rate_bytes_per_sec: 0,
            samples: vec![],
            addresses: vec![],
            test_failover: None,
            failover: None,
            reversed_from: String::new(),
        }
    }

    fn status(state: &str, done: u64) -> v1::ReplicationStatus {
        v1::ReplicationStatus {
            relationship_id: "r-1".into(),
            vm: "vm1".into(),
            state: AgentState::from_word(state).map_or(0, i32::from),
            done_bytes: done,
            total_bytes: 1 << 20,
            ..Default::default()
        }
    }

    #[test]
    fn statuses_drive_progress_rate_and_resync_count() {
        let mut r = rel();
        assert!(r.apply_status(&status("initial", 0), 1000).expect("apply"));
        assert!(!r.apply_status(&status("initial", 500_000), 2000).expect("apply"));
        assert_eq!(r.rate_bytes_per_sec, 500_000);
        assert_eq!(r.status.done_bytes, 500_000);
        assert!(r.apply_status(&status("replicating", 0), 3000).expect("apply"));
        assert_eq!(r.state, S::Replicating);
        assert_eq!(r.replicating_since_unix_ms, 3000);
        r.apply_status(&status("resynchronising", 0), 4000).expect("apply");
        r.apply_status(&status("replicating", 0), 5000).expect("apply");
        assert_eq!(r.resyncs_completed, 1);
        let mut bad = status("error", 0);
        bad.error = "broken log chain".into();
        r.apply_status(&bad, 6000).expect("apply");
        assert_eq!(r.state, S::StoppedOnError);
        assert_eq!(r.health(true, "hv1", 6000).0, Health::Critical);
        assert!(r.apply_status(&status("nonsense", 0), 7000).is_err());
    }

    #[test]
    fn same_name_different_suffix() {
        assert!(same_host("hv-a-0a1b2c", "hv-a-ffffff"));
        assert!(!same_host("hv-a-0a1b2c", "hv-b-0a1b2c"));
        assert!(!same_host("hv-a-0a1b2c", "hv-a"));
        assert!(!same_host("0123456789abcdef", "0123456789abcdee"));
    }
}
