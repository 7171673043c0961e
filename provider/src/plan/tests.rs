//! Plan runs against fake agents: the order of groups, the shutdown step, scripted
//! actions (environment, timeout), manual actions waiting for `confirm`, a failing VM
//! stopping the later groups, and the refusals before a run starts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use siterecovery_proto::model::{JobId, PlanName};
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;

use super::*;
use crate::agents::fake::FakeAgents;
use crate::agents::{AgentError, AgentErrorKind};
use crate::relationship::ReplicationState;
use crate::store::Store;

use crate::testkit::{self, PRIMARY, REPLICA};
const VMS_OF_PLAN: [&str; 3] = ["vm1", "vm2", "vm3"];

struct Env {
    core: Arc<Core>,
    agents: Arc<FakeAgents>,
    /// The VM of every `Failover` the replica host got, in order.
    failovers: Arc<Mutex<Vec<String>>>,
    dir: tempfile::TempDir,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    testkit::seed(&store);
    for name in VMS_OF_PLAN {
        testkit::put_vm(&store, name, false);
    }
    let scripts_dir = dir.path().join("scripts");
    std::fs::create_dir(&scripts_dir).expect("scripts dir");
    let config =
        crate::relationship::ProtectionConfig { scripts_dir, ..crate::relationship::ProtectionConfig::for_tests() };
    let (core, agents, _) = testkit::start_with(store, config);
    for (i, name) in VMS_OF_PLAN.iter().enumerate() {
        let rel: RelationshipRecord = serde_json::from_value(json!({
            "id": format!("r-0000000{i}"), "vm": name, "primary_host_id": PRIMARY, "replica_host_id": REPLICA,
            "policy": "gold", "interval_ms": 1000, "state": ReplicationState::Replicating, "created_unix_ms": 1,
            "total_bytes": 1048576,
            "addresses": [{"nic": 0, "source_network": "lan", "source_ip": format!("10.0.0.{}", i + 5),
                           "target_network": "dr-lan", "target_ip": format!("10.9.0.{}", i + 5),
                           "dhcp": false, "note": ""}],
        }))
        .expect("relationship");
        core.protection.save(&core.store, rel).expect("save relationship");
    }
    let failovers: Arc<Mutex<Vec<String>>> = Arc::default();
    for name in ["Failover", "Failover(test)", "Failover(planned)"] {
        let seen = failovers.clone();
        agents.reply(REPLICA, name, move |cmd| {
            if let Command::Failover(f) = cmd {
                seen.lock().expect("lock").push(f.vm.clone());
            }
            Ok(v1::CommandResult { ok: true, ..Default::default() })
        });
    }
    Env { core, agents, failovers, dir }
}

fn group(order: u32, vms: &[&str]) -> v1::PlanGroup {
    v1::PlanGroup { order, vms: vms.iter().map(|s| s.to_string()).collect() }
}

fn action(after: u32, kind: v1::PlanActionKind, cmd: &str, timeout_secs: u32) -> v1::PlanAction {
    v1::PlanAction { after_group: after, kind: kind.into(), command: cmd.into(), timeout_secs }
}

/// Creates plan `name`: group 1 = vm1, vm2; group 2 = vm3; `actions` between.
fn plan(core: &Core, name: &str, actions: Vec<v1::PlanAction>) -> PlanName {
    let p =
        v1::RecoveryPlan { name: name.into(), groups: vec![group(1, &["vm1", "vm2"]), group(2, &["vm3"])], actions };
    create(core, PlanSpec::try_from(&p).expect("valid plan")).expect("create").name
}

/// Writes an executable script `name` into the scripts directory of `dir`; its name.
fn script(dir: &std::path::Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("scripts").join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    name.to_owned()
}

/// Polls until job `id` satisfies `done` (bounded).
async fn until(core: &Core, id: &str, what: &str, done: impl Fn(&JobRecord) -> bool) -> JobRecord {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = core.protection.jobs.find(&core.store, id).expect("job");
        if done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never {what}: {j:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn ended(core: &Core, id: &str) -> JobRecord {
    until(core, id, "ended", |j| j.state != JobState::Running).await
}

fn step<'a>(j: &'a JobRecord, name: &str) -> &'a crate::jobs::StepRecord {
    j.steps.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no step {name}: {j:?}"))
}

