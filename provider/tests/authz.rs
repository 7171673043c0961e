//! The authorisation matrix of the provider: every RPC of every service it knows
//! (from the API's file descriptors, plus gRPC reflection) called over real mutual TLS
//! on loopback by each kind of caller, each cell asserting that the call reached its
//! handler or the exact refusal:
//!
//! - a certificate of another vault, a revoked or an expired one: the TLS handshake
//!   fails, with the alert naming why (checked on a raw TLS connection), and the RPC
//!   never reaches the server;
//! - no certificate: `UNAUTHENTICATED` (except Registration);
//! - a certificate of the wrong role: `PERMISSION_DENIED`;
//! - the right role: anything else (the handler ran; an empty request is refused by
//!   the handler itself as invalid, not found, ...).
//!
//! An RPC of the descriptors without a row here fails the test, and so does a row
//! without an RPC.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use common::{HostCert, TestProvider};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use siterecovery_certs::ca::ServerNames;
use siterecovery_certs::live::{Expect, LiveIdentity, RevocationList, client_config_with};
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::transport::{self, TlsConnector};
use siterecovery_certs::{PeerIdentity, Role, VaultCa, VaultId};
use siterecovery_proto::v1;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

// The parts of descriptor.proto this test reads (prost skips the other fields).
#[derive(Clone, PartialEq, Message)]
struct FileDescriptorSet {
    #[prost(message, repeated, tag = "1")]
    file: Vec<FileDescriptorProto>,
}
#[derive(Clone, PartialEq, Message)]
struct FileDescriptorProto {
    #[prost(string, optional, tag = "2")]
    package: Option<String>,
    #[prost(message, repeated, tag = "6")]
    service: Vec<ServiceDescriptorProto>,
}
#[derive(Clone, PartialEq, Message)]
struct ServiceDescriptorProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(message, repeated, tag = "2")]
    method: Vec<MethodDescriptorProto>,
}
#[derive(Clone, PartialEq, Message)]
struct MethodDescriptorProto {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

/// Every `/package.Service/Method` of the API's descriptors.
fn described_rpcs() -> BTreeSet<String> {
    let set = FileDescriptorSet::decode(siterecovery_proto::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut out = BTreeSet::new();
    for f in set.file {
        let package = f.package.unwrap_or_default();
        for s in f.service {
            for m in s.method {
                out.insert(format!("/{package}.{}/{}", s.name.clone().unwrap_or_default(), m.name.unwrap_or_default()));
            }
        }
    }
    out
}

/// Who may call a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allowed {
    /// Anyone, even without a certificate (Registration).
    Anyone,
    Roles(&'static [Role]),
    /// The agent's service: the provider does not serve it.
    NotServed,
}

const OPERATOR: Allowed = Allowed::Roles(&[Role::Operator]);
const HOST: Allowed = Allowed::Roles(&[Role::Host]);
const MEMBERS: Allowed = Allowed::Roles(&[Role::Operator, Role::Host, Role::Provider]);

/// The matrix's rows: service, its RPCs, who may call them.
const ROWS: &[(&str, &[&str], Allowed)] = &[
    ("siterecovery.v1.Registration", &["Register"], Allowed::Anyone),
    (
        "siterecovery.v1.Inventory",
        &[
            "ListSites",
            "ListClouds",
            "ListHosts",
            "ListVms",
            "GetVm",
            "CreateVm",
            "DeleteVm",
            "StartVm",
            "StopVm",
            "ResetHost",
            "RemoveHost",
            "MoveHost",
            "ListRevoked",
        ],
        OPERATOR,
    ),
    ("siterecovery.v1.Control", &["Session"], HOST),
    (
        "siterecovery.v1.Protection",
        &[
            "CreatePolicy",
            "ListPolicies",
            "DeletePolicy",
            "PairClouds",
            "ListPairings",
            "UnpairClouds",
            "Protect",
            "ImportInitial",
            "Unprotect",
            "Resync",
            "ListPoints",
            "ExportPoint",
            "UnexportPoint",
            "ListJobs",
            "GetJob",
            "WatchJob",
            "Failover",
            "CommitFailover",
            "CleanupTestFailover",
            "ChangePoint",
            "Reprotect",
            "CreateNetwork",
            "ListNetworks",
            "MapNetwork",
            "ListNetworkMappings",
            "CreatePlan",
            "ListPlans",
            "PlanFailover",
            "ConfirmPlanAction",
        ],
        OPERATOR,
    ),
    ("siterecovery.v1.Peer", &["Ping", "CopyProgress", "InitialCopy", "ShipPoint", "BlockHashes"], Allowed::NotServed),
];

/// gRPC reflection, served beside the API (not in its descriptors).
const REFLECTION: &[&str] = &[
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The callers of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    NoCertificate,
    Operator,
    Host,
    Provider,
    OtherVault,
    Revoked,
    Expired,
}

const CALLERS: [Caller; 7] = [
    Caller::NoCertificate,
    Caller::Operator,
    Caller::Host,
    Caller::Provider,
    Caller::OtherVault,
    Caller::Revoked,
    Caller::Expired,
];

/// What a cell must show.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Reached,
    Refused(Code),
    /// The handshake fails with this TLS alert.
    Handshake(&'static str),
    /// Anything else (what a wrong cell saw).
    Other(String),
}

fn expected(allowed: Allowed, caller: Caller) -> Outcome {
    let role = match caller {
        Caller::OtherVault => return Outcome::Handshake("UnknownCA"),
        Caller::Revoked => return Outcome::Handshake("CertificateRevoked"),
        Caller::Expired => return Outcome::Handshake("CertificateExpired"),
        Caller::NoCertificate => None,
        Caller::Operator => Some(Role::Operator),
        Caller::Host => Some(Role::Host),
        Caller::Provider => Some(Role::Provider),
    };
    match (allowed, role) {
        (Allowed::NotServed, _) => Outcome::Refused(Code::Unimplemented),
        (Allowed::Anyone, _) => Outcome::Reached,
        (Allowed::Roles(_), None) => Outcome::Refused(Code::Unauthenticated),
        (Allowed::Roles(roles), Some(r)) if roles.contains(&r) => Outcome::Reached,
        (Allowed::Roles(_), Some(_)) => Outcome::Refused(Code::PermissionDenied),
    }
}

/// Raw protobuf bytes in and out: one codec for every method.
#[derive(Debug, Clone, Default)]
struct Raw;
impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}
impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// The request a cell sends: empty, except Registration's, which names the vault so
/// that the handler's first refusal is not mistaken for an authorisation one.
fn request(path: &str, vault: &VaultId) -> Vec<u8> {
    if path.ends_with("/Register") {
        return v1::RegisterRequest { vault_id: vault.to_string(), ..Default::default() }.encode_to_vec();
    }
    Vec::new()
}

/// Calls `path` once on `channel` (as a stream of one message, which every kind of
/// method accepts); the status code it ends with, or `Ok` for a message.
async fn call(channel: Channel, path: &str, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    if grpc.ready().await.is_err() {
        return Code::Unavailable;
    }
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(path.to_owned()).expect("path");
    let req = tonic::Request::new(tokio_stream::iter(vec![body]));
    let res = tokio::time::timeout(Duration::from_secs(20), async {
        match grpc.streaming(req, path, Raw).await {
            Err(s) => s.code(),
            Ok(r) => match r.into_inner().message().await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            },
        }
    })
    .await;
    res.expect("an answer in time")
}

