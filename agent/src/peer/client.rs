//! The mutual-TLS client side of this host: a channel to another host of the vault
//! (the sender's peer) or to the provider (the control channel), verified by the vault
//! CA and presenting this host's certificate.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::config::AgentFiles;

/// A TLS channel to `address` verified by the vault CA, presenting this host's certificate.
pub fn endpoint(address: &str, files: &AgentFiles) -> Result<Endpoint, tonic::transport::Error> {
    let host = siterecovery_certs::host_of(address).to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&files.ca_pem))
        .identity(Identity::from_pem(&files.identity.cert_pem, &files.identity.key_pem))
        .domain_name(host);
    Ok(Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20)))
}
