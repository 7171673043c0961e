//! Protection: replication relationships of protected VMs, their state machine, the
//! statuses agents report, and the operator's Protection service (policies, pairings,
//! protect / unprotect / resync jobs, recovery points, jobs).
//!
//! How statuses drive jobs: the primary agent sends a `ReplicationStatus` on every phase
//! change and after every cycle. [`ProtectionCore::on_status`] applies it to the
//! relationship through [`ReplicationState::next`] (a pure transition function), keeps
//! the latest status in memory (persisted on a state change, a new point, or at most
//! once a second) and bumps the change counter of [`Jobs`]. Job tasks waiting on a
//! relationship ("Initial replication", "Resynchronise") wake on that counter, re-read
//! the relationship, copy its progress into the job and end the step when the state
//! says so. They never wait for ever: each waiting step has an overall timeout, and it
//! fails as soon as its relationship is removed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use serde::{Deserialize, Serialize};
use siterecovery_certs::Role;
use siterecovery_certs::VaultId;
use siterecovery_proto::model::{PolicyName, SiteName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::protection_server::Protection;
use siterecovery_proto::v1::provider_message::Command;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::agents::{AgentError, AgentErrorKind, Agents};
use crate::auth::authorize;
use crate::health::{self, CycleSample, Health, HealthInput};
use crate::inventory::HostRecord;
use crate::inventory::VmRecord;
use crate::jobs::{self, Claim, EnableStep, JobKind, JobRecord, JobState, Jobs, Step, now_ms};
use crate::network::{self, NetworkError, NetworkStore, Reservation};
use crate::policy::{self, CloudInfo, PairingError, PairingRecord, PolicyError, PolicyRecord};
use crate::store::{HOSTS, PAIRINGS, POLICIES, RELATIONSHIPS, Store, StoreError, VMS};

/// Runtime settings of protection.
#[derive(Debug, Clone)]
pub struct ProtectionConfig {
    /// `serve --test-intervals`: any interval from 1 s, retry unit of a second.
    pub test_intervals: bool,
    /// Overall limit of a waiting step (initial replication, resync, finalize).
    pub step_timeout: Duration,
    /// Limit of one command to an agent.
    pub command_timeout: Duration,
}

impl Default for ProtectionConfig {
    fn default() -> Self {
        Self {
            test_intervals: false,
            step_timeout: Duration::from_secs(48 * 3600),
            command_timeout: Duration::from_secs(120),
        }
    }
}

impl ProtectionConfig {
    pub fn for_tests() -> Self {
        Self {
            test_intervals: true,
            step_timeout: Duration::from_secs(15 * 60),
            command_timeout: Duration::from_secs(60),
        }
    }
}

// ---------------------------------------------------------------------------------
// The state machine.

/// Replication state of a relationship, as the provider sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationState {
    NotEnabled,
    WaitingForInitial,
    InitialInProgress,
    Replicating,
    ResyncRequired,
    Resynchronising,
    Paused,
    /// A planned or unplanned failover job is running.
    FailoverInProgress,
    /// Failed over, waiting for commit (the point can still be changed).
    FailedOver,
    /// The failed-over VM owns its disks; protect it again with reprotect.
    Committed,
    StoppedOnError,
}

impl ReplicationState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotEnabled => "not enabled",
            Self::WaitingForInitial => "waiting for initial replication",
            Self::InitialInProgress => "initial replication in progress",
            Self::Replicating => "replicating",
            Self::ResyncRequired => "resync required",
            Self::Resynchronising => "resynchronising",
            Self::Paused => "paused",
            Self::FailoverInProgress => "failover in progress",
            Self::FailedOver => "failed over (waiting for commit)",
            Self::Committed => "committed",
            Self::StoppedOnError => "stopped on error",
        }
    }

    /// Every state, in wire order.
    pub const ALL: [Self; 11] = [
        Self::NotEnabled,
        Self::WaitingForInitial,
        Self::InitialInProgress,
        Self::Replicating,
        Self::ResyncRequired,
        Self::Resynchronising,
        Self::Paused,
        Self::FailoverInProgress,
        Self::FailedOver,
        Self::Committed,
        Self::StoppedOnError,
    ];

    pub fn in_failover(self) -> bool {
        matches!(self, Self::FailoverInProgress | Self::FailedOver | Self::Committed)
    }
}

impl From<ReplicationState> for v1::ReplicationState {
    fn from(s: ReplicationState) -> Self {
        use ReplicationState as S;
        match s {
            S::NotEnabled => Self::NotEnabled,
            S::WaitingForInitial => Self::WaitingForInitial,
            S::InitialInProgress => Self::InitialInProgress,
            S::Replicating => Self::Replicating,
            S::ResyncRequired => Self::ResyncRequired,
            S::Resynchronising => Self::Resynchronising,
            S::Paused => Self::Paused,
            S::FailoverInProgress => Self::FailoverInProgress,
            S::FailedOver => Self::FailedOver,
            S::Committed => Self::Committed,
            S::StoppedOnError => Self::StoppedOnError,
        }
    }
}

impl TryFrom<i32> for ReplicationState {
    type Error = i32;
    /// The wire's value (the CLI prints the words); unspecified and unknown refused.
    fn try_from(v: i32) -> Result<Self, i32> {
        Self::ALL.iter().copied().find(|s| i32::from(v1::ReplicationState::from(*s)) == v).ok_or(v)
    }
}

/// The phase an agent's `ReplicationStatus` reports.
pub use siterecovery_proto::model::SenderState as AgentState;

/// What happens to a relationship.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The relationship was created (Enable protection).
    Enabled,
    /// A status from the primary agent. `error` is whether it carries an error.
    Agent { state: AgentState, error: bool, recoverable: bool },
    /// The operator asked for a resync.
    ResyncRequested,
    /// Protection was removed.
    Disabled,
    /// A test failover starts (the state stays; checked only).
    TestFailover,
    /// A planned or unplanned failover starts.
    FailoverStarted { planned: bool },
    /// The VM runs on the replica host; `committed` for a planned failover.
    FailoverDone { committed: bool },
    /// The failover job failed before the VM ran on the replica host.
    FailoverAborted,
    /// The operator chose another point before commit.
    PointChanged,
    /// The operator committed the failover.
    Committed,
    /// The replica host reports a VM it failed over on its own (provider down).
    LocalFailover { committed: bool },
    /// Reverse replication replaced this relationship by a reversed one.
    Reprotected,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not possible while replication is {from}")]
pub struct InvalidTransition {
    pub from: &'static str,
    pub event: &'static str,
}

impl ReplicationState {
    /// The transition function: the next state, or why the event does not apply.
    pub fn next(self, ev: Event) -> Result<Self, InvalidTransition> {
        use ReplicationState as S;
        let invalid = |event| Err(InvalidTransition { from: self.as_str(), event });
        match ev {
            Event::Disabled => Ok(S::NotEnabled),
            Event::Enabled => match self {
                S::NotEnabled => Ok(S::WaitingForInitial),
                _ => invalid("enable protection"),
            },
            Event::ResyncRequested => match self {
                S::Replicating | S::ResyncRequired | S::Paused | S::StoppedOnError => Ok(S::ResyncRequired),
                S::Resynchronising => Ok(S::Resynchronising),
                _ => invalid("resync"),
            },
            Event::TestFailover => match self {
                S::Replicating | S::Paused | S::ResyncRequired | S::Resynchronising | S::StoppedOnError => Ok(self),
                _ => invalid("a test failover"),
            },
            Event::FailoverStarted { planned: true } => match self {
                // Planned failover ships every remaining log: the chain must be whole.
                S::Replicating | S::Paused => Ok(S::FailoverInProgress),
                _ => invalid("a planned failover"),
            },
            Event::FailoverStarted { planned: false } => match self {
                S::Replicating | S::Paused | S::ResyncRequired | S::Resynchronising | S::StoppedOnError => {
                    Ok(S::FailoverInProgress)
                }
                _ => invalid("an unplanned failover"),
            },
            Event::FailoverDone { committed } => match self {
                S::FailoverInProgress => Ok(if committed { S::Committed } else { S::FailedOver }),
                _ => invalid("ending a failover"),
            },
            // Replication is held after a failed failover: statuses from the primary (when
            // it still replicates) move it on again.
            Event::FailoverAborted => match self {
                S::FailoverInProgress => Ok(S::Paused),
                _ => invalid("aborting a failover"),
            },
            Event::PointChanged => match self {
                S::FailedOver => Ok(S::FailedOver),
                _ => invalid("changing the recovery point"),
            },
            Event::Committed => match self {
                S::FailedOver => Ok(S::Committed),
                _ => invalid("commit"),
            },
            Event::LocalFailover { committed } => match self {
                S::NotEnabled | S::Committed => invalid("a local failover"),
                S::FailedOver if !committed => Ok(S::FailedOver),
                _ => Ok(if committed { S::Committed } else { S::FailedOver }),
            },
            Event::Reprotected => match self {
                S::FailedOver | S::Committed => Ok(S::NotEnabled),
                _ => invalid("reverse replication"),
            },
            Event::Agent { state, error, recoverable } => {
                if self == S::NotEnabled || self.in_failover() {
                    return invalid("a replication status");
                }
                // A non-recoverable error stops replication whatever phase it reports.
                if error && !recoverable {
                    return Ok(S::StoppedOnError);
                }
                Ok(match state {
                    AgentState::Waiting | AgentState::WaitingForImport => S::WaitingForInitial,
                    AgentState::Initial => S::InitialInProgress,
                    AgentState::Replicating => S::Replicating,
                    AgentState::ResyncRequired => S::ResyncRequired,
                    AgentState::Resynchronising => S::Resynchronising,
                    AgentState::Paused => S::Paused,
                    // Stopped without an unrecoverable error: held, not broken.
                    AgentState::Stopped => S::Paused,
                    // A recoverable error is retried in the phase it happened in.
                    AgentState::Error => self,
                })
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Relationships.

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
                samples: &self.samples,
                primary_connected,
                primary_host,
            },
            now,
        )
    }
}

