//! The replication sender: one task per protected VM on the primary host, shipping the
//! VM's disks to the replica host's `Peer` service through a [`PeerTransport`].
//!
//! Phases ([`Phase`], a pure state machine in `phase`; the persisted part in
//! `<vm folder>/replication.json`, [`SenderState`]):
//! - **initial copy** (`initial`): ask the replica how far each disk got, copy the
//!   allocated ranges of each disk in turn (1 MiB chunks, a bounded window of
//!   unacknowledged bytes, resumed from the acknowledged offset after any break). The
//!   VM keeps writing meanwhile; tracking is on, so those writes are in the HRL logs.
//! - **waiting for import**: offline initial replication; nothing ships until the
//!   replica host imported the exported copy.
//! - **replicating** (`delta`): every interval, seal all disks at one barrier and ship
//!   every log sealed since the last point as one recovery point. The first point after
//!   the copy merges every log collected during it: that makes the first consistent
//!   point. Logs are deleted only after the replica acknowledged the point.
//! - **resync required / resynchronising** (`resynchronise`): when logs are lost or
//!   damaged, the replica refuses a point (diverged), pending logs outgrow half the disk,
//!   or an operator asks: compare block hashes and ship only the differing blocks plus
//!   the logs sealed meanwhile, as one point.
//! - **catch-up** (`catchup`): a disk whose pending logs passed the log budget runs on a
//!   dirty-block bitmap (`tracker::bitmap`); the next cycle ships its dirty blocks plus
//!   the logs sealed since as one point, then the disk is back on logs.
//!
//! Crash safety: a point's seq and its logs are persisted before it is shipped, so after
//! a restart the same point is shipped again (the replica answers with the existing point
//! when it already has that seq). Logs are deleted only after the state saying they were
//! acknowledged is durable.
//!
//! Errors are classified ([`classify_code`], [`ReplicationError::class`]): recoverable
//! ones are retried with backoff ([`retry_delay_units`]), a resync-class one starts a
//! resync, a fatal one stops replication until the task is stopped or a resync requested.
//!
//! Only this module touches the state file: the protection handlers [`seed`] it, read
//! the last acknowledged point from [`SenderHandle::drain_and_stop`] and [`forget`] it.

mod catchup;
mod delta;
mod error;
mod initial;
pub mod phase;
mod resynchronise;
mod ship;
mod state;
mod task;
pub mod transport;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use siterecovery_proto::model::{HostId, RelationshipId, VmName};
use siterecovery_proto::v1;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::error::{ErrorClass, ReplicationError, classify_code, classify_io, retry_delay_units};
pub use self::phase::{Event, InvalidTransition, Phase, Stage};
pub use self::state::{PendingPoint, PointRecord, STATE_FILE, SenderState};
pub use self::transport::{GrpcPeer, PeerTransport};
use crate::config::AgentFiles;
pub use crate::extents::{allocated_below, allocated_ranges};
use crate::hrl::{self, DiskId};
use crate::tracker::TrackedDisk;

/// Raw bytes per initial-copy chunk.
pub const COPY_CHUNK: u64 = 1 << 20;
/// Unacknowledged raw bytes in flight during the initial copy (the replica acknowledges
/// every few MiB; this bounds what a broken connection costs to send again).
pub const COPY_WINDOW: u64 = 32 << 20;
/// Largest data extent of a point on the wire (larger writes are split).
pub const EXTENT_MAX: usize = 1 << 20;
/// A point message is sent once its extents' data reach this size (well under tonic's
/// 4 MiB message limit).
pub const POINT_MESSAGE_BYTES: usize = 2 << 20;
/// zstd level for the wire: level 1 is ~0.34 GB/s, fast enough not to be the bottleneck.
pub const ZSTD_LEVEL: i32 = 1;

