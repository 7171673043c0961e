//! Offline initial replication: the initial copy of a protected VM written to a
//! directory on the primary host (`export`), carried to the replica host by any means,
//! and copied into the prepared replica there (`import`, `replica::Replica::import_initial`). It depends on nothing above it:
//! the replica an export must fit is described by a [`Target`].
//!
//! An export directory holds one sparse image per disk, `<disk>.img` (the disk's size;
//! only the ranges allocated in the source image are written), and `manifest.json`
//! ([`Manifest`]): the relationship, per disk its size, the copied ranges, an xxh3-64
//! checksum of the copied bytes and the HRL log seq sealed at the export's barrier
//! (every write after it is in a later log, shipped as the first point after the import).
//! Everything is fsynced before the export is reported done. An export never overwrites
//! a file nor follows a symlink: it goes into an empty (or new, 0700) directory.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const MANIFEST_FORMAT: &str = "siterecovery-offline-export";
pub const MANIFEST_VERSION: u32 = 1;
/// Bytes read and written at a time.
pub const CHUNK: u64 = 1 << 20;
const MANIFEST_MAX_BYTES: u64 = 64 << 20;

/// Why an export or import failed.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The directory is not a usable export for this replica (the reason says why).
    #[error("{0}")]
    Invalid(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> OfflineError + '_ {
    move |source| OfflineError::Io { path: path.to_path_buf(), source }
}

/// `manifest.json` of an export directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub relationship_id: String,
    pub vm: String,
    pub created_unix_ms: i64,
    pub disks: Vec<ManifestDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestDisk {
    pub id: String,
    pub size_bytes: u64,
    /// File name in the export directory.
    pub file: String,
    /// The copied (allocated) ranges `[start, end)`, ascending.
    pub ranges: Vec<(u64, u64)>,
    pub copied_bytes: u64,
    /// xxh3-64 of the bytes of `ranges` in order, 16 hex digits.
    pub xxh3: String,
    /// The disk's highest sealed HRL log seq at the export's barrier.
    pub log_seq: u64,
}

impl Manifest {
    pub fn copied_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.copied_bytes).sum()
    }

    /// Reads and checks the format of `dir/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self, OfflineError> {
        let path = dir.join(MANIFEST_FILE);
        let meta = std::fs::metadata(&path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                OfflineError::Invalid(format!("{} is not an export directory: no {MANIFEST_FILE}", dir.display()))
            } else {
                OfflineError::Io { path: path.clone(), source: e }
            }
        })?;
        if meta.len() > MANIFEST_MAX_BYTES {
            return Err(OfflineError::Invalid(format!("{}: {} bytes, too large", path.display(), meta.len())));
        }
        // Bounded read: the length checked above may change (a growing file, a FIFO).
        let mut text = Vec::new();
        File::open(&path).and_then(|f| f.take(MANIFEST_MAX_BYTES + 1).read_to_end(&mut text)).map_err(io_at(&path))?;
        if text.len() as u64 > MANIFEST_MAX_BYTES {
            return Err(OfflineError::Invalid(format!("{}: larger than {MANIFEST_MAX_BYTES} bytes", path.display())));
        }
        let m: Manifest = serde_json::from_slice(&text)
            .map_err(|e| OfflineError::Invalid(format!("{}: not a manifest: {e}", path.display())))?;
        if m.format != MANIFEST_FORMAT {
            return Err(OfflineError::Invalid(format!("{}: format {:?}", path.display(), m.format)));
        }
        if m.version != MANIFEST_VERSION {
            return Err(OfflineError::Invalid(format!("{}: unsupported version {}", path.display(), m.version)));
        }
        Ok(m)
    }

    /// Whether this export fits the replica `spec`: same relationship and VM, the same
    /// disks with the same sizes, ranges inside the disks and ascending.
    pub fn check(&self, spec: &impl ExportTarget) -> Result<(), OfflineError> {
        let spec = &spec.target();
        if self.relationship_id != spec.relationship_id {
            return Err(OfflineError::Invalid(format!(
                "the export is of relationship {} (VM {}), not of {} (VM {}): refusing to import it",
                self.relationship_id, self.vm, spec.relationship_id, spec.vm
            )));
        }
        if self.vm != spec.vm {
            return Err(OfflineError::Invalid(format!("the export is of VM {}, not {}", self.vm, spec.vm)));
        }
        if self.disks.len() != spec.disks.len() {
            return Err(OfflineError::Invalid(format!(
                "the export has {} disks, the replica {}",
                self.disks.len(),
                spec.disks.len()
            )));
        }
        for d in &spec.disks {
            let m = self
                .disks
                .iter()
                .find(|m| m.id == d.id)
                .ok_or_else(|| OfflineError::Invalid(format!("the export has no disk {}", d.id)))?;
            if m.size_bytes != d.size_bytes {
                return Err(OfflineError::Invalid(format!(
                    "disk {} is {} bytes in the export, {} in the replica",
                    d.id, m.size_bytes, d.size_bytes
                )));
            }
            if m.file.is_empty() || m.file.contains('/') || m.file.starts_with('.') {
                return Err(OfflineError::Invalid(format!("disk {}: bad file name {:?}", d.id, m.file)));
            }
            let mut prev = 0;
            let mut total = 0;
            for &(s, e) in &m.ranges {
                if s < prev || e <= s || e > m.size_bytes {
                    return Err(OfflineError::Invalid(format!(
                        "disk {}: range {s}..{e} is out of order or outside the disk",
                        d.id
                    )));
                }
                prev = e;
                total += e - s;
            }
            if total != m.copied_bytes {
                return Err(OfflineError::Invalid(format!(
                    "disk {}: ranges hold {total} bytes, the manifest says {}",
                    d.id, m.copied_bytes
                )));
            }
        }
        Ok(())
    }
}

