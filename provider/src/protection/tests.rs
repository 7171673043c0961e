//! Enable protection, unprotect and resync against fake agents: the commands each sends,
//! in order, the steps it records, every refusal of Enable protection, and what a
//! provider restart does to a running Enable protection job.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use siterecovery_proto::model::{SenderState, VmName};
use siterecovery_proto::v1;

use super::*;
use crate::agents::fake::FakeAgents;
use crate::error::{Classify, ErrorClass};
use crate::jobs::{EnableStep, JobKind, JobState, Jobs, RESTARTED, StepState};
use crate::policy::PairingRecord;
use crate::relationship::{Core, RelationshipRecord, ReplicationState, claim_vm};
use crate::store::{PAIRINGS, Store};

use crate::testkit::{self, PRIMARY, REPLICA};

struct Env {
    core: Arc<Core>,
    agents: Arc<FakeAgents>,
    resumed: Vec<JobRecord>,
    _dir: tempfile::TempDir,
}

/// Two hosts in paired clouds, VM `vm1` on the primary, policy `gold`; `before` writes
/// to the store before the provider "starts" (loads relationships and jobs).
fn env_with(before: impl FnOnce(&Store)) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    testkit::seed(&store);
    testkit::put_vm(&store, "vm1", true);
    let pairing: PairingRecord =
        serde_json::from_value(json!({"source_cloud": "east", "target_cloud": "west", "policy": "gold"}))
            .expect("pairing");
    store.put(PAIRINGS, "east", &pairing).expect("put pairing");
    before(&store);
    let (core, agents, resumed) = testkit::start(store);
    Env { core, agents, resumed, _dir: dir }
}

fn env() -> Env {
    env_with(|_| {})
}

fn vm1() -> VmName {
    VmName::new("vm1").expect("name")
}

fn relationship(state: ReplicationState) -> RelationshipRecord {
    serde_json::from_value(json!({
        "id": "r-0000abcd", "vm": "vm1", "primary_host_id": PRIMARY, "replica_host_id": REPLICA, "policy": "gold",
        "interval_ms": 1000, "state": state, "created_unix_ms": 1, "total_bytes": 1048576,
    }))
    .expect("relationship")
}

/// The primary reports `state` for the relationship of `vm1`.
fn report(core: &Core, state: SenderState) {
    let rel = core.protection.of_vm("vm1").expect("relationship");
    let s = v1::ReplicationStatus {
        relationship_id: rel.id,
        vm: "vm1".into(),
        state: i32::from(state),
        total_bytes: 1 << 20,
        done_bytes: 1 << 20,
        ..Default::default()
    };
    core.protection.on_status(&core.store, PRIMARY, &s);
}

