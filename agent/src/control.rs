//! The control channel to the provider: one long-lived bidi stream, reconnected with
//! backoff whenever it breaks (provider restart, network loss).
//!
//! Up: `Hello`, the full inventory, heartbeats, command results. Down: commands, each
//! carried out in its own task so a slow one never delays heartbeats.

use std::sync::Arc;
use std::time::Duration;

use siterecovery_proto::v1;
use siterecovery_proto::v1::agent_message::Body;
use siterecovery_proto::v1::control_client::ControlClient;
use siterecovery_proto::v1::provider_message::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::AgentFiles;
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
}

impl Default for ControlOptions {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(5),
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// A TLS channel to `address` verified by the vault CA, presenting this host's certificate.
pub fn endpoint(address: &str, files: &AgentFiles) -> Result<Endpoint, tonic::transport::Error> {
    let host = siterecovery_certs::host_of(address).to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&files.ca_pem))
        .identity(Identity::from_pem(&files.identity.cert_pem, &files.identity.key_pem))
        .domain_name(host);
    Ok(Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20)))
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
    loop {
        let started = tokio::time::Instant::now();
        match session(&files, &vms, &protection, &opts, &shutdown).await {
            Ok(()) => tracing::info!("control session ended"),
            Err(e) => tracing::warn!(provider = %files.config.provider_address, "control session: {e:#}"),
        }
        if shutdown.is_cancelled() {
            return;
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
    Connect(#[from] tonic::transport::Error),
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
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let channel: Channel = endpoint(&files.config.provider_address, files)?.connect().await?;
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
            msg = inbound.message() => {
                let Some(msg) = msg? else { return Ok(()) };
                let (vms, protection, tx) = (vms.clone(), protection.clone(), tx.clone());
                tokio::spawn(async move {
                    let result = execute(&vms, &protection, msg).await;
                    let _ = tx.send(v1::AgentMessage { body: Some(Body::Result(result)) }).await;
                });
            }
        }
    }
}

async fn inventory(files: &AgentFiles, vms: &VmManager) -> v1::InventoryReport {
    v1::InventoryReport { vms: vms.list().await, free_bytes: free_bytes(&files.dir) }
}

async fn execute(vms: &VmManager, protection: &Protection, msg: v1::ProviderMessage) -> v1::CommandResult {
    let id = msg.command_id;
    let ok = |vm: Option<v1::Vm>| v1::CommandResult { command_id: id, ok: true, vm, ..Default::default() };
    let fail = |code: v1::ErrorCode, error: String| {
        tracing::warn!(command_id = id, "command failed: {error}");
        v1::CommandResult { command_id: id, ok: false, code: code as i32, error, ..Default::default() }
    };
    let done = |r: Result<(), crate::protection::ProtectionError>| match r {
        Ok(()) => ok(None),
        Err(e) => fail(e.code(), e.to_string()),
    };
    let with_vm = |r: Result<v1::Vm, crate::protection::ProtectionError>| match r {
        Ok(vm) => ok(Some(vm)),
        Err(e) => fail(e.code(), e.to_string()),
    };
    let outcome = match msg.command {
        Some(Command::CreateVm(c)) => vms.create(&c.name, &c.disk_sizes, &c.nics, c.start).await.map(Some),
        Some(Command::DeleteVm(c)) => vms.delete(&c.name).await.map(|()| None),
        Some(Command::StartVm(c)) => vms.start(&c.name).await.map(Some),
        Some(Command::StopVm(c)) => vms.stop(&c.name).await.map(Some),
        Some(Command::PrepareReplica(c)) => return done(protection.prepare_replica(c).await),
        Some(Command::StartReplication(c)) => return done(protection.start_replication(c).await),
        Some(Command::StopReplication(c)) => return done(protection.stop_replication(c).await),
        Some(Command::ExportInitial(c)) => {
            return match protection.export_initial(c).await {
                Ok(bytes) => v1::CommandResult { bytes, ..ok(None) },
                Err(e) => fail(e.code(), e.to_string()),
            };
        }
        Some(Command::ImportInitial(c)) => {
            return match protection.import_initial(c).await {
                Ok(bytes) => v1::CommandResult { bytes, ..ok(None) },
                Err(e) => fail(e.code(), e.to_string()),
            };
        }
        Some(Command::RequestResync(c)) => return done(protection.request_resync(c).await),
        Some(Command::ListPoints(c)) => {
            return match protection.list_points(&c.vm) {
                Ok(points) => v1::CommandResult { points, ..ok(None) },
                Err(e) => fail(e.code(), e.to_string()),
            };
        }
        Some(Command::ExportPoint(c)) => {
            return match protection.export_point(&c.vm, &c.point) {
                Ok((uri, point_id)) => {
                    let points = vec![v1::RecoveryPoint { id: point_id, ..Default::default() }];
                    v1::CommandResult { uri, points, ..ok(None) }
                }
                Err(e) => fail(e.code(), e.to_string()),
            };
        }
        Some(Command::UnexportPoint(c)) => {
            protection.unexport_point(&c.vm);
            return ok(None);
        }
        Some(Command::PrepareFailover(c)) => {
            return match protection.prepare_failover(c).await {
                Ok(point) => v1::CommandResult { points: vec![point], ..ok(None) },
                Err(e) => fail(e.code(), e.to_string()),
            };
        }
        Some(Command::Failover(c)) => {
            use siterecovery_proto::model::FailoverKind;
            let kind = if c.test {
                FailoverKind::Test
            } else if c.planned {
                FailoverKind::Planned
            } else {
                FailoverKind::Unplanned
            };
            return with_vm(protection.failover(c, kind).await);
        }
        Some(Command::ChangePoint(c)) => return with_vm(protection.change_point(c).await),
        Some(Command::CommitFailover(c)) => return with_vm(protection.commit_failover(c).await),
        Some(Command::CleanupTestFailover(c)) => return done(protection.cleanup_test_failover(c).await),
        None => {
            return v1::CommandResult {
                command_id: id,
                ok: false,
                code: v1::ErrorCode::InvalidArgument as i32,
                error: "unknown command (is this agent older than the provider?)".into(),
                ..Default::default()
            };
        }
    };
    match outcome {
        Ok(vm) => v1::CommandResult { command_id: id, ok: true, vm, ..Default::default() },
        Err(e) => {
            tracing::warn!(command_id = id, "command failed: {e:#}");
            v1::CommandResult {
                command_id: id,
                ok: false,
                code: e.code() as i32,
                error: e.to_string(),
                ..Default::default()
            }
        }
    }
}