struct Live {
    rec: RelationshipRecord,
    persisted: Instant,
}

/// Relationships in memory (the store holds them durably), jobs, and the VMs a job is
/// working on right now.
pub struct ProtectionCore {
    pub config: ProtectionConfig,
    pub jobs: Arc<Jobs>,
    rels: Mutex<HashMap<String, Live>>,
    /// Plan jobs waiting for `plan confirm`, by job id.
    pub(crate) confirms: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ProtectionCore {
    /// Loads the relationships and applies the job restart rule; returns the jobs that
    /// keep running (the caller resumes them with [`resume_jobs`]).
    pub fn load(store: &Store, config: ProtectionConfig) -> Result<(Self, Vec<JobRecord>), StoreError> {
        let rels = store
            .list::<RelationshipRecord>(RELATIONSHIPS)?
            .into_iter()
            .map(|r| (r.id.clone(), Live { rec: r, persisted: Instant::now() }))
            .collect();
        let resumed = jobs::recover(store)?;
        Ok((
            Self { config, jobs: Arc::new(Jobs::new()), rels: Mutex::new(rels), confirms: Mutex::new(HashMap::new()) },
            resumed,
        ))
    }

    pub fn get(&self, id: &str) -> Option<RelationshipRecord> {
        lock(&self.rels).get(id).map(|l| l.rec.clone())
    }

    pub fn of_vm(&self, vm: &str) -> Option<RelationshipRecord> {
        lock(&self.rels).values().find(|l| l.rec.vm == vm).map(|l| l.rec.clone())
    }

    pub fn all(&self) -> Vec<RelationshipRecord> {
        lock(&self.rels).values().map(|l| l.rec.clone()).collect()
    }

    /// Writes a relationship now (created, or changed by the provider itself).
    pub fn save(&self, store: &Store, rec: RelationshipRecord) -> Result<(), StoreError> {
        store.put(RELATIONSHIPS, &rec.id, &rec)?;
        lock(&self.rels).insert(rec.id.clone(), Live { rec, persisted: Instant::now() });
        self.jobs.notify();
        Ok(())
    }

    /// Changes a relationship in place (under the lock, so statuses arriving meanwhile
    /// are not lost) and persists it; `f` may refuse with an invalid transition.
    pub fn update(
        &self,
        store: &Store,
        id: &str,
        f: impl FnOnce(&mut RelationshipRecord) -> Result<(), InvalidTransition>,
    ) -> Result<RelationshipRecord, Status> {
        let rec = {
            let mut rels = lock(&self.rels);
            let live =
                rels.get_mut(id).ok_or_else(|| Status::not_found(format!("relationship {id} no longer exists")))?;
            let mut rec = live.rec.clone();
            f(&mut rec).map_err(|e| Status::failed_precondition(format!("VM {}: {e}", rec.vm)))?;
            store.put(RELATIONSHIPS, &rec.id, &rec).map_err(store_err)?;
            live.rec = rec.clone();
            live.persisted = Instant::now();
            rec
        };
        self.jobs.notify();
        Ok(rec)
    }

    pub fn remove(&self, store: &Store, id: &str) -> Result<(), StoreError> {
        store.delete(RELATIONSHIPS, id)?;
        lock(&self.rels).remove(id);
        self.jobs.notify();
        Ok(())
    }

    /// Applies a status from host `host_id`; only the relationship's primary may report.
    pub fn on_status(&self, store: &Store, host_id: &str, s: &v1::ReplicationStatus) {
        let now = now_ms();
        let to_persist = {
            let mut rels = lock(&self.rels);
            let Some(live) = rels.get_mut(&s.relationship_id) else {
                tracing::debug!(relationship = %s.relationship_id, vm = %s.vm, "status for an unknown relationship");
                return;
            };
            if live.rec.primary_host_id != host_id {
                if !same_host(&live.rec.primary_host_id, host_id) {
                    tracing::warn!(relationship = %s.relationship_id, host_id, "status from a host that is not the primary; ignored");
                    return;
                }
                // The primary re-registered (new id, same host): its statuses still
                // tell the truth about this relationship — typically that the replica
                // now refuses it, which must show as Critical until an operator acts.
                tracing::warn!(relationship = %s.relationship_id, host_id, old = %live.rec.primary_host_id,
                    "status from the re-registered primary host");
            }
            let old_point = live.rec.status.last_point_id.clone();
            let changed = match live.rec.apply_status(s, now) {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(relationship = %s.relationship_id, "status ignored: {e}");
                    return;
                }
            };
            if changed {
                tracing::info!(vm = %live.rec.vm, relationship = %live.rec.id, state = live.rec.state.as_str(), "replication state changed");
            }
            let due = changed
                || old_point != live.rec.status.last_point_id
                || live.persisted.elapsed() >= Duration::from_secs(1);
            if due {
                live.persisted = Instant::now();
                Some(live.rec.clone())
            } else {
                None
            }
        };
        if let Some(rec) = to_persist
            && let Err(e) = store.put(RELATIONSHIPS, &rec.id, &rec)
        {
            tracing::error!(relationship = %rec.id, "cannot record replication status: {e:#}");
        }
        self.jobs.notify();
    }

    /// Whether a job is working on `vm` right now.
    pub fn busy(&self, vm: &str) -> bool {
        self.jobs.busy(vm)
    }
}

/// Claims `vm` for a job.
pub(crate) fn claim(state: &Core, vm: &str) -> Result<Claim, Status> {
    state.protection.jobs.claim(vm).map_err(|e| Status::failed_precondition(e.to_string()))
}

/// The operator's view of a relationship (for `Vm.replication`).
pub fn replication_view(state: &Core, rec: &RelationshipRecord, hosts: &[HostRecord], now: i64) -> v1::Replication {
    let name = |id: &str| host_name(hosts, id);
    let primary = name(&rec.primary_host_id);
    let connected = state.agents.connected(&rec.primary_host_id);
    let (h, reasons) = rec.health(connected, &primary, now);
    let s = &rec.status;
    let lag = if s.last_point_unix_ms > 0 && !rec.state.in_failover() && rec.state != ReplicationState::NotEnabled {
        (now - s.last_point_unix_ms).max(0) as u64
    } else {
        0
    };
    v1::Replication {
        relationship_id: rec.id.clone(),
        primary_host: primary,
        replica_host: name(&rec.replica_host_id),
        policy: rec.policy.clone(),
        state: v1::ReplicationState::from(rec.state).into(),
        health: v1::Health::from(h).into(),
        health_reasons: reasons,
        last_point_unix_ms: s.last_point_unix_ms,
        last_point_id: s.last_point_id.clone(),
        rpo_lag_ms: lag,
        pending_log_bytes: s.pending_log_bytes,
        bytes_replicated: s.bytes_replicated,
        error: s.error.clone(),
        done_bytes: s.done_bytes,
        total_bytes: if s.total_bytes > 0 { s.total_bytes } else { rec.total_bytes },
        addresses: rec.addresses.iter().map(Reservation::to_proto).collect(),
        test_failover_vm: rec.test_failover.as_ref().map(|t| t.test_vm.clone()).unwrap_or_default(),
    }
}

/// `Vm.replication` for every protected VM, by VM name.
pub fn replication_views(state: &Core, hosts: &[HostRecord]) -> HashMap<String, v1::Replication> {
    let now = now_ms();
    state.protection.all().iter().map(|r| (r.vm.clone(), replication_view(state, r, hosts, now))).collect()
}

// ---------------------------------------------------------------------------------
// Errors.

fn policy_status(e: PolicyError) -> Status {
    let msg = e.to_string();
    match e {
        PolicyError::Exists(_) => Status::already_exists(msg),
        PolicyError::UnknownPolicy(_) => Status::not_found(msg),
        PolicyError::InUse { .. } => Status::failed_precondition(msg),
        _ => Status::invalid_argument(msg),
    }
}