#[tokio::test]
async fn groups_fail_over_in_order_and_the_shutdown_step_comes_first_except_for_test() {
    for kind in [FailoverType::Test, FailoverType::Planned, FailoverType::Unplanned] {
        let e = env();
        e.agents.reply(PRIMARY, "PrepareFailover", |_| {
            Ok(v1::CommandResult {
                ok: true,
                points: vec![v1::RecoveryPoint { id: "p-0000000000000009".into(), ..Default::default() }],
                ..Default::default()
            })
        });
        let name = plan(&e.core, "dc", vec![]);
        let job = start_failover(&e.core, &name, kind).await.expect("start");
        assert_eq!(job.kind, JobKind::RecoveryPlan);
        let j = ended(&e.core, &job.id).await;
        assert_eq!(j.state, JobState::Succeeded, "{kind:?}: {j:?}");
        let names: Vec<&str> = j.steps.iter().map(|s| s.name.as_str()).collect();
        let mut want = vec!["Group 1: vm1", "Group 1: vm2", "Group 2: vm3"];
        if kind != FailoverType::Test {
            want.insert(0, PlanStep::SHUTDOWN);
        }
        assert_eq!(names, want, "{kind:?}");
        // Group 2 only after both VMs of group 1.
        let order = e.failovers.lock().expect("lock").clone();
        assert_eq!(order.len(), 3, "{kind:?}: {order:?}");
        assert_eq!(order[2], "vm3", "{kind:?}: {order:?}");
        assert!(step(&j, "Group 1: vm1").ended_unix_ms <= step(&j, "Group 2: vm3").started_unix_ms);
        assert!(step(&j, "Group 1: vm2").ended_unix_ms <= step(&j, "Group 2: vm3").started_unix_ms);
        let log = e.agents.log();
        let first_failover = log.iter().position(|c| c.starts_with(&format!("{REPLICA}:Failover"))).expect("failover");
        let shutdowns: Vec<usize> = log
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.starts_with(&format!("{PRIMARY}:PrepareFailover")) || c.starts_with(&format!("{PRIMARY}:StopVm"))
            })
            .map(|(i, _)| i)
            .collect();
        match kind {
            FailoverType::Test => assert!(shutdowns.is_empty(), "a test failover stops no primary: {log:?}"),
            _ => {
                assert_eq!(shutdowns.len(), 3, "{kind:?}: {log:?}");
                assert!(shutdowns.iter().all(|&i| i < first_failover), "every primary stops first: {log:?}");
                let d = &j.steps[0].detail;
                if kind == FailoverType::Planned {
                    assert!(d.contains("vm3: stopped on hv-a, last point p-0000000000000009"), "{d}");
                    // The plan drained the primaries: the VMs' own jobs do not again.
                    assert!(!log.iter().skip(first_failover).any(|c| c.contains("PrepareFailover")), "{log:?}");
                } else {
                    assert!(d.contains("VM vm1 stopped on hv-a"), "{d}");
                }
            }
        }
        e.core.shutdown.cancel();
    }
}

