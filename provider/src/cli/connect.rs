//! Reaching the provider as an operator: the operator certificates of an OPDIR, the
//! mutual-TLS channel, and transport or RPC failures classified into sentences an
//! operator can act on (unreachable provider, certificates of another vault, an
//! expired certificate).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::live::{Expect, LiveIdentity, RevocationList, client_config_with};
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::transport::{self, TlsConnector};
use siterecovery_certs::{PeerIdentity, Role, files};
use tonic::transport::Channel;

use super::CliError;

/// Strips a scheme from "[scheme://]host:port": what the connector dials.
fn bare_address(address: &str) -> &str {
    address.trim_start_matches("https://").trim_start_matches("http://")
}

/// Operator credentials from an OPDIR made by `provider operator-cert`.
pub struct OperatorCerts {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl OperatorCerts {
    pub fn load(dir: &Path) -> Result<Self, CliError> {
        let read = |name: &str| {
            files::read_text(&dir.join(name))
                .map_err(|e| CliError::Certs { dir: dir.to_path_buf(), reason: e.to_string() })
        };
        let certs = Self { ca_pem: read("ca.pem")?, cert_pem: read("op.pem")?, key_pem: read("op.key")? };
        siterecovery_certs::ca::check_valid_now("op.pem", &certs.cert_pem)
            .map_err(|e| CliError::Expired { path: dir.join("op.pem"), reason: e.to_string() })?;
        // A certificate of another vault would be refused at the handshake, and with
        // TLS 1.3 that shows only as a broken first call: say it plainly now.
        siterecovery_certs::tls::verify_issued_by(&certs.ca_pem, &certs.cert_pem).map_err(|e| CliError::Certs {
            dir: dir.to_path_buf(),
            reason: format!(
                "op.pem was not issued by the vault CA in ca.pem ({e}); are these certificates of this vault?"
            ),
        })?;
        Ok(certs)
    }
}

/// Connects with mutual TLS; the handshake happens here, so a refusal is reported now.
/// The server must present a certificate of the operator's vault with the `provider`
/// role for the dialled name (not merely one the CA signed).
pub async fn connect(address: &str, certs: &OperatorCerts) -> Result<Channel, CliError> {
    siterecovery_certs::tls::install_crypto_provider();
    let bare = bare_address(address);
    let tls_err = |reason: String| CliError::Tls { address: address.into(), reason };
    let own = siterecovery_certs::ca::first_cert_der(&certs.cert_pem)
        .and_then(|der| PeerIdentity::from_cert_der(&der))
        .map_err(|e| tls_err(format!("op.pem: {e}")))?;
    let identity = LiveIdentity::new(&PemIdentity { cert_pem: certs.cert_pem.clone(), key_pem: certs.key_pem.clone() })
        .map_err(|e| tls_err(format!("op.pem/op.key: {e}")))?;
    // The operator CLI keeps no revocation list: a revoked provider certificate is
    // refused by the agents, and the provider renews its own.
    let config = client_config_with(
        &own.vault_id,
        &certs.ca_pem,
        &RevocationList::new(),
        Expect::Role(Role::Provider),
        Some(&identity),
    )
    .map_err(|e| tls_err(e.to_string()))?;
    let connector = TlsConnector::new(bare, Arc::new(config)).map_err(|e| tls_err(e.to_string()))?;
    let endpoint = transport::endpoint(bare)
        .map_err(|e| CliError::Unreachable { address: address.into(), reason: e.to_string() })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(180));
    transport::connect(endpoint, connector).await.map_err(|e| classify_transport(address, &e))
}

/// Describes a transport error with its whole source chain, classified.
pub fn classify_transport(address: &str, e: &(dyn std::error::Error + 'static)) -> CliError {
    let mut reason = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        reason = format!("{reason}: {s}");
        src = s.source();
    }
    let lower = reason.to_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") || lower.contains("alert")
    {
        CliError::Tls { address: address.into(), reason }
    } else {
        CliError::Unreachable { address: address.into(), reason }
    }
}

/// Turns an RPC status into an operator-facing error.
pub fn rpc_error(address: &str, s: tonic::Status) -> CliError {
    use tonic::Code;
    match s.code() {
        Code::Unavailable | Code::Unknown if s.message().contains("transport") || s.message().contains("connect") => {
            classify_transport(address, &s)
        }
        Code::Unauthenticated | Code::PermissionDenied => CliError::Rpc(format!("refused: {}", s.message())),
        Code::Cancelled | Code::Unknown | Code::Unavailable
            if s.message().contains("cancel")
                || s.message().contains("broken pipe")
                || s.message().contains("reset") =>
        {
            CliError::Tls {
                address: address.into(),
                reason: format!(
                    "the provider closed the connection ({}); it may have refused our certificate",
                    s.message()
                ),
            }
        }
        _ => CliError::Rpc(s.message().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(bare_address("127.0.0.1:7443"), "127.0.0.1:7443");
        assert_eq!(bare_address("https://localhost:1"), "localhost:1");
    }
}
