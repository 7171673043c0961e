//! The vault on the provider: its data dir, the CA, the provider's own certificate,
//! the registration secret, and operator certificates.
//!
//! Data dir layout (see `docs/data-dir.md`):
//! `vault.json` (id, name, address) · `ca.pem` · `ca.key` (0600) · `provider.pem` ·
//! `provider.key` (0600) · `store.redb`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use siterecovery_certs::ca::{LEAF_VALIDITY, ServerNames};
use siterecovery_certs::tls::PemIdentity;
use siterecovery_certs::vault_key::{DEFAULT_EXPIRY_SECS, VaultKeyFile};
use siterecovery_certs::{CertError, PeerIdentity, Role, VaultCa, VaultId, files};

use crate::store::{Store, StoreError};

/// Failure to create or open a vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{0} already holds a vault; choose another --data-dir")]
    Exists(PathBuf),
    #[error("{0} holds no vault (run `provider vault create` first)")]
    Missing(PathBuf),
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// `vault.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaultInfo {
    pub vault_id: VaultId,
    pub name: String,
    /// host:port agents and operators use to reach the provider.
    pub address: String,
    pub created_unix: i64,
}

/// The registration secret as the store keeps it: only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretRecord {
    pub sha256: String,
    pub expires_unix: i64,
}

/// The current registration secret's digest, in the data dir (0600). A file rather than
/// a store record so `provider vault key` works while `provider serve` holds the store.
pub const SECRET_FILE: &str = "registration.json";

/// Reads the current registration secret record.
pub fn read_secret(dir: &Path) -> Result<SecretRecord, VaultError> {
    let path = dir.join(SECRET_FILE);
    serde_json::from_str(&files::read_text(&path)?)
        .map_err(|e| VaultError::Invalid { what: "registration.json", why: e.to_string() })
}

/// The CA's SHA-256 fingerprint (`sha256:<hex>`) of the vault in `dir`, from `ca.pem`
/// alone (no private key read): what `agent register --ca-fingerprint` pins.
pub fn ca_fingerprint(dir: &Path) -> Result<String, VaultError> {
    if !dir.join("vault.json").exists() {
        return Err(VaultError::Missing(dir.to_path_buf()));
    }
    let pem = files::read_text(&dir.join("ca.pem"))?;
    Ok(siterecovery_certs::live::fingerprint_of_pem(&pem)?)
}

/// An opened vault: everything `provider serve` needs.
pub struct Vault {
    pub dir: PathBuf,
    pub info: VaultInfo,
    pub ca: VaultCa,
    pub provider_identity: PemIdentity,
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

fn check_address(address: &str) -> Result<(), VaultError> {
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => Err(VaultError::Invalid { what: "address", why: format!("{address:?} is not HOST:PORT") }),
    }
}

/// Creates a vault in `dir` and writes the vault key file to `key_out`.
pub fn create(dir: &Path, name: &str, address: &str, key_out: &Path, expiry: Duration) -> Result<Vault, VaultError> {
    if !siterecovery_certs::identity::is_token(name) {
        return Err(VaultError::Invalid {
            what: "vault name",
            why: format!("{name:?}: use 1-64 of A-Z a-z 0-9 . _ -"),
        });
    }
    check_address(address)?;
    if dir.join("vault.json").exists() {
        return Err(VaultError::Exists(dir.to_path_buf()));
    }
    files::create_private_dir(dir)?;
    let vault_id = VaultId::generate();
    let ca = VaultCa::create(vault_id.clone(), name)?;
    let provider_id = PeerIdentity::new(vault_id.clone(), Role::Provider, "provider")?;
    let (cert_pem, key_pem) = ca.issue_local(&provider_id, &ServerNames::for_address(address)?, LEAF_VALIDITY)?;
    files::write_public(&dir.join("ca.pem"), ca.cert_pem().as_bytes())?;
    files::write_private(&dir.join("ca.key"), ca.key_pem().as_bytes())?;
    files::write_public(&dir.join("provider.pem"), cert_pem.as_bytes())?;
    files::write_private(&dir.join("provider.key"), key_pem.as_bytes())?;
    // Creates the database now so a broken data dir fails here, not at `serve`.
    drop(Store::open(dir)?);
    let info = VaultInfo {
        vault_id,
        name: name.to_owned(),
        address: address.to_owned(),
        created_unix: siterecovery_certs::unix_now(),
    };
    let vault = Vault { dir: dir.to_path_buf(), info, ca, provider_identity: PemIdentity { cert_pem, key_pem } };
    vault.issue_key_file(key_out, expiry)?;
    // vault.json last: its presence means the vault is complete.
    let json = serde_json::to_vec_pretty(&vault.info).map_err(StoreError::from)?;
    files::write_public(&dir.join("vault.json"), &json)?;
    Ok(vault)
}

