//! A session's loop against a fake provider: the revocation list pushed and a revoked
//! session ending, renewal rebinding the session, a stale session's writes refused,
//! floods kept off the disk.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};
use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::provider_message::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::binding::Binding;
use super::session::Session;
use super::{ControlContext, ReplicationReport, Sessions, WriteLimits};
use crate::inventory::{HostRecord, RelationshipHosts, VmRecord};
use crate::store::{HOSTS, Store, VMS};
use crate::trust::{Revocations, RevokedRecord};

struct Fake {
    vault: VaultId,
    store: Store,
    sessions: Sessions,
    ca: VaultCa,
    revocations: Revocations,
    shutdown: CancellationToken,
    inventories: Mutex<Vec<Vec<VmRecord>>>,
    limits: WriteLimits,
    _dir: tempfile::TempDir,
}

impl ControlContext for Fake {
    fn vault_id(&self) -> &VaultId {
        &self.vault
    }
    fn store(&self) -> &Store {
        &self.store
    }
    fn sessions(&self) -> &Sessions {
        &self.sessions
    }
    fn ca(&self) -> &VaultCa {
        &self.ca
    }
    fn revocations(&self) -> &Revocations {
        &self.revocations
    }
    fn cert_validity(&self) -> Duration {
        Duration::from_secs(60)
    }
    fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }
    fn on_inventory(&self, _host: &HostRecord, vms: &[VmRecord]) {
        if let Ok(mut i) = self.inventories.lock() {
            i.push(vms.to_vec());
        }
    }
    fn on_replication(&self, _host: &HostRecord, _report: &ReplicationReport) {}
    fn relationship_hosts(&self, _vm: &VmName) -> Option<RelationshipHosts> {
        None
    }
    fn write_limits(&self) -> WriteLimits {
        self.limits
    }
}

const HOST_ID: &str = "hv1-0a0a0a";