fn network_status(e: NetworkError) -> Status {
    let msg = e.to_string();
    match e {
        NetworkError::Exists(_) => Status::already_exists(msg),
        NetworkError::UnknownNetwork(_) | NetworkError::UnknownSite(_) => Status::not_found(msg),
        NetworkError::SitesNotPaired { .. }
        | NetworkError::AlreadyMapped { .. }
        | NetworkError::PoolExhausted { .. } => Status::failed_precondition(msg),
        _ => Status::invalid_argument(msg),
    }
}

fn pairing_status(e: PairingError) -> Status {
    let msg = e.to_string();
    match e {
        PairingError::UnknownCloud(_) | PairingError::UnknownPolicy(_) => Status::not_found(msg),
        PairingError::Request(_) | PairingError::SameCloud(_) | PairingError::SameSite { .. } => {
            Status::invalid_argument(msg)
        }
        PairingError::AlreadyPaired { .. } => Status::failed_precondition(msg),
    }
}

pub(crate) fn store_err(e: StoreError) -> Status {
    tracing::error!("internal error: {e:#}");
    Status::internal(e.to_string())
}

// ---------------------------------------------------------------------------------
// The service.

pub struct ProtectionService {
    pub core: Arc<Core>,
    pub vault_id: VaultId,
}

/// Everything orchestration works with: the store, the relationships and jobs, the
/// agents, and the process's shutdown signal.
pub struct Core {
    pub store: Arc<Store>,
    pub protection: ProtectionCore,
    pub agents: Arc<dyn Agents>,
    pub shutdown: CancellationToken,
}

/// The status code of an agent's error, as the operator's RPC reports it.
pub(crate) fn agent_code(e: &AgentError) -> Code {
    match e.kind() {
        AgentErrorKind::Unavailable => Code::Unavailable,
        AgentErrorKind::Timeout => Code::DeadlineExceeded,
        AgentErrorKind::InvalidArgument => Code::InvalidArgument,
        AgentErrorKind::NotFound => Code::NotFound,
        AgentErrorKind::AlreadyExists => Code::AlreadyExists,
        AgentErrorKind::FailedPrecondition => Code::FailedPrecondition,
        AgentErrorKind::ResourceExhausted => Code::ResourceExhausted,
        AgentErrorKind::Internal => Code::Internal,
    }
}

/// What "Check prerequisites" found: everything the following steps need.
#[derive(Debug, Clone)]
struct Plan {
    vm: VmRecord,
    primary: HostRecord,
    replica: HostRecord,
    policy: PolicyRecord,
    total_bytes: u64,
    addresses: Vec<Reservation>,
}

pub(crate) fn hosts(state: &Core) -> Result<Vec<HostRecord>, Status> {
    state.store.list(HOSTS).map_err(store_err)
}

pub(crate) fn cloud_infos(hosts: &[HostRecord]) -> Vec<CloudInfo> {
    let mut out: Vec<CloudInfo> = Vec::new();
    for h in hosts {
        if !out.iter().any(|c| c.name == h.cloud) {
            out.push(CloudInfo { name: h.cloud.clone(), site: h.site.clone() });
        }
    }
    out
}

/// How many protected VMs have their primary in `cloud`.
fn protected_in_cloud(state: &Core, hosts: &[HostRecord], cloud: &str) -> usize {
    state
        .protection
        .all()
        .iter()
        .filter(|r| hosts.iter().any(|h| h.id.as_str() == r.primary_host_id && h.cloud == cloud))
        .count()
}

fn check_prerequisites(state: &Core, vm_name: &str) -> Result<(Plan, String), Status> {
    let vm = state
        .store
        .get::<VmRecord>(VMS, vm_name)
        .map_err(store_err)?
        .ok_or_else(|| Status::not_found(format!("no VM {vm_name:?} (see `vm list`)")))?;
    if let Some(r) = state.protection.of_vm(vm_name) {
        return Err(Status::already_exists(format!(
            "VM {vm_name:?} is already protected (relationship {}, {})",
            r.id,
            r.state.as_str()
        )));
    }
    let hosts = hosts(state)?;
    let primary =
        hosts.iter().find(|h| h.id == vm.host_id).cloned().ok_or_else(|| {
            Status::failed_precondition(format!("the host of VM {vm_name:?} is no longer registered"))
        })?;
    let pairing = state.store.get::<PairingRecord>(PAIRINGS, &primary.cloud).map_err(store_err)?.ok_or_else(|| {
        Status::failed_precondition(format!(
            "cloud {:?} of host {} is not paired: `cloud pair --source {} --target CLOUD --policy POLICY` first",
            primary.cloud, primary.name, primary.cloud
        ))
    })?;
    let policy = state.store.get::<PolicyRecord>(POLICIES, &pairing.policy).map_err(store_err)?.ok_or_else(|| {
        Status::failed_precondition(format!(
            "policy {:?} of the pairing of {:?} no longer exists",
            pairing.policy, primary.cloud
        ))
    })?;
    if !state.agents.connected(primary.id.as_str()) {
        return Err(Status::unavailable(format!("primary host {} is not connected", primary.name)));
    }
    let total_bytes: u64 = vm.disks.iter().map(|d| d.size_bytes).sum();
    let candidates: Vec<(HostRecord, u64)> = hosts
        .iter()
        .filter(|h| h.cloud == pairing.target_cloud)
        .filter(|h| state.agents.connected(h.id.as_str()))
        .map(|h| (h.clone(), state.agents.free_bytes(h.id.as_str())))
        .collect();
    let (replica, free) = candidates.into_iter().max_by_key(|(_, free)| *free).ok_or_else(|| {
        Status::unavailable(format!("no host of target cloud {:?} is connected", pairing.target_cloud))
    })?;
    if free < total_bytes {
        return Err(Status::failed_precondition(format!(
            "not enough space in target cloud {:?}: host {} (the emptiest connected one) has {} free, VM {vm_name} needs {}",
            pairing.target_cloud,
            replica.name,
            siterecovery_proto::model::units::human_size(free),
            siterecovery_proto::model::units::human_size(total_bytes)
        )));
    }
    let addresses = crate::failover::reserve_addresses(state, &vm, None)?;
    let mut detail = format!(
        "cloud {} paired with {} (policy {}); replica host {} has {} free for {}",
        primary.cloud,
        pairing.target_cloud,
        policy.name,
        replica.name,
        siterecovery_proto::model::units::human_size(free),
        siterecovery_proto::model::units::human_size(total_bytes)
    );
    for r in &addresses {
        detail.push_str(&format!("; {}", crate::failover::describe_reservation(r)));
    }
    Ok((Plan { vm, primary, replica, policy, total_bytes, addresses }, detail))
}

const FINALIZE_STEPS: [&str; 1] = ["Check recovery points"];
const DISABLE_STEPS: [&str; 3] =
    ["Stop replication on the replica host", "Stop replication on the primary host", "Delete replication relationship"];
const RESYNC_STEPS: [&str; 2] = ["Request resync", "Resynchronise"];

pub(crate) fn relationship_id() -> String {
    format!("r-{:08x}", rand::random::<u32>())
}

/// Saves a job, logging (not failing) on a store error: the job task goes on.
pub(crate) fn save_job(state: &Core, job: &JobRecord) {
    if let Err(e) = state.protection.jobs.save(&state.store, job) {
        tracing::error!(job = %job.id, "cannot record job: {e:#}");
    }
}

pub(crate) fn fail_job(state: &Core, job: &mut JobRecord, error: &str) {
    tracing::warn!(job = %job.id, kind = %job.kind, vm = %job.vm, "job failed: {error}");
    job.fail(error, now_ms());
    save_job(state, job);
}

/// Starts Enable protection for `vm`: prerequisites are checked before answering (a
/// failure is returned as the RPC's error and recorded as a failed job), the rest runs
/// in a task. `export_dir` (offline initial replication) is required when the policy's
/// initial method is `offline`, refused otherwise.
pub async fn start_protect(state: &Arc<Core>, vm: &str, export_dir: &str) -> Result<JobRecord, Status> {
    let claim = claim(state, vm)?;
    // An export directory is given for, and required by, an offline policy (checked below).
    let steps: &[EnableStep] = if export_dir.is_empty() { &EnableStep::ONLINE } else { &EnableStep::OFFLINE };
    let mut job =
        state.protection.jobs.create(&state.store, JobKind::EnableProtection, vm, steps).map_err(store_err)?;
    job.start_step(EnableStep::CheckPrerequisites, "", now_ms());
    let checked = check_prerequisites(state, vm).and_then(|(plan, detail)| {
        let offline = plan.policy.initial_method == policy::InitialMethod::Offline;
        if offline && export_dir.is_empty() {
            return Err(Status::invalid_argument(format!(
                "policy {} replicates the initial copy offline: give `--export-dir DIR` (an absolute directory on \
                 the primary host {} to export the initial copy to; then carry it to the replica host {} and run \
                 `protect-import {vm} --dir DIR`)",
                plan.policy.name, plan.primary.name, plan.replica.name
            )));
        }
        if !offline && !export_dir.is_empty() {
            return Err(Status::invalid_argument(format!(
                "--export-dir is for offline initial replication; policy {} copies the initial replica {}",
                plan.policy.name,
                match plan.policy.initial_method {
                    policy::InitialMethod::Network => "over the network".to_string(),
                    method => format!("by {method}"),
                }
            )));
        }
        if !export_dir.is_empty() && !export_dir.starts_with('/') {
            return Err(Status::invalid_argument(format!("export directory {export_dir:?} must be an absolute path")));
        }
        Ok((plan, detail))
    });
    match checked {
        Ok((plan, detail)) => {
            job.succeed_step(EnableStep::CheckPrerequisites, &detail, now_ms());
            save_job(state, &job);
            tokio::spawn(run_enable(state.clone(), job.clone(), plan, claim, export_dir.to_owned()));
            Ok(job)
        }
        Err(s) => {
            fail_job(state, &mut job, s.message());
            Err(Status::new(s.code(), format!("{} (job {})", s.message(), job.id)))
        }
    }
}

