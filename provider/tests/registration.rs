//! In-process: a provider on 127.0.0.1:0 with real certificates; registration over TLS
//! with and without a client certificate, and the operator's host commands.
//!
//! A registered name is refused without the host's certificate (the attack with the
//! vault key file and `--reregister`), renews with it (same host id), never moves by
//! registration; `host reset` allows exactly one registration; `host move`, `host
//! remove` and the revoked list; refusals rate-limited per address.

mod common;

use common::{HostCert, TestProvider};
use siterecovery_certs::VaultKeyFile;
use siterecovery_certs::csr::make_csr;
use siterecovery_certs::live::serial_of_pem;
use siterecovery_proto::v1;
use siterecovery_proto::v1::inventory_client::InventoryClient;
use siterecovery_proto::v1::registration_client::RegistrationClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A TLS channel to the provider, presenting `cert` when given.
async fn channel(p: &TestProvider, cert: Option<&HostCert>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&p.ca_pem)).domain_name("127.0.0.1");
    if let Some((c, k)) = cert {
        tls = tls.identity(Identity::from_pem(c, k));
    }
    Endpoint::from_shared(format!("https://{}", p.addr)).expect("endpoint").tls_config(tls)?.connect().await
}

/// A Registration client, presenting `cert` when given.
async fn registration(p: &TestProvider, cert: Option<&HostCert>) -> RegistrationClient<Channel> {
    RegistrationClient::new(channel(p, cert).await.expect("connect"))
}

/// A registration request for `host` at `site`/`cloud` with the vault key file's
/// secret; the key made for its CSR comes back with it.
fn request(p: &TestProvider, host: &str, site: &str, cloud: &str) -> (v1::RegisterRequest, String) {
    let key = VaultKeyFile::read(&p.dir.join("vault.key")).expect("vault key file");
    let csr = make_csr(host).expect("csr");
    let req = v1::RegisterRequest {
        vault_id: key.content.vault_id.to_string(),
        secret: key.content.secret.clone(),
        csr_pem: csr.csr_pem,
        host_name: host.into(),
        site: site.into(),
        cloud: cloud.into(),
        listen_address: "127.0.0.1:9002".into(),
        reregister: true,
        agent_version: "test".into(),
    };
    (req, csr.key_pem)
}

async fn host(inv: &mut InventoryClient<Channel>, name: &str) -> Option<v1::Host> {
    let hosts = inv.list_hosts(v1::ListHostsRequest {}).await.expect("list hosts").into_inner().hosts;
    hosts.into_iter().find(|h| h.name == name)
}

#[tokio::test]
async fn a_registered_name_renews_only_with_its_own_certificate() {
    let p = TestProvider::start().await;
    let (mut inv, _) = p.operator().await;
    let before = host(&mut inv, "hv-b").await.expect("hv-b");
    assert_eq!(before.certificate_serial, serial_of_pem(&p.host_certs[1].0).expect("serial"));

    // The attack: the vault key file and --reregister, no certificate.
    let s = registration(&p, None)
        .await
        .register(request(&p, "hv-b", "secondary", "gold-b").0)
        .await
        .expect_err("took over hv-b");
    assert_eq!(s.code(), tonic::Code::AlreadyExists, "{s:?}");
    assert!(s.message().contains("provider host reset hv-b"), "{}", s.message());
    // Another host's certificate.
    let s = registration(&p, Some(&p.host_certs[0]))
        .await
        .register(request(&p, "hv-b", "secondary", "gold-b").0)
        .await
        .expect_err("hv-a's certificate renewed hv-b");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert_eq!(host(&mut inv, "hv-b").await.as_ref(), Some(&before), "a refused registration changed hv-b");

    // Renewal with hv-b's own certificate: same id, a new current certificate.
    let (req, key) = request(&p, "hv-b", "secondary", "gold-b");
    let r = registration(&p, Some(&p.host_certs[1])).await.register(req).await.expect("renewal").into_inner();
    assert_eq!(r.host_id, before.id);
    let after = host(&mut inv, "hv-b").await.expect("hv-b");
    assert_eq!(after.id, before.id);
    assert_eq!(after.certificate_serial, serial_of_pem(&r.certificate_pem).expect("serial"));
    assert_ne!(after.certificate_serial, before.certificate_serial);
    assert!(after.certificate_expires_unix_ms > common::now_ms(), "{after:?}");
    assert!(!after.reset_pending);

    // Renewing into another site is refused, naming `host move`; the old certificate
    // is superseded.
    let renewed = (r.certificate_pem, key);
    let s = registration(&p, Some(&renewed))
        .await
        .register(request(&p, "hv-b", "primary", "gold-b").0)
        .await
        .expect_err("moved by registration");
    assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("provider host move hv-b"), "{}", s.message());
    let s = registration(&p, Some(&p.host_certs[1]))
        .await
        .register(request(&p, "hv-b", "secondary", "gold-b").0)
        .await
        .expect_err("superseded certificate");
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert_eq!(host(&mut inv, "hv-b").await, Some(after));
    p.stop().await;
}