#[tokio::test]
async fn a_script_runs_with_the_addresses_so_far_and_a_timeout() {
    let e = env();
    let out = e.dir.path().join("env.txt");
    let good = script(
        e.dir.path(),
        "dns.sh",
        &format!(
            "echo \"plan=$SITERECOVERY_PLAN group=$SITERECOVERY_GROUP type=$SITERECOVERY_FAILOVER_TYPE\" > {f}\n\
             printf '%s' \"$SITERECOVERY_IP_CHANGES\" >> {f}\necho updated-dns\n",
            f = out.display()
        ),
    );
    let name = plan(&e.core, "dc", vec![action(1, v1::PlanActionKind::Script, &good, 10)]);
    let job = start_failover(&e.core, &name, FailoverType::Test).await.expect("start");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    let s = step(&j, &format!("After group 1, action 1: script {good}"));
    assert!(s.detail.starts_with("exit status 0") && s.detail.contains("updated-dns"), "{}", s.detail);
    assert!(s.started_unix_ms >= step(&j, "Group 1: vm2").ended_unix_ms);
    assert!(s.ended_unix_ms <= step(&j, "Group 2: vm3").started_unix_ms);
    let text = std::fs::read_to_string(&out).expect("env file");
    assert!(text.starts_with("plan=dc group=1 type=test\n"), "{text}");
    assert!(text.contains("vm1 nic0 10.0.0.5 10.9.0.5\n") && text.contains("vm2 nic0 10.0.0.6 10.9.0.6\n"), "{text}");
    assert!(!text.contains("vm3"), "group 2 had not failed over yet: {text}");

    // A script over its timeout is killed and fails the plan at once.
    let slow = script(e.dir.path(), "slow.sh", "sleep 30\n");
    let name = plan(&e.core, "slow", vec![action(1, v1::PlanActionKind::Script, &slow, 1)]);
    // The first run's test VMs, cleaned up.
    for vm in VMS_OF_PLAN {
        let mut rel = e.core.protection.of_vm(vm).expect("relationship");
        rel.test_failover = None;
        e.core.protection.save(&e.core.store, rel).expect("clear the test failover");
    }
    let started = Instant::now();
    let job = start_failover(&e.core, &name, FailoverType::Test).await.expect("start");
    let j = ended(&e.core, &job.id).await;
    assert!(started.elapsed() < Duration::from_secs(10), "the timeout did not stop the script");
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert!(j.error.contains("script after group 1") && j.error.contains("timed out after 1s"), "{}", j.error);
    assert_eq!(step(&j, &format!("After group 1, action 1: script {slow}")).state, StepState::Failed);
    assert_eq!(step(&j, "Group 2: vm3").state, StepState::Skipped);
}