/// What the lead's VM manager hands the sender for one protected VM.
#[derive(Debug, Clone)]
pub struct SenderParams {
    pub relationship_id: RelationshipId,
    pub vm: VmName,
    pub replica_host_id: HostId,
    /// host:port of the replica host's peer listener.
    pub replica_address: String,
    pub settings: v1::ReplicationSettings,
    /// The VM folder: the state file lives here.
    pub state_dir: PathBuf,
    /// `sh -c` command run before an app-consistent seal; the point is marked
    /// app-consistent only if it exits 0.
    pub quiesce_hook: Option<String>,
}

/// The disks of the protected VM.
pub trait VmDisks: Send + Sync + 'static {
    /// The VM's tracked disks, or `None` while the VM is stopped (the sender then ships
    /// what is already sealed, reports "paused" and keeps polling).
    fn disks(&self) -> Option<Vec<(DiskId, Arc<TrackedDisk>)>>;
}

pub(crate) type Disks = Vec<(DiskId, Arc<TrackedDisk>)>;

/// How a new relationship's sender starts, written before it is spawned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seed {
    /// Reverse replication: the replica holds the former primary's disks; compare and
    /// send only the differing blocks instead of a full copy.
    Resync { reason: String },
    /// Offline initial replication: the copy was exported with every log up to
    /// `through` (disk id → log seq); ship nothing until the replica host imported it.
    AwaitImport { through: BTreeMap<DiskId, u64> },
}

/// Writes the starting state of a sender of `relationship_id` in `state_dir`.
pub fn seed(state_dir: &Path, relationship_id: &RelationshipId, seed: Seed) -> Result<(), ReplicationError> {
    let mut st = SenderState::fresh(relationship_id);
    match seed {
        Seed::Resync { reason } => st.phase = Stage::ResyncRequired { reason, requested: true },
        Seed::AwaitImport { through } => {
            st.phase = Stage::Replicating;
            st.assigned_through = through;
            st.awaiting_import = true;
        }
    }
    Ok(st.save(&state_dir.join(STATE_FILE))?)
}

/// Removes the sender's state of a VM that no longer replicates.
pub fn forget(state_dir: &Path) {
    let path = state_dir.join(STATE_FILE);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!("removing {}: {e}", path.display());
    }
}

/// Why a drain did not finish.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("replication stopped: {0}")]
    Failed(String),
    #[error("{left} sealed logs still not acknowledged by the replica after {waited:?}")]
    Timeout { left: u64, waited: Duration },
}

/// A sender whose drain failed, still running.
pub struct Undrained {
    pub error: DrainError,
    pub handle: SenderHandle,
}

/// The running sender of one VM.
pub struct SenderHandle {
    relationship_id: RelationshipId,
    cancel: CancellationToken,
    resync: Arc<ResyncRequest>,
    phase: watch::Receiver<Phase>,
    task: JoinHandle<SenderState>,
}

#[derive(Default)]
struct ResyncRequest {
    flag: AtomicBool,
    notify: Notify,
}

