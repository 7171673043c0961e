//! The agent's data dir: its registration, its credentials and its trust.
//!
//! Layout (documented in `docs/data-dir.md`): `agent.json` ([`AgentConfig`]),
//! `ca.pem` (vault CA), `host.pem` (this host's certificate), `host.key` (0600, made
//! here at registration or renewal and never sent anywhere), `revoked.json` (the
//! vault's revoked serials, [`revoked`]), `vms/<name>/` (one folder per VM).
//!
//! [`AgentFiles::load`] turns the files into the process's live [`Trust`]: the
//! certificate it presents ([`siterecovery_certs::live::LiveIdentity`], replaced at
//! renewal without a restart) and the revocation list every handshake reads. The
//! credential files are replaced as one set ([`credentials`]): a crash leaves the old
//! set or the new one.

pub mod credentials;
pub mod revoked;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use siterecovery_certs::files;
use siterecovery_certs::live::{LiveIdentity, RevocationList, Trust};
use siterecovery_certs::tls::PemIdentity;

use crate::persist::PersistError;
use credentials::{CredentialFile, HOST_CERT, HOST_KEY};

/// Failure to read or write the agent's data dir.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} holds no registration (run `agent register` first)")]
    NotRegistered(PathBuf),
    #[error("{path} is not a valid agent.json: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Cert(#[from] siterecovery_certs::CertError),
    #[error(transparent)]
    State(#[from] PersistError),
}

/// `agent.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentConfig {
    pub host_id: String,
    pub host_name: String,
    pub site: String,
    pub cloud: String,
    pub vault_id: String,
    pub provider_address: String,
    /// host:port of the peer (mutual TLS) listener.
    pub listen_address: String,
    pub registered_unix: i64,
}

/// Everything `agent serve` loads from the data dir, and the live trust made of it.
pub struct AgentFiles {
    pub dir: PathBuf,
    pub config: AgentConfig,
    pub ca_pem: String,
    /// The vault CA, this host's live certificate and the revocation list: every
    /// server and client config of the agent is made from it.
    pub trust: Trust,
    /// Serialises the writes of credentials and of the revocation list.
    writes: Mutex<()>,
}

impl std::fmt::Debug for AgentFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentFiles").field("dir", &self.dir).field("config", &self.config).finish_non_exhaustive()
    }
}

/// The JSON of `agent.json`.
fn config_json(dir: &Path, config: &AgentConfig) -> Result<Vec<u8>, ConfigError> {
    serde_json::to_vec_pretty(config)
        .map_err(|e| ConfigError::Invalid { path: dir.join("agent.json"), reason: e.to_string() })
}

impl AgentFiles {
    /// Loads the registration, finishing (or undoing) a credential replacement a crash
    /// interrupted first.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        credentials::recover(dir)?;
        let path = dir.join("agent.json");
        if !path.exists() {
            return Err(ConfigError::NotRegistered(dir.to_path_buf()));
        }
        let config: AgentConfig = serde_json::from_str(&files::read_text(&path)?)
            .map_err(|e| ConfigError::Invalid { path: path.clone(), reason: e.to_string() })?;
        let vault = config
            .vault_id
            .parse()
            .map_err(|e| ConfigError::Invalid { path: path.clone(), reason: format!("vault_id: {e}") })?;
        let ca_pem = files::read_text(&dir.join("ca.pem"))?;
        let identity = PemIdentity {
            cert_pem: files::read_text(&dir.join(HOST_CERT))?,
            key_pem: files::read_text(&dir.join(HOST_KEY))?,
        };
        let revoked = RevocationList::new();
        if let Some(list) = revoked::load(dir)? {
            revoked.replace(list.version, list.serials);
        }
        let trust = Trust { vault, ca_pem: ca_pem.clone(), identity: LiveIdentity::new(&identity)?, revoked };
        Ok(Self { dir: dir.to_path_buf(), config, ca_pem, trust, writes: Mutex::new(()) })
    }

    /// Writes a registration as one set: `agent.json`, `ca.pem`, `host.pem`, `host.key`.
    /// A crash leaves the previous registration (or none) or the whole new one.
    pub fn save(dir: &Path, config: &AgentConfig, ca_pem: &str, identity: &PemIdentity) -> Result<(), ConfigError> {
        files::create_private_dir(dir)?;
        let json = config_json(dir, config)?;
        credentials::replace(
            dir,
            &[
                CredentialFile::private(HOST_KEY, identity.key_pem.as_bytes()),
                CredentialFile::public(HOST_CERT, identity.cert_pem.as_bytes()),
                CredentialFile::public("ca.pem", ca_pem.as_bytes()),
                CredentialFile::private("agent.json", &json),
            ],
        )?;
        Ok(())
    }

    /// The certificate and key presented now (they change at renewal).
    pub fn identity(&self) -> PemIdentity {
        self.trust.identity.pem()
    }

    /// Takes a renewed certificate: `host.key` and `host.pem` replaced as a pair, then
    /// presented from the next handshake on. Fails, changing nothing, when the key does
    /// not match the certificate.
    pub fn renewed(&self, identity: &PemIdentity) -> Result<(), ConfigError> {
        // The pair is checked before anything is written.
        LiveIdentity::new(identity)?;
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        credentials::replace(
            &self.dir,
            &[
                CredentialFile::private(HOST_KEY, identity.key_pem.as_bytes()),
                CredentialFile::public(HOST_CERT, identity.cert_pem.as_bytes()),
            ],
        )?;
        self.trust.identity.replace(identity)?;
        Ok(())
    }

    /// Reads `host.pem` and `host.key` again (`systemctl reload`) and presents them from
    /// the next handshake when they differ from the certificate presented now. Returns
    /// whether it changed; a pair that does not match changes nothing.
    pub fn reload_identity(&self) -> Result<bool, ConfigError> {
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        credentials::recover(&self.dir)?;
        let on_disk = PemIdentity {
            cert_pem: files::read_text(&self.dir.join(HOST_CERT))?,
            key_pem: files::read_text(&self.dir.join(HOST_KEY))?,
        };
        let now = self.trust.identity.pem();
        if on_disk.cert_pem == now.cert_pem && on_disk.key_pem == now.key_pem {
            return Ok(false);
        }
        self.trust.identity.replace(&on_disk)?;
        Ok(true)
    }

    /// Applies the provider's revocation list when it is newer than the one held (or
    /// the same version with other serials), and keeps it in `revoked.json`. Returns
    /// whether anything changed.
    pub fn apply_revocations(&self, version: u64, serials: Vec<String>) -> Result<bool, ConfigError> {
        let _w = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut wanted: Vec<String> = serials.iter().map(|s| s.to_ascii_lowercase()).collect();
        wanted.sort();
        wanted.dedup();
        if self.trust.revoked.snapshot() == (version, wanted.clone()) {
            return Ok(false);
        }
        if !self.trust.revoked.replace(version, wanted) {
            return Ok(false);
        }
        let (version, serials) = self.trust.revoked.snapshot();
        revoked::save(&self.dir, &revoked::Revoked { version, serials })?;
        Ok(true)
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.dir.join("vms")
    }
}
