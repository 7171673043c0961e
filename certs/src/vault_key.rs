//! The vault key file: what an operator copies to a host so it can register.
//!
//! JSON (format documented in `docs/files.md`): vault id and name, the provider's
//! address, the CA certificate, the registration secret and its expiry, and a signature
//! by the CA key over all of it. A host checks the signature against the CA certificate
//! in the file before it trusts the address; a file whose content was changed after it
//! was made (address redirected, secret or expiry edited) is refused locally, and a file
//! whose CA was swapped fails at the TLS handshake with the real provider.

use std::io::Read;
use std::path::Path;

use ring::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::ca::{VaultCa, public_key_bits};
use crate::identity::VaultId;
use crate::{CertError, files};

/// `format` field of the file.
pub const FORMAT: &str = "siterecovery-vault-key";
/// Current version of the file format.
pub const VERSION: u32 = 1;
/// Default lifetime of a registration secret (as ASR's registration key).
pub const DEFAULT_EXPIRY_SECS: i64 = 5 * 24 * 3600;
/// Largest vault key file we read.
const MAX_LEN: u64 = 64 * 1024;

/// The signed content of a vault key file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultKeyContent {
    pub format: String,
    pub version: u32,
    pub vault_id: VaultId,
    pub vault_name: String,
    /// host:port of the provider's gRPC endpoint.
    pub provider_address: String,
    pub ca_pem: String,
    /// Hex registration secret; one use per host name.
    pub secret: String,
    /// Unix seconds after which the secret is refused.
    pub expires_unix: i64,
}

/// A vault key file: content and the CA's signature over its canonical JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultKeyFile {
    #[serde(flatten)]
    pub content: VaultKeyContent,
    /// Hex ECDSA P-256 SHA-256 signature (ASN.1) by the vault CA over the canonical
    /// JSON of `content` (fields in declaration order, no whitespace).
    pub signature: String,
}

impl VaultKeyFile {
    /// Makes and signs a vault key file.
    pub fn new(
        ca: &VaultCa,
        vault_name: &str,
        provider_address: &str,
        secret: &str,
        expires_unix: i64,
    ) -> Result<Self, CertError> {
        let content = VaultKeyContent {
            format: FORMAT.into(),
            version: VERSION,
            vault_id: ca.vault_id().clone(),
            vault_name: vault_name.into(),
            provider_address: provider_address.into(),
            ca_pem: ca.cert_pem().into(),
            secret: secret.into(),
            expires_unix,
        };
        let msg = canonical(&content)?;
        Ok(Self { signature: hex::encode(ca.sign(&msg)?), content })
    }

    /// Parses and verifies a vault key file's text: format, version, signature. Expiry
    /// is checked separately ([`VaultKeyFile::check_not_expired`]) so the caller can say which.
    pub fn parse(text: &str) -> Result<Self, CertError> {
        if text.len() as u64 > MAX_LEN {
            return Err(CertError::Tampered(format!("{} bytes, larger than any vault key file", text.len())));
        }
        let file: VaultKeyFile =
            serde_json::from_str(text).map_err(|e| CertError::Tampered(format!("not a vault key file: {e}")))?;
        if file.content.format != FORMAT {
            return Err(CertError::Tampered(format!("format is {:?}, expected {FORMAT:?}", file.content.format)));
        }
        if file.content.version != VERSION {
            return Err(CertError::Tampered(format!("unsupported version {}", file.content.version)));
        }
        let sig = hex::decode(&file.signature).map_err(|_| CertError::Tampered("signature is not hex".into()))?;
        let key =
            public_key_bits(&file.content.ca_pem).map_err(|e| CertError::Tampered(format!("CA certificate: {e}")))?;
        let msg = canonical(&file.content)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key)
            .verify(&msg, &sig)
            .map_err(|_| CertError::Tampered("signature does not match the content".into()))?;
        Ok(file)
    }

    /// Reads and verifies a vault key file.
    pub fn read(path: &Path) -> Result<Self, CertError> {
        let len = std::fs::metadata(path).map_err(|e| CertError::Io { path: path.into(), source: e })?.len();
        if len > MAX_LEN {
            return Err(CertError::Tampered(format!(
                "{} is {len} bytes, larger than any vault key file",
                path.display()
            )));
        }
        // Bounded read: the size checked above may change (a growing file, a FIFO).
        let io = |source| CertError::Io { path: path.into(), source };
        let mut text = String::new();
        std::fs::File::open(path).and_then(|f| f.take(MAX_LEN + 1).read_to_string(&mut text)).map_err(io)?;
        Self::parse(&text)
    }

    /// Writes the file (0600: it holds the registration secret).
    pub fn write(&self, path: &Path) -> Result<(), CertError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| CertError::parse("vault key file", e))?;
        files::write_private(path, text.as_bytes())
    }

    /// Errors with [`CertError::Expired`] once the secret's expiry has passed.
    pub fn check_not_expired(&self) -> Result<(), CertError> {
        if crate::unix_now() >= self.content.expires_unix {
            let at = time::OffsetDateTime::from_unix_timestamp(self.content.expires_unix)
                .map(|t| t.to_string())
                .unwrap_or_else(|_| self.content.expires_unix.to_string());
            return Err(CertError::Expired(at));
        }
        Ok(())
    }
}

fn canonical(content: &VaultKeyContent) -> Result<Vec<u8>, CertError> {
    serde_json::to_vec(content).map_err(|e| CertError::parse("vault key content", e))
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (VaultCa, VaultKeyFile) {
        let ca = VaultCa::create(VaultId::generate(), "contoso").expect("ca");
        let f = VaultKeyFile::new(&ca, "contoso", "127.0.0.1:7443", "s3cret", crate::unix_now() + 60).expect("file");
        (ca, f)
    }

    #[test]
    fn round_trip_and_verify() {
        let (_, f) = sample();
        let text = serde_json::to_string_pretty(&f).expect("json");
        assert_eq!(VaultKeyFile::parse(&text).expect("parse"), f);
        f.check_not_expired().expect("fresh");
    }

    #[test]
    fn tampering_is_detected() {
        let (_, f) = sample();
        let text = serde_json::to_string_pretty(&f).expect("json");
        for (from, to) in [("127.0.0.1:7443", "10.6.6.6:7443"), ("s3cret", "s3creT"), ("contoso", "fabrikam")] {
            let bad = text.replace(from, to);
            assert!(matches!(VaultKeyFile::parse(&bad), Err(CertError::Tampered(_))), "{from}");
        }
        let mut g = f.clone();
        g.content.expires_unix += 1000;
        let bad = serde_json::to_string(&g).expect("json");
        assert!(matches!(VaultKeyFile::parse(&bad), Err(CertError::Tampered(_))));
        assert!(VaultKeyFile::parse("{}").is_err());
        assert!(VaultKeyFile::parse("\u{0}garbage").is_err());
    }

    #[test]
    fn expiry() {
        let ca = VaultCa::create(VaultId::generate(), "c").expect("ca");
        let f = VaultKeyFile::new(&ca, "c", "127.0.0.1:1", "s", crate::unix_now() - 1).expect("file");
        assert!(matches!(f.check_not_expired(), Err(CertError::Expired(_))));
    }
}
