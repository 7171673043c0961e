//! The primary side of protection: start, seed, drain and stop the sender of a local
//! VM, and the offline export of its initial copy. The sender's own state is reached
//! only through `sender::{seed, forget}` and the sender handle.

use std::path::PathBuf;
use std::time::Duration;

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;

use super::error::joined;
use super::record::ProtectionRecord;
use super::request::{ExportInitial, PrepareFailover, RequestResync, StartReplication, StopReplication};
use super::{Protection, ProtectionError};
use crate::disk::BlockDevice;
use crate::hrl::LogSeq;
use crate::offline::{self, ExportDisk};
use crate::replication::sender::{self, Seed, Undrained};

/// Longest a planned failover waits for the replica to acknowledge the last logs.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

impl Protection {
    async fn vm_folder(&self, vm: &VmName) -> Result<PathBuf, ProtectionError> {
        self.vms.folder(vm).await.ok_or_else(|| ProtectionError::NotFound(format!("no VM {vm} on this host")))
    }

    /// The primary side: track the VM and start its sender.
    pub async fn start_replication(&self, c: StartReplication) -> Result<(), ProtectionError> {
        let t = c;
        let folder = self.vm_folder(&t.vm).await?;
        let rec = ProtectionRecord::new(t.relationship.clone(), t.replica_host, t.replica_address, t.settings)?;
        // Tracking first: every write from here on is in a log, so the initial copy
        // plus the logs give a consistent replica.
        self.vms.set_tracking(&t.vm, true).await?;
        if t.resync_initial {
            let reason = "reverse replication: bringing the former primary's disks in line".to_string();
            sender::seed(&folder, &t.relationship, Seed::Resync { reason })?;
        }
        rec.save(&folder)?;
        tracing::info!(vm = %t.vm, relationship = %rec.relationship_id, replica = %rec.replica_address, "replication enabled");
        self.spawn_sender(&t.vm, &folder, &rec).await;
        Ok(())
    }

    /// Offline initial replication, primary side: track the VM, seal all disks at one
    /// barrier, copy their allocated ranges into `c.dir` (see [`offline`]), then start
    /// the sender waiting for the import: it ships the writes made after the barrier as
    /// the first point once the replica host imported the directory. Returns the bytes
    /// exported.
    pub async fn export_initial(&self, c: ExportInitial) -> Result<u64, ProtectionError> {
        let t = c;
        let folder = self.vm_folder(&t.vm).await?;
        let rec = ProtectionRecord::new(t.relationship.clone(), t.replica_host, t.replica_address, t.settings)?;
        // A repeated export (the provider retried) starts over.
        self.stop_sender(&t.vm).await;
        self.vms.set_tracking(&t.vm, true).await?;
        let mut disks = self.vms.disk_handles(&t.vm).ok_or_else(|| {
            ProtectionError::Invalid(format!("VM {} is not running: start it to export its initial copy", t.vm))
        })?;
        disks.sort_by(|a, b| a.0.cmp(&b.0));
        let (dir, rel_id, vm) = (t.dir.clone(), rec.relationship_id.clone(), t.vm.to_string());
        let d2 = disks.clone();
        let manifest = tokio::task::spawn_blocking(move || {
            // Every write after the barrier is in a later log: the first point.
            let through = sender::barrier_seal(&d2)?;
            let export: Vec<ExportDisk> = d2
                .iter()
                .map(|(id, d)| ExportDisk {
                    id: id.as_str().to_owned(),
                    image: d.image_path().to_owned(),
                    size: BlockDevice::size(d.as_ref()),
                    log_seq: through.get(id).copied().unwrap_or(0),
                })
                .collect();
            Ok::<_, ProtectionError>(offline::export(&dir, rel_id.as_str(), &vm, &export)?)
        })
        .await
        .map_err(joined)??;
        // Logs up to the barrier are in the export.
        for (id, d) in &disks {
            if let Some(m) = manifest.disks.iter().find(|m| m.id == id.as_str())
                && m.log_seq > 0
            {
                d.delete_logs_through(LogSeq(m.log_seq)).map_err(|e| ProtectionError::Internal(e.to_string()))?;
            }
        }
        // The manifest lists exactly these disks (it was written from them).
        let through = disks
            .iter()
            .filter_map(|(id, _)| manifest.disks.iter().find(|m| m.id == id.as_str()).map(|m| (id.clone(), m.log_seq)))
            .collect();
        sender::seed(&folder, &t.relationship, Seed::AwaitImport { through })?;
        rec.save(&folder)?;
        let bytes = manifest.copied_bytes();
        tracing::info!(vm = %t.vm, relationship = %rec.relationship_id, dir = %t.dir.display(), bytes,
            "initial copy exported; replication waits for the import on the replica host");
        self.spawn_sender(&t.vm, &folder, &rec).await;
        Ok(bytes)
    }

