//! The agent's side of trust, in process on loopback with real certificates of a vault
//! CA made here: the control channel against a fake provider (it must prove the
//! provider role; revocation pushes are applied and kept; the certificate renews itself
//! and the next handshake presents the new one), and the peer listener and the sender's
//! channel (the replica's certificate must name the expected host; revoked and expired
//! certificates are refused, a revocation pushed while a connection is open included).

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use siterecovery_agent::config::{AgentConfig, AgentFiles};
use siterecovery_agent::control::{self, ControlOptions};
use siterecovery_agent::nbd::Exports;
use siterecovery_agent::peer::{self, ConnectError};
use siterecovery_agent::protection::Protection;
use siterecovery_agent::replica::ReplicaSet;
use siterecovery_agent::sender::{GrpcPeer, PeerTransport};
use siterecovery_agent::vm::{Hooks, VmManager};
use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::live::{Expect, LiveIdentity, RevocationList, Trust, serial_of_der, serial_of_pem};
use siterecovery_certs::tls::{ClientAuth, PemIdentity};
use siterecovery_certs::transport::{self, AcceptLimits};
use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::control_server::{Control, ControlServer};
use siterecovery_proto::v1::peer_client::PeerClient;
use siterecovery_proto::v1::provider_message::Command as Push;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

const DEADLINE: Duration = Duration::from_secs(20);
const DAY: Duration = Duration::from_secs(86_400);

fn identity(ca: &VaultCa, role: Role, id: &str) -> PeerIdentity {
    PeerIdentity::new(ca.vault_id().clone(), role, id).expect("identity")
}

/// A certificate for `who` from `ca` valid for `validity`, named for `addr`'s host.
fn issue(ca: &VaultCa, who: &PeerIdentity, addr: &str, validity: Duration) -> PemIdentity {
    let names = ServerNames::for_address(addr).expect("names");
    let (cert_pem, key_pem) = ca.issue_local(who, &names, validity).expect("issue");
    PemIdentity { cert_pem, key_pem }
}

/// A certificate valid from `from` to `to` seconds from now.
fn issue_between(ca: &VaultCa, who: &PeerIdentity, addr: &str, from: i64, to: i64) -> PemIdentity {
    let names = ServerNames::for_address(addr).expect("names");
    let now = time::OffsetDateTime::now_utc();
    let (cert_pem, key_pem) = ca
        .issue_local_between(who, &names, now + time::Duration::seconds(from), now + time::Duration::seconds(to))
        .expect("issue");
    PemIdentity { cert_pem, key_pem }
}

