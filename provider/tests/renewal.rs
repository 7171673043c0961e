//! Certificate renewal over real TLS on loopback: the provider renews its own
//! certificate at two thirds of its life without a restart (open connections and
//! streams go on, new handshakes get the new certificate, the data dir holds it), and a
//! host renews over its control session (the new certificate opens sessions, the old
//! one no longer does).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::{AgentSession, DEADLINE, Options, TestProvider, wait_host};
use siterecovery_certs::live::{Expect, RevocationList, client_config_with, serial_of_der, serial_of_pem};
use siterecovery_certs::{PeerIdentity, Role};
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::provider_message::Command;
use tokio_util::sync::CancellationToken;

/// The serial of the certificate the provider presents to a new handshake.
async fn presented_serial(p: &TestProvider) -> String {
    let vault = {
        let der = siterecovery_certs::ca::first_cert_der(&p.op_cert.0).expect("der");
        PeerIdentity::from_cert_der(&der).expect("identity").vault_id
    };
    let config = Arc::new(
        client_config_with(&vault, &p.ca_pem, &RevocationList::new(), Expect::Role(Role::Provider), None)
            .expect("config"),
    );
    let addr = p.addr.clone();
    tokio::task::spawn_blocking(move || {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut conn = rustls::ClientConnection::new(config, name).expect("connection");
        let mut sock = std::net::TcpStream::connect(&addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).expect("handshake");
        }
        let _ = conn.writer().flush();
        let leaf = conn.peer_certificates().and_then(|c| c.first()).expect("a server certificate");
        serial_of_der(leaf).expect("serial")
    })
    .await
    .expect("joined")
}

#[tokio::test]
async fn the_provider_renews_its_certificate_without_a_restart() {
    let opts = Options {
        cert_validity: Duration::from_secs(90),
        provider_renewal_due_in: Some(Duration::from_secs(2)),
        ..Options::default()
    };
    let provider = TestProvider::start_options(opts).await;
    let first = serial_of_pem(&provider.provider_cert.0).expect("serial");
    assert_eq!(presented_serial(&provider).await, first);
    // A connection and a stream opened before the renewal.
    let (mut inv, _) = provider.operator().await;
    let stop = CancellationToken::new();
    let mut agent = provider.session(0, vec![]).await;
    wait_host(&mut inv, "hv-a", true).await;
    // The data dir's certificate changes.
    let data = provider.dir.join("provider");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let renewed = loop {
        let pem = std::fs::read_to_string(data.join("provider.pem")).expect("provider.pem");
        let serial = serial_of_pem(&pem).expect("serial");
        if serial != first {
            break pem;
        }
        assert!(tokio::time::Instant::now() < deadline, "not renewed in {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let second = serial_of_pem(&renewed).expect("serial");
    let (nb, na) = siterecovery_certs::ca::validity(&renewed).expect("validity");
    assert!((90..=100).contains(&(na - nb)), "renewed for {}s, not --cert-validity", na - nb);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("provider.key")).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // New handshakes get the new certificate ...
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while presented_serial(&provider).await != second {
        assert!(tokio::time::Instant::now() < deadline, "the listener still presents the old certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... the connection opened before goes on, and so does the host's stream.
    let hosts = inv.list_hosts(v1::ListHostsRequest {}).await.expect("old connection").into_inner().hosts;
    assert!(hosts.iter().any(|h| h.name == "hv-a" && h.connected), "{hosts:?}");
    agent.send(Body::Heartbeat(v1::Heartbeat { seq: 1, free_bytes: 1 })).await;
    let (mut fresh, _) = provider.operator().await;
    fresh.list_sites(v1::ListSitesRequest {}).await.expect("a new connection");
    assert!(agent.next(&stop).await.is_some(), "the host's stream ended");
    stop.cancel();
    provider.stop().await;
}

#[tokio::test]
async fn a_host_renews_over_its_control_session() {
    let provider = TestProvider::start_options(Options::default()).await;
    let stop = CancellationToken::new();
    let mut agent = provider.session(0, vec![]).await;
    // The session opens with the revocation list.
    match agent.next(&stop).await.and_then(|m| m.command) {
        Some(Command::RevocationList(l)) => assert_eq!(l.serials.len(), 1, "the fixture's revoked certificate"),
        other => panic!("no revocation list first: {other:?}"),
    }
    let csr = siterecovery_certs::csr::make_csr("hv-a").expect("csr");
    agent.send(Body::RenewCertificate(v1::RenewCertificate { csr_pem: csr.csr_pem.clone() })).await;
    let issued = match agent.next(&stop).await.and_then(|m| m.command) {
        Some(Command::CertificateIssued(c)) => c,
        other => panic!("no certificate: {other:?}"),
    };
    assert!(issued.error.is_empty(), "{}", issued.error);
    let der = siterecovery_certs::ca::first_cert_der(&issued.certificate_pem).expect("der");
    let id = PeerIdentity::from_cert_der(&der).expect("identity");
    assert_eq!((id.role, id.id.as_str()), (Role::Host, "hv-a-id"), "the same identity");
    // The new certificate opens a session; the old one is refused.
    let new_cert = (issued.certificate_pem.clone(), csr.key_pem.clone());
    let mut renewed = AgentSession::open(&provider.addr, &provider.ca_pem, &new_cert, vec![]).await;
    assert!(
        matches!(renewed.next(&stop).await.and_then(|m| m.command), Some(Command::RevocationList(_))),
        "the renewed certificate's session"
    );
    let channel = common::host_channel(&provider.addr, &provider.ca_pem, &provider.host_certs[0]).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<v1::AgentMessage>(1);
    drop(tx);
    let refused = v1::control_client::ControlClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect_err("the old certificate opened a session");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("not the current certificate"), "{}", refused.message());
    stop.cancel();
    provider.stop().await;
}
