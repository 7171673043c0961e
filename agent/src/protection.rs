//! Protection on this host: which local VMs replicate where (their senders), the
//! replicas this host keeps for others, and the read-only NBD exports of recovery
//! points. It carries out the provider's replication commands and forwards the
//! senders' statuses to the control channel.
//!
//! A protected VM has `protection.json` in its folder (the relationship and settings
//! the provider sent), so its sender starts again after an agent restart; the sender
//! keeps its own progress in `replication.json` beside it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use siterecovery_certs::files;
use siterecovery_proto::model::{FailoverKind, PointKind};
use siterecovery_proto::v1;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::AgentFiles;
use crate::hrl::DiskId;
use crate::nbd::Exports;
use crate::replica::{PointInfo, PointView, ReplicaDisk, ReplicaError, ReplicaSet, ReplicaSpec};
use crate::sender::{self, SenderHandle, SenderParams, VmDisks};
use crate::tracker::TrackedDisk;
use crate::vm::{VmError, VmManager};

/// File in a protected VM's folder.
pub const PROTECTION_FILE: &str = "protection.json";

/// Why a protection command failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtectionError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    #[error(transparent)]
    Nbd(#[from] crate::nbd::NbdError),
    #[error(transparent)]
    Files(#[from] siterecovery_certs::CertError),
    #[error(transparent)]
    Offline(#[from] crate::offline::OfflineError),
    #[error("internal: {0}")]
    Internal(String),
}

impl ProtectionError {
    pub fn code(&self) -> v1::ErrorCode {
        match self {
            ProtectionError::Invalid(_) => v1::ErrorCode::InvalidArgument,
            ProtectionError::NotFound(_) => v1::ErrorCode::NotFound,
            ProtectionError::Vm(e) => e.code(),
            ProtectionError::Replica(ReplicaError::NotFound(_)) => v1::ErrorCode::NotFound,
            ProtectionError::Replica(ReplicaError::Exists { .. }) => v1::ErrorCode::AlreadyExists,
            ProtectionError::Replica(ReplicaError::State(_)) => v1::ErrorCode::FailedPrecondition,
            ProtectionError::Offline(crate::offline::OfflineError::Invalid(_)) => v1::ErrorCode::FailedPrecondition,
            _ => v1::ErrorCode::Internal,
        }
    }
}

/// `protection.json`: what the provider asked, enough to restart the sender.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ProtectionRecord {
    relationship_id: String,
    replica_host_id: String,
    replica_address: String,
    interval_ms: u64,
    retention_ms: u64,
    app_consistent_every_ms: u64,
    compression: bool,
    retry_unit_ms: u64,
    resync_window_start_hour: u32,
    resync_window_end_hour: u32,
}

impl ProtectionRecord {
    fn new(
        relationship_id: String,
        replica_host_id: String,
        replica_address: String,
        s: v1::ReplicationSettings,
    ) -> Result<Self, ProtectionError> {
        if s.interval_ms == 0 {
            return Err(ProtectionError::Invalid("replication interval must be positive".into()));
        }
        Ok(ProtectionRecord {
            relationship_id,
            replica_host_id,
            replica_address,
            interval_ms: s.interval_ms,
            retention_ms: s.retention_ms,
            app_consistent_every_ms: s.app_consistent_every_ms,
            compression: s.compression,
            retry_unit_ms: s.retry_unit_ms,
            resync_window_start_hour: s.resync_window_start_hour,
            resync_window_end_hour: s.resync_window_end_hour,
        })
    }

    fn settings(&self) -> v1::ReplicationSettings {
        v1::ReplicationSettings {
            interval_ms: self.interval_ms,
            retention_ms: self.retention_ms,
            app_consistent_every_ms: self.app_consistent_every_ms,
            compression: self.compression,
            retry_unit_ms: self.retry_unit_ms,
            resync_window_start_hour: self.resync_window_start_hour,
            resync_window_end_hour: self.resync_window_end_hour,
        }
    }
}

/// The VM manager seen by one sender.
struct ManagedDisks {
    vms: Arc<VmManager>,
    vm: String,
}

impl VmDisks for ManagedDisks {
    fn disks(&self) -> Option<Vec<(DiskId, Arc<TrackedDisk>)>> {
        self.vms.disk_handles(&self.vm)
    }
}

struct PointExport {
    names: Vec<String>,
    _view: PointView,
}

/// Protection state of this host.
pub struct Protection {
    files: Arc<AgentFiles>,
    vms: Arc<VmManager>,
    replicas: Arc<ReplicaSet>,
    exports: Arc<Exports>,
    nbd_tcp: SocketAddr,
    quiesce_hook: Option<String>,
    senders: tokio::sync::Mutex<HashMap<String, SenderHandle>>,
    point_exports: Mutex<HashMap<String, PointExport>>,
    status_tx: mpsc::Sender<v1::ReplicationStatus>,
    latest: Arc<Mutex<HashMap<String, v1::ReplicationStatus>>>,
    statuses: broadcast::Sender<v1::ReplicationStatus>,
    shutdown: CancellationToken,
}

fn record_path(folder: &Path) -> std::path::PathBuf {
    folder.join(PROTECTION_FILE)
}

impl Protection {
    /// Starts the senders of every protected VM found in the VM folders.
    pub async fn start(
        files: Arc<AgentFiles>,
        vms: Arc<VmManager>,
        replicas: Arc<ReplicaSet>,
        exports: Arc<Exports>,
        nbd_tcp: SocketAddr,
        quiesce_hook: Option<String>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (status_tx, mut status_rx) = mpsc::channel::<v1::ReplicationStatus>(256);
        let (statuses, _) = broadcast::channel(256);
        let latest: Arc<Mutex<HashMap<String, v1::ReplicationStatus>>> = Arc::default();
        {
            let latest = latest.clone();
            let statuses = statuses.clone();
            tokio::spawn(async move {
                while let Some(s) = status_rx.recv().await {
                    if let Ok(mut l) = latest.lock() {
                        l.insert(s.relationship_id.clone(), s.clone());
                    }
                    // No subscriber while the provider is unreachable: the latest
                    // status is re-sent at the next connection.
                    let _ = statuses.send(s);
                }
            });
        }
        let me = Arc::new(Self {
            files,
            vms,
            replicas,
            exports,
            nbd_tcp,
            quiesce_hook,
            senders: tokio::sync::Mutex::new(HashMap::new()),
            point_exports: Mutex::new(HashMap::new()),
            status_tx,
            latest,
            statuses,
            shutdown,
        });
        for vm in me.vms.list().await {
            let Some(folder) = me.vms.folder(&vm.name).await else { continue };
            let path = record_path(&folder);
            if !path.exists() {
                continue;
            }
            match files::read_text(&path).map_err(ProtectionError::from).and_then(|t| {
                serde_json::from_str::<ProtectionRecord>(&t).map_err(|e| ProtectionError::Invalid(e.to_string()))
            }) {
                Ok(rec) => {
                    tracing::info!(vm = %vm.name, relationship = %rec.relationship_id, "resuming replication");
                    me.spawn_sender(&vm.name, &folder, &rec).await;
                }
                Err(e) => tracing::error!(vm = %vm.name, "cannot read {}: {e:#}", path.display()),
            }
        }
        me
    }

    /// New subscriber to sender statuses, and the latest status of every relationship.
    pub fn subscribe(&self) -> (broadcast::Receiver<v1::ReplicationStatus>, Vec<v1::ReplicationStatus>) {
        let rx = self.statuses.subscribe();
        let latest = self.latest.lock().map(|l| l.values().cloned().collect()).unwrap_or_default();
        (rx, latest)
    }

    async fn spawn_sender(&self, vm: &str, folder: &Path, rec: &ProtectionRecord) {
        let params = SenderParams {
            relationship_id: rec.relationship_id.clone(),
            vm: vm.to_owned(),
            replica_host_id: rec.replica_host_id.clone(),
            replica_address: rec.replica_address.clone(),
            settings: rec.settings(),
            state_dir: folder.to_path_buf(),
            quiesce_hook: self.quiesce_hook.clone(),
        };
        let disks = Arc::new(ManagedDisks { vms: self.vms.clone(), vm: vm.to_owned() });
        let handle =
            sender::spawn(params, disks, self.files.clone(), self.status_tx.clone(), self.shutdown.child_token());
        if let Some(old) = self.senders.lock().await.insert(vm.to_owned(), handle) {
            old.stop().await;
        }
    }

    /// The replica side of a new relationship.
    pub async fn prepare_replica(&self, c: v1::PrepareReplica) -> Result<(), ProtectionError> {
        let settings = c.settings.unwrap_or_default();
        let spec = ReplicaSpec {
            relationship_id: c.relationship_id,
            vm: c.vm,
            primary_host_id: c.primary_host_id,
            disks: c.disks.into_iter().map(|d| ReplicaDisk { id: d.id, size_bytes: d.size_bytes }).collect(),
            retention_ms: settings.retention_ms,
            // One point per hour, as Hyper-V Replica; a short interval (tests, labs)
            // keeps one point per interval bucket so there is something to choose from.
            bucket_ms: if settings.interval_ms < 30_000 { settings.interval_ms.max(1) } else { 3_600_000 },
        };
        if spec.disks.is_empty() {
            return Err(ProtectionError::Invalid("a replica needs at least one disk".into()));
        }
        if c.adopt_vm_disks {
            // Reverse replication: this host's (former primary's) VM becomes the replica.
            let vm = spec.vm.clone();
            if let Some(h) = self.senders.lock().await.remove(&vm) {
                h.stop().await;
            }
            let images = self.vms.release(&vm).await?;
            let replicas = self.replicas.clone();
            tokio::task::spawn_blocking(move || replicas.adopt(spec, &images))
                .await
                .map_err(|e| ProtectionError::Internal(e.to_string()))??;
            self.vms.forget(&vm).await?;
            tracing::info!(%vm, "former primary's disks adopted as the replica (resync brings them in line)");
            return Ok(());
        }
        let replicas = self.replicas.clone();
        tokio::task::spawn_blocking(move || replicas.prepare(spec))
            .await
            .map_err(|e| ProtectionError::Internal(e.to_string()))??;
        Ok(())
    }

    /// The primary side: track the VM and start its sender.
    pub async fn start_replication(&self, c: v1::StartReplication) -> Result<(), ProtectionError> {
        let folder = self
            .vms
            .folder(&c.vm)
            .await
            .ok_or_else(|| ProtectionError::NotFound(format!("no VM {} on this host", c.vm)))?;
        let rec = ProtectionRecord::new(
            c.relationship_id,
            c.replica_host_id,
            c.replica_address,
            c.settings.unwrap_or_default(),
        )?;
        // Tracking first: every write from here on is in a log, so the initial copy
        // plus the logs give a consistent replica.
        self.vms.set_tracking(&c.vm, true).await?;
        if c.resync_initial {
            // The replica holds the former primary's disks: compare and send only the
            // differing blocks instead of a full copy.
            let state = sender::SenderState {
                relationship_id: rec.relationship_id.clone(),
                phase: sender::Phase::ResyncRequired {
                    reason: "reverse replication: bringing the former primary's disks in line".into(),
                    requested: true,
                },
                next_seq: 1,
                ..Default::default()
            };
            state.save(&folder.join(sender::STATE_FILE)).map_err(|e| ProtectionError::Internal(e.to_string()))?;
        }
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| ProtectionError::Internal(e.to_string()))?;
        files::write_public(&record_path(&folder), &json)?;
        tracing::info!(vm = %c.vm, relationship = %rec.relationship_id, replica = %rec.replica_address, "replication enabled");
        self.spawn_sender(&c.vm, &folder, &rec).await;
        Ok(())
    }

    /// Offline initial replication, primary side: track the VM, seal all disks at one
    /// barrier, copy their allocated ranges into `c.dir` (see [`crate::offline`]), then
    /// start the sender in "waiting for import": it ships the writes made after the
    /// barrier as the first point once the replica host imported the directory.
    /// Returns the bytes exported.
    pub async fn export_initial(&self, c: v1::ExportInitial) -> Result<u64, ProtectionError> {
        let folder = self
            .vms
            .folder(&c.vm)
            .await
            .ok_or_else(|| ProtectionError::NotFound(format!("no VM {} on this host", c.vm)))?;
        if c.dir.is_empty() || !Path::new(&c.dir).is_absolute() {
            return Err(ProtectionError::Invalid(format!("export directory {:?} must be an absolute path", c.dir)));
        }
        let rec = ProtectionRecord::new(
            c.relationship_id,
            c.replica_host_id,
            c.replica_address,
            c.settings.unwrap_or_default(),
        )?;
        // A repeated export (the provider retried) starts over.
        if let Some(h) = self.senders.lock().await.remove(&c.vm) {
            h.stop().await;
        }
        self.vms.set_tracking(&c.vm, true).await?;
        let disks = self.vms.disk_handles(&c.vm).ok_or_else(|| {
            ProtectionError::Invalid(format!("VM {} is not running: start it to export its initial copy", c.vm))
        })?;
        let mut disks = disks;
        disks.sort_by(|a, b| a.0.cmp(&b.0));
        let (dir, rel_id, vm) = (std::path::PathBuf::from(&c.dir), rec.relationship_id.clone(), c.vm.clone());
        let d2 = disks.clone();
        let manifest = tokio::task::spawn_blocking(move || {
            // Every write after the barrier is in a later log: the first point.
            let through = sender::barrier_seal(&d2).map_err(|e| ProtectionError::Internal(e.to_string()))?;
            let export: Vec<crate::offline::ExportDisk> = d2
                .iter()
                .map(|(id, d)| crate::offline::ExportDisk {
                    id: id.as_str().to_owned(),
                    image: d.image_path().to_owned(),
                    size: crate::disk::BlockDevice::size(d.as_ref()),
                    log_seq: through.get(id.as_str()).copied().unwrap_or(0),
                })
                .collect();
            Ok::<_, ProtectionError>(crate::offline::export(&dir, &rel_id, &vm, &export)?)
        })
        .await
        .map_err(|e| ProtectionError::Internal(e.to_string()))??;
        // Logs up to the barrier are in the export.
        for (id, d) in &disks {
            if let Some(m) = manifest.disks.iter().find(|m| m.id == id.as_str())
                && m.log_seq > 0
            {
                d.delete_logs_through(crate::hrl::LogSeq(m.log_seq))
                    .map_err(|e| ProtectionError::Internal(e.to_string()))?;
            }
        }
        let state = sender::SenderState {
            relationship_id: rec.relationship_id.clone(),
            phase: sender::Phase::Replicating,
            next_seq: 1,
            assigned_through: manifest.disks.iter().map(|d| (d.id.clone(), d.log_seq)).collect(),
            awaiting_import: true,
            ..Default::default()
        };
        state.save(&folder.join(sender::STATE_FILE)).map_err(|e| ProtectionError::Internal(e.to_string()))?;
        let json = serde_json::to_vec_pretty(&rec).map_err(|e| ProtectionError::Internal(e.to_string()))?;
        files::write_public(&record_path(&folder), &json)?;
        let bytes = manifest.copied_bytes();
        tracing::info!(vm = %c.vm, relationship = %rec.relationship_id, dir = %c.dir, bytes,
            "initial copy exported; replication waits for the import on the replica host");
        self.spawn_sender(&c.vm, &folder, &rec).await;
        Ok(bytes)
    }

    /// Offline initial replication, replica side: verify the export in `c.dir` and copy
    /// it into the prepared replica. Returns the bytes imported.
    pub async fn import_initial(&self, c: v1::ImportInitial) -> Result<u64, ProtectionError> {
        let r = self
            .replicas
            .get(&c.vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {} on this host", c.vm)))?;
        if r.spec().relationship_id != c.relationship_id {
            return Err(ProtectionError::Invalid(format!(
                "the replica of {} belongs to relationship {}, not {}",
                c.vm,
                r.spec().relationship_id,
                c.relationship_id
            )));
        }
        let dir = std::path::PathBuf::from(&c.dir);
        tokio::task::spawn_blocking(move || {
            let manifest = crate::offline::Manifest::read(&dir)?;
            manifest.check(r.spec())?;
            Ok::<_, ProtectionError>(r.import_initial(&dir, &manifest)?)
        })
        .await
        .map_err(|e| ProtectionError::Internal(e.to_string()))?
    }

    /// Stops replicating a VM (primary side) and/or drops its replica (replica side).
    pub async fn stop_replication(&self, c: v1::StopReplication) -> Result<(), ProtectionError> {
        let mut did = false;
        if let Some(h) = self.senders.lock().await.remove(&c.vm) {
            h.stop().await;
            did = true;
        }
        if let Some(folder) = self.vms.folder(&c.vm).await
            && record_path(&folder).exists()
        {
            self.vms.set_tracking(&c.vm, false).await?;
            if let Some(handles) = self.vms.disk_handles(&c.vm) {
                for (_, d) in handles {
                    if let Some(last) = d.sealed_logs().last() {
                        let _ = d.delete_logs_through(last.seq);
                    }
                }
            }
            let _ = std::fs::remove_file(record_path(&folder));
            let _ = std::fs::remove_file(folder.join(sender::STATE_FILE));
            did = true;
        }
        if c.remove_replica && self.replicas.get(&c.vm).is_some() {
            self.unexport_point(&c.vm);
            let replicas = self.replicas.clone();
            let vm = c.vm.clone();
            tokio::task::spawn_blocking(move || replicas.remove(&vm))
                .await
                .map_err(|e| ProtectionError::Internal(e.to_string()))??;
            did = true;
        }
        if let Ok(mut l) = self.latest.lock() {
            l.remove(&c.relationship_id);
        }
        tracing::info!(vm = %c.vm, relationship = %c.relationship_id, did, "replication stopped");
        Ok(())
    }

    pub async fn request_resync(&self, c: v1::RequestResync) -> Result<(), ProtectionError> {
        let senders = self.senders.lock().await;
        let h = senders
            .get(&c.vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("VM {} is not replicating from this host", c.vm)))?;
        h.request_resync();
        Ok(())
    }

    pub fn list_points(&self, vm: &str) -> Result<Vec<v1::RecoveryPoint>, ProtectionError> {
        let r = self
            .replicas
            .get(vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        let points = r.points();
        let last = points.last().map(|p| p.seq);
        Ok(points.iter().map(|p| to_proto(p, Some(p.seq) == last)).collect())
    }

    /// Exports a point read-only over NBD on this host's TCP port; returns the URIs
    /// (one per disk, space-separated) and the point id.
    pub fn export_point(&self, vm: &str, point: &str) -> Result<(String, String), ProtectionError> {
        let r = self
            .replicas
            .get(vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        self.unexport_point(vm);
        let view = r.open_point(if point.is_empty() { "latest" } else { point })?;
        let mut names = Vec::new();
        let mut uris = Vec::new();
        for (disk, dev) in &view.disks {
            let name = format!("{vm}-{}-{disk}", view.info.id);
            self.exports.remove(&name);
            self.exports.add(name.clone(), dev.clone())?;
            uris.push(format!("nbd://{}/{name}", self.nbd_tcp));
            names.push(name);
        }
        let id = view.info.id.clone();
        tracing::info!(%vm, point = %id, "recovery point exported read-only");
        if let Ok(mut p) = self.point_exports.lock() {
            p.insert(vm.to_owned(), PointExport { names, _view: view });
        }
        Ok((uris.join(" "), id))
    }

    pub fn unexport_point(&self, vm: &str) -> bool {
        let old = self.point_exports.lock().ok().and_then(|mut p| p.remove(vm));
        match old {
            Some(e) => {
                for n in &e.names {
                    self.exports.remove(n);
                }
                true
            }
            None => false,
        }
    }

    /// Planned failover, primary side: stop the VM, ship every remaining log, stop
    /// replicating. Returns the last point the replica acknowledged.
    pub async fn prepare_failover(&self, c: v1::PrepareFailover) -> Result<v1::RecoveryPoint, ProtectionError> {
        let handles = self.vms.disk_handles(&c.vm);
        self.vms.stop(&c.vm).await?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
        if let Some(handles) = handles {
            // The sender ships what the stop sealed; logs are deleted once acknowledged.
            loop {
                let left: u64 = handles.iter().map(|(_, d)| d.sealed_logs().len() as u64).sum();
                if left == 0 {
                    break;
                }
                let st = self.latest.lock().ok().and_then(|l| l.get(&c.relationship_id).cloned());
                if let Some(st) = &st
                    && st.state == i32::from(siterecovery_proto::model::SenderState::Error)
                {
                    return Err(ProtectionError::Internal(format!("replication stopped: {}", st.error)));
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(ProtectionError::Internal(format!(
                        "{left} sealed logs still not acknowledged by the replica after 10 minutes"
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
        // The sender saves its state (last acknowledged point) before it deletes the
        // acknowledged logs, so once they are gone the state file is exact; the status
        // channel may lag behind it.
        let folder = self.vms.folder(&c.vm).await;
        let from_state = folder
            .and_then(|f| sender::SenderState::load(&f.join(sender::STATE_FILE)).ok().flatten())
            .and_then(|s| s.last_point)
            .map(|p| v1::RecoveryPoint {
                id: p.id,
                seq: p.seq,
                created_unix_ms: p.created_unix_ms,
                app_consistent: p.app_consistent,
                ..Default::default()
            });
        let last = from_state
            .or_else(|| {
                self.latest.lock().ok().and_then(|l| l.get(&c.relationship_id).and_then(|s| s.last_point.clone()))
            })
            .unwrap_or_default();
        self.stop_replication(v1::StopReplication {
            relationship_id: c.relationship_id,
            vm: c.vm.clone(),
            remove_replica: false,
        })
        .await?;
        tracing::info!(vm = %c.vm, point = %last.id, "primary stopped and drained for a planned failover");
        Ok(last)
    }

    fn resolve_point(&self, replica_of: &str, point: &str) -> Result<(String, Vec<(String, u64)>), ProtectionError> {
        let r = self
            .replicas
            .get(replica_of)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {replica_of} on this host")))?;
        let points = r.points();
        let p = match point {
            "" | "latest" => points.last(),
            "latest-app-consistent" => points.iter().rev().find(|p| p.app_consistent),
            id => points.iter().find(|p| p.id == id || p.seq.to_string() == id),
        }
        .ok_or_else(|| ProtectionError::NotFound(format!("no recovery point {point:?} of {replica_of}")))?;
        let disks = r.spec().disks.iter().map(|d| (d.id.clone(), d.size_bytes)).collect();
        Ok((p.id.clone(), disks))
    }

    /// Failover on the replica host (test, planned or unplanned).
    pub async fn failover(&self, c: v1::Failover, kind: FailoverKind) -> Result<v1::Vm, ProtectionError> {
        let (point_id, disks) = self.resolve_point(&c.vm, &c.point)?;
        let name = if c.test {
            if c.test_vm_name.is_empty() { format!("{}-test", c.vm) } else { c.test_vm_name.clone() }
        } else {
            c.vm.clone()
        };
        let fc = crate::vm::FailoverConfig {
            relationship_id: c.relationship_id.clone(),
            point_id: point_id.clone(),
            kind,
            committed: false,
            test_of: if c.test { c.vm.clone() } else { String::new() },
            started_unix_ms: chrono_now_ms(),
        };
        let vm = self.vms.create_from_point(&name, &disks, &c.nics, fc).await?;
        tracing::info!(vm = %name, point = %point_id, %kind, "VM started from a recovery point");
        if c.planned {
            return Ok(self.vms.commit(&name).await?);
        }
        Ok(vm)
    }

    pub async fn change_point(&self, c: v1::ChangePoint) -> Result<v1::Vm, ProtectionError> {
        let (point_id, _) = self.resolve_point(&c.vm, &c.point)?;
        Ok(self.vms.change_point(&c.vm, &point_id).await?)
    }

    pub async fn commit_failover(&self, c: v1::CommitFailover) -> Result<v1::Vm, ProtectionError> {
        Ok(self.vms.commit(&c.vm).await?)
    }

    pub async fn cleanup_test_failover(&self, c: v1::CleanupTestFailover) -> Result<(), ProtectionError> {
        let name = if c.test_vm_name.is_empty() { format!("{}-test", c.vm) } else { c.test_vm_name };
        match self.vms.config(&name).await {
            Some(cfg) if cfg.failover.as_ref().is_some_and(|f| f.kind == FailoverKind::Test) => {
                self.vms.delete(&name).await?;
                Ok(())
            }
            Some(_) => Err(ProtectionError::Invalid(format!("{name} is not a test VM"))),
            None => Ok(()), // already gone
        }
    }

    /// Local failover (the provider may be down): start the VM from a point of its
    /// replica here, as an unplanned failover the provider learns of when it is back.
    pub async fn local_failover(&self, vm: &str, point: &str) -> Result<v1::Vm, ProtectionError> {
        let r = self
            .replicas
            .get(vm)
            .ok_or_else(|| ProtectionError::NotFound(format!("no replica of {vm} on this host")))?;
        let relationship_id = r.spec().relationship_id.clone();
        let c = v1::Failover {
            relationship_id,
            vm: vm.to_owned(),
            point: point.to_owned(),
            nics: vec![],
            test: false,
            test_vm_name: String::new(),
            planned: false,
        };
        self.failover(c, FailoverKind::Local).await
    }

    /// Stops every sender (agent shutdown).
    pub async fn shutdown(&self) {
        let senders: Vec<SenderHandle> = self.senders.lock().await.drain().map(|(_, h)| h).collect();
        for h in senders {
            h.stop().await;
        }
    }
}

fn to_proto(p: &PointInfo, latest: bool) -> v1::RecoveryPoint {
    v1::RecoveryPoint {
        id: p.id.clone(),
        seq: p.seq,
        created_unix_ms: p.created_unix_ms,
        app_consistent: p.app_consistent,
        size_bytes: p.size_bytes,
        kind: if latest {
            PointKind::Latest
        } else if p.app_consistent {
            PointKind::AppConsistent
        } else if p.resync {
            PointKind::Resync
        } else {
            PointKind::Hourly
        }
        .into(),
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
