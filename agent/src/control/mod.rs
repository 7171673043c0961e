//! The control channel to the provider: one long-lived bidi stream, reconnected with
//! backoff whenever it breaks (provider restart, network loss).
//!
//! The provider must prove the `provider` role of the vault at the handshake; this host
//! presents its live certificate (a renewed one from the next reconnect on).
//!
//! Up: `Hello`, the full inventory, heartbeats, command results, certificate renewal
//! requests ([`renewal`]). Down: the pushes, handled first: the vault's revocation list
//! (applied by version and kept in `revoked.json`) and a renewed certificate; then
//! commands, each converted into a domain [`Command`] ([`command`]; a refused field is
//! an InvalidArgument result naming it, before any handler runs) and carried out
//! ([`execute`]) in its own task so a slow one never delays heartbeats.

pub mod command;
mod error;
pub mod execute;
pub mod renewal;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::Role;
use siterecovery_certs::live::Expect;
use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::control_client::ControlClient;
use siterecovery_proto::v1::provider_message::Command as Wire;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use command::{Command, CommandKind};
pub use error::CommandError;
use execute::execute;
use renewal::Renewal;

use siterecovery_proto::lifecycle::Lifecycle;

use crate::config::AgentFiles;
use crate::config::revoked::is_serial;
use crate::peer::ConnectError;
use crate::protection::Protection;
use crate::vm::VmManager;

/// Version reported to the provider.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Timing of the control channel.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    pub heartbeat: Duration,
    /// First reconnect delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Told when the channel is up (health SERVING, systemd `READY=1`) and down
    /// (`STATUS=`): the agent is ready once its control channel to the provider is.
    pub lifecycle: Option<Lifecycle>,
}

impl Default for ControlOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            lifecycle: None,
        }
    }
}

/// Free bytes of the file system holding `path` (0 when unknown).
pub fn free_bytes(path: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(path).map(|s| s.blocks_available().saturating_mul(s.fragment_size())).unwrap_or(0)
}

