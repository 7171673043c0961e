//! [`ProtectionCore`]: the set of relationships, held in memory and written through to
//! the store (table `relationships`), with the job engine they share; and
//! [`ProtectionConfig`], protection's runtime settings.
//!
//! How statuses drive jobs: the primary agent sends a `ReplicationStatus` on every phase
//! change and after every cycle. [`ProtectionCore::on_status`] applies it to the
//! relationship through [`super::ReplicationState::next`] (a pure transition function),
//! keeps the latest status in memory and bumps the change counter of [`Jobs`]. Job
//! tasks waiting on a relationship wake on that counter and re-read it
//! ([`super::wait`]).
//!
//! The store is written by the clock, not by the number of statuses, so a host flooding
//! statuses cannot force a write per message: a state change or a new point is written
//! at most every [`STATUS_MIN_GAP`] (a change within the gap by the next status after
//! it), an unchanged but refreshed status at most every [`STATUS_REFRESH`]. Readers
//! see the in-memory record, which is always current.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use siterecovery_proto::v1;
use tonic::Status;

use super::record::{RelationshipRecord, same_host};
use super::state::InvalidTransition;
use crate::error::store_err;
use crate::jobs::{self, JobRecord, Jobs, now_ms};
use crate::store::{RELATIONSHIPS, Store, StoreError};

/// Runtime settings of protection.
#[derive(Debug, Clone)]
pub struct ProtectionConfig {
    /// `serve --test-intervals`: any interval from 1 s, retry unit of a second.
    pub test_intervals: bool,
    /// Overall limit of a waiting step (initial replication, resync, finalize).
    pub step_timeout: Duration,
    /// Limit of one command to an agent.
    pub command_timeout: Duration,
    /// `serve --scripts-dir`: the only place recovery plans run scripts from.
    pub scripts_dir: std::path::PathBuf,
}

/// Where recovery-plan scripts live unless `serve --scripts-dir` says otherwise.
pub const DEFAULT_SCRIPTS_DIR: &str = "/etc/siterecovery/scripts";

impl Default for ProtectionConfig {
    fn default() -> Self {
        Self {
            test_intervals: false,
            step_timeout: Duration::from_secs(48 * 3600),
            command_timeout: Duration::from_secs(120),
            scripts_dir: DEFAULT_SCRIPTS_DIR.into(),
        }
    }
}

impl ProtectionConfig {
    pub fn for_tests() -> Self {
        Self {
            test_intervals: true,
            step_timeout: Duration::from_secs(15 * 60),
            command_timeout: Duration::from_secs(60),
            scripts_dir: DEFAULT_SCRIPTS_DIR.into(),
        }
    }
}

/// Between two writes of a relationship whose status changed state or point.
pub const STATUS_MIN_GAP: Duration = Duration::from_millis(250);
/// Between two writes of a relationship whose status only refreshed its counters.
pub const STATUS_REFRESH: Duration = Duration::from_secs(10);

struct Live {
    rec: RelationshipRecord,
    persisted: Instant,
    /// A change not written yet.
    dirty: bool,
}

impl Live {
    fn new(rec: RelationshipRecord) -> Self {
        Self { rec, persisted: Instant::now(), dirty: false }
    }
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
    /// keep running (the caller resumes them).
    pub fn load(store: &Store, config: ProtectionConfig) -> Result<(Self, Vec<JobRecord>), StoreError> {
        let rels = store
            .list::<RelationshipRecord>(RELATIONSHIPS)?
            .into_iter()
            .map(|r| (r.id.clone(), Live::new(r)))
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
        lock(&self.rels).insert(rec.id.clone(), Live::new(rec));
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
            live.dirty = false;
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
            live.dirty |= changed || old_point != live.rec.status.last_point_id;
            let since = live.persisted.elapsed();
            let due = (live.dirty && since >= STATUS_MIN_GAP) || since >= STATUS_REFRESH;
            if due {
                live.persisted = Instant::now();
                live.dirty = false;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relationship::{AgentState, ReplicationState, StatusRecord};

    fn rel() -> RelationshipRecord {
        RelationshipRecord {
            id: "r-1".into(),
            vm: "vm1".into(),
            primary_host_id: "h1".into(),
            replica_host_id: "h2".into(),
            policy: "gold".into(),
            interval_ms: 1000,
            state: ReplicationState::Replicating,
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

    /// A primary sending a status with a new point every message: the store is written
    /// by the clock, the memory holds the newest.
    #[test]
    fn a_status_flood_is_written_by_the_clock() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("store");
        let (core, _) = ProtectionCore::load(&store, ProtectionConfig::for_tests()).expect("load");
        core.save(&store, rel()).expect("save");
        let before = store.writes();
        let started = Instant::now();
        // As many statuses as fit in 600 ms (at most a million).
        let mut n = 0;
        while started.elapsed() < Duration::from_millis(600) && n < 1_000_000 {
            let i = n;
            n += 1;
            let s = v1::ReplicationStatus {
                relationship_id: "r-1".into(),
                vm: "vm1".into(),
                state: i32::from(AgentState::Replicating),
                last_point: Some(v1::RecoveryPoint { id: format!("p{i}"), ..Default::default() }),
                ..Default::default()
            };
            core.on_status(&store, "h1", &s);
        }
        let writes = store.writes() - before;
        let bound = 1 + started.elapsed().as_millis() / STATUS_MIN_GAP.as_millis();
        assert!(writes as u128 <= bound, "{writes} writes for {n} statuses (bound {bound})");
        assert!(writes >= 1, "a changed status is written by the clock");
        assert_eq!(core.get("r-1").map(|r| r.status.last_point_id), Some(format!("p{}", n - 1)));
        // A status from a host that is not the primary writes nothing.
        let before = store.writes();
        let s = v1::ReplicationStatus { relationship_id: "r-1".into(), ..Default::default() };
        core.on_status(&store, "h9", &s);
        assert_eq!(store.writes(), before);
    }
}
