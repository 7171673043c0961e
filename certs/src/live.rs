//! Trust that changes while a process runs: its own certificate (renewed and reloaded
//! without a restart) and the vault's revoked serials; and the checks of a peer's
//! identity beyond the CA (the role or the host id a client expects of a server).
//!
//! A [`LiveIdentity`] is resolved at every handshake, so after [`LiveIdentity::replace`]
//! new handshakes present the new certificate while open connections go on. A
//! [`RevocationList`] is read at every handshake by the verifiers made here, on both
//! sides: a server refuses a revoked client and a client a revoked server.

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertError;
use crate::identity::{PeerIdentity, Role};
use crate::tls::PemIdentity;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Lowercase hex of a DER certificate's serial number (as the CA wrote it).
pub fn serial_of_der(der: &[u8]) -> Result<String, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::parse("certificate", e))?;
    Ok(hex::encode(cert.raw_serial()))
}

/// Lowercase hex serial of the first certificate of a PEM text.
pub fn serial_of_pem(pem: &str) -> Result<String, CertError> {
    serial_of_der(&crate::ca::first_cert_der(pem)?)
}

/// `sha256:<64 lowercase hex>` of the first certificate of a PEM text (the CA's
/// fingerprint that `vault create` prints and `agent register --ca-fingerprint` pins).
pub fn fingerprint_of_pem(pem: &str) -> Result<String, CertError> {
    let der = crate::ca::first_cert_der(pem)?;
    Ok(format!("sha256:{}", hex::encode(ring::digest::digest(&ring::digest::SHA256, &der))))
}

/// Parses a fingerprint as an operator types it: `sha256:` then 64 hex digits, upper
/// or lower case, optionally separated by colons. Returns the canonical form.
pub fn parse_fingerprint(s: &str) -> Result<String, CertError> {
    let bad = || CertError::parse("CA fingerprint", "expected sha256: followed by 64 hex digits");
    let hexpart = s.trim().strip_prefix("sha256:").or_else(|| s.trim().strip_prefix("SHA256:")).ok_or_else(bad)?;
    let digits: String = hexpart.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if digits.len() != 64 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad());
    }
    Ok(format!("sha256:{digits}"))
}

/// This process's certificate and key, replaceable at run time.
pub struct LiveIdentity {
    current: RwLock<(Arc<CertifiedKey>, PemIdentity)>,
}

impl std::fmt::Debug for LiveIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveIdentity").finish_non_exhaustive()
    }
}

fn certified(id: &PemIdentity) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::parse("certificate", e))?;
    if chain.is_empty() {
        return Err(CertError::parse("certificate", "no certificate in PEM"));
    }
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(|e| CertError::parse("private key", e))?;
    Ok(Arc::new(CertifiedKey::from_der(chain, key, &provider())?))
}

impl LiveIdentity {
    /// Fails when the key does not match the certificate.
    pub fn new(id: &PemIdentity) -> Result<Arc<Self>, CertError> {
        Ok(Arc::new(Self { current: RwLock::new((certified(id)?, id.clone())) }))
    }

    /// Presents `id` from the next handshake on. Fails (and keeps the old one) when the
    /// key does not match the certificate.
    pub fn replace(&self, id: &PemIdentity) -> Result<(), CertError> {
        let ck = certified(id)?;
        let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
        *cur = (ck, id.clone());
        Ok(())
    }

    /// The certificate and key presented now.
    pub fn pem(&self) -> PemIdentity {
        self.current.read().unwrap_or_else(|p| p.into_inner()).1.clone()
    }

    fn key(&self) -> Arc<CertifiedKey> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).0.clone()
    }

    /// Serial (lowercase hex) of the certificate presented now.
    pub fn serial(&self) -> Result<String, CertError> {
        serial_of_pem(&self.pem().cert_pem)
    }

    /// Validity of the certificate presented now, unix seconds.
    pub fn validity(&self) -> Result<(i64, i64), CertError> {
        crate::ca::validity(&self.pem().cert_pem)
    }

    /// Unix seconds at which the current certificate should be renewed: two thirds of
    /// its life.
    pub fn renew_at(&self) -> Result<i64, CertError> {
        let (nb, na) = self.validity()?;
        Ok(renew_at(nb, na))
    }
}

/// Two thirds of the way from `not_before` to `not_after` (unix seconds).
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before) * 2 / 3
}

#[derive(Debug)]
struct ServerResolver(Arc<LiveIdentity>);
impl ResolvesServerCert for ServerResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
}

