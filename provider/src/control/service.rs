//! The Control service: accepts an agent's stream, converts each message
//! ([`AgentReport`]) and acts on it: connection state, the host's address, its
//! inventory, command results to their waiters, replication statuses to protection.
//!
//! What the rest of the provider does with inventories and statuses comes in through
//! [`ControlContext`], so this module does not depend on protection or failover.

use std::pin::Pin;
use std::sync::{Arc, Mutex};

use futures::Stream;
use siterecovery_certs::{Role, VaultId};
use siterecovery_proto::model::WireError;
use siterecovery_proto::v1;
use siterecovery_proto::v1::control_server::Control;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::report::{AgentReport, ReplicationReport};
use super::sessions::{Outbound, Pending, Sessions, now_ms};
use crate::auth::authorize;
use crate::error::{self, Classify, ErrorClass};
use crate::inventory::{HostRecord, VmRecord, report_wins};
use crate::store::{HOSTS, Store, StoreError, VMS};

/// What the control channel needs from the provider around it.
pub trait ControlContext: Send + Sync + 'static {
    fn vault_id(&self) -> &VaultId;
    fn store(&self) -> &Store;
    fn sessions(&self) -> &Sessions;
    /// The CA, for certificate renewal.
    fn ca(&self) -> &siterecovery_certs::VaultCa;
    fn revocations(&self) -> &crate::trust::Revocations;
    /// Validity of renewed host certificates.
    fn cert_validity(&self) -> std::time::Duration;
    /// Cancelled at shutdown: streams end.
    fn shutdown(&self) -> &CancellationToken;
    /// A host's inventory was recorded: `vms` are the VMs it reported that won
    /// ([`report_wins`]).
    fn on_inventory(&self, host: &HostRecord, vms: &[VmRecord]);
    /// A replication status from `host`.
    fn on_replication(&self, host: &HostRecord, report: &ReplicationReport);
}

/// Why a control session was refused or ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("host {0} is not registered with this vault (re-registered since?)")]
    NotRegistered(String),
    /// The agent sent a message that does not convert.
    #[error("invalid report: {0}")]
    Report(#[from] WireError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for ControlError {
    fn class(&self) -> ErrorClass {
        match self {
            ControlError::NotRegistered(_) => ErrorClass::PermissionDenied,
            ControlError::Report(_) => ErrorClass::InvalidArgument,
            ControlError::Store(_) => ErrorClass::Internal,
        }
    }
}

/// The one mapping of control errors to gRPC statuses.
impl From<ControlError> for Status {
    fn from(e: ControlError) -> Self {
        error::status(&e)
    }
}

pub struct ControlService<C> {
    pub state: Arc<C>,
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<v1::ProviderMessage, Status>> + Send>>;

impl<C: ControlContext> ControlService<C> {
    fn registered_host(&self, host_id: &str) -> Result<HostRecord, ControlError> {
        self.state
            .store()
            .list::<HostRecord>(HOSTS)?
            .into_iter()
            .find(|h| h.id.as_str() == host_id)
            .ok_or_else(|| ControlError::NotRegistered(host_id.to_owned()))
    }
}

#[tonic::async_trait]
impl<C: ControlContext> Control for ControlService<C> {
    type SessionStream = SessionStream;

    async fn session(&self, req: Request<Streaming<v1::AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let peer = authorize(&req, self.state.vault_id(), &[Role::Host])?;
        let host = match self.registered_host(&peer.id) {
            Ok(h) => h,
            Err(e) => {
                // Internal errors are logged by the mapping; refusals here, once.
                if !matches!(e, ControlError::Store(_)) {
                    tracing::warn!(host_id = %peer.id, "refused control session: {e}");
                }
                return Err(e.into());
            }
        };
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let (epoch, pending) = self.state.sessions().open(&host.id, tx.clone());
        tracing::info!(host = %host.name, host_id = %host.id, "host connected");
        tokio::spawn(run_inbound(self.state.clone(), host, epoch, pending, tx, inbound));
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(until_cancelled(out, self.state.shutdown().clone()))))
    }
}

