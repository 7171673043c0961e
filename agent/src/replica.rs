//! The replica store on the replica host: the copy of a protected VM's disks and its
//! recovery points.
//!
//! A replica lives in `<data-dir>/replicas/<vm>/`:
//!
//! | file | what |
//! | --- | --- |
//! | `replica.json` | [`ReplicaSpec`], initial-copy progress, retained points, the point being applied |
//! | `<disk>.img` | the replica image of each disk, always at the latest applied point |
//! | `spool-<seq>.pt` | a received point, fsynced before it is applied (roll-forward source) |
//! | `undo-<seq>[-mN].undo` | before-images taking point `seq` back to the previous retained point |
//!
//! **Applying a point is atomic.** The spool is made durable first; then the
//! before-images of every range the point touches are written to an undo record and
//! fsynced; then `replica.json` records "applying seq"; then the extents are written to
//! the images and fsynced; then `replica.json` records the point. A crash before the
//! "applying" mark leaves the images untouched (the spool is dropped; the sender re-ships
//! because it got no ack); a crash after it rolls forward from the spool on the next
//! open. Either way the images are at exactly one point.
//!
//! **Reading an older point costs no copy.** The image holds the latest point; the undo
//! records of the points after the wanted one, applied newest first, give every byte its
//! value at that point ([`PointDevice`]). Pruning a point merges its undo record into
//! the next one's, so the chain stays valid for the points that remain.
//!
//! Formats (all integers little-endian; `docs/replica-format.md`):
//! spool: `"SRSPOOL1"` · seq u64 · then records `disk u32 · kind u8 · offset u64 · len u64
//! · crc32c u32 · data` · end marker `disk = u32::MAX`.
//! undo: `"SRUNDO01"` · seq u64 · records `disk u32 · offset u64 · len u64 · crc32c u32 ·
//! data` · end marker `disk = u32::MAX` · crc32c u32 of every record.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use crate::disk::{BlockDevice, DiskError, check_range};
use crate::persist::{self, PersistError, REPLICA_STATE};

/// Largest extent accepted in a point (a coalesced write or a resync block).
pub const MAX_EXTENT: u64 = 64 << 20;
const SPOOL_MAGIC: &[u8; 8] = b"SRSPOOL1";
const UNDO_MAGIC: &[u8; 8] = b"SRUNDO01";
const END: u32 = u32::MAX;
const KIND_DATA: u8 = 1;
const KIND_ZEROES: u8 = 2;

/// Why a replica operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// No replica for that VM or relationship, or no such disk or point.
    #[error("not found: {0}")]
    NotFound(String),
    /// The VM already has a replica for another relationship.
    #[error("VM {vm} already has a replica for relationship {existing}")]
    Exists { vm: String, existing: String },
    /// An extent or copy chunk outside the disk, or too large.
    #[error("{what}: range {offset}+{len} is outside disk {disk} of {size} bytes")]
    OutOfRange { what: &'static str, disk: String, offset: u64, len: u64, size: u64 },
    /// A request that cannot apply to the replica's state (e.g. copy below the acked offset).
    #[error("invalid replica state: {0}")]
    State(String),
    /// A spool or undo record failed its checksum or is malformed.
    #[error("{path}: corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `replica.json` could not be written, or read back (torn, corrupt, newer version).
    #[error(transparent)]
    StateFile(#[from] PersistError),
}

impl ReplicaError {
    /// Whether retrying later may succeed (I/O, e.g. no space) or the caller must act.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, ReplicaError::Io { .. } | ReplicaError::StateFile(PersistError::Io { .. }))
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ReplicaError + '_ {
    move |source| ReplicaError::Io { path: path.to_path_buf(), source }
}

/// What the provider asked this host to keep a replica of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSpec {
    pub relationship_id: String,
    pub vm: String,
    /// Only this host may push data for the relationship.
    pub primary_host_id: String,
    pub disks: Vec<ReplicaDisk>,
    pub retention_ms: u64,
    /// One point is kept per bucket of this length (an hour; shorter in tests).
    #[serde(default = "default_bucket")]
    pub bucket_ms: u64,
}

