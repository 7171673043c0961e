//! The one envelope for every agent state file, and its atomic write.
//!
//! Every state file the agent keeps (replica state, VM config, overlay map, sender
//! state, protection state) is stored as a 16-byte header followed by the payload
//! (JSON, or raw bytes for the overlay map). All integers little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..4 | magic: which kind of file ([`FileKind::magic`]) |
//! | 4..6 | version u16 (≥ 1; the payload's format) |
//! | 6..8 | reserved u16, zero |
//! | 8..12 | payload length u32 (at most the kind's limit, [`MAX_PAYLOAD`] for JSON) |
//! | 12..16 | CRC-32C (Castagnoli) of the payload u32 |
//! | 16.. | payload, exactly `length` bytes, nothing after it |
//!
//! **Writing** ([`save`]) is atomic: the bytes go to a temporary file beside the target
//! (`<name>.<8 hex>.tmp`, created exclusively with the file's mode), which is fsynced,
//! renamed over the target, and the directory fsynced. A crash leaves the old file or the
//! new one; a leftover temporary is never read ([`load`] reads only the target) and
//! owners that scan their folder remove it ([`is_leftover_tmp`]).
//!
//! **Reading** ([`load`]) tells apart every way a file can be wrong, each a
//! [`PersistError`] naming the file: a file cut short (`Torn`), a payload whose checksum
//! does not match (`Corrupt`), another kind's file (`WrongKind`), a version newer than
//! this agent knows (`NewerVersion`), a payload that does not decode (`Decode`). The
//! decoder never panics and refuses lengths over the limit before allocating.
//!
//! **Older files.** Before the envelope every state file was plain JSON (the overlay map
//! raw bytes). A file that does not start with the kind's magic is handed over as
//! version 0 with the whole file as payload (JSON kinds: only when it looks like JSON);
//! the next save writes the envelope. Versions older than the current one go through
//! the caller's migration ([`load_migrating`]); plain [`load`] decodes every version
//! with the current type, which suits kinds whose JSON has not changed.
//!
//! See `agent/docs/persist-format.md`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// One kind of state file: its magic and current version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileKind {
    /// What the file holds, for messages ("replica state").
    pub name: &'static str,
    pub magic: [u8; 4],
    /// The version [`save`] writes; [`load`] refuses anything newer.
    pub version: u16,
}

/// `replicas/<vm>/replica.json`.
pub const REPLICA_STATE: FileKind = FileKind { name: "replica state", magic: *b"SRRP", version: 1 };
/// `vms/<vm>/vm.json`.
pub const VM_CONFIG: FileKind = FileKind { name: "VM config", magic: *b"SRVM", version: 1 };
/// `vms/<vm>/<disk>.overlay.map` (raw payload: the block bitmap).
pub const OVERLAY_MAP: FileKind = FileKind { name: "overlay map", magic: *b"SROM", version: 1 };
/// `vms/<vm>/replication.json`.
pub const SENDER_STATE: FileKind = FileKind { name: "sender state", magic: *b"SRSS", version: 1 };
/// `vms/<vm>/protection.json`.
pub const PROTECTION_STATE: FileKind = FileKind { name: "protection state", magic: *b"SRPS", version: 1 };

/// `vms/<vm>/failover.journal`: an interrupted commit or change-point (`vm::journal`).
pub const FAILOVER_JOURNAL: FileKind = FileKind { name: "failover journal", magic: *b"SRFJ", version: 1 };

/// Every kind of this agent (their magics are distinct).
pub const KINDS: [FileKind; 6] =
    [REPLICA_STATE, VM_CONFIG, OVERLAY_MAP, SENDER_STATE, PROTECTION_STATE, FAILOVER_JOURNAL];

/// Header length in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest JSON payload accepted (state files are kilobytes; anything near this is damage).
pub const MAX_PAYLOAD: u64 = 64 << 20;
/// Mode of every state file: only the agent reads them (see `files`).
pub const MODE: u32 = crate::files::FILE_MODE;