/// Keeps the control channel up until `shutdown`.
pub async fn run(
    files: Arc<AgentFiles>,
    vms: Arc<VmManager>,
    protection: Arc<Protection>,
    opts: ControlOptions,
    shutdown: CancellationToken,
) {
    let mut backoff = opts.min_backoff;
    let mut renewal = Renewal::default();
    loop {
        let started = tokio::time::Instant::now();
        match session(&files, &vms, &protection, &opts, &mut renewal, &shutdown).await {
            Ok(()) => tracing::info!("control session ended"),
            Err(e) => tracing::warn!(provider = %files.config.provider_address, "control session: {e:#}"),
        }
        renewal.session_ended();
        if shutdown.is_cancelled() {
            return;
        }
        if let Some(l) = &opts.lifecycle {
            l.status(&format!("control channel to the provider {} down; reconnecting", files.config.provider_address));
        }
        // A session that lived a while resets the backoff: the provider restarted.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = opts.min_backoff;
        }
        tracing::info!("reconnecting to the provider in {backoff:?}");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(opts.max_backoff);
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connect: {0}")]
    Connect(#[from] ConnectError),
    #[error("provider refused: {0}")]
    Status(#[from] tonic::Status),
    #[error("outbound stream closed")]
    Closed,
}

async fn session(
    files: &Arc<AgentFiles>,
    vms: &Arc<VmManager>,
    protection: &Arc<Protection>,
    opts: &ControlOptions,
    renewal: &mut Renewal,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let channel = crate::peer::connect(&files.config.provider_address, Expect::Role(Role::Provider), files).await?;
    let mut client = ControlClient::new(channel);
    let (tx, rx) = mpsc::channel::<v1::AgentMessage>(64);
    let send = |tx: &mpsc::Sender<v1::AgentMessage>, body: Body| {
        let tx = tx.clone();
        async move { tx.send(v1::AgentMessage { body: Some(body) }).await.map_err(|_| SessionError::Closed) }
    };
    send(
        &tx,
        Body::Hello(v1::Hello {
            agent_version: AGENT_VERSION.into(),
            listen_address: files.config.listen_address.clone(),
        }),
    )
    .await?;
    send(&tx, Body::Inventory(inventory(files, vms).await)).await?;
    // Subscribe before sending the latest statuses so none falls in between.
    let (mut statuses, latest) = protection.subscribe();
    for s in latest {
        send(&tx, Body::Replication(s)).await?;
    }
    let mut inbound = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(provider = %files.config.provider_address, "connected to the provider");
    if let Some(l) = &opts.lifecycle {
        l.serving().await;
        l.ready(&format!(
            "host {}: control channel to the provider {} up",
            files.config.host_name, files.config.provider_address
        ));
    }
    let mut tick = tokio::time::interval(opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                seq += 1;
                // Every sixth beat carries the whole inventory (pending log bytes move).
                if seq.is_multiple_of(6) {
                    send(&tx, Body::Inventory(inventory(files, vms).await)).await?;
                } else {
                    send(&tx, Body::Heartbeat(v1::Heartbeat { seq, free_bytes: free_bytes(&files.dir) })).await?;
                }
            }
            st = statuses.recv() => match st {
                Ok(s) => send(&tx, Body::Replication(s)).await?,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("{n} replication statuses dropped (control channel slow); the next ones catch up");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
            },
            _ = tokio::time::sleep_until(renewal.next_at(files)) => {
                match renewal.tick(files, tokio::time::Instant::now()) {
                    Ok(Some(req)) => {
                        tracing::info!("asking the provider to renew this host's certificate");
                        send(&tx, Body::RenewCertificate(req)).await?;
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("certificate renewal: {e}"),
                }
            }
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                let msg = match msg.command {
                    Some(Wire::RevocationList(list)) => {
                        apply_revocations(files, list);
                        continue;
                    }
                    Some(Wire::CertificateIssued(issued)) => {
                        match renewal.issued(files, issued, tokio::time::Instant::now()) {
                            Ok(r) => tracing::info!(serial = %r.serial, expires_unix = r.not_after,
                                valid_for_s = r.not_after - siterecovery_certs::unix_now(),
                                "certificate renewed: new handshakes present it"),
                            Err(e) => tracing::warn!("certificate renewal: {e}"),
                        }
                        continue;
                    }
                    _ => msg,
                };
                let (vms, protection, tx, id) = (vms.clone(), protection.clone(), tx.clone(), msg.command_id);
                tokio::spawn(async move {
                    let result = match Command::try_from(msg) {
                        Ok(c) => execute(&vms, &protection, c).await,
                        Err(e) => execute::refused(id, e),
                    };
                    let _ = tx.send(v1::AgentMessage { body: Some(Body::Result(result)) }).await;
                });
            }
        }
    }
}

/// Applies the vault's revocation list pushed by the provider (ignored when older than
/// the one held), kept on disk for the next start.
pub fn apply_revocations(files: &AgentFiles, list: v1::RevocationList) {
    if let Some(bad) = list.serials.iter().find(|s| !is_serial(s)) {
        let bad: String = bad.chars().take(80).collect();
        tracing::warn!(version = list.version, "revocation list refused: {bad:?} is not a certificate serial");
        return;
    }
    let (version, count) = (list.version, list.serials.len());
    match files.apply_revocations(list.version, list.serials) {
        Ok(true) => tracing::info!(version, revoked = count, "revocation list applied"),
        Ok(false) => tracing::debug!(version, "revocation list unchanged or older than the one held"),
        Err(e) => tracing::error!(version, "revocation list applied but not kept on disk: {e}"),
    }
}

async fn inventory(files: &AgentFiles, vms: &VmManager) -> v1::InventoryReport {
    v1::InventoryReport { vms: vms.list().await, free_bytes: free_bytes(&files.dir) }
}