#[tokio::test]
async fn host_reset_allows_exactly_one_registration() {
    let p = TestProvider::start().await;
    let (mut inv, _) = p.operator().await;
    let before = host(&mut inv, "hv-b").await.expect("hv-b");
    let h = inv.reset_host(v1::HostRequest { host: "hv-b".into() }).await.expect("reset").into_inner();
    assert!(h.reset_pending, "{h:?}");
    assert!(host(&mut inv, "hv-b").await.expect("hv-b").reset_pending);
    let mut revoked = inv.list_revoked(v1::ListRevokedRequest {}).await.expect("revoked").into_inner().revoked;
    // The fixture's own revoked operator certificate aside.
    revoked.retain(|r| r.host_name == "hv-b");
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(
        (revoked[0].serial.as_str(), revoked[0].reason.as_str()),
        (before.certificate_serial.as_str(), "host reset")
    );

    // The old certificate does not register (refused by registration, or at the
    // handshake once the provider's verifier reads the revocation list).
    let old = match registration_attempt(&p, Some(&p.host_certs[1]), "hv-b").await {
        Ok(r) => panic!("the revoked certificate registered: {r:?}"),
        Err(s) => s,
    };
    assert_ne!(old.code(), tonic::Code::Ok);
    let r = registration(&p, None)
        .await
        .register(request(&p, "hv-b", "secondary", "gold-b").0)
        .await
        .expect("the registration the reset allows")
        .into_inner();
    assert_ne!(r.host_id, before.id, "a fresh host id");
    let now = host(&mut inv, "hv-b").await.expect("hv-b");
    assert!(!now.reset_pending && now.id == r.host_id, "{now:?}");
    let s = registration(&p, None)
        .await
        .register(request(&p, "hv-b", "secondary", "gold-b").0)
        .await
        .expect_err("a second one");
    assert_eq!(s.code(), tonic::Code::AlreadyExists, "{s:?}");
    p.stop().await;
}

/// A registration of `name` presenting `cert`: a refusal at the handshake is an error
/// like a refused call.
async fn registration_attempt(
    p: &TestProvider,
    cert: Option<&HostCert>,
    name: &str,
) -> Result<v1::RegisterResponse, tonic::Status> {
    let ch = channel(p, cert).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let (req, _) = request(p, name, "secondary", "gold-b");
    RegistrationClient::new(ch).register(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn host_move_remove_and_the_revoked_list() {
    let p = TestProvider::start().await;
    let (mut inv, _) = p.operator().await;
    let a = host(&mut inv, "hv-a").await.expect("hv-a");
    let moved = inv
        .move_host(v1::MoveHostRequest { host: "hv-a".into(), site: "tertiary".into(), cloud: String::new() })
        .await
        .expect("move")
        .into_inner();
    assert_eq!((moved.site.as_str(), moved.cloud.as_str()), ("tertiary", "gold-a"));
    assert_eq!(host(&mut inv, "hv-a").await.expect("hv-a").site, "tertiary");
    for (host, site, field) in
        [("hv-a", "../x", "move_host.site"), ("..", "s", "move_host.host"), ("hv-a", "", "move_host.site")]
    {
        let s = inv
            .move_host(v1::MoveHostRequest { host: host.into(), site: site.into(), cloud: String::new() })
            .await
            .expect_err(field);
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with(field), "{}", s.message());
    }
    let s = inv.reset_host(v1::HostRequest { host: "hv-x".into() }).await.expect_err("unknown");
    assert_eq!(s.code(), tonic::Code::NotFound, "{s:?}");

    let r = inv.remove_host(v1::HostRequest { host: a.id.clone() }).await.expect("remove by id").into_inner();
    assert_eq!(r.revoked_serial, a.certificate_serial);
    assert!(host(&mut inv, "hv-a").await.is_none(), "hv-a still listed");
    let revoked = inv.list_revoked(v1::ListRevokedRequest {}).await.expect("revoked").into_inner().revoked;
    assert!(revoked.iter().any(|x| x.serial == a.certificate_serial && x.reason == "host remove"), "{revoked:?}");
    // A removed name registers again as a new host.
    let r = registration(&p, None)
        .await
        .register(request(&p, "hv-a", "primary", "gold-a").0)
        .await
        .expect("register the removed name")
        .into_inner();
    assert_ne!(r.host_id, a.id);
    p.stop().await;
}

#[tokio::test]
async fn refused_registrations_are_rate_limited() {
    let p = TestProvider::start().await;
    let mut wrong = request(&p, "hv-c", "primary", "gold-a").0;
    wrong.secret = "00".repeat(32);
    let mut client = registration(&p, None).await;
    for i in 0..5 {
        let s = client.register(wrong.clone()).await.expect_err("wrong secret");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "attempt {i}: {s:?}");
    }
    // Now even a good request from this address waits.
    let good = request(&p, "hv-c", "primary", "gold-a").0;
    let s = client.register(good.clone()).await.expect_err("rate-limited");
    assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    // A flood stays limited (answered before the secret or the store is read).
    let started = std::time::Instant::now();
    for _ in 0..200 {
        let s = client.register(wrong.clone()).await.expect_err("flood");
        assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
    }
    eprintln!("200 rate-limited attempts answered in {:?}", started.elapsed());
    let (mut inv, _) = p.operator().await;
    assert!(host(&mut inv, "hv-c").await.is_none());
    p.stop().await;
}
