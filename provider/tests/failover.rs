//! In-process: a provider with real certificates and two fake agents that record the
//! commands they receive. Failover lifecycle (test, planned with automatic reverse
//! replication, refusals), networks and address reservations, and recovery plans with
//! scripts.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{
    AgentSession, GIB, TestProvider, now_ms, ok_result, pairing, protect, wait_connected, wait_host, wait_job,
    wait_kind,
};
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::protection_client::ProtectionClient;
use siterecovery_proto::v1::provider_message::Command;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

type Log = Arc<Mutex<Vec<(String, String)>>>;

fn vm(name: &str, ip: &str) -> v1::Vm {
    v1::Vm {
        name: name.into(),
        disks: vec![v1::Disk { id: "disk0".into(), size_bytes: GIB, ..Default::default() }],
        nics: vec![v1::Nic { network: "corp".into(), ip: ip.into(), dhcp: false, mac: "52:54:00:00:00:01".into() }],
        power_state: v1::PowerState::Running as i32,
        ..Default::default()
    }
}

/// A fake agent: records every command as (host, summary) and answers like the real one.
async fn fake_agent(host: &'static str, mut session: AgentSession, log: Log, stop: CancellationToken) {
    while let Some(m) = session.next(&stop).await {
        let mut result = ok_result(&m);
        let point = |id: &str| v1::RecoveryPoint {
            id: id.into(),
            seq: 1,
            created_unix_ms: now_ms(),
            kind: v1::PointKind::Latest.into(),
            ..Default::default()
        };
        let summary = match &m.command {
            Some(Command::StartReplication(s)) => {
                session.reply(result.clone()).await;
                log.lock()
                    .expect("log")
                    .push((host.into(), format!("StartReplication {} resync_initial={}", s.vm, s.resync_initial)));
                // Paced like a copy in progress, so the job shows its steps.
                for (st, done, p) in [("initial", 0, false), ("replicating", GIB, true)] {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let x = v1::ReplicationStatus {
                        relationship_id: s.relationship_id.clone(),
                        vm: s.vm.clone(),
                        state: siterecovery_proto::model::SenderState::from_word(st).map_or(0, i32::from),
                        done_bytes: done,
                        total_bytes: GIB,
                        last_point: p.then(|| point("p1")),
                        cycles: 1,
                        ..Default::default()
                    };
                    session.send(Body::Replication(x)).await;
                }
                continue;
            }
            Some(Command::PrepareReplica(p)) => format!("PrepareReplica {} adopt={}", p.vm, p.adopt_vm_disks),
            Some(Command::PrepareFailover(p)) => {
                result.points = vec![point("p9")];
                format!("PrepareFailover {}", p.vm)
            }
            Some(Command::Failover(f)) => {
                let name = if f.test { f.test_vm_name.clone() } else { f.vm.clone() };
                let kind = if f.test {
                    "test"
                } else if f.planned {
                    "planned"
                } else {
                    "unplanned"
                };
                let mut v = vm(&name, "");
                v.nics = f.nics.clone();
                v.disks[0].nbd_tcp_uri = format!("nbd://127.0.0.1:10809/{name}-disk0");
                v.failover = Some(v1::FailoverInfo {
                    relationship_id: f.relationship_id.clone(),
                    point_id: if f.point == "latest" { "p1".into() } else { f.point.clone() },
                    kind: siterecovery_proto::model::FailoverKind::from_word(kind).map_or(0, i32::from),
                    committed: f.planned,
                    test_of: if f.test { f.vm.clone() } else { String::new() },
                    started_unix_ms: now_ms(),
                });
                result.vm = Some(v);
                let ips: Vec<String> = f.nics.iter().map(|n| format!("{}={}", n.network, n.ip)).collect();
                format!("Failover {} {kind} point={} nics={}", f.vm, f.point, ips.join(","))
            }
            Some(Command::CommitFailover(c)) => format!("CommitFailover {}", c.vm),
            Some(Command::ChangePoint(c)) => format!("ChangePoint {} {}", c.vm, c.point),
            Some(Command::CleanupTestFailover(c)) => format!("CleanupTestFailover {} {}", c.vm, c.test_vm_name),
            Some(Command::StopVm(s)) => format!("StopVm {}", s.name),
            Some(Command::ListPoints(l)) => {
                result.points = vec![point("p1")];
                format!("ListPoints {}", l.vm)
            }
            Some(Command::StopReplication(s)) => format!("StopReplication {} remove={}", s.vm, s.remove_replica),
            _ => "other".into(),
        };
        log.lock().expect("log").push((host.into(), summary));
        session.reply(result).await;
    }
}

