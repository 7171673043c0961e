//! The vault PKI of siterecovery.
//!
//! A vault is a private certificate authority plus a registration secret. The CA key
//! stays in the provider's data dir; every provider, host and operator gets a leaf
//! certificate whose SAN URI `siterecovery://<vault-id>/<role>/<id>` is its identity.
//! Every call except registration is mutual TLS with certificates of one vault only.
//!
//! - [`identity`]: roles and the SAN URI, read back from a peer's certificate.
//! - [`ca`]: the vault CA: create, load, sign CSRs, issue local certificates.
//! - [`csr`]: key pair + CSR on the registering machine (the key never leaves it).
//! - [`vault_key`]: the vault key file handed to hosts to register.
//! - [`tls`]: rustls client/server configs that accept this vault's certificates only.
//! - [`live`]: what changes at run time: the own certificate (renewal), the revoked
//!   serials, and the identity a client requires of a server.
//! - [`transport`]: tonic servers and channels over those rustls configs.
//! - [`files`]: atomic writes with the right modes (private keys 0600).
//!
//! File formats: `docs/files.md` beside this crate.

pub mod ca;
pub mod csr;
pub mod files;
pub mod identity;
pub mod live;
pub mod tls;
pub mod transport;
pub mod vault_key;

pub use ca::VaultCa;
pub use identity::{PeerIdentity, Role, VaultId};
pub use vault_key::VaultKeyFile;

/// Everything that can go wrong in the vault PKI.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen refused to build or sign a certificate or request.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM or DER input could not be parsed.
    #[error("cannot parse {what}: {reason}")]
    Parse { what: &'static str, reason: String },
    /// The certificate carries no `siterecovery://` identity, or a malformed one.
    #[error("certificate has no valid siterecovery identity: {0}")]
    NoIdentity(String),
    /// The certificate is outside its validity period.
    #[error("certificate {what} is not valid now (valid {not_before} .. {not_after})")]
    NotValidNow { what: String, not_before: String, not_after: String },
    /// The vault key file's signature does not match its content.
    #[error("vault key file is tampered or corrupt: {0}")]
    Tampered(String),
    /// The vault key file's registration secret expired.
    #[error("vault key file expired at {0}")]
    Expired(String),
    /// rustls refused a configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CertError {
    pub(crate) fn parse(what: &'static str, reason: impl std::fmt::Display) -> Self {
        CertError::Parse { what, reason: reason.to_string() }
    }
}

/// Random lowercase hex of `bytes` random bytes (ids, secrets, serials).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    hex::encode(buf)
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The host part of `host:port` (brackets of an IPv6 literal removed): the name a TLS
/// client verifies the server certificate against.
pub fn host_of(address: &str) -> &str {
    let host = match address.rsplit_once(':') {
        Some((h, _)) => h,
        None => address,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod host_tests {
    #[test]
    fn host_part() {
        assert_eq!(super::host_of("127.0.0.1:7443"), "127.0.0.1");
        assert_eq!(super::host_of("[::1]:7443"), "::1");
        assert_eq!(super::host_of("hv1.example"), "hv1.example");
    }
}