/// A client config presenting `cert` (none: no certificate), verifying the provider
/// with `ca_pem` and requiring its role.
fn client_config(vault: &VaultId, ca_pem: &str, cert: Option<&HostCert>) -> Arc<rustls::ClientConfig> {
    siterecovery_certs::tls::install_crypto_provider();
    let identity = cert
        .map(|c| LiveIdentity::new(&PemIdentity { cert_pem: c.0.clone(), key_pem: c.1.clone() }).expect("identity"));
    let config =
        client_config_with(vault, ca_pem, &RevocationList::new(), Expect::Role(Role::Provider), identity.as_ref())
            .expect("client config");
    Arc::new(config)
}

async fn channel(addr: &str, config: Arc<rustls::ClientConfig>) -> Result<Channel, tonic::transport::Error> {
    let connector = TlsConnector::new(addr, config).expect("connector");
    transport::connect(transport::endpoint(addr).expect("endpoint"), connector).await
}

/// A raw TLS connection with `config`: how the server ended it (the alert), read after
/// the client's side of the handshake and an HTTP/2 preface.
async fn handshake_end(addr: &str, config: Arc<rustls::ClientConfig>) -> String {
    let addr = addr.to_owned();
    tokio::task::spawn_blocking(move || {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let mut conn = rustls::ClientConnection::new(config, name).expect("connection");
        let mut sock = std::net::TcpStream::connect(&addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let mut buf = [0u8; 64];
        let write = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        match write.and_then(|()| tls.read(&mut buf)) {
            Err(e) => e.to_string(),
            Ok(n) => format!("the server answered ({n} bytes)"),
        }
    })
    .await
    .expect("joined")
}

#[tokio::test]
async fn every_rpc_by_every_caller() {
    let provider = TestProvider::start().await;
    let vault_id = {
        let der = siterecovery_certs::ca::first_cert_der(&provider.op_cert.0).expect("der");
        PeerIdentity::from_cert_der(&der).expect("identity").vault_id
    };
    // Every RPC has a row, every row an RPC.
    let rows: BTreeSet<String> =
        ROWS.iter().flat_map(|(svc, methods, _)| methods.iter().map(move |m| format!("/{svc}/{m}"))).collect();
    assert_eq!(described_rpcs(), rows, "the matrix's rows differ from the API's RPCs (a new RPC needs its row)");
    let mut cells: Vec<(String, Allowed)> = ROWS
        .iter()
        .flat_map(|(svc, methods, allowed)| methods.iter().map(move |m| (format!("/{svc}/{m}"), *allowed)))
        .collect();
    cells.extend(REFLECTION.iter().map(|p| (p.to_string(), MEMBERS)));

    let other = VaultCa::create(VaultId::generate(), "other").expect("other CA");
    let other_id = PeerIdentity::new(other.vault_id().clone(), Role::Operator, "op").expect("identity");
    let other_cert = other.issue_local(&other_id, &ServerNames::default(), Duration::from_secs(3600)).expect("cert");
    let cert_of = |c: Caller| -> Option<&HostCert> {
        match c {
            Caller::NoCertificate => None,
            Caller::Operator => Some(&provider.op_cert),
            Caller::Host => Some(&provider.host_certs[0]),
            Caller::Provider => Some(&provider.provider_cert),
            Caller::OtherVault => Some(&other_cert),
            Caller::Revoked => Some(&provider.revoked_cert),
            Caller::Expired => Some(&provider.expired_cert),
        }
    };
    let mut failures = Vec::new();
    let mut checked = 0;
    for caller in CALLERS {
        let config = client_config(&vault_id, &provider.ca_pem, cert_of(caller));
        // One channel per caller that gets through the handshake.
        let shared = match expected(MEMBERS, caller) {
            Outcome::Handshake(_) => None,
            _ => Some(channel(&provider.addr, config.clone()).await.expect("channel")),
        };
        for (path, allowed) in &cells {
            let want = expected(*allowed, caller);
            let got = match (&want, &shared) {
                (Outcome::Handshake(alert), _) => {
                    let end = handshake_end(&provider.addr, config.clone()).await;
                    // Nor does an RPC on a fresh channel reach the server.
                    let rpc = match channel(&provider.addr, config.clone()).await {
                        Err(_) => Code::Unavailable,
                        Ok(ch) => call(ch, path, request(path, &vault_id)).await,
                    };
                    let transport_failure = matches!(rpc, Code::Unavailable | Code::Unknown | Code::Cancelled);
                    if end.contains(alert) && transport_failure {
                        want.clone()
                    } else {
                        Outcome::Other(format!("handshake: {end}; rpc: {rpc:?}"))
                    }
                }
                (_, Some(ch)) => match call(ch.clone(), path, request(path, &vault_id)).await {
                    Code::Unauthenticated => Outcome::Refused(Code::Unauthenticated),
                    Code::PermissionDenied => Outcome::Refused(Code::PermissionDenied),
                    Code::Unimplemented if *allowed == Allowed::NotServed => Outcome::Refused(Code::Unimplemented),
                    _ => Outcome::Reached,
                },
                (_, None) => unreachable!("a channel for every caller past the handshake"),
            };
            checked += 1;
            if got != want {
                failures.push(format!("{caller:?} {path}: expected {want:?}, got {got:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} cells wrong:\n{}", failures.len(), failures.join("\n"));
    assert_eq!(checked, CALLERS.len() * cells.len());
    provider.stop().await;
}
