//! [`Sessions`]: the registry of live control streams, the connection state and
//! heartbeat of every host, and the way the rest of the provider sends a command to a
//! host and awaits its result.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use siterecovery_proto::model::HostId;
use siterecovery_proto::v1;
use siterecovery_proto::v1::provider_message::Command;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::Status;

pub use crate::command::CommandError;
pub use crate::inventory::LiveStatus;

pub(super) type Outbound = mpsc::Sender<Result<v1::ProviderMessage, Status>>;
pub(super) type Pending = HashMap<u64, oneshot::Sender<v1::CommandResult>>;

struct Session {
    /// Distinguishes a reconnection from the stream it replaced, so the old stream's
    /// cleanup does not tear down the new one.
    epoch: u64,
    tx: Outbound,
    pending: Arc<Mutex<Pending>>,
    /// Cancelled when a newer session of the same host replaces this one.
    ended: tokio_util::sync::CancellationToken,
}

/// Live control sessions, by host id.
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    status: Mutex<HashMap<String, LiveStatus>>,
    next: AtomicU64,
    /// When each host's inventory was last written (the clock of
    /// [`super::writes::due`]; kept across reconnections, so reconnecting does not
    /// buy a write).
    inventory_written: Mutex<HashMap<String, Instant>>,
    /// VM names whose refusal was logged, per host (bounded).
    refusals_logged: Mutex<HashMap<String, HashSet<String>>>,
}

/// At most this many refused VM names are remembered (and logged) per host.
const MAX_REFUSALS_LOGGED: usize = 256;

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

pub(super) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Sessions {
    pub fn new() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            status: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            inventory_written: Mutex::new(HashMap::new()),
            refusals_logged: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn last_inventory_write(&self, host_id: &HostId) -> Option<Instant> {
        self.inventory_written.lock().ok().and_then(|m| m.get(host_id.as_str()).copied())
    }

    pub(super) fn inventory_written(&self, host_id: &HostId, at: Instant) {
        if let Ok(mut m) = self.inventory_written.lock() {
            m.insert(host_id.to_string(), at);
        }
    }

    /// Whether the refusal of VM `vm` reported by `host_id` is to be logged: the first
    /// time for each name, up to [`MAX_REFUSALS_LOGGED`] names per host.
    pub(super) fn first_refusal(&self, host_id: &HostId, vm: &str) -> bool {
        let Ok(mut m) = self.refusals_logged.lock() else { return false };
        let names = m.entry(host_id.to_string()).or_default();
        if names.len() >= MAX_REFUSALS_LOGGED || names.contains(vm) {
            return false;
        }
        names.insert(vm.to_owned());
        if names.len() == MAX_REFUSALS_LOGGED {
            tracing::warn!(host_id = %host_id, "{MAX_REFUSALS_LOGGED} refused VM names logged; further ones are not");
        }
        true
    }

    pub fn status(&self, host_id: &(impl AsRef<str> + ?Sized)) -> LiveStatus {
        let host_id = host_id.as_ref();
        self.status.lock().map(|s| s.get(host_id).cloned().unwrap_or_default()).unwrap_or_default()
    }

    pub(super) fn update_status(&self, host_id: &HostId, f: impl FnOnce(&mut LiveStatus)) {
        let host_id = host_id.as_str();
        if let Ok(mut s) = self.status.lock() {
            f(s.entry(host_id.to_owned()).or_default());
        }
    }

    /// Sends a command to a connected host and waits for its result.
    pub async fn command(
        &self,
        host_id: &(impl AsRef<str> + ?Sized),
        cmd: Command,
        timeout: Duration,
    ) -> Result<v1::CommandResult, CommandError> {
        let host = host_id.as_ref().to_owned();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let tx = {
            let sessions = self.sessions.lock().map_err(|_| CommandError::Poisoned)?;
            let s = sessions.get(&host).ok_or_else(|| CommandError::NotConnected(host.clone()))?;
            s.pending.lock().map_err(|_| CommandError::Poisoned)?.insert(id, done_tx);
            s.tx.clone()
        };
        if tx.send(Ok(v1::ProviderMessage { command_id: id, command: Some(cmd) })).await.is_err() {
            return Err(CommandError::Disconnected(host));
        }
        let result = match tokio::time::timeout(timeout, done_rx).await {
            Err(_) => return Err(CommandError::Timeout { host, after: timeout }),
            Ok(Err(_)) => return Err(CommandError::DisconnectedBeforeAnswer(host)),
            Ok(Ok(r)) => r,
        };
        if result.ok {
            return Ok(result);
        }
        let code = v1::ErrorCode::try_from(result.code).unwrap_or(v1::ErrorCode::Unspecified);
        Err(CommandError::Refused { host, code, message: result.error })
    }

    /// Registers the session of `host_id` (one per host): a previous one is told to end
    /// (its `ended` cancelled), so a reconnecting agent — or a second process holding
    /// the host's key — never leaves a stream running that commands cannot reach.
    pub(super) fn open(
        &self,
        host_id: &HostId,
        tx: Outbound,
        ended: tokio_util::sync::CancellationToken,
    ) -> (u64, Arc<Mutex<Pending>>) {
        let epoch = self.next.fetch_add(1, Ordering::Relaxed);
        let pending = Arc::new(Mutex::new(HashMap::new()));
        if let Ok(mut s) = self.sessions.lock()
            && let Some(old) = s.insert(host_id.to_string(), Session { epoch, tx, pending: pending.clone(), ended })
        {
            old.ended.cancel();
        }
        self.update_status(host_id, |st| {
            st.connected = true;
            st.last_heartbeat_unix_ms = now_ms();
        });
        (epoch, pending)
    }

    pub(super) fn close(&self, host_id: &HostId, epoch: u64) {
        let mut current = false;
        if let Ok(mut s) = self.sessions.lock()
            && s.get(host_id.as_str()).is_some_and(|x| x.epoch == epoch)
        {
            s.remove(host_id.as_str());
            current = true;
        }
        if current {
            self.update_status(host_id, |st| st.connected = false);
        }
    }

    /// Ends every stream (shutdown): agents see the provider go and reconnect later.
    pub fn close_all(&self) {
        if let Ok(mut s) = self.sessions.lock() {
            s.clear();
        }
    }
}
