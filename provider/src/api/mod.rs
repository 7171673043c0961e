//! The provider's gRPC server: TLS, services, reflection, graceful shutdown.
//!
//! One listener serves everything. The vault CA is the only trust anchor; a client
//! certificate is optional at the handshake because Registration is called before a
//! host has one, and every other RPC authorises its caller ([`crate::auth`]).
//!
//! - [`protection`]: the Protection service's handlers.

pub mod protection;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use siterecovery_certs::Role;
use siterecovery_certs::{VaultCa, VaultId};
use siterecovery_proto::v1::control_server::ControlServer;
use siterecovery_proto::v1::inventory_server::InventoryServer;
use siterecovery_proto::v1::protection_server::ProtectionServer;
use siterecovery_proto::v1::registration_server::RegistrationServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use self::protection::ProtectionService;
use crate::control::{ControlService, Sessions};
use crate::inventory::InventoryService;
use crate::registration::RegistrationService;
use crate::relationship::{Core, ProtectionConfig, ProtectionCore};
use crate::store::Store;
use crate::trust::Revocations;
use crate::vault::Vault;

/// Shared state of the registration, inventory and control services. Orchestration
/// gets only the [`Core`] (through `Deref`, so `state.store` and `state.protection`
/// read as before).
pub struct AppState {
    pub vault_id: VaultId,
    /// The provider's data dir (registration secret file lives there).
    pub vault_dir: std::path::PathBuf,
    pub ca: VaultCa,
    pub sessions: Arc<Sessions>,
    pub core: Arc<Core>,
    /// The revoked certificates.
    pub revocations: Arc<Revocations>,
    /// Validity of the host certificates issued at registration and renewal.
    pub cert_validity: Duration,
}

impl std::ops::Deref for AppState {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS setup: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("server: {0}")]
    Transport(#[source] tonic::transport::Error),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

/// Serves on `listener` until `shutdown` is cancelled, then drains for up to `grace`.
pub async fn serve(
    vault: Vault,
    store: Store,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
) -> Result<(), ServeError> {
    serve_with(vault, store, listener, shutdown, grace, ProtectionConfig::default()).await
}

/// [`serve`] with explicit protection settings (`serve --test-intervals`).
pub async fn serve_with(
    vault: Vault,
    store: Store,
    listener: TcpListener,
    shutdown: CancellationToken,
    grace: Duration,
    protection: ProtectionConfig,
) -> Result<(), ServeError> {
    siterecovery_certs::tls::install_crypto_provider();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&vault.provider_identity.cert_pem, &vault.provider_identity.key_pem))
        .client_ca_root(Certificate::from_pem(vault.ca.cert_pem()))
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));
    let (protection, resumed) = ProtectionCore::load(&store, protection)?;
    let sessions = Arc::new(Sessions::new());
    let core =
        Arc::new(Core { store: Arc::new(store), protection, agents: sessions.clone(), shutdown: shutdown.clone() });
    let revocations = Arc::new(Revocations::load(&core.store)?);
    let state = Arc::new(AppState {
        revocations,
        cert_validity: siterecovery_certs::ca::LEAF_VALIDITY,
        vault_id: vault.info.vault_id.clone(),
        vault_dir: vault.dir.clone(),
        ca: vault.ca,
        sessions,
        core: core.clone(),
    });
    crate::protection::resume_jobs(&core, resumed);
    // The API schema is for members of the vault only, like every other call.
    let reflection_auth = {
        let vault_id = state.vault_id.clone();
        move |req: tonic::Request<()>| {
            crate::auth::authorize(&req, &vault_id, &[Role::Operator, Role::Host, Role::Provider])?;
            Ok(req)
        }
    };
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(siterecovery_proto::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(siterecovery_proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(vault = %state.vault_id, listen = ?local, "provider serving");
    // Nagle off (tonic ignores tcp_nodelay for a custom incoming).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let drained = CancellationToken::new();
    let server = Server::builder()
        .tls_config(tls)
        .map_err(ServeError::Tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(RegistrationServer::new(RegistrationService::new(state.clone())))
        .add_service(InventoryServer::new(InventoryService { state: state.clone() }))
        .add_service(ControlServer::new(ControlService { state: state.clone() }))
        .add_service(ProtectionServer::new(ProtectionService { core: core.clone(), vault_id: state.vault_id.clone() }))
        .add_service(InterceptedService::new(reflection_v1, reflection_auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, reflection_auth))
        .serve_with_incoming_shutdown(incoming, {
            let shutdown = shutdown.clone();
            let state = state.clone();
            async move {
                shutdown.cancelled().await;
                tracing::info!("shutting down: closing control sessions");
                state.sessions.close_all();
            }
        });
    let drained2 = drained.clone();
    let result = tokio::select! {
        r = server => r.map_err(ServeError::Transport),
        _ = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
            drained2.cancel();
        } => {
            tracing::warn!("grace period of {grace:?} over; stopping with requests in flight");
            Ok(())
        }
    };
    drained.cancel();
    result
}
