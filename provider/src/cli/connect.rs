//! Reaching the provider as an operator: the operator certificates of an OPDIR, the
//! mutual-TLS channel, and transport or RPC failures classified into sentences an
//! operator can act on (unreachable provider, certificates of another vault, an
//! expired certificate).

use std::path::Path;
use std::time::Duration;

use siterecovery_certs::files;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::CliError;

/// Parses "[scheme://]host:port" into the https URI and the host name for TLS.
fn endpoint_parts(address: &str) -> (String, String) {
    let bare = address.trim_start_matches("https://").trim_start_matches("http://");
    (format!("https://{bare}"), siterecovery_certs::host_of(bare).to_owned())
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
pub async fn connect(address: &str, certs: &OperatorCerts) -> Result<Channel, CliError> {
    siterecovery_certs::tls::install_crypto_provider();
    let (uri, host) = endpoint_parts(address);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&certs.ca_pem))
        .identity(Identity::from_pem(&certs.cert_pem, &certs.key_pem))
        .domain_name(host);
    let endpoint = Endpoint::from_shared(uri)
        .map_err(|e| CliError::Unreachable { address: address.into(), reason: e.to_string() })?
        .tls_config(tls)
        .map_err(|e| CliError::Tls { address: address.into(), reason: e.to_string() })?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(180));
    endpoint.connect().await.map_err(|e| classify_transport(address, &e))
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
    fn endpoints() {
        assert_eq!(endpoint_parts("127.0.0.1:7443"), ("https://127.0.0.1:7443".into(), "127.0.0.1".into()));
        assert_eq!(endpoint_parts("https://localhost:1"), ("https://localhost:1".into(), "localhost".into()));
    }
}
