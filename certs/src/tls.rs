//! rustls configurations that accept certificates of one vault only.
//!
//! The only trust anchor is the vault CA, so a certificate of another vault fails the
//! handshake. Servers either require a client certificate, or (the provider, whose
//! Registration service is called before a host has one) accept a missing one and
//! leave authorisation to each RPC, which reads the identity from the verified leaf.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::CertError;

/// Whether a server asks for a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// The handshake fails without a valid client certificate of this vault.
    Required,
    /// A client may come without a certificate; one it presents must be valid.
    Optional,
}

/// Certificate chain and key, PEM.
#[derive(Clone)]
pub struct PemIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for PemIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemIdentity").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider (tonic's server needs one).
/// A second call is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub(crate) fn roots(ca_pem: &str) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| CertError::parse("CA certificate", e))?;
        roots.add(cert)?;
    }
    if roots.is_empty() {
        return Err(CertError::parse("CA certificate", "no certificate in PEM"));
    }
    Ok(roots)
}

fn chain_and_key(id: &PemIdentity) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CertError> {
    let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::parse("certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(|e| CertError::parse("private key", e))?;
    Ok((chain, key))
}

/// A TLS 1.2/1.3 server config presenting `id`, verifying clients against `ca_pem`,
/// with ALPN `h2` for gRPC.
pub fn server_config(ca_pem: &str, id: &PemIdentity, auth: ClientAuth) -> Result<rustls::ServerConfig, CertError> {
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider());
    let verifier = match auth {
        ClientAuth::Required => builder.build(),
        ClientAuth::Optional => builder.allow_unauthenticated().build(),
    }
    .map_err(|e| CertError::parse("client verifier", e))?;
    let (chain, key) = chain_and_key(id)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// A client config trusting only `ca_pem`, presenting `id` when given.
pub fn client_config(ca_pem: &str, id: Option<&PemIdentity>) -> Result<rustls::ClientConfig, CertError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?);
    let mut cfg = match id {
        Some(id) => {
            let (chain, key) = chain_and_key(id)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Checks that the leaf certificate in `leaf_pem` was issued by the CA in `ca_pem` and
/// is valid now (what a server of this vault will check at the handshake).
pub fn verify_issued_by(ca_pem: &str, leaf_pem: &str) -> Result<(), CertError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .build()
        .map_err(|e| CertError::parse("client verifier", e))?;
    let chain = CertificateDer::pem_slice_iter(leaf_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::parse("certificate", e))?;
    let (leaf, rest) = chain.split_first().ok_or_else(|| CertError::parse("certificate", "no certificate in PEM"))?;
    verifier.verify_client_cert(leaf, rest, rustls::pki_types::UnixTime::now())?;
    Ok(())
}

/// The identity in the leaf of a verified peer chain (leaf first, as rustls and tonic give it).
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<crate::PeerIdentity, CertError> {
    let leaf = chain.first().ok_or_else(|| crate::CertError::NoIdentity("peer presented no certificate".into()))?;
    crate::PeerIdentity::from_cert_der(leaf)
}