impl Vault {
    /// Opens the vault in `dir`.
    pub fn open(dir: &Path) -> Result<Self, VaultError> {
        let info_path = dir.join("vault.json");
        if !info_path.exists() {
            return Err(VaultError::Missing(dir.to_path_buf()));
        }
        let info: VaultInfo = serde_json::from_str(&files::read_text(&info_path)?)
            .map_err(|e| VaultError::Invalid { what: "vault.json", why: e.to_string() })?;
        let ca = VaultCa::load(
            info.vault_id.clone(),
            &files::read_text(&dir.join("ca.pem"))?,
            &files::read_text(&dir.join("ca.key"))?,
        )?;
        let provider_identity = PemIdentity {
            cert_pem: files::read_text(&dir.join("provider.pem"))?,
            key_pem: files::read_text(&dir.join("provider.key"))?,
        };
        Ok(Self { dir: dir.to_path_buf(), info, ca, provider_identity })
    }

    /// Makes a new registration secret (replacing the previous one) and writes a vault
    /// key file holding it.
    pub fn issue_key_file(&self, out: &Path, expiry: Duration) -> Result<VaultKeyFile, VaultError> {
        let secret = siterecovery_certs::random_hex(32);
        let secs = i64::try_from(expiry.as_secs()).unwrap_or(DEFAULT_EXPIRY_SECS);
        let expires_unix = siterecovery_certs::unix_now().saturating_add(secs);
        let file = VaultKeyFile::new(&self.ca, &self.info.name, &self.info.address, &secret, expires_unix)?;
        let record = SecretRecord { sha256: sha256_hex(secret.as_bytes()), expires_unix };
        let json = serde_json::to_vec_pretty(&record).map_err(StoreError::from)?;
        files::write_private(&self.dir.join(SECRET_FILE), &json)?;
        file.write(out)?;
        Ok(file)
    }

    /// [`renew_provider_cert`] of this vault.
    pub fn renew_provider_cert(&mut self, validity: Duration) -> Result<PemIdentity, VaultError> {
        self.provider_identity = renew_provider_cert(&self.dir, &self.info, &self.ca, validity)?;
        Ok(self.provider_identity.clone())
    }

    /// Issues an operator certificate into `out_dir`: `ca.pem`, `op.pem`, `op.key` (0600).
    pub fn issue_operator_cert(
        &self,
        out_dir: &Path,
        name: &str,
        validity: Duration,
    ) -> Result<PeerIdentity, VaultError> {
        let id = PeerIdentity::new(self.info.vault_id.clone(), Role::Operator, name)?;
        let (cert, key) = self.ca.issue_local(&id, &ServerNames::default(), validity)?;
        files::create_private_dir(out_dir)?;
        files::write_public(&out_dir.join("ca.pem"), self.ca.cert_pem().as_bytes())?;
        files::write_public(&out_dir.join("op.pem"), cert.as_bytes())?;
        files::write_private(&out_dir.join("op.key"), key.as_bytes())?;
        Ok(id)
    }
}

/// Issues the provider a new certificate (new key, same identity, the names of the
/// vault's address) valid for `validity`, and writes `provider.key` then `provider.pem`
/// into `dir`, each atomically. A crash between the two leaves a pair that does not
/// match; `provider serve` renews such a pair at start.
pub fn renew_provider_cert(
    dir: &Path,
    info: &VaultInfo,
    ca: &VaultCa,
    validity: Duration,
) -> Result<PemIdentity, VaultError> {
    let id = PeerIdentity::new(info.vault_id.clone(), Role::Provider, "provider")?;
    let (cert_pem, key_pem) = ca.issue_local(&id, &ServerNames::for_address(&info.address)?, validity)?;
    files::write_private(&dir.join("provider.key"), key_pem.as_bytes())?;
    files::write_public(&dir.join("provider.pem"), cert_pem.as_bytes())?;
    Ok(PemIdentity { cert_pem, key_pem })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("p");
        let key = dir.path().join("vault.key");
        let v = create(&data, "contoso", "127.0.0.1:7443", &key, Duration::from_secs(60)).expect("create");
        let f = VaultKeyFile::read(&key).expect("key file");
        assert_eq!(f.content.vault_id, v.info.vault_id);
        assert!(matches!(
            create(&data, "contoso", "127.0.0.1:7443", &key, Duration::from_secs(60)),
            Err(VaultError::Exists(_))
        ));
        let again = Vault::open(&data).expect("open");
        assert_eq!(again.info.vault_id, v.info.vault_id);
        // The fingerprint is the CA's, in the form `--ca-fingerprint` takes.
        let fp = ca_fingerprint(&data).expect("fingerprint");
        assert_eq!(
            fp,
            siterecovery_certs::live::fingerprint_of_pem(f.content.ca_pem.as_str()).expect("of the key file")
        );
        assert_eq!(siterecovery_certs::live::parse_fingerprint(&fp).expect("parses"), fp);
        assert!(matches!(ca_fingerprint(&dir.path().join("none")), Err(VaultError::Missing(_))));
        use std::os::unix::fs::PermissionsExt;
        for k in ["ca.key", "provider.key"] {
            let mode = std::fs::metadata(data.join(k)).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{k}");
        }
        assert!(matches!(
            create(&dir.path().join("q"), "bad name", "127.0.0.1:1", &key, Duration::from_secs(1)),
            Err(VaultError::Invalid { .. })
        ));
        assert!(matches!(
            create(&dir.path().join("q"), "ok", "nope", &key, Duration::from_secs(1)),
            Err(VaultError::Invalid { .. })
        ));
    }
}