/// `dir` registered as host `id` with `cert`, provider at `provider`, peers at `listen`.
fn register(dir: &Path, ca: &VaultCa, id: &str, provider: &str, listen: &str, cert: &PemIdentity) -> Arc<AgentFiles> {
    let config = AgentConfig {
        host_id: id.into(),
        host_name: id.split('-').next().unwrap_or(id).into(),
        site: "primary".into(),
        cloud: "gold-a".into(),
        vault_id: ca.vault_id().to_string(),
        provider_address: provider.into(),
        listen_address: listen.into(),
        registered_unix: 0,
    };
    AgentFiles::save(dir, &config, ca.cert_pem(), cert).expect("save");
    Arc::new(AgentFiles::load(dir).expect("load"))
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------
// A fake provider: the Control service only.

/// What the fake provider saw and does.
#[derive(Default)]
struct Seen {
    /// The serial of the client certificate of each session, in order.
    sessions: Vec<String>,
    renewals: usize,
}

#[derive(Clone)]
struct FakeProvider {
    ca: Arc<VaultCa>,
    seen: Arc<Mutex<Seen>>,
    /// Pushed when a session opens.
    revoked: (u64, Vec<String>),
}

type Out = Pin<Box<dyn Stream<Item = Result<v1::ProviderMessage, Status>> + Send>>;

fn push(p: Push) -> Result<v1::ProviderMessage, Status> {
    Ok(v1::ProviderMessage { command_id: 0, command: Some(p) })
}

#[tonic::async_trait]
impl Control for FakeProvider {
    type SessionStream = Out;

    async fn session(&self, req: Request<Streaming<v1::AgentMessage>>) -> Result<Response<Out>, Status> {
        let certs = req.peer_certs().ok_or_else(|| Status::unauthenticated("no certificate"))?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no certificate"))?;
        let serial = serial_of_der(leaf.as_ref()).map_err(|e| Status::internal(e.to_string()))?;
        let who = PeerIdentity::from_cert_der(leaf.as_ref()).map_err(|e| Status::internal(e.to_string()))?;
        self.seen.lock().expect("seen").sessions.push(serial);
        let (tx, rx) = mpsc::channel(16);
        let _ = tx
            .send(push(Push::RevocationList(v1::RevocationList {
                version: self.revoked.0,
                serials: self.revoked.1.clone(),
            })))
            .await;
        let (ca, seen, mut inbound) = (self.ca.clone(), self.seen.clone(), req.into_inner());
        tokio::spawn(async move {
            while let Some(Ok(m)) = inbound.next().await {
                if let Some(Body::RenewCertificate(r)) = m.body {
                    let names = ServerNames::for_address("127.0.0.1:1").expect("names");
                    let cert = ca.issue_for_csr(&r.csr_pem, &who, &names, DAY).expect("issue");
                    seen.lock().expect("seen").renewals += 1;
                    let _ = tx
                        .send(push(Push::CertificateIssued(v1::CertificateIssued {
                            certificate_pem: cert,
                            error: String::new(),
                        })))
                        .await;
                    // The session ends after the renewal: the agent reconnects with
                    // the new certificate.
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// Serves `fake` on a fresh loopback port presenting `cert`; returns its address.
async fn serve_fake(ca: &VaultCa, cert: &PemIdentity, fake: FakeProvider, stop: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let trust = Trust {
        vault: ca.vault_id().clone(),
        ca_pem: ca.cert_pem().to_owned(),
        identity: LiveIdentity::new(cert).expect("live"),
        revoked: RevocationList::new(),
    };
    let tls = Arc::new(trust.server_config(ClientAuth::Required, true).expect("tls"));
    let incoming = transport::incoming(listener, tls, AcceptLimits::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ControlServer::new(fake))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
    );
    addr
}

/// A TCP relay to `to` on a fresh loopback port: its address and how many connections
/// it took.
async fn relay(to: &str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let count = Arc::new(AtomicUsize::new(0));
    let (to, c) = (to.to_owned(), count.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut out) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                }
            });
        }
    });
    (addr, count)
}

/// The agent's control channel to the provider at `files`' address, until `stop`.
async fn run_control(root: &Path, files: Arc<AgentFiles>, stop: CancellationToken) {
    let nbd: SocketAddr = "127.0.0.1:9".parse().expect("addr");
    let replicas = Arc::new(ReplicaSet::open(&root.join("replicas")).expect("replicas"));
    let exports = Arc::new(Exports::new());
    let vms = Arc::new(
        VmManager::load(
            files.vms_dir(),
            replicas.clone(),
            exports.clone(),
            nbd,
            siterecovery_agent::files::SocketAccess::default(),
            Hooks::default(),
            stop.clone(),
        )
        .await
        .expect("vms"),
    );
    let protection = Protection::start(files.clone(), vms.clone(), replicas, exports, nbd, None, stop.clone()).await;
    let opts = ControlOptions { heartbeat: Duration::from_millis(200), ..ControlOptions::default() };
    tokio::spawn(control::run(files, vms, protection, opts, stop));
}

