//! The Control service: authorises an agent's stream, binds it to the host record and
//! the certificate serial that opened it ([`Binding`]) and runs it ([`Session`]).
//!
//! What the rest of the provider does with inventories and statuses comes in through
//! [`ControlContext`], so this module does not depend on protection or failover.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use siterecovery_certs::{Role, VaultId};
use siterecovery_proto::model::{VmName, WireError};
use siterecovery_proto::v1;
use siterecovery_proto::v1::control_server::Control;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::binding::Binding;
use super::report::ReplicationReport;
use super::session::Session;
use super::sessions::Sessions;
use super::writes::WriteLimits;
use crate::auth::authorize;
use crate::error::{self, Classify, ErrorClass};
use crate::inventory::{HostRecord, RelationshipHosts, VmRecord};
use crate::store::{Store, StoreError};

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
    /// A host's inventory was recorded: `vms` are the VMs it reported that are placed
    /// on it ([`crate::inventory::judge_report`]).
    fn on_inventory(&self, host: &HostRecord, vms: &[VmRecord]);
    /// A replication status from `host`.
    fn on_replication(&self, host: &HostRecord, report: &ReplicationReport);
    /// The hosts of the relationship protecting `vm`, when it is protected.
    fn relationship_hosts(&self, vm: &VmName) -> Option<RelationshipHosts>;
    /// How often an inventory may be written.
    fn write_limits(&self) -> WriteLimits {
        WriteLimits::default()
    }
}

/// Why a control session was refused or ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("host {0} is not registered with this vault (re-registered or removed since?)")]
    NotRegistered(String),
    #[error(
        "certificate {serial} is not the current certificate of host {host} (renewed, reset or re-registered since)"
    )]
    StaleCertificate { host: String, serial: String },
    #[error("certificate {0} is revoked")]
    Revoked(String),
    #[error("client certificate: {0}")]
    Certificate(String),
    /// Another session of the same host opened: one session per host.
    #[error("a newer control session of this host replaced this one")]
    Replaced,
    /// The agent sent a message that does not convert.
    #[error("invalid report: {0}")]
    Report(#[from] WireError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Classify for ControlError {
    fn class(&self) -> ErrorClass {
        match self {
            ControlError::NotRegistered(_)
            | ControlError::StaleCertificate { .. }
            | ControlError::Revoked(_)
            | ControlError::Certificate(_) => ErrorClass::PermissionDenied,
            ControlError::Report(_) => ErrorClass::InvalidArgument,
            ControlError::Replaced => ErrorClass::FailedPrecondition,
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
    /// The session's binding: the peer's certificate must be its host's current one.
    /// Also returns the certificate's expiry (unix ms).
    fn bind(&self, req: &Request<Streaming<v1::AgentMessage>>) -> Result<(Binding, HostRecord, i64), Status> {
        let peer = authorize(req, self.state.vault_id(), &[Role::Host])?;
        let leaf = req.peer_certs().and_then(|c| c.first().cloned());
        let bound = leaf.ok_or_else(|| ControlError::Certificate("none presented".into())).and_then(|leaf| {
            let bad = |e: siterecovery_certs::CertError| ControlError::Certificate(e.to_string());
            let serial = siterecovery_certs::live::serial_of_der(&leaf).map_err(bad)?;
            let (_, not_after) = siterecovery_certs::ca::validity_of_der(&leaf).map_err(bad)?;
            if self.state.revocations().is_revoked(&serial) {
                return Err(ControlError::Revoked(serial));
            }
            let not_after_ms = not_after.saturating_mul(1000);
            let (binding, host) = Binding::open(self.state.store(), &peer.id, &serial, not_after_ms)?;
            Ok((binding, host, not_after_ms))
        });
        bound.map_err(|e| {
            // Internal errors are logged by the mapping; refusals here, once.
            if !matches!(e, ControlError::Store(_)) {
                tracing::warn!(host_id = %peer.id, "refused control session: {e}");
            }
            e.into()
        })
    }
}

#[tonic::async_trait]
impl<C: ControlContext> Control for ControlService<C> {
    type SessionStream = SessionStream;

    async fn session(&self, req: Request<Streaming<v1::AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let (binding, host, expires) = self.bind(&req)?;
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        // Ended at shutdown, or when another session of this host replaces this one.
        let ended = self.state.shutdown().child_token();
        let (epoch, pending) = self.state.sessions().open(&host.id, tx.clone(), ended.clone());
        tracing::info!(host = %host.name, host_id = %host.id, serial = %binding.serial, "host connected");
        let session = Session::new(self.state.clone(), binding, host, epoch, pending, tx, expires).ended_by(ended);
        tokio::spawn(session.run(inbound));
        let out = tokio_stream::wrappers::ReceiverStream::new(rx);
        // The stream outlives the session task by the error it was sent (`Replaced`):
        // it ends at shutdown, and when the session task drops its sender.
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
