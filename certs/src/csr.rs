//! The registering side: a fresh key pair and a PKCS#10 request for it.
//!
//! The private key is written only to the registering machine's data dir; the CA
//! decides every field of the certificate, so the request carries only the key.

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::CertError;

/// A key pair and a CSR for it, both PEM.
pub struct KeyAndCsr {
    /// PKCS#8 private key, PEM: keep it on this machine (mode 0600).
    pub key_pem: String,
    pub csr_pem: String,
}

/// Makes an ECDSA P-256 key pair and a CSR with `common_name` as subject.
pub fn make_csr(common_name: &str) -> Result<KeyAndCsr, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok(KeyAndCsr { key_pem: key.serialize_pem(), csr_pem: csr.pem()? })
}