#[tokio::test]
async fn the_control_channel_renews_the_certificate_and_keeps_the_revocation_list() {
    siterecovery_certs::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = Arc::new(VaultCa::create(VaultId::generate(), "test").expect("ca"));
    let stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let provider_cert = issue(&ca, &identity(&ca, Role::Provider, "p1"), "127.0.0.1:1", DAY);
    let fake = FakeProvider { ca: ca.clone(), seen: seen.clone(), revoked: (7, vec!["AB01".into(), "cd02".into()]) };
    let addr = serve_fake(&ca, &provider_cert, fake, stop.clone()).await;
    // A certificate past two thirds of its life: renewal is due at once.
    let old = issue_between(&ca, &identity(&ca, Role::Host, "hv1-abc"), "127.0.0.1:1", -100, 60);
    let old_serial = serial_of_pem(&old.cert_pem).expect("serial");
    let dir = tmp.path().join("hv1");
    let files = register(&dir, &ca, "hv1-abc", &addr, "127.0.0.1:1", &old);
    run_control(tmp.path(), files.clone(), stop.clone()).await;

    wait_for("a second session", || seen.lock().expect("seen").sessions.len() >= 2).await;
    let (sessions, renewals) = {
        let s = seen.lock().expect("seen");
        (s.sessions.clone(), s.renewals)
    };
    assert_eq!(renewals, 1, "one renewal expected");
    let new_serial = files.trust.identity.serial().expect("serial");
    assert_ne!(new_serial, old_serial, "the live identity was not replaced");
    assert_eq!(sessions[0], old_serial, "the first session presented another certificate");
    assert_eq!(sessions[1], new_serial, "the reconnect did not present the renewed certificate");
    // Written to the data dir: a restart presents it too.
    let reloaded = AgentFiles::load(&dir).expect("reload");
    assert_eq!(reloaded.trust.identity.serial().expect("serial"), new_serial);
    let (nb, na) = reloaded.trust.identity.validity().expect("validity");
    assert!(na - nb > 3600, "the renewed certificate is not the one issued");
    // The pushed revocation list: applied and kept (in lowercase).
    assert!(files.trust.revoked.is_revoked("ab01") && files.trust.revoked.is_revoked("cd02"));
    assert_eq!(reloaded.trust.revoked.snapshot(), (7, vec!["ab01".to_owned(), "cd02".to_owned()]));
    stop.cancel();
}

#[tokio::test]
async fn the_control_channel_requires_the_provider_role() {
    siterecovery_certs::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = Arc::new(VaultCa::create(VaultId::generate(), "test").expect("ca"));
    let stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(Seen::default()));
    // A host of the vault posing as the provider (its certificate is valid for the name).
    let impostor = issue(&ca, &identity(&ca, Role::Host, "hv9-evil"), "127.0.0.1:1", DAY);
    let fake = FakeProvider { ca: ca.clone(), seen: seen.clone(), revoked: (1, vec![]) };
    let addr = serve_fake(&ca, &impostor, fake, stop.clone()).await;
    let cert = issue(&ca, &identity(&ca, Role::Host, "hv1-abc"), "127.0.0.1:1", DAY);
    let files = register(&tmp.path().join("hv1"), &ca, "hv1-abc", &addr, "127.0.0.1:1", &cert);
    match peer::connect(&addr, Expect::Role(Role::Provider), &files).await {
        Err(ConnectError::WrongPeer { found, .. }) => {
            assert!(found.contains("host/hv9-evil") && found.contains("provider"), "{found}");
        }
        other => panic!("a host certificate passed as the provider: {:?}", other.map(|_| ())),
    }
    // The agent's own control loop, through a relay that counts its connections: it
    // tries again and again, and never opens a session.
    let (relay, tries) = relay(&addr).await;
    let dir = tmp.path().join("hv1");
    let mut config = files.config.clone();
    config.provider_address = relay;
    AgentFiles::save(&dir, &config, ca.cert_pem(), &cert).expect("save");
    let files = Arc::new(AgentFiles::load(&dir).expect("load"));
    run_control(tmp.path(), files, stop.clone()).await;
    wait_for("three connection attempts", || tries.load(Ordering::SeqCst) >= 3).await;
    assert!(seen.lock().expect("seen").sessions.is_empty(), "a session was opened with a host posing as provider");
    stop.cancel();
}

// ---------------------------------------------------------------------------------
// The peer listener and the sender's channel.

/// hv-b's peer listener on a fresh port, and hv-a's data dir (both of vault `ca`).
struct Peers {
    _tmp: tempfile::TempDir,
    ca: VaultCa,
    b_addr: String,
    a: Arc<AgentFiles>,
    b: Arc<AgentFiles>,
    stop: CancellationToken,
}

