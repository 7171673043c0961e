//! Replacing the credential files of the data dir as one set.
//!
//! A registration is four files (`agent.json`, `ca.pem`, `host.pem`, `host.key`) and a
//! renewal two (`host.pem`, `host.key`); a half-replaced set (a new key beside the old
//! certificate) would lock the host out. So a replacement is a small redo log:
//!
//! 1. every new file is written beside its target as `<name>.new` (atomic, fsynced);
//! 2. the commit marker `credentials.commit` is written (atomic, fsynced), listing the
//!    names: from here on the new set is the registration;
//! 3. each `<name>.new` is renamed over `<name>`, the directory fsynced, the marker
//!    removed.
//!
//! [`recover`] (run by every load) finishes step 3 when the marker exists, and removes
//! stray `.new` files when it does not (a crash before the commit: the old set stands).

use std::path::Path;

use siterecovery_certs::{CertError, files};

/// `host.pem`: this host's certificate.
pub const HOST_CERT: &str = "host.pem";
/// `host.key`: this host's private key (0600).
pub const HOST_KEY: &str = "host.key";
/// The commit marker of a replacement in progress.
pub const COMMIT_MARKER: &str = "credentials.commit";
/// Suffix of a staged file.
const STAGED: &str = ".new";
/// The only files a replacement may touch.
const NAMES: [&str; 4] = ["agent.json", "ca.pem", HOST_CERT, HOST_KEY];

/// One file of a set: its name (one of the credential files) and content.
pub struct CredentialFile<'a> {
    name: &'static str,
    data: &'a [u8],
    mode: u32,
}

impl<'a> CredentialFile<'a> {
    /// A file only the agent reads (0600): the private key.
    pub fn private(name: &'static str, data: &'a [u8]) -> Self {
        Self { name, data, mode: 0o600 }
    }

    /// A file others may read (0644): the certificates.
    pub fn public(name: &'static str, data: &'a [u8]) -> Self {
        Self { name, data, mode: 0o644 }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> CertError {
    CertError::Io { path: path.to_path_buf(), source }
}

fn sync_dir(dir: &Path) -> Result<(), CertError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

fn staged(name: &str) -> String {
    format!("{name}{STAGED}")
}

/// Replaces the files of `set` together (see the module doc).
pub fn replace(dir: &Path, set: &[CredentialFile<'_>]) -> Result<(), CertError> {
    recover(dir)?;
    for f in set {
        if !NAMES.contains(&f.name) {
            return Err(CertError::Parse { what: "credential file", reason: format!("{} is not one", f.name) });
        }
        files::write_atomic(&dir.join(staged(f.name)), f.data, f.mode)?;
    }
    let names: Vec<&str> = set.iter().map(|f| f.name).collect();
    files::write_atomic(&dir.join(COMMIT_MARKER), names.join("\n").as_bytes(), 0o600)?;
    roll_forward(dir)
}

/// Step 3: the staged files of the committed set over their targets.
fn roll_forward(dir: &Path) -> Result<(), CertError> {
    let marker = dir.join(COMMIT_MARKER);
    let listed = files::read_text(&marker)?;
    for name in listed.lines().filter(|l| NAMES.contains(l)) {
        let from = dir.join(staged(name));
        // Already renamed by an earlier, interrupted roll-forward: nothing left to do.
        if from.exists() {
            std::fs::rename(&from, dir.join(name)).map_err(|e| io_err(&from, e))?;
        }
    }
    sync_dir(dir)?;
    std::fs::remove_file(&marker).map_err(|e| io_err(&marker, e))?;
    sync_dir(dir)
}

/// Finishes a committed replacement, or drops an uncommitted one.
pub fn recover(dir: &Path) -> Result<(), CertError> {
    if !dir.exists() {
        return Ok(());
    }
    if dir.join(COMMIT_MARKER).exists() {
        return roll_forward(dir);
    }
    for name in NAMES {
        let p = dir.join(staged(name));
        match std::fs::remove_file(&p) {
            Ok(()) => tracing::warn!(file = %p.display(), "dropped a credential file of an unfinished replacement"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&p, e)),
        }
    }
    Ok(())
}
