//! The mutual-TLS client side of this host: a channel to another host of the vault
//! (the sender's peer, which must prove to be the relationship's replica host) or to
//! the provider (the control channel: the `provider` role), verified by the vault CA,
//! the dialled name and the revocation list, presenting this host's live certificate
//! (a renewed one from the next handshake on).

use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::live::{Expect, WrongPeer};
use siterecovery_certs::transport::{self, TlsConnector};
use tonic::transport::Channel;

use crate::config::AgentFiles;

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server's certificate is of this vault but names someone else than required.
    #[error("{address}: {found}")]
    WrongPeer { address: String, found: String },
    /// Refused, unreachable, or any other TLS failure (the reason in full).
    #[error("{address}: {reason}")]
    Failed { address: String, reason: String },
}

/// An error and its sources, one line (TLS errors hide the reason a few levels down).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.contains(&t) {
            s = format!("{s}: {t}");
        }
        src = x.source();
    }
    s
}

/// The first rustls error among `e`'s sources (an `io::Error` hides it as its payload).
fn tls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let inner: Option<&(dyn std::error::Error + 'static)> = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|i| i as &(dyn std::error::Error + 'static)),
            None => Some(err),
        };
        if let Some(t) = inner.and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Some(t);
        }
        cur = err.source();
    }
    None
}

/// The [`WrongPeer`] a handshake failed with, somewhere in `e`'s sources.
pub fn wrong_peer(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    match tls_error(e) {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) => {
            o.0.downcast_ref::<WrongPeer>().map(|w| w.0.clone())
        }
        _ => None,
    }
}

/// TLS alerts by which a server refuses the certificate a client presented.
const CERTIFICATE_ALERTS: [rustls::AlertDescription; 6] = [
    rustls::AlertDescription::CertificateRevoked,
    rustls::AlertDescription::CertificateExpired,
    rustls::AlertDescription::BadCertificate,
    rustls::AlertDescription::CertificateUnknown,
    rustls::AlertDescription::UnknownCA,
    rustls::AlertDescription::UnsupportedCertificate,
];

/// Whether the server refused the certificate this host presented (revoked, expired,
/// unknown): the TLS alert it sent back, somewhere in `e`'s sources. (Past the
/// handshake, rustls's reader hands the alert up as text only.)
pub fn own_certificate_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(rustls::Error::AlertReceived(a)) = tls_error(e) {
        return CERTIFICATE_ALERTS.contains(a);
    }
    let text = chain(e);
    CERTIFICATE_ALERTS.iter().any(|a| text.contains(&rustls::Error::AlertReceived(*a).to_string()))
}

/// A channel to `address` whose server must be `expect`; connected now (the
/// handshake's verdict is this call's).
pub async fn connect(address: &str, expect: Expect, files: &AgentFiles) -> Result<Channel, ConnectError> {
    let failed = |reason: String| ConnectError::Failed { address: address.to_owned(), reason };
    let config = files.trust.client_config(expect, true).map_err(|e| failed(e.to_string()))?;
    let connector = TlsConnector::new(address, Arc::new(config)).map_err(|e| failed(e.to_string()))?;
    let endpoint = transport::endpoint(address)
        .map_err(|e| failed(chain(&e)))?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    transport::connect(endpoint, connector).await.map_err(|e| match wrong_peer(&e) {
        Some(found) => ConnectError::WrongPeer { address: address.to_owned(), found },
        None => failed(chain(&e)),
    })
}