impl SenderHandle {
    /// Asks for a resync now (an operator's request: not held back by business hours).
    pub fn request_resync(&self) {
        self.resync.flag.store(true, Ordering::SeqCst);
        self.resync.notify.notify_one();
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Cancels the task and waits for it to end; its last persisted state.
    pub async fn stop(self) -> Option<SenderState> {
        self.cancel.cancel();
        match self.task.await {
            Ok(st) => Some(st),
            Err(e) => {
                tracing::error!(relationship = %self.relationship_id, "sender task failed: {e}");
                None
            }
        }
    }

    /// Planned failover: once the VM is stopped, waits until every log sealed on
    /// `disks` is acknowledged (the sender deletes a log only then), stops the task and
    /// returns the last point the replica acknowledged. A sender that does not drain is
    /// handed back, still running.
    pub async fn drain_and_stop(
        self,
        disks: Option<Disks>,
        timeout: Duration,
    ) -> Result<Option<PointRecord>, Undrained> {
        if let Err(error) = self.drain(disks, timeout).await {
            return Err(Undrained { error, handle: self });
        }
        // The task persists the acknowledgement before it deletes the logs, so its final
        // state is exact; a status message may lag behind it.
        Ok(self.stop().await.and_then(|st| st.last_point))
    }

    async fn drain(&self, disks: Option<Disks>, timeout: Duration) -> Result<(), DrainError> {
        let Some(disks) = disks else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left: u64 = disks.iter().map(|(_, d)| d.sealed_logs().len() as u64).sum();
            if left == 0 {
                return Ok(());
            }
            if let Phase::Failed { error, .. } = self.phase() {
                return Err(DrainError::Failed(error));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(DrainError::Timeout { left, waited: timeout });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn relationship_id(&self) -> &RelationshipId {
        &self.relationship_id
    }
}

/// Starts the sender of one VM over mutual-TLS gRPC. Tracking must already be on for
/// every disk.
pub fn spawn(
    params: SenderParams,
    disks: Arc<dyn VmDisks>,
    files: Arc<AgentFiles>,
    status: mpsc::Sender<v1::ReplicationStatus>,
    shutdown: CancellationToken,
) -> SenderHandle {
    let peer = GrpcPeer::new(params.replica_address.clone(), params.replica_host_id.clone(), files);
    spawn_with(params, disks, peer, status, shutdown)
}

/// Starts the sender of one VM over `peer`.
pub fn spawn_with<T: PeerTransport>(
    params: SenderParams,
    disks: Arc<dyn VmDisks>,
    peer: T,
    status: mpsc::Sender<v1::ReplicationStatus>,
    shutdown: CancellationToken,
) -> SenderHandle {
    let cancel = shutdown.child_token();
    let resync = Arc::new(ResyncRequest::default());
    let relationship_id = params.relationship_id.clone();
    let task = task::Task::new(params, disks, peer, status, cancel.clone(), resync.clone());
    let phase = task.phase_watch();
    let span = tracing::info_span!("sender", relationship = %relationship_id, vm = %task.p.vm);
    let task = tokio::spawn(tracing::Instrument::instrument(task.run(), span));
    SenderHandle { relationship_id, cancel, resync, phase, task }
}

/// Freezes every disk (in id order), seals each, releases: every disk's log ends at the
/// same instant. Returns, per disk, the highest sealed log seq (the one just sealed, or
/// the last sealed before when the disk had no writes).
pub(crate) fn barrier_seal(disks: &Disks) -> Result<BTreeMap<DiskId, u64>, ReplicationError> {
    let before: Vec<u64> = disks.iter().map(|(_, d)| d.sealed_logs().last().map_or(0, |l| l.seq.0)).collect();
    for (_, d) in disks {
        d.write_back()?; // shortens the freeze
    }
    let mut guards: Vec<_> = disks.iter().map(|(_, d)| d.freeze()).collect();
    let mut out = BTreeMap::new();
    for (((id, _), g), b) in disks.iter().zip(guards.iter_mut()).zip(before) {
        let sealed = g.seal()?;
        out.insert(id.clone(), sealed.map_or(b, |s| s.0));
    }
    drop(guards);
    Ok(out)
}

/// Runs blocking work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplicationError> + Send + 'static,
) -> Result<T, ReplicationError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ReplicationError::Protocol(format!("blocking task: {e}")))?
}

fn now_ms() -> i64 {
    hrl::now_ms() as i64
}

struct AbortOnDrop(tokio::task::AbortHandle);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Data for the wire: zstd level 1 when asked and when it actually shrinks the data.
fn maybe_compress(data: &[u8], compress: bool) -> (Vec<u8>, bool) {
    if compress
        && let Ok(z) = zstd::bulk::compress(data, ZSTD_LEVEL)
        && z.len() < data.len()
    {
        return (z, true);
    }
    (data.to_vec(), false)
}
