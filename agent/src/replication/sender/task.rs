//! The task loop of one sender: each interval it asks the state machine ([`next`]) what
//! to do, runs the step's I/O (`initial`, `delta`, `resynchronise`), feeds the outcome
//! back as an [`Event`], persists the state and reports the status.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use siterecovery_proto::v1;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use siterecovery_proto::model::bandwidth::BandwidthSpec;

use super::phase::{Event, Phase, Resume, next};
use super::state::{STATE_FILE, SenderState};
use super::transport::PeerTransport;
use super::{Disks, ErrorClass, ReplicationError, ResyncRequest, SenderParams, VmDisks, retry_delay_units};
use crate::bandwidth::Throttle;

/// What the status messages show besides the phase and the persisted state.
#[derive(Debug, Default)]
pub(super) struct View {
    pub done: u64,
    pub total: u64,
    pub error: String,
    pub recoverable: bool,
    pub cycles: u64,
    pub missed: u64,
    pub detail: String,
    pub compared: u64,
    pub sent: u64,
    pub resync_wire: u64,
}

pub(super) struct Task<T: PeerTransport> {
    pub p: SenderParams,
    vm_disks: Arc<dyn VmDisks>,
    pub peer: T,
    status_tx: mpsc::Sender<v1::ReplicationStatus>,
    cancel: CancellationToken,
    resync: Arc<ResyncRequest>,
    state_path: PathBuf,
    pub phase: Phase,
    phase_tx: watch::Sender<Phase>,
    pub st: SenderState,
    /// The disks last seen (kept while the VM is stopped, to ship what is sealed).
    pub disks: Disks,
    pub live: bool,
    pub view: View,
    failures: u32,
    /// Bytes on the wire since protection started (shared with producer threads).
    pub wire: Arc<AtomicU64>,
    /// Progress of a long phase, fed by producer threads.
    pub progress: Arc<AtomicU64>,
    /// The policy's and the host's rate limits on the wire bytes.
    pub throttle: Throttle,
}

/// The policy's limits of `settings`; a spec that does not parse (the record checked
/// it) is unlimited, with an error in the log.
fn throttle(settings: &v1::ReplicationSettings) -> Throttle {
    let parse = |what: &str, s: &str| -> Option<BandwidthSpec> {
        if s.is_empty() {
            return None;
        }
        s.parse().map_err(|e: siterecovery_proto::model::bandwidth::BandwidthError| tracing::error!("{what}: {e}")).ok()
    };
    Throttle::for_policy(parse("bandwidth", &settings.bandwidth), parse("resync bandwidth", &settings.resync_bandwidth))
}