/// The replica an export must fit (what the replica store knows of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub relationship_id: String,
    pub vm: String,
    pub disks: Vec<TargetDisk>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetDisk {
    pub id: String,
    pub size_bytes: u64,
}

/// Whatever describes a replica an export may be imported into.
pub trait ExportTarget {
    fn target(&self) -> Target;
}

impl ExportTarget for Target {
    fn target(&self) -> Target {
        self.clone()
    }
}

/// Streaming checksum of an export disk.
pub struct Checksum(xxhash_rust::xxh3::Xxh3);

impl Default for Checksum {
    fn default() -> Self {
        Self(xxhash_rust::xxh3::Xxh3::new())
    }
}

impl Checksum {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0.digest())
    }
}

/// One disk to export: its id, image, size and the log seq sealed at the barrier.
pub struct ExportDisk {
    pub id: String,
    pub image: PathBuf,
    pub size: u64,
    pub log_seq: u64,
}

/// Copies the allocated ranges of each disk into `dir/<id>.img` and writes the
/// manifest, all fsynced. Nothing in `dir` is ever overwritten and no symlink followed
/// (`O_EXCL | O_NOFOLLOW`, the manifest put in place with a hard link): a directory
/// that already holds any of these names is refused, and the files of a failed attempt
/// are removed again, so a retry finds the directory as it was. A missing `dir` is
/// created 0700; an existing one (the operator's medium) keeps its mode.
pub fn export(dir: &Path, relationship_id: &str, vm: &str, disks: &[ExportDisk]) -> Result<Manifest, OfflineError> {
    std::fs::DirBuilder::new().recursive(true).mode(crate::files::DIR_MODE).create(dir).map_err(io_at(dir))?;
    let mut created = Vec::new();
    let result = export_into(dir, relationship_id, vm, disks, &mut created);
    if result.is_err() {
        for p in &created {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// A file of the export, created new: an existing one is refused by name.
fn create_new_at(path: &Path) -> Result<File, OfflineError> {
    crate::files::create_export(path).map_err(|e| refuse_existing(path, e))
}

fn refuse_existing(path: &Path, e: io::Error) -> OfflineError {
    if e.kind() == io::ErrorKind::AlreadyExists {
        OfflineError::Invalid(format!(
            "{} already exists: an export never overwrites a file; export into an empty directory",
            path.display()
        ))
    } else {
        OfflineError::Io { path: path.to_path_buf(), source: e }
    }
}

fn export_into(
    dir: &Path,
    relationship_id: &str,
    vm: &str,
    disks: &[ExportDisk],
    created: &mut Vec<PathBuf>,
) -> Result<Manifest, OfflineError> {
    let mpath = dir.join(MANIFEST_FILE);
    if mpath.symlink_metadata().is_ok() {
        return Err(refuse_existing(&mpath, io::ErrorKind::AlreadyExists.into()));
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for d in disks {
        let src = File::open(&d.image).map_err(io_at(&d.image))?;
        let ranges = crate::extents::allocated_ranges(&src, 0, d.size).map_err(io_at(&d.image))?;
        let file = format!("{}.img", d.id);
        let path = dir.join(&file);
        let dst = create_new_at(&path)?;
        created.push(path.clone());
        dst.set_len(d.size).map_err(io_at(&path))?;
        let mut sum = Checksum::default();
        let mut copied = 0;
        for &(s, e) in &ranges {
            let mut off = s;
            while off < e {
                let n = (e - off).min(CHUNK) as usize;
                src.read_exact_at(&mut buf[..n], off).map_err(io_at(&d.image))?;
                dst.write_all_at(&buf[..n], off).map_err(io_at(&path))?;
                sum.update(&buf[..n]);
                off += n as u64;
                copied += n as u64;
            }
        }
        dst.sync_all().map_err(io_at(&path))?;
        out.push(ManifestDisk {
            id: d.id.clone(),
            size_bytes: d.size,
            file,
            ranges,
            copied_bytes: copied,
            xxh3: sum.hex(),
            log_seq: d.log_seq,
        });
    }
    let m = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        relationship_id: relationship_id.into(),
        vm: vm.into(),
        created_unix_ms: crate::hrl::now_ms() as i64,
        disks: out,
    };
    let json = serde_json::to_vec_pretty(&m).map_err(|e| OfflineError::Invalid(format!("manifest: {e}")))?;
    // Written aside, then linked in place: the manifest appears whole or not at all,
    // and last, so a half-written export never looks done.
    let tmp = dir.join(format!(".{MANIFEST_FILE}.{}.tmp", siterecovery_certs::random_hex(4)));
    {
        let mut f = create_new_at(&tmp)?;
        created.push(tmp.clone());
        f.write_all(&json).map_err(io_at(&tmp))?;
        f.sync_all().map_err(io_at(&tmp))?;
    }
    crate::files::link_new(&tmp, &mpath).map_err(|e| refuse_existing(&mpath, e))?;
    created.pop();
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))?;
    Ok(m)
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Target {
        Target {
            relationship_id: "r-1".into(),
            vm: "vm1".into(),
            disks: vec![TargetDisk { id: "disk0".into(), size_bytes: 8 << 20 }],
        }
    }

    fn write_disk(dir: &Path) -> PathBuf {
        let p = dir.join("src.img");
        let f = File::create(&p).expect("test setup");
        f.set_len(8 << 20).expect("test setup");
        f.write_all_at(&[0xab; 65536], 1 << 20).expect("test setup");
        f.write_all_at(&[0xcd; 4096], 5 << 20).expect("test setup");
        p
    }

    #[test]
    fn export_is_sparse_checksummed_and_checks_against_the_replica() {
        let t = tempfile::tempdir().expect("test setup");
        let src = write_disk(t.path());
        let exp = t.path().join("exp");
        let d = ExportDisk { id: "disk0".into(), image: src, size: 8 << 20, log_seq: 7 };
        let m = export(&exp, "r-1", "vm1", &[d]).expect("test setup");
        assert_eq!(Manifest::read(&exp).expect("test setup"), m);
        let disk = &m.disks[0];
        assert_eq!(disk.log_seq, 7);
        // Only what was allocated travels (a file system may round to its block size).
        assert!(disk.copied_bytes >= 65536 + 4096 && disk.copied_bytes < 1 << 20, "{}", disk.copied_bytes);
        let img = exp.join(&disk.file);
        assert_eq!(std::fs::metadata(&img).expect("test setup").len(), 8 << 20);
        let mut sum = Checksum::default();
        let f = File::open(&img).expect("test setup");
        for &(s, e) in &disk.ranges {
            let mut b = vec![0; (e - s) as usize];
            f.read_exact_at(&mut b, s).expect("test setup");
            sum.update(&b);
        }
        assert_eq!(sum.hex(), disk.xxh3);
        m.check(&spec()).expect("test setup");
    }

    #[test]
    fn manifest_checks_refuse_what_does_not_fit() {
        let t = tempfile::tempdir().expect("test setup");
        let src = write_disk(t.path());
        let d = ExportDisk { id: "disk0".into(), image: src, size: 8 << 20, log_seq: 1 };
        let m = export(&t.path().join("exp"), "r-1", "vm1", &[d]).expect("test setup");

        let e = m.check(&Target { relationship_id: "r-2".into(), ..spec() }).expect_err("must be refused");
        assert!(e.to_string().contains("not of r-2"), "{e}");
        let mut s = spec();
        s.disks[0].size_bytes = 16 << 20;
        assert!(m.check(&s).expect_err("must be refused").to_string().contains("bytes in the export"));
        s.disks[0].id = "disk1".into();
        assert!(m.check(&s).expect_err("must be refused").to_string().contains("no disk disk1"));
        let mut bad = m.clone();
        bad.disks[0].ranges.reverse();
        bad.disks[0].ranges.push((0, 1 << 40));
        assert!(bad.check(&spec()).is_err());
        let mut bad = m.clone();
        bad.disks[0].copied_bytes += 1;
        assert!(bad.check(&spec()).expect_err("must be refused").to_string().contains("the manifest says"));
        let mut bad = m;
        bad.disks[0].file = "../x.img".into();
        assert!(bad.check(&spec()).is_err());

        assert!(Manifest::read(t.path()).expect_err("must be refused").to_string().contains("not an export directory"));
        std::fs::write(t.path().join(MANIFEST_FILE), br#"{"format":"other"}"#).expect("test setup");
        assert!(Manifest::read(t.path()).is_err());
    }
}
