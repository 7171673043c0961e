//! `agent register`: trade the vault key file's secret and a fresh CSR for a
//! certificate. The key pair is made here and only the CSR travels.
//!
//! Before anything is sent: the key file's signature, the pinned CA
//! (`--ca-fingerprint`, the fingerprint `provider vault create` printed; a forged key
//! file names another CA and is refused here, the way kubeadm pins a discovery CA),
//! the secret's expiry. The provider must then prove the `provider` role of that CA.
//!
//! `--reregister` renews the registration held in the data dir: the host's current
//! certificate and key are presented over mutual TLS (the provider allows
//! re-registering a name only so, or after an operator's `host reset`), and the new
//! credentials replace the old ones as one set only once the provider issued them. A
//! current certificate that expired, or that the provider refuses (revoked by the
//! reset), is not presented: the request goes without it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::csr::make_csr;
use siterecovery_certs::live::{self, Expect, LiveIdentity, RevocationList};
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::transport::{self, TlsConnector};
use siterecovery_certs::{PeerIdentity, Role, VaultKeyFile};
use siterecovery_proto::v1;
use siterecovery_proto::v1::registration_client::RegistrationClient;

use crate::config::{AgentConfig, AgentFiles, ConfigError};
use crate::peer::client::{chain, own_certificate_refused};

/// Why registration failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("vault key file {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        #[source]
        source: siterecovery_certs::CertError,
    },
    #[error(
        "the vault key file's CA is {found}, not the pinned {pinned}: this key file was not made by your vault \
         (nothing was sent)"
    )]
    CaMismatch { pinned: String, found: String },
    #[error("{0} already holds a registration; pass --reregister to replace it")]
    AlreadyRegistered(std::path::PathBuf),
    #[error("{dir} holds the registration of host {held:?}, not {asked:?}")]
    OtherHost { dir: std::path::PathBuf, held: String, asked: String },
    #[error("{dir} holds a registration of vault {held}, the key file is of vault {key}")]
    OtherVault { dir: std::path::PathBuf, held: String, key: String },
    #[error("cannot reach the provider at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("the provider refused the registration: {0}")]
    Refused(String),
    #[error("the provider answered with an unusable certificate: {0}")]
    BadCertificate(String),
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
    /// `sha256:HEX` of the vault CA, as `provider vault create` printed it.
    pub ca_fingerprint: Option<&'a str>,
}

/// Checks the key file's CA against the pinned fingerprint; without one, warns.
fn check_pin(key: &VaultKeyFile, pinned: Option<&str>) -> Result<(), RegisterError> {
    let found = live::fingerprint_of_pem(&key.content.ca_pem)?;
    match pinned {
        None => {
            tracing::warn!(
                ca = %found,
                "the vault CA was not pinned: compare this fingerprint with the one `provider vault create` printed, \
                 and pass --ca-fingerprint to refuse a forged vault key file"
            );
            Ok(())
        }
        Some(p) => {
            let pinned = live::parse_fingerprint(p)?;
            if pinned != found {
                return Err(RegisterError::CaMismatch { pinned, found });
            }
            Ok(())
        }
    }
}

/// The identity a re-registration presents: the data dir's current certificate, if it
/// holds a registration of this host and vault.
fn current_identity(a: &RegisterArgs<'_>, key: &VaultKeyFile) -> Result<Option<Arc<LiveIdentity>>, RegisterError> {
    if !a.data_dir.join("agent.json").exists() {
        return Ok(None);
    }
    if !a.reregister {
        return Err(RegisterError::AlreadyRegistered(a.data_dir.into()));
    }
    let files = AgentFiles::load(a.data_dir)?;
    if files.config.host_name != a.host {
        return Err(RegisterError::OtherHost {
            dir: a.data_dir.into(),
            held: files.config.host_name.clone(),
            asked: a.host.into(),
        });
    }
    if files.config.vault_id != key.content.vault_id.as_str() {
        return Err(RegisterError::OtherVault {
            dir: a.data_dir.into(),
            held: files.config.vault_id.clone(),
            key: key.content.vault_id.to_string(),
        });
    }
    Ok(Some(files.trust.identity.clone()))
}

/// The issued certificate is of this vault's CA, names `host/<host_id>` of this vault,
/// and goes with the key made here.
fn check_issued(key: &VaultKeyFile, host_id: &str, issued: &PemIdentity) -> Result<(), RegisterError> {
    let bad = |e: &dyn std::fmt::Display| RegisterError::BadCertificate(e.to_string());
    siterecovery_certs::tls::verify_issued_by(&key.content.ca_pem, &issued.cert_pem).map_err(|e| bad(&e))?;
    let der = siterecovery_certs::ca::first_cert_der(&issued.cert_pem).map_err(|e| bad(&e))?;
    let id = PeerIdentity::from_cert_der(&der).map_err(|e| bad(&e))?;
    if id.vault_id != key.content.vault_id || id.role != Role::Host || id.id != host_id {
        return Err(bad(&format!("it names {id} of vault {}, not host/{host_id}", id.vault_id)));
    }
    LiveIdentity::new(issued).map_err(|e| bad(&e))?;
    Ok(())
}

