//! The replication sender: one task per protected VM on the primary host, shipping the
//! VM's disks to the replica host's `Peer` service (`peer`).
//!
//! Phases (persisted in `<vm folder>/replication.json`, see [`SenderState`]):
//! - **initial**: ask the replica how far each disk got (`CopyProgress`), copy the
//!   allocated ranges of each disk in turn (`InitialCopy`, 1 MiB chunks, a bounded window
//!   of unacknowledged bytes, resumed from the acknowledged offset after any break). The
//!   VM keeps writing meanwhile; tracking is on, so those writes are in the HRL logs.
//! - **replicating**: every interval, seal all disks at one barrier and ship every log
//!   sealed since the last point as one recovery point (`ShipPoint`). The first point
//!   after the copy merges every log collected during it: that makes the first
//!   consistent point. Logs are deleted only after the replica acknowledged the point.
//! - **resync-required / resynchronising**: when logs are lost or damaged, the replica
//!   refuses a point (diverged), pending logs outgrow half the disk, or an operator asks:
//!   compare block hashes and ship only the differing blocks plus the logs sealed
//!   meanwhile, as one point (`resync`).
//!
//! Crash safety: a point's seq and its logs are persisted before it is shipped, so after
//! a restart the same point is shipped again (the replica answers with the existing point
//! when it already has that seq). Logs are deleted only after the state saying they were
//! acknowledged is durable.
//!
//! Errors are classified ([`classify_code`], [`ReplicationError::class`]): recoverable
//! ones are retried with backoff ([`retry_delay_units`]), a resync-class one starts a
//! resync, a fatal one stops replication until the task is stopped or a resync requested.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use siterecovery_proto::model::SenderState as ReportedState;
use siterecovery_proto::v1;
use siterecovery_proto::v1::peer_client::PeerClient;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

use crate::config::AgentFiles;
use crate::disk::BlockDevice;
use crate::hrl::{self, CoalescedItem, DiskId, HrlError, LogSeq};
use crate::resync;
use crate::tracker::{TrackedDisk, TrackerError};

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
/// Name of the state file in the VM folder.
pub const STATE_FILE: &str = "replication.json";
const STATE_FORMAT: &str = "siterecovery-replication-state";
const STATE_VERSION: u32 = 1;
const STATE_MAX_BYTES: u64 = 16 << 20;
/// Longest a quiesce hook may run before the point is taken crash-consistent.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);
/// Blocks hashed per parallel batch during resync.
const RESYNC_BATCH_BLOCKS: u64 = 1024;

/// What the lead's VM manager hands the sender for one protected VM.
#[derive(Debug, Clone)]
pub struct SenderParams {
    pub relationship_id: String,
    pub vm: String,
    pub replica_host_id: String,
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

/// Why a replication step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The replica host could not be reached (refused, TLS, timeout).
    #[error("connect to the replica host {address}: {source}")]
    Connect { address: String, source: tonic::transport::Error },
    /// The replica host answered with an error.
    #[error("replica host: {}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    /// The peer at the replica address is another host.
    #[error("{address} is host {found}, not the replica host {expected}")]
    WrongPeer { address: String, expected: String, found: String },
    /// A tracked disk failed (seal, delete).
    #[error("tracker: {0}")]
    Tracker(#[from] TrackerError),
    /// A log to ship is missing or damaged: the chain is broken, only a resync helps.
    #[error("HRL log {disk} seq {seq}: {source}")]
    BrokenLog { disk: String, seq: u64, source: HrlError },
    /// Local I/O (image read, state file).
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    /// The state file is unreadable.
    #[error("state file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    /// Delta replication cannot continue (reason given).
    #[error("resync required: {0}")]
    ResyncRequired(String),
    /// The replica answered something this sender does not expect.
    #[error("replica protocol: {0}")]
    Protocol(String),
    /// The outbound stream was closed by the RPC side (its error is reported instead).
    #[error("stream closed")]
    StreamClosed,
    /// The task is shutting down.
    #[error("cancelled")]
    Cancelled,
}

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff (network, low disk space, low memory).
    Recoverable,
    /// Delta replication cannot continue: resynchronise.
    Resync,
    /// Stop replicating until an operator acts.
    Fatal,
}

/// Classification of a status from the replica host.
pub fn classify_code(code: Code) -> ErrorClass {
    match code {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Cancelled
        | Code::Unknown
        | Code::Internal => ErrorClass::Recoverable,
        Code::FailedPrecondition | Code::DataLoss => ErrorClass::Resync,
        Code::PermissionDenied
        | Code::Unauthenticated
        | Code::NotFound
        | Code::InvalidArgument
        | Code::OutOfRange
        | Code::AlreadyExists
        | Code::Unimplemented
        | Code::Ok => ErrorClass::Fatal,
    }
}

/// Classification of a local I/O error: low space or memory passes, anything else
/// (EIO, permissions) needs an operator.
pub fn classify_io(e: &io::Error) -> ErrorClass {
    use nix::errno::Errno;
    match e.raw_os_error().map(Errno::from_raw) {
        Some(
            Errno::ENOSPC
            | Errno::EDQUOT
            | Errno::ENOMEM
            | Errno::EAGAIN
            | Errno::EINTR
            | Errno::EMFILE
            | Errno::ENFILE,
        ) => ErrorClass::Recoverable,
        _ if matches!(
            e.kind(),
            io::ErrorKind::OutOfMemory | io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
        ) =>
        {
            ErrorClass::Recoverable
        }
        _ => ErrorClass::Fatal,
    }
}

impl ReplicationError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ReplicationError::Connect { .. } | ReplicationError::StreamClosed | ReplicationError::Cancelled => {
                ErrorClass::Recoverable
            }
            ReplicationError::Rpc(s) => classify_code(s.code()),
            ReplicationError::WrongPeer { .. } | ReplicationError::State { .. } | ReplicationError::Protocol(_) => {
                ErrorClass::Fatal
            }
            ReplicationError::Tracker(TrackerError::Stopped) => ErrorClass::Recoverable,
            ReplicationError::Tracker(TrackerError::Image { source, .. } | TrackerError::Dir { source, .. }) => {
                classify_io(source)
            }
            ReplicationError::Tracker(TrackerError::Log { source: HrlError::Io(e), .. }) => classify_io(e),
            ReplicationError::Tracker(TrackerError::Log { .. }) => ErrorClass::Resync,
            ReplicationError::BrokenLog { .. } | ReplicationError::ResyncRequired(_) => ErrorClass::Resync,
            ReplicationError::Io { source, .. } => classify_io(source),
        }
    }
}

/// Backoff after `failures` consecutive failed cycles (1-based), in retry units:
/// 1, 2, 4, 8, 10, then every 30.
pub fn retry_delay_units(failures: u32) -> u64 {
    match failures {
        0 | 1 => 1,
        2 => 2,
        3 => 4,
        4 => 8,
        5 => 10,
        _ => 30,
    }
}

/// The replication phase, as persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum Phase {
    #[default]
    Initial,
    Replicating,
    /// `requested`: an operator asked (runs at once); otherwise detected (runs outside
    /// business hours).
    ResyncRequired {
        reason: String,
        requested: bool,
    },
}

