//! Set-up shared by the provider's in-process tests: a provider on `127.0.0.1:0` with a
//! vault and real certificates made here, hosts `hv-a` (site primary, cloud gold-a) and
//! `hv-b` (site secondary, cloud gold-b) registered in its store, the operator's
//! clients, and the plumbing of a fake agent's control session (Hello and inventory
//! sent, commands received, results sent back). What a fake agent answers is each
//! test file's own.
//!
//! Every wait here is a poll with a deadline, or a stream read with a timeout.

// Each test file uses its own part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::live::{Expect, LiveIdentity, RevocationList, client_config_with};
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::transport::{self, TlsConnector};
use siterecovery_certs::{PeerIdentity, Role};
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::control_client::ControlClient;
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::protection_client::ProtectionClient;
use siterecovery_provider::cli::{self, OperatorCerts};
use siterecovery_provider::inventory::{HostRecord, VmRecord};
use siterecovery_provider::relationship::ProtectionConfig;
use siterecovery_provider::store::{HOSTS, REVOKED, Store, VMS};
use siterecovery_provider::trust::RevokedRecord;
use siterecovery_provider::{api, vault};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub const GIB: u64 = 1 << 30;
/// Longest wait for the provider to see what a test set up (hosts, VMs, a job).
pub const DEADLINE: Duration = Duration::from_secs(30);
/// The hosts of every test: (name, site, cloud).
pub const TEST_HOSTS: [(&str, &str, &str); 2] = [("hv-a", "primary", "gold-a"), ("hv-b", "secondary", "gold-b")];

/// A host's certificate and key (PEM).
pub type HostCert = (String, String);

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// How [`TestProvider::start_options`] sets the provider up.
pub struct Options {
    /// VMs placed on hosts (host index, VM).
    pub placed: Vec<(usize, v1::Vm)>,
    /// `serve --cert-validity`.
    pub cert_validity: Duration,
    /// Replace the provider's certificate by one due for renewal after this long.
    pub provider_renewal_due_in: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Self { placed: vec![], cert_validity: Duration::from_secs(3600), provider_renewal_due_in: None }
    }
}

/// A provider serving in this process.
pub struct TestProvider {
    _tmp: tempfile::TempDir,
    /// The test's temp dir (the provider's data is in `provider/` below it).
    pub dir: PathBuf,
    pub addr: String,
    pub ca_pem: String,
    /// Certificates of hv-a and hv-b, in that order.
    pub host_certs: [HostCert; 2],
    /// The operator's certificate (the one in the OPDIR).
    pub op_cert: HostCert,
    /// The provider's own certificate (its data dir's).
    pub provider_cert: HostCert,
    /// An operator certificate whose serial is in the provider's revocation list.
    pub revoked_cert: HostCert,
    /// An operator certificate that expired yesterday.
    pub expired_cert: HostCert,
    /// The provider's scripts directory (plan scripts are named in it).
    pub scripts_dir: PathBuf,
    opdir: PathBuf,
    pub shutdown: CancellationToken,
    server: JoinHandle<Result<(), api::ServeError>>,
}

impl TestProvider {
    /// A vault, an operator certificate, hv-a (address 127.0.0.1:9001) and hv-b
    /// (127.0.0.1:9002) registered, and the provider serving with the test intervals.
    pub async fn start() -> Self {
        Self::start_with(vec![]).await
    }

    /// [`TestProvider::start`] with VMs already placed on hosts (host index, VM), as
    /// `vm create` would have recorded them: a host's report updates only VMs placed
    /// on it.
    pub async fn start_with(placed: Vec<(usize, v1::Vm)>) -> Self {
        Self::start_options(Options { placed, ..Options::default() }).await
    }

