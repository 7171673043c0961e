//! Failover, commit, change-point, cleanup and reprotect against fake agents: the
//! commands each sends, in order, the steps it records, and every refusal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use siterecovery_proto::model::{PointSelector, VmName};
use siterecovery_proto::v1;

use super::*;
use crate::agents::fake::FakeAgents;
use crate::agents::{AgentError, AgentErrorKind};
use crate::jobs::{JobState, PlannedFailoverStep, StepState};
use crate::relationship::{Core, RelationshipRecord, ReplicationState};
use crate::store::Store;

use crate::testkit::{self, PRIMARY, REPLICA};

struct Env {
    core: Arc<Core>,
    agents: Arc<FakeAgents>,
    _dir: tempfile::TempDir,
}

fn env(state: ReplicationState) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    testkit::seed(&store);
    testkit::put_vm(&store, "vm1", true);
    let (core, agents, _) = testkit::start(store);
    let rel: RelationshipRecord = serde_json::from_value(json!({
        "id": "r-0000abcd", "vm": "vm1", "primary_host_id": PRIMARY, "replica_host_id": REPLICA, "policy": "gold",
        "interval_ms": 1000, "state": state, "created_unix_ms": 1, "total_bytes": 1048576,
    }))
    .expect("relationship");
    core.protection.save(&core.store, rel).expect("save relationship");
    Env { core, agents, _dir: dir }
}

fn vm(name: &str) -> VmName {
    VmName::new(name).expect("VM name")
}

fn sel(point: &str) -> PointSelector {
    point.parse().expect("point selector")
}

/// The status code the service answers an error with.
trait StatusCode {
    fn code(&self) -> tonic::Code;
}

impl StatusCode for FailoverError {
    fn code(&self) -> tonic::Code {
        crate::error::status(self).code()
    }
}

fn opts(kind: FailoverType) -> FailoverOptions {
    FailoverOptions {
        kind,
        point: PointSelector::Latest,
        test_network: TestNetwork::Mapped,
        shutdown_primary: kind == FailoverType::Unplanned,
        prepared: None,
    }
}

/// Polls until job `id` ends (bounded).
async fn ended(core: &Core, id: &str) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = core.protection.jobs.find(&core.store, id).expect("job");
        if j.state != JobState::Running {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not end: {j:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn state_of(core: &Core) -> ReplicationState {
    core.protection.of_vm("vm1").expect("relationship").state
}

fn step_states(j: &JobRecord) -> Vec<(String, StepState)> {
    j.steps.iter().map(|s| (s.name.clone(), s.state)).collect()
}

fn point(id: &str) -> v1::CommandResult {
    v1::CommandResult {
        ok: true,
        points: vec![v1::RecoveryPoint { id: id.into(), ..Default::default() }],
        ..Default::default()
    }
}

#[tokio::test]
async fn test_failover_starts_a_test_vm_and_cleanup_removes_it() {
    let e = env(ReplicationState::Replicating);
    let job = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Test)).await.expect("test failover");
    assert_eq!(job.kind, JobKind::TestFailover);
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(
        step_states(&j),
        vec![
            ("Check prerequisites".into(), StepState::Succeeded),
            ("Start the test VM on the replica host".into(), StepState::Succeeded)
        ]
    );
    assert_eq!(e.agents.log(), vec![format!("{REPLICA}:Failover(test)")]);
    // Replication goes on; the test VM is recorded.
    assert_eq!(state_of(&e.core), ReplicationState::Replicating);
    let t = e.core.protection.of_vm("vm1").and_then(|r| r.test_failover).expect("test failover recorded");
    assert_eq!(t.test_vm, "vm1-test");
    // One test failover per VM at a time.
    let err = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Test)).await.expect_err("second test");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("failover cleanup vm1"), "{err}");
    // Nor a real failover while it runs.
    let err = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Unplanned)).await.expect_err("unplanned");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let c = start_cleanup(&e.core, &vm("vm1")).await.expect("cleanup");
    let c = ended(&e.core, &c.id).await;
    assert_eq!(c.state, JobState::Succeeded, "{c:?}");
    assert_eq!(e.agents.log().last().map(String::as_str), Some(&*format!("{REPLICA}:CleanupTestFailover")));
    assert!(e.core.protection.of_vm("vm1").and_then(|r| r.test_failover).is_none());
    let err = start_cleanup(&e.core, &vm("vm1")).await.expect_err("nothing to clean up");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn planned_failover_drains_the_primary_commits_and_starts_reverse_replication() {
    let e = env(ReplicationState::Replicating);
    e.agents.reply(PRIMARY, "PrepareFailover", |_| Ok(point("p-000000000000000a")));
    let job = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Planned)).await.expect("planned");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert!(j.steps.iter().all(|s| s.state == StepState::Succeeded), "{j:?}");
    assert_eq!(
        j.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        PlannedFailoverStep::ALL.iter().map(|s| s.name()).collect::<Vec<_>>()
    );
    // Reverse replication follows: the former primary becomes the replica.
    let log = e.agents.log();
    assert_eq!(
        log[..4],
        [
            format!("{PRIMARY}:PrepareFailover"),
            format!("{REPLICA}:Failover(planned)"),
            format!("{PRIMARY}:PrepareReplica"),
            format!("{REPLICA}:StartReplication"),
        ]
    );
    let rel = e.core.protection.of_vm("vm1").expect("reversed relationship");
    assert_eq!(rel.primary_host_id, REPLICA);
    assert_eq!(rel.replica_host_id, PRIMARY);
    assert_eq!(rel.reversed_from, "r-0000abcd");
}

