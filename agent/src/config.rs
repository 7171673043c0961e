//! The agent's data dir: its registration and its credentials.
//!
//! Layout (documented in `docs/data-dir.md`): `agent.json` ([`AgentConfig`]),
//! `ca.pem` (vault CA), `host.pem` (this host's certificate), `host.key` (0600, made
//! here at registration and never sent anywhere), `vms/<name>/` (one folder per VM).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use siterecovery_certs::files;
use siterecovery_certs::tls::PemIdentity;

/// Failure to read or write the agent's data dir.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} holds no registration (run `agent register` first)")]
    NotRegistered(PathBuf),
    #[error("{path} is not a valid agent.json: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Cert(#[from] siterecovery_certs::CertError),
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

/// Everything `agent serve` loads from the data dir.
pub struct AgentFiles {
    pub dir: PathBuf,
    pub config: AgentConfig,
    pub ca_pem: String,
    pub identity: PemIdentity,
}

impl AgentFiles {
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let path = dir.join("agent.json");
        if !path.exists() {
            return Err(ConfigError::NotRegistered(dir.to_path_buf()));
        }
        let config: AgentConfig = serde_json::from_str(&files::read_text(&path)?)
            .map_err(|e| ConfigError::Invalid { path: path.clone(), reason: e.to_string() })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            ca_pem: files::read_text(&dir.join("ca.pem"))?,
            identity: PemIdentity {
                cert_pem: files::read_text(&dir.join("host.pem"))?,
                key_pem: files::read_text(&dir.join("host.key"))?,
            },
        })
    }

    /// Writes a registration: key first, `agent.json` last (its presence means complete).
    pub fn save(dir: &Path, config: &AgentConfig, ca_pem: &str, identity: &PemIdentity) -> Result<(), ConfigError> {
        files::create_private_dir(dir)?;
        files::write_private(&dir.join("host.key"), identity.key_pem.as_bytes())?;
        files::write_public(&dir.join("host.pem"), identity.cert_pem.as_bytes())?;
        files::write_public(&dir.join("ca.pem"), ca_pem.as_bytes())?;
        let json = serde_json::to_vec_pretty(config)
            .map_err(|e| ConfigError::Invalid { path: dir.join("agent.json"), reason: e.to_string() })?;
        files::write_private(&dir.join("agent.json"), &json)?;
        Ok(())
    }

    pub fn vms_dir(&self) -> PathBuf {
        self.dir.join("vms")
    }
}
