//! `agent register`: trade the vault key file's secret and a fresh CSR for a
//! certificate. The key pair is made here and only the CSR travels.

use std::path::Path;
use std::time::Duration;

use siterecovery_certs::VaultKeyFile;
use siterecovery_certs::csr::make_csr;
use siterecovery_certs::tls::PemIdentity;
use siterecovery_proto::v1;
use siterecovery_proto::v1::registration_client::RegistrationClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::config::{AgentConfig, AgentFiles, ConfigError};

/// Why registration failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("vault key file {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        #[source]
        source: siterecovery_certs::CertError,
    },
    #[error("{0} already holds a registration; pass --reregister to replace it")]
    AlreadyRegistered(std::path::PathBuf),
    #[error("cannot reach the provider at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the provider refused the registration: {0}")]
    Refused(String),
    #[error(transparent)]
    Cert(#[from] siterecovery_certs::CertError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

pub struct RegisterArgs<'a> {
    pub vault_key: &'a Path,
    pub host: &'a str,
    pub site: &'a str,
    pub cloud: &'a str,
    pub data_dir: &'a Path,
    pub listen: &'a str,
    pub reregister: bool,
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s = format!("{s}: {x}");
        src = x.source();
    }
    s
}

pub async fn register(a: RegisterArgs<'_>) -> Result<AgentConfig, RegisterError> {
    let key = VaultKeyFile::read(a.vault_key)
        .map_err(|source| RegisterError::KeyFile { path: a.vault_key.into(), source })?;
    key.check_not_expired().map_err(|source| RegisterError::KeyFile { path: a.vault_key.into(), source })?;
    if a.data_dir.join("agent.json").exists() && !a.reregister {
        return Err(RegisterError::AlreadyRegistered(a.data_dir.into()));
    }
    siterecovery_certs::tls::install_crypto_provider();
    let csr = make_csr(a.host)?;
    let address = key.content.provider_address.clone();
    let host = siterecovery_certs::host_of(&address).to_owned();
    let unreachable = |e: &(dyn std::error::Error + 'static)| RegisterError::Unreachable {
        address: address.clone(),
        reason: chain(e),
    };
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&key.content.ca_pem)).domain_name(host);
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| unreachable(&e))?
        .tls_config(tls)
        .map_err(|e| unreachable(&e))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .map_err(|e| unreachable(&e))?;
    let resp = RegistrationClient::new(channel)
        .register(v1::RegisterRequest {
            vault_id: key.content.vault_id.to_string(),
            secret: key.content.secret.clone(),
            csr_pem: csr.csr_pem,
            host_name: a.host.into(),
            site: a.site.into(),
            cloud: a.cloud.into(),
            listen_address: a.listen.into(),
            reregister: a.reregister,
            agent_version: crate::control::AGENT_VERSION.into(),
        })
        .await
        .map_err(|s| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown => unreachable(&s),
            _ => RegisterError::Refused(s.message().to_owned()),
        })?
        .into_inner();
    let config = AgentConfig {
        host_id: resp.host_id,
        host_name: a.host.into(),
        site: a.site.into(),
        cloud: a.cloud.into(),
        vault_id: key.content.vault_id.to_string(),
        provider_address: address,
        listen_address: a.listen.into(),
        registered_unix: siterecovery_certs::unix_now(),
    };
    AgentFiles::save(
        a.data_dir,
        &config,
        &key.content.ca_pem,
        &PemIdentity { cert_pem: resp.certificate_pem, key_pem: csr.key_pem },
    )?;
    Ok(config)
}