/// Why a state file could not be read or written. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Shorter than its header says: a write cut short (or a truncated copy).
    #[error("{path}: torn {kind} file: {len} bytes, {needed} expected")]
    Torn { path: PathBuf, kind: &'static str, len: u64, needed: u64 },
    /// The payload's checksum does not match, or the header is malformed.
    #[error("{path}: corrupt {kind} file: {reason}")]
    Corrupt { path: PathBuf, kind: &'static str, reason: String },
    /// Another kind's file (or not a state file at all).
    #[error("{path}: not a {} file: magic {} instead of {}", expected_name(*.expected), show(.found), show(.expected))]
    WrongKind { path: PathBuf, found: [u8; 4], expected: [u8; 4] },
    /// Written by a newer agent: refused rather than misread.
    #[error("{path}: version {found} is newer than this agent supports ({supported})")]
    NewerVersion { path: PathBuf, found: u16, supported: u16 },
    /// The length field (or the file) exceeds the kind's limit.
    #[error("{path}: {kind} file of {len} bytes exceeds the limit of {max}")]
    TooLarge { path: PathBuf, kind: &'static str, len: u64, max: u64 },
    /// The envelope is sound but its payload does not decode as the kind's type.
    #[error("{path}: {kind} version {version} does not decode: {source}")]
    Decode {
        path: PathBuf,
        kind: &'static str,
        version: u16,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The value could not be serialised (a bug, not the disk).
    #[error("{path}: cannot encode {kind}: {source}")]
    Encode {
        path: PathBuf,
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

impl PersistError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            PersistError::Io { path, .. }
            | PersistError::Torn { path, .. }
            | PersistError::Corrupt { path, .. }
            | PersistError::WrongKind { path, .. }
            | PersistError::NewerVersion { path, .. }
            | PersistError::TooLarge { path, .. }
            | PersistError::Decode { path, .. }
            | PersistError::Encode { path, .. } => path,
        }
    }

    /// Whether the file's content is the problem (not the file system): retrying will
    /// not help; the file needs a person.
    pub fn is_damage(&self) -> bool {
        !matches!(self, PersistError::Io { .. } | PersistError::Encode { .. })
    }
}

fn show(magic: &[u8; 4]) -> String {
    format!("\"{}\"", magic.escape_ascii())
}

fn expected_name(magic: [u8; 4]) -> &'static str {
    KINDS.iter().find(|k| k.magic == magic).map(|k| k.name).unwrap_or("state")
}

/// A file as stored: its version and payload. Version 0 is a file from before the
/// envelope; its payload is the whole file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub version: u16,
    pub payload: Vec<u8>,
}

