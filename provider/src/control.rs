//! The control channel: one long-lived bidi stream per connected agent.
//!
//! Agents send a `Hello`, their inventory, heartbeats and command results; the provider
//! sends commands, each with an id that its result carries back. [`Sessions`] is the
//! registry of live streams, the connection state and heartbeat of every host, and the
//! way the rest of the provider sends a command to a host and awaits its result.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use siterecovery_certs::Role;
use siterecovery_proto::model::HostId;
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::control_server::Control;
use siterecovery_proto::v1::provider_message::Command;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::api::AppState;
use crate::auth::authorize;
use crate::inventory::{HostRecord, VmRecord, report_wins};
use crate::store::{HOSTS, VMS};

type Outbound = mpsc::Sender<Result<v1::ProviderMessage, Status>>;
type Pending = HashMap<u64, oneshot::Sender<v1::CommandResult>>;

/// What the provider knows of a host's connection right now (not persisted).
#[derive(Debug, Clone, Default)]
pub struct LiveStatus {
    pub connected: bool,
    pub last_heartbeat_unix_ms: i64,
    pub agent_version: Option<String>,
    pub free_bytes: u64,
}

struct Session {
    /// Distinguishes a reconnection from the stream it replaced, so the old stream's
    /// cleanup does not tear down the new one.
    epoch: u64,
    tx: Outbound,
    pending: Arc<Mutex<Pending>>,
}

/// Live control sessions, by host id.
pub struct Sessions {
    sessions: Mutex<HashMap<String, Session>>,
    status: Mutex<HashMap<String, LiveStatus>>,
    next: AtomicU64,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Sessions {
    pub fn new() -> Self {
        Self { sessions: Mutex::new(HashMap::new()), status: Mutex::new(HashMap::new()), next: AtomicU64::new(1) }
    }

    pub fn status(&self, host_id: &(impl AsRef<str> + ?Sized)) -> LiveStatus {
        let host_id = host_id.as_ref();
        self.status.lock().map(|s| s.get(host_id).cloned().unwrap_or_default()).unwrap_or_default()
    }

    fn update_status(&self, host_id: &HostId, f: impl FnOnce(&mut LiveStatus)) {
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
    ) -> Result<v1::CommandResult, Status> {
        let host_id = host_id.as_ref();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (done_tx, done_rx) = oneshot::channel();
        let tx = {
            let sessions = self.sessions.lock().map_err(|_| Status::internal("sessions lock poisoned"))?;
            let s =
                sessions.get(host_id).ok_or_else(|| Status::unavailable(format!("host {host_id} is not connected")))?;
            s.pending.lock().map_err(|_| Status::internal("lock poisoned"))?.insert(id, done_tx);
            s.tx.clone()
        };
        tx.send(Ok(v1::ProviderMessage { command_id: id, command: Some(cmd) }))
            .await
            .map_err(|_| Status::unavailable(format!("host {host_id} disconnected")))?;
        let result = tokio::time::timeout(timeout, done_rx)
            .await
            .map_err(|_| Status::deadline_exceeded(format!("host {host_id} did not answer within {timeout:?}")))?
            .map_err(|_| Status::unavailable(format!("host {host_id} disconnected before answering")))?;
        if result.ok {
            return Ok(result);
        }
        let code = v1::ErrorCode::try_from(result.code).unwrap_or(v1::ErrorCode::Unspecified);
        let msg = format!("host {host_id}: {}", result.error);
        Err(match code {
            v1::ErrorCode::InvalidArgument => Status::invalid_argument(msg),
            v1::ErrorCode::NotFound => Status::not_found(msg),
            v1::ErrorCode::AlreadyExists => Status::already_exists(msg),
            v1::ErrorCode::FailedPrecondition => Status::failed_precondition(msg),
            v1::ErrorCode::ResourceExhausted => Status::resource_exhausted(msg),
            _ => Status::internal(msg),
        })
    }

    fn open(&self, host_id: &HostId, tx: Outbound) -> (u64, Arc<Mutex<Pending>>) {
        let epoch = self.next.fetch_add(1, Ordering::Relaxed);
        let pending = Arc::new(Mutex::new(HashMap::new()));
        if let Ok(mut s) = self.sessions.lock() {
            // A reconnecting agent replaces its previous stream; dropping the old sender
            // ends that stream.
            s.insert(host_id.to_string(), Session { epoch, tx, pending: pending.clone() });
        }
        self.update_status(host_id, |st| {
            st.connected = true;
            st.last_heartbeat_unix_ms = now_ms();
        });
        (epoch, pending)
    }

    fn close(&self, host_id: &HostId, epoch: u64) {
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

pub struct ControlService {
    pub state: Arc<AppState>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ProviderMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    type SessionStream = SessionStream;

    async fn session(&self, req: Request<Streaming<v1::AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let peer = authorize(&req, &self.state.vault_id, &[Role::Host])?;
        let host = self
            .state
            .store
            .list::<HostRecord>(HOSTS)
            .map_err(|e| {
                tracing::error!("control session: {e:#}");
                Status::internal(e.to_string())
            })?
            .into_iter()
            .find(|h| h.id.as_str() == peer.id)
            .ok_or_else(|| {
                tracing::warn!(host_id = %peer.id, "refused control session: host not registered (or re-registered since)");
                Status::permission_denied(format!(
                    "host {} is not registered with this vault (re-registered since?)",
                    peer.id
                ))
            })?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (epoch, pending) = self.state.sessions.open(&host.id, tx);
        tracing::info!(host = %host.name, host_id = %host.id, "host connected");
        let state = self.state.clone();
        tokio::spawn(run_inbound(state, host, epoch, pending, inbound));
        let shutdown = self.state.shutdown.clone();
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(until_cancelled(out, shutdown))))
    }
}

/// Ends `s` when `token` is cancelled, so graceful shutdown does not wait on streams
/// that would otherwise live for ever.
fn until_cancelled<S: Stream + Send + 'static>(s: S, token: CancellationToken) -> impl Stream<Item = S::Item> + Send {
    use futures::StreamExt;
    let stop = Box::pin(async move { token.cancelled_owned().await });
    s.take_until(stop)
}