#[tokio::test]
async fn scripts_run_only_from_the_scripts_directory() {
    let e = env();
    // Outside the directory: refused at plan create, naming the field.
    let outside = e.dir.path().join("evil.sh");
    std::fs::write(&outside, "#!/bin/sh\ntouch pwned\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for cmd in [outside.to_string_lossy().into_owned(), "../evil.sh".into(), "scripts/../../evil.sh".into()] {
        let p = v1::RecoveryPlan {
            name: "x".into(),
            groups: vec![group(1, &["vm1"])],
            actions: vec![action(1, v1::PlanActionKind::Script, &cmd, 5)],
        };
        let err = PlanSpec::try_from(&p).expect_err(&cmd);
        let status = crate::error::status(&err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{cmd}");
        assert!(status.message().starts_with("create_plan.actions[0].command"), "{}", status.message());
    }
    // A script missing at run time fails its step, saying where it was looked for.
    let name = plan(&e.core, "dc", vec![action(1, v1::PlanActionKind::Script, "gone.sh", 5)]);
    let job = start_failover(&e.core, &name, FailoverType::Test).await.expect("start");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    let s = step(&j, "After group 1, action 1: script gone.sh");
    assert_eq!(s.state, StepState::Failed);
    let dir = e.core.protection.config.scripts_dir.display().to_string();
    assert!(s.detail.contains("gone.sh not found") && s.detail.contains(&dir), "{}", s.detail);
    assert!(j.error.contains("script after group 1") && j.error.contains("not found"), "{}", j.error);
    assert_eq!(step(&j, "Group 2: vm3").state, StepState::Skipped);
    // A plan stored before names were required (an absolute path) is not run.
    let mut plans = list(&e.core).expect("plans");
    plans[0].actions[0].command = outside.to_string_lossy().into_owned();
    e.core.store.put(crate::store::META, PLANS_KEY, &plans).expect("old plan");
    for vm in VMS_OF_PLAN {
        let mut rel = e.core.protection.of_vm(vm).expect("relationship");
        rel.test_failover = None;
        e.core.protection.save(&e.core.store, rel).expect("clear the test failover");
    }
    let job = start_failover(&e.core, &name, FailoverType::Test).await.expect("start");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert!(j.error.contains("absolute path"), "{}", j.error);
    assert!(!e.dir.path().join("pwned").exists() && !e.core.protection.config.scripts_dir.join("pwned").exists());
}

#[tokio::test]
async fn a_manual_action_waits_for_confirm() {
    let e = env();
    let name = plan(&e.core, "dc", vec![action(1, v1::PlanActionKind::Manual, "check the database", 0)]);
    let job = start_failover(&e.core, &name, FailoverType::Test).await.expect("start");
    let manual = "After group 1, action 1: manual action";
    let j =
        until(&e.core, &job.id, "reached the manual action", |j| j.running_step().is_some_and(|s| s.name == manual))
            .await;
    assert!(step(&j, manual).detail.contains(&format!("plan confirm {}", job.id)), "{j:?}");
    // It holds (a check that nothing happens, not a synchronisation): group 2 has not started.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let j = e.core.protection.jobs.find(&e.core.store, &job.id).expect("job");
    assert_eq!(step(&j, "Group 2: vm3").state, StepState::Pending, "{j:?}");
    assert!(!e.failovers.lock().expect("lock").contains(&"vm3".to_string()));

    let other = JobId::new("j-999999").expect("id");
    assert_eq!(crate::error::status(&confirm(&e.core, &other).expect_err("no job")).code(), tonic::Code::NotFound);
    let id = JobId::new(&job.id).expect("id");
    confirm(&e.core, &id).expect("confirm");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Succeeded, "{j:?}");
    assert_eq!(step(&j, manual).detail, "confirmed: check the database");
    let err = confirm(&e.core, &id).expect_err("nothing waits any more");
    assert!(matches!(err, PlanError::NotWaiting(_)), "{err}");
    assert_eq!(crate::error::status(&err).code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_vm_failing_in_group_one_stops_group_two() {
    let e = env();
    let seen = e.failovers.clone();
    e.agents.reply(REPLICA, "Failover(test)", move |cmd| match cmd {
        Command::Failover(f) if f.vm == "vm2" => {
            Err(AgentError::new(AgentErrorKind::FailedPrecondition, "no space for the test VM"))
        }
        Command::Failover(f) => {
            seen.lock().expect("lock").push(f.vm.clone());
            Ok(v1::CommandResult { ok: true, ..Default::default() })
        }
        _ => Ok(v1::CommandResult { ok: true, ..Default::default() }),
    });
    let name = plan(&e.core, "dc", vec![]);
    let job = start_failover(&e.core, &name, FailoverType::Test).await.expect("start");
    let j = ended(&e.core, &job.id).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert!(j.error.starts_with("group 1: 1 of 2 VM(s) failed: vm2"), "{}", j.error);
    assert!(j.error.contains("no space for the test VM"), "{}", j.error);
    assert_eq!(step(&j, "Group 1: vm1").state, StepState::Succeeded);
    assert_eq!(step(&j, "Group 1: vm2").state, StepState::Failed);
    assert_eq!(step(&j, "Group 2: vm3").state, StepState::Skipped);
    assert_eq!(e.failovers.lock().expect("lock").clone(), vec!["vm1".to_string()], "vm3 never failed over");
}

#[tokio::test]
async fn a_run_is_refused_before_its_job_when_a_vm_cannot_fail_over() {
    let e = env();
    let name = plan(&e.core, "dc", vec![]);
    let err = create(
        &e.core,
        PlanSpec::try_from(&v1::RecoveryPlan { name: "dc".into(), groups: vec![group(1, &["vm1"])], actions: vec![] })
            .expect("valid"),
    )
    .expect_err("twice");
    assert_eq!(crate::error::status(&err).code(), tonic::Code::AlreadyExists);
    assert_eq!(list(&e.core).expect("list").len(), 1);

    let missing = PlanName::new("nope").expect("name");
    let err = start_failover(&e.core, &missing, FailoverType::Test).await.expect_err("no plan");
    assert_eq!(crate::error::status(&err).code(), tonic::Code::NotFound);

    e.agents.disconnect(PRIMARY);
    e.core.protection.remove(&e.core.store, "r-00000002").expect("unprotect vm3");
    let err = start_failover(&e.core, &name, FailoverType::Planned).await.expect_err("refused");
    assert_eq!(crate::error::status(&err).code(), tonic::Code::FailedPrecondition);
    let text = err.to_string();
    assert!(text.starts_with("plan dc: "), "{text}");
    assert!(text.contains("VM vm1: primary host hv-a is not connected (use --type unplanned)"), "{text}");
    assert!(text.contains("VM \"vm3\" is not protected"), "{text}");
    assert!(e.agents.log().is_empty(), "nothing sent when refused");
    assert!(e.core.protection.jobs.list(&e.core.store).expect("jobs").is_empty(), "no job when refused");
}