impl<T: PeerTransport> Task<T> {
    pub fn new(
        p: SenderParams,
        vm_disks: Arc<dyn VmDisks>,
        peer: T,
        status_tx: mpsc::Sender<v1::ReplicationStatus>,
        cancel: CancellationToken,
        resync: Arc<ResyncRequest>,
    ) -> Self {
        let state_path = p.state_dir.join(STATE_FILE);
        let p_settings = p.settings.clone();
        let mut view = View::default();
        let st = match SenderState::load(&state_path) {
            Ok(Some(st)) if p.relationship_id == st.relationship_id.as_str() => st,
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
                st.phase = super::Stage::ResyncRequired { reason: e.to_string(), requested: false };
                st
            }
        };
        let phase = Phase::from_stored(&st.phase, st.awaiting_import);
        let (phase_tx, _) = watch::channel(phase.clone());
        let wire = Arc::new(AtomicU64::new(st.bytes_replicated));
        Task {
            p,
            vm_disks,
            peer,
            status_tx,
            cancel,
            resync,
            state_path,
            phase,
            phase_tx,
            st,
            disks: Vec::new(),
            live: false,
            view,
            failures: 0,
            wire,
            progress: Arc::new(AtomicU64::new(0)),
            throttle: throttle(&p_settings),
        }
    }

    pub fn phase_watch(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    pub async fn run(mut self) -> SenderState {
        self.report();
        let interval = Duration::from_millis(self.p.settings.interval_ms.max(100));
        let unit = Duration::from_millis(self.p.settings.retry_unit_ms.max(1));
        loop {
            if self.cancel.is_cancelled() {
                break;
            }
            if self.resync.flag.swap(false, Ordering::SeqCst) {
                let reason = "requested by an operator".to_string();
                match next(&self.phase, Event::ResyncNeeded { reason: reason.clone(), requested: true }) {
                    Ok(p) => self.enter_resync(p, reason),
                    Err(_) => {
                        tracing::warn!("resync requested during the initial copy: ignored (the copy is resumable)")
                    }
                }
            }
            if matches!(self.phase, Phase::Failed { .. }) {
                self.apply_or_log(Event::Retry);
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
        if let Err(e) = self.persist() {
            tracing::warn!("saving the state at stop: {e:#}");
        }
        self.apply_or_log(Event::Stop);
        self.report();
        self.st
    }

    /// Moves to the phase after `event`, publishing it and reporting a changed state.
    pub fn apply(&mut self, event: Event) -> Result<(), ReplicationError> {
        let phase = next(&self.phase, event).map_err(|e| ReplicationError::Protocol(e.to_string()))?;
        self.set_phase(phase);
        Ok(())
    }

    fn apply_or_log(&mut self, event: Event) {
        if let Err(e) = self.apply(event) {
            tracing::warn!("{e}");
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        if phase == self.phase {
            return;
        }
        let reported = phase.reported() != self.phase.reported();
        self.phase = phase.clone();
        if let Some((stage, awaiting)) = phase.stored() {
            self.st.phase = stage;
            self.st.awaiting_import = awaiting;
        }
        self.phase_tx.send_replace(phase);
        if reported {
            self.report();
        }
    }

    fn on_error(&mut self, e: ReplicationError, unit: Duration) -> Option<Duration> {
        self.peer.reset();
        self.view.missed += 1;
        let mut class = e.class();
        if class == ErrorClass::Resync {
            let reason = match &e {
                ReplicationError::ResyncRequired(r) => r.clone(),
                other => other.to_string(),
            };
            match next(&self.phase, Event::ResyncNeeded { reason: reason.clone(), requested: false }) {
                Ok(p) => {
                    tracing::warn!("delta replication cannot continue: {e:#}");
                    self.enter_resync(p, reason);
                    return Some(Duration::ZERO);
                }
                // The resync itself hit a broken chain: it cannot fix this.
                Err(_) => class = ErrorClass::Fatal,
            }
        }
        if class == ErrorClass::Recoverable {
            self.failures += 1;
            let units = retry_delay_units(self.failures);
            tracing::warn!(failures = self.failures, "replication failed, retrying in {units} units: {e:#}");
            self.view.error = e.to_string();
            self.view.recoverable = true;
            self.apply_or_log(Event::RecoverableError);
            return Some(unit * units as u32);
        }
        tracing::error!("replication stopped: {e:#}");
        self.view.error = e.to_string();
        self.view.recoverable = false;
        self.apply_or_log(Event::FatalError { error: e.to_string() });
        None
    }

    /// Enters a resync-required `phase`: unacknowledged points are obsolete (the block
    /// comparison covers them).
    fn enter_resync(&mut self, phase: Phase, reason: String) {
        self.st.pending.clear();
        self.set_phase(phase);
        if let Err(e) = self.persist() {
            tracing::error!("persisting the resync requirement: {e:#}");
        }
        self.view.detail = reason;
        self.view.error.clear();
        self.report();
    }

    fn refresh_disks(&mut self) {
        match self.vm_disks.disks() {
            Some(mut d) => {
                d.sort_by(|a, b| a.0.cmp(&b.0));
                self.disks = d;
                self.live = true;
                self.apply_or_log(Event::VmRunning);
            }
            None => {
                self.live = false;
                self.apply_or_log(Event::VmStopped);
            }
        }
    }

    async fn step(&mut self) -> Result<(), ReplicationError> {
        match self.phase.clone() {
            Phase::InitialCopy => {
                self.initial().await?;
                self.apply(Event::CopyDone)?;
                self.persist()?;
                tracing::info!(bytes = self.view.total, "initial copy complete");
                // The first point at once: the merge of every log of the copy.
                self.cycle().await
            }
            Phase::WaitingForImport => {
                if !self.import_done().await? {
                    return Ok(());
                }
                self.cycle().await
            }
            Phase::Replicating | Phase::Paused(Resume::Replicating) => self.cycle().await,
            Phase::ResyncRequired { reason, requested } | Phase::Resynchronising { reason, requested } => {
                self.resync(reason, requested).await
            }
            Phase::Paused(Resume::InitialCopy) | Phase::Failed { .. } | Phase::Stopped => Ok(()),
        }
    }

    // ---- status ------------------------------------------------------------------

    fn status(&self) -> v1::ReplicationStatus {
        let rate = self.throttle.view();
        v1::ReplicationStatus {
            relationship_id: self.p.relationship_id.to_string(),
            vm: self.p.vm.to_string(),
            state: self.phase.reported().into(),
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
            warnings: self.bitmap_warnings(),
            bandwidth_limit: rate.limit_bytes_per_sec,
            achieved_bytes_per_sec: rate.achieved_bytes_per_sec,
        }
    }

    /// Never blocks: a slow control channel drops status messages, not replication.
    pub fn report(&self) {
        if self.status_tx.try_send(self.status()).is_err() {
            tracing::debug!("status channel full or closed: status dropped");
        }
    }

    pub fn persist(&mut self) -> Result<(), ReplicationError> {
        self.st.bytes_replicated = self.wire.load(Ordering::Relaxed);
        Ok(self.st.save(&self.state_path)?)
    }
}