#[derive(Debug)]
struct ClientResolver(Arc<LiveIdentity>);
impl ResolvesClientCert for ClientResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The vault's revoked certificate serials (lowercase hex), replaceable at run time.
#[derive(Debug, Default)]
pub struct RevocationList {
    inner: RwLock<(u64, BTreeSet<String>)>,
}

impl RevocationList {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).1.contains(serial)
    }

    /// Replaces the whole list when `version` is newer than the one held (a list
    /// arriving late never undoes a newer one). Returns whether it was applied.
    pub fn replace(&self, version: u64, serials: impl IntoIterator<Item = String>) -> bool {
        let mut cur = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if version < cur.0 {
            return false;
        }
        *cur = (version, serials.into_iter().map(|s| s.to_ascii_lowercase()).collect());
        true
    }

    /// Adds one serial (the provider, as it revokes); bumps the version.
    pub fn insert(&self, serial: &str) {
        let mut cur = self.inner.write().unwrap_or_else(|p| p.into_inner());
        cur.0 += 1;
        cur.1.insert(serial.to_ascii_lowercase());
    }

    /// (version, serials).
    pub fn snapshot(&self) -> (u64, Vec<String>) {
        let cur = self.inner.read().unwrap_or_else(|p| p.into_inner());
        (cur.0, cur.1.iter().cloned().collect())
    }

    fn check(&self, der: &[u8]) -> Result<(), rustls::Error> {
        let serial =
            serial_of_der(der).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.is_revoked(&serial) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(())
    }
}

/// What a client requires of the server's identity, beyond the CA's signature and the
/// name it dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Any member of the vault (registration-time checks, tools).
    AnyMember,
    /// A certificate of this role (the provider, for agents and the operator CLI).
    Role(Role),
    /// The host with this id (a sender requires the relationship's replica host).
    Host(String),
}

impl Expect {
    fn check(&self, id: &PeerIdentity) -> Result<(), String> {
        match self {
            Expect::AnyMember => Ok(()),
            Expect::Role(r) if id.role == *r => Ok(()),
            Expect::Role(r) => Err(format!("server is {id}, not a {r}")),
            Expect::Host(h) if id.role == Role::Host && id.id == *h => Ok(()),
            Expect::Host(h) => Err(format!("server is {id}, not host/{h}")),
        }
    }
}

/// Why a server's identity was refused (carried in rustls's `OtherError`, so the
/// handshake error a caller sees says who answered instead of whom it wanted).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WrongPeer(pub String);

#[derive(Debug)]
struct VaultServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    vault: crate::VaultId,
    expect: Expect,
    revoked: Arc<RevocationList>,
}

impl ServerCertVerifier for VaultServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ok = self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        self.revoked.check(end_entity)?;
        let other =
            |m: String| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(WrongPeer(m)))));
        let id = PeerIdentity::from_cert_der(end_entity).map_err(|e| other(e.to_string()))?;
        if id.vault_id != self.vault {
            return Err(other(format!("server certificate is of vault {}", id.vault_id)));
        }
        self.expect.check(&id).map_err(other)?;
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug)]
struct VaultClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    revoked: Arc<RevocationList>,
}

impl ClientCertVerifier for VaultClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        self.revoked.check(end_entity)?;
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The trust of one process: the vault CA, its own live certificate, the revocation
/// list. Makes the rustls configs of its servers and clients.
#[derive(Clone, Debug)]
pub struct Trust {
    pub vault: crate::VaultId,
    pub ca_pem: String,
    pub identity: Arc<LiveIdentity>,
    pub revoked: Arc<RevocationList>,
}

impl Trust {
    /// A server config presenting the live identity, verifying clients against the CA
    /// and the revocation list; ALPN `h2` for gRPC (`alpn: false` for NBD).
    pub fn server_config(
        &self,
        auth: crate::tls::ClientAuth,
        alpn_h2: bool,
    ) -> Result<rustls::ServerConfig, CertError> {
        let builder =
            WebPkiClientVerifier::builder_with_provider(Arc::new(crate::tls::roots(&self.ca_pem)?), provider());
        let inner = match auth {
            crate::tls::ClientAuth::Required => builder.build(),
            crate::tls::ClientAuth::Optional => builder.allow_unauthenticated().build(),
        }
        .map_err(|e| CertError::parse("client verifier", e))?;
        let verifier = Arc::new(VaultClientVerifier { inner, revoked: self.revoked.clone() });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ServerResolver(self.identity.clone())));
        if alpn_h2 {
            cfg.alpn_protocols = vec![b"h2".to_vec()];
        }
        Ok(cfg)
    }

    /// A client config presenting the live identity (when `present`), requiring of
    /// the server the CA, the dialled name, an unrevoked serial and `expect`.
    pub fn client_config(&self, expect: Expect, present: bool) -> Result<rustls::ClientConfig, CertError> {
        client_config_with(&self.vault, &self.ca_pem, &self.revoked, expect, present.then_some(&self.identity))
    }
}