async fn peers() -> Peers {
    siterecovery_certs::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = VaultCa::create(VaultId::generate(), "test").expect("ca");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let b_addr = listener.local_addr().expect("addr").to_string();
    let b_cert = issue(&ca, &identity(&ca, Role::Host, "hv-b-id"), &b_addr, DAY);
    let b = register(&tmp.path().join("b"), &ca, "hv-b-id", "127.0.0.1:1", &b_addr, &b_cert);
    let a_cert = issue(&ca, &identity(&ca, Role::Host, "hv-a-id"), "127.0.0.1:1", DAY);
    let a = register(&tmp.path().join("a"), &ca, "hv-a-id", "127.0.0.1:1", "127.0.0.1:1", &a_cert);
    let replicas = Arc::new(ReplicaSet::open(&tmp.path().join("b").join("replicas")).expect("replicas"));
    let stop = CancellationToken::new();
    let health = siterecovery_proto::lifecycle::Lifecycle::starting(&[]).await.health_service();
    tokio::spawn(peer::serve(b.clone(), replicas, listener, health, stop.clone()));
    Peers { _tmp: tmp, ca, b_addr, a, b, stop }
}

async fn ping(ch: tonic::transport::Channel) -> Result<v1::PingResponse, Status> {
    PeerClient::new(ch).ping(v1::PingRequest {}).await.map(|r| r.into_inner())
}

/// A client with `cert` (of any CA) trusting `ca_pem`, dialling `addr`: its ping's
/// result, the whole error text when it failed (at the handshake or at the call).
async fn ping_as(p: &Peers, ca_pem: &str, cert: &PemIdentity) -> Result<v1::PingResponse, String> {
    let trust = Trust {
        vault: p.ca.vault_id().clone(),
        ca_pem: ca_pem.to_owned(),
        identity: LiveIdentity::new(cert).expect("live"),
        revoked: RevocationList::new(),
    };
    let cfg = trust.client_config(Expect::Host("hv-b-id".into()), true).expect("client config");
    let connector = transport::TlsConnector::new(&p.b_addr, Arc::new(cfg)).expect("connector");
    let ch = transport::connect(transport::endpoint(&p.b_addr).expect("endpoint"), connector)
        .await
        .map_err(|e| peer::client::chain(&e))?;
    ping(ch).await.map_err(|s| format!("{:?}: {}", s.code(), peer::client::chain(&s)))
}

#[tokio::test]
async fn the_sender_requires_the_replica_host_named_by_the_relationship() {
    let p = peers().await;
    // The right host id: the channel opens and the replica answers.
    let mut right = GrpcPeer::new(p.b_addr.clone(), "hv-b-id".parse().expect("host id"), p.a.clone());
    let r = right.copy_progress(v1::CopyProgressRequest { relationship_id: "r-0000abcd".into() }).await;
    let e = r.expect_err("no such relationship");
    assert!(e.to_string().contains("NotFound") || e.to_string().contains("no replica"), "{e}");
    // Another host id: refused at the handshake, naming both, before any call.
    let mut wrong = GrpcPeer::new(p.b_addr.clone(), "hv-c-id".parse().expect("host id"), p.a.clone());
    let e = wrong
        .copy_progress(v1::CopyProgressRequest { relationship_id: "r-0000abcd".into() })
        .await
        .expect_err("a replica of another host id was accepted");
    let text = e.to_string();
    assert!(text.contains("hv-c-id") && text.contains("host/hv-b-id"), "{text}");
    assert!(matches!(e, siterecovery_agent::sender::ReplicationError::WrongPeer { .. }), "{e:?}");
    p.stop.cancel();
}