/// Polls `f` until it holds, for at most 10 s.
async fn eventually(f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met in 10 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn vm(name: &str, pending: u64) -> v1::Vm {
    v1::Vm {
        name: name.into(),
        disks: vec![v1::Disk { id: "disk0".into(), size_bytes: 512, pending_log_bytes: pending, ..Default::default() }],
        ..Default::default()
    }
}

/// A provider with host hv1 registered (its current certificate's serial `aa01`) and
/// VM vm1 placed on it.
fn fake(limits: WriteLimits) -> Arc<Fake> {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("store");
    let vault = VaultId::generate();
    let host: HostRecord = serde_json::from_value(serde_json::json!({
        "id": HOST_ID, "name": "hv1", "site": "s", "cloud": "c", "address": "127.0.0.1:7001",
        "agent_version": "0", "registered_unix_ms": 1, "cert_serial": "aa01",
    }))
    .expect("host");
    store.put(HOSTS, "hv1", &host).expect("host");
    let placed = VmRecord::from_report(&vm("vm1", 0), &host.id).expect("vm");
    store.put(VMS, "vm1", &placed).expect("vm");
    let revocations = Revocations::load(&store).expect("revocations");
    Arc::new(Fake {
        ca: VaultCa::create(vault.clone(), "t").expect("ca"),
        vault,
        store,
        sessions: Sessions::new(),
        revocations,
        shutdown: CancellationToken::new(),
        inventories: Mutex::new(vec![]),
        limits,
        _dir: dir,
    })
}

/// A running session of hv1 bound to `serial`: what the agent sends, what it receives.
struct Agent {
    tx: mpsc::Sender<Result<v1::AgentMessage, Status>>,
    rx: mpsc::Receiver<Result<v1::ProviderMessage, Status>>,
    done: tokio::task::JoinHandle<()>,
}

fn open(state: &Arc<Fake>, serial: &str) -> Agent {
    open_until(state, serial, 0)
}

/// [`open`] with the certificate expiring at `expires_unix_ms`.
fn open_until(state: &Arc<Fake>, serial: &str, expires_unix_ms: i64) -> Agent {
    let (binding, host) = Binding::open(&state.store, HOST_ID, serial, 0).expect("bound");
    let (out_tx, rx) = mpsc::channel(64);
    let (epoch, pending) = state.sessions.open(&host.id, out_tx.clone(), CancellationToken::new());
    let (tx, in_rx) = mpsc::channel(64);
    let session = Session::new(state.clone(), binding, host, epoch, pending, out_tx, expires_unix_ms);
    let done = tokio::spawn(session.run(tokio_stream::wrappers::ReceiverStream::new(in_rx)));
    Agent { tx, rx, done }
}

impl Agent {
    async fn send(&self, body: Body) {
        self.tx.send(Ok(v1::AgentMessage { body: Some(body) })).await.expect("send");
    }

    async fn next(&mut self) -> Result<v1::ProviderMessage, Status> {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await.expect("a message in time").expect("open")
    }

    async fn revocation_list(&mut self) -> v1::RevocationList {
        match self.next().await.expect("a push").command {
            Some(Command::RevocationList(l)) => l,
            other => panic!("not a revocation list: {other:?}"),
        }
    }

    /// Waits for the session's end.
    async fn ended(self) {
        tokio::time::timeout(Duration::from_secs(10), self.done).await.expect("ended in time").expect("joined");
    }
}

fn host(state: &Fake) -> HostRecord {
    state.store.get(HOSTS, "hv1").expect("get").expect("host")
}

#[tokio::test]
async fn the_revocation_list_is_pushed_and_a_revoked_session_ends() {
    let state = fake(WriteLimits::default());
    let mut agent = open(&state, "aa01");
    let first = agent.revocation_list().await;
    assert!(first.serials.is_empty());
    let revoke = |serial: &str| RevokedRecord {
        serial: serial.into(),
        host_id: HOST_ID.parse().expect("id"),
        host_name: "hv1".parse().expect("name"),
        revoked_unix_ms: 1,
        reason: "test".into(),
    };
    // Another certificate revoked: the session hears of it and goes on.
    state.revocations.revoke(&state.store, revoke("bb02")).expect("revoke");
    let second = agent.revocation_list().await;
    assert!(second.version > first.version);
    assert_eq!(second.serials, vec!["bb02".to_string()]);
    // Its own certificate revoked: the list, then the end with PermissionDenied.
    state.revocations.revoke(&state.store, revoke("aa01")).expect("revoke");
    assert!(agent.revocation_list().await.serials.contains(&"aa01".to_string()));
    let end = agent.next().await.expect_err("the session ends");
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    assert!(end.message().contains("revoked"), "{}", end.message());
    agent.ended().await;
    assert!(!state.sessions.status(HOST_ID).connected);
}

#[tokio::test]
async fn renewal_issues_the_same_identity_and_rebinds_the_session() {
    let state = fake(WriteLimits::default());
    let mut agent = open(&state, "aa01");
    agent.revocation_list().await;
    let csr = siterecovery_certs::csr::make_csr("hv1").expect("csr");
    agent.send(Body::RenewCertificate(v1::RenewCertificate { csr_pem: csr.csr_pem.clone() })).await;
    let issued = match agent.next().await.expect("answer").command {
        Some(Command::CertificateIssued(c)) => c,
        other => panic!("not a certificate: {other:?}"),
    };
    assert!(issued.error.is_empty(), "{}", issued.error);
    let der = siterecovery_certs::ca::first_cert_der(&issued.certificate_pem).expect("der");
    let id = PeerIdentity::from_cert_der(&der).expect("identity");
    assert_eq!((id.role, id.id.as_str()), (Role::Host, HOST_ID));
    let serial = siterecovery_certs::live::serial_of_pem(&issued.certificate_pem).expect("serial");
    let rec = host(&state);
    assert_eq!(rec.cert_serial, serial, "the host record holds the new serial");
    assert!(rec.cert_not_after_unix_ms > crate::jobs::now_ms());
    let (nb, na) = siterecovery_certs::ca::validity(&issued.certificate_pem).expect("validity");
    assert!(na - nb <= 66, "validity is the provider's setting, {}s", na - nb);
    let pair =
        siterecovery_certs::tls::PemIdentity { cert_pem: issued.certificate_pem.clone(), key_pem: csr.key_pem.clone() };
    siterecovery_certs::live::LiveIdentity::new(&pair).expect("issued for the CSR's key");
    // The session writes on under the new serial (a Hello moving the address).
    agent.send(Body::Hello(v1::Hello { agent_version: "2".into(), listen_address: "127.0.0.1:7009".into() })).await;
    eventually(|| host(&state).address == "127.0.0.1:7009").await;
    // Once the new certificate opened a session, the old one opens none any more
    // (before that it could, once: a host that never got the new one).
    assert_eq!(host(&state).prev_cert_serial, "aa01");
    Binding::open(&state.store, HOST_ID, &serial, 0).expect("the new certificate opens a session");
    assert!(Binding::open(&state.store, HOST_ID, "aa01", 0).is_err());
    // Renewals are limited per session.
    for _ in 0..super::renew::MAX_PER_MINUTE {
        agent.send(Body::RenewCertificate(v1::RenewCertificate { csr_pem: csr.csr_pem.clone() })).await;
    }
    let mut last = String::new();
    for _ in 0..super::renew::MAX_PER_MINUTE {
        if let Some(Command::CertificateIssued(c)) = agent.next().await.expect("answer").command {
            last = c.error;
        }
    }
    assert!(last.contains("too many"), "{last}");
}

#[tokio::test]
async fn a_stale_session_never_writes_the_host_record_back() {
    let state = fake(WriteLimits::default());
    let mut agent = open(&state, "aa01");
    agent.revocation_list().await;
    // The host renewed elsewhere (or was reset): the record has moved on.
    let mut moved = host(&state);
    moved.cert_serial = "cc03".into();
    moved.address = "127.0.0.1:7003".into();
    state.store.put(HOSTS, "hv1", &moved).expect("put");
    agent.send(Body::Hello(v1::Hello { agent_version: "1".into(), listen_address: "127.0.0.1:7005".into() })).await;
    let end = agent.next().await.expect_err("refused");
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    agent.ended().await;
    assert_eq!(host(&state), moved, "the stale session wrote the record back");
    // Nor an inventory.
    let mut again = open_stale(&state);
    again.revocation_list().await;
    again.send(Body::Inventory(v1::InventoryReport { vms: vec![], free_bytes: 1 })).await;
    assert_eq!(again.next().await.expect_err("refused").code(), tonic::Code::PermissionDenied);
    assert!(state.store.get::<VmRecord>(VMS, "vm1").expect("get").is_some(), "the VM was deleted");
}

/// A session bound to serial `aa01` after the record moved on (as if opened before).
fn open_stale(state: &Arc<Fake>) -> Agent {
    let binding =
        Binding { name: "hv1".parse().expect("name"), id: HOST_ID.parse().expect("id"), serial: "aa01".into() };
    let rec = host(state);
    let (out_tx, rx) = mpsc::channel(64);
    let (epoch, pending) = state.sessions.open(&rec.id, out_tx.clone(), CancellationToken::new());
    let (tx, in_rx) = mpsc::channel(64);
    let session = Session::new(state.clone(), binding, rec, epoch, pending, out_tx, 0);
    let done = tokio::spawn(session.run(tokio_stream::wrappers::ReceiverStream::new(in_rx)));
    Agent { tx, rx, done }
}

/// 2000 inventory reports as fast as the agent can send them, each with new counters
/// and every other one with a change: a handful of store writes, and the last report
/// is the one recorded.
#[tokio::test]
async fn an_inventory_flood_is_written_by_the_clock() {
    let limits = WriteLimits { min_gap: Duration::from_millis(200), refresh: Duration::from_secs(5) };
    let state = fake(limits);
    let mut agent = open(&state, "aa01");
    agent.revocation_list().await;
    let before = state.store.writes();
    let started = std::time::Instant::now();
    let n = 2000u64;
    for i in 0..n {
        let mut v = vm("vm1", i);
        v.power_state = if i % 2 == 0 { v1::PowerState::Running } else { v1::PowerState::Off }.into();
        // Heartbeats in between: memory only.
        agent.send(Body::Heartbeat(v1::Heartbeat { seq: i, free_bytes: i })).await;
        agent.send(Body::Inventory(v1::InventoryReport { vms: vec![v], free_bytes: i })).await;
    }
    let last = n - 1;
    eventually(|| {
        state.store.get::<VmRecord>(VMS, "vm1").ok().flatten().is_some_and(|v| v.disks[0].pending_log_bytes == last)
    })
    .await;
    let writes = state.store.writes() - before;
    let bound = 2 + started.elapsed().as_millis() / limits.min_gap.as_millis();
    assert!((writes as u128) <= bound, "{writes} writes for {n} reports (bound {bound})");
    assert_eq!(state.sessions.status(HOST_ID).free_bytes, last, "heartbeat fields are current in memory");
    // A report of a VM nobody placed on hv1 is refused, not recorded.
    agent
        .send(Body::Inventory(v1::InventoryReport { vms: vec![vm("vm1", last), vm("intruder", 0)], free_bytes: 0 }))
        .await;
    eventually(|| state.inventories.lock().map(|i| i.len()).unwrap_or(0) > 0).await;
    assert!(state.store.get::<VmRecord>(VMS, "intruder").expect("get").is_none());
}

#[tokio::test]
async fn a_session_ends_when_its_certificate_expires() {
    let state = fake(WriteLimits::default());
    let mut agent = open_until(&state, "aa01", crate::jobs::now_ms() + 300);
    agent.revocation_list().await;
    let end = agent.next().await.expect_err("the session ends");
    assert_eq!(end.code(), tonic::Code::PermissionDenied, "{end:?}");
    assert!(end.message().contains("expired"), "{}", end.message());
    agent.ended().await;
}

#[test]
fn a_new_session_of_a_host_ends_the_one_before() {
    let sessions = super::sessions::Sessions::new();
    let id: siterecovery_proto::model::HostId = "hv1-0a0a0a".parse().expect("id");
    let (tx1, _rx1) = mpsc::channel(1);
    let first = CancellationToken::new();
    let (epoch1, _) = sessions.open(&id, tx1, first.clone());
    assert!(!first.is_cancelled());
    let (tx2, _rx2) = mpsc::channel(1);
    let second = CancellationToken::new();
    sessions.open(&id, tx2, second.clone());
    assert!(first.is_cancelled(), "the replaced session was not told to end");
    assert!(!second.is_cancelled());
    // The replaced session's cleanup leaves the new one connected.
    sessions.close(&id, epoch1);
    assert!(sessions.status(&id).connected);
}
