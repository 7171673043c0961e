//! Identities: `siterecovery://<vault-id>/<role>/<id>` in a certificate's SAN URI.
//!
//! The provider authorises every RPC from this identity, read from the verified peer
//! certificate (never from anything the peer says in a message).

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::CertError;

/// URI scheme of identities.
pub const SCHEME: &str = "siterecovery://";

/// What a certificate holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The management server.
    Provider,
    /// A hypervisor host running the agent.
    Host,
    /// A person or script using the admin API.
    Operator,
    /// A hypervisor's NBD client (QEMU's `tls-creds-x509`): may open the TLS NBD
    /// exports of the vault's hosts and nothing else.
    Nbd,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Provider => "provider",
            Role::Host => "host",
            Role::Operator => "operator",
            Role::Nbd => "nbd",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "provider" => Ok(Role::Provider),
            "host" => Ok(Role::Host),
            "operator" => Ok(Role::Operator),
            "nbd" => Ok(Role::Nbd),
            other => Err(CertError::NoIdentity(format!("unknown role {other:?}"))),
        }
    }
}

/// A vault's id: 16 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct VaultId(String);

impl VaultId {
    pub fn generate() -> Self {
        VaultId(crate::random_hex(8))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VaultId {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_token(s) {
            Ok(VaultId(s.to_owned()))
        } else {
            Err(CertError::NoIdentity(format!("invalid vault id {s:?}")))
        }
    }
}

impl fmt::Display for VaultId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Ids and names inside the URI: 1-64 of `[A-Za-z0-9._-]`.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub vault_id: VaultId,
    pub role: Role,
    /// Host id, operator name or provider id.
    pub id: String,
}

impl PeerIdentity {
    pub fn new(vault_id: VaultId, role: Role, id: impl Into<String>) -> Result<Self, CertError> {
        let id = id.into();
        if !is_token(&id) {
            return Err(CertError::NoIdentity(format!("invalid id {id:?}")));
        }
        Ok(Self { vault_id, role, id })
    }

    /// `siterecovery://<vault-id>/<role>/<id>`.
    pub fn uri(&self) -> String {
        format!("{SCHEME}{}/{}/{}", self.vault_id, self.role, self.id)
    }

    /// Parses an identity URI.
    pub fn parse_uri(uri: &str) -> Result<Self, CertError> {
        let rest =
            uri.strip_prefix(SCHEME).ok_or_else(|| CertError::NoIdentity(format!("not a {SCHEME} URI: {uri:?}")))?;
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(vault), Some(role), Some(id), None) => PeerIdentity::new(vault.parse()?, role.parse()?, id),
            _ => Err(CertError::NoIdentity(format!("malformed identity URI {uri:?}"))),
        }
    }

    /// Reads the identity from a DER certificate (the leaf a peer presented).
    ///
    /// Exactly one `siterecovery://` URI must be present.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, CertError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::parse("certificate", e))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| CertError::parse("certificate SAN", e))?
            .ok_or_else(|| CertError::NoIdentity("no subject alternative name".into()))?;
        let mut found = None;
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(SCHEME)
            {
                if found.is_some() {
                    return Err(CertError::NoIdentity("several identity URIs".into()));
                }
                found = Some(PeerIdentity::parse_uri(uri)?);
            }
        }
        found.ok_or_else(|| CertError::NoIdentity("no siterecovery:// URI in SAN".into()))
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let v: VaultId = "0123abcd0123abcd".parse().expect("vault id");
        let id = PeerIdentity::new(v, Role::Host, "hv1").expect("identity");
        assert_eq!(id.uri(), "siterecovery://0123abcd0123abcd/host/hv1");
        assert_eq!(PeerIdentity::parse_uri(&id.uri()).expect("parse"), id);
    }

    #[test]
    fn malformed_uris_are_refused() {
        for bad in [
            "https://x/host/h",
            "siterecovery://v/host",
            "siterecovery://v/admin/h",
            "siterecovery://v/host/h/extra",
            "siterecovery://v/host/",
            "siterecovery://v/host/a b",
        ] {
            assert!(PeerIdentity::parse_uri(bad).is_err(), "{bad}");
        }
    }
}
