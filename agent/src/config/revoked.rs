//! `revoked.json`: the vault's revoked certificate serials as this host last heard them
//! from the provider (control channel push `RevocationList`), so the peer listener
//! refuses them from the first handshake after a restart, before the provider is
//! reached. In the state-file envelope (`persist`, magic `SRRL`), mode 0600, written
//! atomically on every change.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::persist::{self, FileKind, PersistError};

/// `revoked.json`.
pub const REVOKED_FILE: &str = "revoked.json";
/// The envelope's kind of `revoked.json`.
pub const REVOKED: FileKind = FileKind { name: "revocation list", magic: *b"SRRL", version: 1 };

/// The payload: the provider's list version and its serials (lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub version: u64,
    pub serials: Vec<String>,
}

/// A certificate serial as the CA writes it: 1-64 hex digits.
pub fn is_serial(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join(REVOKED_FILE)
}

/// The list kept in `dir`; `None` before the first push.
pub fn load(dir: &Path) -> Result<Option<Revoked>, PersistError> {
    let list: Option<Revoked> = persist::load(&path(dir), &REVOKED)?;
    if let Some(l) = &list
        && let Some(bad) = l.serials.iter().find(|s| !is_serial(s))
    {
        return Err(PersistError::Corrupt {
            path: path(dir),
            kind: REVOKED.name,
            reason: format!("{:?} is not a hex serial", bad.chars().take(80).collect::<String>()),
        });
    }
    Ok(list)
}

/// Writes the list (atomically, 0600).
pub fn save(dir: &Path, list: &Revoked) -> Result<(), PersistError> {
    persist::save(&path(dir), &REVOKED, list)
}