async fn run_enable(state: Arc<Core>, mut job: JobRecord, plan: Plan, claim: Claim, export_dir: String) {
    let cfg = state.protection.config.clone();
    let settings = policy::replication_settings(&plan.policy, cfg.test_intervals);
    // Create replication relationship.
    let step = EnableStep::CreateRelationship;
    job.start_step(step, &format!("replica host {}", plan.replica.name), now_ms());
    let mut rec = RelationshipRecord {
        id: relationship_id(),
        vm: plan.vm.name.to_string(),
        primary_host_id: plan.primary.id.to_string(),
        replica_host_id: plan.replica.id.to_string(),
        policy: plan.policy.name.to_string(),
        interval_ms: plan.policy.interval_ms,
        state: ReplicationState::NotEnabled,
        created_unix_ms: now_ms(),
        total_bytes: plan.total_bytes,
        status: StatusRecord::default(),
        replicating_since_unix_ms: 0,
        resyncs_completed: 0,
        rate_bytes_per_sec: 0,
        samples: vec![],
        addresses: plan.addresses.clone(),
        test_failover: None,
        failover: None,
        reversed_from: String::new(),
    };
    rec.state = ReplicationState::NotEnabled.next(Event::Enabled).unwrap_or(ReplicationState::WaitingForInitial);
    job.relationship_id = rec.id.clone();
    job.total_bytes = plan.total_bytes;
    if let Err(e) = state.protection.save(&state.store, rec.clone()) {
        return fail_job(&state, &mut job, &format!("cannot record the relationship: {e}"));
    }
    save_job(&state, &job);
    let prepare = Command::PrepareReplica(v1::PrepareReplica {
        adopt_vm_disks: false,
        relationship_id: rec.id.clone(),
        vm: plan.vm.name.to_string(),
        primary_host_id: plan.primary.id.to_string(),
        disks: plan.vm.disks.iter().map(|d| v1::DiskSize { id: d.id.to_string(), size_bytes: d.size_bytes }).collect(),
        settings: Some(settings),
    });
    if let Err(s) = state.agents.command(plan.replica.id.as_str(), prepare, cfg.command_timeout).await {
        let _ = state.protection.remove(&state.store, &rec.id);
        return fail_job(&state, &mut job, &format!("replica host {} refused: {}", plan.replica.name, s.message()));
    }
    job.succeed_step(
        step,
        &format!("relationship {}: {} → {}", rec.id, plan.primary.name, plan.replica.name),
        now_ms(),
    );
    save_job(&state, &job);

    if !export_dir.is_empty() {
        return run_export(state, job, plan, claim, rec, settings, export_dir).await;
    }

    // Start initial replication.
    let step = EnableStep::StartInitialReplication;
    job.start_step(step, "", now_ms());
    if let Some(at) = plan.policy.initial_at_unix_ms()
        && at > now_ms()
    {
        job.set_detail(step, &format!("scheduled by policy {}: {}", plan.policy.name, plan.policy.initial_method));
        save_job(&state, &job);
        let wait = Duration::from_millis((at - now_ms()).max(0) as u64);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
    let start = Command::StartReplication(v1::StartReplication {
        resync_initial: false,
        relationship_id: rec.id.clone(),
        vm: plan.vm.name.to_string(),
        replica_host_id: plan.replica.id.to_string(),
        replica_address: plan.replica.address.clone(),
        settings: Some(settings),
    });
    if let Err(s) = state.agents.command(plan.primary.id.as_str(), start, cfg.command_timeout).await {
        let stop = Command::StopReplication(v1::StopReplication {
            relationship_id: rec.id.clone(),
            vm: plan.vm.name.to_string(),
            remove_replica: true,
        });
        let _ = state.agents.command(plan.replica.id.as_str(), stop, cfg.command_timeout).await;
        let _ = state.protection.remove(&state.store, &rec.id);
        return fail_job(&state, &mut job, &format!("primary host {} refused: {}", plan.primary.name, s.message()));
    }
    job.succeed_step(step, &format!("{} replicating to {}", plan.primary.name, plan.replica.address), now_ms());
    job.start_step(EnableStep::InitialReplication, "", now_ms());
    save_job(&state, &job);
    drop(claim);
    wait_initial(state, job).await;
}

/// Offline initial replication: the primary exports the initial copy to `dir` and
/// starts replicating (its sender waits for the import); the job then waits until
/// `protect-import` imported the export on the replica host ([`start_import`]).
async fn run_export(
    state: Arc<Core>,
    mut job: JobRecord,
    plan: Plan,
    claim: Claim,
    rec: RelationshipRecord,
    settings: v1::ReplicationSettings,
    dir: String,
) {
    let cfg = state.protection.config.clone();
    let step = EnableStep::ExportInitialCopy;
    job.start_step(step, &format!("exporting to {dir} on {}", plan.primary.name), now_ms());
    save_job(&state, &job);
    let export = Command::ExportInitial(v1::ExportInitial {
        relationship_id: rec.id.clone(),
        vm: plan.vm.name.to_string(),
        replica_host_id: plan.replica.id.to_string(),
        replica_address: plan.replica.address.clone(),
        settings: Some(settings),
        dir: dir.clone(),
    });
    // The export reads every allocated byte: it may take far longer than a command.
    let timeout = cfg.step_timeout.max(cfg.command_timeout);
    let bytes = match state.agents.command(plan.primary.id.as_str(), export, timeout).await {
        Ok(r) => r.bytes,
        Err(s) => {
            for (host, remove) in [(&plan.primary.id, false), (&plan.replica.id, true)] {
                let stop = Command::StopReplication(v1::StopReplication {
                    relationship_id: rec.id.clone(),
                    vm: plan.vm.name.to_string(),
                    remove_replica: remove,
                });
                let _ = state.agents.command(host.as_str(), stop, cfg.command_timeout).await;
            }
            let _ = state.protection.remove(&state.store, &rec.id);
            return fail_job(
                &state,
                &mut job,
                &format!("primary host {} could not export to {dir}: {}", plan.primary.name, s.message()),
            );
        }
    };
    job.succeed_step(
        step,
        &format!(
            "{} of {} disk(s) exported to {dir} on {}",
            siterecovery_proto::model::units::human_size(bytes),
            plan.vm.disks.len(),
            plan.primary.name
        ),
        now_ms(),
    );
    job.start_step(
        EnableStep::WaitingForImport,
        &format!(
            "carry {dir} to the replica host {}, then run `provider protect-import {} --dir DIR`",
            plan.replica.name, plan.vm.name
        ),
        now_ms(),
    );
    save_job(&state, &job);
    drop(claim);
    wait_import(state, job).await;
}

/// Waits (without a time limit) until [`start_import`] moved the job on to "Initial
/// replication", then waits for that. Fails when the relationship goes away.
async fn wait_import(state: Arc<Core>, mut job: JobRecord) {
    let mut rx = state.protection.jobs.subscribe();
    loop {
        if state.protection.get(&job.relationship_id).is_none() {
            let why = format!("protection of VM {} was removed while the job ran", job.vm);
            return fail_job(&state, &mut job, &why);
        }
        // `start_import` writes the job; this task only reads it until then.
        if let Ok(Some(j)) = state.protection.jobs.get(&state.store, &job.id) {
            job = j;
        }
        if job.state != JobState::Running {
            return;
        }
        if job.running() != Some(Step::Enable(EnableStep::WaitingForImport)) {
            break;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            // The job stays running; the restart rule resumes it.
            _ = state.shutdown.cancelled() => return,
        }
    }
    wait_initial(state, job).await;
}

/// `protect-import`: imports the export in `dir` on the replica host of `vm`, whose
/// Enable protection job waits in "Waiting for import"; on success the job goes on to
/// "Initial replication". A failed import leaves the job waiting (fix and retry).
pub async fn start_import(state: &Arc<Core>, vm: &str, dir: &str) -> Result<JobRecord, Status> {
    if !dir.starts_with('/') {
        return Err(Status::invalid_argument(format!("import directory {dir:?} must be an absolute path")));
    }
    let rel = protected(state, vm)?;
    let _claim = claim(state, vm)?;
    let waiting = |j: &JobRecord| {
        j.kind == JobKind::EnableProtection
            && j.state == JobState::Running
            && j.relationship_id == rel.id
            && j.running() == Some(Step::Enable(EnableStep::WaitingForImport))
    };
    let find = || -> Result<JobRecord, Status> {
        state.store.list::<JobRecord>(crate::store::JOBS).map_err(store_err)?.into_iter().find(waiting).ok_or_else(
            || {
                Status::failed_precondition(format!(
                    "no Enable protection job of VM {vm} is waiting for an import (replication is {}; see `job list`)",
                    rel.state.as_str()
                ))
            },
        )
    };
    let job = find()?;
    let hosts = hosts(state)?;
    let replica = host_name(&hosts, &rel.replica_host_id);
    let cmd = Command::ImportInitial(v1::ImportInitial {
        relationship_id: rel.id.clone(),
        vm: vm.to_owned(),
        dir: dir.to_owned(),
    });
    let cfg = &state.protection.config;
    let timeout = cfg.step_timeout.max(cfg.command_timeout);
    let result = state.agents.command(&rel.replica_host_id, cmd, timeout).await;
    // Re-read: the job task may have failed it meanwhile.
    let mut job = state.protection.jobs.get(&state.store, &job.id).map_err(store_err)?.unwrap_or(job);
    if !waiting(&job) {
        return Err(Status::failed_precondition(format!("job {} is no longer waiting for an import", job.id)));
    }
    match result {
        Ok(r) => {
            job.succeed_step(
                EnableStep::WaitingForImport,
                &format!("{} imported from {dir} on {replica}", siterecovery_proto::model::units::human_size(r.bytes)),
                now_ms(),
            );
            job.start_step(EnableStep::InitialReplication, "shipping the writes made since the export", now_ms());
            save_job(state, &job);
            tracing::info!(job = %job.id, %vm, bytes = r.bytes, "initial copy imported");
            Ok(job)
        }
        Err(s) => {
            job.set_detail(
                EnableStep::WaitingForImport,
                &format!("import from {dir} on {replica} failed: {}; still waiting", s.message()),
            );
            save_job(state, &job);
            Err(Status::new(agent_code(&s), format!("replica host {replica}: {}", s.message())))
        }
    }
}

/// Resumes the jobs the restart rule kept running.
pub fn resume_jobs(state: &Arc<Core>, jobs: Vec<JobRecord>) {
    for job in jobs {
        tracing::info!(job = %job.id, vm = %job.vm, "resuming job after restart");
        if job.running() == Some(Step::Enable(EnableStep::WaitingForImport)) {
            tokio::spawn(wait_import(state.clone(), job));
        } else {
            tokio::spawn(wait_initial(state.clone(), job));
        }
    }
}

/// How a waiting step sees its relationship.
pub(crate) enum Wait {
    Done(String),
    Failed(String),
    Progress { detail: String },
}

/// Waits on the relationship of `job` until `judge` says done or failed, copying
/// progress into the job; fails on timeout or when the relationship goes away.
/// Returns true when the step succeeded.
pub(crate) async fn wait_step(
    state: &Arc<Core>,
    job: &mut JobRecord,
    step: &str,
    mut judge: impl FnMut(&RelationshipRecord, bool) -> Wait,
) -> bool {
    let mut rx = state.protection.jobs.subscribe();
    let started = job.steps.iter().find(|s| s.name == step).map(|s| s.started_unix_ms).unwrap_or_else(now_ms);
    let deadline = started + state.protection.config.step_timeout.as_millis() as i64;
    let mut last_save = Instant::now();
    loop {
        let Some(rel) = state.protection.get(&job.relationship_id) else {
            fail_job(state, job, &format!("protection of VM {} was removed while the job ran", job.vm));
            return false;
        };
        let primary_connected = state.agents.connected(&rel.primary_host_id);
        match judge(&rel, primary_connected) {
            Wait::Done(detail) => {
                job.done_bytes = job.total_bytes.max(rel.status.done_bytes);
                job.succeed_step(step, &detail, now_ms());
                save_job(state, job);
                return true;
            }
            Wait::Failed(e) => {
                fail_job(state, job, &e);
                return false;
            }
            Wait::Progress { detail } => {
                let s = &rel.status;
                let changed = job.done_bytes != s.done_bytes
                    || (s.total_bytes > 0 && job.total_bytes != s.total_bytes)
                    || job.steps.iter().any(|x| x.name == step && x.detail != detail);
                if changed && last_save.elapsed() >= Duration::from_millis(500) {
                    job.done_bytes = s.done_bytes;
                    if s.total_bytes > 0 {
                        job.total_bytes = s.total_bytes;
                    }
                    job.rate_bytes_per_sec = rel.rate_bytes_per_sec;
                    job.set_detail(step, &detail);
                    save_job(state, job);
                    last_save = Instant::now();
                }
            }
        }
        if now_ms() > deadline {
            let limit = crate::policy::human_duration(state.protection.config.step_timeout);
            fail_job(
                state,
                job,
                &format!(
                    "{step} did not finish within {limit} (replication is {}); see `vm show {}`",
                    rel.state.as_str(),
                    job.vm
                ),
            );
            return false;
        }
        tokio::select! {
            _ = rx.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            // The job stays running; the restart rule decides its fate.
            _ = state.shutdown.cancelled() => return false,
        }
    }
}

pub(crate) fn progress_detail(rel: &RelationshipRecord, connected: bool, what: &str) -> String {
    let s = &rel.status;
    let mut d = if s.total_bytes > 0 {
        format!(
            "{what} {} of {}",
            siterecovery_proto::model::units::human_size(s.done_bytes),
            siterecovery_proto::model::units::human_size(s.total_bytes)
        )
    } else {
        rel.state.as_str().to_string()
    };
    if !s.error.is_empty() && s.error_recoverable {
        d.push_str(&format!("; retrying after: {}", s.error));
    }
    if !connected {
        d.push_str("; primary host not connected, waiting");
    }
    d
}

async fn wait_initial(state: Arc<Core>, mut job: JobRecord) {
    let ok = wait_step(&state, &mut job, EnableStep::InitialReplication.name(), |rel, connected| match rel.state {
        ReplicationState::Replicating => Wait::Done(format!(
            "initial replication done; {} replicated",
            siterecovery_proto::model::units::human_size(rel.status.bytes_replicated)
        )),
        ReplicationState::StoppedOnError => Wait::Failed(if rel.status.error.is_empty() {
            "replication stopped on an error".into()
        } else {
            rel.status.error.clone()
        }),
        _ => Wait::Progress { detail: progress_detail(rel, connected, "copied") },
    })
    .await;
    if !ok {
        return;
    }
    job.succeed(now_ms());
    save_job(&state, &job);
    tracing::info!(job = %job.id, vm = %job.vm, "protection enabled");
    run_finalize(state, job.vm.clone(), job.relationship_id.clone()).await;
}

async fn run_finalize(state: Arc<Core>, vm: String, rel_id: String) {
    let mut job = match state.protection.jobs.create(&state.store, JobKind::FinalizeProtection, &vm, &FINALIZE_STEPS) {
        Ok(j) => j,
        Err(e) => return tracing::error!(vm, "cannot create the Finalize protection job: {e:#}"),
    };
    job.relationship_id = rel_id.clone();
    let step = FINALIZE_STEPS[0];
    job.start_step(step, "", now_ms());
    save_job(&state, &job);
    let cfg = state.protection.config.clone();
    let deadline = Instant::now() + cfg.step_timeout.min(Duration::from_secs(600));
    loop {
        let Some(rel) = state.protection.get(&rel_id) else {
            return fail_job(&state, &mut job, &format!("protection of VM {vm} was removed while the job ran"));
        };
        let r = state
            .agents
            .command(&rel.replica_host_id, Command::ListPoints(v1::ListPoints { vm: vm.clone() }), cfg.command_timeout)
            .await;
        match r {
            Ok(res) if !res.points.is_empty() => {
                let latest = res.points.iter().max_by_key(|p| p.created_unix_ms).cloned().unwrap_or_default();
                job.succeed_step(
                    step,
                    &format!("{} recovery point(s) on the replica; latest {}", res.points.len(), latest.id),
                    now_ms(),
                );
                job.succeed(now_ms());
                save_job(&state, &job);
                return;
            }
            Ok(_) => job.set_detail(step, "no recovery point yet; waiting for the first cycle"),
            Err(s) => job.set_detail(step, &format!("replica host: {}; retrying", s.message())),
        }
        save_job(&state, &job);
        if Instant::now() > deadline {
            let why = job.steps[0].detail.clone();
            return fail_job(&state, &mut job, &format!("no recovery point on the replica host in time ({why})"));
        }
        let wait = Duration::from_millis(rel.interval_ms.clamp(500, 10_000));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = state.shutdown.cancelled() => return,
        }
    }
}