struct Env {
    provider: TestProvider,
    p: ProtectionClient<Channel>,
    inv: InventoryClient<Channel>,
    log: Log,
    stops: Vec<CancellationToken>,
}

/// A provider with fake agents hv-a (reporting `vms`) and hv-b, policy `fast`, gold-a
/// paired with gold-b, networks corp (primary) and dr (secondary) mapped.
async fn setup(vms: Vec<v1::Vm>) -> Env {
    let provider = TestProvider::start_with(vms.iter().map(|v| (0, v.clone())).collect()).await;
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let stops = vec![CancellationToken::new(), CancellationToken::new()];
    let n = vms.len();
    tokio::spawn(fake_agent("hv-a", provider.session(0, vms).await, log.clone(), stops[0].clone()));
    tokio::spawn(fake_agent("hv-b", provider.session(1, vec![]).await, log.clone(), stops[1].clone()));
    let (mut inv, mut p) = provider.operator().await;
    wait_connected(&mut inv, n).await;
    p.create_policy(v1::Policy { name: "fast".into(), interval_ms: 1000, retention_ms: 60_000, ..Default::default() })
        .await
        .expect("policy");
    p.pair_clouds(pairing("gold-a", "gold-b", "fast")).await.expect("pair");
    let net = |site: &str, name: &str, pools: &[&str]| v1::VmNetwork {
        site: site.into(),
        name: name.into(),
        subnet: "10.0.0.0/24".into(),
        pools: pools.iter().map(|s| s.to_string()).collect(),
        gateway: "10.0.0.1".into(),
        dns: vec!["10.0.0.2".into()],
    };
    p.create_network(net("primary", "corp", &["10.0.0.5-10.0.0.50"])).await.expect("corp");
    // The target pool holds .5 and .6 but not .7: vm3 (.7) gets another free address.
    p.create_network(net("secondary", "dr", &["10.0.0.5-10.0.0.6", "10.0.0.100-10.0.0.110"])).await.expect("dr");
    let e = p.create_network(net("secondary", "bad", &["10.0.1.5-10.0.1.6"])).await.expect_err("outside");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = p
        .map_network(v1::NetworkMapping { source: "dr".into(), target: "corp".into() })
        .await
        .expect_err("secondary → primary is not paired");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    p.map_network(v1::NetworkMapping { source: "corp".into(), target: "dr".into() }).await.expect("map");
    Env { provider, p, inv, log, stops }
}

fn req(vm: &str, kind: &str) -> v1::FailoverRequest {
    v1::FailoverRequest {
        vm: vm.into(),
        r#type: siterecovery_proto::model::FailoverKind::from_word(kind).map_or(0, i32::from),
        ..Default::default()
    }
}

fn vmreq(vm: &str) -> v1::VmRequest {
    v1::VmRequest { vm: vm.into() }
}

fn position(log: &Log, host: &str, prefix: &str) -> usize {
    let l = log.lock().expect("log");
    l.iter()
        .position(|(h, c)| h == host && c.starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix} to {host}: {l:?}"))
}

