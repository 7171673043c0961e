//! VMs on this host: their folders, config files and disk images, and serving their
//! disks over NBD while they run.
//!
//! A VM folder (`<data-dir>/vms/<name>/`) holds `vm.json` ([`VmConfig`]), one sparse
//! raw image per disk (`disk0.img`, ...), the disks' HRL logs, and while the VM runs
//! the unix socket `nbd.sock` serving its disks. Every disk is also served on the
//! agent's loopback TCP NBD port. Every write goes through a [`TrackedDisk`], which is
//! how the replication tracker sees it.
//!
//! The folders are the source of truth: at start the agent loads every folder and
//! starts the VMs whose config says `running`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use siterecovery_certs::files;
use siterecovery_certs::identity::is_token;
use siterecovery_proto::model::FailoverKind;
use siterecovery_proto::v1;
use tokio::net::UnixListener;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::disk::BlockDevice;
use crate::hrl::DiskId;
use crate::nbd::{self, Exports};
use crate::overlay::Overlay;
use crate::replica::{PointView, ReplicaSet};
use crate::tracker::{TrackedDisk, TrackerError};

/// Largest disk we create (64 TiB), well inside what raw files and NBD handle.
pub const MAX_DISK_SIZE: u64 = 64 << 40;
/// Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why a VM operation failed; `code()` gives the wire error code.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no VM {0:?} on this host")]
    NotFound(String),
    #[error("VM {0:?} already exists on this host")]
    Exists(String),
    #[error("{0}")]
    State(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    #[error(transparent)]
    Nbd(#[from] nbd::NbdError),
    #[error(transparent)]
    Cert(#[from] siterecovery_certs::CertError),
}

impl VmError {
    pub fn code(&self) -> v1::ErrorCode {
        match self {
            VmError::Invalid(_) => v1::ErrorCode::InvalidArgument,
            VmError::NotFound(_) => v1::ErrorCode::NotFound,
            VmError::Exists(_) => v1::ErrorCode::AlreadyExists,
            VmError::State(_) => v1::ErrorCode::FailedPrecondition,
            VmError::Io { source, .. } if source.raw_os_error() == Some(28) => v1::ErrorCode::ResourceExhausted,
            _ => v1::ErrorCode::Internal,
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Power {
    Off,
    Running,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub id: String,
    pub size_bytes: u64,
    /// Image file name inside the VM folder.
    pub file: String,
    /// Whether the replication tracker logs this disk's writes (on once protected).
    #[serde(default)]
    pub tracking: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicConfig {
    pub network: String,
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub dhcp: bool,
    pub mac: String,
}

/// `vm.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    pub name: String,
    pub created_unix_ms: i64,
    pub power: Power,
    pub disks: Vec<DiskConfig>,
    pub nics: Vec<NicConfig>,
    /// Set on a VM started by a failover on this (replica) host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<FailoverConfig>,
}

/// How a failed-over (or test) VM runs: until commit its disks are copy-on-write
/// overlays over a recovery point of the replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverConfig {
    pub relationship_id: String,
    pub point_id: String,
    pub kind: FailoverKind,
    pub committed: bool,
    #[serde(default)]
    pub test_of: String,
    pub started_unix_ms: i64,
}

impl FailoverConfig {
    pub fn to_proto(&self) -> v1::FailoverInfo {
        v1::FailoverInfo {
            relationship_id: self.relationship_id.clone(),
            point_id: self.point_id.clone(),
            kind: self.kind.into(),
            committed: self.committed,
            test_of: self.test_of.clone(),
            started_unix_ms: self.started_unix_ms,
        }
    }
}

/// Commands run when a VM starts or stops, so a real hypervisor can be attached:
/// run with `sh -c`, with `SITERECOVERY_VM`, `SITERECOVERY_VM_FOLDER` and
/// `SITERECOVERY_NBD_URIS` (space-separated) in the environment.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub on_start: Option<String>,
    pub on_stop: Option<String>,
}

/// The disks of a running VM: tracked images, or (a failed-over or test VM before
/// commit) copy-on-write overlays over a recovery point of a replica.
enum Disks {
    Tracked(Vec<Arc<TrackedDisk>>),
    Overlays { overlays: Vec<Arc<Overlay>>, _view: PointView },
}

impl Disks {
    fn devices(&self) -> Vec<Arc<dyn BlockDevice>> {
        match self {
            Disks::Tracked(d) => d.iter().map(|d| d.clone() as Arc<dyn BlockDevice>).collect(),
            Disks::Overlays { overlays, .. } => overlays.iter().map(|d| d.clone() as Arc<dyn BlockDevice>).collect(),
        }
    }
}

struct Running {
    disks: Disks,
    token: CancellationToken,
    unix_task: JoinHandle<()>,
}

struct Entry {
    config: VmConfig,
    folder: PathBuf,
    running: Option<Running>,
}

/// A VM's disks by id.
pub type DiskHandles = Vec<(DiskId, Arc<TrackedDisk>)>;

/// The VMs of this host.
pub struct VmManager {
    dir: PathBuf,
    /// Replicas of this host: failed-over and test VMs run over their points.
    replicas: Arc<ReplicaSet>,
    /// Disk handles of every VM opened since the agent started (kept after a stop, so
    /// replication can still ship the logs sealed by the stop). A std mutex: the
    /// replication sender reads it from blocking code.
    handles: std::sync::Mutex<BTreeMap<String, DiskHandles>>,
    vms: Mutex<BTreeMap<String, Entry>>,
    tcp_exports: Arc<Exports>,
    nbd_tcp: SocketAddr,
    hooks: Hooks,
    shutdown: CancellationToken,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn export_name(vm: &str, disk: &str) -> String {
    format!("{vm}-{disk}")
}

fn random_mac() -> String {
    let mut b = [0u8; 3];
    rand::fill(&mut b[..]);
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn save_config(folder: &Path, config: &VmConfig) -> Result<(), VmError> {
    let json = serde_json::to_vec_pretty(config).map_err(|e| VmError::Invalid(e.to_string()))?;
    files::write_public(&folder.join("vm.json"), &json)?;
    Ok(())
}

impl VmManager {
    /// Loads every VM folder under `dir` and starts those configured as running.
    /// `tcp_exports` is served on `nbd_tcp` by the caller.
    pub async fn load(
        dir: PathBuf,
        replicas: Arc<ReplicaSet>,
        tcp_exports: Arc<Exports>,
        nbd_tcp: SocketAddr,
        hooks: Hooks,
        shutdown: CancellationToken,
    ) -> Result<Self, VmError> {
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let mgr = Self {
            dir: dir.clone(),
            replicas,
            handles: std::sync::Mutex::new(BTreeMap::new()),
            vms: Mutex::new(BTreeMap::new()),
            tcp_exports,
            nbd_tcp,
            hooks,
            shutdown,
        };
        let mut found = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let folder = e.path();
            let cfg_path = folder.join("vm.json");
            if !cfg_path.exists() {
                continue;
            }
            match files::read_text(&cfg_path).map_err(VmError::from).and_then(|t| {
                serde_json::from_str::<VmConfig>(&t)
                    .map_err(|e| VmError::Invalid(format!("{}: {e}", cfg_path.display())))
            }) {
                Ok(cfg) => found.push((cfg, folder)),
                Err(e) => tracing::error!("skipping VM folder {}: {e:#}", folder.display()),
            }
        }
        let mut vms = mgr.vms.lock().await;
        for (config, folder) in found {
            let name = config.name.clone();
            let start = config.power == Power::Running;
            vms.insert(name.clone(), Entry { config, folder, running: None });
            if start {
                let entry = vms.get_mut(&name).ok_or_else(|| VmError::NotFound(name.clone()))?;
                match mgr.start_entry(entry).await {
                    Ok(()) => tracing::info!(vm = %name, "VM started (was running)"),
                    Err(e) => tracing::error!(vm = %name, "cannot start VM: {e:#}"),
                }
            }
        }
        drop(vms);
        Ok(mgr)
    }

    /// Creates a VM folder with sparse disk images; starts it when asked.
    pub async fn create(
        &self,
        name: &str,
        disk_sizes: &[u64],
        nics: &[v1::Nic],
        start: bool,
    ) -> Result<v1::Vm, VmError> {
        if !is_token(name) {
            return Err(VmError::Invalid(format!("VM name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -")));
        }
        if disk_sizes.is_empty() || disk_sizes.len() > 16 {
            return Err(VmError::Invalid("a VM has 1 to 16 disks".into()));
        }
        for &s in disk_sizes {
            if s == 0 || s % 512 != 0 || s > MAX_DISK_SIZE {
                return Err(VmError::Invalid(format!("disk size {s}: a multiple of 512 bytes, at most 64 TiB")));
            }
        }
        let mut vms = self.vms.lock().await;
        let folder = self.dir.join(name);
        if vms.contains_key(name) || folder.exists() {
            return Err(VmError::Exists(name.into()));
        }
        let sock = folder.join("nbd.sock");
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::Invalid(format!(
                "the NBD socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter --data-dir",
                sock.display()
            )));
        }
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        let result = (|| {
            let mut disks = Vec::new();
            for (i, &size) in disk_sizes.iter().enumerate() {
                let id = format!("disk{i}");
                let file = format!("{id}.img");
                let path = folder.join(&file);
                let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(io(&path))?;
                f.set_len(size).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                disks.push(DiskConfig { id, size_bytes: size, file, tracking: false });
            }
            let nics = nics
                .iter()
                .map(|n| NicConfig { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp, mac: random_mac() })
                .collect();
            let config = VmConfig {
                name: name.into(),
                created_unix_ms: now_ms(),
                power: Power::Off,
                disks,
                nics,
                failover: None,
            };
            save_config(&folder, &config)?;
            Ok(config)
        })();
        let config = match result {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&folder);
                return Err(e);
            }
        };
        tracing::info!(vm = %name, disks = disk_sizes.len(), "VM created");
        vms.insert(name.into(), Entry { config, folder, running: None });
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if start {
            self.start_entry(entry).await?;
        }
        Ok(self.report(entry))
    }

    pub async fn start(&self, name: &str) -> Result<v1::Vm, VmError> {
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if entry.running.is_none() {
            self.start_entry(entry).await?;
        }
        Ok(self.report(entry))
    }

    pub async fn stop(&self, name: &str) -> Result<v1::Vm, VmError> {
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        self.stop_entry(entry, true).await?;
        Ok(self.report(entry))
    }

    /// Deletes a stopped or running VM with its folder (images and logs).
    pub async fn delete(&self, name: &str) -> Result<(), VmError> {
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if entry.config.disks.iter().any(|d| d.tracking) {
            return Err(VmError::State(format!("VM {name} is protected; unprotect it before deleting")));
        }
        self.stop_entry(entry, true).await?;
        let folder = entry.folder.clone();
        std::fs::remove_dir_all(&folder).map_err(io(&folder))?;
        vms.remove(name);
        if let Ok(mut h) = self.handles.lock() {
            h.remove(name);
        }
        tracing::info!(vm = %name, "VM deleted");
        Ok(())
    }

    /// Every VM as the inventory reports it.
    pub async fn list(&self) -> Vec<v1::Vm> {
        let vms = self.vms.lock().await;
        vms.values().map(|e| self.report(e)).collect()
    }

    /// The disk handles of a running VM; `None` when it is not running.
    pub fn disk_handles(&self, name: &str) -> Option<Vec<(DiskId, Arc<TrackedDisk>)>> {
        self.handles.lock().ok().and_then(|h| h.get(name).cloned())
    }

    /// Whether the VM's disks are being served.
    pub async fn is_running(&self, name: &str) -> bool {
        self.vms.lock().await.get(name).is_some_and(|e| e.running.is_some())
    }

    /// Switches change tracking on or off for every disk of a VM, durably: the setting
    /// is in `vm.json` and applies at the next start too.
    pub async fn set_tracking(&self, name: &str, on: bool) -> Result<(), VmError> {
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if let Some(Running { disks: Disks::Tracked(disks), .. }) = &entry.running {
            for d in disks {
                d.set_tracking(on)?;
            }
        }
        for d in &mut entry.config.disks {
            d.tracking = on;
        }
        save_config(&entry.folder, &entry.config)?;
        tracing::info!(vm = %name, tracking = on, "change tracking switched");
        Ok(())
    }

    /// Creates a VM whose disks are copy-on-write overlays over a recovery point of a
    /// replica on this host (a test VM, or a failed-over VM before commit), and starts it.
    pub async fn create_from_point(
        &self,
        name: &str,
        disks: &[(String, u64)],
        nics: &[v1::Nic],
        failover: FailoverConfig,
    ) -> Result<v1::Vm, VmError> {
        if !is_token(name) {
            return Err(VmError::Invalid(format!("VM name {name:?}: use 1-64 of A-Z a-z 0-9 . _ -")));
        }
        let mut vms = self.vms.lock().await;
        let folder = self.dir.join(name);
        if vms.contains_key(name) || folder.exists() {
            return Err(VmError::Exists(name.into()));
        }
        std::fs::create_dir_all(&folder).map_err(io(&folder))?;
        let config = VmConfig {
            name: name.into(),
            created_unix_ms: now_ms(),
            power: Power::Off,
            disks: disks
                .iter()
                .map(|(id, size)| DiskConfig {
                    id: id.clone(),
                    size_bytes: *size,
                    file: format!("{id}.overlay"),
                    tracking: false,
                })
                .collect(),
            nics: nics
                .iter()
                .map(|n| NicConfig {
                    network: n.network.clone(),
                    ip: n.ip.clone(),
                    dhcp: n.dhcp,
                    mac: if n.mac.is_empty() { random_mac() } else { n.mac.clone() },
                })
                .collect(),
            failover: Some(failover),
        };
        if let Err(e) = save_config(&folder, &config) {
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        vms.insert(name.into(), Entry { config, folder: folder.clone(), running: None });
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        if let Err(e) = self.start_entry(entry).await {
            vms.remove(name);
            let _ = std::fs::remove_dir_all(&folder);
            return Err(e);
        }
        tracing::info!(vm = %name, "VM started from a recovery point (copy-on-write overlay)");
        Ok(self.report(entry))
    }

    /// Restarts a failed-over VM (not committed) from another point of its replica; the
    /// writes made since the failover are discarded.
    pub async fn change_point(&self, name: &str, point_id: &str) -> Result<v1::Vm, VmError> {
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        match &entry.config.failover {
            Some(f) if !f.committed => {}
            _ => return Err(VmError::State(format!("VM {name} is not a failed-over VM waiting for commit"))),
        }
        self.stop_entry(entry, false).await?;
        for d in &entry.config.disks {
            Overlay::remove_files(&entry.folder.join(&d.file));
        }
        if let Some(f) = &mut entry.config.failover {
            f.point_id = point_id.to_owned();
        }
        save_config(&entry.folder, &entry.config)?;
        self.start_entry(entry).await?;
        tracing::info!(vm = %name, point = %point_id, "failed-over VM restarted from another point");
        Ok(self.report(entry))
    }

    /// Commits a failover: the replica is rolled back to the chosen point, the overlay's
    /// writes are written into it, and its images become the VM's own disks (tracked
    /// from now on); the replica and its other points are gone.
    pub async fn commit(&self, name: &str) -> Result<v1::Vm, VmError> {
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        let f = match &entry.config.failover {
            Some(f) if f.committed => return Ok(self.report(entry)),
            Some(f) if f.kind == FailoverKind::Test => {
                return Err(VmError::State(format!("{name} is a test VM: clean it up instead")));
            }
            Some(f) => f.clone(),
            None => return Err(VmError::State(format!("VM {name} was not failed over"))),
        };
        let replica =
            self.replicas.get(name).ok_or_else(|| VmError::State(format!("the replica of {name} is gone")))?;
        self.stop_entry(entry, false).await?;
        let folder = entry.folder.clone();
        let disks = entry.config.disks.clone();
        let point = f.point_id.clone();
        tokio::task::spawn_blocking(move || -> Result<(), VmError> {
            replica.rollback_to(&point).map_err(|e| VmError::State(format!("rolling the replica back: {e}")))?;
            let images = replica.images();
            for d in &disks {
                let (_, img_path) = images
                    .iter()
                    .find(|(id, _)| *id == d.id)
                    .ok_or_else(|| VmError::State(format!("replica has no disk {}", d.id)))?;
                let ov_path = folder.join(&d.file);
                let base: Arc<dyn BlockDevice> =
                    Arc::new(crate::disk::RawFile::open(img_path, true).map_err(io(img_path))?);
                let ov = Overlay::open(base, &ov_path).map_err(io(&ov_path))?;
                let img = std::fs::OpenOptions::new().write(true).open(img_path).map_err(io(img_path))?;
                let mut buf = vec![0u8; crate::overlay::BLOCK as usize];
                for b in ov.written_blocks() {
                    let off = b * crate::overlay::BLOCK;
                    let n = (d.size_bytes - off).min(crate::overlay::BLOCK) as usize;
                    ov.read_overlay_block(b, &mut buf[..n]).map_err(io(&ov_path))?;
                    std::os::unix::fs::FileExt::write_all_at(&img, &buf[..n], off).map_err(io(img_path))?;
                }
                img.sync_all().map_err(io(img_path))?;
                let target = folder.join(format!("{}.img", d.id));
                std::fs::rename(img_path, &target).map_err(io(&target))?;
                Overlay::remove_files(&ov_path);
            }
            Ok(())
        })
        .await
        .map_err(|e| VmError::State(format!("commit: {e}")))??;
        for d in &mut entry.config.disks {
            d.file = format!("{}.img", d.id);
        }
        if let Some(fc) = &mut entry.config.failover {
            fc.committed = true;
        }
        save_config(&entry.folder, &entry.config)?;
        if let Err(e) = self.replicas.remove(name) {
            tracing::warn!(vm = %name, "removing the committed replica: {e:#}");
        }
        self.start_entry(entry).await?;
        tracing::info!(vm = %name, point = %f.point_id, "failover committed; the disks are the VM's own");
        Ok(self.report(entry))
    }

    /// Stops a VM and takes it out of this host's inventory, leaving its disk images for
    /// the caller (reverse replication turns them into a replica); returns their paths.
    pub async fn release(&self, name: &str) -> Result<Vec<(String, PathBuf)>, VmError> {
        let mut vms = self.vms.lock().await;
        let entry = vms.get_mut(name).ok_or_else(|| VmError::NotFound(name.into()))?;
        self.stop_entry(entry, true).await?;
        let images = entry.config.disks.iter().map(|d| (d.id.clone(), entry.folder.join(&d.file))).collect();
        Ok(images)
    }

    /// Forgets a released VM and deletes what is left of its folder (logs, config).
    pub async fn forget(&self, name: &str) -> Result<(), VmError> {
        let mut vms = self.vms.lock().await;
        if let Some(e) = vms.remove(name) {
            std::fs::remove_dir_all(&e.folder).map_err(io(&e.folder))?;
        }
        Ok(())
    }

    /// The VM's folder.
    pub async fn folder(&self, name: &str) -> Option<PathBuf> {
        self.vms.lock().await.get(name).map(|e| e.folder.clone())
    }

    /// A VM's configuration (local commands).
    pub async fn config(&self, name: &str) -> Option<VmConfig> {
        self.vms.lock().await.get(name).map(|e| e.config.clone())
    }

    /// Stops serving every VM for an agent shutdown: logs sealed, disks flushed, but the
    /// configured power state kept so the next start serves them again.
    pub async fn shutdown(&self) {
        let mut vms = self.vms.lock().await;
        for (name, entry) in vms.iter_mut() {
            if let Err(e) = self.stop_entry(entry, false).await {
                tracing::error!(vm = %name, "stopping VM at shutdown: {e:#}");
            }
        }
    }

    async fn start_entry(&self, entry: &mut Entry) -> Result<(), VmError> {
        let name = entry.config.name.clone();
        let folder = entry.folder.clone();
        let disks_cfg = entry.config.disks.clone();
        let disks = match entry.config.failover.clone().filter(|f| !f.committed) {
            Some(f) => {
                let replica_of = if f.test_of.is_empty() { name.clone() } else { f.test_of.clone() };
                let replica = self
                    .replicas
                    .get(&replica_of)
                    .ok_or_else(|| VmError::State(format!("the replica of {replica_of} is gone")))?;
                let view = replica
                    .open_point(&f.point_id)
                    .map_err(|e| VmError::State(format!("recovery point {} of {replica_of}: {e}", f.point_id)))?;
                let mut overlays = Vec::new();
                for (cfg, (_, dev)) in disks_cfg.iter().zip(&view.disks) {
                    let path = folder.join(&cfg.file);
                    overlays.push(Arc::new(Overlay::open(dev.clone(), &path).map_err(io(&path))?));
                }
                Disks::Overlays { overlays, _view: view }
            }
            None => Disks::Tracked(
                tokio::task::spawn_blocking(move || -> Result<Vec<Arc<TrackedDisk>>, VmError> {
                    let mut disks = Vec::new();
                    for d in &disks_cfg {
                        let id =
                            DiskId::new(&d.id).map_err(|e| VmError::Invalid(format!("disk id {:?}: {e}", d.id)))?;
                        let disk = TrackedDisk::open(&folder.join(&d.file), id, d.tracking)?;
                        for c in disk.corrupt_logs() {
                            tracing::error!(disk = %d.id, log = %c.path.display(), "damaged HRL log kept for inspection: {}", c.error);
                        }
                        disks.push(Arc::new(disk));
                    }
                    Ok(disks)
                })
                .await
                .map_err(|e| VmError::State(format!("opening disks: {e}")))??,
            ),
        };
        let sock = entry.folder.join("nbd.sock");
        // A socket file left by a crash would make bind fail.
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(io(&sock))?;
        let vm_exports = Arc::new(Exports::new());
        for (cfg, disk) in entry.config.disks.iter().zip(disks.devices()) {
            let export = export_name(&name, &cfg.id);
            vm_exports.add(export.clone(), disk.clone())?;
            // Replace a stale export of the same name (should not exist, but never fail a start on it).
            self.tcp_exports.remove(&export);
            self.tcp_exports.add(export, disk.clone())?;
        }
        let token = self.shutdown.child_token();
        let unix_task = tokio::spawn(nbd::serve_unix(listener, vm_exports, token.clone()));
        if let (Ok(mut h), Disks::Tracked(tracked)) = (self.handles.lock(), &disks) {
            let ids = entry.config.disks.iter().filter_map(|c| DiskId::new(&c.id).ok());
            h.insert(name.clone(), ids.zip(tracked.iter().cloned()).collect());
        }
        entry.running = Some(Running { disks, token, unix_task });
        if entry.config.power != Power::Running {
            entry.config.power = Power::Running;
            save_config(&entry.folder, &entry.config)?;
        }
        self.run_hook(self.hooks.on_start.as_deref(), entry);
        tracing::info!(vm = %name, socket = %sock.display(), "VM running; disks served over NBD");
        Ok(())
    }

    async fn stop_entry(&self, entry: &mut Entry, power_off: bool) -> Result<(), VmError> {
        if let Some(running) = entry.running.take() {
            self.run_hook(self.hooks.on_stop.as_deref(), entry);
            for cfg in &entry.config.disks {
                self.tcp_exports.remove(&export_name(&entry.config.name, &cfg.id));
            }
            running.token.cancel();
            let _ = running.unix_task.await;
            match running.disks {
                Disks::Tracked(disks) => {
                    tokio::task::spawn_blocking(move || -> Result<(), TrackerError> {
                        for d in &disks {
                            d.stop()?;
                        }
                        Ok(())
                    })
                    .await
                    .map_err(|e| VmError::State(format!("stopping disks: {e}")))??;
                }
                Disks::Overlays { overlays, .. } => {
                    for o in &overlays {
                        if let Err(e) = o.flush() {
                            tracing::warn!(vm = %entry.config.name, "flushing overlay: {e}");
                        }
                    }
                }
            }
            let _ = std::fs::remove_file(entry.folder.join("nbd.sock"));
            if let Ok(mut h) = self.handles.lock() {
                h.remove(&entry.config.name);
            }
            tracing::info!(vm = %entry.config.name, "VM stopped; logs sealed, disks flushed");
        }
        if power_off && entry.config.power != Power::Off {
            entry.config.power = Power::Off;
            save_config(&entry.folder, &entry.config)?;
        }
        Ok(())
    }

    fn run_hook(&self, cmd: Option<&str>, entry: &Entry) {
        let Some(cmd) = cmd else { return };
        let uris: Vec<String> = self.report(entry).disks.into_iter().map(|d| d.nbd_unix_uri).collect();
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg(cmd)
            .env("SITERECOVERY_VM", &entry.config.name)
            .env("SITERECOVERY_VM_FOLDER", &entry.folder)
            .env("SITERECOVERY_NBD_URIS", uris.join(" "))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let vm = entry.config.name.clone();
        match c.spawn() {
            Ok(child) => {
                tokio::spawn(async move {
                    match child.wait_with_output().await {
                        Ok(out) if out.status.success() => tracing::info!(%vm, "hook ran"),
                        Ok(out) => {
                            tracing::warn!(%vm, status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr), "hook failed")
                        }
                        Err(e) => tracing::warn!(%vm, "hook did not finish: {e}"),
                    }
                });
            }
            Err(e) => tracing::warn!(%vm, "hook did not run: {e}"),
        }
    }

    fn report(&self, e: &Entry) -> v1::Vm {
        let sock = e.folder.join("nbd.sock");
        let running = e.running.as_ref();
        v1::Vm {
            name: e.config.name.clone(),
            host_id: String::new(),
            host_name: String::new(),
            folder: e.folder.display().to_string(),
            created_unix_ms: e.config.created_unix_ms,
            replication: None,
            failover: e.config.failover.as_ref().map(FailoverConfig::to_proto),
            power_state: if running.is_some() { v1::PowerState::Running } else { v1::PowerState::Off } as i32,
            disks: e
                .config
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let path = e.folder.join(&d.file);
                    let export = export_name(&e.config.name, &d.id);
                    let live = running.and_then(|r| match &r.disks {
                        Disks::Tracked(d) => d.get(i),
                        Disks::Overlays { .. } => None,
                    });
                    v1::Disk {
                        id: d.id.clone(),
                        size_bytes: d.size_bytes,
                        image_path: path.display().to_string(),
                        nbd_unix_uri: if running.is_some() {
                            format!("nbd+unix:///{export}?socket={}", sock.display())
                        } else {
                            String::new()
                        },
                        nbd_tcp_uri: if running.is_some() {
                            format!("nbd://{}/{export}", self.nbd_tcp)
                        } else {
                            String::new()
                        },
                        export_name: export,
                        tracking: live.map(|d| d.tracking()).unwrap_or(d.tracking),
                        pending_log_bytes: live.map(|d| d.pending_log_bytes()).unwrap_or(0),
                        allocated_bytes: std::fs::metadata(&path).map(|m| m.blocks() * 512).unwrap_or(0),
                    }
                })
                .collect(),
            nics: e
                .config
                .nics
                .iter()
                .map(|n| v1::Nic { network: n.network.clone(), ip: n.ip.clone(), dhcp: n.dhcp, mac: n.mac.clone() })
                .collect(),
        }
    }
}