fn default_bucket() -> u64 {
    3_600_000
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaDisk {
    pub id: String,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopyProgress {
    pub disk_id: String,
    /// Everything below is durable in the replica image.
    pub acked_offset: u64,
    pub complete: bool,
}

/// A recovery point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    pub id: String,
    pub seq: u64,
    pub created_unix_ms: i64,
    pub app_consistent: bool,
    pub resync: bool,
    /// Bytes of data the point changed.
    pub size_bytes: u64,
}

/// Data of an extent pushed into a point.
#[derive(Debug, Clone, Copy)]
pub enum ExtentData<'a> {
    Data(&'a [u8]),
    Zeroes(u64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PointMeta {
    info: PointInfo,
    /// Undo record taking this point back to the previous retained point; `None` for
    /// the oldest retained point.
    undo: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Applying {
    seq: u64,
    spool: String,
    undo: Option<String>,
    info: PointInfo,
}

/// `replica.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    spec: ReplicaSpec,
    copy: Vec<DiskCopyProgress>,
    /// Retained points, ascending by seq.
    points: Vec<PointMeta>,
    applying: Option<Applying>,
    /// Counter for merged undo file names.
    #[serde(default)]
    merges: u64,
    /// A rollback to this seq was started (commit of a failover to an older point);
    /// re-done on open, as applying before-images again is idempotent.
    #[serde(default)]
    rollback_to: Option<u64>,
}

/// One undo record loaded for reading: per disk, non-overlapping ranges ascending.
#[derive(Debug)]
struct Undo {
    file: File,
    /// disk index → (offset, len, position of data in file)
    ranges: Vec<Vec<(u64, u64, u64)>>,
}

impl Undo {
    /// Overlays this record's before-images onto `buf` (which holds `offset..`).
    fn overlay(&self, disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let Some(ranges) = self.ranges.get(disk) else { return Ok(()) };
        let end = offset + buf.len() as u64;
        // first range whose end is beyond `offset`
        let start = ranges.partition_point(|&(o, l, _)| o + l <= offset);
        for &(o, l, pos) in &ranges[start..] {
            if o >= end {
                break;
            }
            let from = o.max(offset);
            let to = (o + l).min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            self.file.read_exact_at(dst, pos + (from - o))?;
        }
        Ok(())
    }
}

struct Image {
    id: String,
    path: PathBuf,
    file: File,
    size: u64,
}

struct Inner {
    state: State,
    undo: BTreeMap<u64, Arc<Undo>>,
    /// Points exported for reading (never pruned while pinned).
    pins: HashMap<u64, usize>,
}

/// The replica of one VM.
pub struct Replica {
    dir: PathBuf,
    spec: ReplicaSpec,
    images: Vec<Image>,
    inner: RwLock<Inner>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("dir", &self.dir).field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// Every replica of this host, by VM name.
#[derive(Debug)]
pub struct ReplicaSet {
    dir: PathBuf,
    replicas: Mutex<BTreeMap<String, Arc<Replica>>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl ReplicaSet {
    /// Opens every replica under `dir`, finishing any interrupted apply.
    pub fn open(dir: &Path) -> Result<Self, ReplicaError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let mut replicas = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let path = e.map_err(io_at(dir))?.path();
            if !path.join(STATE_FILE).exists() {
                continue;
            }
            match Replica::open(&path) {
                Ok(r) => {
                    replicas.insert(r.spec.vm.clone(), Arc::new(r));
                }
                Err(e) => tracing::error!(replica = %path.display(), "cannot open replica: {e:#}"),
            }
        }
        Ok(Self { dir: dir.to_path_buf(), replicas: Mutex::new(replicas) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Replica>>> {
        self.replicas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the replica of `spec.vm` (sparse images), or returns the existing one of
    /// the same relationship.
    pub fn prepare(&self, spec: ReplicaSpec) -> Result<Arc<Replica>, ReplicaError> {
        self.create(spec, false, |dir, d| {
            let path = dir.join(format!("{}.img", d.id));
            let f = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_at(&path))?;
            f.set_len(d.size_bytes).map_err(io_at(&path))?;
            f.sync_all().map_err(io_at(&path))
        })
    }

    /// Reverse replication: makes a replica of existing disk images (the former
    /// primary's, moved in by rename), with no points; the first point the new primary
    /// ships is a resync, which brings them in line block by block.
    pub fn adopt(&self, spec: ReplicaSpec, images: &[(String, PathBuf)]) -> Result<Arc<Replica>, ReplicaError> {
        self.create(spec, true, |dir, d| {
            let (_, src) = images
                .iter()
                .find(|(id, _)| *id == d.id)
                .ok_or_else(|| ReplicaError::NotFound(format!("disk {} to adopt", d.id)))?;
            let target = dir.join(format!("{}.img", d.id));
            std::fs::rename(src, &target).map_err(io_at(&target))?;
            let f = OpenOptions::new().write(true).open(&target).map_err(io_at(&target))?;
            if f.metadata().map_err(io_at(&target))?.len() != d.size_bytes {
                f.set_len(d.size_bytes).map_err(io_at(&target))?;
            }
            Ok(())
        })
    }

    /// The shared part of [`Self::prepare`] and [`Self::adopt`]: a fresh folder, one image
    /// per disk made by `image`, the state file (initial copy `complete` or not), opened
    /// and registered. An existing replica of the same relationship is returned as is.
    fn create(
        &self,
        spec: ReplicaSpec,
        complete: bool,
        image: impl Fn(&Path, &ReplicaDisk) -> Result<(), ReplicaError>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let mut map = self.lock();
        if let Some(r) = map.get(&spec.vm) {
            if r.spec.relationship_id == spec.relationship_id {
                return Ok(r.clone());
            }
            return Err(ReplicaError::Exists { vm: spec.vm.clone(), existing: r.spec.relationship_id.clone() });
        }
        let dir = self.dir.join(&spec.vm);
        if dir.exists() {
            // Leftover of an earlier relationship that was not removed cleanly.
            std::fs::remove_dir_all(&dir).map_err(io_at(&dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        for d in &spec.disks {
            image(&dir, d)?;
        }
        sync_dir(&dir)?;
        let state = State {
            copy: spec
                .disks
                .iter()
                .map(|d| DiskCopyProgress {
                    disk_id: d.id.clone(),
                    acked_offset: if complete { d.size_bytes } else { 0 },
                    complete,
                })
                .collect(),
            spec,
            points: vec![],
            applying: None,
            merges: 0,
            rollback_to: None,
        };
        save_state(&dir, &state)?;
        let r = Arc::new(Replica::open(&dir)?);
        tracing::info!(vm = %r.spec.vm, relationship = %r.spec.relationship_id, adopted = complete, "replica created");
        map.insert(r.spec.vm.clone(), r.clone());
        Ok(r)
    }

    pub fn get(&self, vm: &str) -> Option<Arc<Replica>> {
        self.lock().get(vm).cloned()
    }

    pub fn by_relationship(&self, relationship_id: &str) -> Option<Arc<Replica>> {
        self.lock().values().find(|r| r.spec.relationship_id == relationship_id).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Replica>> {
        self.lock().values().cloned().collect()
    }

    /// Deletes a replica and its folder.
    pub fn remove(&self, vm: &str) -> Result<(), ReplicaError> {
        let r = self.lock().remove(vm);
        if let Some(r) = r {
            std::fs::remove_dir_all(&r.dir).map_err(io_at(&r.dir))?;
            tracing::info!(%vm, "replica removed");
        }
        Ok(())
    }
}

/// The state file of a replica folder.
pub const STATE_FILE: &str = "replica.json";

fn save_state(dir: &Path, state: &State) -> Result<(), ReplicaError> {
    persist::save_with_mode(&dir.join(STATE_FILE), &REPLICA_STATE, state, persist::PUBLIC)?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), ReplicaError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_at(dir))
}

impl Replica {
    fn open(dir: &Path) -> Result<Self, ReplicaError> {
        let path = dir.join(STATE_FILE);
        let mut state: State = persist::load(&path, &REPLICA_STATE)?
            .ok_or_else(|| ReplicaError::NotFound(format!("replica state {}", path.display())))?;
        let mut images = Vec::new();
        for d in &state.spec.disks {
            let p = dir.join(format!("{}.img", d.id));
            let file = OpenOptions::new().read(true).write(true).open(&p).map_err(io_at(&p))?;
            images.push(Image { id: d.id.clone(), path: p, file, size: d.size_bytes });
        }
        let spec = state.spec.clone();
        let mut replica = Replica {
            dir: dir.to_path_buf(),
            spec,
            images,
            inner: RwLock::new(Inner { state: state.clone(), undo: BTreeMap::new(), pins: HashMap::new() }),
        };
        // Roll forward an interrupted apply: the spool is durable and extents are
        // absolute, so applying it again is idempotent.
        if let Some(a) = state.applying.take() {
            tracing::warn!(replica = %dir.display(), seq = a.seq, "finishing a point interrupted mid-apply");
            replica.apply_spool(&dir.join(&a.spool))?;
            replica.sync_images()?;
            state.points.push(PointMeta { info: a.info, undo: a.undo });
            save_state(dir, &state)?;
            let _ = std::fs::remove_file(dir.join(&a.spool));
        }
        // Spools never marked as applying were not acknowledged: the sender re-ships them.
        for e in std::fs::read_dir(dir).map_err(io_at(dir))? {
            let p = e.map_err(io_at(dir))?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let referenced = state.points.iter().any(|m| m.undo.as_deref() == Some(name.as_str()));
            if name.starts_with("spool-")
                || (name.ends_with(".undo") && !referenced)
                || persist::is_leftover_tmp(&name, STATE_FILE)
            {
                let _ = std::fs::remove_file(&p);
            }
        }
        let mut undo = BTreeMap::new();
        for m in &state.points {
            if let Some(u) = &m.undo {
                undo.insert(m.info.seq, Arc::new(load_undo(&dir.join(u), replica.images.len())?));
            }
        }
        if let Some(seq) = state.rollback_to {
            tracing::warn!(replica = %dir.display(), seq, "finishing an interrupted rollback");
            let mut inner = Inner { state, undo, pins: HashMap::new() };
            replica.rollback_locked(&mut inner, seq)?;
            replica.inner = RwLock::new(inner);
            return Ok(replica);
        }
        replica.inner = RwLock::new(Inner { state, undo, pins: HashMap::new() });
        Ok(replica)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn spec(&self) -> &ReplicaSpec {
        &self.spec
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn disk_index(&self, disk_id: &str) -> Result<usize, ReplicaError> {
        self.images
            .iter()
            .position(|i| i.id == disk_id)
            .ok_or_else(|| ReplicaError::NotFound(format!("disk {disk_id} in replica of {}", self.spec.vm)))
    }

    pub fn copy_progress(&self) -> Vec<DiskCopyProgress> {
        self.read().state.copy.clone()
    }

    /// True once every disk's initial copy is complete.
    pub fn initial_complete(&self) -> bool {
        self.read().state.copy.iter().all(|c| c.complete)
    }

    /// Writes initial-copy data into a replica image (not durable until [`Self::ack_initial`]).
    pub fn write_initial(&self, disk_id: &str, offset: u64, data: &[u8]) -> Result<(), ReplicaError> {
        let i = self.disk_index(disk_id)?;
        let img = &self.images[i];
        check(img, "initial copy", offset, data.len() as u64)?;
        let inner = self.read();
        let acked = inner.state.copy.get(i).map(|c| c.acked_offset).unwrap_or(0);
        if offset < acked {
            return Err(ReplicaError::State(format!(
                "initial copy of {disk_id} at {offset} is below the acknowledged offset {acked}"
            )));
        }
        if !inner.state.points.is_empty() {
            return Err(ReplicaError::State("initial copy after recovery points exist".into()));
        }
        img.file.write_all_at(data, offset).map_err(io_at(&img.path))
    }

    /// Makes the initial copy of a disk durable up to `offset`.
    pub fn ack_initial(&self, disk_id: &str, offset: u64, complete: bool) -> Result<(), ReplicaError> {
        let i = self.disk_index(disk_id)?;
        let img = &self.images[i];
        if offset > img.size {
            return Err(ReplicaError::OutOfRange { what: "ack", disk: disk_id.into(), offset, len: 0, size: img.size });
        }
        img.file.sync_data().map_err(io_at(&img.path))?;
        let mut inner = self.write();
        if let Some(c) = inner.state.copy.get_mut(i) {
            c.acked_offset = c.acked_offset.max(offset);
            c.complete |= complete;
        }
        save_state(&self.dir, &inner.state)
    }

    /// Offline initial replication: copies the export in `dir` (already checked against
    /// this replica with [`crate::offline::Manifest::check`]) into the images, verifying
    /// each disk's checksum, then marks every disk's initial copy complete. Only the
    /// manifest's (allocated) ranges are read and written. A checksum mismatch empties
    /// the images again and fails. Returns the bytes copied; an already completed
    /// import returns 0.
    pub fn import_initial(&self, dir: &Path, manifest: &crate::offline::Manifest) -> Result<u64, ReplicaError> {
        {
            let inner = self.read();
            if inner.state.copy.iter().all(|c| c.complete) {
                return Ok(0);
            }
            if !inner.state.points.is_empty() || inner.state.copy.iter().any(|c| c.acked_offset > 0) {
                return Err(ReplicaError::State(
                    "the replica already received part of a network initial copy: import refused".into(),
                ));
            }
        }
        let mut copied = 0;
        let mut buf = vec![0u8; crate::offline::CHUNK as usize];
        let result = (|| {
            for img in &self.images {
                let d = manifest
                    .disks
                    .iter()
                    .find(|d| d.id == img.id)
                    .ok_or_else(|| ReplicaError::NotFound(format!("disk {} in the export", img.id)))?;
                let path = dir.join(&d.file);
                let src = File::open(&path).map_err(io_at(&path))?;
                let len = src.metadata().map_err(io_at(&path))?.len();
                if len != d.size_bytes {
                    return Err(ReplicaError::State(format!(
                        "{} is {len} bytes, the manifest says {}",
                        path.display(),
                        d.size_bytes
                    )));
                }
                let mut sum = crate::offline::Checksum::default();
                for &(s, e) in &d.ranges {
                    check(img, "import", s, e - s)?;
                    let mut off = s;
                    while off < e {
                        let n = (e - off).min(crate::offline::CHUNK) as usize;
                        src.read_exact_at(&mut buf[..n], off).map_err(io_at(&path))?;
                        sum.update(&buf[..n]);
                        img.file.write_all_at(&buf[..n], off).map_err(io_at(&img.path))?;
                        off += n as u64;
                        copied += n as u64;
                    }
                }
                if sum.hex() != d.xxh3 {
                    return Err(ReplicaError::Corrupt {
                        path,
                        why: format!(
                            "checksum mismatch: xxh3 {} read, {} in the manifest (the export was damaged in transit)",
                            sum.hex(),
                            d.xxh3
                        ),
                    });
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            // Nothing half-imported stays: the images are empty again.
            for img in &self.images {
                let _ = img.file.set_len(0).and_then(|()| img.file.set_len(img.size));
            }
            return Err(e);
        }
        for img in &self.images {
            self.ack_initial(&img.id, img.size, true)?;
        }
        tracing::info!(vm = %self.spec.vm, bytes = copied, dir = %dir.display(), "initial copy imported");
        Ok(copied)
    }

    pub fn latest_seq(&self) -> Option<u64> {
        self.read().state.points.last().map(|m| m.info.seq)
    }

    pub fn latest(&self) -> Option<PointInfo> {
        self.read().state.points.last().map(|m| m.info.clone())
    }

    /// Retained points, oldest first.
    pub fn points(&self) -> Vec<PointInfo> {
        self.read().state.points.iter().map(|m| m.info.clone()).collect()
    }

    /// Starts receiving point `seq`.
    pub fn begin_point(
        self: &Arc<Self>,
        seq: u64,
        created_unix_ms: i64,
        app_consistent: bool,
        resync: bool,
    ) -> Result<PointSpool, ReplicaError> {
        let name = format!("spool-{seq}-{}.pt", siterecovery_certs::random_hex(4));
        let path = self.dir.join(&name);
        let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_at(&path))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        w.write_all(SPOOL_MAGIC).and_then(|()| w.write_all(&seq.to_le_bytes())).map_err(io_at(&path))?;
        Ok(PointSpool {
            replica: self.clone(),
            name,
            path,
            w: Some(w),
            seq,
            created_unix_ms,
            app_consistent,
            resync,
            ranges: vec![Vec::new(); self.images.len()],
            bytes: 0,
        })
    }

    fn sync_images(&self) -> Result<(), ReplicaError> {
        for img in &self.images {
            img.file.sync_data().map_err(io_at(&img.path))?;
        }
        Ok(())
    }

    /// Applies every extent of a spool to the images, in order.
    fn apply_spool(&self, path: &Path) -> Result<(), ReplicaError> {
        let file = File::open(path).map_err(io_at(path))?;
        let mut r = BufReader::with_capacity(1 << 20, file);
        let corrupt = |why: &str| ReplicaError::Corrupt { path: path.to_path_buf(), why: why.into() };
        let mut magic = [0u8; 16];
        r.read_exact(&mut magic).map_err(|_| corrupt("short header"))?;
        if &magic[..8] != SPOOL_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let zeroes = vec![0u8; 1 << 20];
        let mut data = Vec::new();
        loop {
            let mut disk = [0u8; 4];
            r.read_exact(&mut disk).map_err(|_| corrupt("truncated record"))?;
            let disk = u32::from_le_bytes(disk);
            if disk == END {
                return Ok(());
            }
            let mut hdr = [0u8; 21];
            r.read_exact(&mut hdr).map_err(|_| corrupt("truncated record"))?;
            let kind = hdr[0];
            let offset = u64::from_le_bytes(hdr[1..9].try_into().unwrap_or_default());
            let len = u64::from_le_bytes(hdr[9..17].try_into().unwrap_or_default());
            let crc = u32::from_le_bytes(hdr[17..21].try_into().unwrap_or_default());
            let img = self.images.get(disk as usize).ok_or_else(|| corrupt("unknown disk"))?;
            check(img, "spool", offset, len)?;
            match kind {
                KIND_DATA => {
                    if len > MAX_EXTENT {
                        return Err(corrupt("extent too large"));
                    }
                    data.resize(len as usize, 0);
                    r.read_exact(&mut data).map_err(|_| corrupt("truncated data"))?;
                    if crc32c::crc32c(&data) != crc {
                        return Err(corrupt("checksum mismatch"));
                    }
                    img.file.write_all_at(&data, offset).map_err(io_at(&img.path))?;
                }
                KIND_ZEROES => {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(zeroes.len() as u64) as usize;
                        img.file.write_all_at(&zeroes[..n], offset + done).map_err(io_at(&img.path))?;
                        done += n as u64;
                    }
                }
                _ => return Err(corrupt("unknown extent kind")),
            }
        }
    }

    /// The replica's image files by disk id.
    pub fn images(&self) -> Vec<(String, PathBuf)> {
        self.images.iter().map(|i| (i.id.clone(), i.path.clone())).collect()
    }

    /// Rolls the images back to a retained point, destructively: later points are
    /// dropped (committing a failover to an older point). Crash-safe: the target is
    /// recorded first and the rollback re-done on open.
    pub fn rollback_to(&self, point: &str) -> Result<PointInfo, ReplicaError> {
        let mut inner = self.write();
        let meta = if point == "latest" {
            inner.state.points.last()
        } else {
            inner.state.points.iter().find(|m| m.info.id == point || m.info.seq.to_string() == point)
        }
        .ok_or_else(|| ReplicaError::NotFound(format!("point {point:?} of {}", self.spec.vm)))?;
        let info = meta.info.clone();
        if inner.state.points.last().is_some_and(|m| m.info.seq == info.seq) {
            return Ok(info);
        }
        inner.state.rollback_to = Some(info.seq);
        save_state(&self.dir, &inner.state)?;
        self.rollback_locked(&mut inner, info.seq)?;
        Ok(info)
    }

    fn rollback_locked(&self, inner: &mut Inner, seq: u64) -> Result<(), ReplicaError> {
        let later: Vec<u64> = inner.undo.range(seq + 1..).map(|(s, _)| *s).rev().collect();
        let mut buf = Vec::new();
        for s in later {
            let Some(undo) = inner.undo.get(&s).cloned() else { continue };
            for (disk, ranges) in undo.ranges.iter().enumerate() {
                let img = &self.images[disk];
                for &(off, len, pos) in ranges {
                    buf.resize(len as usize, 0);
                    undo.file.read_exact_at(&mut buf, pos).map_err(io_at(&img.path))?;
                    img.file.write_all_at(&buf, off).map_err(io_at(&img.path))?;
                }
            }
        }
        self.sync_images()?;
        let dropped: Vec<PointMeta> = inner.state.points.iter().filter(|m| m.info.seq > seq).cloned().collect();
        inner.state.points.retain(|m| m.info.seq <= seq);
        inner.undo.retain(|s, _| *s <= seq);
        inner.state.rollback_to = None;
        save_state(&self.dir, &inner.state)?;
        for m in dropped {
            if let Some(u) = m.undo {
                let _ = std::fs::remove_file(self.dir.join(u));
            }
        }
        tracing::info!(vm = %self.spec.vm, seq, "replica rolled back");
        Ok(())
    }

    /// Hashes `count` blocks of a disk from `first_block` (xxh3-128, little-endian).
    pub fn block_hashes(
        &self,
        disk_id: &str,
        block_size: u32,
        first_block: u64,
        count: u64,
    ) -> Result<Vec<[u8; 16]>, ReplicaError> {
        if block_size == 0 || block_size > 16 << 20 {
            return Err(ReplicaError::State(format!("block size {block_size} out of range")));
        }
        let img = &self.images[self.disk_index(disk_id)?];
        let _guard = self.read();
        let mut buf = vec![0u8; block_size as usize];
        let mut out = Vec::new();
        for b in first_block..first_block.saturating_add(count) {
            let off = b.saturating_mul(block_size as u64);
            if off >= img.size {
                break;
            }
            let n = (img.size - off).min(block_size as u64) as usize;
            img.file.read_exact_at(&mut buf[..n], off).map_err(io_at(&img.path))?;
            out.push(xxhash_rust::xxh3::xxh3_128(&buf[..n]).to_le_bytes());
        }
        Ok(out)
    }

    /// Hashes the sub-blocks of `sub_block_size` of each listed block of `block_size`, in
    /// the order given, concatenated (the last sub-block of the disk may be short; a block
    /// at the end of the disk has fewer sub-blocks). xxh3-128, little-endian, like
    /// [`Replica::block_hashes`]; read under the same read lock.
    pub fn sub_block_hashes(
        &self,
        disk_id: &str,
        block_size: u32,
        sub_block_size: u32,
        blocks: &[u64],
    ) -> Result<Vec<[u8; 16]>, ReplicaError> {
        if block_size == 0 || block_size > 16 << 20 || sub_block_size == 0 || !block_size.is_multiple_of(sub_block_size)
        {
            return Err(ReplicaError::State(format!("block size {block_size} / sub-block size {sub_block_size}")));
        }
        let img = &self.images[self.disk_index(disk_id)?];
        let _guard = self.read();
        let (bs, sbs) = (u64::from(block_size), u64::from(sub_block_size));
        let mut buf = vec![0u8; block_size as usize];
        let mut out = Vec::with_capacity(blocks.len() * (block_size / sub_block_size) as usize);
        for &b in blocks {
            let off = b.checked_mul(bs).filter(|&o| o < img.size).ok_or_else(|| {
                ReplicaError::State(format!("block {b} of {block_size} bytes is beyond disk {disk_id}"))
            })?;
            let n = (img.size - off).min(bs) as usize;
            img.file.read_exact_at(&mut buf[..n], off).map_err(io_at(&img.path))?;
            out.extend(buf[..n].chunks(sbs as usize).map(|c| xxhash_rust::xxh3::xxh3_128(c).to_le_bytes()));
        }
        Ok(out)
    }

    /// Opens a retained point for reading (`"latest"` or a point id); pinned (not pruned)
    /// until the view is dropped.
    pub fn open_point(self: &Arc<Self>, point: &str) -> Result<PointView, ReplicaError> {
        let mut inner = self.write();
        let meta = if point == "latest" {
            inner.state.points.last()
        } else {
            inner.state.points.iter().find(|m| m.info.id == point || m.info.seq.to_string() == point)
        }
        .ok_or_else(|| ReplicaError::NotFound(format!("point {point:?} of {}", self.spec.vm)))?;
        let info = meta.info.clone();
        *inner.pins.entry(info.seq).or_default() += 1;
        drop(inner);
        let view = Arc::new(ViewPin { replica: self.clone(), seq: info.seq });
        let disks = (0..self.images.len())
            .map(|i| (self.images[i].id.clone(), Arc::new(PointDevice { pin: view.clone(), disk: i })))
            .collect();
        Ok(PointView { info, disks })
    }

    /// Drops points outside the retention policy: keeps the latest, the newest point of
    /// every hour and every app-consistent point within the window, and pinned points.
    fn prune(&self, inner: &mut Inner) -> Result<(), ReplicaError> {
        let now = now_ms();
        let keep = retained(
            &inner.state.points.iter().map(|m| m.info.clone()).collect::<Vec<_>>(),
            self.spec.retention_ms,
            self.spec.bucket_ms,
            now,
        );
        let mut i = 0;
        while i < inner.state.points.len() {
            let seq = inner.state.points[i].info.seq;
            if keep.contains(&seq) || inner.pins.get(&seq).copied().unwrap_or(0) > 0 {
                i += 1;
                continue;
            }
            let removed = inner.state.points.remove(i);
            inner.undo.remove(&seq);
            if i == 0 {
                // The oldest went: the next one's undo now leads nowhere.
                if let Some(next) = inner.state.points.get_mut(0)
                    && let Some(u) = next.undo.take()
                {
                    inner.undo.remove(&next.info.seq);
                    save_state(&self.dir, &inner.state)?;
                    let _ = std::fs::remove_file(self.dir.join(u));
                }
            } else if let Some(next) = inner.state.points.get(i).cloned() {
                // Merge the removed undo into the next point's: older before-images win.
                inner.state.merges += 1;
                let name = format!("undo-{}-m{}.undo", next.info.seq, inner.state.merges);
                merge_undo(
                    &self.dir,
                    removed.undo.as_deref(),
                    next.undo.as_deref(),
                    &self.dir.join(&name),
                    next.info.seq,
                    self.images.len(),
                )?;
                let loaded = Arc::new(load_undo(&self.dir.join(&name), self.images.len())?);
                inner.state.points[i].undo = Some(name);
                inner.undo.insert(next.info.seq, loaded);
                save_state(&self.dir, &inner.state)?;
                if let Some(u) = next.undo {
                    let _ = std::fs::remove_file(self.dir.join(u));
                }
            } else {
                save_state(&self.dir, &inner.state)?;
            }
            if let Some(u) = removed.undo {
                let _ = std::fs::remove_file(self.dir.join(u));
            }
            tracing::debug!(vm = %self.spec.vm, seq, "recovery point pruned");
        }
        Ok(())
    }
}

fn check(img: &Image, what: &'static str, offset: u64, len: u64) -> Result<(), ReplicaError> {
    check_range(offset, len, img.size).map_err(|_| ReplicaError::OutOfRange {
        what,
        disk: img.id.clone(),
        offset,
        len,
        size: img.size,
    })
}

/// The seqs a retention policy keeps: the latest point; within `retention_ms` of now,
/// the newest point of each hour and every app-consistent point.
pub fn retained(
    points: &[PointInfo],
    retention_ms: u64,
    bucket_ms: u64,
    now_ms: i64,
) -> std::collections::BTreeSet<u64> {
    let mut keep = std::collections::BTreeSet::new();
    if let Some(last) = points.last() {
        keep.insert(last.seq);
    }
    let horizon = now_ms.saturating_sub(retention_ms.min(i64::MAX as u64) as i64);
    let mut newest_of_hour: BTreeMap<i64, u64> = BTreeMap::new();
    for p in points.iter().filter(|p| p.created_unix_ms >= horizon) {
        newest_of_hour.insert(p.created_unix_ms.div_euclid(bucket_ms.clamp(1, i64::MAX as u64) as i64), p.seq);
        if p.app_consistent {
            keep.insert(p.seq);
        }
    }
    keep.extend(newest_of_hour.values());
    keep
}

/// A point being received: extents spooled to a file, applied on commit.
pub struct PointSpool {
    replica: Arc<Replica>,
    name: String,
    path: PathBuf,
    w: Option<BufWriter<File>>,
    seq: u64,
    created_unix_ms: i64,
    app_consistent: bool,
    resync: bool,
    /// Ranges touched, per disk (for the undo record).
    ranges: Vec<Vec<(u64, u64)>>,
    bytes: u64,
}

impl Drop for PointSpool {
    fn drop(&mut self) {
        if self.w.is_some() {
            // Never committed: nothing was applied.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl PointSpool {
    /// Adds an extent; extents apply in the order pushed.
    pub fn push(&mut self, disk_id: &str, offset: u64, data: ExtentData<'_>) -> Result<(), ReplicaError> {
        let disk = self.replica.disk_index(disk_id)?;
        let img = &self.replica.images[disk];
        let (kind, len, crc, payload): (u8, u64, u32, &[u8]) = match data {
            ExtentData::Data(d) => (KIND_DATA, d.len() as u64, crc32c::crc32c(d), d),
            ExtentData::Zeroes(n) => (KIND_ZEROES, n, 0, &[]),
        };
        if len == 0 {
            return Ok(());
        }
        if kind == KIND_DATA && len > MAX_EXTENT {
            return Err(ReplicaError::OutOfRange { what: "extent", disk: disk_id.into(), offset, len, size: img.size });
        }
        check(img, "extent", offset, len)?;
        let w = self.w.as_mut().ok_or_else(|| ReplicaError::State("spool already committed".into()))?;
        let mut hdr = [0u8; 25];
        hdr[..4].copy_from_slice(&(disk as u32).to_le_bytes());
        hdr[4] = kind;
        hdr[5..13].copy_from_slice(&offset.to_le_bytes());
        hdr[13..21].copy_from_slice(&len.to_le_bytes());
        hdr[21..25].copy_from_slice(&crc.to_le_bytes());
        w.write_all(&hdr).and_then(|()| w.write_all(payload)).map_err(io_at(&self.path))?;
        self.ranges[disk].push((offset, len));
        self.bytes += len;
        Ok(())
    }

    /// Persists the point, then applies it atomically (see the module doc). A seq the
    /// replica already has returns that point (the sender's ack was lost).
    pub fn commit(mut self) -> Result<PointInfo, ReplicaError> {
        let replica = self.replica.clone();
        let mut w = self.w.take().ok_or_else(|| ReplicaError::State("spool already committed".into()))?;
        let path = self.path.clone();
        let result = (|| {
            w.write_all(&END.to_le_bytes()).map_err(io_at(&path))?;
            let file = w.into_inner().map_err(|e| ReplicaError::Io { path: path.clone(), source: e.into_error() })?;
            file.sync_all().map_err(io_at(&path))?;
            sync_dir(&replica.dir)?;
            let mut inner = replica.write();
            if let Some(existing) = inner.state.points.iter().find(|m| m.info.seq == self.seq) {
                return Ok(existing.info.clone());
            }
            if let Some(last) = inner.state.points.last()
                && self.seq < last.info.seq
            {
                return Err(ReplicaError::State(format!(
                    "point {} is older than the latest point {}",
                    self.seq, last.info.seq
                )));
            }
            if !inner.state.copy.iter().all(|c| c.complete) {
                return Err(ReplicaError::State("a point arrived before the initial copy completed".into()));
            }
            let info = PointInfo {
                id: format!("p{}", self.seq),
                seq: self.seq,
                created_unix_ms: self.created_unix_ms,
                app_consistent: self.app_consistent,
                resync: self.resync,
                size_bytes: self.bytes,
            };
            // Before-images, only when an earlier point exists to go back to.
            let undo = if inner.state.points.is_empty() {
                None
            } else {
                let name = format!("undo-{}.undo", self.seq);
                write_undo(&replica, &replica.dir.join(&name), self.seq, &self.ranges)?;
                Some(name)
            };
            inner.state.applying =
                Some(Applying { seq: self.seq, spool: self.name.clone(), undo: undo.clone(), info: info.clone() });
            save_state(&replica.dir, &inner.state)?;
            replica.apply_spool(&path)?;
            replica.sync_images()?;
            inner.state.applying = None;
            inner.state.points.push(PointMeta { info: info.clone(), undo: undo.clone() });
            if let Some(u) = &undo {
                inner.undo.insert(self.seq, Arc::new(load_undo(&replica.dir.join(u), replica.images.len())?));
            }
            save_state(&replica.dir, &inner.state)?;
            if let Err(e) = replica.prune(&mut inner) {
                tracing::warn!(vm = %replica.spec.vm, "pruning recovery points: {e:#}");
            }
            Ok(info)
        })();
        let _ = std::fs::remove_file(&path);
        result
    }
}

/// Writes the before-images of the union of `ranges` (per disk) from the images.
fn write_undo(replica: &Replica, path: &Path, seq: u64, ranges: &[Vec<(u64, u64)>]) -> Result<(), ReplicaError> {
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io_at(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut total = crc32c::crc32c(&[]);
    w.write_all(UNDO_MAGIC).and_then(|()| w.write_all(&seq.to_le_bytes())).map_err(io_at(path))?;
    let mut buf = Vec::new();
    for (disk, rs) in ranges.iter().enumerate() {
        let img = &replica.images[disk];
        for (off, len) in union(rs) {
            // in pieces of at most 4 MiB
            let mut done = 0;
            while done < len {
                let n = (len - done).min(4 << 20);
                buf.resize(n as usize, 0);
                img.file.read_exact_at(&mut buf, off + done).map_err(io_at(&img.path))?;
                let mut hdr = [0u8; 24];
                hdr[..4].copy_from_slice(&(disk as u32).to_le_bytes());
                hdr[4..12].copy_from_slice(&(off + done).to_le_bytes());
                hdr[12..20].copy_from_slice(&n.to_le_bytes());
                hdr[20..24].copy_from_slice(&crc32c::crc32c(&buf).to_le_bytes());
                total = crc32c::crc32c_append(total, &hdr);
                total = crc32c::crc32c_append(total, &buf);
                w.write_all(&hdr).and_then(|()| w.write_all(&buf)).map_err(io_at(path))?;
                done += n;
            }
        }
    }
    w.write_all(&END.to_le_bytes()).and_then(|()| w.write_all(&total.to_le_bytes())).map_err(io_at(path))?;
    let file = w.into_inner().map_err(|e| ReplicaError::Io { path: path.to_path_buf(), source: e.into_error() })?;
    file.sync_all().map_err(io_at(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Sorted union of possibly overlapping ranges.
fn union(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.iter().filter(|r| r.1 > 0).map(|&(o, l)| (o, o + l)).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

/// Reads an undo record's index, verifying every checksum.
fn load_undo(path: &Path, disks: usize) -> Result<Undo, ReplicaError> {
    let corrupt = |why: &str| ReplicaError::Corrupt { path: path.to_path_buf(), why: why.into() };
    let file = File::open(path).map_err(io_at(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file.try_clone().map_err(io_at(path))?);
    let mut head = [0u8; 16];
    r.read_exact(&mut head).map_err(|_| corrupt("short header"))?;
    if &head[..8] != UNDO_MAGIC {
        return Err(corrupt("bad magic"));
    }
    let mut pos = 16u64;
    let mut ranges = vec![Vec::new(); disks];
    let mut total = crc32c::crc32c(&[]);
    let mut buf = Vec::new();
    loop {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).map_err(|_| corrupt("truncated"))?;
        let disk = u32::from_le_bytes(d);
        if disk == END {
            let mut c = [0u8; 4];
            r.read_exact(&mut c).map_err(|_| corrupt("truncated footer"))?;
            if u32::from_le_bytes(c) != total {
                return Err(corrupt("checksum of the whole record mismatches"));
            }
            break;
        }
        let mut rest = [0u8; 20];
        r.read_exact(&mut rest).map_err(|_| corrupt("truncated"))?;
        let off = u64::from_le_bytes(rest[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
        let crc = u32::from_le_bytes(rest[16..20].try_into().unwrap_or_default());
        if (disk as usize) >= disks || len > 4 << 20 {
            return Err(corrupt("bad record"));
        }
        buf.resize(len as usize, 0);
        r.read_exact(&mut buf).map_err(|_| corrupt("truncated data"))?;
        if crc32c::crc32c(&buf) != crc {
            return Err(corrupt("record checksum mismatch"));
        }
        let mut hdr = [0u8; 24];
        hdr[..4].copy_from_slice(&d);
        hdr[4..].copy_from_slice(&rest);
        total = crc32c::crc32c_append(total, &hdr);
        total = crc32c::crc32c_append(total, &buf);
        ranges[disk as usize].push((off, len, pos + 24));
        pos += 24 + len;
    }
    for r in &mut ranges {
        r.sort_unstable();
    }
    Ok(Undo { file, ranges })
}

/// Writes `older` overlaid on `newer` (either may be absent) as one undo record.
fn merge_undo(
    dir: &Path,
    older: Option<&str>,
    newer: Option<&str>,
    out: &Path,
    seq: u64,
    disks: usize,
) -> Result<(), ReplicaError> {
    // Collect (disk, start, end) → (source, pos) pieces, older winning.
    let load = |n: Option<&str>| -> Result<Option<Undo>, ReplicaError> {
        n.map(|n| load_undo(&dir.join(n), disks)).transpose()
    };
    let (old, new) = (load(older)?, load(newer)?);
    let file = OpenOptions::new().write(true).create(true).truncate(true).open(out).map_err(io_at(out))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut total = crc32c::crc32c(&[]);
    w.write_all(UNDO_MAGIC).and_then(|()| w.write_all(&seq.to_le_bytes())).map_err(io_at(out))?;
    for disk in 0..disks {
        // piece map: start → (end, source 0=old 1=new, pos)
        let mut map: BTreeMap<u64, (u64, u8, u64)> = BTreeMap::new();
        if let Some(n) = &new {
            for &(o, l, p) in &n.ranges[disk] {
                map.insert(o, (o + l, 1, p));
            }
        }
        if let Some(o) = &old {
            for &(s, l, p) in &o.ranges[disk] {
                insert_over(&mut map, s, s + l, 0, p);
            }
        }
        let mut buf = Vec::new();
        for (&start, &(end, src, pos)) in &map {
            let undo = if src == 0 { old.as_ref() } else { new.as_ref() };
            let Some(undo) = undo else { continue };
            let len = end - start;
            buf.resize(len as usize, 0);
            undo.file.read_exact_at(&mut buf, pos).map_err(io_at(out))?;
            let mut hdr = [0u8; 24];
            hdr[..4].copy_from_slice(&(disk as u32).to_le_bytes());
            hdr[4..12].copy_from_slice(&start.to_le_bytes());
            hdr[12..20].copy_from_slice(&len.to_le_bytes());
            hdr[20..24].copy_from_slice(&crc32c::crc32c(&buf).to_le_bytes());
            total = crc32c::crc32c_append(total, &hdr);
            total = crc32c::crc32c_append(total, &buf);
            w.write_all(&hdr).and_then(|()| w.write_all(&buf)).map_err(io_at(out))?;
        }
    }
    w.write_all(&END.to_le_bytes()).and_then(|()| w.write_all(&total.to_le_bytes())).map_err(io_at(out))?;
    let file = w.into_inner().map_err(|e| ReplicaError::Io { path: out.to_path_buf(), source: e.into_error() })?;
    file.sync_all().map_err(io_at(out))?;
    sync_dir(dir)
}

/// Inserts `start..end` (source, pos) over whatever it covers in `map`, cutting pieces.
fn insert_over(map: &mut BTreeMap<u64, (u64, u8, u64)>, start: u64, end: u64, src: u8, pos: u64) {
    // piece starting before `start` that overlaps: cut its tail (and keep a remainder after `end`)
    if let Some((&s, &(e, sr, p))) = map.range(..start).next_back()
        && e > start
    {
        map.insert(s, (start, sr, p));
        if e > end {
            map.insert(end, (e, sr, p + (end - s)));
        }
    }
    let covered: Vec<u64> = map.range(start..end).map(|(&s, _)| s).collect();
    for s in covered {
        if let Some((e, sr, p)) = map.remove(&s)
            && e > end
        {
            map.insert(end, (e, sr, p + (end - s)));
        }
    }
    map.insert(start, (end, src, pos));
}

struct ViewPin {
    replica: Arc<Replica>,
    seq: u64,
}

impl Drop for ViewPin {
    fn drop(&mut self) {
        let mut inner = self.replica.write();
        if let Some(n) = inner.pins.get_mut(&self.seq) {
            *n -= 1;
            if *n == 0 {
                inner.pins.remove(&self.seq);
            }
        }
    }
}

/// A retained point opened for reading: one read-only device per disk.
pub struct PointView {
    pub info: PointInfo,
    pub disks: Vec<(String, Arc<PointDevice>)>,
}

/// A disk as it was at a point: the image plus the undo records of every later point.
pub struct PointDevice {
    pin: Arc<ViewPin>,
    disk: usize,
}

impl BlockDevice for PointDevice {
    fn size(&self) -> u64 {
        self.pin.replica.images[self.disk].size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let r = &self.pin.replica;
        let img = &r.images[self.disk];
        check_range(offset, buf.len() as u64, img.size)?;
        // The read lock keeps a point from being applied between the image read and
        // the overlay of its undo record.
        let inner = r.read();
        img.file.read_exact_at(buf, offset).map_err(DiskError::from_io)?;
        for (_, undo) in inner.undo.range(self.pin.seq + 1..).rev() {
            undo.overlay(self.disk, offset, buf).map_err(DiskError::from_io)?;
        }
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64, _: bool) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn trim(&self, _: u64, _: u64) -> Result<(), DiskError> {
        Err(DiskError::ReadOnly)
    }
    fn flush(&self) -> Result<(), DiskError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vm: &str, bucket_ms: u64) -> ReplicaSpec {
        ReplicaSpec {
            bucket_ms,
            relationship_id: "r-1".into(),
            vm: vm.into(),
            primary_host_id: "h1".into(),
            disks: vec![ReplicaDisk { id: "disk0".into(), size_bytes: 1 << 20 }],
            retention_ms: 24 * 3_600_000,
        }
    }

    fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
        let mut v = vec![0u8; dev.size() as usize];
        dev.read_at(&mut v, 0).expect("read");
        v
    }

    fn point(r: &Arc<Replica>, seq: u64, writes: &[(u64, u8, usize)]) -> PointInfo {
        // distinct buckets whatever the clock does between calls
        let mut s = r.begin_point(seq, now_ms() - 100_000 + seq as i64 * 10, false, false).expect("begin");
        for &(off, byte, len) in writes {
            s.push("disk0", off, ExtentData::Data(&vec![byte; len])).expect("push");
        }
        s.commit().expect("commit")
    }

    #[test]
    fn import_copies_the_export_and_a_damaged_one_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("src.img");
        let f = File::create(&src).expect("src");
        f.set_len(1 << 20).expect("len");
        f.write_all_at(&[7u8; 8192], 64 << 10).expect("write");
        let exp = dir.path().join("exp");
        let d = crate::offline::ExportDisk { id: "disk0".into(), image: src, size: 1 << 20, log_seq: 3 };
        let m = crate::offline::export(&exp, "r-1", "vm1", &[d]).expect("export");
        let set = ReplicaSet::open(&dir.path().join("replicas")).expect("open");
        let r = set.prepare(spec("vm1", 1)).expect("prepare");
        m.check(r.spec()).expect("fits");

        // Damaged in transit: refused, and nothing of it stays in the replica.
        let img = exp.join("disk0.img");
        let e = OpenOptions::new().write(true).open(&img).expect("export image");
        e.write_all_at(&[8u8], 64 << 10).expect("damage");
        let err = r.import_initial(&exp, &m).expect_err("checksum");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert!(!r.initial_complete());
        let v = std::fs::read(r.dir().join("disk0.img")).expect("image");
        assert!(v.iter().all(|&b| b == 0), "a refused import left data");

        e.write_all_at(&[7u8], 64 << 10).expect("repair");
        assert_eq!(r.import_initial(&exp, &m).expect("import"), m.copied_bytes());
        assert!(r.initial_complete());
        let v = std::fs::read(r.dir().join("disk0.img")).expect("image");
        assert!(v[64 << 10..(64 << 10) + 8192].iter().all(|&b| b == 7) && v[..64 << 10].iter().all(|&b| b == 0));
        // Idempotent: a repeated import (lost answer) does nothing.
        assert_eq!(r.import_initial(&exp, &m).expect("again"), 0);
        // Points now apply on top.
        point(&r, 1, &[(0, 9, 4096)]);
    }

    #[test]
    fn sub_block_hashes_are_the_small_block_hashes_of_the_listed_blocks() {
        let dir = tempfile::tempdir().expect("tmp");
        let set = ReplicaSet::open(dir.path()).expect("open");
        let r = set.prepare(spec("vm1", 1)).expect("prepare");
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        r.write_initial("disk0", 0, &data).expect("copy");
        let small = r.block_hashes("disk0", 4096, 0, 256).expect("4 KiB hashes");
        let sub = r.sub_block_hashes("disk0", 64 << 10, 4096, &[15, 2]).expect("sub-block hashes");
        assert_eq!(sub.len(), 32);
        assert_eq!(sub[..16], small[240..256]);
        assert_eq!(sub[16..], small[32..48]);
        assert!(r.sub_block_hashes("disk0", 64 << 10, 4096, &[16]).is_err(), "a block beyond the disk");
        assert!(r.sub_block_hashes("disk0", 64 << 10, 3000, &[0]).is_err(), "a size that does not divide");
    }

    #[test]
    fn points_are_readable_through_undo_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let set = ReplicaSet::open(dir.path()).expect("open");
        let r = set.prepare(spec("vm1", 1)).expect("prepare");
        r.write_initial("disk0", 0, &[1u8; 4096]).expect("copy");
        r.ack_initial("disk0", 1 << 20, true).expect("ack");
        let p1 = point(&r, 1, &[(0, 2, 100)]);
        let p2 = point(&r, 2, &[(50, 3, 100), (4000, 4, 200)]);
        let p3 = point(&r, 3, &[(0, 5, 10), (60, 6, 10)]);
        let mut expect1 = vec![0u8; 1 << 20];
        expect1[..4096].fill(1);
        expect1[..100].fill(2);
        let mut expect2 = expect1.clone();
        expect2[50..150].fill(3);
        expect2[4000..4200].fill(4);
        let mut expect3 = expect2.clone();
        expect3[..10].fill(5);
        expect3[60..70].fill(6);
        for (p, e) in [(&p1, &expect1), (&p2, &expect2), (&p3, &expect3)] {
            let v = r.open_point(&p.id).expect("open point");
            assert_eq!(&read_all(&*v.disks[0].1), e, "point {}", p.id);
        }
        // a view stays at its point while later points are applied
        let v2 = r.open_point(&p2.id).expect("view");
        point(&r, 4, &[(55, 7, 1000)]);
        assert_eq!(read_all(&*v2.disks[0].1), expect2);
        // idempotent re-ship of an applied seq
        assert_eq!(point(&r, 4, &[(0, 9, 1)]).seq, 4);
        drop(v2);
        drop(r);
        drop(set);
        let set = ReplicaSet::open(dir.path()).expect("reopen");
        let r = set.get("vm1").expect("replica");
        assert_eq!(r.points().len(), 4);
        let v = r.open_point(&p1.id).expect("p1");
        assert_eq!(read_all(&*v.disks[0].1), expect1);
        // out of range and unknown disk are refused
        let mut s = r.begin_point(5, now_ms(), false, false).expect("begin");
        assert!(s.push("disk0", (1 << 20) - 1, ExtentData::Data(&[0; 2])).is_err());
        assert!(s.push("nope", 0, ExtentData::Zeroes(1)).is_err());
    }

    #[test]
    fn pruning_merges_undo_so_older_points_stay_correct() {
        let dir = tempfile::tempdir().expect("tmp");
        let set = ReplicaSet::open(dir.path()).expect("open");
        let r = set.prepare(spec("vm2", 3_600_000)).expect("prepare");
        r.ack_initial("disk0", 1 << 20, true).expect("ack");
        let hour = 3_600_000;
        let t0 = now_ms() - 3 * hour;
        let mk = |seq: u64, t: i64, writes: &[(u64, u8, usize)]| {
            let mut s = r.begin_point(seq, t, false, false).expect("begin");
            for &(off, b, len) in writes {
                s.push("disk0", off, ExtentData::Data(&vec![b; len])).expect("push");
            }
            s.commit().expect("commit")
        };
        // two points in hour 0 (the first will be pruned as not newest of its hour), one in hour 2
        mk(1, t0 + 10, &[(0, 1, 100)]);
        mk(2, t0 + 20, &[(0, 2, 50)]);
        let p3 = mk(3, t0 + 30, &[(10, 3, 10)]);
        let before: Vec<u8> = read_all(&*r.open_point(&p3.id).expect("p3").disks[0].1);
        mk(4, now_ms(), &[(0, 4, 200)]);
        let seqs: Vec<u64> = r.points().iter().map(|p| p.seq).collect();
        assert!(!seqs.contains(&1) && !seqs.contains(&2), "pruned: {seqs:?}");
        assert!(seqs.contains(&3) && seqs.contains(&4));
        let after = read_all(&*r.open_point(&p3.id).expect("p3").disks[0].1);
        assert_eq!(before, after);
    }

    #[test]
    fn retention_keeps_latest_hourly_and_app_consistent() {
        let h = 3_600_000;
        let now = 100 * h;
        let p = |seq, t, app| PointInfo {
            id: format!("p{seq}"),
            seq,
            created_unix_ms: t,
            app_consistent: app,
            resync: false,
            size_bytes: 0,
        };
        let pts = vec![
            p(1, now - 30 * h, true),
            p(2, now - 3 * h, false),
            p(3, now - 3 * h + 5, false),
            p(4, now - h, true),
            p(5, now - 10, false),
        ];
        let keep = retained(&pts, (24 * h) as u64, h as u64, now);
        assert_eq!(keep.into_iter().collect::<Vec<_>>(), vec![3, 4, 5]);
    }

    #[test]
    fn interrupted_apply_rolls_forward() {
        let dir = tempfile::tempdir().expect("tmp");
        {
            let set = ReplicaSet::open(dir.path()).expect("open");
            let r = set.prepare(spec("vm3", 1)).expect("prepare");
            r.ack_initial("disk0", 1 << 20, true).expect("ack");
            point(&r, 1, &[(0, 1, 10)]);
            // simulate a crash after the "applying" mark: spool durable, images not written
            let mut s = r.begin_point(2, now_ms(), false, false).expect("begin");
            s.push("disk0", 0, ExtentData::Data(&[9u8; 10])).expect("push");
            let name = s.name.clone();
            let mut w = s.w.take().expect("writer");
            w.write_all(&END.to_le_bytes()).expect("end");
            w.flush().expect("flush");
            drop(w);
            let mut inner = r.write();
            write_undo(&r, &r.dir.join("undo-2.undo"), 2, &s.ranges).expect("undo");
            inner.state.applying = Some(Applying {
                seq: 2,
                spool: name,
                undo: Some("undo-2.undo".into()),
                info: PointInfo {
                    id: "p2".into(),
                    seq: 2,
                    created_unix_ms: 0,
                    app_consistent: false,
                    resync: false,
                    size_bytes: 10,
                },
            });
            save_state(&r.dir, &inner.state).expect("save");
        }
        let set = ReplicaSet::open(dir.path()).expect("reopen");
        let r = set.get("vm3").expect("replica");
        assert_eq!(r.latest_seq(), Some(2));
        let latest = read_all(&*r.open_point("latest").expect("latest").disks[0].1);
        assert_eq!(&latest[..10], &[9u8; 10]);
        let p1 = read_all(&*r.open_point("p1").expect("p1").disks[0].1);
        assert_eq!(&p1[..10], &[1u8; 10]);
    }

    /// A replica of `vm` with two points, closed again; returns its folder.
    fn replica_with_points(root: &Path, vm: &str) -> PathBuf {
        let set = ReplicaSet::open(root).expect("open");
        let r = set.prepare(spec(vm, 1)).expect("prepare");
        r.ack_initial("disk0", 1 << 20, true).expect("ack");
        point(&r, 1, &[(0, 1, 10)]);
        point(&r, 2, &[(0, 2, 10)]);
        r.dir().to_path_buf()
    }

    #[test]
    fn the_state_file_is_in_the_envelope_and_a_legacy_one_still_opens() {
        let dir = tempfile::tempdir().expect("tmp");
        let folder = replica_with_points(dir.path(), "vm4");
        let path = folder.join(STATE_FILE);
        let stored = std::fs::read(&path).expect("state");
        assert_eq!(&stored[..4], &REPLICA_STATE.magic);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o644);
        // What older agents wrote: the same JSON without the envelope.
        std::fs::write(&path, &stored[persist::HEADER_LEN..]).expect("legacy");
        let set = ReplicaSet::open(dir.path()).expect("reopen");
        let r = set.get("vm4").expect("legacy replica opens");
        assert_eq!(r.latest_seq(), Some(2));
        let p1 = read_all(&*r.open_point("p1").expect("p1").disks[0].1);
        assert_eq!(&p1[..10], &[1u8; 10]);
        point(&r, 3, &[(0, 3, 10)]);
        assert_eq!(&std::fs::read(&path).expect("state")[..4], &REPLICA_STATE.magic, "rewritten in the envelope");
    }

    #[test]
    fn a_torn_or_corrupt_state_file_keeps_the_replica_out_of_service_and_its_files() {
        let dir = tempfile::tempdir().expect("tmp");
        let folder = replica_with_points(dir.path(), "vm5");
        let path = folder.join(STATE_FILE);
        let good = std::fs::read(&path).expect("state");
        let files_before = std::fs::read_dir(&folder).expect("ls").count();
        let mut corrupt = good.clone();
        corrupt[persist::HEADER_LEN + 5] ^= 0x20;
        for (what, bytes) in [("torn", good[..good.len() / 2].to_vec()), ("corrupt", corrupt)] {
            std::fs::write(&path, &bytes).expect("damage");
            match Replica::open(&folder) {
                Err(ReplicaError::StateFile(e)) => {
                    assert_eq!(e.path(), path, "{what}");
                    assert!(e.is_damage(), "{what}: {e}");
                    let torn = matches!(e, PersistError::Torn { .. });
                    assert_eq!(torn, what == "torn", "{what}: {e}");
                }
                other => panic!("{what}: {other:?}"),
            }
            // The set opens, without that replica, and leaves its folder alone.
            let set = ReplicaSet::open(dir.path()).expect("set opens");
            assert!(set.get("vm5").is_none() && set.by_relationship("r-1").is_none(), "{what}");
            assert_eq!(std::fs::read_dir(&folder).expect("ls").count(), files_before, "{what}");
            assert_eq!(std::fs::read(&path).expect("state"), bytes, "{what}: the damaged file is kept");
        }
        std::fs::write(&path, &good).expect("repair");
        assert!(ReplicaSet::open(dir.path()).expect("set").get("vm5").is_some());
    }

    #[test]
    fn a_state_file_from_a_newer_agent_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let folder = replica_with_points(dir.path(), "vm6");
        let path = folder.join(STATE_FILE);
        let mut b = std::fs::read(&path).expect("state");
        b[4..6].copy_from_slice(&(REPLICA_STATE.version + 1).to_le_bytes());
        std::fs::write(&path, &b).expect("newer");
        assert!(matches!(Replica::open(&folder), Err(ReplicaError::StateFile(PersistError::NewerVersion { .. }))));
        assert!(ReplicaSet::open(dir.path()).expect("set").get("vm6").is_none());
    }

    #[test]
    fn leftover_temporaries_of_the_state_file_are_removed_on_open() {
        let dir = tempfile::tempdir().expect("tmp");
        let folder = replica_with_points(dir.path(), "vm7");
        let ours = folder.join("replica.json.0badc0de.tmp");
        let older = folder.join(".replica.json.tmp-1234");
        std::fs::write(&ours, b"SRRP").expect("tmp");
        std::fs::write(&older, b"{").expect("tmp");
        let set = ReplicaSet::open(dir.path()).expect("reopen");
        assert_eq!(set.get("vm7").expect("replica").latest_seq(), Some(2));
        assert!(!ours.exists() && !older.exists());
    }
}
