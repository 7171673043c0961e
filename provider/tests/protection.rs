//! In-process: a provider on 127.0.0.1:0 with real certificates, two fake agents on the
//! control channel, and the operator's Protection API: policy, pairing, protect driven
//! by replication statuses, health, finalize, resync, unprotect.

mod common;

use std::time::Duration;

use common::{AgentSession, GIB, TestProvider, now_ms, ok_result, pairing, wait_connected, wait_job, wait_kind};
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::provider_message::Command;
use tokio_util::sync::CancellationToken;

/// A fake agent: answers every command with ok; on StartReplication reports initial
/// progress then `replicating`; on RequestResync reports a resync; ListPoints → one point.
async fn fake_agent(mut session: AgentSession, stop: CancellationToken) {
    while let Some(m) = session.next(&stop).await {
        let mut result = ok_result(&m);
        let status = |state: &str, done: u64, point: bool| v1::ReplicationStatus {
            relationship_id: String::new(),
            vm: "vm1".into(),
            state: siterecovery_proto::model::SenderState::from_word(state).map_or(0, i32::from),
            done_bytes: done,
            total_bytes: 2 * GIB,
            last_point: point.then(|| v1::RecoveryPoint {
                id: "p1".into(),
                seq: 1,
                created_unix_ms: now_ms(),
                kind: v1::PointKind::Latest.into(),
                ..Default::default()
            }),
            cycles: 1,
            resync_blocks_compared: if state == "replicating" { 64 } else { 0 },
            resync_blocks_sent: if state == "replicating" { 3 } else { 0 },
            ..Default::default()
        };
        match m.command {
            Some(Command::StartReplication(s)) => {
                session.reply(result).await;
                // Paced like a copy in progress, so the job shows its steps.
                for (st, done, p) in [("initial", 0, false), ("initial", GIB, false), ("replicating", 2 * GIB, true)] {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let mut x = status(st, done, p);
                    x.relationship_id = s.relationship_id.clone();
                    session.send(Body::Replication(x)).await;
                }
                continue;
            }
            Some(Command::RequestResync(s)) => {
                session.reply(result).await;
                for st in ["resynchronising", "replicating"] {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let mut x = status(st, 0, true);
                    x.relationship_id = s.relationship_id.clone();
                    session.send(Body::Replication(x)).await;
                }
                continue;
            }
            Some(Command::ListPoints(_)) => {
                result.points = vec![v1::RecoveryPoint {
                    id: "p1".into(),
                    seq: 1,
                    kind: v1::PointKind::Latest.into(),
                    ..Default::default()
                }];
            }
            Some(Command::ExportPoint(_)) => result.uri = "nbd://127.0.0.1:1/vm1-p-1".into(),
            _ => {}
        }
        session.reply(result).await;
    }
}

#[tokio::test]
async fn protect_resync_unprotect_with_fake_agents() {
    let vm = v1::Vm {
        name: "vm1".into(),
        disks: vec![v1::Disk { id: "disk0".into(), size_bytes: 2 * GIB, ..Default::default() }],
        ..Default::default()
    };
    let provider = TestProvider::start_with(vec![(0, vm.clone())]).await;
    let stop = CancellationToken::new();
    tokio::spawn(fake_agent(provider.session(0, vec![vm]).await, stop.clone()));
    tokio::spawn(fake_agent(provider.session(1, vec![]).await, stop.clone()));
    let (mut inv, mut p) = provider.operator().await;
    // Wait for both hosts and the VM.
    wait_connected(&mut inv, 1).await;

    // Not paired yet: protect fails with a clear error and a failed job.
    let e =
        p.protect(v1::ProtectRequest { vm: "vm1".into(), export_dir: String::new() }).await.expect_err("not paired");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("not paired"), "{}", e.message());

    let bad = p
        .create_policy(v1::Policy { name: "fast".into(), interval_ms: 500, retention_ms: 60_000, ..Default::default() })
        .await
        .expect_err("500ms");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    p.create_policy(v1::Policy { name: "fast".into(), interval_ms: 1000, retention_ms: 60_000, ..Default::default() })
        .await
        .expect("policy");
    let e = p.pair_clouds(pairing("gold-a", "gold-a", "fast")).await.expect_err("self");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    p.pair_clouds(pairing("gold-a", "gold-b", "fast")).await.expect("pair");
    let e = p.delete_policy(v1::DeletePolicyRequest { name: "fast".into() }).await.expect_err("in use");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    let job = p
        .protect(v1::ProtectRequest { vm: "vm1".into(), export_dir: String::new() })
        .await
        .expect("protect")
        .into_inner();
    let done = wait_job(&mut p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    assert_eq!(done.done_bytes, 2 * GIB);
    assert!(done.steps.iter().all(|s| s.state() == v1::StepState::Succeeded), "{done:?}");
    let e = p.protect(v1::ProtectRequest { vm: "vm1".into(), export_dir: String::new() }).await.expect_err("twice");
    assert_eq!(e.code(), tonic::Code::AlreadyExists);

    let vm = inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.expect("vm").into_inner();
    let r = vm.replication.expect("replication");
    assert_eq!(r.state(), v1::ReplicationState::Replicating);
    assert_eq!(r.health(), v1::Health::Normal, "{:?}", r.health_reasons);
    assert_eq!(r.replica_host, "hv-b");
    assert_eq!(r.last_point_id, "p1");

    // Finalize protection follows.
    let finalize = wait_kind(&mut p, "Finalize protection", "vm1").await;
    assert_eq!(finalize.state(), v1::JobState::Succeeded);

    let points = p.list_points(v1::ListPointsRequest { vm: "vm1".into() }).await.expect("points").into_inner().points;
    assert_eq!(points.len(), 1);
    let ex = p
        .export_point(v1::ExportPointRequest { vm: "vm1".into(), point: "latest".into() })
        .await
        .expect("export")
        .into_inner();
    assert!(ex.uri.starts_with("nbd://"));

    let job = p.resync(v1::ResyncRequest { vm: "vm1".into() }).await.expect("resync").into_inner();
    let done = wait_job(&mut p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    assert!(done.steps[1].detail.contains("64 blocks compared, 3 sent"), "{done:?}");

    let job = p.unprotect(v1::UnprotectRequest { vm: "vm1".into() }).await.expect("unprotect").into_inner();
    let done = wait_job(&mut p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
    let vm = inv.get_vm(v1::GetVmRequest { name: "vm1".into() }).await.expect("vm").into_inner();
    assert!(vm.replication.is_none());
    p.unpair_clouds(v1::UnpairCloudsRequest { source_cloud: "gold-a".into() }).await.expect("unpair");
    p.delete_policy(v1::DeletePolicyRequest { name: "fast".into() }).await.expect("delete policy");

    stop.cancel();
    provider.stop().await;
}