/// Ends `s` when `token` is cancelled, so graceful shutdown does not wait on streams
/// that would otherwise live for ever.
fn until_cancelled<S: Stream + Send + 'static>(s: S, token: CancellationToken) -> impl Stream<Item = S::Item> + Send {
    use futures::StreamExt;
    let stop = Box::pin(async move { token.cancelled_owned().await });
    s.take_until(stop)
}

async fn run_inbound<C: ControlContext>(
    state: Arc<C>,
    host: HostRecord,
    epoch: u64,
    pending: Arc<Mutex<Pending>>,
    tx: Outbound,
    mut inbound: Streaming<v1::AgentMessage>,
) {
    loop {
        let msg = tokio::select! {
            m = inbound.message() => m,
            _ = state.shutdown().cancelled() => break,
        };
        match msg {
            Ok(Some(m)) => match AgentReport::from_wire(m, &host.id) {
                Ok(report) => handle(state.as_ref(), &host, &pending, report),
                Err(e) => {
                    // The values in `e` are shortened by the conversion (they come from
                    // the agent); logged once here, then the agent is told why.
                    tracing::warn!(host = %host.name, "control session ended: invalid report: {e}");
                    let _ = tx.send(Err(ControlError::Report(e).into())).await;
                    break;
                }
            },
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
    state.sessions().close(&host.id, epoch);
    // Waiters of this stream's commands see a disconnection (their senders drop).
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}

fn handle<C: ControlContext>(state: &C, host: &HostRecord, pending: &Mutex<Pending>, report: AgentReport) {
    match report {
        AgentReport::Empty => {}
        AgentReport::Hello { agent_version, listen_address } => {
            state.sessions().update_status(&host.id, |s| s.agent_version = Some(agent_version));
            if let Some(address) = listen_address
                && address != host.address
            {
                let mut updated = host.clone();
                updated.address = address;
                if let Err(e) = state.store().put(HOSTS, &updated.name, &updated) {
                    tracing::error!(host = %host.name, "cannot record host address: {e:#}");
                }
            }
        }
        AgentReport::Heartbeat { free_bytes } => {
            state.sessions().update_status(&host.id, |s| {
                s.last_heartbeat_unix_ms = now_ms();
                s.free_bytes = free_bytes;
            });
        }
        AgentReport::Inventory { vms, free_bytes } => {
            state.sessions().update_status(&host.id, |s| {
                s.last_heartbeat_unix_ms = now_ms();
                s.free_bytes = free_bytes;
            });
            let mut records = Vec::new();
            for r in vms {
                // A failed-over VM is reported by two hosts for a while: keep the copy
                // that runs after the failover.
                let stored = state.store().get::<VmRecord>(VMS, &r.name).ok().flatten();
                if report_wins(stored.as_ref(), &r) {
                    records.push((r.name.clone(), r));
                }
            }
            let id = host.id.clone();
            if let Err(e) = state.store().replace_where(VMS, |v: &VmRecord| v.host_id == id, &records) {
                tracing::error!(host = %host.name, "cannot record inventory: {e:#}");
            }
            let reported: Vec<VmRecord> = records.into_iter().map(|(_, r)| r).collect();
            state.on_inventory(host, &reported);
        }
        AgentReport::Replication(r) => state.on_replication(host, &r),
        AgentReport::RenewCertificate { .. } => {
            tracing::warn!(host = %host.name, "certificate renewal is not implemented yet");
        }
        AgentReport::Result(r) => {
            let waiter = pending.lock().ok().and_then(|mut p| p.remove(&r.command_id));
            match waiter {
                Some(w) => {
                    let _ = w.send(*r);
                }
                None => tracing::warn!(host = %host.name, command_id = r.command_id, "result for an unknown command"),
            }
        }
    }
}
