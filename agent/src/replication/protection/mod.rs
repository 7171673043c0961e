//! Protection on this host: which local VMs replicate where (their senders), the
//! replicas this host keeps for others, and the read-only NBD exports of recovery
//! points. It carries out the provider's replication commands and forwards the
//! senders' statuses to the control channel.
//!
//! Each handler takes its command as validated values ([`request`], built once by
//! `control::command`), so nothing here handles raw wire strings. The primary side (`primary`) starts,
//! seeds, drains and stops senders only through the sender's methods; the replica side
//! (`replicas`) works on the replica store. A protected VM has `protection.json` in
//! its folder (`record`, owned here); the sender keeps its own `replication.json`.

mod error;
mod primary;
mod record;
mod replicas;
pub mod request;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use siterecovery_proto::model::VmName;
use siterecovery_proto::v1;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

pub use self::error::ProtectionError;
pub use self::record::PROTECTION_FILE;
use self::record::ProtectionRecord;
use crate::config::AgentFiles;
use crate::hrl::DiskId;
use crate::nbd::Exports;
use crate::replica::{PointView, ReplicaSet};
use crate::replication::sender::{self, SenderHandle, SenderParams, VmDisks};
use crate::tracker::TrackedDisk;
use crate::vm::VmManager;

/// The VM manager seen by one sender.
struct ManagedDisks {
    vms: Arc<VmManager>,
    vm: VmName,
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
    senders: tokio::sync::Mutex<HashMap<VmName, SenderHandle>>,
    point_exports: Mutex<HashMap<VmName, PointExport>>,
    status_tx: mpsc::Sender<v1::ReplicationStatus>,
    latest: Arc<Mutex<HashMap<String, v1::ReplicationStatus>>>,
    statuses: broadcast::Sender<v1::ReplicationStatus>,
    shutdown: CancellationToken,
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
        for vm in me.vms.names().await {
            let Some(folder) = me.vms.folder(&vm).await else { continue };
            match ProtectionRecord::load(&folder) {
                Ok(Some(rec)) => {
                    tracing::info!(%vm, relationship = %rec.relationship_id, "resuming replication");
                    me.spawn_sender(&vm, &folder, &rec).await;
                }
                Ok(None) => {}
                // A damaged record: the sender stays down (the provider sees no status
                // and an operator re-enables protection); nothing is guessed.
                Err(e) => tracing::error!(%vm, "cannot resume replication: {e:#}"),
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

    /// The latest status of every relationship (for the metrics).
    pub fn latest_statuses(&self) -> Vec<v1::ReplicationStatus> {
        self.latest.lock().map(|l| l.values().cloned().collect()).unwrap_or_default()
    }

    async fn spawn_sender(&self, vm: &VmName, folder: &Path, rec: &ProtectionRecord) {
        let params = SenderParams {
            relationship_id: rec.relationship_id.clone(),
            vm: vm.clone(),
            replica_host_id: rec.replica_host_id.clone(),
            replica_address: rec.replica_address.clone(),
            settings: rec.settings(),
            state_dir: folder.to_path_buf(),
            quiesce_hook: self.quiesce_hook.clone(),
        };
        let disks = Arc::new(ManagedDisks { vms: self.vms.clone(), vm: vm.clone() });
        let handle =
            sender::spawn(params, disks, self.files.clone(), self.status_tx.clone(), self.shutdown.child_token());
        if let Some(old) = self.senders.lock().await.insert(vm.clone(), handle) {
            old.stop().await;
        }
    }

    /// Stops the sender of `vm`, if it runs.
    async fn stop_sender(&self, vm: &VmName) -> bool {
        let handle = self.senders.lock().await.remove(vm);
        match handle {
            Some(h) => {
                h.stop().await;
                true
            }
            None => false,
        }
    }

    /// Stops every sender (agent shutdown).
    pub async fn shutdown(&self) {
        let senders: Vec<SenderHandle> = self.senders.lock().await.drain().map(|(_, h)| h).collect();
        for h in senders {
            h.stop().await;
        }
    }
}