pub(crate) fn host_name(hosts: &[HostRecord], id: &str) -> String {
    hosts.iter().find(|h| h.id.as_str() == id).map(|h| h.name.to_string()).unwrap_or_else(|| id.to_owned())
}

pub(crate) fn protected(state: &Core, vm: &str) -> Result<RelationshipRecord, Status> {
    state.protection.of_vm(vm).ok_or_else(|| {
        let exists = state.store.get::<VmRecord>(VMS, vm).ok().flatten().is_some();
        if exists {
            Status::failed_precondition(format!("VM {vm:?} is not protected (see `protect {vm}`)"))
        } else {
            Status::not_found(format!("no VM {vm:?} (see `vm list`)"))
        }
    })
}

pub async fn start_unprotect(state: &Arc<Core>, vm: &str) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    let claim = claim(state, vm)?;
    let mut job = state
        .protection
        .jobs
        .create(&state.store, JobKind::DisableProtection, vm, &DISABLE_STEPS)
        .map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    save_job(state, &job);
    let state = state.clone();
    let ret = job.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let hosts = hosts(&state).unwrap_or_default();
        let cfg = state.protection.config.clone();
        for (step, host_id, remove) in
            [(DISABLE_STEPS[0], &rel.replica_host_id, true), (DISABLE_STEPS[1], &rel.primary_host_id, false)]
        {
            let name = host_name(&hosts, host_id);
            job.start_step(step, &name, now_ms());
            save_job(&state, &job);
            let cmd = Command::StopReplication(v1::StopReplication {
                relationship_id: rel.id.clone(),
                vm: rel.vm.clone(),
                remove_replica: remove,
            });
            let detail = match state.agents.command(host_id, cmd, cfg.command_timeout).await {
                Ok(_) if remove => format!("{name}: replication stopped, replica removed"),
                Ok(_) => format!("{name}: replication stopped"),
                Err(s) if s.kind() == AgentErrorKind::Unavailable => {
                    format!(
                        "{name} is not connected: skipped ({}); it will hold its copy until told otherwise",
                        s.message()
                    )
                }
                Err(s) if s.kind() == AgentErrorKind::NotFound => format!("{name}: nothing to stop ({})", s.message()),
                Err(s) => format!("{name} failed to stop ({}); continued", s.message()),
            };
            job.succeed_step(step, &detail, now_ms());
            save_job(&state, &job);
        }
        let step = DISABLE_STEPS[2];
        job.start_step(step, &rel.id, now_ms());
        if let Err(e) = state.protection.remove(&state.store, &rel.id) {
            return fail_job(&state, &mut job, &format!("cannot delete relationship {}: {e}", rel.id));
        }
        job.succeed_step(step, &format!("relationship {} deleted", rel.id), now_ms());
        job.succeed(now_ms());
        save_job(&state, &job);
        tracing::info!(vm = %rel.vm, "protection disabled");
    });
    Ok(ret)
}

