//! Atomic file writes with explicit modes: private keys 0600, the rest 0644.
//!
//! Write to a temporary file in the same directory, fsync, rename over the target,
//! fsync the directory: a crash leaves the old file or the new one, never half of one.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::CertError;

fn io_err(path: &Path, source: std::io::Error) -> CertError {
    CertError::Io { path: path.to_path_buf(), source }
}

/// Writes `data` to `path` atomically with `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", crate::random_hex(4)));
    let result = (|| {
        let mut f =
            fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(|e| io_err(&tmp, e))?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| io_err(&tmp, e))?;
        f.write_all(data).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes a private key (mode 0600).
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), CertError> {
    write_atomic(path, data, 0o600)
}

/// Writes a public file: certificates, vault key file (mode 0644).
pub fn write_public(path: &Path, data: &[u8]) -> Result<(), CertError> {
    write_atomic(path, data, 0o644)
}

/// Reads a whole file as UTF-8 text with the path in the error.
pub fn read_text(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

/// Creates a directory (and parents) with mode 0700 when it does not exist.
pub fn create_private_dir(path: &Path) -> Result<(), CertError> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(|e| io_err(path, e))
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("k.key");
        write_private(&p, b"one").expect("write");
        write_private(&p, b"two").expect("rewrite");
        assert_eq!(fs::read(&p).expect("read"), b"two");
        let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // no temporary files left behind
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }
}