/// A point whose seq is assigned and whose logs are fixed, not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPoint {
    pub seq: u64,
    pub created_unix_ms: i64,
    pub app_consistent: bool,
    /// Disk id → log seqs, ascending.
    pub logs: BTreeMap<String, Vec<u64>>,
}

/// The last point the replica acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointRecord {
    pub id: String,
    pub seq: u64,
    pub created_unix_ms: i64,
    pub app_consistent: bool,
}

/// `replication.json`: `{"format", "version", "crc32c", "state"}`, the checksum over the
/// compact JSON of `state`; written temp + fsync + rename + fsync dir.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderState {
    pub relationship_id: String,
    pub phase: Phase,
    /// Seq of the next new point (strictly increasing, never reused).
    pub next_seq: u64,
    /// Disk id → highest log seq already in a point (or made obsolete by a resync).
    pub assigned_through: BTreeMap<String, u64>,
    /// Points persisted but not acknowledged, ascending by seq.
    pub pending: Vec<PendingPoint>,
    pub last_point: Option<PointRecord>,
    pub bytes_replicated: u64,
    pub last_app_consistent_unix_ms: i64,
    /// Disk id → log seq up to which a resync covered damaged logs.
    pub resynced_through: BTreeMap<String, u64>,
    /// Offline initial replication: the initial copy was exported to a directory; no
    /// point is shipped until the replica host reports its copy complete (imported).
    /// Absent from the file when false (older files keep their checksum).
    #[serde(default, skip_serializing_if = "is_false")]
    pub awaiting_import: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    crc32c: u32,
    state: SenderState,
}

impl SenderState {
    fn fresh(relationship_id: &str) -> Self {
        SenderState { relationship_id: relationship_id.to_owned(), next_seq: 1, ..Default::default() }
    }

    /// Reads the state file; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>, ReplicationError> {
        let bad = |reason: String| ReplicationError::State { path: path.to_owned(), reason };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ReplicationError::Io { what: format!("state file {}", path.display()), source: e }),
        };
        if meta.len() > STATE_MAX_BYTES {
            return Err(bad(format!("{} bytes (max {STATE_MAX_BYTES})", meta.len())));
        }
        let text = std::fs::read(path)
            .map_err(|e| ReplicationError::Io { what: format!("state file {}", path.display()), source: e })?;
        let env: Envelope = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if env.format != STATE_FORMAT {
            return Err(bad(format!("format {:?}", env.format)));
        }
        if env.version != STATE_VERSION {
            return Err(bad(format!("unsupported version {}", env.version)));
        }
        let body = serde_json::to_vec(&env.state).map_err(|e| bad(e.to_string()))?;
        if crc32c::crc32c(&body) != env.crc32c {
            return Err(bad("checksum mismatch".into()));
        }
        Ok(Some(env.state))
    }

    /// Writes the state file atomically.
    pub fn save(&self, path: &Path) -> Result<(), ReplicationError> {
        let io_err = |source| ReplicationError::Io { what: format!("state file {}", path.display()), source };
        let body = serde_json::to_vec(self).map_err(|e| io_err(io::Error::other(e)))?;
        let env = Envelope {
            format: STATE_FORMAT.into(),
            version: STATE_VERSION,
            crc32c: crc32c::crc32c(&body),
            state: self.clone(),
        };
        let text = serde_json::to_vec_pretty(&env).map_err(|e| io_err(io::Error::other(e)))?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = File::create(&tmp).map_err(io_err)?;
            f.write_all(&text).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        std::fs::rename(&tmp, path).map_err(io_err)?;
        if let Some(dir) = path.parent() {
            hrl::sync_dir(dir).map_err(io_err)?;
        }
        Ok(())
    }
}

/// The running sender of one VM.
pub struct SenderHandle {
    relationship_id: String,
    cancel: CancellationToken,
    resync: Arc<ResyncRequest>,
    task: JoinHandle<()>,
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
    /// Cancels the task and waits for it to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(relationship = %self.relationship_id, "sender task failed: {e}");
        }
    }
    pub fn relationship_id(&self) -> &str {
        &self.relationship_id
    }
}

/// Starts the sender of one VM. Tracking must already be on for every disk.
pub fn spawn(
    params: SenderParams,
    disks: Arc<dyn VmDisks>,
    files: Arc<AgentFiles>,
    status: mpsc::Sender<v1::ReplicationStatus>,
    shutdown: CancellationToken,
) -> SenderHandle {
    let cancel = shutdown.child_token();
    let resync = Arc::new(ResyncRequest::default());
    let relationship_id = params.relationship_id.clone();
    let task = Task::new(params, disks, files, status, cancel.clone(), resync.clone());
    let span = tracing::info_span!("sender", relationship = %relationship_id, vm = %task.p.vm);
    let task = tokio::spawn(tracing::Instrument::instrument(task.run(), span));
    SenderHandle { relationship_id, cancel, resync, task }
}

/// What the status messages show besides the persisted state.
#[derive(Debug)]
struct View {
    state: ReportedState,
    done: u64,
    total: u64,
    error: String,
    recoverable: bool,
    cycles: u64,
    missed: u64,
    detail: String,
    compared: u64,
    sent: u64,
    resync_wire: u64,
}

impl Default for View {
    fn default() -> Self {
        Self {
            state: ReportedState::Waiting,
            done: 0,
            total: 0,
            error: String::new(),
            recoverable: false,
            cycles: 0,
            missed: 0,
            detail: String::new(),
            compared: 0,
            sent: 0,
            resync_wire: 0,
        }
    }
}

type Disks = Vec<(DiskId, Arc<TrackedDisk>)>;

struct Task {
    p: SenderParams,
    vm_disks: Arc<dyn VmDisks>,
    files: Arc<AgentFiles>,
    status_tx: mpsc::Sender<v1::ReplicationStatus>,
    cancel: CancellationToken,
    resync: Arc<ResyncRequest>,
    state_path: PathBuf,
    st: SenderState,
    /// The disks last seen (kept while the VM is stopped, to ship what is sealed).
    disks: Disks,
    live: bool,
    client: Option<PeerClient<Channel>>,
    view: View,
    failures: u32,
    /// Bytes on the wire since protection started (shared with producer threads).
    wire: Arc<AtomicU64>,
    /// Progress of a long phase, fed by producer threads.
    progress: Arc<AtomicU64>,
}