#[tokio::test]
async fn the_peer_listener_refuses_revoked_expired_and_foreign_certificates() {
    let p = peers().await;
    let ca_pem = p.ca.cert_pem().to_owned();
    // Control: hv-a's certificate passes, and the callee reads it.
    let pong = ping_as(&p, &ca_pem, &p.a.identity()).await.expect("hv-a pings hv-b");
    assert_eq!(pong.host_id, "hv-b-id");
    assert!(pong.caller.ends_with("/host/hv-a-id"), "{pong:?}");
    // Expired, and of another vault (same host id): refused at the handshake.
    let expired = issue_between(&p.ca, &identity(&p.ca, Role::Host, "hv-a-id"), "127.0.0.1:1", -100, -10);
    let e = ping_as(&p, &ca_pem, &expired).await.expect_err("an expired certificate passed");
    assert!(e.to_lowercase().contains("expired"), "{e}");
    let other = VaultCa::create(VaultId::generate(), "other").expect("ca");
    let foreign = issue(&other, &identity(&other, Role::Host, "hv-a-id"), "127.0.0.1:1", DAY);
    let e = ping_as(&p, &ca_pem, &foreign).await.expect_err("another vault's certificate passed");
    assert!(e.contains("UnknownCA") || e.to_lowercase().contains("unknown"), "{e}");

    // A connection opened before the revocation...
    let before = peer::connect(&p.b_addr, Expect::Host("hv-b-id".into()), &p.a).await.expect("connect");
    ping(before.clone()).await.expect("ping before the revocation");
    let serial = p.a.trust.identity.serial().expect("serial");
    assert!(p.b.apply_revocations(1, vec![serial.clone()]).expect("revoke"));
    // ...is refused at its next call; a new one at the handshake.
    let s = ping(before).await.expect_err("a revoked certificate's open connection still called");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("revoked") && s.message().contains(&serial), "{}", s.message());
    let e = ping_as(&p, &ca_pem, &p.a.identity()).await.expect_err("a revoked certificate passed the handshake");
    assert!(e.contains("Revoked") || e.contains("revoked"), "{e}");
    p.stop.cancel();
}

// ---------------------------------------------------------------------------------
// `agent register --reregister` against a fake Registration service.

use siterecovery_agent::register::{RegisterArgs, RegisterError, register as do_register};
use siterecovery_certs::VaultKeyFile;
use siterecovery_proto::v1::registration_server::{Registration, RegistrationServer};

/// A Registration service that issues `host/<id>` for any request (refusing them all
/// when `refuse`), recording the serial of the client certificate of each call.
#[derive(Clone)]
struct FakeRegistration {
    ca: Arc<VaultCa>,
    id: String,
    refuse: bool,
    calls: Arc<Mutex<Vec<Option<String>>>>,
}

#[tonic::async_trait]
impl Registration for FakeRegistration {
    async fn register(&self, req: Request<v1::RegisterRequest>) -> Result<Response<v1::RegisterResponse>, Status> {
        let serial = req.peer_certs().and_then(|c| c.first().and_then(|l| serial_of_der(l.as_ref()).ok()));
        self.calls.lock().expect("calls").push(serial);
        if self.refuse {
            return Err(Status::permission_denied("host hv1 is already registered"));
        }
        let names = ServerNames::for_address("127.0.0.1:1").expect("names");
        let cert = self
            .ca
            .issue_for_csr(&req.get_ref().csr_pem, &identity(&self.ca, Role::Host, &self.id), &names, DAY)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(v1::RegisterResponse {
            host_id: self.id.clone(),
            certificate_pem: cert,
            vault_id: self.ca.vault_id().to_string(),
        }))
    }
}

/// Serves `fake` (client certificates optional, `revoked` refused) on a fresh port.
async fn serve_registration(fake: FakeRegistration, revoked: &[String], stop: CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let cert = issue(&fake.ca, &identity(&fake.ca, Role::Provider, "provider"), &addr, DAY);
    let list = RevocationList::new();
    list.replace(1, revoked.iter().cloned());
    let trust = Trust {
        vault: fake.ca.vault_id().clone(),
        ca_pem: fake.ca.cert_pem().to_owned(),
        identity: LiveIdentity::new(&cert).expect("live"),
        revoked: list,
    };
    let tls = Arc::new(trust.server_config(ClientAuth::Optional, true).expect("tls"));
    let incoming = transport::incoming(listener, tls, AcceptLimits::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(fake))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
    );
    addr
}