pub async fn start_resync(state: &Arc<Core>, vm: &str) -> Result<JobRecord, Status> {
    let rel = protected(state, vm)?;
    let requested = rel.state.next(Event::ResyncRequested).map_err(|e| Status::failed_precondition(e.to_string()))?;
    let primary = hosts(state)?
        .into_iter()
        .find(|h| h.id.as_str() == rel.primary_host_id)
        .ok_or_else(|| Status::failed_precondition("the primary host is no longer registered"))?;
    if !state.agents.connected(primary.id.as_str()) {
        return Err(Status::unavailable(format!("primary host {} is not connected", primary.name)));
    }
    let claim = claim(state, vm)?;
    let mut job = state.protection.jobs.create(&state.store, JobKind::Resync, vm, &RESYNC_STEPS).map_err(store_err)?;
    job.relationship_id = rel.id.clone();
    job.total_bytes = rel.total_bytes;
    job.start_step(RESYNC_STEPS[0], primary.name.as_str(), now_ms());
    save_job(state, &job);
    let baseline = rel.resyncs_completed;
    let previous = rel.state;
    let mut marked = rel.clone();
    marked.state = requested;
    if let Err(e) = state.protection.save(&state.store, marked) {
        fail_job(state, &mut job, &format!("cannot record the resync request: {e}"));
        return Err(store_err(e));
    }
    let cmd = Command::RequestResync(v1::RequestResync { relationship_id: rel.id.clone(), vm: vm.to_owned() });
    if let Err(s) = state.agents.command(primary.id.as_str(), cmd, state.protection.config.command_timeout).await {
        if let Some(mut cur) = state.protection.get(&rel.id)
            && cur.state == requested
            && requested != previous
        {
            cur.state = previous;
            let _ = state.protection.save(&state.store, cur);
        }
        fail_job(state, &mut job, &format!("primary host {}: {}", primary.name, s.message()));
        return Err(Status::new(agent_code(&s), format!("{} (job {})", s.message(), job.id)));
    }
    job.succeed_step(RESYNC_STEPS[0], &format!("{} accepted the resync request", primary.name), now_ms());
    job.start_step(RESYNC_STEPS[1], "", now_ms());
    save_job(state, &job);
    let ret = job.clone();
    let state = state.clone();
    tokio::spawn(async move {
        let _claim = claim;
        let ok = wait_step(&state, &mut job, RESYNC_STEPS[1], |rel, connected| {
            let s = &rel.status;
            let blocks = format!(
                "{} blocks compared, {} sent (4 KiB sub-blocks), {} on the wire",
                s.resync_blocks_compared,
                s.resync_blocks_sent,
                siterecovery_proto::model::units::human_size(s.resync_wire_bytes)
            );
            if rel.resyncs_completed > baseline && rel.state == ReplicationState::Replicating {
                return Wait::Done(format!("resync done: {blocks}"));
            }
            if rel.state == ReplicationState::StoppedOnError {
                return Wait::Failed(if s.error.is_empty() {
                    "replication stopped on an error".into()
                } else {
                    s.error.clone()
                });
            }
            Wait::Progress { detail: format!("{}; {blocks}", progress_detail(rel, connected, "compared")) }
        })
        .await;
        if ok {
            job.succeed(now_ms());
            save_job(&state, &job);
        }
    });
    Ok(ret)
}

type JobStream = Pin<Box<dyn Stream<Item = Result<v1::Job, Status>> + Send>>;

impl ProtectionService {
    fn auth<T>(&self, req: &Request<T>) -> Result<(), Status> {
        authorize(req, &self.vault_id, &[Role::Operator]).map(|_| ())
    }

    fn replica_of(&self, vm: &str) -> Result<(RelationshipRecord, String), Status> {
        let rel = protected(&self.core, vm)?;
        let hosts = hosts(&self.core)?;
        let name = host_name(&hosts, &rel.replica_host_id);
        Ok((rel, name))
    }

    async fn replica_command(&self, vm: &str, cmd: Command) -> Result<v1::CommandResult, Status> {
        let (rel, name) = self.replica_of(vm)?;
        self.core
            .agents
            .command(&rel.replica_host_id, cmd, self.core.protection.config.command_timeout)
            .await
            .map_err(|s| Status::new(agent_code(&s), format!("replica host {name}: {}", s.message())))
    }

    fn job(&self, id: &str) -> Result<JobRecord, Status> {
        self.core
            .protection
            .jobs
            .get(&self.core.store, id)
            .map_err(store_err)?
            .ok_or_else(|| Status::not_found(format!("no job {id:?} (see `job list`)")))
    }
}