impl Task {
    fn new(
        p: SenderParams,
        vm_disks: Arc<dyn VmDisks>,
        files: Arc<AgentFiles>,
        status_tx: mpsc::Sender<v1::ReplicationStatus>,
        cancel: CancellationToken,
        resync: Arc<ResyncRequest>,
    ) -> Self {
        let state_path = p.state_dir.join(STATE_FILE);
        let mut view = View::default();
        let st = match SenderState::load(&state_path) {
            Ok(Some(st)) if st.relationship_id == p.relationship_id => st,
            Ok(Some(st)) => {
                tracing::warn!(old = %st.relationship_id, "state file of another relationship: starting over");
                SenderState::fresh(&p.relationship_id)
            }
            Ok(None) => SenderState::fresh(&p.relationship_id),
            Err(e) => {
                // Without the state we do not know which logs were shipped: resync.
                tracing::error!("{e:#}; resynchronising");
                view.detail = e.to_string();
                let mut st = SenderState::fresh(&p.relationship_id);
                st.phase = Phase::ResyncRequired { reason: e.to_string(), requested: false };
                st
            }
        };
        view.state = if st.awaiting_import { ReportedState::WaitingForImport } else { phase_name(&st.phase) };
        let wire = Arc::new(AtomicU64::new(st.bytes_replicated));
        Task {
            p,
            vm_disks,
            files,
            status_tx,
            cancel,
            resync,
            state_path,
            st,
            disks: Vec::new(),
            live: false,
            client: None,
            view,
            failures: 0,
            wire,
            progress: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn run(mut self) {
        self.report();
        let interval = Duration::from_millis(self.p.settings.interval_ms.max(100));
        let unit = Duration::from_millis(self.p.settings.retry_unit_ms.max(1));
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            if self.resync.flag.swap(false, Ordering::SeqCst) {
                if self.st.phase == Phase::Initial || self.st.awaiting_import {
                    tracing::warn!("resync requested during the initial copy: ignored (the copy is resumable)");
                } else {
                    self.require_resync("requested by an operator".into(), true);
                }
            }
            let started = Instant::now();
            self.refresh_disks();
            let cancel = self.cancel.clone();
            let result = tokio::select! {
                r = self.step() => r,
                _ = cancel.cancelled() => Err(ReplicationError::Cancelled),
            };
            if self.cancel.is_cancelled() {
                break;
            }
            let wait = match result {
                Ok(()) => {
                    if self.failures > 0 || !self.view.error.is_empty() {
                        tracing::info!("replication recovered");
                    }
                    self.failures = 0;
                    self.view.error.clear();
                    self.view.recoverable = false;
                    Some(interval.saturating_sub(started.elapsed()))
                }
                Err(e) => self.on_error(e, unit),
            };
            self.st.bytes_replicated = self.wire.load(Ordering::Relaxed);
            self.report();
            let resync = self.resync.clone();
            match wait {
                Some(d) => tokio::select! {
                    _ = tokio::time::sleep(d) => {}
                    _ = resync.notify.notified() => {}
                    _ = self.cancel.cancelled() => break,
                },
                None => tokio::select! {
                    // Fatal: idle until an operator asks for a resync or the task stops.
                    _ = resync.notify.notified() => {}
                    _ = self.cancel.cancelled() => break,
                },
            }
        }
        self.st.bytes_replicated = self.wire.load(Ordering::Relaxed);
        if let Err(e) = self.st.save(&self.state_path) {
            tracing::warn!("saving the state at stop: {e:#}");
        }
        self.view.state = ReportedState::Stopped;
        self.report();
    }

    fn on_error(&mut self, e: ReplicationError, unit: Duration) -> Option<Duration> {
        self.client = None;
        let mut class = e.class();
        if class == ErrorClass::Resync && matches!(self.st.phase, Phase::ResyncRequired { .. }) {
            // The resync itself hit a broken chain: it cannot fix this.
            class = ErrorClass::Fatal;
        }
        match class {
            ErrorClass::Recoverable => {
                self.failures += 1;
                self.view.missed += 1;
                let units = retry_delay_units(self.failures);
                tracing::warn!(failures = self.failures, "replication failed, retrying in {units} units: {e:#}");
                self.view.error = e.to_string();
                self.view.recoverable = true;
                Some(unit * units as u32)
            }
            ErrorClass::Resync => {
                self.view.missed += 1;
                tracing::warn!("delta replication cannot continue: {e:#}");
                let reason = match e {
                    ReplicationError::ResyncRequired(r) => r,
                    other => other.to_string(),
                };
                self.require_resync(reason, false);
                Some(Duration::ZERO)
            }
            ErrorClass::Fatal => {
                self.view.missed += 1;
                tracing::error!("replication stopped: {e:#}");
                self.view.error = e.to_string();
                self.view.recoverable = false;
                self.set_state(ReportedState::Error);
                None
            }
        }
    }

    fn refresh_disks(&mut self) {
        match self.vm_disks.disks() {
            Some(mut d) => {
                d.sort_by(|a, b| a.0.cmp(&b.0));
                self.disks = d;
                self.live = true;
            }
            None => self.live = false,
        }
    }

    async fn step(&mut self) -> Result<(), ReplicationError> {
        match self.st.phase.clone() {
            Phase::Initial => {
                if !self.live {
                    self.set_state(ReportedState::Paused);
                    return Ok(());
                }
                self.initial().await?;
                // The first point at once: the merge of every log of the copy.
                self.cycle().await
            }
            Phase::Replicating => self.cycle().await,
            Phase::ResyncRequired { reason, requested } => self.resync(reason, requested).await,
        }
    }

    // ---- status ------------------------------------------------------------------

    fn status(&self) -> v1::ReplicationStatus {
        v1::ReplicationStatus {
            relationship_id: self.p.relationship_id.clone(),
            vm: self.p.vm.clone(),
            state: self.view.state.into(),
            done_bytes: self.view.done,
            total_bytes: self.view.total,
            last_point: self.st.last_point.as_ref().map(|p| v1::RecoveryPoint {
                id: p.id.clone(),
                seq: p.seq,
                created_unix_ms: p.created_unix_ms,
                app_consistent: p.app_consistent,
                ..Default::default()
            }),
            pending_log_bytes: self.disks.iter().map(|(_, d)| d.pending_log_bytes()).sum(),
            bytes_replicated: self.wire.load(Ordering::Relaxed),
            error: self.view.error.clone(),
            error_recoverable: self.view.recoverable,
            cycles: self.view.cycles,
            missed_cycles: self.view.missed,
            detail: self.view.detail.clone(),
            resync_blocks_compared: self.view.compared,
            resync_blocks_sent: self.view.sent,
            resync_wire_bytes: self.view.resync_wire,
        }
    }

    /// Never blocks: a slow control channel drops status messages, not replication.
    fn report(&self) {
        if self.status_tx.try_send(self.status()).is_err() {
            tracing::debug!("status channel full or closed: status dropped");
        }
    }

    fn set_state(&mut self, state: ReportedState) {
        if self.view.state != state {
            self.view.state = state;
            self.report();
        }
    }

    fn persist(&mut self) -> Result<(), ReplicationError> {
        self.st.bytes_replicated = self.wire.load(Ordering::Relaxed);
        self.st.save(&self.state_path)
    }

    fn require_resync(&mut self, reason: String, requested: bool) {
        self.st.phase = Phase::ResyncRequired { reason: reason.clone(), requested };
        // Unacknowledged points are obsolete: the block comparison covers them.
        self.st.pending.clear();
        if let Err(e) = self.persist() {
            tracing::error!("persisting the resync requirement: {e:#}");
        }
        self.view.detail = reason;
        self.view.error.clear();
        self.set_state(ReportedState::ResyncRequired);
    }

    // ---- connection --------------------------------------------------------------

    async fn client(&mut self) -> Result<PeerClient<Channel>, ReplicationError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let address = self.p.replica_address.clone();
        let connect = |source| ReplicationError::Connect { address: address.clone(), source };
        let channel =
            crate::control::endpoint(&address, &self.files).map_err(connect)?.connect().await.map_err(connect)?;
        let mut client = PeerClient::new(channel);
        let pong = client.ping(v1::PingRequest {}).await?.into_inner();
        if pong.host_id != self.p.replica_host_id {
            return Err(ReplicationError::WrongPeer {
                address,
                expected: self.p.replica_host_id.clone(),
                found: pong.host_id,
            });
        }
        self.client = Some(client.clone());
        Ok(client)
    }