/// Why one attempt failed, and whether the provider refused the certificate presented.
struct Failed {
    error: RegisterError,
    own_certificate_refused: bool,
    /// The call failed below gRPC (no answer of the provider's): with TLS 1.3 a
    /// server's refusal of the client certificate arrives after the client's side of
    /// the handshake is done, and may surface only as a cancelled or reset request.
    transport: bool,
}

/// One Register call to the key file's provider, presenting `present` when given.
async fn call(
    key: &VaultKeyFile,
    present: Option<&Arc<LiveIdentity>>,
    req: v1::RegisterRequest,
) -> Result<v1::RegisterResponse, Failed> {
    let address = key.content.provider_address.as_str();
    let unreachable = |e: &(dyn std::error::Error + 'static)| Failed {
        error: RegisterError::Unreachable { address: address.to_owned(), reason: chain(e) },
        own_certificate_refused: own_certificate_refused(e),
        transport: true,
    };
    let plain = |error: RegisterError| Failed { error, own_certificate_refused: false, transport: false };
    let tls = live::client_config_with(
        &key.content.vault_id,
        &key.content.ca_pem,
        &RevocationList::new(),
        Expect::Role(Role::Provider),
        present,
    )
    .map_err(|e| plain(e.into()))?;
    let connector = TlsConnector::new(address, Arc::new(tls)).map_err(|e| plain(e.into()))?;
    let endpoint = transport::endpoint(address)
        .map_err(|e| unreachable(&e))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = transport::connect(endpoint, connector).await.map_err(|e| unreachable(&e))?;
    let resp = RegistrationClient::new(channel).register(req).await.map_err(|s| match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => unreachable(&s),
        _ => plain(RegisterError::Refused(s.message().to_owned())),
    })?;
    Ok(resp.into_inner())
}

/// The current certificate, unless it expired (the provider would refuse it at the
/// handshake; without it, re-registration needs an operator's `host reset`).
fn presentable(current: Option<Arc<LiveIdentity>>) -> Option<Arc<LiveIdentity>> {
    let id = current?;
    match siterecovery_certs::ca::check_valid_now("this host's certificate", &id.pem().cert_pem) {
        Ok(()) => Some(id),
        Err(e) => {
            tracing::warn!(
                "{e}: re-registering without it (the provider allows that only after `provider host reset`)"
            );
            None
        }
    }
}

pub async fn register(a: RegisterArgs<'_>) -> Result<AgentConfig, RegisterError> {
    let key_err = |source| RegisterError::KeyFile { path: a.vault_key.into(), source };
    let key = VaultKeyFile::read(a.vault_key).map_err(key_err)?;
    check_pin(&key, a.ca_fingerprint)?;
    key.check_not_expired().map_err(key_err)?;
    let present = presentable(current_identity(&a, &key)?);
    siterecovery_certs::tls::install_crypto_provider();
    let csr = make_csr(a.host)?;
    let req = v1::RegisterRequest {
        vault_id: key.content.vault_id.to_string(),
        secret: key.content.secret.clone(),
        csr_pem: csr.csr_pem.clone(),
        host_name: a.host.into(),
        site: a.site.into(),
        cloud: a.cloud.into(),
        listen_address: a.listen.into(),
        reregister: a.reregister,
        agent_version: crate::control::AGENT_VERSION.into(),
    };
    let resp = match call(&key, present.as_ref(), req.clone()).await {
        Ok(r) => r,
        // Revoked (an operator reset this host) or otherwise refused: the same request
        // without it, which the provider allows only after `provider host reset`.
        Err(f) if (f.own_certificate_refused || f.transport) && present.is_some() => {
            tracing::warn!(
                "the provider refused this host's current certificate or the call with it failed ({}); \
                 re-registering without it",
                f.error
            );
            match call(&key, None, req).await {
                Ok(r) => r,
                // Unreachable either way: the first failure says more.
                Err(again) if again.transport && !f.own_certificate_refused => return Err(f.error),
                Err(again) => return Err(again.error),
            }
        }
        Err(f) => return Err(f.error),
    };
    let issued = PemIdentity { cert_pem: resp.certificate_pem, key_pem: csr.key_pem };
    check_issued(&key, &resp.host_id, &issued)?;
    let config = AgentConfig {
        host_id: resp.host_id,
        host_name: a.host.into(),
        site: a.site.into(),
        cloud: a.cloud.into(),
        vault_id: key.content.vault_id.to_string(),
        provider_address: key.content.provider_address.clone(),
        listen_address: a.listen.into(),
        registered_unix: siterecovery_certs::unix_now(),
    };
    // One set: the old registration stays until the new one is complete on disk.
    AgentFiles::save(a.data_dir, &config, &key.content.ca_pem, &issued)?;
    Ok(config)
}