/// Polls (bounded) until job `id` satisfies `f`.
async fn until(core: &Core, id: &str, what: &str, f: impl Fn(&JobRecord) -> bool) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = core.protection.jobs.find(&core.store, id).expect("job");
        if f(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id}: {what}: {j:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn ended(core: &Core, id: &str) -> JobRecord {
    until(core, id, "did not end", |j| j.state != JobState::Running).await
}

fn step_states(j: &JobRecord) -> Vec<(String, StepState)> {
    j.steps.iter().map(|s| (s.name.clone(), s.state)).collect()
}

fn jobs_of(core: &Core, kind: JobKind) -> Vec<JobRecord> {
    list_jobs(core).expect("jobs").into_iter().filter(|j| j.kind == kind).collect()
}

#[tokio::test]
async fn enable_prepares_the_replica_then_starts_replication_then_finalizes() {
    let e = env();
    e.agents.reply(REPLICA, "ListPoints", |_| {
        Ok(v1::CommandResult {
            ok: true,
            points: vec![v1::RecoveryPoint { id: "p1".into(), ..Default::default() }],
            ..Default::default()
        })
    });
    let job = start_protect(&e.core, &vm1(), "").await.expect("protect");
    assert_eq!(job.kind, JobKind::EnableProtection);
    assert_eq!(job.steps[0].state, StepState::Succeeded, "prerequisites checked before answering");
    let j = until(&e.core, &job.id, "initial replication", |j| {
        j.running() == Some(Step::Enable(EnableStep::InitialReplication))
    })
    .await;
    assert_eq!(e.agents.log(), [format!("{REPLICA}:PrepareReplica"), format!("{PRIMARY}:StartReplication")]);
    let rel = e.core.protection.of_vm("vm1").expect("relationship");
    assert_eq!(rel.state, ReplicationState::WaitingForInitial);
    assert_eq!(j.relationship_id, rel.id);
    report(&e.core, SenderState::Initial);
    report(&e.core, SenderState::Replicating);
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert!(j.steps.iter().all(|s| s.state == StepState::Succeeded), "{:?}", step_states(&j));
    let names: Vec<String> = j.steps.iter().map(|s| s.name.clone()).collect();
    let want: Vec<String> = EnableStep::ONLINE.iter().map(|s| s.name().to_string()).collect();
    assert_eq!(names, want);
    let fin = loop {
        if let Some(f) = jobs_of(&e.core, JobKind::FinalizeProtection).pop() {
            break f;
        }
        tokio::task::yield_now().await;
    };
    let fin = ended(&e.core, &fin.id).await;
    assert_eq!(fin.state, JobState::Succeeded, "{fin:?}");
    assert!(e.agents.log().contains(&format!("{REPLICA}:ListPoints")));
}

#[tokio::test]
async fn enable_refuses_an_unknown_vm() {
    let e = env();
    let err = start_protect(&e.core, &VmName::new("nope").expect("name"), "").await.expect_err("unknown");
    assert_eq!(err.class(), ErrorClass::NotFound, "{err}");
    assert!(err.to_string().starts_with("no VM \"nope\""), "{err}");
    assert!(e.agents.log().is_empty());
}

#[tokio::test]
async fn enable_refuses_an_unpaired_cloud_and_records_the_failed_job() {
    let e = env();
    e.core.store.delete(PAIRINGS, "east").expect("unpair");
    let err = start_protect(&e.core, &vm1(), "").await.expect_err("unpaired");
    assert_eq!(err.class(), ErrorClass::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("is not paired"), "{err}");
    let jobs = jobs_of(&e.core, JobKind::EnableProtection);
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].state, JobState::Failed);
    assert!(err.to_string().ends_with(&format!("(job {})", jobs[0].id)), "{err}");
    assert!(e.core.protection.of_vm("vm1").is_none());
    assert!(e.agents.log().is_empty());
}

#[tokio::test]
async fn enable_refuses_a_busy_vm() {
    let e = env();
    let _held = claim_vm(&e.core, "vm1").expect("claim");
    let err = start_protect(&e.core, &vm1(), "").await.expect_err("busy");
    assert_eq!(err.class(), ErrorClass::FailedPrecondition, "{err}");
    assert!(err.to_string().contains("another protection job"), "{err}");
    assert!(jobs_of(&e.core, JobKind::EnableProtection).is_empty(), "no job while refused as busy");
}

#[tokio::test]
async fn enable_refuses_when_the_primary_is_not_connected() {
    let e = env();
    e.agents.disconnect(PRIMARY);
    let err = start_protect(&e.core, &vm1(), "").await.expect_err("not connected");
    assert_eq!(err.class(), ErrorClass::Unavailable, "{err}");
    assert!(err.to_string().contains("primary host hv-a is not connected"), "{err}");
    assert!(e.agents.log().is_empty());
    assert!(e.core.protection.of_vm("vm1").is_none());
}

#[tokio::test]
async fn enable_refuses_a_protected_vm() {
    let e = env();
    e.core.protection.save(&e.core.store, relationship(ReplicationState::Replicating)).expect("save");
    let err = start_protect(&e.core, &vm1(), "").await.expect_err("protected");
    assert_eq!(err.class(), ErrorClass::AlreadyExists, "{err}");
}

#[tokio::test]
async fn unprotect_stops_the_replica_then_the_primary_then_deletes() {
    let e = env();
    e.core.protection.save(&e.core.store, relationship(ReplicationState::Replicating)).expect("save");
    let job = start_unprotect(&e.core, &vm1()).await.expect("unprotect");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(e.agents.log(), [format!("{REPLICA}:StopReplication"), format!("{PRIMARY}:StopReplication")]);
    let names: Vec<&str> = j.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "Stop replication on the replica host",
            "Stop replication on the primary host",
            "Delete replication relationship"
        ]
    );
    assert!(e.core.protection.of_vm("vm1").is_none());
    let err = start_unprotect(&e.core, &vm1()).await.expect_err("no longer protected");
    assert_eq!(err.class(), ErrorClass::FailedPrecondition, "{err}");
}

