//! [`VmManager`]: the VMs of this host, each behind one async lock, and what it reads
//! without changing anything. Changing a VM is in `lifecycle` and `failover`; serving its
//! disks in `running`.

use siterecovery_proto::model::VmName;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::config::VmConfig;
use super::entry::Entry;
use crate::files::SocketAccess;
use crate::hrl::DiskId;
use crate::nbd::Exports;
use crate::replica::ReplicaSet;
use crate::tracker::TrackedDisk;

/// Commands run when a VM starts or stops, so a real hypervisor can be attached:
/// run with `sh -c`, with `SITERECOVERY_VM`, `SITERECOVERY_VM_FOLDER` and
/// `SITERECOVERY_NBD_URIS` (space-separated) in the environment.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub on_start: Option<String>,
    pub on_stop: Option<String>,
}

/// A VM's disks by id.
pub type DiskHandles = Vec<(DiskId, Arc<TrackedDisk>)>;

/// The VMs of this host.
pub struct VmManager {
    pub(super) dir: PathBuf,
    /// Replicas of this host: failed-over and test VMs run over their points.
    pub(super) replicas: Arc<ReplicaSet>,
    /// Disk handles of every VM opened since the agent started (kept after a stop, so
    /// replication can still ship the logs sealed by the stop). A std mutex: the
    /// replication sender reads it from blocking code.
    pub(super) handles: std::sync::Mutex<BTreeMap<String, DiskHandles>>,
    pub(super) vms: Mutex<BTreeMap<String, Entry>>,
    pub(super) tcp_exports: Arc<Exports>,
    pub(super) nbd_tcp: SocketAddr,
    /// Who may reach the VMs' NBD sockets (their folders' and sockets' modes).
    pub(super) access: SocketAccess,
    pub(super) hooks: Hooks,
    pub(super) shutdown: CancellationToken,
}

impl VmManager {
    /// The disk handles of a running VM; `None` when it is not running.
    /// The tracked disks of every running VM, by VM name (for the metrics).
    pub fn all_disk_handles(&self) -> Vec<(String, DiskHandles)> {
        self.handles.lock().map(|h| h.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    pub fn disk_handles(&self, name: &VmName) -> Option<Vec<(DiskId, Arc<TrackedDisk>)>> {
        let name = name.as_str();
        self.handles.lock().ok().and_then(|h| h.get(name).cloned())
    }

    /// Whether the VM's disks are being served.
    pub async fn is_running(&self, name: &VmName) -> bool {
        let name = name.as_str();
        self.vms.lock().await.get(name).is_some_and(|e| e.running.is_some())
    }

    /// The names of the VMs on this host. A name in a `vm.json` that breaks the VM name
    /// rule (written by hand, or by an older agent) is left out: nothing can address it.
    pub async fn names(&self) -> Vec<VmName> {
        self.vms.lock().await.keys().filter_map(|n| VmName::new(n.as_str()).ok()).collect()
    }

    /// The VM's folder.
    pub async fn folder(&self, name: &VmName) -> Option<PathBuf> {
        let name = name.as_str();
        self.vms.lock().await.get(name).map(|e| e.folder.clone())
    }

    /// A VM's configuration (local commands).
    pub async fn config(&self, name: &VmName) -> Option<VmConfig> {
        let name = name.as_str();
        self.vms.lock().await.get(name).map(|e| e.config.clone())
    }
}
