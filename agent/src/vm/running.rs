//! Serving a VM's disks: opening them (tracked images, or overlays over a recovery
//! point), exporting them over NBD (the VM's unix socket and the agent's TCP port),
//! running the start and stop hooks, and stopping (logs sealed, disks flushed).

use siterecovery_proto::model::VmName;
use std::sync::Arc;

use tokio::net::UnixListener;

use super::config::{Power, save_config};
use super::entry::{Disks, Entry, Running};
use super::manager::VmManager;
use super::{VmError, export_name, io};
use crate::disk::BlockDevice;
use crate::hrl::DiskId;
use crate::nbd::{self, ConnSlots, Exports};
use crate::overlay::Overlay;
use crate::tracker::{TrackedDisk, TrackerError};

impl VmManager {
    pub(super) async fn start_entry(&self, entry: &mut Entry) -> Result<(), VmError> {
        let name = entry.config.name.clone();
        let folder = entry.folder.clone();
        let disks_cfg = entry.config.disks.clone();
        let disks = match entry.config.failover.clone().filter(|f| !f.committed) {
            Some(f) => {
                let replica_of = if f.test_of.is_empty() { name.clone() } else { f.test_of.clone() };
                let replica_of = VmName::new(replica_of)
                    .map_err(|e| VmError::State(format!("the failover of {name} names a bad replica: {e}")))?;
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
                    overlays.push(Arc::new(Overlay::open(dev.clone(), &path)?));
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
        self.access.socket(&sock).map_err(io(&sock))?;
        // The VM's socket has a cap of its own (so a flood on TCP never reaches it):
        // room for every disk at its per-export cap, and as many again for clients
        // still in the handshake (so the export's own cap is what refuses, in-band).
        let limits = self.tcp_exports.limits();
        let per_vm = limits.max_export_connections.saturating_mul(entry.config.disks.len() + 1);
        let vm_exports = Arc::new(Exports::with_limits(limits.with_max_connections(per_vm)));
        for (cfg, disk) in entry.config.disks.iter().zip(disks.devices()) {
            let export = export_name(&name, &cfg.id);
            // One cap per disk, whichever listener a client comes through.
            let slots = ConnSlots::new(limits.max_export_connections);
            vm_exports.add_with_slots(export.clone(), disk.clone(), slots.clone())?;
            // Replace a stale export of the same name (should not exist, but never fail a start on it).
            self.tcp_exports.remove(&export);
            self.tcp_exports.add_with_slots(export, disk.clone(), slots)?;
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
        // QEMU connects to the exports served from here on; the start hook may return
        // before the guest is up (QEMU daemonizes), so it is awaited too.
        self.run_hook(self.hooks.on_start.as_deref(), entry).await;
        tracing::info!(vm = %name, socket = %sock.display(), "VM running; disks served over NBD");
        Ok(())
    }

    pub(super) async fn stop_entry(&self, entry: &mut Entry, power_off: bool) -> Result<(), VmError> {
        if let Some(running) = entry.running.take() {
            // Awaited: the hypervisor shuts the guest down while its disks are still
            // served (a guest cut off from its disks mid-shutdown is a crash).
            self.run_hook(self.hooks.on_stop.as_deref(), entry).await;
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

    /// Runs a hook with `sh -c` and the VM's environment, and waits for it (at most
    /// [`HOOK_TIMEOUT`]; a hook still running then is left to finish on its own).
    async fn run_hook(&self, cmd: Option<&str>, entry: &Entry) {
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
        let child = match c.spawn() {
            Ok(child) => child,
            Err(e) => return tracing::warn!(%vm, "hook did not run: {e}"),
        };
        let run = async move {
            match child.wait_with_output().await {
                Ok(out) if out.status.success() => tracing::info!(%vm, "hook ran"),
                Ok(out) => {
                    tracing::warn!(%vm, status = %out.status, stderr = %String::from_utf8_lossy(&out.stderr), "hook failed")
                }
                Err(e) => tracing::warn!(%vm, "hook did not finish: {e}"),
            }
        };
        let task = tokio::spawn(run);
        if tokio::time::timeout(HOOK_TIMEOUT, task).await.is_err() {
            tracing::warn!(vm = %entry.config.name, "hook still runs after {HOOK_TIMEOUT:?}; not waiting for it");
        }
    }
}

/// How long a VM start or stop waits for its hook (the QEMU hook's grace period plus
/// its quit fallback fit well inside).
pub const HOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