#[tokio::test]
async fn planned_failover_needs_a_whole_chain_and_a_connected_primary() {
    for s in [ReplicationState::ResyncRequired, ReplicationState::InitialInProgress, ReplicationState::StoppedOnError] {
        let e = env(s);
        let err = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Planned)).await.expect_err("refused");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{s:?}");
        assert!(e.agents.log().is_empty(), "nothing sent when refused");
    }
    let e = env(ReplicationState::Replicating);
    e.agents.disconnect(PRIMARY);
    let err = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Planned)).await.expect_err("primary down");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.to_string().contains("failover unplanned vm1"), "{err}");
    e.agents.disconnect(REPLICA);
    let err = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Unplanned)).await.expect_err("replica down");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(state_of(&e.core), ReplicationState::Replicating, "a refusal changes nothing");
}

#[tokio::test]
async fn a_failed_drain_aborts_the_planned_failover() {
    let e = env(ReplicationState::Replicating);
    e.agents.reply(PRIMARY, "PrepareFailover", |_| {
        Err(AgentError::new(AgentErrorKind::FailedPrecondition, "the replica refused the last log"))
    });
    let job = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Planned)).await.expect("planned");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.steps[1].state, StepState::Failed);
    assert!(j.error.contains("the replica refused the last log"), "{}", j.error);
    assert_eq!(state_of(&e.core), ReplicationState::Paused, "replication held after an aborted failover");
    assert_eq!(e.agents.log(), vec![format!("{PRIMARY}:PrepareFailover")]);
}

#[tokio::test]
async fn unplanned_failover_change_point_commit_then_reprotect() {
    let e = env(ReplicationState::StoppedOnError);
    // Commit, change-point and reprotect need a failover first.
    assert_eq!(start_commit(&e.core, &vm("vm1")).await.expect_err("commit").code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        start_change_point(&e.core, &vm("vm1"), sel("p1")).await.expect_err("point").code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(
        start_reprotect(&e.core, &vm("vm1")).await.expect_err("reprotect").code(),
        tonic::Code::FailedPrecondition
    );

    e.agents.reply(REPLICA, "Failover", |_| Ok(point("p-0000000000000005")));
    let job = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Unplanned)).await.expect("unplanned");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(e.agents.log(), vec![format!("{PRIMARY}:StopVm"), format!("{REPLICA}:Failover")]);
    assert_eq!(state_of(&e.core), ReplicationState::FailedOver);
    let f = e.core.protection.of_vm("vm1").and_then(|r| r.failover).expect("failover recorded");
    assert_eq!(f.point_id, "p-0000000000000005");
    assert_eq!(
        start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Unplanned)).await.expect_err("twice").code(),
        tonic::Code::FailedPrecondition
    );

    e.agents.reply(REPLICA, "ChangePoint", |_| Ok(point("p-0000000000000003")));
    let c = start_change_point(&e.core, &vm("vm1"), sel("p3")).await.expect("change point");
    assert_eq!(ended(&e.core, &c.id).await.state, JobState::Succeeded);
    let f = e.core.protection.of_vm("vm1").and_then(|r| r.failover).expect("failover");
    assert_eq!(f.point_id, "p-0000000000000003");

    let c = start_commit(&e.core, &vm("vm1")).await.expect("commit");
    assert_eq!(ended(&e.core, &c.id).await.state, JobState::Succeeded);
    assert_eq!(state_of(&e.core), ReplicationState::Committed);
    // Change-point only before commit; commit only once.
    assert_eq!(
        start_change_point(&e.core, &vm("vm1"), sel("p1")).await.expect_err("after commit").code(),
        tonic::Code::FailedPrecondition
    );
    assert_eq!(start_commit(&e.core, &vm("vm1")).await.expect_err("again").code(), tonic::Code::FailedPrecondition);

    let r = start_reprotect(&e.core, &vm("vm1")).await.expect("reprotect");
    // The job waits for the resync; a status from the new primary would end it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = e.core.protection.jobs.find(&e.core.store, &r.id).expect("job");
        assert_eq!(j.state, JobState::Running, "{j:?}");
        if j.running_step().is_some_and(|s| s.name == "Resynchronise") {
            break;
        }
        assert!(Instant::now() < deadline, "reprotect never reached the resync: {j:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = e.agents.log();
    // Committed already: no second commit; the former primary adopts its disks.
    let tail: Vec<&str> = log[log.len() - 2..].iter().map(String::as_str).collect();
    assert_eq!(tail, [format!("{PRIMARY}:PrepareReplica").as_str(), format!("{REPLICA}:StartReplication").as_str()]);
    let rel = e.core.protection.of_vm("vm1").expect("reversed");
    assert_eq!(rel.primary_host_id, REPLICA);
    assert_eq!(rel.state, ReplicationState::WaitingForInitial);
    e.core.shutdown.cancel();
}

#[tokio::test]
async fn a_vm_busy_with_another_job_is_refused() {
    let e = env(ReplicationState::Replicating);
    let _claim = e.core.protection.jobs.claim("vm1").expect("claim");
    for kind in [FailoverType::Test, FailoverType::Planned, FailoverType::Unplanned] {
        let err = start_vm_failover(&e.core, &vm("vm1"), opts(kind)).await.expect_err("busy");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{kind:?}");
        assert!(err.to_string().contains("another protection job"), "{err}");
    }
    assert!(e.agents.log().is_empty());
}

#[tokio::test]
async fn an_unprotected_or_unknown_vm_is_refused() {
    let e = env(ReplicationState::Replicating);
    let err = start_vm_failover(&e.core, &vm("nope"), opts(FailoverType::Test)).await.expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    e.core.protection.remove(&e.core.store, "r-0000abcd").expect("remove");
    let err = start_vm_failover(&e.core, &vm("vm1"), opts(FailoverType::Test)).await.expect_err("not protected");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}