/// The credential files of `dir`.
fn credential_files(dir: &Path) -> Vec<String> {
    ["agent.json", "ca.pem", "host.pem", "host.key"]
        .iter()
        .map(|n| std::fs::read_to_string(dir.join(n)).expect("read"))
        .collect()
}

async fn reregister(dir: &Path, key: &Path) -> Result<AgentConfig, RegisterError> {
    do_register(RegisterArgs {
        vault_key: key,
        host: "hv1",
        site: "primary",
        cloud: "gold-a",
        data_dir: dir,
        listen: "127.0.0.1:1",
        reregister: true,
        ca_fingerprint: None,
    })
    .await
}

#[tokio::test]
async fn reregister_presents_the_current_certificate_and_goes_without_a_refused_one() {
    siterecovery_certs::tls::install_crypto_provider();
    let tmp = tempfile::tempdir().expect("tmp");
    let ca = Arc::new(VaultCa::create(VaultId::generate(), "test").expect("ca"));
    let stop = CancellationToken::new();
    let dir = tmp.path().join("hv1");
    let current = issue(&ca, &identity(&ca, Role::Host, "hv1-abc"), "127.0.0.1:1", DAY);
    let serial = serial_of_pem(&current.cert_pem).expect("serial");
    let calls = Arc::new(Mutex::new(Vec::new()));
    let fake = |refuse| FakeRegistration { ca: ca.clone(), id: "hv1-abc".into(), refuse, calls: calls.clone() };
    let key_for = |addr: &str, name: &str| {
        let path = tmp.path().join(name);
        let k = VaultKeyFile::new(&ca, "test", addr, "s3cret", siterecovery_certs::unix_now() + 600).expect("key");
        k.write(&path).expect("write key");
        path
    };

    // 1. The current certificate is presented; the new credentials replace it.
    let addr = serve_registration(fake(false), &[], stop.clone()).await;
    let key = key_for(&addr, "a.key");
    register(&dir, &ca, "hv1-abc", &addr, "127.0.0.1:1", &current);
    reregister(&dir, &key).await.expect("re-register");
    assert_eq!(calls.lock().expect("calls").clone(), vec![Some(serial.clone())], "the current certificate");
    let renewed = AgentFiles::load(&dir).expect("load");
    assert_ne!(renewed.trust.identity.serial().expect("serial"), serial, "the credentials were not replaced");

    // 2. Refused: the credentials stay as they were.
    calls.lock().expect("calls").clear();
    let before = credential_files(&dir);
    let addr = serve_registration(fake(true), &[], stop.clone()).await;
    let key = key_for(&addr, "b.key");
    let e = reregister(&dir, &key).await.expect_err("refused");
    assert!(matches!(e, RegisterError::Refused(_)), "{e:?}");
    assert_eq!(credential_files(&dir), before, "a refused re-registration changed the credentials");

    // 3. The current certificate revoked (an operator's host reset): the request goes
    //    again without it.
    calls.lock().expect("calls").clear();
    register(&dir, &ca, "hv1-abc", &addr, "127.0.0.1:1", &current);
    let addr = serve_registration(fake(false), std::slice::from_ref(&serial), stop.clone()).await;
    let key = key_for(&addr, "c.key");
    reregister(&dir, &key).await.expect("re-register without the revoked certificate");
    assert_eq!(calls.lock().expect("calls").clone(), vec![None], "the revoked certificate reached the service");

    // 4. Expired: not even presented.
    calls.lock().expect("calls").clear();
    let expired = issue_between(&ca, &identity(&ca, Role::Host, "hv1-abc"), "127.0.0.1:1", -100, -10);
    register(&dir, &ca, "hv1-abc", &addr, "127.0.0.1:1", &expired);
    let key = key_for(&addr, "d.key");
    reregister(&dir, &key).await.expect("re-register without the expired certificate");
    assert_eq!(calls.lock().expect("calls").clone(), vec![None]);
    stop.cancel();
}