async fn run_inbound(
    state: Arc<AppState>,
    host: HostRecord,
    epoch: u64,
    pending: Arc<Mutex<Pending>>,
    mut inbound: Streaming<v1::AgentMessage>,
) {
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = state.shutdown.cancelled() => break,
        };
        match msg {
            Ok(Some(m)) => handle(&state, &host, &pending, m),
            Ok(None) => {
                tracing::info!(host = %host.name, "host closed its control session");
                break;
            }
            Err(e) => {
                tracing::warn!(host = %host.name, "control session lost: {e}");
                break;
            }
        }
    }
    state.sessions.close(&host.id, epoch);
    // Waiters of this stream's commands see a disconnection (their senders drop).
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}

fn handle(state: &AppState, host: &HostRecord, pending: &Mutex<Pending>, m: v1::AgentMessage) {
    let Some(body) = m.body else { return };
    match body {
        Body::Hello(h) => {
            state.sessions.update_status(&host.id, |s| s.agent_version = Some(h.agent_version.clone()));
            if !h.listen_address.is_empty() && h.listen_address != host.address {
                let mut updated = host.clone();
                updated.address = h.listen_address;
                if let Err(e) = state.store.put(HOSTS, &updated.name, &updated) {
                    tracing::error!(host = %host.name, "cannot record host address: {e:#}");
                }
            }
        }
        Body::Heartbeat(hb) => {
            state.sessions.update_status(&host.id, |s| {
                s.last_heartbeat_unix_ms = now_ms();
                s.free_bytes = hb.free_bytes;
            });
        }
        Body::Inventory(inv) => {
            state.sessions.update_status(&host.id, |s| {
                s.last_heartbeat_unix_ms = now_ms();
                s.free_bytes = inv.free_bytes;
            });
            let mut records = Vec::new();
            for vm in &inv.vms {
                match VmRecord::from_report(vm, &host.id) {
                    Ok(r) => {
                        // A failed-over VM is reported by two hosts for a while: keep the
                        // copy that runs after the failover.
                        let stored = state.store.get::<VmRecord>(VMS, &r.name).ok().flatten();
                        if report_wins(stored.as_ref(), &r) {
                            records.push((r.name.clone(), r));
                        }
                    }
                    Err(e) => tracing::warn!(host = %host.name, "ignoring reported VM: {e}"),
                }
            }
            let id = host.id.clone();
            if let Err(e) = state.store.replace_where(VMS, |v: &VmRecord| v.host_id == id, &records) {
                tracing::error!(host = %host.name, "cannot record inventory: {e:#}");
            }
            let reported: Vec<VmRecord> = records.into_iter().map(|(_, r)| r).collect();
            crate::failover::on_inventory(state, host, &reported);
        }
        Body::Replication(status) => state.protection.on_status(&state.store, host.id.as_str(), &status),
        Body::Result(r) => {
            let waiter = pending.lock().ok().and_then(|mut p| p.remove(&r.command_id));
            match waiter {
                Some(w) => {
                    let _ = w.send(r);
                }
                None => tracing::warn!(host = %host.name, command_id = r.command_id, "result for an unknown command"),
            }
        }
    }
}