    /// Stops replicating a VM (primary side) and/or drops its replica (replica side).
    pub async fn stop_replication(&self, c: StopReplication) -> Result<(), ProtectionError> {
        let vm = &c.vm;
        let mut did = self.stop_sender(vm).await;
        if let Some(folder) = self.vms.folder(vm).await
            && ProtectionRecord::exists(&folder)
        {
            self.vms.set_tracking(vm, false).await?;
            if let Some(handles) = self.vms.disk_handles(vm) {
                for (_, d) in handles {
                    if let Some(last) = d.sealed_logs().last() {
                        let _ = d.delete_logs_through(last.seq);
                    }
                    if let Err(e) = d.drop_bitmap() {
                        tracing::error!(%vm, "cannot remove the dirty-block bitmap: {e:#}");
                    }
                }
            }
            // A stopped VM's disks have no tracker: their bitmap files go by name.
            for d in self.vms.config(vm).await.map(|c| c.disks).unwrap_or_default() {
                let image = folder.join(&d.file);
                if let Err(e) = crate::tracker::bitmap::remove_bitmap_of(&image) {
                    tracing::error!(%vm, image = %image.display(), "cannot remove the dirty-block bitmap: {e}");
                }
            }
            ProtectionRecord::remove(&folder);
            sender::forget(&folder);
            did = true;
        }
        if c.remove_replica && self.replicas.get(vm).is_some() {
            self.unexport_point(vm);
            let replicas = self.replicas.clone();
            let v = vm.clone();
            tokio::task::spawn_blocking(move || replicas.remove(&v)).await.map_err(joined)??;
            did = true;
        }
        if let Ok(mut l) = self.latest.lock() {
            l.remove(c.relationship.as_str());
        }
        tracing::info!(%vm, relationship = %c.relationship, did, "replication stopped");
        Ok(())
    }

    pub async fn request_resync(&self, c: RequestResync) -> Result<(), ProtectionError> {
        let vm = &c.vm;
        let senders = self.senders.lock().await;
        let h = senders
            .get(vm.as_str())
            .ok_or_else(|| ProtectionError::NotFound(format!("VM {vm} is not replicating from this host")))?;
        h.request_resync();
        Ok(())
    }

    /// Planned failover, primary side: stop the VM, ship every remaining log, stop
    /// replicating. Returns the last point the replica acknowledged.
    pub async fn prepare_failover(&self, c: PrepareFailover) -> Result<v1::RecoveryPoint, ProtectionError> {
        let PrepareFailover { relationship: relationship_id, vm } = c;
        let handles = self.vms.disk_handles(&vm);
        self.vms.stop(&vm).await?;
        let handle = self.senders.lock().await.remove(vm.as_str());
        let acknowledged = match handle {
            // The sender ships what the stop sealed; logs are deleted once acknowledged.
            Some(h) => match h.drain_and_stop(handles, DRAIN_TIMEOUT).await {
                Ok(p) => p,
                Err(Undrained { error, handle }) => {
                    // It keeps replicating: the failover is refused, not the protection.
                    self.senders.lock().await.entry(vm.clone()).or_insert(handle);
                    return Err(error.into());
                }
            },
            None => None,
        };
        let last = acknowledged
            .map(|p| v1::RecoveryPoint {
                id: p.id,
                seq: p.seq,
                created_unix_ms: p.created_unix_ms,
                app_consistent: p.app_consistent,
                ..Default::default()
            })
            .or_else(|| {
                self.latest.lock().ok().and_then(|l| l.get(relationship_id.as_str()).and_then(|s| s.last_point.clone()))
            })
            .unwrap_or_default();
        self.stop_replication(StopReplication { relationship: relationship_id, vm: vm.clone(), remove_replica: false })
            .await?;
        tracing::info!(%vm, point = %last.id, "primary stopped and drained for a planned failover");
        Ok(last)
    }
}