/// [`Trust::client_config`] without a process trust (the operator CLI, registration).
pub fn client_config_with(
    vault: &crate::VaultId,
    ca_pem: &str,
    revoked: &Arc<RevocationList>,
    expect: Expect,
    identity: Option<&Arc<LiveIdentity>>,
) -> Result<rustls::ClientConfig, CertError> {
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(crate::tls::roots(ca_pem)?), provider())
        .build()
        .map_err(|e| CertError::parse("server verifier", e))?;
    let verifier = Arc::new(VaultServerVerifier { inner, vault: vault.clone(), expect, revoked: revoked.clone() });
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder.with_client_cert_resolver(Arc::new(ClientResolver(id.clone()))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{LEAF_VALIDITY, ServerNames};
    use crate::{VaultCa, VaultId};

    #[test]
    fn a_short_lived_certificate_renews_in_its_future() {
        let vault = VaultId::generate();
        let ca = VaultCa::create(vault.clone(), "t").expect("ca");
        let id = PeerIdentity::new(vault, Role::Host, "h1").expect("id");
        let (cert, _) =
            ca.issue_local(&id, &ServerNames::default(), std::time::Duration::from_secs(30)).expect("issue");
        let (nb, na) = crate::ca::validity(&cert).expect("validity");
        let now = crate::unix_now();
        assert!(now - nb <= 4, "backdated by {}s", now - nb);
        assert!(renew_at(nb, na) > now + 10, "renewal due at once");
        let (long, _) = ca.issue_local(&id, &ServerNames::default(), LEAF_VALIDITY).expect("issue");
        let backdated = now - crate::ca::validity(&long).expect("validity").0;
        assert!((299..=301).contains(&backdated), "a year's certificate is backdated {backdated}s, not 5 minutes");
    }

    #[test]
    fn fingerprints_parse_in_the_forms_people_type() {
        let ca = VaultCa::create(VaultId::generate(), "t").expect("ca");
        let fp = fingerprint_of_pem(ca.cert_pem()).expect("fp");
        assert!(fp.starts_with("sha256:") && fp.len() == 7 + 64, "{fp}");
        let upper = format!("SHA256:{}", fp[7..].to_ascii_uppercase());
        assert_eq!(parse_fingerprint(&upper).expect("upper"), fp);
        let colons: Vec<String> =
            fp.as_bytes()[7..].chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
        assert_eq!(parse_fingerprint(&format!("sha256:{}", colons.join(":"))).expect("colons"), fp);
        assert!(parse_fingerprint("md5:00").is_err());
        assert!(parse_fingerprint("sha256:abcd").is_err());
    }

    #[test]
    fn live_identity_swaps_and_refuses_a_mismatched_key() {
        let vault = VaultId::generate();
        let ca = VaultCa::create(vault.clone(), "t").expect("ca");
        let id = PeerIdentity::new(vault, Role::Host, "h1").expect("id");
        let (c1, k1) = ca.issue_local(&id, &ServerNames::default(), LEAF_VALIDITY).expect("one");
        let (c2, k2) = ca.issue_local(&id, &ServerNames::default(), LEAF_VALIDITY).expect("two");
        let live = LiveIdentity::new(&PemIdentity { cert_pem: c1.clone(), key_pem: k1.clone() }).expect("live");
        let s1 = live.serial().expect("serial");
        assert!(live.replace(&PemIdentity { cert_pem: c2.clone(), key_pem: k1 }).is_err(), "mismatched key accepted");
        assert_eq!(live.serial().expect("serial"), s1);
        live.replace(&PemIdentity { cert_pem: c2, key_pem: k2 }).expect("swap");
        assert_ne!(live.serial().expect("serial"), s1);
        let (nb, na) = live.validity().expect("validity");
        assert_eq!(live.renew_at().expect("renew"), nb + (na - nb) * 2 / 3);
    }

    #[test]
    fn revocation_list_ignores_older_versions() {
        let list = RevocationList::new();
        assert!(list.replace(3, ["AB".to_string()]));
        assert!(list.is_revoked("ab"));
        assert!(!list.replace(2, Vec::<String>::new()), "an older list undid a newer one");
        assert!(list.is_revoked("ab"));
        list.insert("cd");
        assert_eq!(list.snapshot(), (4, vec!["ab".to_string(), "cd".to_string()]));
    }
}