#[tokio::test]
async fn test_planned_failover_reprotect_and_refusals() {
    let mut env = setup(vec![vm("vm1", "10.0.0.5")]).await;
    let p = &mut env.p;
    protect(p, "vm1").await;
    let shown = env.inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.expect("vm").into_inner();
    let r = shown.replication.expect("replication");
    assert_eq!(r.addresses.len(), 1);
    assert_eq!((r.addresses[0].target_network.as_str(), r.addresses[0].target_ip.as_str()), ("dr", "10.0.0.5"));

    // Refusals before any failover.
    for e in [
        p.commit_failover(vmreq("vm1")).await.expect_err("commit"),
        p.change_point(v1::ChangePointRequest { vm: "vm1".into(), point: "p1".into() }).await.expect_err("point"),
        p.reprotect(vmreq("vm1")).await.expect_err("reprotect"),
        p.cleanup_test_failover(vmreq("vm1")).await.expect_err("cleanup"),
    ] {
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    }
    let e = p.failover(req("vm1", "sideways")).await.expect_err("type");
    assert_eq!(e.code(), Code::InvalidArgument);

    // Test failover: one at a time, cleanup clears it.
    let job = p.failover(req("vm1", "test")).await.expect("test").into_inner();
    let done = wait_job(p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    assert!(done.steps[1].detail.contains("vm1-test") && done.steps[1].detail.contains("nbd://"), "{done:?}");
    let e = p.failover(req("vm1", "test")).await.expect_err("second test");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("failover cleanup vm1"), "{}", e.message());
    let test_vm = env.inv.get_vm(v1::GetVmRequest { name: "vm1-test".into() }).await.expect("test vm").into_inner();
    assert_eq!(test_vm.host_name, "hv-b");
    assert_eq!(test_vm.nics[0].ip, "10.0.0.5");
    let job = p.cleanup_test_failover(vmreq("vm1")).await.expect("cleanup").into_inner();
    assert_eq!(wait_job(p, &job.id).await.state(), v1::JobState::Succeeded);
    assert!(env.inv.get_vm(v1::GetVmRequest { name: "vm1-test".into() }).await.is_err(), "test VM forgotten");
    // Isolated test network: the address is kept on NETWORK-test-isolated.
    let mut r = req("vm1", "test");
    r.test_network = v1::TestNetwork::Isolated.into();
    let job = p.failover(r).await.expect("isolated").into_inner();
    assert_eq!(wait_job(p, &job.id).await.state(), v1::JobState::Succeeded);
    let job = p.cleanup_test_failover(vmreq("vm1")).await.expect("cleanup").into_inner();
    assert_eq!(wait_job(p, &job.id).await.state(), v1::JobState::Succeeded);

    // Planned failover: PrepareFailover to the primary, then Failover{planned} to the replica,
    // then reverse replication with the roles swapped.
    env.log.lock().expect("log").clear();
    let job = p.failover(req("vm1", "planned")).await.expect("planned").into_inner();
    let done = wait_job(p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    assert!(done.steps.iter().all(|s| s.state() == v1::StepState::Succeeded), "{done:?}");
    let rev = wait_kind(p, "Reverse replication", "vm1").await;
    assert_eq!(rev.state(), v1::JobState::Succeeded, "{rev:?}");
    let prep = position(&env.log, "hv-a", "PrepareFailover vm1");
    let fo = position(&env.log, "hv-b", "Failover vm1 planned point=latest nics=dr=10.0.0.5");
    let adopt = position(&env.log, "hv-a", "PrepareReplica vm1 adopt=true");
    let start = position(&env.log, "hv-b", "StartReplication vm1 resync_initial=true");
    assert!(prep < fo && fo < adopt && adopt < start, "{:?}", env.log.lock().expect("log"));
    let shown = env.inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.expect("vm").into_inner();
    assert_eq!(shown.host_name, "hv-b");
    assert_eq!(shown.nics[0].ip, "10.0.0.5");
    assert_eq!(shown.failover.as_ref().map(|f| f.kind()), Some(v1::FailoverKind::Planned));
    let r = shown.replication.expect("reversed");
    assert_eq!(
        (r.primary_host.as_str(), r.replica_host.as_str(), r.state()),
        ("hv-b", "hv-a", v1::ReplicationState::Replicating)
    );

    // Commit / change-point refused on a replicating (reversed) relationship.
    let e = p.commit_failover(vmreq("vm1")).await.expect_err("commit");
    assert_eq!(e.code(), Code::FailedPrecondition);

    // The primary (now hv-b) goes away: planned failover is refused, suggesting unplanned.
    env.stops[1].cancel();
    wait_host(&mut env.inv, "hv-b", false).await;
    let e = p.failover(req("vm1", "planned")).await.expect_err("primary down");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("failover unplanned vm1"), "{}", e.message());
    env.stops[0].cancel();
    env.provider.stop().await;
}