/// The envelope around `payload`.
pub fn encode(kind: &FileKind, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&kind.magic);
    out.extend_from_slice(&kind.version.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    // A payload over u32::MAX cannot be written; save_* refuse it before calling here.
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

/// Decodes a whole file's bytes (read from `path`, for messages). `max_len` bounds the
/// payload. A file without the magic is returned as version 0.
pub fn decode(path: &Path, kind: &FileKind, bytes: Vec<u8>, max_len: u64) -> Result<Stored, PersistError> {
    let path = || path.to_path_buf();
    let len = bytes.len() as u64;
    let torn = |needed: u64| PersistError::Torn { path: path(), kind: kind.name, len, needed };
    let corrupt = |reason: String| PersistError::Corrupt { path: path(), kind: kind.name, reason };
    if bytes.len() < kind.magic.len() && kind.magic.starts_with(&bytes) {
        // Empty, or cut inside the magic.
        return Err(torn(HEADER_LEN as u64));
    }
    if bytes.get(..4) != Some(&kind.magic[..]) {
        if len > max_len {
            return Err(PersistError::TooLarge { path: path(), kind: kind.name, len, max: max_len });
        }
        return Ok(Stored { version: 0, payload: bytes });
    }
    if bytes.len() < HEADER_LEN {
        return Err(torn(HEADER_LEN as u64));
    }
    let version = le_u16(&bytes, 4);
    let reserved = le_u16(&bytes, 6);
    let payload_len = u64::from(le_u32(&bytes, 8));
    let crc = le_u32(&bytes, 12);
    if version == 0 {
        return Err(corrupt("version 0 in an envelope".into()));
    }
    if version > kind.version {
        return Err(PersistError::NewerVersion { path: path(), found: version, supported: kind.version });
    }
    if reserved != 0 {
        return Err(corrupt(format!("reserved header field is {reserved:#06x}, not zero")));
    }
    if payload_len > max_len {
        return Err(PersistError::TooLarge { path: path(), kind: kind.name, len: payload_len, max: max_len });
    }
    let needed = HEADER_LEN as u64 + payload_len;
    if len < needed {
        return Err(torn(needed));
    }
    if len > needed {
        return Err(corrupt(format!("{} bytes after the payload", len - needed)));
    }
    let mut payload = bytes;
    payload.drain(..HEADER_LEN);
    let computed = crc32c::crc32c(&payload);
    if computed != crc {
        return Err(corrupt(format!("payload checksum {computed:08x}, header says {crc:08x}")));
    }
    Ok(Stored { version, payload })
}

/// Reads the stored payload of `path`; `Ok(None)` when the file does not exist.
/// `max_len` bounds the payload (and a legacy file), checked before reading.
pub fn read(path: &Path, kind: &FileKind, max_len: u64) -> Result<Option<Stored>, PersistError> {
    let io_err = |source| PersistError::Io { path: path.to_path_buf(), source };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(e)),
    };
    let limit = max_len.saturating_add(HEADER_LEN as u64);
    let len = file.metadata().map_err(io_err)?.len();
    if len > limit {
        return Err(PersistError::TooLarge { path: path.to_path_buf(), kind: kind.name, len, max: limit });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take`: a file growing under us cannot make us read past the limit.
    file.take(limit + 1).read_to_end(&mut bytes).map_err(io_err)?;
    decode(path, kind, bytes, max_len).map(Some)
}

/// Whether a legacy payload could be JSON (skipping leading whitespace).
fn looks_like_json(payload: &[u8]) -> bool {
    matches!(payload.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'['))
}

/// Loads a JSON state file, handing each stored version to `migrate` (version 0: a
/// plain JSON file from before the envelope). `Ok(None)` when the file does not exist.
pub fn load_migrating<T, F>(path: &Path, kind: &FileKind, migrate: F) -> Result<Option<T>, PersistError>
where
    F: FnOnce(u16, &[u8]) -> Result<T, Box<dyn std::error::Error + Send + Sync>>,
{
    let Some(stored) = read(path, kind, MAX_PAYLOAD)? else { return Ok(None) };
    if stored.version == 0 && !looks_like_json(&stored.payload) {
        let mut found = [0u8; 4];
        for (f, b) in found.iter_mut().zip(&stored.payload) {
            *f = *b;
        }
        return Err(PersistError::WrongKind { path: path.to_path_buf(), found, expected: kind.magic });
    }
    migrate(stored.version, &stored.payload).map(Some).map_err(|source| PersistError::Decode {
        path: path.to_path_buf(),
        kind: kind.name,
        version: stored.version,
        source,
    })
}

/// Loads a JSON state file; every version (including a plain JSON file from before the
/// envelope) decodes as `T`. `Ok(None)` when the file does not exist.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path, kind: &FileKind) -> Result<Option<T>, PersistError> {
    load_migrating(path, kind, |_, payload| serde_json::from_slice(payload).map_err(Into::into))
}

/// Saves `value` as JSON atomically, mode 0600 ([`MODE`]).
pub fn save<T: serde::Serialize>(path: &Path, kind: &FileKind, value: &T) -> Result<(), PersistError> {
    let json = serde_json::to_vec_pretty(value).map_err(|source| PersistError::Encode {
        path: path.to_path_buf(),
        kind: kind.name,
        source,
    })?;
    save_bytes(path, kind, &json)
}

/// Saves a raw payload atomically, mode 0600 ([`MODE`]).
pub fn save_bytes(path: &Path, kind: &FileKind, payload: &[u8]) -> Result<(), PersistError> {
    if u32::try_from(payload.len()).is_err() {
        return Err(PersistError::TooLarge {
            path: path.to_path_buf(),
            kind: kind.name,
            len: payload.len() as u64,
            max: u64::from(u32::MAX),
        });
    }
    write_atomic(path, &encode(kind, payload), MODE)
}

/// The temporary files of a save end in this.
pub const TMP_SUFFIX: &str = ".tmp";

/// Whether `file_name` is a temporary left by an interrupted save of `target_name`
/// (ours: `<target>.<hex>.tmp`; older agents': `.<target>.tmp-<hex>`).
pub fn is_leftover_tmp(file_name: &str, target_name: &str) -> bool {
    let ours = file_name
        .strip_prefix(target_name)
        .and_then(|r| r.strip_prefix('.'))
        .and_then(|r| r.strip_suffix(TMP_SUFFIX))
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    let older =
        file_name.strip_prefix('.').and_then(|r| r.strip_prefix(target_name)).is_some_and(|r| r.starts_with(".tmp"));
    ours || older
}

/// Removes the temporaries interrupted saves of `path` left in its directory.
pub fn remove_leftovers(path: &Path) {
    let (Some(dir), Some(target)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return };
    let Ok(entries) = fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(|n| is_leftover_tmp(n, target)) {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), PersistError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!("{name}.{}{TMP_SUFFIX}", siterecovery_certs::random_hex(4)));
    let io_at = |p: &Path| {
        let p = p.to_path_buf();
        move |source| PersistError::Io { path: p, source }
    };
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_at(&tmp))?;
        // The umask may have narrowed the mode; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_at(&tmp))?;
        f.write_all(data).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
        fs::rename(&tmp, path).map_err(io_at(path))?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    const KIND: FileKind = FileKind { name: "test state", magic: *b"SRTS", version: 2 };

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct S {
        a: u64,
        b: String,
    }

    fn s() -> S {
        S { a: 42, b: "hello".into() }
    }

    #[test]
    fn round_trip_writes_the_envelope_with_the_mode() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        save(&p, &KIND, &s()).expect("save");
        assert_eq!(load::<S>(&p, &KIND).expect("load"), Some(s()));
        let bytes = fs::read(&p).expect("read");
        assert_eq!(&bytes[..4], b"SRTS");
        assert_eq!(le_u16(&bytes, 4), 2);
        assert_eq!(le_u32(&bytes, 8) as usize, bytes.len() - HEADER_LEN);
        assert_eq!(fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("an older agent's mode");
        save(&p, &KIND, &S { a: 1, ..s() }).expect("save again");
        assert_eq!(fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600, "a save narrows it");
        assert_eq!(load::<S>(&p, &KIND).expect("load").map(|v| v.a), Some(1));
        // Nothing but the file itself is left in the directory.
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn missing_file_is_none() {
        let dir = tempfile::tempdir().expect("tmp");
        assert_eq!(load::<S>(&dir.path().join("nope.json"), &KIND).expect("load"), None);
        assert_eq!(read(&dir.path().join("nope.json"), &KIND, 10).expect("read"), None);
    }

    #[test]
    fn torn_at_every_byte_position() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        save(&p, &KIND, &s()).expect("save");
        let full = fs::read(&p).expect("read");
        for cut in 0..full.len() {
            fs::write(&p, &full[..cut]).expect("truncate");
            match load::<S>(&p, &KIND) {
                Err(PersistError::Torn { path, len, needed, .. }) => {
                    assert_eq!(path, p);
                    assert_eq!(len, cut as u64);
                    assert!(needed > len, "cut at {cut}");
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_changed_payload_byte_is_corrupt() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        save(&p, &KIND, &s()).expect("save");
        let full = fs::read(&p).expect("read");
        for at in HEADER_LEN..full.len() {
            let mut b = full.clone();
            b[at] ^= 0x01;
            fs::write(&p, &b).expect("write");
            let err = load::<S>(&p, &KIND).expect_err("flipped");
            assert!(matches!(err, PersistError::Corrupt { .. }), "byte {at}: {err:?}");
            assert!(err.to_string().contains("s.json") && err.is_damage(), "{err}");
        }
        // Bytes after the payload and a non-zero reserved field are refused too.
        let mut longer = full.clone();
        longer.push(b'\n');
        fs::write(&p, &longer).expect("write");
        assert!(matches!(load::<S>(&p, &KIND), Err(PersistError::Corrupt { .. })));
        let mut reserved = full;
        reserved[6] = 1;
        fs::write(&p, &reserved).expect("write");
        assert!(matches!(load::<S>(&p, &KIND), Err(PersistError::Corrupt { .. })));
    }

    #[test]
    fn another_kinds_file_is_wrong_kind() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        save(&p, &VM_CONFIG, &s()).expect("save");
        match load::<S>(&p, &KIND) {
            Err(e @ PersistError::WrongKind { found, expected, .. }) => {
                assert_eq!((found, expected), (*b"SRVM", *b"SRTS"));
                assert!(e.to_string().contains("\"SRVM\""), "{e}");
            }
            other => panic!("{other:?}"),
        }
        fs::write(&p, b"\x00\x01garbage").expect("write");
        assert!(matches!(load::<S>(&p, &KIND), Err(PersistError::WrongKind { .. })));
    }

    #[test]
    fn a_newer_version_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        let newer = FileKind { version: 3, ..KIND };
        save(&p, &newer, &s()).expect("save");
        match load::<S>(&p, &KIND) {
            Err(PersistError::NewerVersion { found: 3, supported: 2, path }) => assert_eq!(path, p),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn legacy_plain_json_loads_as_version_0_and_the_next_save_wraps_it() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        fs::write(&p, serde_json::to_vec_pretty(&s()).expect("json")).expect("write");
        assert_eq!(load::<S>(&p, &KIND).expect("legacy"), Some(s()));
        let mut seen = None;
        let v = load_migrating(&p, &KIND, |version, payload| {
            seen = Some(version);
            serde_json::from_slice::<S>(payload).map_err(Into::into)
        })
        .expect("migrate");
        assert_eq!((v, seen), (Some(s()), Some(0)));
        save(&p, &KIND, &s()).expect("save");
        assert_eq!(&fs::read(&p).expect("read")[..4], b"SRTS");
        // A legacy file that is not the kind's JSON names the file and the version.
        fs::write(&p, br#"{"a":"not a number"}"#).expect("write");
        match load::<S>(&p, &KIND) {
            Err(e @ PersistError::Decode { version: 0, .. }) => assert!(e.to_string().contains("s.json"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn older_envelope_versions_go_through_migrate() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        save(&p, &FileKind { version: 1, ..KIND }, &7u64).expect("save v1");
        let v = load_migrating(&p, &KIND, |version, payload| match version {
            1 => Ok(S { a: serde_json::from_slice(payload)?, b: "migrated".into() }),
            _ => Ok(serde_json::from_slice(payload)?),
        })
        .expect("load");
        assert_eq!(v, Some(S { a: 7, b: "migrated".into() }));
    }

    #[test]
    fn leftover_tmp_files_are_ignored_and_removable() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("s.json");
        save(&p, &KIND, &s()).expect("save");
        // A crash mid-save: a half-written temporary beside the good file.
        let ours = dir.path().join("s.json.0badc0de.tmp");
        let older = dir.path().join(".s.json.tmp-1234");
        fs::write(&ours, &encode(&KIND, b"{\"a\":")[..10]).expect("tmp");
        fs::write(&older, b"{").expect("tmp");
        assert_eq!(load::<S>(&p, &KIND).expect("load"), Some(s()));
        assert!(is_leftover_tmp("s.json.0badc0de.tmp", "s.json"));
        assert!(is_leftover_tmp(".s.json.tmp-1234", "s.json"));
        assert!(!is_leftover_tmp("s.json", "s.json"));
        assert!(!is_leftover_tmp("other.json.0badc0de.tmp", "s.json"));
        assert!(!is_leftover_tmp("s.json.x.tmp", "s.json"));
        remove_leftovers(&p);
        assert!(!ours.exists() && !older.exists() && p.exists());
    }

    #[test]
    fn lengths_over_the_limit_are_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("m.map");
        save_bytes(&p, &KIND, &[1u8; 100]).expect("save");
        assert!(matches!(read(&p, &KIND, 99), Err(PersistError::TooLarge { .. })));
        assert_eq!(read(&p, &KIND, 100).expect("read").map(|s| s.payload.len()), Some(100));
        // A length field claiming 4 GiB in a small file.
        let mut b = fs::read(&p).expect("read");
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode(&p, &KIND, b, MAX_PAYLOAD),
            Err(PersistError::TooLarge { len, .. }) if len == u64::from(u32::MAX)
        ));
    }

    #[test]
    fn every_kind_has_its_own_magic() {
        for (i, a) in KINDS.iter().enumerate() {
            assert!(a.version >= 1, "{}", a.name);
            for b in &KINDS[i + 1..] {
                assert_ne!(a.magic, b.magic, "{} and {}", a.name, b.name);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let mut b = bytes.clone();
            if b.len() >= 4 && b[0] % 2 == 0 {
                // Half the cases start with the magic to reach the header checks.
                b[..4].copy_from_slice(&KIND.magic);
            }
            let _ = decode(Path::new("x"), &KIND, b, 32);
        }
    }
}
