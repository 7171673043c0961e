//! In-process: a provider on 127.0.0.1:0 with real certificates, two fake agents on the
//! control channel, and the operator's Protection API: policy, pairing, protect driven
//! by replication statuses, health, finalize, resync, unprotect.

use std::time::Duration;

use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::{PeerIdentity, Role};
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::control_client::ControlClient;
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::protection_client::ProtectionClient;
use siterecovery_proto::v1::provider_message::Command;
use siterecovery_provider::cli::{self, OperatorCerts};
use siterecovery_provider::inventory::HostRecord;
use siterecovery_provider::relationship::ProtectionConfig;
use siterecovery_provider::store::{HOSTS, Store};
use siterecovery_provider::{api, vault};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const GIB: u64 = 1 << 30;

/// A fake agent: answers every command with ok; on StartReplication reports initial
/// progress then `replicating`; on RequestResync reports a resync; ListPoints → one point.
async fn fake_agent(addr: String, ca_pem: String, cert: (String, String), vm: Option<v1::Vm>, stop: CancellationToken) {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .identity(Identity::from_pem(&cert.0, &cert.1))
        .domain_name("127.0.0.1");
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .expect("agent connect");
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(64);
    let send = |b: Body| v1::AgentMessage { body: Some(b) };
    tx.send(send(Body::Hello(v1::Hello { agent_version: "fake".into(), listen_address: String::new() })))
        .await
        .expect("hello");
    tx.send(send(Body::Inventory(v1::InventoryReport { vms: vm.into_iter().collect(), free_bytes: 100 * GIB })))
        .await
        .expect("inventory");
    let mut inbound = ControlClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("session")
        .into_inner();
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = stop.cancelled() => return,
        };
        let Ok(Some(m)) = msg else { return };
        let mut result = v1::CommandResult { command_id: m.command_id, ok: true, ..Default::default() };
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
                tx.send(send(Body::Result(result))).await.expect("result");
                for (st, done, p) in [("initial", 0, false), ("initial", GIB, false), ("replicating", 2 * GIB, true)] {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let mut x = status(st, done, p);
                    x.relationship_id = s.relationship_id.clone();
                    tx.send(send(Body::Replication(x))).await.expect("status");
                }
                continue;
            }
            Some(Command::RequestResync(s)) => {
                tx.send(send(Body::Result(result))).await.expect("result");
                for st in ["resynchronising", "replicating"] {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let mut x = status(st, 0, true);
                    x.relationship_id = s.relationship_id.clone();
                    tx.send(send(Body::Replication(x))).await.expect("status");
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
        tx.send(send(Body::Result(result))).await.expect("result");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

async fn wait_job(p: &mut ProtectionClient<tonic::transport::Channel>, id: &str) -> v1::Job {
    let mut s = p.watch_job(v1::GetJobRequest { id: id.into() }).await.expect("watch").into_inner();
    let mut last = None;
    while let Some(j) =
        tokio::time::timeout(Duration::from_secs(30), s.message()).await.expect("job stalled").expect("stream")
    {
        last = Some(j);
    }
    last.expect("a job")
}

#[tokio::test]
async fn protect_resync_unprotect_with_fake_agents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("provider");
    let v = vault::create(&data, "test", "127.0.0.1:1", &dir.path().join("vault.key"), Duration::from_secs(600))
        .expect("vault");
    let vault_id = v.info.vault_id.clone();
    let ca_pem = v.ca.cert_pem().to_owned();
    let opdir = dir.path().join("op");
    v.issue_operator_cert(&opdir, "op", Duration::from_secs(3600)).expect("operator cert");
    let store = Store::open(&data).expect("store");
    let mut host_certs = Vec::new();
    for (name, site, cloud) in [("hv-a", "primary", "gold-a"), ("hv-b", "secondary", "gold-b")] {
        let id = PeerIdentity::new(vault_id.clone(), Role::Host, format!("{name}-id")).expect("identity");
        host_certs.push(v.ca.issue_local(&id, &ServerNames::default(), Duration::from_secs(3600)).expect("host cert"));
        let rec = HostRecord {
            id: format!("{name}-id").parse().expect("host id"),
            name: name.parse().expect("host name"),
            site: site.parse().expect("site"),
            cloud: cloud.parse().expect("cloud"),
            address: format!("127.0.0.1:{}", if name == "hv-a" { 9001 } else { 9002 }),
            agent_version: "fake".into(),
            registered_unix_ms: now_ms(),
        };
        store.put(HOSTS, name, &rec).expect("host");
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(api::serve_with(
        v,
        store,
        listener,
        shutdown.clone(),
        Duration::from_secs(1),
        ProtectionConfig::for_tests(),
    ));
    let vm = v1::Vm {
        name: "vm1".into(),
        disks: vec![v1::Disk { id: "disk0".into(), size_bytes: 2 * GIB, ..Default::default() }],
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let [a, b]: [(String, String); 2] = host_certs.try_into().expect("two");
    tokio::spawn(fake_agent(addr.clone(), ca_pem.clone(), a, Some(vm), stop.clone()));
    tokio::spawn(fake_agent(addr.clone(), ca_pem.clone(), b, None, stop.clone()));

    let certs = OperatorCerts::load(&opdir).expect("op certs");
    let ch = cli::connect(&addr, &certs).await.expect("connect");
    let mut inv = InventoryClient::new(ch.clone());
    let mut p = ProtectionClient::new(ch);
    // Wait for both hosts and the VM.
    for _ in 0..100 {
        let hosts = inv.list_hosts(v1::ListHostsRequest {}).await.expect("hosts").into_inner().hosts;
        let vms = inv.list_vms(v1::ListVmsRequest::default()).await.expect("vms").into_inner().vms;
        if hosts.iter().all(|h| h.connected) && !vms.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
    let e = p
        .pair_clouds(v1::CloudPairing {
            source_cloud: "gold-a".into(),
            target_cloud: "gold-a".into(),
            policy: "fast".into(),
        })
        .await
        .expect_err("self");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    p.pair_clouds(v1::CloudPairing {
        source_cloud: "gold-a".into(),
        target_cloud: "gold-b".into(),
        policy: "fast".into(),
    })
    .await
    .expect("pair");
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
    let mut finalize = None;
    for _ in 0..100 {
        let jobs = p.list_jobs(v1::ListJobsRequest {}).await.expect("jobs").into_inner().jobs;
        if let Some(j) = jobs.into_iter().find(|j| {
            siterecovery_provider::job::kind_name(j.kind) == "Finalize protection" && j.state() != v1::JobState::Running
        }) {
            finalize = Some(j);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(finalize.expect("finalize job").state(), v1::JobState::Succeeded);

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
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}