    /// [`TestProvider::start`] as `options` say.
    pub async fn start_options(options: Options) -> Self {
        let Options { placed, cert_validity, provider_renewal_due_in } = options;
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let data = dir.join("provider");
        let v = vault::create(&data, "test", "127.0.0.1:1", &dir.join("vault.key"), Duration::from_secs(600))
            .expect("vault");
        let vault_id = v.info.vault_id.clone();
        let ca_pem = v.ca.cert_pem().to_owned();
        let opdir = dir.join("op");
        v.issue_operator_cert(&opdir, "op", Duration::from_secs(3600)).expect("operator cert");
        let mut v = v;
        if let Some(due) = provider_renewal_due_in {
            // A provider certificate 60 s long, two thirds of it over `due` from now.
            let id = PeerIdentity::new(vault_id.clone(), Role::Provider, "provider").expect("identity");
            let now = time::OffsetDateTime::now_utc();
            let nb = now + time::Duration::try_from(due).expect("due") - time::Duration::seconds(40);
            let names = ServerNames::for_address("127.0.0.1:1").expect("names");
            let (cert, key) =
                v.ca.issue_local_between(&id, &names, nb, nb + time::Duration::seconds(60)).expect("cert");
            std::fs::write(data.join("provider.pem"), &cert).expect("provider.pem");
            std::fs::write(data.join("provider.key"), &key).expect("provider.key");
            v.provider_identity = siterecovery_certs::tls::PemIdentity { cert_pem: cert, key_pem: key };
        }
        let store = Store::open(&data).expect("store");
        let mut host_certs = Vec::new();
        for (i, (name, site, cloud)) in TEST_HOSTS.into_iter().enumerate() {
            let id = PeerIdentity::new(vault_id.clone(), Role::Host, format!("{name}-id")).expect("identity");
            let cert = v.ca.issue_local(&id, &ServerNames::default(), Duration::from_secs(3600)).expect("host cert");
            let mut rec = HostRecord {
                id: format!("{name}-id").parse().expect("host id"),
                name: name.parse().expect("host name"),
                site: site.parse().expect("site"),
                cloud: cloud.parse().expect("cloud"),
                address: format!("127.0.0.1:{}", 9001 + i),
                agent_version: "fake".into(),
                registered_unix_ms: now_ms(),
                cert_serial: String::new(),
                cert_not_after_unix_ms: 0,
                reset_pending: false,
                prev_cert_serial: String::new(),
            };
            rec.with_certificate(&cert.0).expect("certificate serial");
            host_certs.push(cert);
            store.put(HOSTS, name, &rec).expect("host");
        }
        let op_id = PeerIdentity::new(vault_id.clone(), Role::Operator, "op2").expect("identity");
        let day = time::Duration::days(1);
        let now = time::OffsetDateTime::now_utc();
        let expired_cert =
            v.ca.issue_local_between(&op_id, &ServerNames::default(), now - day - day, now - day).expect("expired");
        let revoked_cert = v.ca.issue_local(&op_id, &ServerNames::default(), Duration::from_secs(3600)).expect("cert");
        let serial = siterecovery_certs::live::serial_of_pem(&revoked_cert.0).expect("serial");
        let revoked = RevokedRecord {
            serial: serial.clone(),
            host_id: "hv-a-id".parse().expect("id"),
            host_name: "hv-a".parse().expect("name"),
            revoked_unix_ms: now_ms(),
            reason: "test".into(),
        };
        store.put(REVOKED, &serial, &revoked).expect("revoked");
        let read = |name: &str| std::fs::read_to_string(opdir.join(name)).expect("op cert");
        let op_cert = (read("op.pem"), read("op.key"));
        let provider_cert = (v.provider_identity.cert_pem.clone(), v.provider_identity.key_pem.clone());
        for (i, vm) in placed {
            let host: siterecovery_proto::model::HostId = format!("{}-id", TEST_HOSTS[i].0).parse().expect("host id");
            let rec = VmRecord::from_report(&vm, &host).expect("placed VM");
            store.put(VMS, &rec.name, &rec).expect("put VM");
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let shutdown = CancellationToken::new();
        let scripts_dir = dir.join("scripts");
        std::fs::create_dir_all(&scripts_dir).expect("scripts dir");
        let opts = api::ServeOptions {
            grace: Duration::from_secs(1),
            protection: ProtectionConfig { scripts_dir: scripts_dir.clone(), ..ProtectionConfig::for_tests() },
            cert_validity,
            ..api::ServeOptions::default()
        };
        let server = tokio::spawn(api::serve_options(v, store, listener, shutdown.clone(), opts));
        let host_certs: [HostCert; 2] = host_certs.try_into().expect("two host certificates");
        Self {
            _tmp: tmp,
            dir,
            addr,
            ca_pem,
            host_certs,
            op_cert,
            provider_cert,
            revoked_cert,
            expired_cert,
            scripts_dir,
            opdir,
            shutdown,
            server,
        }
    }

    /// The operator's Inventory and Protection clients (mutual TLS, operator certificate).
    pub async fn operator(&self) -> (InventoryClient<Channel>, ProtectionClient<Channel>) {
        let certs = OperatorCerts::load(&self.opdir).expect("op certs");
        let ch = cli::connect(&self.addr, &certs).await.expect("connect");
        (InventoryClient::new(ch.clone()), ProtectionClient::new(ch))
    }

    /// Opens a control session as host `i` (0 = hv-a, 1 = hv-b) reporting `vms`.
    pub async fn session(&self, i: usize, vms: Vec<v1::Vm>) -> AgentSession {
        AgentSession::open(&self.addr, &self.ca_pem, &self.host_certs[i], vms).await
    }

    /// Shuts the provider down and waits (bounded) for it to stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

/// A fake agent's control session: Hello and an inventory sent, then commands in and
/// results (and reports) out.
pub struct AgentSession {
    tx: mpsc::Sender<v1::AgentMessage>,
    inbound: tonic::Streaming<v1::ProviderMessage>,
}

impl AgentSession {
    /// Connects with host certificate `cert`, says Hello and reports `vms`.
    pub async fn open(addr: &str, ca_pem: &str, cert: &HostCert, vms: Vec<v1::Vm>) -> Self {
        let ch = host_channel(addr, ca_pem, cert).await;
        let (tx, rx) = mpsc::channel::<v1::AgentMessage>(64);
        let s = |b: Body| v1::AgentMessage { body: Some(b) };
        tx.send(s(Body::Hello(v1::Hello { agent_version: "fake".into(), listen_address: String::new() })))
            .await
            .expect("hello");
        tx.send(s(Body::Inventory(v1::InventoryReport { vms, free_bytes: 100 * GIB }))).await.expect("inventory");
        let inbound = ControlClient::new(ch)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        Self { tx, inbound }
    }

    /// The next command from the provider; `None` when the session ended or `stop` fired.
    pub async fn next(&mut self, stop: &CancellationToken) -> Option<v1::ProviderMessage> {
        tokio::select! {
            m = self.inbound.message() => m.ok().flatten(),
            _ = stop.cancelled() => None,
        }
    }

    /// Sends a message on the session.
    pub async fn send(&self, body: Body) {
        self.tx.send(v1::AgentMessage { body: Some(body) }).await.expect("send on the control session");
    }

    /// Sends the result of a command.
    pub async fn reply(&self, result: v1::CommandResult) {
        self.send(Body::Result(result)).await;
    }
}

/// A channel to the provider at `addr` as the host of `cert`, requiring the provider
/// role of the server (as agents do).
pub async fn host_channel(addr: &str, ca_pem: &str, cert: &HostCert) -> Channel {
    siterecovery_certs::tls::install_crypto_provider();
    let own = siterecovery_certs::ca::first_cert_der(&cert.0)
        .and_then(|der| PeerIdentity::from_cert_der(&der))
        .expect("host identity");
    let identity =
        LiveIdentity::new(&PemIdentity { cert_pem: cert.0.clone(), key_pem: cert.1.clone() }).expect("identity");
    let config = client_config_with(
        &own.vault_id,
        ca_pem,
        &RevocationList::new(),
        Expect::Role(Role::Provider),
        Some(&identity),
    )
    .expect("client config");
    let connector = TlsConnector::new(addr, Arc::new(config)).expect("connector");
    transport::connect(transport::endpoint(addr).expect("endpoint"), connector).await.expect("agent connect")
}

/// A successful result of command `m`, to fill in.
pub fn ok_result(m: &v1::ProviderMessage) -> v1::CommandResult {
    v1::CommandResult { command_id: m.command_id, ok: true, ..Default::default() }
}

/// Polls until every host is connected and the inventory lists `vms` VMs.
pub async fn wait_connected(inv: &mut InventoryClient<Channel>, vms: usize) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let hosts = inv.list_hosts(v1::ListHostsRequest {}).await.expect("hosts").into_inner().hosts;
        let listed = inv.list_vms(v1::ListVmsRequest::default()).await.expect("vms").into_inner().vms;
        if hosts.iter().all(|h| h.connected) && listed.len() == vms {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "hosts {hosts:?} and VMs {listed:?} after {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until host `name`'s connected flag is `connected`.
pub async fn wait_host(inv: &mut InventoryClient<Channel>, name: &str, connected: bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let hosts = inv.list_hosts(v1::ListHostsRequest {}).await.expect("hosts").into_inner().hosts;
        if hosts.iter().any(|h| h.name == name && h.connected == connected) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{name} not connected={connected}: {hosts:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watches job `id` to its end; the last state seen. Panics when it stalls.
pub async fn wait_job(p: &mut ProtectionClient<Channel>, id: &str) -> v1::Job {
    let mut s = p.watch_job(v1::GetJobRequest { id: id.into() }).await.expect("watch").into_inner();
    let mut last = None;
    while let Some(j) = tokio::time::timeout(DEADLINE, s.message()).await.expect("job stalled").expect("stream") {
        last = Some(j);
    }
    last.expect("a job")
}

/// Polls until the newest job of `kind` for `vm` has finished; returns it.
pub async fn wait_kind(p: &mut ProtectionClient<Channel>, kind: &str, vm: &str) -> v1::Job {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let jobs = p.list_jobs(v1::ListJobsRequest {}).await.expect("jobs").into_inner().jobs;
        if let Some(j) = jobs.into_iter().rev().find(|j| {
            siterecovery_provider::job::kind_name(j.kind) == kind && j.vm == vm && j.state() != v1::JobState::Running
        }) {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "no finished {kind} job for {vm} after {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The pairing of `source` with `target` under `policy`.
pub fn pairing(source: &str, target: &str, policy: &str) -> v1::CloudPairing {
    v1::CloudPairing { source_cloud: source.into(), target_cloud: target.into(), policy: policy.into() }
}

/// `protect VM` and its job to success.
pub async fn protect(p: &mut ProtectionClient<Channel>, vm: &str) {
    let job =
        p.protect(v1::ProtectRequest { vm: vm.into(), export_dir: String::new() }).await.expect("protect").into_inner();
    let done = wait_job(p, &job.id).await;
    assert_eq!(done.state(), v1::JobState::Succeeded, "{done:?}");
}