#[tokio::test]
async fn unplanned_change_point_commit_reprotect() {
    let mut env = setup(vec![vm("vm1", "10.0.0.7")]).await;
    let p = &mut env.p;
    protect(p, "vm1").await;
    let mut r = req("vm1", "unplanned");
    r.shutdown_primary = true;
    let job = p.failover(r).await.expect("unplanned").into_inner();
    let done = wait_job(p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    assert!(done.steps[1].detail.contains("stopped on hv-a"), "{done:?}");
    // .7 is not in the target pool: another free one.
    let shown = env.inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.expect("vm").into_inner();
    assert_eq!(shown.nics[0].ip, "10.0.0.5");
    assert_eq!(shown.replication.expect("rel").state(), v1::ReplicationState::FailedOver);
    let job = p.change_point(v1::ChangePointRequest { vm: "vm1".into(), point: "p0".into() }).await.expect("cp");
    assert_eq!(wait_job(p, &job.into_inner().id).await.state(), v1::JobState::Succeeded);
    let job = p.commit_failover(vmreq("vm1")).await.expect("commit").into_inner();
    assert_eq!(wait_job(p, &job.id).await.state(), v1::JobState::Succeeded);
    let e = p.change_point(v1::ChangePointRequest { vm: "vm1".into(), point: "p1".into() }).await.expect_err("after");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("committed"), "{}", e.message());
    let job = p.reprotect(vmreq("vm1")).await.expect("reprotect").into_inner();
    let done = wait_job(p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    assert_eq!(done.steps[1].state(), v1::StepState::Skipped, "already committed");
    let order: Vec<String> = env.log.lock().expect("log").iter().map(|(h, c)| format!("{h} {c}")).collect();
    let at = |s: &str| order.iter().position(|x| x.starts_with(s)).unwrap_or_else(|| panic!("{s}: {order:?}"));
    assert!(at("hv-a StopVm vm1") < at("hv-b Failover vm1 unplanned"));
    assert!(at("hv-b ChangePoint vm1 p0") < at("hv-b CommitFailover vm1"));
    assert!(at("hv-a PrepareReplica vm1 adopt=true") < at("hv-b StartReplication vm1 resync_initial=true"));
    env.stops.iter().for_each(CancellationToken::cancel);
    env.provider.stop().await;
}

#[tokio::test]
async fn recovery_plan_groups_scripts_and_failure() {
    let mut env = setup(vec![vm("vm1", "10.0.0.5"), vm("vm2", "10.0.0.6"), vm("vm3", "10.0.0.7")]).await;
    let p = &mut env.p;
    for v in ["vm1", "vm2", "vm3"] {
        protect(p, v).await;
    }
    let script = |name: &str, body: &str| {
        use std::os::unix::fs::PermissionsExt;
        let path = env.provider.scripts_dir.join(name);
        std::fs::write(&path, body).expect("script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        name.to_owned()
    };
    let envfile = env.provider.dir.join("env.txt");
    let good = script(
        "dns.sh",
        &format!(
            "#!/bin/sh\necho \"plan=$SITERECOVERY_PLAN group=$SITERECOVERY_GROUP type=$SITERECOVERY_FAILOVER_TYPE\" > {f}\n\
             printf '%s' \"$SITERECOVERY_IP_CHANGES\" >> {f}\necho updated-dns\n",
            f = envfile.display()
        ),
    );
    let bad = script("bad.sh", "#!/bin/sh\necho cannot reach dns >&2\nexit 2\n");
    let groups = vec![
        v1::PlanGroup { order: 1, vms: vec!["vm1".into(), "vm2".into()] },
        v1::PlanGroup { order: 2, vms: vec!["vm3".into()] },
    ];
    let action = |cmd: &str| v1::PlanAction {
        after_group: 1,
        kind: v1::PlanActionKind::Script.into(),
        command: cmd.into(),
        timeout_secs: 10,
    };
    p.create_plan(v1::RecoveryPlan { name: "broken".into(), groups: groups.clone(), actions: vec![action(&bad)] })
        .await
        .expect("plan broken");
    p.create_plan(v1::RecoveryPlan { name: "dc".into(), groups, actions: vec![action(&good)] }).await.expect("plan dc");
    let e = p
        .create_plan(v1::RecoveryPlan { name: "dc".into(), groups: vec![], actions: vec![] })
        .await
        .expect_err("no groups");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(p.list_plans(v1::ListPlansRequest {}).await.expect("list").into_inner().plans.len(), 2);

    // A failing script fails the plan; group 2 never runs.
    let job = p
        .plan_failover(v1::PlanFailoverRequest { plan: "broken".into(), r#type: v1::FailoverKind::Test.into() })
        .await
        .expect("run");
    let done = wait_job(p, &job.into_inner().id).await;
    assert_eq!(done.state(), v1::JobState::Failed, "{done:?}");
    assert!(done.error.contains("script after group 1") && done.error.contains("bad.sh"), "{}", done.error);
    let step = done.steps.iter().find(|s| s.name.contains("bad.sh")).expect("script step");
    assert_eq!(step.state(), v1::StepState::Failed);
    assert!(step.detail.contains("cannot reach dns"), "{}", step.detail);
    assert_eq!(done.steps.iter().find(|s| s.name == "Group 2: vm3").expect("vm3").state(), v1::StepState::Skipped);
    for v in ["vm1", "vm2"] {
        let job = p.cleanup_test_failover(vmreq(v)).await.expect("cleanup").into_inner();
        assert_eq!(wait_job(p, &job.id).await.state(), v1::JobState::Succeeded);
    }

    // The planned run: shutdown step, group 1 in parallel, the script, then group 2.
    let job = p
        .plan_failover(v1::PlanFailoverRequest { plan: "dc".into(), r#type: v1::FailoverKind::Planned.into() })
        .await
        .expect("run");
    let done = wait_job(p, &job.into_inner().id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    let step = |n: &str| done.steps.iter().find(|s| s.name == n).unwrap_or_else(|| panic!("{n}: {done:?}")).clone();
    assert_eq!(done.steps[0].name, "Shut down the primary VMs");
    assert!(done.steps[0].detail.contains("last point p9"), "{}", done.steps[0].detail);
    let (g1a, g1b, g2) = (step("Group 1: vm1"), step("Group 1: vm2"), step("Group 2: vm3"));
    let script_step = done.steps.iter().find(|s| s.name.contains("dns.sh")).expect("script step");
    assert!(script_step.detail.contains("updated-dns"), "{}", script_step.detail);
    assert!(g1a.ended_unix_ms <= script_step.started_unix_ms && g1b.ended_unix_ms <= script_step.started_unix_ms);
    assert!(script_step.ended_unix_ms <= g2.started_unix_ms, "{done:?}");
    let text = std::fs::read_to_string(&envfile).expect("env file");
    assert!(text.starts_with("plan=dc group=1 type=planned"), "{text}");
    assert!(text.contains("vm1 nic0 10.0.0.5 10.0.0.5") && text.contains("vm2 nic0 10.0.0.6 10.0.0.6"), "{text}");
    assert!(!text.contains("vm3"), "group 2 had not failed over yet: {text}");
    // PrepareFailover for every VM came before any Failover.
    let log = env.log.lock().expect("log").clone();
    let last_prep = log.iter().rposition(|(_, c)| c.starts_with("PrepareFailover")).expect("prep");
    let first_fo = log.iter().position(|(_, c)| c.contains(" planned ")).expect("failover");
    assert!(last_prep < first_fo, "{log:?}");
    env.stops.iter().for_each(CancellationToken::cancel);
    env.provider.stop().await;
}

#[tokio::test]
async fn local_failover_is_detected_from_the_inventory() {
    let mut env = setup(vec![vm("vm1", "10.0.0.5")]).await;
    protect(&mut env.p, "vm1").await;
    let shown = env.inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.expect("vm").into_inner();
    let rel_id = shown.replication.expect("rel").relationship_id;
    // The agent of hv-b failed vm1 over on its own and reconnects with it in its inventory.
    env.stops[1].cancel();
    let mut local = vm("vm1", "10.0.0.5");
    local.failover = Some(v1::FailoverInfo {
        relationship_id: rel_id,
        point_id: "p1".into(),
        kind: v1::FailoverKind::Local.into(),
        committed: false,
        test_of: String::new(),
        started_unix_ms: now_ms(),
    });
    let again = CancellationToken::new();
    tokio::spawn(fake_agent("hv-b", env.provider.session(1, vec![local]).await, env.log.clone(), again.clone()));
    let job = wait_kind(&mut env.p, "Local failover detected", "vm1").await;
    assert_eq!(job.state(), v1::JobState::Succeeded);
    assert!(job.steps[0].detail.contains("host hv-b reports VM vm1 failed over on its own"), "{job:?}");
    let shown = env.inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.expect("vm").into_inner();
    assert_eq!(shown.host_name, "hv-b", "the failed-over copy is the VM now");
    assert_eq!(shown.replication.expect("rel").state(), v1::ReplicationState::FailedOver);
    // Commit and reprotect from there work as after any unplanned failover.
    let job = env.p.commit_failover(vmreq("vm1")).await.expect("commit").into_inner();
    assert_eq!(wait_job(&mut env.p, &job.id).await.state(), v1::JobState::Succeeded);
    again.cancel();
    env.stops[0].cancel();
    env.provider.stop().await;
}