#[tonic::async_trait]
impl Protection for ProtectionService {
    async fn failover(&self, req: Request<v1::FailoverRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::failover::StartFailover::try_from(req.get_ref())?;
        let job = crate::failover::start_failover(&self.core, r).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn commit_failover(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let vm = crate::failover::request::vm_of(req.get_ref())?;
        let job = crate::failover::start_commit(&self.core, &vm).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn cleanup_test_failover(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let vm = crate::failover::request::vm_of(req.get_ref())?;
        let job = crate::failover::start_cleanup(&self.core, &vm).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn change_point(&self, req: Request<v1::ChangePointRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = crate::failover::ChangePoint::try_from(req.get_ref())?;
        let job = crate::failover::start_change_point(&self.core, &r.vm, r.point)
            .await
            .map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn reprotect(&self, req: Request<v1::VmRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let vm = crate::failover::request::vm_of(req.get_ref())?;
        let job = crate::failover::start_reprotect(&self.core, &vm).await.map_err(|e| crate::error::status(&e))?;
        Ok(Response::new(job.to_proto()))
    }

    async fn create_network(&self, req: Request<v1::VmNetwork>) -> Result<Response<v1::VmNetwork>, Status> {
        self.auth(&req)?;
        let n = req.into_inner();
        let hosts = hosts(&self.core)?;
        let n = network::NetworkRequest::try_from(&n)?;
        let mut sites: Vec<SiteName> = hosts.iter().map(|h| h.site.clone()).collect();
        sites.sort();
        sites.dedup();
        let rec = NetworkStore::new(&self.core.store).add_network(store_err, |existing| {
            network::validate_network(&n, &sites, existing).map_err(network_status)
        })?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_networks(
        &self,
        req: Request<v1::ListNetworksRequest>,
    ) -> Result<Response<v1::ListNetworksResponse>, Status> {
        self.auth(&req)?;
        let nets = NetworkStore::new(&self.core.store).networks().map_err(store_err)?;
        Ok(Response::new(v1::ListNetworksResponse { networks: nets.iter().map(|n| n.to_proto()).collect() }))
    }

    async fn map_network(&self, req: Request<v1::NetworkMapping>) -> Result<Response<v1::NetworkMapping>, Status> {
        self.auth(&req)?;
        let m = network::MappingRequest::try_from(req.get_ref())?;
        let ns = NetworkStore::new(&self.core.store);
        let networks = ns.networks().map_err(store_err)?;
        let clouds = cloud_infos(&hosts(&self.core)?);
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        let rec = ns.add_mapping(store_err, |existing| {
            network::validate_mapping(&m, &networks, &clouds, &pairings, existing).map_err(network_status)
        })?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_network_mappings(
        &self,
        req: Request<v1::ListNetworkMappingsRequest>,
    ) -> Result<Response<v1::ListNetworkMappingsResponse>, Status> {
        self.auth(&req)?;
        let maps = NetworkStore::new(&self.core.store).mappings().map_err(store_err)?;
        Ok(Response::new(v1::ListNetworkMappingsResponse { mappings: maps.iter().map(|m| m.to_proto()).collect() }))
    }

    async fn create_plan(&self, req: Request<v1::RecoveryPlan>) -> Result<Response<v1::RecoveryPlan>, Status> {
        self.auth(&req)?;
        let rec = crate::plan::create(&self.core, &req.into_inner())?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_plans(&self, req: Request<v1::ListPlansRequest>) -> Result<Response<v1::ListPlansResponse>, Status> {
        self.auth(&req)?;
        let plans = crate::plan::list(&self.core.store).map_err(store_err)?;
        Ok(Response::new(v1::ListPlansResponse { plans: plans.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn plan_failover(&self, req: Request<v1::PlanFailoverRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let job = crate::plan::start_failover(&self.core, &r.plan, r.r#type).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn confirm_plan_action(
        &self,
        req: Request<v1::ConfirmPlanActionRequest>,
    ) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let job = crate::plan::confirm(&self.core, &req.into_inner().job_id)?;
        Ok(Response::new(job.to_proto()))
    }

    async fn create_policy(&self, req: Request<v1::Policy>) -> Result<Response<v1::Policy>, Status> {
        self.auth(&req)?;
        let p = policy::PolicyRequest::try_from(req.get_ref())?;
        let rec = policy::validate_policy(&p, self.core.protection.config.test_intervals).map_err(policy_status)?;
        if self.core.store.get::<PolicyRecord>(POLICIES, &rec.name).map_err(store_err)?.is_some() {
            return Err(policy_status(PolicyError::Exists(rec.name.to_string())));
        }
        self.core.store.put(POLICIES, &rec.name, &rec).map_err(store_err)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_policies(
        &self,
        req: Request<v1::ListPoliciesRequest>,
    ) -> Result<Response<v1::ListPoliciesResponse>, Status> {
        self.auth(&req)?;
        let policies = self.core.store.list::<PolicyRecord>(POLICIES).map_err(store_err)?;
        Ok(Response::new(v1::ListPoliciesResponse { policies: policies.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn delete_policy(
        &self,
        req: Request<v1::DeletePolicyRequest>,
    ) -> Result<Response<v1::DeletePolicyResponse>, Status> {
        self.auth(&req)?;
        let name: PolicyName = siterecovery_proto::model::wire::field("delete_policy.name", &req.get_ref().name)?;
        if self.core.store.get::<PolicyRecord>(POLICIES, &name).map_err(store_err)?.is_none() {
            return Err(policy_status(PolicyError::UnknownPolicy(name.to_string())));
        }
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        policy::check_policy_delete(&name, &pairings).map_err(policy_status)?;
        self.core.store.delete(POLICIES, &name).map_err(store_err)?;
        Ok(Response::new(v1::DeletePolicyResponse {}))
    }

    async fn pair_clouds(&self, req: Request<v1::CloudPairing>) -> Result<Response<v1::CloudPairing>, Status> {
        self.auth(&req)?;
        let r = policy::PairingRequest::try_from(req.get_ref())?;
        let hosts = hosts(&self.core)?;
        let policies = self.core.store.list::<PolicyRecord>(POLICIES).map_err(store_err)?;
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        let protected = protected_in_cloud(&self.core, &hosts, r.source_cloud.as_str());
        let rec = policy::validate_pairing(&r, &cloud_infos(&hosts), &policies, &pairings, protected)
            .map_err(pairing_status)?;
        self.core.store.put(PAIRINGS, &rec.source_cloud, &rec).map_err(store_err)?;
        Ok(Response::new(rec.to_proto()))
    }

    async fn list_pairings(
        &self,
        req: Request<v1::ListPairingsRequest>,
    ) -> Result<Response<v1::ListPairingsResponse>, Status> {
        self.auth(&req)?;
        let pairings = self.core.store.list::<PairingRecord>(PAIRINGS).map_err(store_err)?;
        Ok(Response::new(v1::ListPairingsResponse { pairings: pairings.iter().map(|p| p.to_proto()).collect() }))
    }

    async fn unpair_clouds(
        &self,
        req: Request<v1::UnpairCloudsRequest>,
    ) -> Result<Response<v1::UnpairCloudsResponse>, Status> {
        self.auth(&req)?;
        let source = req.into_inner().source_cloud;
        if self.core.store.get::<PairingRecord>(PAIRINGS, &source).map_err(store_err)?.is_none() {
            return Err(Status::not_found(format!("cloud {source:?} is not paired (see `cloud list`)")));
        }
        let hosts = hosts(&self.core)?;
        let n = protected_in_cloud(&self.core, &hosts, &source);
        if n > 0 {
            return Err(Status::failed_precondition(format!(
                "{n} VM(s) of cloud {source:?} are protected; unprotect them first"
            )));
        }
        self.core.store.delete(PAIRINGS, &source).map_err(store_err)?;
        Ok(Response::new(v1::UnpairCloudsResponse {}))
    }

    async fn protect(&self, req: Request<v1::ProtectRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let job = start_protect(&self.core, &r.vm, r.export_dir.trim()).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn import_initial(&self, req: Request<v1::ImportInitialRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let job = start_import(&self.core, &r.vm, r.dir.trim()).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn unprotect(&self, req: Request<v1::UnprotectRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let job = start_unprotect(&self.core, &req.into_inner().vm).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn resync(&self, req: Request<v1::ResyncRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        let job = start_resync(&self.core, &req.into_inner().vm).await?;
        Ok(Response::new(job.to_proto()))
    }

    async fn list_points(
        &self,
        req: Request<v1::ListPointsRequest>,
    ) -> Result<Response<v1::ListPointsResponse>, Status> {
        self.auth(&req)?;
        let vm = req.into_inner().vm;
        let res = self.replica_command(&vm, Command::ListPoints(v1::ListPoints { vm: vm.clone() })).await?;
        let mut points = res.points;
        points.sort_by_key(|p| (p.created_unix_ms, p.seq));
        Ok(Response::new(v1::ListPointsResponse { points }))
    }

    async fn export_point(
        &self,
        req: Request<v1::ExportPointRequest>,
    ) -> Result<Response<v1::ExportPointResponse>, Status> {
        self.auth(&req)?;
        let r = req.into_inner();
        let point = if r.point.is_empty() { "latest".to_string() } else { r.point };
        let res = self
            .replica_command(&r.vm, Command::ExportPoint(v1::ExportPoint { vm: r.vm.clone(), point: point.clone() }))
            .await?;
        if res.uri.is_empty() {
            return Err(Status::internal("the replica host returned no export URI"));
        }
        let point_id = res.points.first().map(|p| p.id.clone()).unwrap_or(point);
        Ok(Response::new(v1::ExportPointResponse { uri: res.uri, point_id }))
    }

    async fn unexport_point(
        &self,
        req: Request<v1::UnexportPointRequest>,
    ) -> Result<Response<v1::UnexportPointResponse>, Status> {
        self.auth(&req)?;
        let vm = req.into_inner().vm;
        self.replica_command(&vm, Command::UnexportPoint(v1::UnexportPoint { vm: vm.clone() })).await?;
        Ok(Response::new(v1::UnexportPointResponse {}))
    }

    async fn list_jobs(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        self.auth(&req)?;
        let jobs = self.core.store.list::<JobRecord>(crate::store::JOBS).map_err(store_err)?;
        Ok(Response::new(v1::ListJobsResponse { jobs: jobs.iter().map(|j| j.to_proto()).collect() }))
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::Job>, Status> {
        self.auth(&req)?;
        Ok(Response::new(self.job(&req.into_inner().id)?.to_proto()))
    }

    type WatchJobStream = JobStream;

    async fn watch_job(&self, req: Request<v1::GetJobRequest>) -> Result<Response<JobStream>, Status> {
        self.auth(&req)?;
        let id = req.into_inner().id;
        let first = self.job(&id)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let state = self.core.clone();
        tokio::spawn(async move {
            let mut changes = state.protection.jobs.subscribe();
            let mut last: Option<JobRecord> = None;
            let mut cur = first;
            loop {
                if last.as_ref() != Some(&cur) {
                    if tx.send(Ok(cur.to_proto())).await.is_err() {
                        return;
                    }
                    if cur.state != JobState::Running {
                        return;
                    }
                    last = Some(cur.clone());
                }
                tokio::select! {
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = tx.closed() => return,
                    _ = state.shutdown.cancelled() => return,
                }
                match state.protection.jobs.get(&state.store, &id) {
                    Ok(Some(j)) => cur = j,
                    Ok(None) => {
                        let _ = tx.send(Err(Status::not_found(format!("job {id} was deleted")))).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(store_err(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicationState as S;

    fn agent(state: AgentState) -> Event {
        Event::Agent { state, error: false, recoverable: false }
    }

    #[test]
    fn enable_then_initial_then_replicating() {
        let s = S::NotEnabled.next(Event::Enabled).expect("enable");
        assert_eq!(s, S::WaitingForInitial);
        let s = s.next(agent(AgentState::Initial)).expect("initial");
        assert_eq!(s, S::InitialInProgress);
        let s = s.next(agent(AgentState::Replicating)).expect("replicating");
        assert_eq!(s, S::Replicating);
        assert!(s.next(Event::Enabled).is_err(), "cannot enable twice");
        assert_eq!(s.next(Event::Disabled), Ok(S::NotEnabled));
    }

    #[test]
    fn errors_recoverable_keep_the_phase_unrecoverable_stop() {
        let rec = Event::Agent { state: AgentState::Error, error: true, recoverable: true };
        assert_eq!(S::InitialInProgress.next(rec), Ok(S::InitialInProgress));
        assert_eq!(S::Replicating.next(rec), Ok(S::Replicating));
        let fatal = Event::Agent { state: AgentState::Error, error: true, recoverable: false };
        assert_eq!(S::Replicating.next(fatal), Ok(S::StoppedOnError));
        let fatal_stopped = Event::Agent { state: AgentState::Stopped, error: true, recoverable: false };
        assert_eq!(S::InitialInProgress.next(fatal_stopped), Ok(S::StoppedOnError));
        assert_eq!(S::Replicating.next(agent(AgentState::Stopped)), Ok(S::Paused));
        // An operator resync is the way out of a broken chain.
        assert_eq!(S::StoppedOnError.next(Event::ResyncRequested), Ok(S::ResyncRequired));
    }

    #[test]
    fn resync_cycle() {
        assert!(S::WaitingForInitial.next(Event::ResyncRequested).is_err());
        assert!(S::InitialInProgress.next(Event::ResyncRequested).is_err());
        let s = S::Replicating.next(Event::ResyncRequested).expect("resync");
        assert_eq!(s, S::ResyncRequired);
        let s = s.next(agent(AgentState::Resynchronising)).expect("resynchronising");
        assert_eq!(s, S::Resynchronising);
        assert_eq!(s.next(Event::ResyncRequested), Ok(S::Resynchronising));
        assert_eq!(s.next(agent(AgentState::Replicating)), Ok(S::Replicating));
        assert_eq!(S::Replicating.next(agent(AgentState::ResyncRequired)), Ok(S::ResyncRequired));
        assert_eq!(S::Replicating.next(agent(AgentState::Paused)), Ok(S::Paused));
        assert_eq!(S::Paused.next(agent(AgentState::Replicating)), Ok(S::Replicating));
    }

    #[test]
    fn failover_states_and_not_enabled_ignore_statuses() {
        for s in [S::NotEnabled, S::FailoverInProgress, S::FailedOver, S::Committed] {
            assert!(s.next(agent(AgentState::Replicating)).is_err(), "{s:?}");
        }
        assert!(S::FailedOver.next(Event::ResyncRequested).is_err());
    }

    #[test]
    fn failover_lifecycle_transitions() {
        let planned = Event::FailoverStarted { planned: true };
        let unplanned = Event::FailoverStarted { planned: false };
        // Planned: only with a whole chain.
        assert_eq!(S::Replicating.next(planned), Ok(S::FailoverInProgress));
        assert_eq!(S::Paused.next(planned), Ok(S::FailoverInProgress));
        assert!(S::ResyncRequired.next(planned).is_err());
        assert!(S::InitialInProgress.next(planned).is_err());
        // Unplanned: from any state with a recovery point.
        for s in [S::Replicating, S::Paused, S::ResyncRequired, S::Resynchronising, S::StoppedOnError] {
            assert_eq!(s.next(unplanned), Ok(S::FailoverInProgress), "{s:?}");
            assert_eq!(s.next(Event::TestFailover), Ok(s), "{s:?}");
        }
        for s in [
            S::NotEnabled,
            S::WaitingForInitial,
            S::InitialInProgress,
            S::FailoverInProgress,
            S::FailedOver,
            S::Committed,
        ] {
            assert!(s.next(unplanned).is_err(), "{s:?}");
            assert!(s.next(Event::TestFailover).is_err(), "{s:?}");
        }
        let p = S::FailoverInProgress;
        assert_eq!(p.next(Event::FailoverDone { committed: true }), Ok(S::Committed));
        assert_eq!(p.next(Event::FailoverDone { committed: false }), Ok(S::FailedOver));
        assert_eq!(p.next(Event::FailoverAborted), Ok(S::Paused));
        assert!(p.next(Event::Committed).is_err(), "commit while the failover runs");
        // Before commit: change the point, then commit; after: no more changes.
        assert_eq!(S::FailedOver.next(Event::PointChanged), Ok(S::FailedOver));
        assert_eq!(S::FailedOver.next(Event::Committed), Ok(S::Committed));
        assert!(S::Committed.next(Event::PointChanged).is_err());
        assert!(S::Committed.next(Event::Committed).is_err());
        // Commit without a failover.
        assert!(S::Replicating.next(Event::Committed).is_err());
        assert!(S::Replicating.next(Event::PointChanged).is_err());
        // Reprotect ends the failed-over relationship only.
        assert_eq!(S::Committed.next(Event::Reprotected), Ok(S::NotEnabled));
        assert_eq!(S::FailedOver.next(Event::Reprotected), Ok(S::NotEnabled));
        assert!(S::Replicating.next(Event::Reprotected).is_err());
        assert!(S::FailoverInProgress.next(Event::Reprotected).is_err());
        // Local failover seen in an inventory.
        assert_eq!(S::Replicating.next(Event::LocalFailover { committed: false }), Ok(S::FailedOver));
        assert_eq!(S::FailoverInProgress.next(Event::LocalFailover { committed: true }), Ok(S::Committed));
        assert_eq!(S::FailedOver.next(Event::LocalFailover { committed: true }), Ok(S::Committed));
        assert!(S::Committed.next(Event::LocalFailover { committed: true }).is_err());
        assert!(S::NotEnabled.next(Event::LocalFailover { committed: false }).is_err());
        let e = S::Replicating.next(Event::Committed).expect_err("commit");
        assert_eq!(e.to_string(), "commit is not possible while replication is replicating");
    }

    #[test]
    fn agent_state_strings() {
        for (s, want) in [
            ("waiting", AgentState::Waiting),
            ("initial", AgentState::Initial),
            ("replicating", AgentState::Replicating),
            ("resync-required", AgentState::ResyncRequired),
            ("resynchronising", AgentState::Resynchronising),
            ("paused", AgentState::Paused),
            ("stopped", AgentState::Stopped),
            ("error", AgentState::Error),
        ] {
            assert_eq!(AgentState::from_word(s), Some(want));
            assert_eq!(AgentState::try_from(i32::from(want)), Ok(want));
        }
        assert_eq!(AgentState::from_word("bogus"), None);
    }

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
mod same_host_tests {
    use super::same_host;

    #[test]
    fn same_name_different_suffix() {
        assert!(same_host("hv-a-0a1b2c", "hv-a-ffffff"));
        assert!(!same_host("hv-a-0a1b2c", "hv-b-0a1b2c"));
        assert!(!same_host("hv-a-0a1b2c", "hv-a"));
        assert!(!same_host("0123456789abcdef", "0123456789abcdee"));
    }
}