    // ---- initial copy ------------------------------------------------------------

    async fn initial(&mut self) -> Result<(), ReplicationError> {
        self.set_state(ReportedState::Initial);
        let mut client = self.client().await?;
        let progress = client
            .copy_progress(v1::CopyProgressRequest { relationship_id: self.p.relationship_id.clone() })
            .await?
            .into_inner();
        let disks = self.disks.clone();
        let layouts = blocking(move || {
            disks
                .iter()
                .map(|(id, d)| {
                    let file = File::open(d.image_path())
                        .map_err(|e| io_err(format!("image {}", d.image_path().display()), e))?;
                    let ranges = allocated_ranges(&file, 0, d.size())
                        .map_err(|e| io_err(format!("allocation map of {id}"), e))?;
                    Ok((id.clone(), d.image_path().to_owned(), d.size(), ranges))
                })
                .collect::<Result<Vec<_>, ReplicationError>>()
        })
        .await?;
        let mut plan = Vec::new();
        for (id, path, size, ranges) in layouts {
            let p = progress
                .disks
                .iter()
                .find(|p| p.disk_id == id.as_str())
                .ok_or_else(|| ReplicationError::Protocol(format!("the replica has no disk {id}")))?;
            plan.push((id, path, size, ranges, p.acked_offset, p.complete));
        }
        self.view.total = plan.iter().map(|(_, _, _, r, ..)| allocated_below(r, u64::MAX)).sum();
        self.view.done = plan
            .iter()
            .map(
                |(_, _, _, r, acked, complete)| {
                    if *complete { allocated_below(r, u64::MAX) } else { allocated_below(r, *acked) }
                },
            )
            .sum();
        self.report();
        let mut base = 0;
        for (id, path, size, ranges, acked, complete) in plan {
            let disk_total = allocated_below(&ranges, u64::MAX);
            if !complete {
                if acked > 0 {
                    tracing::info!(disk = %id, acked, "resuming the initial copy");
                }
                self.copy_disk(&mut client, &id, &path, size, &ranges, acked, base).await?;
            }
            base += disk_total;
            self.view.done = base;
        }
        self.st.phase = Phase::Replicating;
        self.persist()?;
        tracing::info!(bytes = self.view.total, "initial copy complete");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn copy_disk(
        &mut self,
        client: &mut PeerClient<Channel>,
        id: &DiskId,
        path: &Path,
        size: u64,
        ranges: &[(u64, u64)],
        acked: u64,
        base_done: u64,
    ) -> Result<(), ReplicationError> {
        let file = Arc::new(File::open(path).map_err(|e| io_err(format!("image {}", path.display()), e))?);
        // Re-read the allocation from the acked offset: it may have grown since.
        let f2 = file.clone();
        let todo = blocking(move || allocated_ranges(&f2, acked, size).map_err(|e| io_err("allocation map".into(), e)))
            .await?;
        let (tx, rx) = mpsc::channel::<v1::CopyChunk>(4);
        let (ack_tx, ack_rx) = watch::channel(acked);
        let feed = CopyFeed {
            relationship_id: self.p.relationship_id.clone(),
            disk_id: id.as_str().to_owned(),
            size,
            compress: self.p.settings.compression,
            wire: self.wire.clone(),
        };
        let feeder = tokio::spawn(feed.run(tx, ack_rx, file, todo));
        let _abort = AbortOnDrop(feeder.abort_handle());
        let mut acks = client.initial_copy(ReceiverStream::new(rx)).await?.into_inner();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                msg = acks.message() => match msg? {
                    Some(ack) => {
                        if ack.disk_id != id.as_str() {
                            return Err(ReplicationError::Protocol(format!("ack for disk {} while copying {id}", ack.disk_id)));
                        }
                        let _ = ack_tx.send(ack.acked_offset);
                        self.view.done = base_done + allocated_below(ranges, if ack.complete { u64::MAX } else { ack.acked_offset });
                        if ack.complete {
                            return Ok(());
                        }
                    }
                    None => {
                        // The replica ended the stream: the feeder's error says why, if any.
                        let r = tokio::time::timeout(Duration::from_secs(1), feeder).await;
                        return match r {
                            Ok(Ok(Err(e))) if !matches!(e, ReplicationError::StreamClosed) => Err(e),
                            _ => Err(tonic::Status::aborted("the replica ended the copy before it was complete").into()),
                        };
                    }
                },
                _ = tick.tick() => self.report(),
            }
        }
    }

    // ---- delta replication -------------------------------------------------------

    /// One cycle: ship unacknowledged points, seal, ship the new point.
    async fn cycle(&mut self) -> Result<(), ReplicationError> {
        if self.st.awaiting_import {
            // Offline initial replication: the logs since the export wait (in the open
            // log) until the replica host has imported the export.
            let mut client = self.client().await?;
            let progress = client
                .copy_progress(v1::CopyProgressRequest { relationship_id: self.p.relationship_id.clone() })
                .await?
                .into_inner();
            if progress.disks.is_empty() || !progress.disks.iter().all(|d| d.complete) {
                self.view.detail = "waiting for the initial copy to be imported on the replica host".into();
                self.set_state(ReportedState::Waiting);
                return Ok(());
            }
            tracing::info!("the replica host imported the initial copy: shipping the writes made since the export");
            self.st.awaiting_import = false;
            self.persist()?;
            self.view.detail.clear();
        }
        self.view.cycles += 1;
        self.set_state(if self.live { ReportedState::Replicating } else { ReportedState::Paused });
        if self.live
            && let Some(reason) = self.detect_resync()
        {
            return Err(ReplicationError::ResyncRequired(reason));
        }
        // Seal first, ship after: while the replica is unreachable the writes of each
        // interval still become their own point, so the logs stay interval-sized.
        let app = self.live && self.app_consistent_due();
        let app_ok = if app { self.run_quiesce_hook().await } else { false };
        let through = if self.live {
            let disks = self.disks.clone();
            blocking(move || barrier_seal(&disks)).await?
        } else {
            self.disks
                .iter()
                .map(|(id, d)| (id.as_str().to_owned(), d.sealed_logs().last().map_or(0, |l| l.seq.0)))
                .collect()
        };
        if app {
            self.st.last_app_consistent_unix_ms = now_ms();
        }
        let logs = self.unassigned_logs(&through);
        if self.disks.is_empty() {
            return Ok(()); // stopped before we ever saw its disks: nothing to read
        }
        // A running VM gets a point every interval even when nothing was written, so the
        // RPO lag (time since the last point) tells the truth; a stopped one does not,
        // and neither does one whose earlier points still wait for the replica.
        let empty_point_due = self.live && self.st.last_point.is_some() && self.st.pending.is_empty();
        if !logs.is_empty() || empty_point_due || self.st.last_point.is_none() {
            let point = PendingPoint { seq: self.st.next_seq, created_unix_ms: now_ms(), app_consistent: app_ok, logs };
            self.st.next_seq += 1;
            for (disk, seqs) in &point.logs {
                if let Some(&last) = seqs.last() {
                    self.st.assigned_through.insert(disk.clone(), last);
                }
            }
            self.st.pending.push(point);
            self.persist()?;
        }
        while let Some(p) = self.st.pending.first().cloned() {
            self.ship_pending(&p).await?;
        }
        Ok(())
    }

    /// Why delta replication cannot continue, if it cannot.
    fn detect_resync(&self) -> Option<String> {
        for (id, d) in &self.disks {
            let covered = self.st.resynced_through.get(id.as_str()).copied().unwrap_or(0);
            if let Some(c) = d.corrupt_logs().iter().find(|c| c.seq.0 > covered) {
                return Some(format!("HRL log {} of disk {id} is damaged: {}", c.path.display(), c.error));
            }
        }
        let pending: u64 = self.disks.iter().map(|(_, d)| d.pending_log_bytes()).sum();
        let size: u64 = self.disks.iter().map(|(_, d)| d.size()).sum();
        if size > 0 && pending > size / 2 {
            return Some(format!("pending logs ({pending} bytes) exceed 50% of the disk size ({size} bytes)"));
        }
        None
    }

    fn app_consistent_due(&self) -> bool {
        let every = self.p.settings.app_consistent_every_ms;
        self.p.quiesce_hook.is_some()
            && every > 0
            && now_ms().saturating_sub(self.st.last_app_consistent_unix_ms) >= every as i64
    }

    async fn run_quiesce_hook(&self) -> bool {
        let Some(hook) = &self.p.quiesce_hook else { return false };
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(hook)
            .env("SITERECOVERY_VM", &self.p.vm)
            .kill_on_drop(true)
            .status();
        match tokio::time::timeout(HOOK_TIMEOUT, child).await {
            Ok(Ok(s)) if s.success() => true,
            Ok(Ok(s)) => {
                tracing::warn!("quiesce hook exited with {s}: the point is crash-consistent only");
                false
            }
            Ok(Err(e)) => {
                tracing::warn!("quiesce hook could not run: {e}");
                false
            }
            Err(_) => {
                tracing::warn!("quiesce hook timed out after {HOOK_TIMEOUT:?}");
                false
            }
        }
    }

    /// Sealed logs of each disk above what earlier points took, up to `through`.
    fn unassigned_logs(&self, through: &BTreeMap<String, u64>) -> BTreeMap<String, Vec<u64>> {
        let mut out = BTreeMap::new();
        for (id, d) in &self.disks {
            let from = self.st.assigned_through.get(id.as_str()).copied().unwrap_or(0);
            let to = through.get(id.as_str()).copied().unwrap_or(0);
            let seqs: Vec<u64> = d.sealed_logs().iter().map(|l| l.seq.0).filter(|&s| s > from && s <= to).collect();
            if !seqs.is_empty() {
                out.insert(id.as_str().to_owned(), seqs);
            }
        }
        out
    }

    fn log_paths(&self, logs: &BTreeMap<String, Vec<u64>>) -> Result<Vec<(String, u64, PathBuf)>, ReplicationError> {
        let mut out = Vec::new();
        for (disk, seqs) in logs {
            let (id, d) =
                self.disks.iter().find(|(id, _)| id.as_str() == disk).ok_or_else(|| {
                    ReplicationError::ResyncRequired(format!("disk {disk} of a pending point is gone"))
                })?;
            let dir = d.image_path().parent().map(Path::to_owned).unwrap_or_default();
            for &s in seqs {
                out.push((disk.clone(), s, dir.join(hrl::log_file_name(id, LogSeq(s)))));
            }
        }
        Ok(out)
    }

    async fn ship_pending(&mut self, p: &PendingPoint) -> Result<(), ReplicationError> {
        let logs = self.log_paths(&p.logs)?;
        let meta = v1::PointChunk {
            relationship_id: self.p.relationship_id.clone(),
            seq: p.seq,
            created_unix_ms: p.created_unix_ms,
            app_consistent: p.app_consistent,
            ..Default::default()
        };
        let (ack, ()) = self
            .ship(meta, move |sink| {
                for (disk, seq, path) in &logs {
                    sink.log(disk, *seq, path)?;
                }
                Ok(())
            })
            .await?;
        if ack.seq != p.seq {
            return Err(ReplicationError::Protocol(format!("point {} acknowledged as {}", p.seq, ack.seq)));
        }
        self.st.pending.retain(|q| q.seq != p.seq);
        self.st.last_point = Some(PointRecord {
            id: ack.point_id,
            seq: p.seq,
            created_unix_ms: p.created_unix_ms,
            app_consistent: p.app_consistent,
        });
        self.persist()?;
        tracing::debug!(seq = p.seq, "point acknowledged");
        for (disk, seqs) in &p.logs {
            if let Some(&last) = seqs.last() {
                self.delete_logs(disk, last)?;
            }
        }
        Ok(())
    }

    fn delete_logs(&self, disk: &str, through: u64) -> Result<(), ReplicationError> {
        if let Some((_, d)) = self.disks.iter().find(|(id, _)| id.as_str() == disk) {
            d.delete_logs_through(LogSeq(through))?;
        }
        Ok(())
    }

    /// Ships one point: `produce` pushes its extents (on a blocking thread); the point is
    /// committed when it returns Ok. The producer's own error wins over the RPC's.
    async fn ship<T: Send + 'static>(
        &mut self,
        meta: v1::PointChunk,
        produce: impl FnOnce(&mut ChunkSink) -> Result<T, ReplicationError> + Send + 'static,
    ) -> Result<(v1::PointAck, T), ReplicationError> {
        let mut client = self.client().await?;
        let (tx, rx) = mpsc::channel(4);
        let abort = CancellationToken::new();
        let _guard = abort.clone().drop_guard();
        let mut sink = ChunkSink {
            tx,
            meta,
            batch: Vec::new(),
            batch_bytes: 0,
            compress: self.p.settings.compression,
            wire: self.wire.clone(),
            abort: abort.clone(),
            rt: tokio::runtime::Handle::current(),
        };
        let producer = tokio::task::spawn_blocking(move || {
            let out = produce(&mut sink)?;
            sink.commit()?;
            Ok::<T, ReplicationError>(out)
        });
        let call = client.ship_point(ReceiverStream::new(rx));
        tokio::pin!(call);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let resp = loop {
            tokio::select! {
                r = &mut call => break r,
                _ = tick.tick() => {
                    if self.view.total > 0 {
                        self.view.done = self.progress.load(Ordering::Relaxed);
                        self.report();
                    }
                }
            }
        };
        if resp.is_err() {
            abort.cancel();
        }
        let produced = producer.await.map_err(|e| ReplicationError::Protocol(format!("point producer: {e}")))?;
        match (resp, produced) {
            (_, Err(e)) if !matches!(e, ReplicationError::StreamClosed) => Err(e),
            (Err(status), _) => Err(status.into()),
            (Ok(ack), Ok(out)) => Ok((ack.into_inner(), out)),
            (Ok(_), Err(_)) => Err(ReplicationError::Protocol("the replica acknowledged an incomplete point".into())),
        }
    }

    // ---- resync ------------------------------------------------------------------

    async fn resync(&mut self, reason: String, requested: bool) -> Result<(), ReplicationError> {
        self.view.cycles += 1;
        self.view.detail = reason.clone();
        self.set_state(ReportedState::ResyncRequired);
        if !self.live {
            return Ok(()); // the VM is stopped: wait for it
        }
        // Logs are of no use until the blocks are compared: seal and drop them, so a
        // resync held back by business hours does not fill the disk.
        let disks = self.disks.clone();
        let t0 = blocking(move || barrier_seal(&disks)).await?;
        for (disk, &through) in &t0 {
            self.delete_logs(disk, through)?;
        }
        let s = &self.p.settings;
        if !requested
            && !resync::automatic_resync_allowed(
                s.resync_window_start_hour,
                s.resync_window_end_hour,
                resync::current_hour_utc(),
            )
        {
            self.view.detail = format!("{reason} (waiting for the end of business hours)");
            return Ok(());
        }
        self.set_state(ReportedState::Resynchronising);
        tracing::info!("resynchronising: {reason}");
        let block_size = resync::RESYNC_BLOCK_SIZE;
        let mut client = self.client().await?;
        let mut remote = Vec::new();
        for (id, d) in &self.disks {
            let n = resync::block_count(d.size(), block_size);
            let mut stream = client
                .block_hashes(v1::BlockHashesRequest {
                    relationship_id: self.p.relationship_id.clone(),
                    disk_id: id.as_str().to_owned(),
                    block_size,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let want = n as usize * resync::HASH_LEN;
            let mut hashes = Vec::with_capacity(want);
            while let Some(c) = stream.message().await? {
                if c.first_block as usize * resync::HASH_LEN != hashes.len() || hashes.len() + c.hashes.len() > want {
                    return Err(ReplicationError::Protocol(format!("block hashes of {id} out of order or too many")));
                }
                hashes.extend_from_slice(&c.hashes);
            }
            if hashes.len() != want {
                return Err(ReplicationError::Protocol(format!(
                    "{} block hashes of {id}, expected {n}",
                    hashes.len() / resync::HASH_LEN
                )));
            }
            remote.push((id.clone(), d.clone(), hashes));
        }
        let seq = self.st.next_seq;
        self.st.next_seq += 1;
        self.persist()?;
        self.view.total = self.disks.iter().map(|(_, d)| d.size()).sum();
        self.view.done = 0;
        self.view.compared = 0;
        self.view.sent = 0;
        self.progress.store(0, Ordering::Relaxed);
        let wire_before = self.wire.load(Ordering::Relaxed);
        let meta = v1::PointChunk {
            relationship_id: self.p.relationship_id.clone(),
            seq,
            created_unix_ms: now_ms(),
            resync: true,
            ..Default::default()
        };
        let created = meta.created_unix_ms;
        let progress = self.progress.clone();
        let disks = self.disks.clone();
        let t0c = t0.clone();
        let mut sub = SubHashes { client, relationship_id: self.p.relationship_id.clone(), unsupported: false };
        let (ack, (t1, compared, differed, sent)) = self
            .ship(meta, move |sink| {
                let (mut compared, mut differed, mut sent) = (0u64, 0u64, 0u64);
                for (id, d, hashes) in &remote {
                    let c = sink.differing_blocks(id.as_str(), d, block_size, hashes, &mut sub, &progress)?;
                    compared += c.compared;
                    differed += c.differed;
                    sent += c.sub_blocks_sent;
                }
                // Everything written since the first seal is in logs: seal again and
                // append them, so the point is consistent at this second barrier.
                let t1 = barrier_seal(&disks)?;
                for (id, d) in &disks {
                    let from = t0c.get(id.as_str()).copied().unwrap_or(0);
                    let to = t1.get(id.as_str()).copied().unwrap_or(0);
                    let dir = d.image_path().parent().map(Path::to_owned).unwrap_or_default();
                    for l in d.sealed_logs().iter().filter(|l| l.seq.0 > from && l.seq.0 <= to) {
                        sink.log(id.as_str(), l.seq.0, &dir.join(hrl::log_file_name(id, l.seq)))?;
                    }
                }
                Ok((t1, compared, differed, sent))
            })
            .await?;
        self.view.compared = compared;
        self.view.sent = sent;
        self.view.resync_wire = self.wire.load(Ordering::Relaxed) - wire_before;
        self.view.done = self.view.total;
        self.st.last_point =
            Some(PointRecord { id: ack.point_id, seq, created_unix_ms: created, app_consistent: false });
        self.st.phase = Phase::Replicating;
        self.st.assigned_through = t1.clone();
        for (disk, &through) in &t0 {
            self.st.resynced_through.insert(disk.clone(), through);
        }
        self.persist()?;
        for (disk, &through) in &t1 {
            self.delete_logs(disk, through)?;
        }
        // Damaged logs the comparison covered are of no further use.
        for (id, d) in &self.disks {
            let covered = t0.get(id.as_str()).copied().unwrap_or(0);
            for c in d.corrupt_logs().iter().filter(|c| c.seq.0 <= covered) {
                if let Err(e) = std::fs::remove_file(&c.path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(log = %c.path.display(), "removing a damaged log after resync: {e}");
                }
            }
        }
        self.view.detail = format!(
            "resync done: {differed} of {compared} blocks differed, {} bytes sent; {sent} {} KiB sub-blocks sent",
            self.view.resync_wire,
            resync::RESYNC_SUB_BLOCK_SIZE >> 10
        );
        tracing::info!("{}", self.view.detail);
        self.set_state(ReportedState::Replicating);
        Ok(())
    }
}

fn phase_name(p: &Phase) -> ReportedState {
    match p {
        Phase::Initial => ReportedState::Initial,
        Phase::Replicating => ReportedState::Replicating,
        Phase::ResyncRequired { .. } => ReportedState::ResyncRequired,
    }
}

/// Freezes every disk (in id order), seals each, releases: every disk's log ends at the
/// same instant. Returns, per disk, the highest sealed log seq (the one just sealed, or
/// the last sealed before when the disk had no writes).
pub(crate) fn barrier_seal(disks: &Disks) -> Result<BTreeMap<String, u64>, ReplicationError> {
    let before: Vec<u64> = disks.iter().map(|(_, d)| d.sealed_logs().last().map_or(0, |l| l.seq.0)).collect();
    for (_, d) in disks {
        d.write_back()?; // shortens the freeze
    }
    let mut guards: Vec<_> = disks.iter().map(|(_, d)| d.freeze()).collect();
    let mut out = BTreeMap::new();
    for (((id, _), g), b) in disks.iter().zip(guards.iter_mut()).zip(before) {
        let sealed = g.seal()?;
        out.insert(id.as_str().to_owned(), sealed.map_or(b, |s| s.0));
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

fn io_err(what: String, source: io::Error) -> ReplicationError {
    ReplicationError::Io { what, source }
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

/// The allocated ranges `[start, end)` of `file` from `from` (SEEK_DATA / SEEK_HOLE).
/// A file system without hole reporting gives one range: everything.
pub fn allocated_ranges(file: &File, from: u64, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{Whence, lseek};
    let mut out = Vec::new();
    let mut pos = from;
    while pos < size {
        let data = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(o) => o as u64,
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => {
                out.push((pos, size));
                break;
            }
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match lseek(file, data as i64, Whence::SeekHole) {
            Ok(o) => (o as u64).min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            out.push((data, size));
            break;
        }
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

/// Bytes of `ranges` below `offset`.
pub fn allocated_below(ranges: &[(u64, u64)], offset: u64) -> u64 {
    ranges.iter().map(|&(s, e)| e.min(offset).saturating_sub(s)).sum()
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

/// Feeds the chunks of one disk's initial copy, keeping at most [`COPY_WINDOW`] raw
/// bytes unacknowledged.
struct CopyFeed {
    relationship_id: String,
    disk_id: String,
    size: u64,
    compress: bool,
    wire: Arc<AtomicU64>,
}

impl CopyFeed {
    async fn run(
        self,
        tx: mpsc::Sender<v1::CopyChunk>,
        mut acked: watch::Receiver<u64>,
        file: Arc<File>,
        ranges: Vec<(u64, u64)>,
    ) -> Result<(), ReplicationError> {
        let mut inflight: VecDeque<(u64, u64)> = VecDeque::new();
        let mut unacked = 0u64;
        for (start, end) in ranges {
            let mut off = start;
            while off < end {
                let len = COPY_CHUNK.min(end - off);
                loop {
                    let a = *acked.borrow_and_update();
                    while let Some(&(e, l)) = inflight.front() {
                        if e > a {
                            break;
                        }
                        unacked -= l;
                        inflight.pop_front();
                    }
                    if unacked + len <= COPY_WINDOW {
                        break;
                    }
                    acked.changed().await.map_err(|_| ReplicationError::StreamClosed)?;
                }
                let (f, compress) = (file.clone(), self.compress);
                let (data, zstd) = blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, off).map_err(|e| io_err(format!("image read at {off}"), e))?;
                    Ok(maybe_compress(&buf, compress))
                })
                .await?;
                self.wire.fetch_add(data.len() as u64, Ordering::Relaxed);
                let chunk = v1::CopyChunk {
                    relationship_id: self.relationship_id.clone(),
                    disk_id: self.disk_id.clone(),
                    offset: off,
                    data,
                    zstd,
                    raw_len: len as u32,
                    done: false,
                };
                tx.send(chunk).await.map_err(|_| ReplicationError::StreamClosed)?;
                inflight.push_back((off + len, len));
                unacked += len;
                off += len;
            }
        }
        let done = v1::CopyChunk {
            relationship_id: self.relationship_id.clone(),
            disk_id: self.disk_id.clone(),
            offset: self.size,
            done: true,
            ..Default::default()
        };
        tx.send(done).await.map_err(|_| ReplicationError::StreamClosed)
    }
}

/// The producer side of a `ShipPoint` stream (runs on a blocking thread): batches
/// extents into messages, compresses, counts wire bytes.
/// The replica's sub-block hashes, asked for during a resync (from the shipping thread).
struct SubHashes {
    client: PeerClient<Channel>,
    relationship_id: String,
    /// The replica answered a sub-block request with something else (an older agent).
    unsupported: bool,
}

/// Figures of one disk's resync.
#[derive(Debug, Default)]
struct ResyncCounts {
    /// Blocks compared.
    compared: u64,
    /// Blocks whose hash differed.
    differed: u64,
    /// Sub-blocks of those that differed, and were sent.
    sub_blocks_sent: u64,
}

pub struct ChunkSink {
    tx: mpsc::Sender<v1::PointChunk>,
    /// Point fields repeated in every message.
    meta: v1::PointChunk,
    batch: Vec<v1::Extent>,
    batch_bytes: usize,
    compress: bool,
    wire: Arc<AtomicU64>,
    abort: CancellationToken,
    rt: tokio::runtime::Handle,
}

impl ChunkSink {
    /// Data at `offset`, split into extents of at most [`EXTENT_MAX`].
    fn write(&mut self, disk: &str, offset: u64, data: &[u8]) -> Result<(), ReplicationError> {
        let mut at = offset;
        for piece in data.chunks(EXTENT_MAX) {
            let (bytes, zstd) = maybe_compress(piece, self.compress);
            self.wire.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.push(v1::Extent {
                disk_id: disk.to_owned(),
                offset: at,
                kind: v1::ExtentKind::Data as i32,
                length: piece.len() as u64,
                data: bytes,
                zstd,
            })?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    fn zeroes(&mut self, disk: &str, offset: u64, len: u64) -> Result<(), ReplicationError> {
        self.push(v1::Extent {
            disk_id: disk.to_owned(),
            offset,
            kind: v1::ExtentKind::Zeroes as i32,
            length: len,
            ..Default::default()
        })
    }

    /// The coalesced extents of one sealed log. A trim is shipped as zeroes: the tracker
    /// zeroes trimmed ranges of the image too.
    fn log(&mut self, disk: &str, seq: u64, path: &Path) -> Result<(), ReplicationError> {
        let broken = |source| ReplicationError::BrokenLog { disk: disk.to_owned(), seq, source };
        let mut log = hrl::Coalesced::open(path).map_err(broken)?;
        for item in log.items() {
            match item.map_err(broken)? {
                CoalescedItem::Write { offset, data } => self.write(disk, offset, &data)?,
                CoalescedItem::Zeroes { offset, len } | CoalescedItem::Trim { offset, len } => {
                    self.zeroes(disk, offset, len)?
                }
            }
        }
        Ok(())
    }

    /// Hashes `disk` against the replica's `remote` block hashes; for the blocks that
    /// differ, compares the sub-block hashes (asked of the replica in batches) and pushes
    /// the sub-blocks that differ.
    fn differing_blocks(
        &mut self,
        disk_id: &str,
        disk: &TrackedDisk,
        block_size: u32,
        remote: &[u8],
        sub: &mut SubHashes,
        progress: &AtomicU64,
    ) -> Result<ResyncCounts, ReplicationError> {
        let path = disk.image_path();
        let file = File::open(path).map_err(|e| io_err(format!("image {}", path.display()), e))?;
        let size = disk.size();
        let n = resync::block_count(size, block_size);
        let mut counts = ResyncCounts { compared: n, ..Default::default() };
        let mut pending = Vec::new();
        let mut first = 0;
        while first < n {
            let count = RESYNC_BATCH_BLOCKS.min(n - first);
            let local = resync::hash_blocks(&file, size, block_size, first, count, resync::HASH_THREADS)
                .map_err(|e| io_err(format!("hashing {}", path.display()), e))?;
            let r = &remote[first as usize * resync::HASH_LEN..(first + count) as usize * resync::HASH_LEN];
            pending.extend(resync::differing(first, &local, r));
            first += count;
            if pending.len() >= resync::SUB_HASH_BATCH_BLOCKS || first >= n {
                counts.differed += pending.len() as u64;
                counts.sub_blocks_sent += self.differing_sub_blocks(disk_id, &file, size, block_size, &pending, sub)?;
                pending.clear();
            }
            progress.fetch_add(count * u64::from(block_size), Ordering::Relaxed);
        }
        Ok(counts)
    }

    /// The second level: compares the sub-blocks of the differing `blocks` with the
    /// replica's and pushes those that differ (adjacent ones merged). Returns the number
    /// of sub-blocks sent. A replica that does not answer sub-block hashes (an older
    /// agent) gets the whole blocks.
    fn differing_sub_blocks(
        &mut self,
        disk_id: &str,
        file: &File,
        size: u64,
        block_size: u32,
        blocks: &[u64],
        sub: &mut SubHashes,
    ) -> Result<u64, ReplicationError> {
        if blocks.is_empty() {
            return Ok(0);
        }
        let sbs = resync::RESYNC_SUB_BLOCK_SIZE;
        let want: u64 = blocks.iter().map(|&b| resync::sub_block_count(b, size, block_size, sbs)).sum();
        let remote = if sub.unsupported {
            None
        } else {
            let req = v1::BlockHashesRequest {
                relationship_id: sub.relationship_id.clone(),
                disk_id: disk_id.to_owned(),
                block_size,
                blocks: blocks.to_vec(),
                sub_block_size: sbs,
            };
            let (client, abort) = (&mut sub.client, &self.abort);
            let want_len = want as usize * resync::HASH_LEN;
            self.rt.block_on(async {
                let fetch = async {
                    let mut stream = client.block_hashes(req).await?.into_inner();
                    let mut hashes = Vec::with_capacity(want_len);
                    while let Some(c) = stream.message().await? {
                        if c.first_block as usize * resync::HASH_LEN != hashes.len()
                            || hashes.len() + c.hashes.len() > want_len
                        {
                            return Ok(None); // not an answer to this request: an older replica
                        }
                        hashes.extend_from_slice(&c.hashes);
                    }
                    Ok::<_, ReplicationError>((hashes.len() == want_len).then_some(hashes))
                };
                tokio::select! {
                    r = fetch => r,
                    _ = abort.cancelled() => Err(ReplicationError::StreamClosed),
                }
            })?
        };
        let ranges = match remote {
            Some(remote) => {
                let local = resync::hash_sub_blocks(file, size, block_size, sbs, blocks, resync::HASH_THREADS)
                    .map_err(|e| io_err("hashing sub-blocks".into(), e))?;
                resync::differing_sub_ranges(blocks, size, block_size, sbs, &local, &remote, resync::MERGED_EXTENT_MAX)
            }
            None => {
                if !sub.unsupported {
                    tracing::warn!("the replica does not answer sub-block hashes: sending whole blocks");
                    sub.unsupported = true;
                }
                (blocks.iter().map(|&b| resync::block_range(b, size, block_size)).collect(), want)
            }
        };
        let mut buf = vec![0u8; resync::MERGED_EXTENT_MAX.max(u64::from(block_size)) as usize];
        for (offset, len) in ranges.0 {
            let data = &mut buf[..len as usize];
            file.read_exact_at(data, offset).map_err(|e| io_err(format!("image read at {offset}"), e))?;
            self.write(disk_id, offset, data)?;
        }
        Ok(ranges.1)
    }

    fn push(&mut self, e: v1::Extent) -> Result<(), ReplicationError> {
        self.batch_bytes += e.data.len() + 64;
        self.batch.push(e);
        if self.batch_bytes >= POINT_MESSAGE_BYTES || self.batch.len() >= 8192 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ReplicationError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut msg = self.meta.clone();
        msg.extents = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.send(msg)
    }

    fn commit(mut self) -> Result<(), ReplicationError> {
        self.flush()?;
        let mut msg = self.meta.clone();
        msg.commit = true;
        self.send(msg)
    }

    fn send(&self, msg: v1::PointChunk) -> Result<(), ReplicationError> {
        let (tx, abort) = (&self.tx, &self.abort);
        self.rt.block_on(async {
            tokio::select! {
                r = tx.send(msg) => r.map_err(|_| ReplicationError::StreamClosed),
                _ = abort.cancelled() => Err(ReplicationError::StreamClosed),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        let units: Vec<u64> = (1..=8).map(retry_delay_units).collect();
        assert_eq!(units, vec![1, 2, 4, 8, 10, 30, 30, 30]);
        assert_eq!(retry_delay_units(1000), 30);
    }

    #[test]
    fn status_codes_are_classified() {
        for c in [Code::Unavailable, Code::DeadlineExceeded, Code::ResourceExhausted, Code::Unknown] {
            assert_eq!(classify_code(c), ErrorClass::Recoverable, "{c:?}");
        }
        for c in [Code::PermissionDenied, Code::Unauthenticated, Code::NotFound, Code::InvalidArgument] {
            assert_eq!(classify_code(c), ErrorClass::Fatal, "{c:?}");
        }
        assert_eq!(classify_code(Code::FailedPrecondition), ErrorClass::Resync);
    }

    #[test]
    fn local_errors_are_classified() {
        assert_eq!(classify_io(&io::Error::from_raw_os_error(nix::libc::ENOSPC)), ErrorClass::Recoverable);
        assert_eq!(classify_io(&io::Error::from_raw_os_error(nix::libc::ENOMEM)), ErrorClass::Recoverable);
        assert_eq!(classify_io(&io::Error::from_raw_os_error(nix::libc::EIO)), ErrorClass::Fatal);
        let broken =
            ReplicationError::BrokenLog { disk: "d".into(), seq: 3, source: HrlError::NotSealed { valid_len: 0 } };
        assert_eq!(broken.class(), ErrorClass::Resync);
        assert_eq!(ReplicationError::Tracker(TrackerError::Stopped).class(), ErrorClass::Recoverable);
        let denied = ReplicationError::Rpc(tonic::Status::permission_denied("no"));
        assert_eq!(denied.class(), ErrorClass::Fatal);
        let enospc = ReplicationError::Io { what: "x".into(), source: io::Error::from_raw_os_error(nix::libc::ENOSPC) };
        assert_eq!(enospc.class(), ErrorClass::Recoverable);
    }

    #[test]
    fn state_file_round_trip_and_checksum() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(STATE_FILE);
        assert_eq!(SenderState::load(&path).expect("load"), None);
        let mut st = SenderState::fresh("rel-1");
        st.phase = Phase::ResyncRequired { reason: "x".into(), requested: true };
        st.pending.push(PendingPoint {
            seq: 4,
            created_unix_ms: 5,
            app_consistent: true,
            logs: BTreeMap::from([("disk0".to_string(), vec![7, 8])]),
        });
        st.save(&path).expect("save");
        assert_eq!(SenderState::load(&path).expect("load"), Some(st));
        let text = std::fs::read_to_string(&path).expect("read").replace("\"seq\": 4", "\"seq\": 5");
        std::fs::write(&path, text).expect("write");
        assert!(matches!(SenderState::load(&path), Err(ReplicationError::State { .. })));
    }

    #[test]
    fn allocation_map_skips_holes() {
        let f = tempfile::tempfile().expect("tmp");
        f.set_len(8 << 20).expect("len");
        f.write_all_at(&[1u8; 4096], 2 << 20).expect("write");
        f.write_all_at(&[1u8; 4096], 6 << 20).expect("write");
        let r = allocated_ranges(&f, 0, 8 << 20).expect("map");
        let total = allocated_below(&r, u64::MAX);
        assert!((8192..8 << 20).contains(&total), "{r:?}");
        assert!(r.iter().any(|&(s, e)| s <= 2 << 20 && e > 2 << 20));
        assert_eq!(allocated_below(&[(0, 10), (20, 30)], 25), 15);
        let later = allocated_ranges(&f, 4 << 20, 8 << 20).expect("map");
        assert!(later.iter().all(|&(s, _)| s >= 4 << 20));
    }
}