#[tokio::test]
async fn unprotect_skips_a_host_that_is_not_connected() {
    let e = env();
    e.core.protection.save(&e.core.store, relationship(ReplicationState::Replicating)).expect("save");
    e.agents.disconnect(REPLICA);
    let job = start_unprotect(&e.core, &vm1()).await.expect("unprotect");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert!(j.steps[0].detail.contains("is not connected: skipped"), "{}", j.steps[0].detail);
    assert!(e.core.protection.of_vm("vm1").is_none());
}

#[tokio::test]
async fn resync_requests_then_waits_for_a_completed_resync() {
    let e = env();
    e.core.protection.save(&e.core.store, relationship(ReplicationState::Replicating)).expect("save");
    let job = start_resync(&e.core, &vm1()).await.expect("resync");
    assert_eq!(e.agents.log(), [format!("{PRIMARY}:RequestResync")]);
    assert_eq!(e.core.protection.of_vm("vm1").expect("rel").state, ReplicationState::ResyncRequired);
    assert_eq!(job.running(), Some(Step::Resync(crate::jobs::ResyncStep::Resynchronise)));
    report(&e.core, SenderState::Resynchronising);
    assert_eq!(e.core.protection.jobs.find(&e.core.store, &job.id).expect("job").state, JobState::Running);
    report(&e.core, SenderState::Replicating);
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let names: Vec<&str> = j.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["Request resync", "Resynchronise"]);
}

#[tokio::test]
async fn resync_refused_by_the_primary_restores_the_state() {
    let e = env();
    e.core.protection.save(&e.core.store, relationship(ReplicationState::Replicating)).expect("save");
    e.agents.reply(PRIMARY, "RequestResync", |_| {
        Err(crate::agents::AgentError::new(crate::agents::AgentErrorKind::FailedPrecondition, "busy"))
    });
    let err = start_resync(&e.core, &vm1()).await.expect_err("refused");
    assert_eq!(err.class(), ErrorClass::FailedPrecondition, "{err}");
    assert_eq!(e.core.protection.of_vm("vm1").expect("rel").state, ReplicationState::Replicating);
    let err = {
        e.core.protection.save(&e.core.store, relationship(ReplicationState::WaitingForInitial)).expect("save");
        start_resync(&e.core, &vm1()).await.expect_err("not yet")
    };
    assert_eq!(err.class(), ErrorClass::FailedPrecondition, "{err}");
}

/// An Enable protection job, as stored, running `step` (earlier steps done).
fn enable_job(store: &Store, step: EnableStep) -> JobRecord {
    let jobs = Jobs::new();
    let mut job = jobs.create(store, JobKind::EnableProtection, "vm1", &EnableStep::ONLINE).expect("create");
    for s in EnableStep::ONLINE {
        if s == step {
            job.start_step(s, "", 1);
            break;
        }
        job.start_step(s, "", 1);
        job.succeed_step(s, "", 1);
    }
    job.relationship_id = "r-0000abcd".into();
    jobs.save(store, &job).expect("save");
    job
}

#[tokio::test]
async fn a_restart_in_initial_replication_resumes_through_resume_jobs() {
    let mut id = String::new();
    let e = env_with(|store| {
        id = enable_job(store, EnableStep::InitialReplication).id;
        store
            .put(crate::store::RELATIONSHIPS, "r-0000abcd", &relationship(ReplicationState::InitialInProgress))
            .expect("rel");
    });
    assert_eq!(e.resumed.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), [id.clone()]);
    resume_jobs(&e.core, e.resumed.clone());
    report(&e.core, SenderState::Replicating);
    let j = ended(&e.core, &id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
}

#[tokio::test]
async fn a_restart_in_any_other_step_fails_the_job() {
    for step in [EnableStep::CreateRelationship, EnableStep::StartInitialReplication] {
        let mut id = String::new();
        let e = env_with(|store| id = enable_job(store, step).id);
        assert!(e.resumed.is_empty(), "{step:?}");
        let j = e.core.protection.jobs.find(&e.core.store, &id).expect("job");
        assert_eq!(j.state, JobState::Failed, "{step:?}");
        assert_eq!(j.error, RESTARTED, "{step:?}");
    }
}
