//! A VM as the manager holds it: its config, its folder and, while it runs, its served
//! disks (tracked images, or overlays over a recovery point) and NBD socket task.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::VmConfig;
use crate::disk::BlockDevice;
use crate::overlay::Overlay;
use crate::replica::PointView;
use crate::tracker::TrackedDisk;

/// The disks of a running VM: tracked images, or (a failed-over or test VM before
/// commit) copy-on-write overlays over a recovery point of a replica.
pub(super) enum Disks {
    Tracked(Vec<Arc<TrackedDisk>>),
    Overlays { overlays: Vec<Arc<Overlay>>, _view: PointView },
}

impl Disks {
    pub(super) fn devices(&self) -> Vec<Arc<dyn BlockDevice>> {
        match self {
            Disks::Tracked(d) => d.iter().map(|d| d.clone() as Arc<dyn BlockDevice>).collect(),
            Disks::Overlays { overlays, .. } => overlays.iter().map(|d| d.clone() as Arc<dyn BlockDevice>).collect(),
        }
    }
}

pub(super) struct Running {
    pub(super) disks: Disks,
    pub(super) token: CancellationToken,
    pub(super) unix_task: JoinHandle<()>,
}

pub(super) struct Entry {
    pub(super) config: VmConfig,
    pub(super) folder: PathBuf,
    pub(super) running: Option<Running>,
}
